"""DIMSE behaviour against independent peers: DCMTK echoscu/storescu and raw pynetdicom SCUs.

Each refusal is checked the way Orthanc's own suite does it: by the status the sender sees, by
counting indexed instances and stored files afterwards, and by the audit row.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from tests.support.node import NodeProcess, start_node, write_config
from tests.support.paths import CT_DIR, CXR, data_files, need_data, tool

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("receive_path")]  # fast path and pynetdicom's own


@pytest.fixture
def node(tmp_path: Path, node_port: int, test_model_dir: Path) -> Iterator[NodeProcess]:
    folder = tmp_path / "node"
    folder.mkdir()
    # Long stable window: these tests are about receiving, not analysing.
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=3600,
                          peers=[("STORESCU", "127.0.0.1"), ("ECHOSCU", "127.0.0.1"), ("PYSCU", "127.0.0.1"),
                                 ("FARAWAY", "192.0.2.7")])
    proc = start_node(config, node_port)
    yield proc
    assert proc.stop() == 0, proc.output()[-3000:]


def _db(node: NodeProcess) -> sqlite3.Connection:
    return sqlite3.connect(node.config.parent / "index.db")


def _count_instances(node: NodeProcess) -> tuple[int, int]:
    with _db(node) as con:
        rows = con.execute("select count(*) from instances").fetchone()[0]
    files = [p for p in (node.config.parent / "storage").rglob("*") if p.is_file()]
    return int(rows), len(files)


def _events(node: NodeProcess, name: str) -> list[tuple[str, str, str]]:
    with _db(node) as con:
        return con.execute("select outcome, ae_title, detail from audit_events where event = ? order by id",
                           (name,)).fetchall()


def _echo(port: int, calling: str, called: str = "SCPNODE") -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def test_dcmtk_echo_and_store(node: NodeProcess) -> None:
    assert _echo(node.port, "ECHOSCU").returncode == 0
    files = [need_data(CXR / "RG1_J2KR.dcm")] + data_files(CT_DIR, at_least=5)[:5]
    # -xv proposes JPEG 2000 lossless, so the file goes over the wire in its own transfer syntax.
    r = subprocess.run([tool("storescu"), "-aet", "STORESCU", "-aec", "SCPNODE", "-xv", "127.0.0.1",
                        str(node.port), str(files[0])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([tool("storescu"), "-aet", "STORESCU", "-aec", "SCPNODE", "127.0.0.1",
                        str(node.port), *map(str, files[1:])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _count_instances(node) == (6, 6)
    # Kept as received, byte for byte: the JPEG 2000 file is not re-encoded.
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    stored = (node.config.parent / "storage" / src.StudyInstanceUID / src.SeriesInstanceUID /
              f"{src.SOPInstanceUID}.dcm")
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(files[0]).PixelData
    # Same file again: success for the sender, audited as a duplicate, nothing new kept.
    r = subprocess.run([tool("storescu"), "-aet", "STORESCU", "-aec", "SCPNODE", "127.0.0.1",
                        str(node.port), str(files[1])], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert _count_instances(node) == (6, 6)
    assert len(_events(node, "instance.duplicate")) == 1


@pytest.mark.parametrize("calling,called,why", [
    ("INTRUDER", "SCPNODE", "unknown calling AE title"),
    ("FARAWAY", "SCPNODE", "known AE title from the wrong address"),
    ("ECHOSCU", "NOTUS", "wrong called AE title"),
])
def test_unknown_callers_are_rejected_and_audited(node: NodeProcess, calling: str, called: str, why: str) -> None:
    r = _echo(node.port, calling, called)
    assert r.returncode != 0, why
    assert "reject" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    rejected = _events(node, "association.rejected")
    assert [row for row in rejected if row[1] == calling], why
    assert _echo(node.port, "ECHOSCU").returncode == 0  # still serving


def _send_raw(port: int, path: Path) -> int:
    """C-STORE a file as its raw bytes (pynetdicom streams a path without decoding it)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="PYSCU")
    for sop_class in (CTImageStorage, MRImageStorage):
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):  # one context each
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCPNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(rsp.Status)


def _with_meta(body: bytes, out: Path) -> Path:
    """A Part 10 file whose dataset is SOP Class/Instance UID followed by ``body`` (junk).

    The two UIDs are there because pynetdicom's SCU reads them before it streams a file.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    out.write_bytes(out.read_bytes() + body)
    return out


def test_bad_datasets_get_a_failure_status_and_the_node_keeps_serving(node: NodeProcess, tmp_path: Path) -> None:
    ct = data_files(CT_DIR)[0]
    good = ct.read_bytes()
    plain = pydicom.dcmread(ct)
    plain.SOPInstanceUID = plain.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    cases = {
        "not DICOM": _with_meta(b"this is not a DICOM dataset at all" * 40, tmp_path / "junk.dcm"),
        "truncated in pixel data": tmp_path / "cut.dcm",
        "truncated MR (pydicom)": Path(get_testdata_file("MR_truncated.dcm")),
    }
    cases["truncated in pixel data"].write_bytes(good[: len(good) - 5000])
    bad_uid = pydicom.dcmread(ct)
    bad_uid.SOPInstanceUID = "1.2.3/../../etc"
    bad_uid.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../etc"
    bad_uid.save_as(tmp_path / "pathuid.dcm")
    cases["path-like SOP Instance UID"] = tmp_path / "pathuid.dcm"
    before = _count_instances(node)
    for what, path in cases.items():
        status = _send_raw(node.port, path)
        assert status != 0x0000 and status >= 0xA000, f"{what}: 0x{status:04X}"
        assert _count_instances(node) == before, what
    assert len(_events(node, "instance.rejected")) == len(cases)
    assert not list((node.config.parent / "storage").rglob("*.tmp"))
    # A valid instance still gets through after all that.
    plain.save_as(tmp_path / "ok.dcm")
    assert _send_raw(node.port, tmp_path / "ok.dcm") == 0x0000
    assert _count_instances(node)[0] == before[0] + 1
