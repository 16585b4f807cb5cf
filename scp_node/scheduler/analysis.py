"""The analysis queue: pending -> running -> done / failed / skipped, kept in the DB.

A job is claimed in one transaction (state RUNNING, attempts + 1, ``claimed_by`` this worker,
``lease_until`` now + the lease) and finished in another that also stores the report row and
queues one export per destination, so the SR a job produces is either fully recorded and queued,
or not at all.  On PostgreSQL the claim is ``SELECT ... FOR UPDATE SKIP LOCKED``: workers on
several machines never take the same job; on SQLite (one node) ``BEGIN IMMEDIATE`` serialises.
A finish is recorded only while this worker still holds the claim: a worker whose lease lapsed
(scheduler.fleet requeued the job, another worker may run it) records nothing and audits why.
Jobs found RUNNING at start were interrupted by a stop: :func:`requeue_interrupted` puts them back
to PENDING so each runs again exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import pydicom
from pydicom.dataset import Dataset
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from ..audit import AuditTrail, Event
from ..config import Destination
from ..engine.result import AnalysisResult, Comparison, ModelIdentity, PriorStudy, SourceImageRef
from ..store.db import Database
from ..store.files import instance_path
from ..store.models import (AnalysisJob, ExportJob, ExportState, Instance, JobState, Report, Series,
                            utcnow)

log = logging.getLogger(__name__)

#: Error text of a job whose series the engine could not analyse (``scp-node status`` lists them).
NOT_ANALYSED_PREFIX = "not analysed: "


class SeriesAnalyser(Protocol):
    """What the queue needs from the engine."""

    def analyse_series(self, paths: list[Path]) -> AnalysisResult: ...


class PriorFinder(Protocol):
    """What the queue needs to compare a series with the patient's prior (scheduler.priors)."""

    def find(self, job_id: int, series_uid: str) -> tuple[PriorStudy | None, Comparison]:
        """The prior to give the engine (None: none), and what the report says about it."""
        ...


#: Builds the SR dataset from the source headers and the engine's result.
ReportBuilder = Callable[[list[Dataset], AnalysisResult], Dataset]
#: Writes an SR dataset durably to a path (and checks it reads back), plus whatever goes beside it
#: (the JSON findings sidecar); gets the result for that.
ReportWriter = Callable[[Dataset, Path, AnalysisResult], object]


@dataclass
class _Claim:
    job_id: int
    series_uid: str
    study_uid: str
    patient_id: str
    version: int
    attempts: int
    paths: list[Path]


def requeue_interrupted(db: Database, audit: AuditTrail, max_attempts: int | None = None, *,
                        shared: bool = False, now: datetime | None = None, dead: Sequence[str] = ()) -> int:
    """Put jobs left RUNNING by a stop back to PENDING; return how many were queued again.

    A job that was interrupted on its last allowed attempt is FAILED instead: a series that
    kills the process (out of memory, a crashing decoder) must not crash-loop the node forever
    and hold up every series behind it.

    ``shared`` (an index other workers use): only the jobs nobody can still be working on --
    no claimant (written before claims existed), a lapsed lease, or a claimant in ``dead`` (a
    process of this host that no longer exists: scheduler.fleet.dead_claimants_here).  A job
    another live worker holds is not this starting worker's to take.
    """
    requeued = 0
    with db.session() as session:
        q = select(AnalysisJob).where(AnalysisJob.state == JobState.RUNNING)
        if shared:
            q = q.where(or_(AnalysisJob.claimed_by == "", AnalysisJob.lease_until.is_(None),
                            AnalysisJob.lease_until < (now or utcnow()), AnalysisJob.claimed_by.in_(list(dead))))
        for job in session.scalars(q.with_for_update(skip_locked=True, of=AnalysisJob)).all():
            requeued += requeue_job(session, audit, job, max_attempts,
                                    f"job {job.id} was interrupted on attempt {job.attempts}; queued again")
    return requeued


def requeue_job(session: Session, audit: AuditTrail, job: AnalysisJob, max_attempts: int | None,
                why: str) -> int:
    """One RUNNING job back to PENDING (1), or FAILED at its last attempt (0); audited."""
    ids = dict(series_uid=job.series.series_instance_uid, study_uid=job.series.study.study_instance_uid)
    job.claimed_by = ""
    job.lease_until = None
    if max_attempts is not None and job.attempts >= max_attempts:
        job.state = JobState.FAILED
        job.error = f"interrupted {job.attempts} times (the process stopped during the analysis)"
        job.finished_at = utcnow()
        audit.add(session, Event.ANALYSIS_FAILED, outcome="failure", detail=f"job {job.id}: {job.error}; {why}",
                  **ids)
        return 0
    job.state = JobState.PENDING
    audit.add(session, Event.ANALYSIS_REQUEUED, detail=why, **ids)
    return 1


class AnalysisQueue:
    """Runs pending analysis jobs one at a time through the engine, the report builder and writer."""

    def __init__(self, db: Database, audit: AuditTrail, storage_dir: Path, engine: SeriesAnalyser,
                 build_report: ReportBuilder, write_report: ReportWriter,
                 destinations: tuple[Destination, ...], max_attempts: int = 3,
                 skip_exceptions: tuple[type[BaseException], ...] = (),
                 notify_not_analysed: bool = False, priors: PriorFinder | None = None,
                 worker: str = "", lease_seconds: float = 120.0) -> None:
        """``skip_exceptions``: what the engine raises for a series it does not analyse. One whose
        ``notify`` attribute is true (scp_node.engine.SeriesNotAnalysed: images it cannot read) is
        recorded as "not analysed: <reason>" (audit, ``scp-node status``) and, with
        ``notify_not_analysed`` ([report] notify_not_analysed), gets a short SR that says so.
        ``worker``: this node's name in the fleet (scheduler.fleet.node_name), written into each
        claim with a lease of ``lease_seconds`` that the node's heartbeat renews."""
        self.db = db
        self.audit = audit
        self.storage_dir = storage_dir
        self.engine = engine
        self.build_report = build_report
        self.write_report = write_report
        self.destinations = destinations
        self.max_attempts = max_attempts
        self.skip_exceptions = skip_exceptions
        self.notify_not_analysed = notify_not_analysed
        self.priors = priors
        self.worker = worker
        self.lease = timedelta(seconds=lease_seconds)

    def run_once(self) -> bool:
        """Claim and run pending jobs; return False when there was nothing to do.

        With an engine that has ``analyse_batch`` and ``max_batch`` > 1, up to ``max_batch`` jobs are
        claimed (each in its own transaction, as for one job) and analysed in one batched call; each
        job is then finished on its own, so one job's failure or skip never touches the others.
        """
        batch = max(1, int(getattr(self.engine, "max_batch", 1) or 1))
        analyse_batch = getattr(self.engine, "analyse_batch", None)
        if batch == 1 or analyse_batch is None:
            claim = self._claim()
            if claim is None:
                return False
            started = time.monotonic()
            prior, comparison = self._prior(claim)
            try:
                result: AnalysisResult | BaseException = (
                    self.engine.analyse_series(claim.paths, prior=prior) if prior is not None
                    else self.engine.analyse_series(claim.paths))
            except Exception as exc:  # noqa: BLE001 - finished below like a batched job's error
                result = exc
            self._complete(claim, _with_comparison(result, comparison), started)
            return True
        claims: list[_Claim] = []
        while len(claims) < batch:
            claim = self._claim()
            if claim is None:
                break
            claims.append(claim)
        if not claims:
            return False
        started = time.monotonic()
        found = [self._prior(c) for c in claims]
        priors = [p for p, _ in found]
        try:
            results = list(analyse_batch([c.paths for c in claims], priors=priors)
                           if any(p is not None for p in priors) else analyse_batch([c.paths for c in claims]))
            if len(results) != len(claims):
                raise RuntimeError(f"engine returned {len(results)} results for {len(claims)} jobs")
        except Exception as exc:  # noqa: BLE001 - the engine should not raise, but no job is lost if it does
            log.exception("batched analysis of %d jobs failed", len(claims))
            results = [exc] * len(claims)
        for claim, result, (_, comparison) in zip(claims, results, found):
            self._complete(claim, _with_comparison(result, comparison), started)
        return True

    def _prior(self, claim: _Claim) -> tuple[PriorStudy | None, Comparison | None]:
        """The prior for a claimed job (None, None when priors are off). A finder that fails
        costs the comparison, never the analysis."""
        if self.priors is None:
            return None, None
        try:
            return self.priors.find(claim.job_id, claim.series_uid)
        except Exception as exc:  # noqa: BLE001 - the analysis goes on without a prior
            log.exception("analysis job %d: looking for a prior failed", claim.job_id)
            return None, Comparison(status="unavailable", reason=f"prior lookup failed: {type(exc).__name__}")

    def _complete(self, claim: _Claim, result: AnalysisResult | BaseException, started: float) -> None:
        """Build, write and record the SR of one job, or record why it was skipped / failed."""
        ids = dict(study_uid=claim.study_uid, series_uid=claim.series_uid, patient_id=claim.patient_id)
        try:
            if isinstance(result, BaseException):
                raise result
            evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in claim.paths]
            sr = self.build_report(evidence, result)
            rel = instance_path(sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
            self.write_report(sr, self.storage_dir / rel, result)
        except self.skip_exceptions as exc:
            if getattr(exc, "notify", False):
                self._not_analysed(claim, exc, ids)
            else:
                self._finish(claim, JobState.SKIPPED, str(exc), Event.ANALYSIS_SKIPPED, ids, outcome="warning")
            return
        except Exception as exc:  # noqa: BLE001 - a failed job is recorded, never lost
            log.error("analysis job %d failed: %s: %s", claim.job_id, type(exc).__name__, exc,
                      exc_info=(type(exc), exc, exc.__traceback__))
            self._failed(claim, exc, ids)
            return
        try:
            self._done(claim, result, sr, rel, time.monotonic() - started, ids)
        except Exception as exc:  # noqa: BLE001 - else the job would stay RUNNING until a restart
            log.exception("analysis job %d: recording the report failed", claim.job_id)
            self._failed(claim, exc, ids)

    def _not_analysed(self, claim: _Claim, exc: BaseException, ids: dict[str, str]) -> None:
        """A series of images the engine cannot analyse: SKIPPED with "not analysed: <reason>" and,
        when configured, a short SR (same patient and study, new series) saying so and why."""
        reason = str(getattr(exc, "reason", "") or exc)
        error = f"{NOT_ANALYSED_PREFIX}{reason}"
        identity = getattr(self.engine, "identity", None)
        if not self.notify_not_analysed or not isinstance(identity, ModelIdentity):
            self._finish(claim, JobState.SKIPPED, error, Event.ANALYSIS_SKIPPED, ids, outcome="warning")
            return
        try:
            evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in claim.paths]
            result = AnalysisResult(
                modality=str(evidence[0].get("Modality", "") or ""), findings_text="", model=identity,
                sources=[SourceImageRef(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in evidence],
                prompt_profile="not-analysed", not_analysed=reason,
                language=str(getattr(self.engine, "language", "en") or "en"))
            sr = self.build_report(evidence, result)
            rel = instance_path(sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
            self.write_report(sr, self.storage_dir / rel, result)
            self._done(claim, result, sr, rel, 0.0, ids, not_analysed=error)
        except Exception as notice_error:  # noqa: BLE001 - the reason is recorded either way
            log.exception("analysis job %d: the 'not analysed' SR could not be made", claim.job_id)
            self._finish(claim, JobState.SKIPPED, f"{error} (no notice SR: {type(notice_error).__name__}: "
                         f"{notice_error})", Event.ANALYSIS_SKIPPED, ids, outcome="warning")

    def _failed(self, claim: _Claim, exc: BaseException, ids: dict[str, str]) -> None:
        final = claim.attempts >= self.max_attempts
        self._finish(claim, JobState.FAILED if final else JobState.PENDING,
                     f"{type(exc).__name__}: {exc}", Event.ANALYSIS_FAILED, ids, outcome="failure",
                     extra=" (final)" if final else f" (attempt {claim.attempts} of {self.max_attempts})")

    def _claim(self) -> _Claim | None:
        with self.db.session() as session:
            while True:
                job = session.scalars(select(AnalysisJob).where(AnalysisJob.state == JobState.PENDING)
                                      .order_by(AnalysisJob.id).limit(1)
                                      .with_for_update(skip_locked=True, of=AnalysisJob)).first()
                if job is None:
                    return None
                series: Series = job.series
                ids = dict(study_uid=series.study.study_instance_uid, series_uid=series.series_instance_uid,
                           patient_id=series.study.patient.patient_id)
                if series.version <= job.series_version:
                    break
                # Instances arrived after this job was queued: the newer version's job covers them.
                # Skip it and look at the next pending job (returning None here would tell the
                # caller "nothing to do" while other jobs wait).
                job.state = JobState.SKIPPED
                job.error = f"superseded by series version {series.version}"
                job.finished_at = utcnow()
                self.audit.add(session, Event.ANALYSIS_SKIPPED, outcome="warning", detail=job.error, **ids)
                session.flush()
            job.state = JobState.RUNNING
            job.attempts += 1
            job.started_at = utcnow()
            job.claimed_by = self.worker
            job.lease_until = job.started_at + self.lease
            rows = session.scalars(select(Instance).where(Instance.series_fk == series.id)
                                   .order_by(Instance.instance_number, Instance.id)).all()
            paths = [self.storage_dir / r.path for r in rows]
            self.audit.add(session, Event.ANALYSIS_STARTED,
                           detail=f"job {job.id}, attempt {job.attempts}, {len(paths)} instances", **ids)
            return _Claim(job.id, ids["series_uid"], ids["study_uid"], ids["patient_id"], job.series_version,
                          job.attempts, paths)

    def _finish(self, claim: _Claim, state: JobState, error: str, event: str, ids: dict[str, str],
                outcome: str, extra: str = "") -> None:
        with self.db.session() as session:
            job = self._held(session, claim, ids)
            if job is None:
                return
            job.state = state
            job.error = error[:4000]
            job.lease_until = None  # claimed_by stays on a finished job: who ran it
            if state is JobState.PENDING:
                job.claimed_by = ""
            if state is not JobState.PENDING:
                job.finished_at = utcnow()
            self.audit.add(session, event, outcome=outcome, detail=f"job {job.id}: {error[:500]}{extra}", **ids)

    def _held(self, session: Session, claim: _Claim, ids: dict[str, str]) -> AnalysisJob | None:
        """The job, locked, if this worker still holds its claim; else None (audited).

        A worker whose lease lapsed (stalled, cut off from the index) has had its job queued
        again and perhaps run by another worker: its result must not become a second report.
        """
        job = session.scalars(select(AnalysisJob).where(AnalysisJob.id == claim.job_id)
                              .with_for_update(of=AnalysisJob)).one()
        if job.state is JobState.RUNNING and job.claimed_by == self.worker and job.attempts == claim.attempts:
            return job
        holder = job.claimed_by or "nobody"
        log.warning("analysis job %d: the claim of this worker lapsed (now %s, held by %s); result discarded",
                    job.id, job.state.value, holder)
        self.audit.add(session, Event.ANALYSIS_SKIPPED, outcome="warning",
                       detail=f"job {job.id}: claim lost by worker {self.worker or '(unnamed)'} on attempt "
                              f"{claim.attempts} (job now {job.state.value}, held by {holder}); "
                              "its result was discarded", **ids)
        return None

    def _done(self, claim: _Claim, result: AnalysisResult, sr: Dataset, rel: Path, seconds: float,
              ids: dict[str, str], not_analysed: str = "") -> None:
        """Record the SR and queue its exports; ``not_analysed`` (the job's error text) marks a
        notice SR: the job is SKIPPED with that reason, not DONE."""
        with self.db.session() as session:
            job = self._held(session, claim, ids)
            if job is None:
                _discard(self.storage_dir / rel)
                return
            report = Report(job=job, sop_instance_uid=str(sr.SOPInstanceUID),
                            series_instance_uid=str(sr.SeriesInstanceUID),
                            study_instance_uid=str(sr.StudyInstanceUID), path=rel.as_posix(),
                            model_name=result.model.name[:128], is_test_model=result.model.is_test_model,
                            findings_text=result.findings_text or not_analysed,
                            structured_json=json.dumps(dataclasses.asdict(result.structured), ensure_ascii=False)
                            if result.structured is not None else "",
                            triage=result.structured.triage if result.structured is not None else "")
            session.add(report)
            routed = [d for d in self.destinations if d.wants(result.modality)]
            for dest in routed:
                session.add(ExportJob(report=report, destination=dest.name, state=ExportState.PENDING))
            job.state = JobState.SKIPPED if not_analysed else JobState.DONE
            job.error = not_analysed[:4000]
            job.lease_until = None
            job.finished_at = utcnow()
            if not_analysed:
                self.audit.add(session, Event.ANALYSIS_SKIPPED, outcome="warning",
                               detail=f"job {job.id}: {not_analysed[:500]}; a notice SR says so", **ids)
            else:
                self.audit.add(session, Event.ANALYSIS_FINISHED,
                               detail=f"job {job.id}: {result.modality}, {len(result.sources)} images, "
                                      f"{result.generated_tokens} tokens{_turns(result)}, {seconds:.1f} s, "
                                      f"model {result.model.name}"
                                      + (" (TEST MODEL)" if result.model.is_test_model else ""), **ids)
            self.audit.add(session, Event.SR_CREATED, sop_uid=str(sr.SOPInstanceUID),
                           detail=f"SR series {sr.SeriesInstanceUID}; exports queued: "
                                  + (", ".join(d.name for d in routed) or "none (no destination routes this modality)"),
                           study_uid=ids["study_uid"], series_uid=ids["series_uid"], patient_id=ids["patient_id"])


def _discard(path: Path) -> None:
    """The SR (and its sidecar) of a result that lost its claim: never indexed, never exported."""
    for p in (path, path.with_suffix(".json")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _with_comparison(result: AnalysisResult | BaseException,
                     comparison: Comparison | None) -> AnalysisResult | BaseException:
    """The queue's word on the prior goes on a result the engine did not already compare."""
    if isinstance(result, AnalysisResult) and result.comparison is None and comparison is not None:
        result.comparison = comparison
    return result


def _turns(result: AnalysisResult) -> str:
    """" (report 412 + extraction 96)" for a two-turn answer, else ""."""
    turns = getattr(result, "turns", None) or []
    if len(turns) < 2:
        return ""
    return " (" + " + ".join(f"{t.name} {t.new_tokens}" for t in turns) + ")"


def requeue_failed(db: Database, audit: AuditTrail) -> int:
    """Admin action: give every FAILED job a fresh set of attempts."""
    with db.session() as session:
        n = session.execute(update(AnalysisJob).where(AnalysisJob.state == JobState.FAILED)
                            .values(state=JobState.PENDING, attempts=0)).rowcount
        if n:
            audit.add(session, Event.ANALYSIS_REQUEUED, detail=f"{n} failed jobs queued again by an admin")
        return int(n or 0)
