"""File layer: UIDs never become unsafe paths; durable writes leave no temporary files."""

from __future__ import annotations

from pathlib import Path

import pytest

from scp_node.store import files
from scp_node.store.files import UnsafeUID, check_uid, instance_path, remove_quietly, write_durably


def test_instance_path_layout() -> None:
    assert instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5") == Path("1.2.3/1.2.3.4/1.2.3.4.5.dcm")


@pytest.mark.parametrize("raw, expected", [
    ("1.2.840.10008.1.2", "1.2.840.10008.1.2"),
    ("1.2.3\x00", "1.2.3"),  # UI padding byte
    (" 1.2.3 ", "1.2.3"),
    ("1.2.03", "1.2.03"),  # leading zero: not conformant, seen in the wild, still path-safe
    ("1." + "2" * 62, "1." + "2" * 62),  # 64 characters
])
def test_check_uid_accepts(raw: str, expected: str) -> None:
    assert check_uid(raw, "X") == expected


@pytest.mark.parametrize("raw, message", [
    (None, "missing"), ("", "missing"), ("\x00", "missing"),
    ("1." + "2" * 63, "longer than 64"),
    ("../x", "not a UID"), ("1.2/3", "not a UID"), ("..", "not a UID"), (".", "not a UID"),
    ("1..2", "not a UID"), ("1.2.", "not a UID"), ("/1.2", "not a UID"), ("1.2\\3", "not a UID"),
    ("1.2.3\n4", "not a UID"), ("1.2 3", "not a UID"),
])
def test_check_uid_refuses(raw: object, message: str) -> None:
    with pytest.raises(UnsafeUID, match=f"StudyInstanceUID .*{message}|StudyInstanceUID is {message}"):
        check_uid(raw, "StudyInstanceUID")


def test_instance_path_refuses_each_part() -> None:
    for args in (("../..", "1.2", "1.3"), ("1.2", "a/b", "1.3"), ("1.2", "1.3", "../../x")):
        with pytest.raises(UnsafeUID):
            instance_path(*args)


def test_write_durably_writes_and_replaces_without_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.dcm"
    write_durably(target, b"first")
    assert target.read_bytes() == b"first"
    write_durably(target, b"second, longer content")
    assert target.read_bytes() == b"second, longer content"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]


def test_write_durably_failure_removes_its_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "x.dcm"
    target.mkdir()  # rename over a folder fails after the temp file was written
    (target / "keep").write_bytes(b"k")
    with pytest.raises(OSError):
        write_durably(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dcm"]
    assert target.is_dir()


def test_remove_quietly(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    remove_quietly(f)
    assert not f.exists()
    remove_quietly(f)  # a missing file is not an error


def test_stage_bytes_writes_starts_writeback_and_returns_the_digest(tmp_path: Path) -> None:
    import hashlib
    import os

    from scp_node.store import files

    data = os.urandom(600_000)
    target = tmp_path / "a" / "b" / ".x.tmp"
    assert files.stage_bytes(target, data) == hashlib.sha256(data).hexdigest()
    assert target.read_bytes() == data
    assert files._SYNC_FILE_RANGE is not None  # Linux: the writeback is started before the hash
    with open(target, "rb") as fh:
        files.start_writeback(fh.fileno())  # harmless on a clean (or read-only) file
    with pytest.raises(FileExistsError):  # a staged name is never reused
        files.stage_bytes(target, b"other")


def test_make_folder_fsyncs_each_new_folder_into_its_parent(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    real = files.fsync_dir

    def spy(folder: Path) -> None:
        synced.append(folder)
        real(folder)

    monkeypatch.setattr(files, "fsync_dir", spy)
    files.make_folder(tmp_path / "study" / "series")
    assert (tmp_path / "study" / "series").is_dir()
    assert synced == [tmp_path, tmp_path / "study"]  # the study's name in its parent, then the series'
    synced.clear()
    files.make_folder(tmp_path / "study" / "series")  # already there: nothing to make durable
    files.make_folder(tmp_path / "study" / "other")
    assert synced == [tmp_path / "study"]


def test_make_folder_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "study").write_bytes(b"x")
    with pytest.raises(OSError):
        files.make_folder(tmp_path / "study" / "series")


def test_link_new_never_replaces_a_file(tmp_path: Path) -> None:
    staged, target = tmp_path / ".x.tmp", tmp_path / "x.dcm"
    staged.write_bytes(b"new")
    assert files.link_new(staged, target) is True
    assert target.read_bytes() == b"new" and target.stat().st_ino == staged.stat().st_ino
    other = tmp_path / ".y.tmp"
    other.write_bytes(b"other")
    assert files.link_new(other, target) is False
    assert target.read_bytes() == b"new"


def test_link_new_on_a_file_system_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    staged = tmp_path / ".x.tmp"
    staged.write_bytes(b"new")

    def refuse(_src: object, _dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    assert files.link_new(staged, tmp_path / "x.dcm") is False
    assert not (tmp_path / "x.dcm").exists()

    def broken(_src: object, _dst: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", broken)
    with pytest.raises(OSError):  # a failing disk is not "no hard links"
        files.link_new(staged, tmp_path / "x.dcm")
