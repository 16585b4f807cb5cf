"""Every transfer syntax is stored as received: each file of ``../shared/data/ts_matrix`` (15
syntaxes, 45 files, the retired JPEG processes 6/8 and 10/12 among them), offered alone -- one
presentation context, its own SOP class and transfer syntax -- is accepted, answered Success and
kept byte for byte, whether or not the engine can decode it."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pynetdicom import AE, _config

from tests.support.node import NodeProcess, start_node, write_config
from tests.support.paths import DATA, need_data

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("receive_path")]  # fast path and pynetdicom's own

TS_MATRIX = DATA / "ts_matrix"
RETIRED_JPEG = {"1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"}


def _matrix() -> list[Path]:
    files = sorted(need_data(TS_MATRIX).rglob("*.dcm"))
    assert len(files) == 45, f"{TS_MATRIX}: {len(files)} files, expected 45"
    return files


def data_set_bytes(part10: bytes) -> bytes:
    """What follows the File Meta Information (group 0002, explicit VR little endian) of a file."""
    assert part10[128:132] == b"DICM"
    pos = 132
    while pos + 8 <= len(part10):
        group, _element = struct.unpack_from("<HH", part10, pos)
        if group != 0x0002:
            break
        vr = part10[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + struct.unpack_from("<I", part10, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", part10, pos + 6)[0]
    return part10[pos:]


def _sendable(path: Path, meta: pydicom.Dataset, folder: Path) -> Path:
    """``path`` itself, or -- where its File Meta names other UIDs than its data set (four MR files
    of the matrix: a sender takes the command's UIDs from the meta) -- a copy with the same data
    set bytes after a File Meta that matches them."""
    if (meta.file_meta.MediaStorageSOPInstanceUID == meta.SOPInstanceUID
            and meta.file_meta.MediaStorageSOPClassUID == meta.SOPClassUID):
        return path
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = meta.SOPClassUID
    fm.MediaStorageSOPInstanceUID = meta.SOPInstanceUID
    fm.TransferSyntaxUID = meta.file_meta.TransferSyntaxUID
    fm.ImplementationClassUID = meta.file_meta.ImplementationClassUID
    out = DicomBytesIO()
    write_file_meta_info(out, fm, enforce_standard=True)
    copy = folder / f"{path.parent.name}-{path.name}"
    copy.write_bytes(b"\0" * 128 + b"DICM" + out.getvalue() + data_set_bytes(path.read_bytes()))
    return copy


@pytest.fixture
def node(tmp_path: Path, node_port: int, test_model_dir: Path) -> Iterator[NodeProcess]:
    folder = tmp_path / "node"
    folder.mkdir()
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=3600,
                          peers=[("PYSCU", "127.0.0.1")])
    # The variants in one folder share their SOP Instance UIDs: each replaces the one before, so
    # that every file's own bytes can be compared with what the index points to.
    config.write_text(config.read_text().replace("[store]\n", '[store]\nduplicate_policy = "replace"\n', 1))
    proc = start_node(config, node_port)
    yield proc
    assert proc.stop() == 0, proc.output()[-3000:]


def test_each_transfer_syntax_offered_alone_is_accepted_and_kept_byte_for_byte(
        node: NodeProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The sender sends each file's data set as it is on disk (not read by pydicom and written again).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    files = _matrix()
    seen: set[str] = set()
    storage = node.config.parent / "storage"
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        syntax, sop_class = str(meta.file_meta.TransferSyntaxUID), str(meta.SOPClassUID)
        seen.add(syntax)
        scu = AE("PYSCU")
        scu.add_requested_context(sop_class, [syntax])  # offered alone: no fallback syntax
        assoc = scu.associate("127.0.0.1", node.port, ae_title="SCPNODE")
        assert assoc.is_established, f"{path.name} ({syntax}): association refused"
        try:
            assert [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts] == [syntax], path
            status = assoc.send_c_store(_sendable(path, meta, tmp_path))
            assert status is not None and status.Status == 0x0000, (path, status)
        finally:
            assoc.release()
        with sqlite3.connect(node.config.parent / "index.db") as con:
            stored, stored_syntax = con.execute(
                "select path, transfer_syntax_uid from instances where sop_instance_uid = ?",
                (str(meta.SOPInstanceUID),)).fetchone()
        assert stored_syntax == syntax
        assert data_set_bytes((storage / stored).read_bytes()) == data_set_bytes(path.read_bytes()), path
    assert len(seen) == 15 and RETIRED_JPEG <= seen
