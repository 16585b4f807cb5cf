"""The export queue: each SR to each destination, retried with backoff, never dropped silently.

A job is claimed (SENDING, attempts + 1) before the network call and settled after it, each in
its own transaction.  Jobs found SENDING at start were interrupted mid-send: they go back to
PENDING and are sent again (the PACS sees the same SOP Instance UID, so a repeat is harmless).
After the last attempt a job is DEAD: ``scp-node status`` lists it and ``scp-node exports retry``
queues it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy import select

from ..audit import AuditTrail, Event
from ..config import Destination, ExportConfig
from ..store.db import Database
from ..store.models import ExportJob, ExportState, utcnow
from .backoff import next_delay

log = logging.getLogger(__name__)

#: Sends the file at a path to a destination; raises on failure.
Sender = Callable[[Destination, Path], object]


@dataclass
class _Claim:
    job_id: int
    destination: Destination
    path: Path
    attempts: int
    ids: dict[str, str]


def requeue_interrupted(db: Database, audit: AuditTrail) -> int:
    """Put exports left SENDING by a stop back to PENDING; return how many."""
    with db.session() as session:
        jobs = session.scalars(select(ExportJob).where(ExportJob.state == ExportState.SENDING)).all()
        for job in jobs:
            job.state = ExportState.PENDING
            job.next_attempt_at = utcnow()
            audit.add(session, Event.EXPORT_REQUEUED, sop_uid=job.report.sop_instance_uid,
                      detail=f"export {job.id} to {job.destination} was interrupted; queued again")
        return len(jobs)


def retry_dead(db: Database, audit: AuditTrail, destination: str | None = None) -> int:
    """Admin action: queue DEAD exports again with a fresh set of attempts."""
    with db.session() as session:
        q = select(ExportJob).where(ExportJob.state == ExportState.DEAD)
        if destination:
            q = q.where(ExportJob.destination == destination)
        jobs = session.scalars(q).all()
        for job in jobs:
            job.state = ExportState.PENDING
            job.attempts = 0
            job.next_attempt_at = utcnow()
            audit.add(session, Event.EXPORT_REQUEUED, sop_uid=job.report.sop_instance_uid,
                      detail=f"dead export {job.id} to {job.destination} queued again by an admin")
        return len(jobs)


class ExportQueue:
    """Delivers due export jobs, one at a time."""

    def __init__(self, db: Database, audit: AuditTrail, storage_dir: Path,
                 destinations: tuple[Destination, ...], policy: ExportConfig, send: Sender) -> None:
        self.db = db
        self.audit = audit
        self.storage_dir = storage_dir
        self.destinations = {d.name: d for d in destinations}
        self.policy = policy
        self.send = send

    def run_once(self) -> bool:
        """Claim and send one due export; return False when none was due."""
        claim = self._claim()
        if claim is None:
            return False
        try:
            self.send(claim.destination, claim.path)
        except Exception as exc:  # noqa: BLE001 - every failure is kept and retried
            # (an error that says retrying cannot help -- an HL7 ACK the destination lists in
            # dead_letter_acks -- goes to the dead letter at once)
            self._failed(claim, f"{type(exc).__name__}: {exc}", final=bool(getattr(exc, "dead_letter", False)))
        else:
            self._delivered(claim)
        return True

    def _claim(self) -> _Claim | None:
        with self.db.session() as session:
            jobs = session.scalars(select(ExportJob).where(ExportJob.state == ExportState.PENDING,
                                                           ExportJob.next_attempt_at <= utcnow())
                                   .order_by(ExportJob.next_attempt_at, ExportJob.id).limit(20)).all()
            for job in jobs:
                ids = dict(sop_uid=job.report.sop_instance_uid, study_uid=job.report.study_instance_uid,
                           series_uid=job.report.series_instance_uid)
                dest = self.destinations.get(job.destination)
                if dest is None:
                    job.state = ExportState.DEAD
                    job.last_error = f"destination {job.destination!r} is no longer configured"
                    self.audit.add(session, Event.EXPORT_DEAD, outcome="failure", detail=job.last_error, **ids)
                    continue
                job.state = ExportState.SENDING
                job.attempts += 1
                return _Claim(job.id, dest, self.storage_dir / job.report.path, job.attempts, ids)
        return None

    def _delivered(self, claim: _Claim) -> None:
        with self.db.session() as session:
            job = session.get(ExportJob, claim.job_id)
            assert job is not None
            job.state = ExportState.DONE
            job.delivered_at = utcnow()
            job.last_error = ""
            d = claim.destination
            self.audit.add(session, Event.EXPORT_OK, ae_title=d.ae_title, peer=f"{d.host}:{d.port}",
                           detail=f"delivered to {d.name} on attempt {claim.attempts}", **claim.ids)

    def _failed(self, claim: _Claim, error: str, final: bool = False) -> None:
        log.warning("export %d to %s failed (attempt %d): %s", claim.job_id, claim.destination.name,
                    claim.attempts, error)
        p = self.policy
        with self.db.session() as session:
            job = session.get(ExportJob, claim.job_id)
            assert job is not None
            job.last_error = error[:2000]
            d = claim.destination
            common = dict(ae_title=d.ae_title, peer=f"{d.host}:{d.port}", outcome="failure", **claim.ids)
            if final or claim.attempts >= p.max_attempts:
                job.state = ExportState.DEAD
                why = "not retried" if final and claim.attempts < p.max_attempts else \
                    f"gave up after {claim.attempts} attempts"
                self.audit.add(session, Event.EXPORT_DEAD, detail=f"to {d.name}: {why}: {error[:400]}", **common)
            else:
                delay = next_delay(claim.attempts, p.backoff_initial_seconds, p.backoff_multiplier,
                                   p.backoff_max_seconds)
                job.state = ExportState.PENDING
                job.next_attempt_at = utcnow() + delay
                self.audit.add(session, Event.EXPORT_FAILED,
                               detail=f"to {d.name}, attempt {claim.attempts}: {error[:400]}; "
                                      f"next try in {delay.total_seconds():.0f} s", **common)
