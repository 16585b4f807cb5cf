"""Every UID the file meta brings is checked at ingest (issue 21): the stored Transfer Syntax UID goes
into the index and from there into DICOMweb (WADO-RS) headers, so a value with a line break must
never get there.

Transfer Syntax UID: required, UID grammar, and one the node knows (pydicom's dictionary of
transfer syntaxes; a private or unknown one is refused).  Media Storage SOP Class / Instance UID:
UID grammar where present.  The padding and surrounding whitespace that pydicom's UID reading
removes anyway are not part of the value (what is indexed is the clean UID); anything inside it is
refused, never trimmed into shape.  Every path: bytes (the quick scan and pydicom's parse) and
spooled files (read into memory, or parsed from the file past the in-memory limit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from scp_node.dimse.status_codes import StoreStatus
from scp_node.store import ingest as ingest_module
from scp_node.store.db import Database
from scp_node.store.ingest import KNOWN_TRANSFER_SYNTAXES, IngestOutcome, Ingestor, InvalidInstance
from scp_node.store.models import Instance, Series
from scp_node.store.part10 import part10_header
from scp_node.store.scan import _file_meta, scan_instance
from tests.store.realdata import CT_SLICES, CXR_DX_J2K, ORIGIN, SMALL_MR, TS_CT_IMPLICIT, count, read_bytes

pytestmark = pytest.mark.filterwarnings("ignore:(Invalid value for VR UI|The value length):UserWarning")

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
INJECTED = EXPLICIT + "\r\nX-Injected: yes"


def _body(data: bytes) -> bytes:
    """The data set of a Part 10 byte string (what follows its file meta)."""
    _meta, pos = _file_meta(data)
    return data[pos:]


def _with_meta(data: bytes, sop_class: str, sop_uid: str, syntax: str) -> bytes:
    """``data``'s data set behind a file meta with exactly these values (any characters)."""
    return part10_header(sop_class, sop_uid, syntax) + _body(data)


def _ct(syntax: str = EXPLICIT, sop_class: str = CT_IMAGE, sop_uid: str | None = None) -> bytes:
    import pydicom

    data = read_bytes(CT_SLICES[0])
    uid = sop_uid if sop_uid is not None else str(pydicom.dcmread(CT_SLICES[0], stop_before_pixels=True).SOPInstanceUID)
    return _with_meta(data, sop_class, uid, syntax)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "spool"
    folder.mkdir()
    yield folder


def _ingest(ingestor: Ingestor, data: bytes, how: str, spool: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    if how == "bytes":
        return ingestor.ingest(data, ORIGIN)
    path = spool / "in.dcm"
    path.write_bytes(data)
    if how == "spooled file, parsed from disk":
        monkeypatch.setattr(ingest_module, "IN_MEMORY_PARSE_LIMIT", 0)
    return ingestor.ingest(path, ORIGIN)


HOW = ["bytes", "spooled file", "spooled file, parsed from disk"]


def _nothing_kept(db: Database, storage: Path) -> None:
    assert count(db, Instance) == 0 and count(db, Series) == 0
    assert not storage.exists() or not [p for p in storage.rglob("*") if p.is_file()]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(("syntax", "reason"), [
    (INJECTED, "TransferSyntaxUID is not a UID"),
    ("1.2.840.10008.1.2\r\n.1", "TransferSyntaxUID is not a UID"),
    (EXPLICIT + "\x00X-Injected: yes", "TransferSyntaxUID is not a UID"),
    (EXPLICIT + "; x=1", "TransferSyntaxUID is not a UID"),
    ("1.2.840.10008.1.2.1\\1.2.840.10008.1.2", "TransferSyntaxUID is not a UID"),  # two values
    ("1.2.3.4.5.6", "not a transfer syntax this node knows"),  # well formed, private
    ("1.2.840.10008.1.2.1.4242", "not a transfer syntax this node knows"),
    ("1.2.840.10008.5.1.4.1.1.2", "not a transfer syntax this node knows"),  # a UID, but a SOP class
    ("", "TransferSyntaxUID is missing"),
    ("1." + "2" * 70, "TransferSyntaxUID is longer than 64"),
])
def test_a_bad_transfer_syntax_uid_is_refused(ingestor: Ingestor, index_db: Database, storage_dir: Path,
                                              spool: Path, monkeypatch: pytest.MonkeyPatch, how: str,
                                              syntax: str, reason: str) -> None:
    with pytest.raises(InvalidInstance, match=reason) as info:
        _ingest(ingestor, _ct(syntax), how, spool, monkeypatch)
    assert info.value.status == StoreStatus.CANNOT_UNDERSTAND == 0xC000
    assert "X-Injected" not in str(info.value)
    _nothing_kept(index_db, storage_dir)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keyword", ["MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"])
def test_a_bad_media_storage_uid_is_refused(ingestor: Ingestor, index_db: Database, storage_dir: Path,
                                            spool: Path, monkeypatch: pytest.MonkeyPatch, how: str,
                                            keyword: str) -> None:
    import pydicom

    sop_uid = str(pydicom.dcmread(CT_SLICES[0], stop_before_pixels=True).SOPInstanceUID)
    if keyword == "MediaStorageSOPClassUID":
        data = _ct(sop_class=CT_IMAGE + "\r\nX-Injected: yes")
    else:
        data = _ct(sop_uid=sop_uid[:40] + "\r\nX-Injected: yes")  # (within 64 characters)
    with pytest.raises(InvalidInstance, match=f"{keyword} is not a UID") as info:
        _ingest(ingestor, data, how, spool, monkeypatch)
    assert info.value.status == StoreStatus.CANNOT_UNDERSTAND
    _nothing_kept(index_db, storage_dir)


def test_the_quick_scan_reads_a_file_whose_meta_it_refuses() -> None:
    """The refusal is not the scanner's fallback: the data set itself scans fine."""
    data = _ct(sop_class=CT_IMAGE + "\r\nX")
    assert scan_instance(data) is not None  # the quick scan handles it (the meta value goes to pydicom)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(("path", "syntax"), [(CT_SLICES[0], EXPLICIT), (TS_CT_IMPLICIT, "1.2.840.10008.1.2"),
                                              (CXR_DX_J2K, "1.2.840.10008.1.2.4.90"),
                                              (SMALL_MR, "1.2.840.10008.1.2.5")])
def test_good_file_meta_is_kept_and_the_checked_syntax_indexed(
        ingestor: Ingestor, index_db: Database, spool: Path, monkeypatch: pytest.MonkeyPatch, how: str,
        path: Path, syntax: str) -> None:
    assert _ingest(ingestor, read_bytes(path), how, spool, monkeypatch) is IngestOutcome.STORED
    with index_db.session() as s:
        assert s.scalars(select(Instance.transfer_syntax_uid)).one() == syntax


@pytest.mark.parametrize("syntax", [EXPLICIT + " ", EXPLICIT + "\x00", EXPLICIT + "\r\n", " " + EXPLICIT])
def test_padding_and_surrounding_whitespace_are_not_indexed(ingestor: Ingestor, index_db: Database,
                                                            syntax: str) -> None:
    """pydicom's UID reading takes these off (so does every reader of the file): the index gets
    the clean UID, which is what DICOMweb then writes."""
    assert ingestor.ingest(_ct(syntax), ORIGIN) is IngestOutcome.STORED
    with index_db.session() as s:
        assert s.scalars(select(Instance.transfer_syntax_uid)).one() == EXPLICIT


def test_known_transfer_syntaxes_cover_what_the_node_negotiates() -> None:
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    assert set(ALL_TRANSFER_SYNTAXES) <= KNOWN_TRANSFER_SYNTAXES
    assert "1.2.840.10008.1.2.4.53" in KNOWN_TRANSFER_SYNTAXES  # retired, still kept as received
