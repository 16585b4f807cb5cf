"""Export queue: delivery, backoff growing to its cap, DEAD with audit, admin retry, interrupted sends."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from scp_node.audit import AuditTrail, Event
from scp_node.config import ExportConfig
from scp_node.scheduler.analysis import AnalysisQueue
from scp_node.scheduler.backoff import next_delay
from scp_node.scheduler.completion import SeriesCompletion
from scp_node.scheduler.exports import ExportQueue, requeue_interrupted, retry_dead
from scp_node.store.db import Database
from scp_node.store.models import AuditEvent, ExportJob, ExportState, Report, utcnow
from tests.scheduler.fakes import (DESTINATIONS, FakeEngine, FakeSender, FakeWriter, Interrupted, after_quiet,
                                   build_report)

POLICY = ExportConfig(max_attempts=5, backoff_initial_seconds=10.0, backoff_multiplier=3.0,
                      backoff_max_seconds=60.0)
PACS_ONLY = DESTINATIONS[:1]


@pytest.fixture
def report(index_db: Database, audit_trail: AuditTrail, storage_dir: Path,
           ingest_ct) -> Report:  # type: ignore[no-untyped-def]
    """A real series analysed by the fake engine: one SR file and one PENDING export to 'pacs'."""
    ingest_ct(0, 1)
    SeriesCompletion(index_db, audit_trail, 5, 3600).run_once(now=after_quiet(index_db, 5))
    queue = AnalysisQueue(index_db, audit_trail, storage_dir, FakeEngine(), build_report, FakeWriter(), PACS_ONLY)
    assert queue.run_once()
    with index_db.session() as s:
        row = s.scalars(select(Report)).one()
        s.expunge(row)
        return row


def export_job(db: Database) -> ExportJob:
    with db.session() as s:
        job = s.scalars(select(ExportJob).order_by(ExportJob.id)).all()[0]
        s.expunge(job)
        return job


def make_due(db: Database) -> None:
    with db.session() as s:
        s.execute(update(ExportJob).where(ExportJob.state == ExportState.PENDING)
                  .values(next_attempt_at=utcnow() - timedelta(seconds=1)))


def events(db: Database, name: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event == name).order_by(AuditEvent.id)))


def test_next_delay_grows_and_is_capped() -> None:
    delays = [next_delay(n, 5.0, 2.0, 60.0).total_seconds() for n in range(1, 8)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert next_delay(0, 5.0, 2.0, 60.0) == timedelta(seconds=5)


def test_delivery_marks_done_and_audits(index_db: Database, audit_trail: AuditTrail, storage_dir: Path,
                                        report: Report) -> None:
    sender = FakeSender()
    queue = ExportQueue(index_db, audit_trail, storage_dir, PACS_ONLY, POLICY, sender)
    assert queue.run_once() is True
    assert sender.sent == [("pacs", storage_dir / report.path)]
    job = export_job(index_db)
    assert (job.state, job.attempts, job.last_error) == (ExportState.DONE, 1, "")
    assert job.delivered_at is not None
    (ok,) = events(index_db, Event.EXPORT_OK)
    assert (ok.ae_title, ok.peer, ok.sop_instance_uid) == ("PACS", "10.0.0.10:104", report.sop_instance_uid)
    assert "attempt 1" in ok.detail
    assert queue.run_once() is False and len(sender.sent) == 1


def test_failures_back_off_then_dead_then_admin_retry(index_db: Database, audit_trail: AuditTrail,
                                                      storage_dir: Path, report: Report) -> None:
    sender = FakeSender(failures=[ConnectionRefusedError("connection refused")] * POLICY.max_attempts)
    queue = ExportQueue(index_db, audit_trail, storage_dir, PACS_ONLY, POLICY, sender)

    expected = [10.0, 30.0, 60.0, 60.0]  # 10, 10*3, min(90, 60), capped
    for attempt, delay in enumerate(expected, start=1):
        before = utcnow()
        assert queue.run_once() is True
        after = utcnow()
        job = export_job(index_db)
        assert (job.state, job.attempts) == (ExportState.PENDING, attempt)
        assert job.last_error == "ConnectionRefusedError: connection refused"
        assert before + timedelta(seconds=delay) <= job.next_attempt_at <= after + timedelta(seconds=delay)
        assert queue.run_once() is False  # not due yet: no send
        assert len(sender.sent) == attempt
        make_due(index_db)

    assert queue.run_once() is True  # the last attempt
    job = export_job(index_db)
    assert (job.state, job.attempts) == (ExportState.DEAD, POLICY.max_attempts)
    make_due(index_db)
    assert queue.run_once() is False  # dead jobs stay dead
    assert len(events(index_db, Event.EXPORT_FAILED)) == POLICY.max_attempts - 1
    (dead,) = events(index_db, Event.EXPORT_DEAD)
    assert dead.outcome == "failure" and f"gave up after {POLICY.max_attempts} attempts" in dead.detail
    assert "next try in 10 s" in events(index_db, Event.EXPORT_FAILED)[0].detail

    assert retry_dead(index_db, audit_trail, destination="elsewhere") == 0
    assert retry_dead(index_db, audit_trail) == 1
    job = export_job(index_db)
    assert (job.state, job.attempts) == (ExportState.PENDING, 0)
    assert job.next_attempt_at <= utcnow()
    assert "queued again by an admin" in events(index_db, Event.EXPORT_REQUEUED)[0].detail
    assert retry_dead(index_db, audit_trail) == 0

    assert queue.run_once() is True  # the sender works again
    job = export_job(index_db)
    assert (job.state, job.attempts) == (ExportState.DONE, 1)


def test_interrupted_send_is_requeued_at_start(index_db: Database, audit_trail: AuditTrail, storage_dir: Path,
                                               report: Report) -> None:
    sender = FakeSender(failures=[Interrupted()])
    queue = ExportQueue(index_db, audit_trail, storage_dir, PACS_ONLY, POLICY, sender)
    with pytest.raises(Interrupted):
        queue.run_once()
    assert export_job(index_db).state is ExportState.SENDING
    assert queue.run_once() is False  # not sent twice concurrently

    assert requeue_interrupted(index_db, audit_trail) == 1
    job = export_job(index_db)
    assert job.state is ExportState.PENDING and job.next_attempt_at <= utcnow()
    assert requeue_interrupted(index_db, audit_trail) == 0
    assert len(events(index_db, Event.EXPORT_REQUEUED)) == 1

    assert queue.run_once() is True
    job = export_job(index_db)
    assert (job.state, job.attempts) == (ExportState.DONE, 2)
    assert len(sender.sent) == 2


def test_unconfigured_destination_goes_dead(index_db: Database, audit_trail: AuditTrail, storage_dir: Path,
                                            report: Report) -> None:
    sender = FakeSender()
    queue = ExportQueue(index_db, audit_trail, storage_dir, DESTINATIONS[1:], POLICY, sender)
    assert queue.run_once() is False
    assert sender.sent == []
    job = export_job(index_db)
    assert job.state is ExportState.DEAD and "'pacs' is no longer configured" in job.last_error
    assert len(events(index_db, Event.EXPORT_DEAD)) == 1


def test_destinations_are_independent(index_db: Database, audit_trail: AuditTrail, storage_dir: Path,
                                      ingest_ct) -> None:  # type: ignore[no-untyped-def]
    ingest_ct(0)
    SeriesCompletion(index_db, audit_trail, 5, 3600).run_once(now=after_quiet(index_db, 5))
    AnalysisQueue(index_db, audit_trail, storage_dir, FakeEngine(), build_report, FakeWriter(),
                  DESTINATIONS).run_once()

    class PacsDown(FakeSender):
        def __call__(self, dest, path):  # type: ignore[no-untyped-def]
            self.sent.append((dest.name, path))
            if dest.name == "pacs":
                raise TimeoutError("association timed out")

    sender = PacsDown()
    queue = ExportQueue(index_db, audit_trail, storage_dir, DESTINATIONS, POLICY, sender)
    while queue.run_once():
        pass
    with index_db.session() as s:
        states = {j.destination: (j.state, j.attempts) for j in s.scalars(select(ExportJob))}
    assert states == {"pacs": (ExportState.PENDING, 1), "archive": (ExportState.DONE, 1)}
