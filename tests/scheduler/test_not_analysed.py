"""Every series gets an answer: a series the engine cannot analyse is recorded as "not analysed"
(audit, ``scp-node status``) and, with ``[report] notify_not_analysed``, gets a short SR that says
why; a series with nothing to analyse stays silent. Real index, real highdicom SR, dciodvfy."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from scp_node.audit import AuditTrail, Event
from scp_node.engine.preprocess import SeriesNotAnalysed, SeriesSkipped
from scp_node.engine.result import AnalysisResult
from scp_node.report import ReportingNode, build_measurement_report, findings_json, read_report, write_report
from scp_node.report.text import REVIEW_STATEMENT, SERIES_DESCRIPTION_NOT_ANALYSED
from scp_node.scheduler.analysis import AnalysisQueue
from scp_node.scheduler.completion import SeriesCompletion
from scp_node.store.db import Database
from scp_node.store.models import AnalysisJob, AuditEvent, ExportJob, JobState, Report
from tests.report.tools import DCIODVFY_EXPECTED_WARNINGS, run_tool
from tests.scheduler.fakes import DESTINATIONS, MODEL, after_quiet

REASON = "colour images (YBR_FULL_422) are not supported for CT"


@dataclass
class RefusingEngine:
    """An engine whose every series raises the given exception (as MedGemmaEngine does)."""

    exc: BaseException
    identity = MODEL
    language = "en"
    calls: list[list[Path]] = field(default_factory=list)

    def analyse_series(self, paths: list[Path]) -> AnalysisResult:
        self.calls.append(list(paths))
        raise self.exc


def _build(evidence: list[Dataset], result: AnalysisResult) -> Dataset:
    return build_measurement_report(evidence, result, node=ReportingNode(ae_title="SCPNODE"))


def _write(sr: Dataset, path: Path, result: AnalysisResult) -> None:
    write_report(sr, path)
    path.with_suffix(".json").write_text(json.dumps(findings_json(read_report(path), result)))


@pytest.fixture
def complete_series(index_db: Database, audit_trail: AuditTrail, ingest_ct):  # type: ignore[no-untyped-def]
    ingest_ct(0, 1, 2)
    SeriesCompletion(index_db, audit_trail, 10.0, 3600).run_once(now=after_quiet(index_db, 10.0))


def _queue(db: Database, audit: AuditTrail, storage: Path, engine: RefusingEngine, notify: bool) -> AnalysisQueue:
    return AnalysisQueue(db, audit, storage, engine, _build, _write, DESTINATIONS,
                         skip_exceptions=(SeriesSkipped,), notify_not_analysed=notify)


def _job(db: Database) -> AnalysisJob:
    with db.session() as s:
        job = s.scalars(select(AnalysisJob)).one()
        s.expunge(job)
        return job


def test_not_analysed_series_gets_a_notice_sr_that_validates(index_db: Database, audit_trail: AuditTrail,
                                                              storage_dir: Path, complete_series: None) -> None:
    queue = _queue(index_db, audit_trail, storage_dir, RefusingEngine(SeriesNotAnalysed(REASON)), notify=True)
    assert queue.run_once() is True
    job = _job(index_db)
    assert job.state is JobState.SKIPPED and job.error == f"not analysed: {REASON}"
    with index_db.session() as s:
        report = s.scalars(select(Report)).one()
        exports = s.scalars(select(ExportJob)).all()
        path = storage_dir / report.path
        assert REASON in report.findings_text
        assert sorted(e.destination for e in exports) == sorted(d.name for d in DESTINATIONS)
        audit = [(e.event, e.outcome, e.detail) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert any(ev == Event.ANALYSIS_SKIPPED and out == "warning" and REASON in detail for ev, out, detail in audit)
    assert any(ev == Event.SR_CREATED for ev, _, _ in audit)

    sr = pydicom.dcmread(path)
    source = pydicom.dcmread(queue_paths(storage_dir)[0], stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.VerificationFlag == "UNVERIFIED" and sr.SeriesDescription == SERIES_DESCRIPTION_NOT_ANALYSED
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["not_analysed"] == REASON and sidecar["findings"] is None

    dsrdump = shutil.which("dsrdump")
    dciodvfy = shutil.which("dciodvfy")
    if not (dsrdump and dciodvfy):
        pytest.skip("dcmtk / dicom3tools not installed")
    out = run_tool(dsrdump, "+Pt", "+Pl", str(path)).stdout
    assert f"This series was not analysed by the AI model: {REASON}." in out
    assert REVIEW_STATEMENT in out and "# TID 1500" in out
    run = run_tool(dciodvfy, str(path))
    lines = (run.stdout + run.stderr).splitlines()
    assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)
    unexpected = [w for w in lines if w.startswith("Warning") and not any(e in w for e in DCIODVFY_EXPECTED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)


def queue_paths(storage_dir: Path) -> list[Path]:
    return sorted(p for p in storage_dir.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT")


def test_without_notify_the_reason_is_recorded_and_no_sr(index_db: Database, audit_trail: AuditTrail,
                                                          storage_dir: Path, complete_series: None) -> None:
    queue = _queue(index_db, audit_trail, storage_dir, RefusingEngine(SeriesNotAnalysed(REASON)), notify=False)
    assert queue.run_once() is True
    assert _job(index_db).error == f"not analysed: {REASON}"
    with index_db.session() as s:
        assert s.scalars(select(Report)).all() == []


def test_nothing_to_analyse_stays_silent(index_db: Database, audit_trail: AuditTrail, storage_dir: Path,
                                         complete_series: None) -> None:
    queue = _queue(index_db, audit_trail, storage_dir,
                   RefusingEngine(SeriesSkipped("series holds only Structured Reports")), notify=True)
    assert queue.run_once() is True
    job = _job(index_db)
    assert job.state is JobState.SKIPPED and job.error == "series holds only Structured Reports"
    with index_db.session() as s:
        assert s.scalars(select(Report)).all() == []


def test_status_lists_not_analysed_series(index_db: Database, audit_trail: AuditTrail, storage_dir: Path,
                                          complete_series: None) -> None:
    from scp_node.cli.status import not_analysed, render_not_analysed

    queue = _queue(index_db, audit_trail, storage_dir, RefusingEngine(SeriesNotAnalysed(REASON)), notify=False)
    queue.run_once()
    rows = not_analysed(index_db)
    assert len(rows) == 1 and rows[0]["reason"] == REASON and rows[0]["modality"] == "CT"
    text = render_not_analysed(rows)
    assert "not analysed  1" in text and REASON in text and rows[0]["series_instance_uid"] in text
    assert render_not_analysed([]) == "not analysed  none"
