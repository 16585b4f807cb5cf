"""Analysis queue: done / retried / failed / skipped / superseded / interrupted, all in the real index."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select, text

from scp_node.audit import AuditTrail, Event
from scp_node.engine.result import AnalysisResult
from scp_node.scheduler.analysis import AnalysisQueue, requeue_failed, requeue_interrupted
from scp_node.scheduler.completion import SeriesCompletion
from scp_node.store.db import Database
from scp_node.store.models import AnalysisJob, AuditEvent, ExportJob, ExportState, JobState, Report
from tests.scheduler.fakes import (DESTINATIONS, FakeEngine, FakeWriter, Interrupted, SkipSeries, after_quiet,
                                   build_report)
from tests.store.realdata import CT_PATIENT_ID, CT_SLICES

STABLE = 10.0


@pytest.fixture
def complete_series(index_db: Database, audit_trail: AuditTrail, ingest_ct):  # type: ignore[no-untyped-def]
    """Three real CT slices, closed by the completion rule: one PENDING job for version 1."""
    ingest_ct(0, 1, 2)
    SeriesCompletion(index_db, audit_trail, STABLE, 3600).run_once(now=after_quiet(index_db, STABLE))


def make_queue(db: Database, audit: AuditTrail, storage: Path, engine: FakeEngine,
               writer: FakeWriter | None = None, max_attempts: int = 3, builder=build_report,
               destinations=DESTINATIONS) -> AnalysisQueue:  # type: ignore[no-untyped-def]
    return AnalysisQueue(db, audit, storage, engine, builder, writer or FakeWriter(), destinations,
                         max_attempts=max_attempts, skip_exceptions=(SkipSeries,))


def the_job(db: Database) -> AnalysisJob:
    with db.session() as s:
        job = s.scalars(select(AnalysisJob).order_by(AnalysisJob.id)).all()[-1]
        s.expunge(job)
        return job


def events(db: Database, name: str | None = None) -> list[AuditEvent]:
    with db.session() as s:
        q = select(AuditEvent).order_by(AuditEvent.id)
        return list(s.scalars(q.where(AuditEvent.event == name) if name else q))


def test_done_creates_report_exports_and_audit(index_db: Database, audit_trail: AuditTrail, storage_dir: Path,
                                               complete_series: None) -> None:
    engine, writer = FakeEngine(), FakeWriter()
    queue = make_queue(index_db, audit_trail, storage_dir, engine, writer)

    assert queue.run_once() is True

    # the engine saw every stored file, in InstanceNumber order
    (paths,) = engine.calls
    assert len(paths) == 3 and all(p.is_file() and p.is_relative_to(storage_dir) for p in paths)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert numbers == sorted(numbers)
    assert sorted(p.read_bytes() for p in paths) == sorted(p.read_bytes() for p in CT_SLICES[:3])

    job = the_job(index_db)
    assert (job.state, job.attempts, job.error) == (JobState.DONE, 1, "")
    assert job.started_at is not None and job.finished_at is not None
    with index_db.session() as s:
        report = s.scalars(select(Report)).one()
        assert report.job_fk == job.id
        assert report.model_name == "fake model" and report.is_test_model is True
        assert report.findings_text == "No acute findings."
        assert report.path == f"{report.study_instance_uid}/{report.series_instance_uid}/{report.sop_instance_uid}.dcm"
        assert writer.written == [storage_dir / report.path] and (storage_dir / report.path).is_file()
        exports = s.scalars(select(ExportJob).order_by(ExportJob.id)).all()
        assert [(e.destination, e.state, e.attempts, e.report_fk) for e in exports] == [
            ("pacs", ExportState.PENDING, 0, report.id), ("archive", ExportState.PENDING, 0, report.id)]
    names = [e.event for e in events(index_db)]
    assert names[-3:] == [Event.ANALYSIS_STARTED, Event.ANALYSIS_FINISHED, Event.SR_CREATED]
    finished = events(index_db, Event.ANALYSIS_FINISHED)[0]
    assert "3 images" in finished.detail and "TEST MODEL" in finished.detail
    assert "pacs, archive" in events(index_db, Event.SR_CREATED)[0].detail

    assert queue.run_once() is False  # nothing left
    assert len(engine.calls) == 1


def test_failure_is_retried_then_failed_after_max_attempts(index_db: Database, audit_trail: AuditTrail,
                                                           storage_dir: Path, complete_series: None) -> None:
    engine = FakeEngine(failures=[RuntimeError("CUDA out of memory")] * 3)
    queue = make_queue(index_db, audit_trail, storage_dir, engine, max_attempts=3)

    for attempt in (1, 2):
        assert queue.run_once() is True
        job = the_job(index_db)
        assert (job.state, job.attempts) == (JobState.PENDING, attempt)
        assert job.error == "RuntimeError: CUDA out of memory"
        assert job.finished_at is None
    assert queue.run_once() is True
    job = the_job(index_db)
    assert (job.state, job.attempts) == (JobState.FAILED, 3)
    assert job.finished_at is not None
    assert queue.run_once() is False  # a failed job is not picked up again

    failed = events(index_db, Event.ANALYSIS_FAILED)
    assert [e.outcome for e in failed] == ["failure"] * 3
    assert "attempt 1 of 3" in failed[0].detail and failed[2].detail.endswith("(final)")
    with index_db.session() as s:
        assert s.scalars(select(Report)).all() == [] and s.scalars(select(ExportJob)).all() == []

    # admin requeue gives fresh attempts
    assert requeue_failed(index_db, audit_trail) == 1
    assert (the_job(index_db).state, the_job(index_db).attempts) == (JobState.PENDING, 0)
    assert queue.run_once() is True and the_job(index_db).state is JobState.DONE


def test_a_failure_then_success(index_db: Database, audit_trail: AuditTrail, storage_dir: Path,
                                complete_series: None) -> None:
    engine = FakeEngine(failures=[OSError("disk hiccup")])
    queue = make_queue(index_db, audit_trail, storage_dir, engine)
    queue.run_once()
    queue.run_once()
    job = the_job(index_db)
    assert (job.state, job.attempts, job.error) == (JobState.DONE, 2, "")


def test_skip_exception_skips_with_the_reason(index_db: Database, audit_trail: AuditTrail, storage_dir: Path,
                                              complete_series: None) -> None:
    engine = FakeEngine(failures=[SkipSeries("no axial images in this series")])
    queue = make_queue(index_db, audit_trail, storage_dir, engine)
    assert queue.run_once() is True
    job = the_job(index_db)
    assert (job.state, job.attempts) == (JobState.SKIPPED, 1)
    assert job.error == "no axial images in this series" and job.finished_at is not None
    (skipped,) = events(index_db, Event.ANALYSIS_SKIPPED)
    assert skipped.outcome == "warning" and "no axial images" in skipped.detail
    assert queue.run_once() is False and len(engine.calls) == 1


def test_failing_report_builder_counts_as_a_failure(index_db: Database, audit_trail: AuditTrail,
                                                    storage_dir: Path, complete_series: None) -> None:
    def broken_builder(evidence: list[Dataset], result: AnalysisResult) -> Dataset:
        raise ValueError("missing Study Date")

    queue = make_queue(index_db, audit_trail, storage_dir, FakeEngine(), builder=broken_builder)
    queue.run_once()
    job = the_job(index_db)
    assert (job.state, job.error) == (JobState.PENDING, "ValueError: missing Study Date")


def test_failure_while_recording_the_report_does_not_leave_the_job_running(
        index_db: Database, audit_trail: AuditTrail, storage_dir: Path, complete_series: None) -> None:
    with index_db.session() as s:
        s.execute(text("CREATE TRIGGER no_reports BEFORE INSERT ON reports BEGIN SELECT RAISE(ABORT, 'x'); END"))
    queue = make_queue(index_db, audit_trail, storage_dir, FakeEngine(), max_attempts=2)
    assert queue.run_once() is True
    job = the_job(index_db)
    assert job.state is JobState.PENDING and job.error.startswith("IntegrityError")
    queue.run_once()
    assert the_job(index_db).state is JobState.FAILED
    with index_db.session() as s:
        assert s.scalars(select(ExportJob)).all() == []


def test_interrupted_job_is_requeued_exactly_once(index_db: Database, audit_trail: AuditTrail,
                                                  storage_dir: Path, complete_series: None) -> None:
    engine = FakeEngine(failures=[Interrupted()])
    queue = make_queue(index_db, audit_trail, storage_dir, engine)
    with pytest.raises(Interrupted):
        queue.run_once()
    assert (the_job(index_db).state, the_job(index_db).attempts) == (JobState.RUNNING, 1)
    assert queue.run_once() is False  # a RUNNING job is not claimed twice

    assert requeue_interrupted(index_db, audit_trail) == 1
    assert the_job(index_db).state is JobState.PENDING
    assert requeue_interrupted(index_db, audit_trail) == 0
    (requeued,) = events(index_db, Event.ANALYSIS_REQUEUED)
    assert "interrupted on attempt 1" in requeued.detail

    assert queue.run_once() is True
    job = the_job(index_db)
    assert (job.state, job.attempts) == (JobState.DONE, 2)
    with index_db.session() as s:
        assert len(s.scalars(select(Report)).all()) == 1


def test_superseded_version_is_skipped_and_the_new_one_runs(index_db: Database, audit_trail: AuditTrail,
                                                             storage_dir: Path, ingest_ct,
                                                             complete_series: None) -> None:
    ingest_ct(3)  # late arrival: version 2 collecting, job v1 now covers too little
    engine = FakeEngine()
    queue = make_queue(index_db, audit_trail, storage_dir, engine)

    assert queue.run_once() is False  # v1 skipped; v2 not complete yet: nothing to run
    with index_db.session() as s:
        (v1,) = s.scalars(select(AnalysisJob)).all()
        assert v1.state is JobState.SKIPPED and v1.error == "superseded by series version 2"
        assert v1.attempts == 0
    assert engine.calls == []
    (skip,) = events(index_db, Event.ANALYSIS_SKIPPED)
    assert "superseded" in skip.detail

    SeriesCompletion(index_db, audit_trail, STABLE, 3600).run_once(now=after_quiet(index_db, STABLE))
    assert queue.run_once() is True
    job = the_job(index_db)
    assert (job.series_version, job.state) == (2, JobState.DONE)
    assert len(engine.calls[0]) == 4


def test_superseded_job_does_not_hide_the_next_pending_job(index_db: Database, audit_trail: AuditTrail,
                                                           storage_dir: Path, ingest_ct,
                                                           complete_series: None) -> None:
    ingest_ct(3)
    SeriesCompletion(index_db, audit_trail, STABLE, 3600).run_once(now=after_quiet(index_db, STABLE))
    engine = FakeEngine()
    queue = make_queue(index_db, audit_trail, storage_dir, engine)

    assert queue.run_once() is True  # skips v1 and runs v2 in the same call
    with index_db.session() as s:
        states = [(j.series_version, j.state) for j in s.scalars(select(AnalysisJob).order_by(AnalysisJob.id))]
    assert states == [(1, JobState.SKIPPED), (2, JobState.DONE)]
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 4


def test_whole_path_audit_has_no_clear_patient_id(index_db: Database, audit_trail: AuditTrail,
                                                  storage_dir: Path, complete_series: None) -> None:
    queue = make_queue(index_db, audit_trail, storage_dir, FakeEngine(failures=[RuntimeError("x")]))
    queue.run_once()
    queue.run_once()
    with index_db.session() as s:
        cells = [str(v) for row in s.execute(text("SELECT * FROM audit_events")).all() for v in row]
    assert len(cells) > 20
    assert not [c for c in cells if CT_PATIENT_ID in c]
    hashed = {e.patient_hash for e in events(index_db) if e.event.startswith(("analysis", "sr", "series"))}
    assert hashed == {audit_trail.patient_hash(CT_PATIENT_ID)}


def test_routing_rule_sends_only_to_destinations_that_want_the_modality(
        index_db: Database, audit_trail: AuditTrail, storage_dir: Path, complete_series: None) -> None:
    from scp_node.config import Destination

    dests = (Destination("ct-reading", "CTPACS", "127.0.0.1", 104, modalities=("CT",)),
             Destination("cxr-only", "CRPACS", "127.0.0.1", 104, modalities=("CR", "DX")),
             Destination("archive", "ARCH", "127.0.0.1", 104))
    queue = make_queue(index_db, audit_trail, storage_dir, FakeEngine(), destinations=dests)
    assert queue.run_once() is True
    with index_db.session() as s:
        assert sorted(e.destination for e in s.scalars(select(ExportJob))) == ["archive", "ct-reading"]
        report = s.scalars(select(Report)).one()
        assert report.structured_json == ""  # the fake engine gives free text only
    assert "ct-reading, archive" in events(index_db, Event.SR_CREATED)[0].detail


def test_a_job_interrupted_on_its_last_attempt_fails_instead_of_crash_looping(
        index_db: Database, audit_trail: AuditTrail, storage_dir: Path, complete_series: None) -> None:
    engine = FakeEngine(failures=[Interrupted(), Interrupted(), Interrupted()])
    queue = make_queue(index_db, audit_trail, storage_dir, engine, max_attempts=3)
    for _ in range(3):
        with pytest.raises(Interrupted):
            queue.run_once()
        assert requeue_interrupted(index_db, audit_trail, max_attempts=3) == (1 if len(engine.calls) < 3 else 0)
    job = the_job(index_db)
    assert job.state is JobState.FAILED and "interrupted 3 times" in job.error
    assert queue.run_once() is False
