"""The fleet: every node sharing one index registers here, beats, and keeps its claims alive.

Several receivers and workers (``serve --role``) on several machines share one PostgreSQL index.
A worker claims a job by writing its name and a lease (``claimed_by``, ``lease_until``); its
heartbeat renews the lease of every job it still holds.  A worker that dies (kill -9, power, a
lost network) stops renewing, its leases lapse, and any other worker puts those jobs back in the
queue (:func:`requeue_expired`) -- so a job runs again, and the finish of the dead worker's
attempt, should it ever come, is refused by the queue (it no longer holds the claim).

Names are ``<host>:<pid>:<role>``: unique per process, so a restarted worker never mistakes a
claim of its previous life for its own; those claims lapse like any other.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from ..audit import AuditTrail
from ..monitor import LOST_AFTER_BEATS
from ..store.db import Database
from ..store.models import AnalysisJob, ExportJob, ExportState, JobState, NodeRecord, utcnow
from .analysis import requeue_job
from .exports import requeue_export

log = logging.getLogger(__name__)

#: What ``serve --role`` accepts: ``all`` is one node doing everything (the only role on SQLite).
ROLES = ("all", "receiver", "worker")


def node_name(role: str, host: str | None = None, pid: int | None = None) -> str:
    """``<host>:<pid>:<role>``: what this process writes into the claims it takes."""
    return f"{host or socket.gethostname()}:{pid or os.getpid()}:{role}"


def lease_end(lease_seconds: float, now: datetime | None = None) -> datetime:
    return (now or utcnow()) + timedelta(seconds=lease_seconds)


def requeue_expired(db: Database, audit: AuditTrail, max_attempts: int | None = None,
                    now: datetime | None = None) -> tuple[int, int]:
    """Put RUNNING analysis jobs and SENDING exports whose lease has lapsed back in the queue.

    Returns (analysis jobs, exports) queued again.  A job at its last allowed attempt is FAILED
    instead, as after a restart: a series that kills every worker that takes it must not take
    the whole fleet down one worker at a time.  Rows another transaction holds (a worker
    finishing the job right now) are skipped, never waited for.
    """
    now = now or utcnow()
    with db.session() as session:
        jobs = session.scalars(select(AnalysisJob).where(
            AnalysisJob.state == JobState.RUNNING, AnalysisJob.lease_until.is_not(None),
            AnalysisJob.lease_until < now).with_for_update(skip_locked=True, of=AnalysisJob)).all()
        n_jobs = sum(requeue_job(session, audit, job, max_attempts, _expired(job.claimed_by)) for job in jobs)
        exports = session.scalars(select(ExportJob).where(
            ExportJob.state == ExportState.SENDING, ExportJob.lease_until.is_not(None),
            ExportJob.lease_until < now).with_for_update(skip_locked=True, of=ExportJob)).all()
        for export in exports:
            requeue_export(session, audit, export, _expired(export.claimed_by))
    if n_jobs or exports:
        log.warning("requeued %d analysis jobs and %d exports whose worker stopped renewing its claim",
                    n_jobs, len(exports))
    return n_jobs, len(exports)


def dead_claimants_here(db: Database, host: str | None = None) -> list[str]:
    """The claimants of RUNNING analyses and SENDING exports that were processes of this host and
    no longer exist (``host:pid:role`` with that pid gone): a node restarted after ``kill -9``
    takes their work back at once instead of waiting ``claim_lease_seconds`` for their leases.

    Only this host's processes can be checked (``kill(pid, 0)``), so hostnames must be unique in a
    fleet; a pid reused by another process counts as alive, and that claim lapses as any other.
    """
    host = host or socket.gethostname()
    with db.session() as session:
        names = set(session.scalars(select(AnalysisJob.claimed_by).where(
            AnalysisJob.state == JobState.RUNNING, AnalysisJob.claimed_by.startswith(f"{host}:"))))
        names |= set(session.scalars(select(ExportJob.claimed_by).where(
            ExportJob.state == ExportState.SENDING, ExportJob.claimed_by.startswith(f"{host}:"))))
    return sorted(n for n in names if not _alive(n))


def _alive(name: str) -> bool:
    try:
        pid = int(name.rsplit(":", 2)[1])
    except (IndexError, ValueError):
        return True  # not a name this code wrote: leave it to its lease
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _expired(worker: str) -> str:
    return f"claim expired: worker {worker or '(unnamed)'} stopped renewing"


@dataclass
class FleetMember:
    """This process's row in the fleet table, and the renewal of the claims it holds."""

    db: Database
    name: str
    role: str
    ae_title: str
    version: str
    lease_seconds: float

    def register(self) -> None:
        """Write (or refresh) this node's row: ``scp-node status`` lists it from now on."""
        now = utcnow()
        host, pid = self.name.rsplit(":", 2)[0], int(self.name.rsplit(":", 2)[1])
        with self.db.session() as session:
            row = session.scalars(select(NodeRecord).where(NodeRecord.name == self.name)).first()
            if row is None:
                row = NodeRecord(name=self.name)
                session.add(row)
            row.role, row.host, row.pid = self.role, host, pid
            row.ae_title, row.version = self.ae_title, self.version
            row.started_at = row.heartbeat_at = now
            row.stopped_at = None

    def beat(self) -> int:
        """Refresh the heartbeat and extend the lease of every job this node still holds;
        return how many claims were renewed."""
        now = utcnow()
        until = lease_end(self.lease_seconds, now)
        with self.db.session() as session:
            session.execute(update(NodeRecord).where(NodeRecord.name == self.name).values(heartbeat_at=now))
            n = session.execute(update(AnalysisJob).where(
                AnalysisJob.claimed_by == self.name, AnalysisJob.state == JobState.RUNNING)
                .values(lease_until=until)).rowcount or 0
            n += session.execute(update(ExportJob).where(
                ExportJob.claimed_by == self.name, ExportJob.state == ExportState.SENDING)
                .values(lease_until=until)).rowcount or 0
        return int(n)

    def others_alive(self, heartbeat_seconds: float) -> list[str]:
        """Names of the other nodes that beat recently (not stopped)."""
        since = utcnow() - timedelta(seconds=heartbeat_seconds * LOST_AFTER_BEATS)
        with self.db.session() as session:
            return list(session.scalars(select(NodeRecord.name).where(
                NodeRecord.name != self.name, NodeRecord.stopped_at.is_(None),
                NodeRecord.heartbeat_at >= since)))

    def stopped(self) -> None:
        """A clean stop: the row stays (history) but ``status`` no longer lists it."""
        with self.db.session() as session:
            session.execute(update(NodeRecord).where(NodeRecord.name == self.name).values(stopped_at=utcnow()))
