"""Association control: who may talk to the node (EVT_REQUESTED), and the audit of each outcome.

A caller is let in only when its calling AE title **and** its address match one ``[[peers]]``
entry and it calls our AE title.  Everyone else gets A-ASSOCIATE-RJ (rejected-permanent,
service-user, calling/called AE title not recognised) and an audit row.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field

from pynetdicom import evt

from ..audit import AuditTrail, Event
from ..config import Peer

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ parameters (PS3.8 9.3.4): result, source, reason
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07


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


def handle_requested(event: evt.Event, acl: AccessList, our_ae_title: str, audit: AuditTrail) -> None:
    """EVT_REQUESTED: reject callers not on the allow-list before any negotiation."""
    rq = event.assoc.requestor
    # At EVT_REQUESTED the titles are only in the A-ASSOCIATE-RQ primitive (not yet copied to rq).
    calling = str(rq.primitive.calling_ae_title).strip()
    called = str(rq.primitive.called_ae_title).strip()
    address = str(rq.address)
    reason = None
    if called != our_ae_title.strip():
        reason = (REASON_CALLED_AE_NOT_RECOGNISED, f"called AE title {called!r} is not ours")
    elif not acl.allows(calling, address):
        reason = (REASON_CALLING_AE_NOT_RECOGNISED, "calling AE title and address are not an allowed peer")
    if reason is None:
        return
    log.warning("rejecting association from %s at %s: %s", calling, address, reason[1])
    audit.record(Event.ASSOCIATION_REJECTED, outcome="failure", ae_title=calling, peer=address,
                 detail=reason[1])
    event.assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, reason[0])
    # As pynetdicom's own ACSE does after a reject: wait until the DUL has sent the A-ASSOCIATE-RJ
    # and closed, otherwise the socket is shut before the PDU leaves and the peer sees an abort.
    event.assoc.kill()


def handle_accepted(event: evt.Event, audit: AuditTrail) -> None:
    """EVT_ACCEPTED: audit who is connected."""
    rq = event.assoc.requestor
    audit.record(Event.ASSOCIATION_ACCEPTED, ae_title=str(rq.ae_title).strip(), peer=str(rq.address))


def handle_aborted(event: evt.Event, audit: AuditTrail) -> None:
    """EVT_ABORTED: an association ended without a release (peer or local abort)."""
    rq = event.assoc.requestor
    audit.record(Event.ASSOCIATION_ABORTED, outcome="warning", ae_title=str(rq.ae_title).strip(),
                 peer=str(rq.address))
