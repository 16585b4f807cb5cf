"""Batched analysis: up to max_batch jobs claimed, one engine call, each job finished on its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from scp_node.audit import AuditTrail, Event
from scp_node.engine.result import AnalysisResult
from scp_node.scheduler.analysis import AnalysisQueue
from scp_node.scheduler.completion import SeriesCompletion
from scp_node.store.db import Database
from scp_node.store.ingest import Ingestor
from scp_node.store.models import AnalysisJob, AuditEvent, JobState, Report, Series
from tests.scheduler.fakes import DESTINATIONS, MODEL, FakeWriter, SkipSeries, build_report
from tests.store.realdata import CT_SLICES, CXR_DX_J2K, CXR_UNCR, ORIGIN, read_bytes


@dataclass
class BatchEngine:
    """Implements ``analyse_batch``: job k of each call gets ``outcomes[k]`` (a result or an exception)."""

    max_batch: int
    outcomes: list[str]
    calls: list[int] = field(default_factory=list)

    def analyse_series(self, paths: list[Path]) -> AnalysisResult:  # pragma: no cover - not used here
        raise AssertionError("a batching engine is called through analyse_batch")

    def analyse_batch(self, jobs: list[list[Path]]) -> list[AnalysisResult | BaseException]:
        self.calls.append(len(jobs))
        out: list[AnalysisResult | BaseException] = []
        for paths, outcome in zip(jobs, self.outcomes):
            if outcome == "skip":
                out.append(SkipSeries("localiser only"))
            elif outcome == "fail":
                out.append(RuntimeError("engine broke"))
            else:
                out.append(AnalysisResult(modality="CT", findings_text="ok", model=MODEL))
        return out


def _three_series(db: Database, audit: AuditTrail, ingestor: Ingestor) -> None:
    for path in (CT_SLICES[0], CXR_UNCR, CXR_DX_J2K):
        ingestor.ingest(read_bytes(path), ORIGIN)
    with db.session() as s:
        last = max(row.last_received_at for row in s.scalars(select(Series)))
    SeriesCompletion(db, audit, 10.0, 3600).run_once(now=last + timedelta(seconds=60))


def _states(db: Database) -> list[JobState]:
    with db.session() as s:
        return [j.state for j in s.scalars(select(AnalysisJob).order_by(AnalysisJob.id))]


def test_batch_claims_up_to_max_batch_and_finishes_each_job(index_db: Database, audit_trail: AuditTrail,
                                                            storage_dir: Path, ingestor: Ingestor) -> None:
    _three_series(index_db, audit_trail, ingestor)
    assert _states(index_db) == [JobState.PENDING] * 3
    engine = BatchEngine(max_batch=2, outcomes=["ok", "skip"])
    queue = AnalysisQueue(index_db, audit_trail, storage_dir, engine, build_report, FakeWriter(), DESTINATIONS,
                          max_attempts=2, skip_exceptions=(SkipSeries,))
    assert queue.run_once() is True
    assert engine.calls == [2]
    assert _states(index_db) == [JobState.DONE, JobState.SKIPPED, JobState.PENDING]

    engine.outcomes = ["fail"]
    assert queue.run_once() is True  # the third job fails: back to pending for its second attempt
    assert _states(index_db)[2] is JobState.PENDING
    assert queue.run_once() is True
    assert _states(index_db)[2] is JobState.FAILED
    assert queue.run_once() is False
    assert engine.calls == [2, 1, 1]
    with index_db.session() as s:
        assert len(s.scalars(select(Report)).all()) == 1
        skipped = s.scalars(select(AuditEvent).where(AuditEvent.event == Event.ANALYSIS_SKIPPED)).all()
        assert [e.detail.split(": ", 1)[1] for e in skipped] == ["localiser only"]


def test_engine_that_raises_for_the_whole_batch_loses_no_job(index_db: Database, audit_trail: AuditTrail,
                                                              storage_dir: Path, ingestor: Ingestor) -> None:
    _three_series(index_db, audit_trail, ingestor)

    class Broken(BatchEngine):
        def analyse_batch(self, jobs: list[list[Path]]) -> list[AnalysisResult | BaseException]:
            raise MemoryError("host out of memory")

    queue = AnalysisQueue(index_db, audit_trail, storage_dir, Broken(max_batch=4, outcomes=[]), build_report,
                          FakeWriter(), DESTINATIONS, max_attempts=3, skip_exceptions=(SkipSeries,))
    assert queue.run_once() is True
    assert _states(index_db) == [JobState.PENDING] * 3
    with index_db.session() as s:
        assert [j.attempts for j in s.scalars(select(AnalysisJob))] == [1, 1, 1]
