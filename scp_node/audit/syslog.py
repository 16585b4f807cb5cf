"""IHE ATNA: each audit row also as a DICOM audit message (PS3.15 A.5) over syslog-TLS.

The node process follows the audit table (rows from every process: receivers, web, scheduler)
and sends each committed row to ``[audit] syslog_url`` as an RFC 5424 message (facility
authpriv, severity notice: PRI 85; APP-NAME ``scp-node``; MSGID ``IHE+RFC-3881``), framed by
octet counting over TLS (RFC 5425), its MSG the UTF-8 XML of a DICOM audit message:
EventIdentification (EventID / EventTypeCode from DICOM's CID 400 / 401, the outcome, the row's
event name and detail as EventOutcomeDescription), ActiveParticipants (the node, and the peer
AE title / address when the row has one), AuditSourceIdentification, and ParticipantObjects for
the study (110180 Study Instance UID) and the patient.

The patient's ParticipantObjectID is the audit trail's keyed hash (HMAC with ``audit.key``),
never the clear Patient ID: the audit repository is outside the node, and no patient identifier
leaves it in clear (the site maps a hash back with the key when it must).

Delivery is at least once: the id of the last row sent is kept in ``<var>/atna.cursor`` after
each batch, so rows written while the syslog server was away are sent when it is back, and a
crash between a send and the cursor's update sends those rows again. Rows from before the first
start with a ``syslog_url`` are not sent.
"""

from __future__ import annotations

import logging
import os
import re
import select as select_io
import socket
import ssl
import threading
import time
from datetime import timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET

from sqlalchemy import func, select

from ..store.db import Database
from ..store.models import AuditEvent

log = logging.getLogger(__name__)

PRI = 10 * 8 + 5  #: facility authpriv (10), severity notice (5)
APP_NAME = "scp-node"
MSG_ID = "IHE+RFC-3881"
BOM = "\ufeff"
CURSOR_FILE = "atna.cursor"
_BATCH = 200

# DICOM coded values (csd-code, codeSystemName, originalText)
_APP_ACTIVITY = ("110100", "DCM", "Application Activity")
_INSTANCES_ACCESSED = ("110103", "DCM", "DICOM Instances Accessed")
_INSTANCES_TRANSFERRED = ("110104", "DCM", "DICOM Instances Transferred")
_SECURITY_ALERT = ("110113", "DCM", "Security Alert")
_USER_AUTH = ("110114", "DCM", "User Authentication")
_APP_START = ("110120", "DCM", "Application Start")
_APP_STOP = ("110121", "DCM", "Application Stop")
_LOGIN = ("110122", "DCM", "Login")
_LOGOUT = ("110123", "DCM", "Logout")
_NODE_AUTH = ("110126", "DCM", "Node Authentication")
_ROLE_APPLICATION = ("110150", "DCM", "Application")
_ROLE_DESTINATION = ("110152", "DCM", "Destination Role ID")
_ROLE_SOURCE = ("110153", "DCM", "Source Role ID")
_STUDY_UID = ("110180", "DCM", "Study Instance UID")
_PATIENT_NUMBER = ("2", "RFC-3881", "Patient Number")
_SOURCE_TYPE = ("4", "RFC-3881", "Application Server Process Tier")

#: event -> (EventID, EventTypeCode or None, EventActionCode, the node's role, the peer's role)
_EVENTS: dict[str, tuple[tuple[str, str, str], Any, str, Any, Any]] = {
    "node.started": (_APP_ACTIVITY, _APP_START, "E", _ROLE_APPLICATION, None),
    "node.stopped": (_APP_ACTIVITY, _APP_STOP, "E", _ROLE_APPLICATION, None),
    "node.receiver_restarted": (_APP_ACTIVITY, _APP_START, "E", _ROLE_APPLICATION, None),
    "association.accepted": (_USER_AUTH, _LOGIN, "E", _ROLE_DESTINATION, _ROLE_SOURCE),
    "association.rejected": (_SECURITY_ALERT, _NODE_AUTH, "E", _ROLE_DESTINATION, _ROLE_SOURCE),
    "association.aborted": (_USER_AUTH, _LOGOUT, "E", _ROLE_DESTINATION, _ROLE_SOURCE),
    "web.unauthorized": (_SECURITY_ALERT, _NODE_AUTH, "E", _ROLE_DESTINATION, _ROLE_SOURCE),
    "echo": (_APP_ACTIVITY, None, "E", _ROLE_DESTINATION, _ROLE_SOURCE),
    "instance.stored": (_INSTANCES_TRANSFERRED, None, "C", _ROLE_DESTINATION, _ROLE_SOURCE),
    "instance.duplicate": (_INSTANCES_TRANSFERRED, None, "U", _ROLE_DESTINATION, _ROLE_SOURCE),
    "instance.rejected": (_INSTANCES_TRANSFERRED, None, "C", _ROLE_DESTINATION, _ROLE_SOURCE),
    "stow.received": (_INSTANCES_TRANSFERRED, None, "C", _ROLE_DESTINATION, _ROLE_SOURCE),
    "stow.refused": (_INSTANCES_TRANSFERRED, None, "C", _ROLE_DESTINATION, _ROLE_SOURCE),
    "export.ok": (_INSTANCES_TRANSFERRED, None, "R", _ROLE_SOURCE, _ROLE_DESTINATION),
    "export.failed": (_INSTANCES_TRANSFERRED, None, "R", _ROLE_SOURCE, _ROLE_DESTINATION),
    "export.dead": (_INSTANCES_TRANSFERRED, None, "R", _ROLE_SOURCE, _ROLE_DESTINATION),
    "sr.created": (_INSTANCES_ACCESSED, None, "C", _ROLE_APPLICATION, None),
}
_DEFAULT = (_INSTANCES_ACCESSED, None, "R", _ROLE_APPLICATION, None)  # series, analysis: the node reads images
_OUTCOME = {"success": "0", "warning": "4", "failure": "4"}


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _x(text: str) -> str:
    """Text XML 1.0 can carry (ElementTree escapes <, & and quotes; control characters it cannot)."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _code(parent: ET.Element, tag: str, code: tuple[str, str, str]) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def _host(peer: str) -> str:
    """'10.0.0.5:104' / '[::1]:104' / 'host' -> the address part."""
    if peer.startswith("["):
        return peer[1:].split("]", 1)[0]
    return peer.rsplit(":", 1)[0] if peer.count(":") == 1 else peer


def audit_message(row: Any, *, ae_title: str, hostname: str) -> str:
    """The DICOM audit message (PS3.15 A.5.1 XML) of one audit row."""
    event_id, type_code, action, our_role, peer_role = _EVENTS.get(row.event, _DEFAULT)
    outcome = "8" if row.event == "export.dead" else _OUTCOME.get(row.outcome, "4")
    when = row.time if row.time.tzinfo else row.time.replace(tzinfo=timezone.utc)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": when.astimezone(timezone.utc).isoformat(timespec="milliseconds"),
        "EventOutcomeIndicator": outcome})
    _code(ident, "EventID", event_id)
    if type_code is not None:
        _code(ident, "EventTypeCode", type_code)
    description = f"{row.event}: {row.detail}" if row.detail else row.event
    ET.SubElement(ident, "EventOutcomeDescription").text = _x(description)
    has_peer = peer_role is not None and bool(row.peer or row.ae_title)
    peer_is_requestor = has_peer and our_role is _ROLE_DESTINATION  # it called us
    me = ET.SubElement(root, "ActiveParticipant", {
        "UserID": _x(ae_title), "AlternativeUserID": str(os.getpid()), "UserIsRequestor": str(not peer_is_requestor).lower(),
        "NetworkAccessPointID": hostname, "NetworkAccessPointTypeCode": "1"})
    _code(me, "RoleIDCode", our_role)
    if has_peer:
        attrs = {"UserID": _x(row.ae_title or _host(row.peer)), "UserIsRequestor": str(peer_is_requestor).lower()}
        if row.peer:
            attrs.update(NetworkAccessPointID=_x(_host(row.peer)), NetworkAccessPointTypeCode="2")
        _code(ET.SubElement(root, "ActiveParticipant", attrs), "RoleIDCode", peer_role)
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": ae_title})
    _code(source, "AuditSourceTypeCode", _SOURCE_TYPE)
    if row.study_instance_uid:
        study = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _x(row.study_instance_uid), "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _code(study, "ParticipantObjectIDTypeCode", _STUDY_UID)
    if row.patient_hash:
        patient = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": row.patient_hash, "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        _code(patient, "ParticipantObjectIDTypeCode", _PATIENT_NUMBER)
    return ET.tostring(root, encoding="unicode")


def syslog_frame(xml: str, *, hostname: str, when: str) -> bytes:
    """RFC 5424 message (``<85>1 TIMESTAMP HOST scp-node PROCID IHE+RFC-3881 - BOM XML``), octet-counted (RFC 5425)."""
    msg = f"<{PRI}>1 {when} {hostname[:255] or '-'} {APP_NAME} {os.getpid()} {MSG_ID} - {BOM}{xml}".encode("utf-8")
    return f"{len(msg)} ".encode("ascii") + msg


class SyslogForwarder:
    """A thread in the node process: new audit rows -> the syslog server, in order, at least once."""

    def __init__(self, db: Database, audit_config: Any, ae_title: str, var_dir: Path, poll: float = 1.0) -> None:
        self.db = db
        self.config = audit_config
        self.ae_title = ae_title
        self.hostname = socket.gethostname()
        url = urlsplit(audit_config.syslog_url)
        self.host, self.port = str(url.hostname), int(url.port or 6514)
        self.cursor_path = var_dir / CURSOR_FILE
        self.poll = poll
        self._sock: ssl.SSLSocket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._ctx = self._context()  # a bad CA / certificate / key stops the start, not the first send
        self._cursor = self._load_cursor()

    # -- cursor ---------------------------------------------------------------------------------
    def _load_cursor(self) -> int:
        try:
            return int(self.cursor_path.read_text().strip())
        except (OSError, ValueError):
            with self.db.session() as s:  # first start with ATNA: from now on
                start = int(s.scalar(select(func.max(AuditEvent.id))) or 0)
            self._save_cursor(start)
            return start

    def _save_cursor(self, value: int) -> None:
        tmp = self.cursor_path.with_suffix(".tmp")
        tmp.write_text(str(value))
        tmp.replace(self.cursor_path)

    # -- transport ------------------------------------------------------------------------------
    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.config.syslog_ca or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # verified against the configured CA, as the DICOM TLS peers are
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.config.syslog_cert:
            ctx.load_cert_chain(self.config.syslog_cert, self.config.syslog_key)
        return ctx

    def _connect(self) -> ssl.SSLSocket:
        if self._sock is not None and not self._still_open(self._sock):
            self._close()  # the server went away: a write would vanish into the closed connection
        if self._sock is None:
            raw = socket.create_connection((self.host, self.port), timeout=10)
            try:
                self._sock = self._ctx.wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
        return self._sock

    @staticmethod
    def _still_open(sock: ssl.SSLSocket) -> bool:
        """A syslog server never writes to us: anything readable is its end of the connection."""
        try:
            readable, _, _ = select_io.select([sock], [], [], 0)
            if not readable and not sock.pending():
                return True
            sock.setblocking(False)
            try:
                return bool(sock.recv(4096))
            finally:
                sock.setblocking(True)
                sock.settimeout(10)
        except ssl.SSLWantReadError:
            return True
        except (OSError, ValueError):
            return False

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.settimeout(2)
                self._sock.unwrap()  # TLS close_notify: the receiver sees a clean end of the session
            except (OSError, ValueError):
                pass
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    # -- the loop -------------------------------------------------------------------------------
    def send_pending(self) -> int:
        """Send every row after the cursor (in batches); return how many were sent. Raises on a
        network failure (the cursor then stands at the last batch sent)."""
        sent = 0
        while True:
            with self.db.session() as s:
                rows = s.scalars(select(AuditEvent).where(AuditEvent.id > self._cursor)
                                 .order_by(AuditEvent.id).limit(_BATCH)).all()
                for r in rows:
                    s.expunge(r)
            if not rows:
                return sent
            data = b"".join(syslog_frame(audit_message(r, ae_title=self.ae_title, hostname=self.hostname),
                                         hostname=self.hostname,
                                         when=r.time.astimezone(timezone.utc).isoformat(timespec="milliseconds")
                                         .replace("+00:00", "Z"))
                            for r in rows)
            try:
                self._connect().sendall(data)
            except (OSError, ssl.SSLError):
                self._close()
                raise
            self._cursor = rows[-1].id
            self._save_cursor(self._cursor)
            sent += len(rows)

    def _run(self) -> None:
        delay = self.poll
        while not self._stop.wait(delay):
            try:
                self.send_pending()
                if self._failures:
                    log.info("ATNA audit: %s:%d reached again; rows sent up to %d", self.host, self.port, self._cursor)
                self._failures, delay = 0, self.poll
            except Exception as exc:  # noqa: BLE001 - the audit repository being away never stops the node
                self._failures += 1
                delay = min(60.0, self.poll * 2 ** min(self._failures, 6))
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    log.warning("ATNA audit: cannot send to %s:%d (%s: %s); retrying in %.0f s, nothing is lost",
                                self.host, self.port, type(exc).__name__, getattr(exc, "strerror", None) or exc, delay)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ATNASyslog", daemon=True)
        self._thread.start()
        log.info("ATNA audit messages to tls://%s:%d (from audit row %d on)", self.host, self.port, self._cursor)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, then send what is left (the node.stopped row included) for up to ``timeout`` s."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.send_pending()
                break
            except Exception:  # noqa: BLE001 - left for the next start (the cursor says where)
                time.sleep(0.5)
        self._close()
