"""Writing audit events: one row per step of the data path.

Rows are only ever added (``AuditTrail.record``); nothing in the package updates or deletes
them.  Patient identifiers enter only as keyed hashes.  Free text is stripped of CR/LF so a row
printed as a log line cannot forge another line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import insert
from sqlalchemy.orm import Session

from ..logs import escape_controls
from ..store.db import Database
from ..store.models import AuditEvent, utcnow
from .secret import keyed_hash

log = logging.getLogger(__name__)


class Event:
    """Audit event names (one place, so `audit tail` filters and tests agree)."""

    ASSOCIATION_ACCEPTED = "association.accepted"
    ASSOCIATION_REJECTED = "association.rejected"
    ASSOCIATION_ABORTED = "association.aborted"
    ECHO = "echo"
    INSTANCE_STORED = "instance.stored"
    INSTANCE_DUPLICATE = "instance.duplicate"
    INSTANCE_REJECTED = "instance.rejected"
    SERIES_COMPLETE = "series.complete"
    ANALYSIS_STARTED = "analysis.started"
    ANALYSIS_FINISHED = "analysis.finished"
    ANALYSIS_FAILED = "analysis.failed"
    ANALYSIS_SKIPPED = "analysis.skipped"
    ANALYSIS_REQUEUED = "analysis.requeued"
    SR_CREATED = "sr.created"
    EXPORT_OK = "export.ok"
    EXPORT_FAILED = "export.failed"
    EXPORT_DEAD = "export.dead"
    EXPORT_REQUEUED = "export.requeued"
    STOW_RECEIVED = "stow.received"  #: one STOW-RS request handled (counts of stored/failed parts)
    STOW_REFUSED = "stow.refused"  #: a STOW-RS request refused as a whole (400/413/415)
    WEB_UNAUTHORIZED = "web.unauthorized"  #: a DICOMweb request without a valid bearer token (401)
    #: Priors (scp_node.scheduler.priors): each C-FIND with its count, each C-MOVE / C-GET with its
    #: sub-operation counts, the prior chosen, none found, or one refused (with the reason, never
    #: the differing values).
    PRIOR_QUERY = "prior.query"
    PRIOR_RETRIEVE = "prior.retrieve"
    PRIOR_FOUND = "prior.found"
    PRIOR_NONE = "prior.none"
    PRIOR_REFUSED = "prior.refused"
    NODE_STARTED = "node.started"
    NODE_STOPPED = "node.stopped"
    RECEIVER_RESTARTED = "node.receiver_restarted"  #: a receiver process died and was replaced


def _clean(text: str, limit: int) -> str:
    """A value from the wire as an audit column: every control character (CR/LF, but also ESC,
    which ``audit tail`` would print to the admin's terminal) written as a visible escape."""
    return escape_controls(str(text))[:limit]


_INSERT = insert(AuditEvent.__table__)


@dataclass
class AuditTrail:
    """Adds audit rows, either inside the caller's transaction or in a transaction of its own."""

    db: Database
    secret: bytes

    def patient_hash(self, patient_id: str | None) -> str:
        return keyed_hash(self.secret, patient_id)

    def add(self, session: Session, event: str, *, outcome: str = "success", ae_title: str = "",
            peer: str = "", study_uid: str = "", series_uid: str = "", sop_uid: str = "",
            patient_id: str | None = None, detail: str = "") -> None:
        """Add a row to ``session`` so it commits (or not) together with the work it describes."""
        session.add(AuditEvent(**self.values(event, outcome=outcome, ae_title=ae_title, peer=peer,
                                             study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
                                             patient_id=patient_id, detail=detail)))

    def values(self, event: str, *, outcome: str = "success", ae_title: str = "", peer: str = "",
               study_uid: str = "", series_uid: str = "", sop_uid: str = "", patient_id: str | None = None,
               detail: str = "") -> dict[str, object]:
        """The column values of one audit row (cleaned, patient ID hashed), for a Core insert."""
        return dict(event=event, outcome=outcome, ae_title=_clean(ae_title, 16), peer=_clean(peer, 64),
                    study_instance_uid=_clean(study_uid, 64), series_instance_uid=_clean(series_uid, 64),
                    sop_instance_uid=_clean(sop_uid, 64), patient_hash=self.patient_hash(patient_id),
                    detail=_clean(detail, 2000), time=utcnow())

    def record(self, event: str, **kwargs: object) -> None:
        """Add a row in its own transaction. Never raises: an audit failure is logged, not fatal."""
        try:
            with self.db.transaction() as conn:  # a Core insert: no ORM session for one row
                conn.execute(_INSERT, self.values(event, **kwargs))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - the data path must not die because the audit write did
            log.exception("could not write audit event %s", event)
