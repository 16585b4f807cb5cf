"""Fakes for the internal seams of the queues (engine, report builder/writer, sender) and a series.

These replace in-process collaborators only; the database, the files and the audit trail are real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from scp_node.config import Destination
from scp_node.engine.result import AnalysisResult, ModelIdentity, SourceImageRef
from scp_node.store.db import Database
from scp_node.store.models import Series

MODEL = ModelIdentity(name="fake model", version="0", weights_sha256="ab" * 32, is_test_model=True)
DESTINATIONS = (Destination("pacs", "PACS", "10.0.0.10", 104), Destination("archive", "ARCH", "10.0.0.11", 11112))


class SkipSeries(Exception):
    """The engine's 'cannot analyse this series' signal, as the node's SeriesSkipped."""


class Interrupted(BaseException):
    """Stands for the process being stopped in the middle of a job (not an ordinary failure)."""


@dataclass
class FakeEngine:
    """Implements ``analyse_series``; raises the queued exceptions first, then succeeds."""

    failures: list[BaseException] = field(default_factory=list)
    calls: list[list[Path]] = field(default_factory=list)

    def analyse_series(self, paths: list[Path]) -> AnalysisResult:
        self.calls.append(list(paths))
        if self.failures:
            raise self.failures.pop(0)
        return AnalysisResult(modality="CT", findings_text="No acute findings.", model=MODEL,
                              sources=[SourceImageRef("1.2.840.10008.5.1.4.1.1.2", p.stem) for p in paths],
                              generated_tokens=7)


def build_report(evidence: list[Dataset], result: AnalysisResult) -> Dataset:
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.SOPInstanceUID = generate_uid()
    sr.SeriesInstanceUID = generate_uid()
    sr.StudyInstanceUID = evidence[0].StudyInstanceUID
    sr.TextValue = result.findings_text
    return sr


@dataclass
class FakeWriter:
    written: list[Path] = field(default_factory=list)

    def __call__(self, sr: Dataset, path: Path, result: AnalysisResult | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"SR {sr.SOPInstanceUID}: {sr.TextValue}")
        self.written.append(path)


@dataclass
class FakeSender:
    """Records every send; raises the queued exceptions first."""

    failures: list[BaseException] = field(default_factory=list)
    sent: list[tuple[str, Path]] = field(default_factory=list)

    def __call__(self, dest: Destination, path: Path) -> object:
        assert path.exists(), path
        self.sent.append((dest.name, path))
        if self.failures:
            raise self.failures.pop(0)
        return None


def series_row(db: Database) -> Series:
    with db.session() as s:
        row = s.scalars(select(Series)).one()
        s.expunge(row)
        return row


def set_series_times(db: Database, **values: datetime) -> None:
    with db.session() as s:
        s.execute(update(Series).values(**values))


def after_quiet(db: Database, seconds: float) -> datetime:
    """The time ``seconds`` after the series' last instance."""
    return series_row(db).last_received_at + timedelta(seconds=seconds)

