"""Claims between workers: two queues (two node names, two database engines, threads) racing over
one real index -- SQLite (BEGIN IMMEDIATE) and PostgreSQL (FOR UPDATE SKIP LOCKED) -- and the
leases: a lapsed claim is queued again, and the late finish of its worker records nothing twice.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from scp_node.audit import AuditTrail, Event, load_or_create_secret
from scp_node.config import ExportConfig
from scp_node.engine.result import AnalysisResult
from scp_node.scheduler.analysis import AnalysisQueue, requeue_interrupted
from scp_node.scheduler.completion import SeriesCompletion
from scp_node.scheduler.exports import ExportQueue
from scp_node.scheduler.exports import requeue_interrupted as requeue_exports
from scp_node.scheduler.fleet import FleetMember, requeue_expired
from scp_node.store.db import Database
from scp_node.store.models import (AnalysisJob, AuditEvent, ExportJob, ExportState, JobState, Patient, Report,
                                   Series, SeriesState, Study, utcnow)
from tests.scheduler.fakes import DESTINATIONS, MODEL, FakeWriter

N_JOBS = 40


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def databases(db_url: str) -> Iterator[Callable[[], Database]]:
    """Opens one Database (its own engine and pool) per worker, as separate processes would."""
    opened: list[Database] = []

    def _open() -> Database:
        opened.append(Database(db_url))
        return opened[-1]

    yield _open
    for db in opened:
        db.dispose()


@pytest.fixture
def secret(tmp_path: Path) -> bytes:
    return load_or_create_secret(tmp_path / "audit.key")


class SlowEngine:
    """A CT result after a short sleep, so that the workers' claims interleave."""

    def __init__(self, seconds: float = 0.005) -> None:
        self.seconds = seconds
        self.calls = 0

    def analyse_series(self, paths: list[Path]) -> AnalysisResult:
        self.calls += 1
        time.sleep(self.seconds)
        return AnalysisResult(modality="CT", findings_text="No acute findings.", model=MODEL, sources=[],
                              generated_tokens=3)


def build_report(evidence: list[Dataset], result: AnalysisResult) -> Dataset:
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.SOPInstanceUID, sr.SeriesInstanceUID, sr.StudyInstanceUID = generate_uid(), generate_uid(), generate_uid()
    sr.TextValue = result.findings_text
    return sr


def make_series(db: Database, n: int, state: SeriesState = SeriesState.COMPLETE, jobs: bool = True) -> None:
    """``n`` series of one study; with ``jobs``, one PENDING analysis job each."""
    with db.session() as s:
        study = Study(study_instance_uid=generate_uid(), patient=Patient(patient_id="CLAIMS-1"))
        s.add(study)
        for _ in range(n):
            series = Series(series_instance_uid=generate_uid(), study=study, modality="CT", state=state)
            s.add(series)
            if jobs:
                s.add(AnalysisJob(series=series, series_version=1))


def queue(db: Database, secret: bytes, storage: Path, worker: str, engine: Any = None,
          lease: float = 120.0) -> AnalysisQueue:
    return AnalysisQueue(db, AuditTrail(db, secret), storage, engine or SlowEngine(), build_report, FakeWriter(),
                         DESTINATIONS, worker=worker, lease_seconds=lease)


def count_events(db: Database, name: str, like: str = "") -> int:
    with db.session() as s:
        q = select(func.count()).select_from(AuditEvent).where(AuditEvent.event == name)
        if like:
            q = q.where(AuditEvent.detail.contains(like))
        return int(s.scalar(q) or 0)


def race(*loops: Callable[[], bool]) -> None:
    """Run each ``run_once`` in its own thread until it finds nothing; re-raise any error."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(loops))

    def drain(run_once: Callable[[], bool]) -> None:
        try:
            start.wait()
            while run_once():
                pass
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(f,)) for f in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_two_workers_claim_each_analysis_job_once(databases: Callable[[], Database], secret: bytes,
                                                   tmp_path: Path) -> None:
    db1, db2 = databases(), databases()
    make_series(db1, N_JOBS)
    e1, e2 = SlowEngine(), SlowEngine()
    q1 = queue(db1, secret, tmp_path / "storage", "host-a:1:worker", e1)
    q2 = queue(db2, secret, tmp_path / "storage", "host-b:2:worker", e2)

    race(q1.run_once, q2.run_once)

    with db1.session() as s:
        jobs = s.scalars(select(AnalysisJob)).all()
        assert len(jobs) == N_JOBS and all(j.state is JobState.DONE and j.attempts == 1 for j in jobs)
        by = Counter(j.claimed_by for j in jobs)
        assert set(by) == {"host-a:1:worker", "host-b:2:worker"}, by  # both took part
        assert all(j.lease_until is None for j in jobs)  # a finished job holds no lease
        assert int(s.scalar(select(func.count()).select_from(Report))) == N_JOBS
        assert len(set(s.scalars(select(Report.job_fk)))) == N_JOBS
        assert int(s.scalar(select(func.count()).select_from(ExportJob))) == N_JOBS * len(DESTINATIONS)
    assert e1.calls + e2.calls == N_JOBS
    assert by["host-a:1:worker"] == e1.calls and by["host-b:2:worker"] == e2.calls
    assert count_events(db1, Event.ANALYSIS_STARTED) == N_JOBS
    assert count_events(db1, Event.ANALYSIS_FINISHED) == N_JOBS


def test_two_workers_send_each_export_once(databases: Callable[[], Database], secret: bytes,
                                           tmp_path: Path) -> None:
    db1, db2 = databases(), databases()
    make_series(db1, N_JOBS // 2)
    storage = tmp_path / "storage"
    race(queue(db1, secret, storage, "a:1:worker", SlowEngine(0)).run_once)
    sent: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def sender(worker: str) -> Callable[[Any, Path], None]:
        def send(dest: Any, path: Path) -> None:
            assert path.is_file()
            time.sleep(0.003)
            with lock:
                sent.append((worker, dest.name, path.name))
        return send

    policy = ExportConfig()
    x1 = ExportQueue(db1, AuditTrail(db1, secret), storage, DESTINATIONS, policy, sender("a"), worker="a:1:worker")
    x2 = ExportQueue(db2, AuditTrail(db2, secret), storage, DESTINATIONS, policy, sender("b"), worker="b:2:worker")

    race(x1.run_once, x2.run_once)

    expected = N_JOBS // 2 * len(DESTINATIONS)
    assert len(sent) == expected and len({(d, p) for _, d, p in sent}) == expected  # none twice
    assert {w for w, _, _ in sent} == {"a", "b"}
    with db1.session() as s:
        exports = s.scalars(select(ExportJob)).all()
        assert all(e.state is ExportState.DONE and e.attempts == 1 for e in exports)
    assert count_events(db1, Event.EXPORT_OK) == expected


def test_two_workers_close_each_series_once(databases: Callable[[], Database], secret: bytes) -> None:
    db1, db2 = databases(), databases()
    make_series(db1, N_JOBS, state=SeriesState.RECEIVING, jobs=False)
    later = utcnow() + timedelta(seconds=120)
    closed: list[int] = []

    def closer(db: Database) -> Callable[[], bool]:
        completion = SeriesCompletion(db, AuditTrail(db, secret), 10, 3600)

        def once() -> bool:
            closed.append(completion.run_once(now=later))
            return False
        return once

    for _ in range(3):  # a few rounds: the second finds nothing left to close
        race(closer(db1), closer(db2))
    assert sum(closed) == N_JOBS
    with db1.session() as s:
        assert int(s.scalar(select(func.count()).select_from(AnalysisJob))) == N_JOBS
    assert count_events(db1, Event.SERIES_COMPLETE) == N_JOBS


def test_a_lapsed_claim_is_queued_again_and_its_late_finish_records_nothing(
        databases: Callable[[], Database], secret: bytes, tmp_path: Path) -> None:
    db = databases()
    audit = AuditTrail(db, secret)
    make_series(db, 1)
    storage = tmp_path / "storage"
    slow = queue(db, secret, storage, "a:1:worker", lease=30)
    claim = slow._claim()  # worker A took the job ... and then stalls (its heartbeat stops)
    assert claim is not None
    with db.session() as s:
        job = s.scalars(select(AnalysisJob)).one()
        assert (job.state, job.claimed_by) == (JobState.RUNNING, "a:1:worker")
        assert job.lease_until is not None and job.lease_until > utcnow() + timedelta(seconds=25)

    assert requeue_expired(db, audit, 3) == (0, 0)  # the lease still holds
    assert requeue_expired(db, audit, 3, now=utcnow() + timedelta(seconds=31)) == (1, 0)
    with db.session() as s:
        job = s.scalars(select(AnalysisJob)).one()
        assert (job.state, job.claimed_by, job.lease_until) == (JobState.PENDING, "", None)
    assert count_events(db, Event.ANALYSIS_REQUEUED, "claim expired: worker a:1:worker stopped renewing") == 1

    other = queue(databases(), secret, storage, "b:2:worker")
    assert other.run_once() is True  # worker B runs it
    # A wakes up and finishes its attempt: nothing is recorded, its SR file is not kept.
    result = SlowEngine(0).analyse_series([])
    slow._complete(claim, result, time.monotonic())
    with db.session() as s:
        (report,) = s.scalars(select(Report)).all()
        job = s.scalars(select(AnalysisJob)).one()
        assert (job.state, job.claimed_by, job.attempts) == (JobState.DONE, "b:2:worker", 2)
        assert int(s.scalar(select(func.count()).select_from(ExportJob))) == len(DESTINATIONS)
    assert count_events(db, Event.ANALYSIS_FINISHED) == 1
    assert count_events(db, Event.ANALYSIS_SKIPPED, "claim lost by worker a:1:worker") == 1
    srs = sorted(p for p in storage.rglob("*.dcm"))
    assert srs == [storage / report.path]  # worker A's SR was discarded


def test_a_late_failure_after_losing_the_claim_changes_nothing(databases: Callable[[], Database], secret: bytes,
                                                                tmp_path: Path) -> None:
    db = databases()
    make_series(db, 1)
    a = queue(db, secret, tmp_path / "storage", "a:1:worker")
    claim = a._claim()
    assert claim is not None
    requeue_expired(db, AuditTrail(db, secret), 3, now=utcnow() + timedelta(seconds=500))
    b = queue(db, secret, tmp_path / "storage", "b:2:worker")
    b_claim = b._claim()  # B holds it now
    assert b_claim is not None
    a._complete(claim, RuntimeError("engine crashed"), time.monotonic())
    with db.session() as s:
        job = s.scalars(select(AnalysisJob)).one()
        assert (job.state, job.claimed_by, job.error) == (JobState.RUNNING, "b:2:worker", "")
    assert count_events(db, Event.ANALYSIS_FAILED) == 0
    b._complete(b_claim, SlowEngine(0).analyse_series([]), time.monotonic())
    with db.session() as s:
        assert s.scalars(select(AnalysisJob)).one().state is JobState.DONE
        assert len(s.scalars(select(Report)).all()) == 1


def test_a_job_whose_workers_keep_dying_ends_failed(databases: Callable[[], Database], secret: bytes,
                                                    tmp_path: Path) -> None:
    db = databases()
    audit = AuditTrail(db, secret)
    make_series(db, 1)
    for i in range(3):
        q = queue(db, secret, tmp_path / "storage", f"w:{i}:worker")
        assert q._claim() is not None  # ... and the worker dies
        requeue_expired(db, audit, 3, now=utcnow() + timedelta(seconds=500))
    with db.session() as s:
        job = s.scalars(select(AnalysisJob)).one()
        assert (job.state, job.attempts) == (JobState.FAILED, 3)
        assert "interrupted 3 times" in job.error
    assert count_events(db, Event.ANALYSIS_REQUEUED) == 2
    assert count_events(db, Event.ANALYSIS_FAILED, "claim expired: worker w:2:worker") == 1


def test_the_heartbeat_renews_only_its_own_claims(databases: Callable[[], Database], secret: bytes,
                                                  tmp_path: Path) -> None:
    db = databases()
    audit = AuditTrail(db, secret)
    make_series(db, 2)
    qa = queue(db, secret, tmp_path / "storage", "a:1:worker", lease=20)
    qb = queue(db, secret, tmp_path / "storage", "b:2:worker", lease=20)
    assert qa._claim() is not None and qb._claim() is not None
    a = FleetMember(db, "a:1:worker", "worker", "SCPNODE", "test", lease_seconds=60)
    a.register()
    assert a.beat() == 1  # A's one running job: its lease now runs 60 s from now
    assert requeue_expired(db, audit, 3, now=utcnow() + timedelta(seconds=40)) == (1, 0)  # only B's lapsed
    with db.session() as s:
        states = {j.claimed_by or "-": j.state for j in s.scalars(select(AnalysisJob))}
    assert states == {"a:1:worker": JobState.RUNNING, "-": JobState.PENDING}


def test_a_starting_worker_on_a_shared_index_takes_back_only_what_nobody_holds(
        databases: Callable[[], Database], secret: bytes, tmp_path: Path) -> None:
    db = databases()
    audit = AuditTrail(db, secret)
    make_series(db, 3)
    live = queue(db, secret, tmp_path / "storage", "live:1:worker")
    dead = queue(db, secret, tmp_path / "storage", "dead:2:worker", lease=10)
    assert live._claim() is not None and dead._claim() is not None
    legacy = queue(db, secret, tmp_path / "storage", "")  # a claim written before claims had names
    assert legacy._claim() is not None
    with db.session() as s:  # the dead worker's lease ran out a while ago
        job = s.scalars(select(AnalysisJob).where(AnalysisJob.claimed_by == "dead:2:worker")).one()
        job.lease_until = utcnow() - timedelta(seconds=5)

    assert requeue_interrupted(db, audit, 3, shared=True) == 2  # the dead one's and the legacy one
    with db.session() as s:
        running = s.scalars(select(AnalysisJob).where(AnalysisJob.state == JobState.RUNNING)).all()
        assert [j.claimed_by for j in running] == ["live:1:worker"]
    assert requeue_interrupted(db, audit, 3) == 1  # a single node (SQLite): everything RUNNING


def test_export_claims_lapse_and_a_late_delivery_is_recorded_once(databases: Callable[[], Database],
                                                                  secret: bytes, tmp_path: Path) -> None:
    db = databases()
    audit = AuditTrail(db, secret)
    make_series(db, 1)
    storage = tmp_path / "storage"
    assert queue(db, secret, storage, "a:1:worker", SlowEngine(0)).run_once()
    sent: list[str] = []
    pacs_only = DESTINATIONS[:1]
    with db.session() as s:  # one destination is enough here
        for e in s.scalars(select(ExportJob).where(ExportJob.destination != pacs_only[0].name)):
            e.state = ExportState.DONE

    def q(worker: str) -> ExportQueue:
        return ExportQueue(db, audit, storage, DESTINATIONS, ExportConfig(), lambda d, p: sent.append(worker),
                           worker=worker, lease_seconds=15)

    a, b = q("a:1:worker"), q("b:2:worker")
    claim_a = a._claim()
    assert claim_a is not None
    assert requeue_expired(db, audit, 3, now=utcnow() + timedelta(seconds=16)) == (0, 1)
    assert count_events(db, Event.EXPORT_REQUEUED, "claim expired: worker a:1:worker") == 1
    claim_b = b._claim()  # B sends it again ...
    assert claim_b is not None
    a._delivered(claim_a)  # ... while A's late delivery comes in: not recorded (B holds it)
    b._delivered(claim_b)
    assert count_events(db, Event.EXPORT_OK) == 1
    assert count_events(db, Event.EXPORT_FAILED, "claim lost by worker a:1:worker") == 1

    # A lapsed claim that nobody took again: the late delivery settles it (no needless resend).
    with db.session() as s:
        e = s.scalars(select(ExportJob).where(ExportJob.destination == pacs_only[0].name)).one()
        e.state, e.claimed_by = ExportState.PENDING, ""
    claim_a = a._claim()
    assert claim_a is not None
    assert requeue_exports(db, audit, shared=True, now=utcnow() + timedelta(seconds=16)) == 1
    a._delivered(claim_a)
    with db.session() as s:
        e = s.scalars(select(ExportJob).where(ExportJob.destination == pacs_only[0].name)).one()
        assert e.state is ExportState.DONE
    assert count_events(db, Event.EXPORT_OK) == 2
