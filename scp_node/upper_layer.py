"""The DICOM Upper Layer of acceptor associations: waiting instead of polling, PDUs read lean.

pynetdicom runs every association on two threads that poll: the DICOM Upper Layer (DUL) thread
sleeps 1 ms and checks its socket, the association thread sleeps 1 ms and checks for a DIMSE
message.  That is about 4 % of a core per idle association (measured: four idle associations
cost a server 0.88 s of CPU in 5 s), and under load each of those thousand wake-ups a second
asks for the GIL, so every busy thread in the process is pre-empted again and again.  With
four senders in one receiver process this polling cost more CPU than storing the data.

Here the two threads wait instead of polling:

* :class:`WakingUpperLayer` (the DUL) blocks in ``select`` on the peer's socket and a wake-up
  pipe; the association thread writes to the pipe whenever it hands the DUL something to send.
* The association thread (:class:`scp_node.acceptor.WakingAssociation`) waits on an event that
  the DUL sets when a state machine action leaves something for it (a DIMSE message, a release
  or abort request, a new state, the DUL ending).  Its DIMSE provider receives data sets in
  memory or a spool file and serves C-STORE requests on the DUL thread itself
  (:mod:`scp_node.dimse`).

A P-DATA-TF PDU received on an established association (Sta6 + Evt10, action DT-2: "pass the
data to DIMSE", no change of state) is handed to DIMSE as it is read (:meth:`_read_pdu_data`),
without the decoded PDU object, the event queue and the state machine turn in between; every
other PDU, and P-DATA whenever an event is pending or a handler watches PDUs, data or
transitions, takes pynetdicom's way.

Both still wake at least every :data:`POLL_INTERVAL` seconds so that the ARTIM, idle (network)
and DIMSE timers keep firing as before.  Everything else -- the state machine, negotiation,
the DIMSE service classes, the event handlers -- is pynetdicom's own.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import struct
import threading
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from .negotiation import accept_pdu_bytes, remember_request_primitive

log = logging.getLogger(__name__)

#: Longest wait without an event, in seconds: the granularity of the ARTIM and idle timers.
POLL_INTERVAL = 0.05

_PDU_HEADER = struct.Struct(">BBL")
_ITEM_LENGTH = struct.Struct(">L")
_PDU_TYPES = frozenset({0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07})
_P_DATA_TF = 0x04
#: Handlers of these events need pynetdicom's decoded PDU and its state machine turn.
_WATCHING_RECEIVED = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV)
_WATCHING_EVENTS = (*_WATCHING_RECEIVED, evt.EVT_FSM_TRANSITION)
_WATCHING_SENT = (evt.EVT_PDU_SENT, evt.EVT_FSM_TRANSITION)  # (EVT_DATA_SENT: the socket tells)


#: Decoded A-ASSOCIATE-RQ PDUs by their bytes (see WakingUpperLayer._decode_pdu), oldest first.
_ASSOCIATE_RQ_CACHE: dict[bytes, Any] = {}
_ASSOCIATE_RQ_CACHED = 16
_ASSOCIATE_RQ_LOCK = threading.Lock()


def pdv_items(body: bytearray | bytes) -> list[list[Any]] | None:
    """The presentation data values of a P-DATA-TF PDU body as ``[context ID, data]`` pairs, the
    data (message control header first) as views into ``body``, not copies.

    ``None`` when an item is not well formed (shorter than its context ID and control header,
    or running past the PDU): pynetdicom's decoder then handles the PDU and its error path.
    """
    items: list[list[Any]] = []
    view = memoryview(body)
    pos, end = 0, len(body)
    while pos < end:
        if pos + 4 > end:
            return None
        length = _ITEM_LENGTH.unpack_from(body, pos)[0]
        start, pos = pos + 4, pos + 4 + length
        if length < 2 or pos > end:
            return None
        items.append([body[start], view[start + 1:pos]])
    return items or None


class _WakingStateMachine(StateMachine):
    """pynetdicom's state machine; wakes the association thread when an action leaves it work."""

    def do_action(self, event: str) -> None:
        state = self.current_state
        try:
            if event == "Evt7" and state == "Sta3" and not any(self.dul.assoc.get_handlers(e) for e in _WATCHING_SENT):
                self._send_associate_ac()
            else:
                super().do_action(event)
        finally:
            self.dul.wake_association(state != self.current_state)  # type: ignore[attr-defined]

    def _send_associate_ac(self) -> None:
        """AE-7 (send the A-ASSOCIATE-AC, go to Sta6) with the PDU bytes remembered for an accept
        seen before (:func:`scp_node.negotiation.accept_pdu_bytes`).  Only when no handler
        watches sent PDUs or transitions, which pynetdicom's AE-7 would have told."""
        dul = self.dul
        try:
            primitive = dul.to_provider_queue.get(False)
            data = accept_pdu_bytes(primitive)
            if dul.socket is not None:
                dul.socket.send(data)
            else:
                log.warning("Attempted to send data over closed connection")
            self.transition("Sta6")
        except Exception:
            log.exception("State machine failed sending the A-ASSOCIATE-AC in state Sta3")
            dul.kill_dul()
            raise


class WakingUpperLayer(DULServiceProvider):
    """The DUL thread of an acceptor association, waiting in ``select`` instead of sleeping.

    pynetdicom's reactor loop is kept check for check (:meth:`_reactor_loop`) but without its
    sleep between turns; the wait happens in :meth:`_process_recv_primitive`, which the loop
    calls first on every turn: when nothing is queued to send, no event is pending and the
    socket has no data, it blocks until one of those changes (or the poll interval passes).
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.state_machine = _WakingStateMachine(self)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()  # no write to a closed (and maybe reused) descriptor
        self._readable = False  # the last wait saw the peer's socket readable

    def wake_association(self, state_changed: bool = False) -> None:
        """Wake the association thread when there is something for it: a DIMSE message (a
        C-STORE was already served on this thread), a primitive (release, abort), a new state.
        Waking it for every PDU would cost a context switch each."""
        assoc = self.assoc
        if state_changed or self.to_user_queue.qsize() or assoc.dimse.msg_queue.qsize():
            wake = getattr(assoc, "wake", None)
            if wake is not None:
                wake()

    def wake(self) -> None:
        """Make a waiting DUL thread look at its queues now."""
        with self._wake_lock:
            if self._wake_w < 0:  # the thread has ended
                return
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):  # pipe full: already woken
                pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """As pynetdicom's: stop the reactor if it is in Sta1, waiting for the thread to end."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    def run_reactor(self) -> None:
        try:
            self._reactor_loop()
        finally:
            discard = getattr(self.assoc.dimse, "discard_partial", None)
            if discard is not None:
                discard()  # a data set cut off with the connection: nothing more will arrive
            wake = getattr(self.assoc, "wake", None)
            if wake is not None:
                wake()  # the association thread sees at once that the DUL is gone
            with self._wake_lock:
                for fd in (self._wake_r, self._wake_w):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                self._wake_r = self._wake_w = -1

    def _reactor_loop(self) -> None:
        """pynetdicom 3.0's ``DULServiceProvider.run_reactor``, check for check, without its
        ``time.sleep(_run_loop_delay)`` between turns: the wait is in :meth:`_wait`, and a
        ``sleep(0)`` is still a system call that hands the GIL to any other thread wanting it
        (seven times per received CT slice)."""
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()  # let the association thread off the leash
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # Either encode and send a primitive or receive and decode a PDU per turn.
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: abort, bypassing the state machine
                log.error("Exception in the DUL reactor, aborting the association: %s", exc)
                log.debug("DUL reactor exception", exc_info=True)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                cast(AssociationSocket, self.socket).send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                continue
            self.state_machine.do_action(event)

    def _is_transport_event(self) -> bool:
        """pynetdicom's check, without asking ``select`` again when :meth:`_wait` just saw the
        socket readable (one system call, and one hand-over of the GIL, less per PDU)."""
        if self._readable and self.state_machine.current_state != "Sta13":
            self._readable = False
            self._read_pdu_data()
            return True
        self._readable = False
        return super()._is_transport_event()

    def _read_pdu_data(self) -> None:
        """Read one PDU: pynetdicom's ``_read_pdu_data``, step for step, but a P-DATA-TF PDU that
        DT-2 would pass to DIMSE unchanged goes to DIMSE at once (see the module docstring)."""
        sock = cast(AssociationSocket, self.socket)
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            log.error("Connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        try:
            pdu_type, _, length = _PDU_HEADER.unpack(header)
        except struct.error:
            self.event_queue.put("Evt17")  # the peer closed the connection
            return
        if pdu_type not in _PDU_TYPES:
            log.error("Unknown PDU type received '0x%02X'", pdu_type)
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(length)
        except (OSError, TimeoutError) as exc:
            log.error("Connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            log.error("The received PDU is shorter than expected (%d of %d bytes received)", 6 + len(body),
                      6 + length)
            self.event_queue.put("Evt17")
            return
        if pdu_type == _P_DATA_TF and self._passes_data_directly():
            items = pdv_items(body)
            if items is not None:
                primitive = P_DATA()
                # (the setter insists on bytes; the views spare copying each fragment once more)
                primitive._presentation_data_value_list = items
                self.assoc.dimse.receive_primitive(primitive)  # DT-2
                self.wake_association()
                return
        bytestream = bytearray(header)
        bytestream += body
        try:
            pdu, event = self._decode_pdu(bytestream)
            self.event_queue.put(event)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an undecodable PDU is Evt19
            log.error("Unable to decode the received PDU data: %s", exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """pynetdicom's decode; an A-ASSOCIATE-RQ seen before (byte for byte) is not decoded again.

        A modality that opens an association per image sends the same request every time, and
        decoding its presentation contexts (a UID object and a validation for each abstract and
        transfer syntax) was a quarter of the CPU such an association costs.  The decoded PDU is
        only read afterwards (AE-6 turns it into a new primitive each time), so one object can
        serve every identical request.  Not when a handler watches received data or PDUs.
        """
        if bytestream[:1] != b"\x01" or any(self.assoc.get_handlers(e) for e in _WATCHING_RECEIVED):
            return super()._decode_pdu(bytestream)
        key = bytes(bytestream)
        with _ASSOCIATE_RQ_LOCK:
            pdu = _ASSOCIATE_RQ_CACHE.pop(key, None)
            if pdu is not None:
                _ASSOCIATE_RQ_CACHE[key] = pdu  # most recently used last
                return pdu, "Evt6"
        pdu, event = super()._decode_pdu(bytestream)
        if event == "Evt6":
            remember_request_primitive(pdu)  # later requests get copies of one primitive
        with _ASSOCIATE_RQ_LOCK:
            _ASSOCIATE_RQ_CACHE[key] = pdu
            while len(_ASSOCIATE_RQ_CACHE) > _ASSOCIATE_RQ_CACHED:
                del _ASSOCIATE_RQ_CACHE[next(iter(_ASSOCIATE_RQ_CACHE))]
        return pdu, event

    def _passes_data_directly(self) -> bool:
        """Sta6, nothing queued ahead of this PDU, and no handler watching PDUs, data or
        transitions: DT-2 is all the state machine would do."""
        if self.state_machine.current_state != "Sta6" or self.event_queue.qsize() or self._recv_pdu.qsize():
            return False
        assoc = self.assoc
        return not any(assoc.get_handlers(event) for event in _WATCHING_EVENTS)

    def _process_recv_primitive(self) -> bool:
        if not (self._kill_thread or self.to_provider_queue.qsize() or self.event_queue.qsize()):
            self._wait()
        return super()._process_recv_primitive()

    def _wait(self) -> None:
        """Block until the peer sent data, a primitive was queued, or the poll interval passed."""
        fds: list[Any] = [self._wake_r]
        raw = getattr(self.socket, "socket", None) if self.socket is not None else None
        if raw is not None and getattr(self.socket, "_is_connected", False):
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return  # decrypted bytes already buffered: select would not see them
            fds.append(raw)
        try:
            ready, _, _ = select.select(fds, [], [], POLL_INTERVAL)
        except (OSError, ValueError):  # the socket closed under us: let the loop find out
            return
        self._readable = raw is not None and raw in ready
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, OSError):
                pass
