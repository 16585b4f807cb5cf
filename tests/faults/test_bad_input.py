"""Bad input on the DIMSE port, each answered with a DICOM failure status or a clean reject.

After every case: the status is one the node means (success for a file that is valid after all,
else Out of Resources / Data Set does not match SOP Class / Cannot Understand, never a
processing failure), the counts of indexed instances and stored files are unchanged (or +1 for a
success), an audit row records it, and a valid C-STORE still succeeds.  Counted: inputs tried vs.
answered cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from tests.support.node import NodeProcess, start_node, write_config
from tests.support.paths import CT_DIR, data_files, need_data, tool

from .helpers import Proxy, count_event, instance_counts, query, stored_files

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("receive_path")]  # fast path and pynetdicom's own

CLEAN_FAILURES = {0xA700, 0xA900, 0xC000}
PYDICOM_FILES = ["badVR.dcm", "MR_truncated.dcm", "no_meta.dcm", "meta_missing_tsyntax.dcm", "JPEG-lossy.dcm",
                 "UN_sequence.dcm", "nested_priv_SQ.dcm"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path, receive_path: str) -> Iterator[NodeProcess]:
    """One node per receive path (the fixture's dependency on receive_path restarts it for each)."""
    from tests.support.net import free_port

    folder = tmp_path_factory.mktemp("badinput") / "node"
    folder.mkdir()
    port = free_port()
    config = write_config(folder, model_dir=test_model_dir, port=port, stable_seconds=3600,
                          peers=[("STORESCU", "127.0.0.1"), ("PYSCU", "127.0.0.1"), ("ECHOSCU", "127.0.0.1")])
    proc = start_node(config, port)
    yield proc
    assert proc.stop() == 0, proc.output()[-3000:]


def _folder(node: NodeProcess) -> Path:
    return node.config.parent


def _part10(body: bytes, out: Path, sop_class: str = CTImageStorage, syntax: str = ExplicitVRLittleEndian,
            sop_instance: str = "") -> Path:
    """Preamble + file meta naming ``sop_class``/``syntax`` + ``body`` exactly as given (any bytes).

    The meta's SOP Instance UID becomes the C-STORE's Affected SOP Instance UID: the dataset's own
    one where it has a usable one, so the file itself is judged, not a command/dataset mismatch.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance or generate_uid()
    meta.TransferSyntaxUID = syntax
    fh = BytesIO()
    fh.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fh, meta, enforce_standard=True)
    out.write_bytes(fh.getvalue() + body)
    return out


def _body_of(path: Path) -> tuple[bytes, str, str, str]:
    """(dataset bytes after any file meta, its transfer syntax (guessed when missing), its SOP class,
    its SOP Instance UID or "")."""
    raw = path.read_bytes()
    with open(path, "rb") as fh:
        try:
            read_preamble(fh, False)
            meta = pydicom.filereader._read_file_meta_info(fh)
            offset = fh.tell()
        except Exception:  # noqa: BLE001 - no meta at all
            meta, offset = FileMetaDataset(), 0
    syntax = str(meta.get("TransferSyntaxUID", ImplicitVRLittleEndian if offset == 0 else ExplicitVRLittleEndian))
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        sop_class = str(ds.get("SOPClassUID") or CTImageStorage)
        sop_instance = str(ds.get("SOPInstanceUID") or "")
    except Exception:  # noqa: BLE001
        sop_class, sop_instance = CTImageStorage, ""
    if not re.fullmatch(r"[0-9.]{1,64}", sop_instance):
        sop_instance = ""
    return raw[offset:], syntax, sop_class, sop_instance


def _send(port: int, path: Path) -> int:
    """C-STORE the file's bytes as they are (pynetdicom chunked send: no decode, no re-encode)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="SCPNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return int(rsp.Status) if rsp is not None and "Status" in rsp else -1


def _ct(tmp: Path, name: str, **changes: object) -> Path:
    """A CT slice with new UIDs and the given attribute changes (None deletes)."""
    ds = pydicom.dcmread(data_files(CT_DIR)[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for key, value in changes.items():
        if value is None:
            if key in ds:
                del ds[key]
        else:
            setattr(ds, key, value)
    out = tmp / name
    # Invalid UIDs are the point here: let pydicom write them as given.
    mode = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        ds.save_as(out, enforce_file_format=False)
    finally:
        pydicom_config.settings.writing_validation_mode = mode
    return out


def _valid_store_still_works(node: NodeProcess, tmp: Path) -> None:
    before = instance_counts(_folder(node))
    assert _send(node.port, _ct(tmp, f"ok-{time.monotonic_ns()}.dcm")) == 0x0000
    assert instance_counts(_folder(node)) == (before[0] + 1, before[1] + 1)


def _check_status_case(node: NodeProcess, tmp: Path, what: str, path: Path, tally: dict) -> int:
    folder = _folder(node)
    before, rejected = instance_counts(folder), count_event(folder, "instance.rejected")
    status = _send(node.port, path)
    after = instance_counts(folder)
    tally["tried"] += 1
    if status == 0x0000:
        assert after == (before[0] + 1, before[1] + 1), what
        assert count_event(folder, "instance.stored") >= 1
    else:
        assert status in CLEAN_FAILURES, f"{what}: 0x{status:04X}"
        assert after == before, what
        assert count_event(folder, "instance.rejected") == rejected + 1, what
    assert not [p for p in stored_files(folder) if p.name.endswith(".tmp")], what
    tally["clean"] += 1
    tally["statuses"][what] = f"0x{status:04X}"
    _valid_store_still_works(node, tmp)
    return status


def test_malformed_files_and_datasets(node: NodeProcess, tmp_path: Path, counts: dict) -> None:
    tally: dict = {"tried": 0, "clean": 0, "statuses": {}}
    for name in PYDICOM_FILES:
        body, syntax, sop_class, sop_instance = _body_of(Path(get_testdata_file(name)))
        _check_status_case(node, tmp_path, name, _part10(body, tmp_path / name, sop_class, syntax, sop_instance),
                           tally)
    cases = {
        "non-DICOM payload": (_part10(b"this is not a DICOM dataset " * 64, tmp_path / "junk.dcm"), {0xC000}),
        "random bytes as dataset": (_part10(os.urandom(8192), tmp_path / "rand.dcm"), {0xC000}),
        "CT dataset on an MR context": (
            _part10(_body_of(_ct(tmp_path, "ct.dcm"))[0], tmp_path / "mismatch.dcm", MRImageStorage), {0xA900}),
        "missing StudyInstanceUID": (_ct(tmp_path, "nostudy.dcm", StudyInstanceUID=None), {0xC000}),
        "missing SeriesInstanceUID": (_ct(tmp_path, "noseries.dcm", SeriesInstanceUID=None), {0xC000}),
        "missing SOPInstanceUID": (_ct(tmp_path, "nosop.dcm", SOPInstanceUID=None), {0xC000}),
        "overlong SOPInstanceUID": (_ct(tmp_path, "long.dcm", SOPInstanceUID="1.2." + "3" * 80), {0xC000}),
        "path-like SOPInstanceUID": (_ct(tmp_path, "p1.dcm", SOPInstanceUID="1.2.3/../../../etc/x"), {0xC000}),
        "path-like StudyInstanceUID": (_ct(tmp_path, "p2.dcm", StudyInstanceUID="../../outside"), {0xC000}),
        "absolute-path SeriesInstanceUID": (_ct(tmp_path, "p3.dcm", SeriesInstanceUID="/tmp/evil"), {0xC000}),
    }
    for what, (path, expected) in cases.items():
        status = _check_status_case(node, tmp_path, what, path, tally)
        assert status in expected, f"{what}: 0x{status:04X}"
    escaped = [p for p in (_folder(node)).rglob("*") if "outside" in p.name or "evil" in p.name]
    assert not escaped and not Path("/tmp/evil").exists()
    counts.update(tried=tally["tried"], answered_cleanly=tally["clean"], statuses=tally["statuses"])
    assert tally["clean"] == tally["tried"]


def _raw_exchange(port: int, payload: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes to the DIMSE port; return what came back before the node closed it."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        try:
            s.sendall(payload)
        except OSError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, OSError):
                break
            if not chunk:
                return got + b"<closed>"
            got += chunk
    return got


def _rss_mib(pid: int) -> float:
    """RSS of the node and its receiver processes (any of them may take an association)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(_rss_mib(int(child)) for child in children)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return total + int(line.split()[1]) / 1024
    except OSError:  # a receiver that just ended
        pass
    return total


def test_connection_level_garbage_and_oversized_pdus(node: NodeProcess, tmp_path: Path, counts: dict) -> None:
    folder = _folder(node)
    tried = clean = 0
    before = instance_counts(folder)
    rss0 = _rss_mib(node.proc.pid)
    for what, payload in {
        "random bytes": b"\xff" + os.urandom(4095),  # (not a PDU type: a random first byte sometimes is one)
        "HTTP request": b"GET / HTTP/1.1\r\nHost: scp-node\r\nUser-Agent: curl/8\r\n\r\n",
        "A-ASSOCIATE-RQ declaring 100 MB": struct.pack(">BBL", 0x01, 0, 100 * 2**20) + b"\x00" * 1024,
        "P-DATA declaring 4 GB before association": struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + b"\x00" * 65536,
    }.items():
        aborted = count_event(folder, "association.aborted")
        reply = _raw_exchange(node.port, payload)
        tried += 1
        # A-ABORT (0x07) or a closed connection, within seconds, never a wait for the declared bytes.
        assert reply.startswith(b"\x07") or reply.endswith(b"<closed>"), f"{what}: {reply[:40]!r}"
        from tests.support.net import wait_for

        wait_for(lambda: count_event(folder, "association.aborted") > aborted, 20, what=f"audit row for {what}")
        assert instance_counts(folder) == before
        clean += 1
    # Oversized P-DATA on an established association: A-ABORT, no buffering.
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SCPNODE", max_pdu=16384)
    assert assoc.is_established
    aborted = count_event(folder, "association.aborted")
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 1_048_576 * 64) + b"\x00" * 65536)
    deadline = time.monotonic() + 10
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    tried += 1
    assert assoc.is_aborted or not assoc.is_established
    from tests.support.net import wait_for

    wait_for(lambda: count_event(folder, "association.aborted") > aborted, 20, what="audit row for oversized PDU")
    rows = [d for _, _, d in query(folder, "select outcome, ae_title, detail from audit_events "
                                           "where detail like '%over our limit%'")]
    assert len(rows) >= 3, rows
    clean += 1
    rss1 = _rss_mib(node.proc.pid)
    assert rss1 - rss0 < 64, f"RSS grew {rss1 - rss0:.0f} MiB"
    assert node.proc.poll() is None
    _valid_store_still_works(node, tmp_path)
    counts.update(tried=tried, answered_cleanly=clean, rss_growth_mib=round(rss1 - rss0, 1))
    assert clean == tried


def _send_part_then_abort(assoc: "object", path: Path) -> None:
    """On an established association: the C-STORE-RQ command and the first 4 MiB of the dataset
    as raw P-DATA-TF PDUs (the last-fragment bit never set), then a raw A-ABORT PDU."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    meta = pydicom.filereader.read_file_meta_info(path)
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    req.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    req.Priority = 2
    body = _body_of(path)[0]
    req.DataSet = BytesIO(body[: 4 * 2**20 + 1000])
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    cx = assoc.accepted_contexts[0].context_id  # type: ignore[attr-defined]
    raw = assoc.dul.socket.socket  # type: ignore[attr-defined]
    sent = 0
    for primitive in msg.encode_msg(cx, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        data = pdu.encode()
        if primitive.presentation_data_value_list[0][1][0] & 0x03 == 0x02:
            break  # the dataset's last fragment: never sent
        raw.sendall(data)
        sent += len(data)
        if sent > 4 * 2**20:
            break
    raw.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0))
    time.sleep(1)


def _big_file(out: Path, megabytes: int) -> Path:
    """A CT header followed by ``megabytes`` of OB Pixel Data, written in blocks (never in memory)."""
    ds = pydicom.dcmread(data_files(CT_DIR)[0], stop_before_pixels=True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    size = megabytes * 2**20
    block = os.urandom(2**20)
    with open(out, "ab") as fh:
        fh.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, size))
        for _ in range(megabytes):
            fh.write(block)
    return out


def test_abort_mid_dataset_and_a_very_large_dataset(node: NodeProcess, tmp_path: Path, counts: dict) -> None:
    folder = _folder(node)
    big = _big_file(tmp_path / "big.dcm", 200)
    tried = clean = 0
    # 1. storescu killed in the middle of the 200 MB dataset (TCP drops mid-P-DATA); a slow link
    #    (20 MB/s) makes sure the kill lands mid-transfer.
    slow = Proxy(node.port, rate=20e6)
    before = instance_counts(folder)
    aborted = count_event(folder, "association.aborted")
    p = subprocess.Popen([tool("storescu"), "-aet", "STORESCU", "-aec", "SCPNODE", "--max-send-pdu", "16384",
                          "127.0.0.1", str(slow.port), str(big)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    from tests.support.net import wait_for

    wait_for(lambda: count_event(folder, "association.aborted") > aborted, 60, what="audit row for the drop")
    tried += 1
    assert instance_counts(folder) == before
    clean += 1
    # 2. A-ABORT from a pynetdicom SCU in the middle of the dataset.
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SCPNODE", max_pdu=16384)
    assert assoc.is_established
    aborted = count_event(folder, "association.aborted")
    _send_part_then_abort(assoc, big)
    wait_for(lambda: count_event(folder, "association.aborted") > aborted, 60, what="audit row for the A-ABORT")
    tried += 1
    assert instance_counts(folder) == before
    assert not [f for f in stored_files(folder) if f.name.endswith(".tmp")]
    clean += 1
    slow.close()
    _valid_store_still_works(node, tmp_path)
    # 3. The whole 200 MB dataset: stored, and the node's memory does not grow by its size.
    before = instance_counts(folder)
    peak, stop = [_rss_mib(node.proc.pid)], threading.Event()
    base = peak[0]

    def sample() -> None:
        while not stop.is_set():
            peak.append(_rss_mib(node.proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    r = subprocess.run([tool("storescu"), "-aet", "STORESCU", "-aec", "SCPNODE", "127.0.0.1", str(node.port),
                        str(big)], capture_output=True, text=True, timeout=300)
    stop.set()
    sampler.join()
    tried += 1
    assert r.returncode == 0, r.stdout + r.stderr
    assert instance_counts(folder) == (before[0] + 1, before[1] + 1)
    growth = max(peak) - base
    assert growth < 100, f"RSS grew {growth:.0f} MiB while receiving a 200 MiB dataset"
    clean += 1
    counts.update(tried=tried, answered_cleanly=clean, large_dataset_mib=200, rss_growth_mib=round(growth, 1))
