"""Attack probe (issue 21, defect 3): a file meta UID with a line break in it, against the node.

A STOW-RS part whose file meta carries ``TransferSyntaxUID = 1.2.840.10008.1.2.1\\r\\nX-Injected: yes``
was stored, and WADO-RS later wrote that value into an HTTP header.  Every UID the file meta brings
is now checked at ingest: the part is refused with FailureReason 0xC000, nothing is kept, the
refusal is audited.  On the DIMSE port the node builds the file meta itself from the negotiated
presentation context: a requestor proposing such a transfer syntax gets that context rejected
(it is none the node supports), and a merely padded one is negotiated as the clean UID.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from scp_node.store.part10 import part10_header
from scp_node.web import token_sha256
from tests.support.net import free_port, wait_port
from tests.support.node import NodeProcess, start_node, write_config
from tests.support.paths import CT_DIR, data_files, need_data
from tests.web.conftest import TOKEN

from .helpers import count_event, instance_counts, query

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:(Invalid value for VR UI|The value length):UserWarning")]

INJECTED = "1.2.840.10008.1.2.1\r\nX-Injected: yes"
BOUNDARY = "issue21-boundary"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path) -> Iterator[tuple[NodeProcess, str]]:
    folder = tmp_path_factory.mktemp("filemeta") / "node"
    folder.mkdir()
    port, web_port = free_port(), free_port()
    extra = f'\n[web]\nhost = "127.0.0.1"\nport = {web_port}\ntoken_sha256 = ["{token_sha256(TOKEN)}"]\n'
    config = write_config(folder, model_dir=test_model_dir, port=port, stable_seconds=3600,
                          peers=[("PYSCU", "127.0.0.1")], extra=extra)
    proc = start_node(config, port)
    wait_port(web_port, timeout=60)
    yield proc, f"http://127.0.0.1:{web_port}/dicom-web"
    assert proc.stop() == 0, proc.output()[-3000:]


def _ct_slice() -> tuple[bytes, str]:
    """A CT slice with new UIDs as Part 10 bytes (explicit VR LE), and its SOP Instance UID."""
    ds = pydicom.dcmread(data_files(CT_DIR)[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), str(ds.SOPInstanceUID)


def _with_meta(data: bytes, *, sop_class: str = CTImageStorage, sop_uid: str, syntax: str) -> bytes:
    """The data set of ``data`` behind a file meta holding exactly these values (any characters)."""
    (group_length,) = struct.unpack_from("<I", data, 140)  # (0002,0000) UL right after "DICM"
    return part10_header(sop_class, sop_uid, syntax) + data[144 + group_length:]


def _stow(root: str, part: bytes) -> requests.Response:
    body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
            + f"\r\n--{BOUNDARY}--\r\n".encode())
    return requests.post(f"{root}/studies", data=body, timeout=60, headers={
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})


def _folder(node: NodeProcess) -> Path:
    return node.config.parent


@pytest.mark.parametrize(("what", "meta"), [
    ("TransferSyntaxUID with CR/LF and a header", dict(syntax=INJECTED)),
    ("TransferSyntaxUID with CR/LF inside", dict(syntax="1.2.840.10008.1.2\r\n.1")),
    ("TransferSyntaxUID well formed but unknown (private)", dict(syntax="1.2.3.4.5.6.7")),
    ("MediaStorageSOPClassUID with CR/LF", dict(sop_class=CTImageStorage + "\r\nX-Injected: yes")),
    ("MediaStorageSOPInstanceUID with CR/LF", dict(sop_uid="1.2.3.4\r\nX-Injected: yes")),
])
def test_stow_refuses_a_bad_file_meta_uid(node: tuple[NodeProcess, str], what: str, meta: dict[str, str],
                                          counts: dict) -> None:
    proc, root = node
    folder = _folder(proc)
    data, sop_uid = _ct_slice()
    meta = dict(dict(syntax=ExplicitVRLittleEndian, sop_uid=sop_uid), **meta)
    before, rejected = instance_counts(folder), count_event(folder, "instance.rejected")

    rsp = _stow(root, _with_meta(data, **meta))

    assert rsp.status_code == 409, (what, rsp.status_code, rsp.text[:500])
    failed = Dataset.from_json(rsp.json()).FailedSOPSequence
    assert [int(item.FailureReason) for item in failed] == [0xC000], what
    assert "X-Injected" not in rsp.text and "x-injected" not in {k.lower() for k in rsp.headers}
    assert instance_counts(folder) == before, what  # no row, no file
    assert count_event(folder, "instance.rejected") == rejected + 1, what
    (detail,) = query(folder, "select detail from audit_events where event = 'instance.rejected' "
                              "order by id desc limit 1")[0:1]
    assert detail[0].startswith("STOW-RS 0xC000"), detail
    counts[what] = detail[0]


def test_a_clean_part_is_still_stored_and_served_with_a_clean_transfer_syntax(
        node: tuple[NodeProcess, str]) -> None:
    proc, root = node
    folder = _folder(proc)
    data, sop_uid = _ct_slice()
    rsp = _stow(root, _with_meta(data, sop_uid=sop_uid, syntax=ExplicitVRLittleEndian))
    assert rsp.status_code == 200, rsp.text[:500]
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    wado = requests.get(f"{root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{sop_uid}",
                        headers={"Authorization": f"Bearer {TOKEN}", "Accept": 'multipart/related; '
                                 'type="application/dicom"; transfer-syntax=*'}, timeout=60)
    assert wado.status_code == 200
    assert b"transfer-syntax=1.2.840.10008.1.2.1\r\n" in wado.content[:400]
    rows = query(folder, "select transfer_syntax_uid from instances")
    assert rows and all("\r" not in ts and "\n" not in ts for (ts,) in rows)


def test_dimse_rejects_a_proposed_transfer_syntax_with_cr_lf(node: tuple[NodeProcess, str], tmp_path: Path) -> None:
    """pynetdicom as SCU proposes the injected transfer syntax (and a padded one, and a clean
    one): the node rejects the injected context; the padded one is negotiated as the clean UID,
    so the file meta the node builds from it is clean too."""
    proc, _root = node
    folder = _folder(proc)
    enforce = _config.ENFORCE_UID_CONFORMANCE
    _config.ENFORCE_UID_CONFORMANCE = False
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage, [INJECTED])
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian + "\r\n"])
        before, stored = instance_counts(folder), count_event(folder, "instance.stored")
        assoc = ae.associate("127.0.0.1", proc.port, ae_title="SCPNODE")
        assert assoc.is_established
        try:
            accepted = [str(ts) for cx in assoc.accepted_contexts for ts in cx.transfer_syntax]
            rejected = [cx.context_id for cx in assoc.rejected_contexts]
            assert accepted == [ExplicitVRLittleEndian], accepted  # the padded one, as the clean UID
            assert rejected == [1]  # the injected one (its context ID is 1: proposed first)
            data, sop_uid = _ct_slice()
            # An injected syntax cannot be used: no accepted context carries it.
            ds = pydicom.dcmread(BytesIO(data))
            ds.file_meta.TransferSyntaxUID = INJECTED
            with pytest.raises(ValueError):
                assoc.send_c_store(ds)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            rsp = assoc.send_c_store(ds)
            assert rsp is not None and int(rsp.Status) == 0x0000
        finally:
            assoc.release()
    finally:
        _config.ENFORCE_UID_CONFORMANCE = enforce
    assert instance_counts(folder) == (before[0] + 1, before[1] + 1)
    assert count_event(folder, "instance.stored") == stored + 1
    (ts,) = query(folder, "select transfer_syntax_uid from instances where sop_instance_uid = ?", sop_uid)[0]
    assert ts == ExplicitVRLittleEndian
    # The file the node wrote carries the clean UID in its own file meta.
    (rel,) = query(folder, "select path from instances where sop_instance_uid = ?", sop_uid)[0]
    stored_bytes = (folder / "storage" / rel).read_bytes()
    assert b"\r\n" not in stored_bytes[:400]
    assert str(pydicom.dcmread(folder / "storage" / rel, stop_before_pixels=True).file_meta.TransferSyntaxUID) \
        == ExplicitVRLittleEndian
