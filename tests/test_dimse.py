"""scp_node.dimse: the data set buffer (memory, then a spool file) and its use by a real association."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from scp_node.dimse import DataSetBuffer, take_dataset
from scp_node.store.part10 import part10_header
from scp_node.upper_layer import WakingRequestHandler
from tests.support.paths import CT_DIR

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


def test_a_real_association_receives_into_the_buffer(tmp_path: Path) -> None:
    """A CT slice by C-STORE: in memory with a small limit off, spooled with a tiny one."""
    got: list[tuple[bool, bytes]] = []

    def on_store(event: evt.Event) -> int:
        buf = take_dataset(event.request)
        assert buf is not None
        data = buf.path.read_bytes() if buf.path else buf.part10_bytes()
        got.append((buf.spilled, data))
        buf.discard()
        return 0

    _config.STORE_RECV_CHUNKED_DATASET = False
    ae = AE("DIMSETEST")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, on_store)],
                            server_class=ThreadedAssociationServer, request_handler=WakingRequestHandler)
    server.spool_dir = tmp_path / "spool"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ae._servers.append(server)
    import scp_node.dimse as dimse

    source = pydicom.dcmread(sorted(CT_DIR.glob("*.dcm"))[0])
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

    from scp_node.dimse import _store_success_command

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
