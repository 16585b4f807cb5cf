"""The export queue: each SR to each destination, retried with backoff, never dropped silently.

A job is claimed (SENDING, attempts + 1, ``claimed_by`` this worker with a lease its heartbeat
renews; ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two workers never send the same job) before
the network call and settled after it, each in its own transaction.  Jobs found SENDING at start
were interrupted mid-send: they go back to PENDING and are sent again (the PACS sees the same SOP
Instance UID, so a repeat is harmless).  A worker whose claim lapsed meanwhile (scheduler.fleet
requeued it) settles nothing unless the job still waits unclaimed: one delivery, one ``export.ok``.
After the last attempt a job is DEAD: ``scp-node status`` lists it and ``scp-node exports retry``
queues it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Sequence

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

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


def requeue_interrupted(db: Database, audit: AuditTrail, *, shared: bool = False,
                        now: datetime | None = None, dead: Sequence[str] = ()) -> int:
    """Put exports left SENDING by a stop back to PENDING; return how many.

    ``shared`` (an index other workers use): only those nobody can still be sending -- no
    claimant (written before claims existed), a lapsed lease, or a claimant in ``dead`` (a
    process of this host that no longer exists)."""
    with db.session() as session:
        q = select(ExportJob).where(ExportJob.state == ExportState.SENDING)
        if shared:
            q = q.where(or_(ExportJob.claimed_by == "", ExportJob.lease_until.is_(None),
                            ExportJob.lease_until < (now or utcnow()), ExportJob.claimed_by.in_(list(dead))))
        jobs = session.scalars(q.with_for_update(skip_locked=True, of=ExportJob)).all()
        for job in jobs:
            requeue_export(session, audit, job, f"export {job.id} to {job.destination} was interrupted; queued again")
        return len(jobs)


def requeue_export(session: Session, audit: AuditTrail, job: ExportJob, why: str) -> None:
    """One SENDING export back to PENDING, due now; audited."""
    job.state = ExportState.PENDING
    job.next_attempt_at = utcnow()
    job.claimed_by = ""
    job.lease_until = None
    audit.add(session, Event.EXPORT_REQUEUED, sop_uid=job.report.sop_instance_uid, detail=why)


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
                 destinations: tuple[Destination, ...], policy: ExportConfig, send: Sender,
                 worker: str = "", lease_seconds: float = 120.0) -> None:
        """``worker``: this node's name in the fleet, written into each claim with a lease of
        ``lease_seconds`` that the node's heartbeat renews."""
        self.db = db
        self.audit = audit
        self.storage_dir = storage_dir
        self.destinations = {d.name: d for d in destinations}
        self.policy = policy
        self.send = send
        self.worker = worker
        self.lease = timedelta(seconds=lease_seconds)

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
                                   .order_by(ExportJob.next_attempt_at, ExportJob.id).limit(20)
                                   .with_for_update(skip_locked=True, of=ExportJob)).all()
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
                job.claimed_by = self.worker
                job.lease_until = utcnow() + self.lease
                return _Claim(job.id, dest, self.storage_dir / job.report.path, job.attempts, ids)
        return None

    def _held(self, session: Session, claim: _Claim, delivered: bool) -> ExportJob | None:
        """The job, locked, if this worker may settle it; else None (audited).

        Its own live claim, always.  A lapsed claim that was queued again and still waits
        unclaimed: only a delivery settles it (the SR is at the destination; sending it again
        would only repeat it).  Held by another worker, or settled: nothing is recorded twice.
        """
        job = session.scalars(select(ExportJob).where(ExportJob.id == claim.job_id)
                              .with_for_update(of=ExportJob)).one()
        if job.state is ExportState.SENDING and job.claimed_by == self.worker and job.attempts == claim.attempts:
            return job
        if delivered and job.state is ExportState.PENDING and not job.claimed_by:
            return job
        holder = job.claimed_by or "nobody"
        log.warning("export %d: the claim of this worker lapsed (now %s, held by %s)", job.id, job.state.value,
                    holder)
        d = claim.destination
        self.audit.add(session, Event.EXPORT_FAILED, outcome="warning", ae_title=d.ae_title,
                       peer=f"{d.host}:{d.port}",
                       detail=f"to {d.name}: claim lost by worker {self.worker or '(unnamed)'} on attempt "
                              f"{claim.attempts} (export now {job.state.value}, held by {holder}); this "
                              f"attempt {'delivered' if delivered else 'failed'} and is not recorded",
                       **claim.ids)
        return None

    def _delivered(self, claim: _Claim) -> None:
        with self.db.session() as session:
            job = self._held(session, claim, delivered=True)
            if job is None:
                return
            job.state = ExportState.DONE
            job.lease_until = None
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
            job = self._held(session, claim, delivered=False)
            if job is None:
                return
            job.last_error = error[:2000]
            job.lease_until = None
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
                job.claimed_by = ""
                job.next_attempt_at = utcnow() + delay
                self.audit.add(session, Event.EXPORT_FAILED,
                               detail=f"to {d.name}, attempt {claim.attempts}: {error[:400]}; "
                                      f"next try in {delay.total_seconds():.0f} s", **common)
