"""scp_node.dimse.buffer: the data set buffer (memory, then a spool file) and its use by a real association."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from scp_node.dimse.buffer import DataSetBuffer, take_dataset
from scp_node.store.part10 import part10_header
from scp_node.dimse.pynetdicom_internals import WakingRequestHandler
from tests.support.paths import CT_DIR, data_files

HEADER = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", ExplicitVRLittleEndian, "SENDER")


def test_small_data_set_stays_in_memory(tmp_path: Path) -> None:
    buf = DataSetBuffer(tmp_path, lambda: HEADER, limit=100)
    for part in (b"a" * 40, b"b" * 40, b"c" * 20):
        buf.write(part)
    buf.finish()
    assert not buf.spilled and not list(tmp_path.iterdir())
    assert buf.part10_bytes() == HEADER + b"a" * 40 + b"b" * 40 + b"c" * 20


def test_large_data_set_spills_to_a_part10_spool_file(tmp_path: Path) -> None:
    calls = []

    def header() -> bytes:
        calls.append(1)
        return HEADER

    buf = DataSetBuffer(tmp_path / "spool", header, limit=100)
    buf.write(b"a" * 60)
    buf.write(b"b" * 60)  # crosses the limit: everything moves to the file
    buf.write(b"c" * 500)
    assert buf.spilled and buf.getbuffer().nbytes == 0  # nothing left in memory
    buf.finish()
    assert buf.path is not None and buf.path.parent == tmp_path / "spool"
    assert buf.path.name.startswith(".") and buf.path.name.endswith(".tmp")  # what recovery removes
    assert buf.path.read_bytes() == HEADER + b"a" * 60 + b"b" * 60 + b"c" * 500
    assert calls == [1]
    path = buf.path
    buf.discard()
    assert not path.exists() and buf.path is None


def test_part10_header_matches_pydicom(tmp_path: Path) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    from scp_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    for sop_class, sop, ts, ae in [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2", "A"),
                                   ("1.2.840.10008.5.1.4.1.1.7", "1.2.3.45", "1.2.840.10008.1.2.4.90", "ODDAE"),
                                   ("1.2", "1.23", "1.2.840.10008.1.2.1", "")]:
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        if ae:
            meta.SourceApplicationEntityTitle = ae
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, meta, enforce_standard=True)
        assert part10_header(sop_class, sop, ts, ae) == b"\0" * 128 + b"DICM" + fp.getvalue()


def test_a_real_association_receives_into_the_buffer(tmp_path: Path, monkeypatch: Any) -> None:
    """A CT slice by C-STORE: in memory with a small limit off, spooled with a tiny one."""
    got: list[tuple[bool, bytes]] = []

    def on_store(event: evt.Event) -> int:
        buf = take_dataset(event.request)
        assert buf is not None
        data = buf.path.read_bytes() if buf.path else buf.part10_bytes()
        got.append((buf.spilled, data))
        buf.discard()
        return 0

    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    ae = AE("DIMSETEST")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, on_store)],
                            server_class=ThreadedAssociationServer, request_handler=WakingRequestHandler)
    server.spool_dir = tmp_path / "spool"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ae._servers.append(server)
    import scp_node.dimse.buffer as dimse

    source = pydicom.dcmread(data_files(CT_DIR)[0])
    try:
        for limit in (dimse.IN_MEMORY_LIMIT, 4096):
            old, dimse.IN_MEMORY_LIMIT = dimse.IN_MEMORY_LIMIT, limit
            try:
                scu = AE("SENDER")
                scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
                assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="DIMSETEST")
                assert assoc.send_c_store(source).Status == 0
                assoc.release()
            finally:
                dimse.IN_MEMORY_LIMIT = old
    finally:
        server.shutdown()
    assert [spilled for spilled, _ in got] == [False, True]
    for _, data in got:
        ds = pydicom.dcmread(__import__("io").BytesIO(data))
        assert ds.SOPInstanceUID == source.SOPInstanceUID
        assert ds.file_meta.SourceApplicationEntityTitle == "SENDER"
        assert ds.PixelData == source.PixelData
    assert not list((tmp_path / "spool").iterdir())


def test_store_success_response_bytes_match_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from scp_node.dimse.commands import store_success_command as _store_success_command

    for sop_class, sop, msg_id in [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 1),
                                   ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", 65535)]:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = msg_id
        rsp.AffectedSOPClassUID = sop_class
        rsp.AffectedSOPInstanceUID = sop
        rsp.Status = 0x0000
        msg = C_STORE_RSP()
        msg.primitive_to_message(rsp)
        assert _store_success_command(rsp) == encode(msg.command_set, True, True)
        rsp.Status = 0xA700  # any other status (with its comment) goes through pynetdicom
        assert _store_success_command(rsp) is None
    request = C_STORE()
    request.MessageID = 1
    assert _store_success_command(request) is None  # a request, not a response


def _encoded_store_request(sop_class: str, sop: str, msg_id: int, priority: int = 2,
                           originator: tuple[str, int] | None = None) -> bytes:
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    request = C_STORE()
    request.MessageID = msg_id
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop
    request.Priority = priority
    request.DataSet = __import__("io").BytesIO(b"\x08\x00\x18\x00")  # a data set follows (Command Data Set Type)
    if originator:
        request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID = originator
    msg = C_STORE_RQ()
    msg.primitive_to_message(request)
    return encode(msg.command_set, True, True)


def test_store_request_reads_what_pynetdicom_decodes() -> None:
    """The command sets pynetdicom itself encodes: the same primitive as pynetdicom's decoding."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dsutils import decode

    from scp_node.dimse.commands import store_request

    long_uid = "1." + "2" * 62
    for sop_class, sop, msg_id, priority in [(CTImageStorage, "1.2.3.4", 1, 2), (CTImageStorage, long_uid, 65535, 0),
                                             ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", 7, 1)]:
        command = _encoded_store_request(sop_class, sop, msg_id, priority)
        msg = C_STORE_RQ()
        msg.command_set = decode(BytesIO(command), True, True)
        expected = msg.message_to_primitive()
        got = store_request(command)
        assert got is not None
        for field in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                      "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"):
            assert getattr(got, field) == getattr(expected, field), field


def test_store_request_leaves_everything_else_to_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO
    from pynetdicom.dsutils import encode

    from scp_node.dimse.commands import store_request

    plain = _encoded_store_request(CTImageStorage, "1.2.3.4", 1)
    assert store_request(plain) is not None
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    msg = C_ECHO_RQ()
    msg.primitive_to_message(echo)
    refused = {
        "C-ECHO-RQ": encode(msg.command_set, True, True),
        "Move Originator fields": _encoded_store_request(CTImageStorage, "1.2.3.4", 1, originator=("MOVER", 9)),
        "cut short": plain[:-3],
        "wrong group length": plain[:8] + (len(plain) - 11).to_bytes(4, "little") + plain[12:],
        "UID with a leading zero": _encoded_store_request(CTImageStorage, "1.2.03", 1),
        "UID with a letter": plain.replace(b"1.2.3.4", b"1.2.3.A"),
        "no bytes": b"",
    }
    for what, command in refused.items():
        assert store_request(command) is None, what


def test_plain_stores_skip_pynetdicoms_command_decoding(tmp_path: Path, monkeypatch: Any) -> None:
    """Against a pynetdicom requestor: plain C-STOREs (also with the command split over several
    PDUs) are read by StoreRequestMessage; a C-STORE with Move Originator fields and a C-ECHO on
    the same association go through pynetdicom's decoding; every handler sees the same request."""
    import scp_node.dimse.pynetdicom_internals as dimse
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as the node runs (see listener)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    fast: list[str] = []
    original = dimse.store_request

    def counting(command: bytes) -> Any:
        request = original(command)
        if request is not None:
            fast.append(str(request.AffectedSOPInstanceUID))
        return request

    monkeypatch.setattr(dimse, "store_request", counting)
    seen: list[tuple[str, int, str | None, bytes]] = []

    def on_store(event: evt.Event) -> int:
        rq = event.request
        buf = take_dataset(rq)
        assert buf is not None
        seen.append((str(rq.AffectedSOPInstanceUID), int(rq.MessageID), rq.MoveOriginatorApplicationEntityTitle,
                     buf.part10_bytes()))
        buf.discard()
        return 0

    source = pydicom.dcmread(data_files(CT_DIR)[0])
    for max_pdu in (0, 64):  # 0: unlimited; 64 bytes: the command set comes in several fragments
        seen.clear()
        fast.clear()
        ae = AE("DIMSETEST")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_supported_context(Verification)
        server = ae.make_server(("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, on_store)],
                                server_class=ThreadedAssociationServer, request_handler=WakingRequestHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ae._servers.append(server)
        try:
            scu = AE("SENDER")
            scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            scu.add_requested_context(Verification)
            assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="DIMSETEST")
            assert assoc.send_c_store(source, msg_id=1).Status == 0
            assert assoc.send_c_echo(msg_id=2).Status == 0
            assert assoc.send_c_store(source, msg_id=3, originator_aet="MOVER", originator_id=5).Status == 0
            assert assoc.send_c_store(source, msg_id=4).Status == 0
            assoc.release()
        finally:
            server.shutdown()
        uid = str(source.SOPInstanceUID)
        assert [(s[0], s[1], s[2]) for s in seen] == [(uid, 1, None), (uid, 3, "MOVER"), (uid, 4, None)]
        assert fast == [uid, uid]  # the plain ones; the Move Originator one went to pynetdicom
        for *_, data in seen:
            ds = pydicom.dcmread(__import__("io").BytesIO(data))
            assert ds.SOPInstanceUID == source.SOPInstanceUID and ds.PixelData == source.PixelData


def test_store_response_sent_directly_is_the_pdu_pynetdicom_sends(monkeypatch: Any) -> None:
    """The success response sent from the DUL thread, byte for byte the P-DATA-TF PDU that
    pynetdicom's state machine sends (forced by a server-side handler watching sent PDUs)."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    from pynetdicom.pdu_primitives import P_DATA

    from scp_node.dimse.pynetdicom_internals import WakingUpperLayer

    queued: list[Any] = []  # P-DATA primitives queued for the state machine (DT-1)
    original = WakingUpperLayer.send_pdu
    monkeypatch.setattr(WakingUpperLayer, "send_pdu",
                        lambda self, primitive: (queued.append(primitive), original(self, primitive)))
    source = pydicom.dcmread(data_files(CT_DIR)[0])
    received: dict[bool, list[bytes]] = {}
    for watched in (False, True):
        queued.clear()
        sent_pdus: list[Any] = []
        handlers: list[Any] = [(evt.EVT_C_STORE, lambda event: 0)]
        if watched:
            handlers.append((evt.EVT_PDU_SENT, lambda event: sent_pdus.append(event.pdu)))
        ae = AE("DIMSETEST")
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        server = ae.make_server(("127.0.0.1", 0), evt_handlers=handlers, server_class=ThreadedAssociationServer,
                                request_handler=WakingRequestHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ae._servers.append(server)
        data: list[bytes] = []
        try:
            scu = AE("SENDER")
            scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="DIMSETEST",
                                  evt_handlers=[(evt.EVT_DATA_RECV, lambda event: data.append(event.data))])
            for msg_id in (1, 2, 3):
                assert assoc.send_c_store(source, msg_id=msg_id).Status == 0
            assoc.release()
        finally:
            server.shutdown()
        received[watched] = [d for d in data if d[:1] == b"\x04"]  # the P-DATA-TF PDUs
        assert bool(sent_pdus) == watched
        assert len([q for q in queued if isinstance(q, P_DATA)]) == (3 if watched else 0)
    assert len(received[False]) == 3 and received[False] == received[True]
