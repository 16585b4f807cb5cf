"""Association control: who may talk to the node (EVT_REQUESTED), and the audit of each outcome.

A caller is let in only when its calling AE title **and** its address match one ``[[peers]]``
entry and it calls our AE title.  Everyone else gets A-ASSOCIATE-RJ (rejected-permanent,
service-user, calling/called AE title not recognised) and an audit row.  Past ``[node]
max_associations`` a caller gets A-ASSOCIATE-RJ rejected-transient, local limit exceeded (it may
retry later) and an audit row.

:func:`handle_conn_open` guards the socket of each connection: a PDU whose declared length is
larger than we advertised (or than any control PDU needs) is answered with A-ABORT before a
byte of its body is read, so a peer cannot make the node buffer gigabytes it never asked for.
It also reads an A-ASSOCIATE-RQ's AE titles where the PDU has them and refuses a caller that is
not an allowed peer (A-ASSOCIATE-RJ, audit row) before pynetdicom decodes the request: decoding
2,000 proposed presentation contexts logged 20,000 warnings before the allow-list was asked.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from pynetdicom import evt

from ..audit import AuditTrail, Event
from ..config import Peer

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ parameters (PS3.8 9.3.4): result, source, reason
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07
REJECT_TRANSIENT = 0x02
SOURCE_PROVIDER_PRESENTATION = 0x03
REASON_LOCAL_LIMIT_EXCEEDED = 0x02

#: Largest non-P-DATA PDU we read (A-ASSOCIATE-RQ with 128 contexts and user identity is far below).
MAX_CONTROL_PDU = 4 * 1024 * 1024
P_DATA_TF = 0x04
#: A-ABORT PDU: source service-provider (2), reason invalid-PDU-parameter-value (6) (PS3.8 9.3.8).
A_ABORT_INVALID_PDU_PARAMETER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)
A_ASSOCIATE_RQ = 0x01


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, reason)


def _addresses(host: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """A peer host as networks: an IP, a CIDR, or a name resolved once at start."""
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        log.warning("peer host %r does not resolve; it will never match", host)
        return []
    return [ipaddress.ip_network(info[4][0]) for info in infos]


@dataclass
class AccessList:
    """The allow-list built from ``[[peers]]``."""

    peers: tuple[Peer, ...]
    accept_unknown: bool = False
    _resolved: list[tuple[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]] = field(
        default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._resolved = [(p.ae_title.strip(), _addresses(p.host)) for p in self.peers]

    def allows(self, calling_ae: str, address: str) -> bool:
        if self.accept_unknown:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ae == calling_ae.strip() and any(ip in net for net in nets)
                   for ae, nets in self._resolved)


def live_acceptors(ae: Any) -> int:
    """Associations we accept that still have a peer: a connection that already closed (a port
    probe) keeps its pynetdicom thread until the ACSE timeout, but it holds no slot here."""
    n = 0
    for a in ae.active_associations:
        if a.is_acceptor and a.is_alive() and a.dul.state_machine.current_state != "Sta1":
            n += 1
    return n


class AssociationCounts:
    """The live associations of every receiver process of the node, one slot each (shared memory).

    A receiver writes only its own slot (an aligned int: one store, no lock needed) and reads the
    others.  Two receivers admitting a request in the same instant can each miss the other's, so
    the node may pass the limit by at most one association per extra receiver, briefly.
    """

    def __init__(self, slots: Any, slot: int) -> None:
        self.slots = slots
        self.slot = slot

    def publish(self, own: int) -> None:
        self.slots[self.slot] = own

    def fewest_elsewhere(self) -> int:
        """The smallest count among the other receivers."""
        return min((v for i, v in enumerate(self.slots) if i != self.slot), default=0)

    def total_with(self, own: int) -> int:
        return own + sum(v for i, v in enumerate(self.slots) if i != self.slot)


def refusal(acl: AccessList, our_ae_title: str, calling: str, called: str, address: str) -> tuple[int, str] | None:
    """Why a request from ``calling`` at ``address`` to ``called`` is refused (A-ASSOCIATE-RJ reason and
    the audit text), or None when it may go on (to the association limit)."""
    if called != our_ae_title.strip():
        return REASON_CALLED_AE_NOT_RECOGNISED, f"called AE title {called!r} is not ours"
    if not acl.allows(calling, address):
        return REASON_CALLING_AE_NOT_RECOGNISED, "calling AE title and address are not an allowed peer"
    return None


def handle_requested(event: evt.Event, acl: AccessList, our_ae_title: str, audit: AuditTrail,
                     max_associations: int | None = None, counts: AssociationCounts | None = None) -> None:
    """EVT_REQUESTED: reject callers not on the allow-list, then callers past the association limit.

    ``max_associations`` is ``[node] max_associations``; pynetdicom's own count (which also counts
    closed connections still waiting out their ACSE timeout) is set higher, as a safety net.
    ``counts``: the other receiver processes' associations (see :mod:`scp_node.dimse.listener`).
    """
    rq = event.assoc.requestor
    # At EVT_REQUESTED the titles are only in the A-ASSOCIATE-RQ primitive (not yet copied to rq).
    calling = str(rq.primitive.calling_ae_title).strip()
    called = str(rq.primitive.called_ae_title).strip()
    address = str(rq.address)
    reason = refusal(acl, our_ae_title, calling, called, address)
    if reason is None:
        ae = event.assoc.ae
        limit = ae.maximum_associations if max_associations is None else max_associations
        # This association included, as pynetdicom's ACSE counts; done here so it is audited.
        own = live_acceptors(ae)
        total = own if counts is None else counts.total_with(own)
        if total <= limit:
            if counts is not None:
                counts.publish(own)
            return
        if counts is not None:
            counts.publish(own - 1)  # this one is turned away: it holds no slot
        detail = f"maximum concurrent associations ({limit}) reached; rejected-transient"
        log.warning("rejecting association from %s at %s: %s", calling, address, detail)
        audit.record(Event.ASSOCIATION_REJECTED, outcome="failure", ae_title=calling, peer=address, detail=detail)
        setattr(event.assoc, _AUDITED, True)
        event.assoc.acse.send_reject(REJECT_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, REASON_LOCAL_LIMIT_EXCEEDED)
        event.assoc.kill()
        return
    log.warning("rejecting association from %s at %s: %s", calling, address, reason[1])
    audit.record(Event.ASSOCIATION_REJECTED, outcome="failure", ae_title=calling, peer=address,
                 detail=reason[1])
    setattr(event.assoc, _AUDITED, True)
    event.assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, reason[0])
    # As pynetdicom's own ACSE does after a reject: wait until the DUL has sent the A-ASSOCIATE-RJ
    # and closed, otherwise the socket is shut before the PDU leaves and the peer sees an abort.
    event.assoc.kill()


#: Attribute set on an Association once an audit row tells how it ended (no second row at close).
_AUDITED = "_scp_node_outcome_audited"


def handle_accepted(event: evt.Event, audit: AuditTrail) -> None:
    """EVT_ACCEPTED: audit who is connected."""
    rq = event.assoc.requestor
    setattr(event.assoc, "_scp_node_accepted", True)
    audit.record(Event.ASSOCIATION_ACCEPTED, ae_title=str(rq.ae_title).strip(), peer=str(rq.address))


def handle_aborted(event: evt.Event, audit: AuditTrail) -> None:
    """EVT_ABORTED: an association ended without a release (peer or local abort)."""
    rq = event.assoc.requestor
    setattr(event.assoc, _AUDITED, True)
    audit.record(Event.ASSOCIATION_ABORTED, outcome="warning", ae_title=str(rq.ae_title).strip(),
                 peer=str(rq.address))


def _handle_conn_close(event: evt.Event, address: str, guard: "_PDULengthGuard", audit: AuditTrail) -> None:
    """EVT_CONN_CLOSE: a connection that sent bytes but never became an association (random
    bytes, an HTTP request) still leaves an audit row saying so.  A bare connect and close (a
    monitoring port probe, ``scp-node status``) sends nothing and is not audited."""
    assoc = event.assoc
    if (getattr(assoc, _AUDITED, False) or getattr(assoc, "_scp_node_accepted", False) or assoc.is_rejected
            or not guard.received_any):
        return
    setattr(assoc, _AUDITED, True)
    audit.record(Event.ASSOCIATION_ABORTED, outcome="failure", peer=address,
                 detail="connection closed before an association was negotiated (not a DICOM association request)")


class _PDULengthGuard:
    """Replaces one association socket's ``recv``: refuses a PDU body longer than allowed.

    pynetdicom's DUL reads the 6-byte PDU header, then ``recv(pdu_length)`` into one buffer.  We
    see the header go by, and when the body read asks for more than the limit for that PDU type
    we send A-ABORT and fail the read (the DUL then closes the connection), having read nothing.
    """

    def __init__(self, recv: Callable[[int], bytearray], raw_socket: Any, max_pdata: int,
                 on_violation: Callable[[int, int, int], None],
                 on_tls_failure: Callable[[BaseException], None] | None = None,
                 on_request: Callable[[bytearray], bool] | None = None) -> None:
        self._on_tls_failure = on_tls_failure
        self._on_request = on_request
        self._recv = recv
        self._raw = raw_socket
        self._max_pdata = max_pdata
        self._on_violation = on_violation
        self._body_of: int | None = None  # PDU type whose body is read next
        self.received_any = False  # a bare connect + close (a port probe) is not worth an audit row

    def __call__(self, nr_bytes: int) -> bytearray:
        if self._body_of is not None:
            pdu_type, self._body_of = self._body_of, None
            limit = (self._max_pdata or 2**32) if pdu_type == P_DATA_TF else MAX_CONTROL_PDU
            if nr_bytes > limit:
                try:
                    self._raw.sendall(A_ABORT_INVALID_PDU_PARAMETER)
                except OSError:
                    pass
                self._on_violation(pdu_type, nr_bytes, limit)
                raise ConnectionAbortedError(f"PDU of {nr_bytes} bytes exceeds the limit of {limit}")
            body = self._read_body(nr_bytes)
            if (pdu_type == A_ASSOCIATE_RQ and self._on_request is not None and len(body) == nr_bytes
                    and not self._on_request(body)):
                raise ConnectionRefusedError("association request refused before it was decoded")
            return body
        try:
            data = self._recv(nr_bytes)
        except ssl.SSLError as exc:
            # The first read of a TLS connection runs the handshake (see scp_node.dimse.tls): a plain
            # connection, an unknown or self-signed client certificate, anonymous TLS end here.
            if self._on_tls_failure is not None:
                self._on_tls_failure(exc)
                self._on_tls_failure = None
            raise
        if data:
            self.received_any = True
        if nr_bytes == 6 and len(data) == 6:
            self._body_of = data[0]
        return data


    def _read_body(self, nr_bytes: int) -> bytearray:
        """Read a PDU body straight into one buffer (``recv_into``), as pynetdicom's ``recv`` would
        in 4 KiB steps: the same result (short only if the peer closed), a fraction of the calls."""
        buf = bytearray(nr_bytes)
        got = 0
        with memoryview(buf) as view:
            while got < nr_bytes:
                n = self._raw.recv_into(view[got:])
                if not n:
                    break
                got += n
        if got:
            self.received_any = True
        if got < nr_bytes:
            del buf[got:]
        return buf


def handle_conn_open(event: evt.Event, max_pdu_size: int, audit: AuditTrail, acl: AccessList | None = None,
                     our_ae_title: str = "") -> None:
    """EVT_CONN_OPEN: put the PDU length guard on the new connection's socket.

    With ``acl``, the guard also checks the A-ASSOCIATE-RQ's AE titles and the caller's address
    (fixed places in the PDU) before pynetdicom decodes the request: a caller that is not an
    allowed peer gets its A-ASSOCIATE-RJ and an audit row, and none of its presentation contexts
    is ever decoded -- pynetdicom logs a warning per non-conformant UID it decodes, and 2,000
    proposed contexts made 20,000 log lines before :func:`handle_requested` could refuse them.
    """
    assoc = event.assoc
    sock = assoc.dul.socket
    if sock is None or getattr(sock, "socket", None) is None:
        return
    address = str(event.address[0]) if event.address else ""

    def violation(pdu_type: int, length: int, limit: int) -> None:
        setattr(assoc, _AUDITED, True)
        log.warning("aborting connection from %s: PDU type 0x%02X declares %d bytes (limit %d)",
                    address, pdu_type, length, limit)
        audit.record(Event.ASSOCIATION_ABORTED, outcome="failure", peer=address,
                     ae_title=str(getattr(assoc.requestor, "ae_title", "") or "").strip(),
                     detail=f"PDU type 0x{pdu_type:02X} declares {length} bytes, over our limit of {limit}; "
                            "A-ABORT sent without reading it")

    def tls_failure(exc: BaseException) -> None:
        setattr(assoc, _AUDITED, True)
        reason = getattr(exc, "reason", None) or type(exc).__name__
        log.warning("TLS handshake with %s failed: %s", address, reason)
        audit.record(Event.ASSOCIATION_REJECTED, outcome="failure", peer=address,
                     detail=f"TLS handshake failed: {reason}")

    def request(body: bytearray) -> bool:
        """The A-ASSOCIATE-RQ body: True lets pynetdicom decode it (and handle_requested decide)."""
        if acl is None or len(body) < 36:  # too short for its fixed fields: the decoder refuses it
            return True
        # PS3.8 9.3.2: protocol version (2), reserved (2), called AE title (16), calling AE title (16)
        called = bytes(body[4:20]).decode("latin-1").strip()
        calling = bytes(body[20:36]).decode("latin-1").strip()
        why = refusal(acl, our_ae_title, calling, called, address)
        if why is None:
            return True
        setattr(assoc, _AUDITED, True)
        log.warning("rejecting association from %s at %s: %s", calling, address, why[1])
        audit.record(Event.ASSOCIATION_REJECTED, outcome="failure", ae_title=calling, peer=address, detail=why[1])
        try:
            sock.socket.sendall(a_associate_rj(REJECT_PERMANENT, SOURCE_SERVICE_USER, why[0]))
        except OSError:
            pass
        # The association thread waits (up to the ACSE timeout) for the request this DUL will
        # never pass on; an empty item ends that wait now, as a timeout would.
        assoc.dul.to_user_queue.put(None)
        return False

    guard = _PDULengthGuard(sock.recv, sock.socket, max_pdu_size, violation, tls_failure, request)
    sock.recv = guard  # type: ignore[method-assign]
    assoc.bind(evt.EVT_CONN_CLOSE, _handle_conn_close, [address, guard, audit])
