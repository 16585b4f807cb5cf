"""The waiting (not polling) acceptor associations of scp_node.dimse.pynetdicom_internals, against pynetdicom peers."""

from __future__ import annotations

import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from scp_node.dimse.pynetdicom_internals import WakingAssociation, WakingRequestHandler


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "UL-1"
    ds.BitsAllocated = 16
    ds.PixelData = b"\0" * 4096
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_original_encoding(False, True)
    return ds


def _server(waking: bool, handlers: list[Any], network_timeout: float | None = 60) -> Any:
    ae = AE("UPPERLAYER")
    ae.network_timeout = network_timeout
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    kwargs = {"request_handler": WakingRequestHandler} if waking else {}
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=handlers, server_class=ThreadedAssociationServer,
                            **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ae._servers.append(server)  # as AE.start_server does (shutdown() removes it)
    return server


def _requestor() -> AE:
    ae = AE("REQUESTOR")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae


def test_stores_echo_and_release_promptly() -> None:
    stores: list[str] = []

    def on_store(event: evt.Event) -> int:
        stores.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    server = _server(True, [(evt.EVT_C_STORE, on_store)])
    try:
        assoc = _requestor().associate("127.0.0.1", server.server_address[1], ae_title="UPPERLAYER")
        assert assoc.is_established
        sent = []
        for _ in range(30):
            ds = _dataset()
            sent.append(ds.SOPInstanceUID)
            assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        acceptors = server.active_associations
        assert acceptors and all(isinstance(a, WakingAssociation) for a in acceptors)
        start = time.monotonic()
        assoc.release()
        assert assoc.is_released and time.monotonic() - start < 1.0
        assert stores == sent
        deadline = time.monotonic() + 2
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.active_associations  # both threads of the acceptor ended
    finally:
        server.shutdown()


def test_peer_abort_ends_the_association_at_once() -> None:
    aborted = threading.Event()
    server = _server(True, [(evt.EVT_ABORTED, lambda event: aborted.set())])
    try:
        assoc = _requestor().associate("127.0.0.1", server.server_address[1], ae_title="UPPERLAYER")
        assert assoc.is_established
        time.sleep(0.2)  # both acceptor threads are waiting now
        assoc.abort()
        assert aborted.wait(1.0)
    finally:
        server.shutdown()


def test_network_timeout_still_fires() -> None:
    """The idle timer is checked on the poll interval: an idle peer is still let go."""
    server = _server(True, [], network_timeout=0.5)
    try:
        assoc = _requestor().associate("127.0.0.1", server.server_address[1], ae_title="UPPERLAYER")
        assert assoc.is_established
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not assoc.is_established  # the acceptor released (pynetdicom's default response)
    finally:
        server.shutdown()


def test_stores_are_served_on_the_dul_thread_and_a_handler_may_abort() -> None:
    """C-STOREs run on the DUL thread (no hand-over); an abort from there neither hangs nor leaks."""
    threads: list[str] = []

    def on_store(event: evt.Event) -> int:
        threads.append(threading.current_thread().name)
        if len(threads) == 3:
            event.assoc.abort()
        return 0x0000

    server = _server(True, [(evt.EVT_C_STORE, on_store)])
    try:
        assoc = _requestor().associate("127.0.0.1", server.server_address[1], ae_title="UPPERLAYER")
        assert assoc.send_c_store(_dataset()).Status == 0x0000
        (acceptor,) = server.active_associations
        assert threads == [acceptor.dul.name]
        assert assoc.send_c_store(_dataset()).Status == 0x0000
        assoc.send_c_store(_dataset())  # the third: the handler aborts
        deadline = time.monotonic() + 5
        while (assoc.is_established or server.active_associations) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert assoc.is_aborted
        assert not server.active_associations and not acceptor.dul.is_alive()
    finally:
        server.shutdown()


def test_pdv_items_split_a_p_data_body_and_refuse_a_malformed_one() -> None:
    from scp_node.dimse.transport import pdv_items

    body = bytearray(b"\x00\x00\x00\x04\x01\x03ab" + b"\x00\x00\x00\x03\x03\x02z")
    items = pdv_items(body)
    assert items is not None and [(cid, bytes(data)) for cid, data in items] == [(1, b"\x03ab"), (3, b"\x02z")]
    assert pdv_items(b"") is None  # no item at all
    assert pdv_items(b"\x00\x00\x00\x01\x01") is None  # shorter than context ID + control header
    assert pdv_items(b"\x00\x00\x00\x09\x01\x03ab") is None  # runs past the PDU
    assert pdv_items(b"\x00\x00\x00\x04\x01\x03ab\x00\x00") is None  # a stray half item header


def test_p_data_goes_straight_to_dimse_unless_a_handler_watches_pdus(monkeypatch: Any) -> None:
    """The direct hand-over and pynetdicom's decoded way store the same data sets (multi-PDU
    data sets, several per association); a PDU handler sees every P-DATA-TF PDU."""
    from io import BytesIO

    from pydicom import dcmread
    from pynetdicom import _config
    from pynetdicom.pdu import P_DATA_TF

    from scp_node.dimse.pynetdicom_internals import WakingUpperLayer

    decoded: list[int] = []  # PDU types pynetdicom's decoder saw
    original = WakingUpperLayer._decode_pdu

    def counting(self: Any, bytestream: bytearray) -> Any:
        decoded.append(bytestream[0])
        return original(self, bytestream)

    monkeypatch.setattr(WakingUpperLayer, "_decode_pdu", counting)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as the node runs (see listener)
    for watched in (False, True):
        decoded.clear()
        stored: list[bytes] = []
        pdus: list[Any] = []
        handlers: list[Any] = [(evt.EVT_C_STORE, lambda event: stored.append(event.request.DataSet.getvalue()) or 0)]
        if watched:
            handlers.append((evt.EVT_PDU_RECV, lambda event: pdus.append(event.pdu)))
        server = _server(True, handlers)
        server.ae.maximum_pdu_size = 2048  # each data set comes in several P-DATA-TF PDUs
        try:
            assoc = _requestor().associate("127.0.0.1", server.server_address[1], ae_title="UPPERLAYER")
            assert assoc.is_established
            sent = [_dataset() for _ in range(5)]
            for ds in sent:
                assert assoc.send_c_store(ds).Status == 0x0000
            assoc.release()
        finally:
            server.shutdown()
        received = [dcmread(BytesIO(data), force=True) for data in stored]
        assert [ds.SOPInstanceUID for ds in received] == [ds.SOPInstanceUID for ds in sent]
        assert all(ds.PixelData == b"\0" * 4096 for ds in received)
        data_pdus = [p for p in pdus if isinstance(p, P_DATA_TF)]
        if watched:
            assert len(data_pdus) >= 5 * 3 and decoded.count(0x04) == len(data_pdus)
        else:
            assert decoded.count(0x04) == 0 and decoded.count(0x01) == 1  # only the A-ASSOCIATE-RQ ...


def test_a_peer_stalling_inside_a_pdu_is_cut_off_by_the_network_timeout() -> None:
    """Half a PDU, then nothing: the read waits no longer than the network timeout (kept by the
    kernel on plain TCP sockets), then the connection is closed and the server goes on."""
    import socket
    import struct

    from scp_node.dimse.transport import use_kernel_timeouts

    server = _server(True, [], network_timeout=1.0)
    try:
        with socket.create_connection(server.server_address, timeout=10) as peer:
            peer.sendall(struct.pack(">BBL", 0x01, 0, 200) + b"\0" * 50)  # an A-ASSOCIATE-RQ cut short
            start = time.monotonic()
            while peer.recv(1024):  # (an A-ABORT or nothing), then the close
                pass
            waited = time.monotonic() - start
        assert 0.5 < waited < 5, waited
        assoc = _requestor().associate("127.0.0.1", server.server_address[1], ae_title="UPPERLAYER")
        assert assoc.is_established  # still serving
        assoc.release()
    finally:
        server.shutdown()
    plain = socket.socket()
    use_kernel_timeouts(plain, 2.5)
    assert plain.gettimeout() is None
    assert struct.unpack("@ll", plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)) == (2, 500000)
    plain.close()


def test_an_identical_associate_request_is_decoded_once(monkeypatch: Any) -> None:
    """The same A-ASSOCIATE-RQ again (a modality opening an association per image) reuses the
    decoded PDU, and each association still negotiates what its own request proposed."""
    from pynetdicom import _config

    import scp_node.dimse.pynetdicom_internals as upper_layer

    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as the node runs (see listener)
    monkeypatch.setattr(upper_layer, "_ASSOCIATE_RQ_CACHE", {})
    decoded: list[int] = []
    original = upper_layer.DULServiceProvider._decode_pdu
    monkeypatch.setattr(upper_layer.DULServiceProvider, "_decode_pdu",
                        lambda self, data: (decoded.append(data[0]), original(self, data))[1])
    server = _server(True, [(evt.EVT_C_STORE, lambda event: 0)])
    try:
        port = server.server_address[1]
        for _ in range(3):
            assoc = _requestor().associate("127.0.0.1", port, ae_title="UPPERLAYER")
            assert assoc.is_established
            assert assoc.send_c_store(_dataset()).Status == 0x0000
            assoc.release()
        echo_only = AE("REQUESTOR")
        echo_only.add_requested_context(Verification)
        assoc = echo_only.associate("127.0.0.1", port, ae_title="UPPERLAYER")
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert decoded.count(0x01) == 2  # the first request of each kind; the repeats came from the cache
    assert len(upper_layer._ASSOCIATE_RQ_CACHE) == 2
