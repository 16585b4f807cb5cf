"""FROZEN: scp_node/store/models.py as the first release shipped it (git show f1dc0f3~1:scp_node/store/models.py).

Never edit this copy: tests/store/test_migrations.py builds an index exactly as that release did
(``Base.metadata.create_all``) and upgrades it with ``scp-node db upgrade``.  The original
docstring follows.
"""


# The index: SQLAlchemy 2 models for the DICOM information model and the node's work queues.

# Patient -> Study -> Series -> Instance mirrors DICOM's own hierarchy.  The work state
# (series completion, analysis jobs, reports, exports) lives in the same database so that a
# restart neither loses nor repeats work: every state change is one committed row update.
# The audit trail (:class:`AuditEvent`) is append-only through the code; it holds keyed hashes of
# patient identifiers, never the clear values.

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (BigInteger, DateTime, Enum, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp in the index is UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes and gives them back aware (SQLite forgets the zone otherwise)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the index; use utcnow()")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


UID = String(64)


class SeriesState(str, enum.Enum):
    """Completion state of a series (mercure's receive -> complete)."""

    RECEIVING = "receiving"  #: instances may still arrive; the stable timer runs
    COMPLETE = "complete"  #: an analysis job exists for the current version


class JobState(str, enum.Enum):
    """Analysis job life cycle."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  #: gave up after the configured attempts; error kept
    SKIPPED = "skipped"  #: the series cannot be analysed (reason kept)


class ExportState(str, enum.Enum):
    """Export job life cycle (a kept dead-letter state, as dcm4chee's FAILED)."""

    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    DEAD = "dead"


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Clear identifiers stay inside the index (like any PACS index); logs and audit get hashes.
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    studies: Mapped[list["Study"]] = relationship(back_populates="patient")
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id", "patient_name"),)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    study_date: Mapped[str] = mapped_column(String(8), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list["Series"]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[SeriesState] = mapped_column(Enum(SeriesState, native_enum=False), default=SeriesState.RECEIVING)
    #: Bumped when instances arrive after completion: each version gets its own analysis.
    version: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Start of the current version's receive window (for the forced ceiling).
    version_started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")
    __table_args__ = (Index("ix_series_state_last", "state", "last_received_at"),)


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    #: Path relative to the storage folder.
    path: Mapped[str] = mapped_column(String(400))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    series_version: Mapped[int] = mapped_column(Integer, default=1)
    series: Mapped[Series] = relationship(back_populates="instances")


class AnalysisJob(Base):
    __tablename__ = "analysis_jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    series_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False), default=JobState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    series: Mapped[Series] = relationship()
    __table_args__ = (UniqueConstraint("series_fk", "series_version"),)


class Report(Base):
    """An SR this node wrote (stored under the storage folder, exported to each destination)."""

    __tablename__ = "reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("analysis_jobs.id"), unique=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(400))
    model_name: Mapped[str] = mapped_column(String(128))
    is_test_model: Mapped[bool] = mapped_column(default=False)
    findings_text: Mapped[str] = mapped_column(Text, default="")
    #: The parsed structured answer as JSON (findings, impression, triage...); empty when unparsed.
    structured_json: Mapped[str] = mapped_column(Text, default="")
    triage: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    job: Mapped[AnalysisJob] = relationship()


class ExportJob(Base):
    __tablename__ = "export_jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_fk: Mapped[int] = mapped_column(ForeignKey("reports.id"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[ExportState] = mapped_column(Enum(ExportState, native_enum=False), default=ExportState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    report: Mapped[Report] = relationship()
    __table_args__ = (UniqueConstraint("report_fk", "destination"),)


class AuditEvent(Base):
    """One audited step. Append-only: the code has no update or delete path for these rows."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(48), index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="success")
    ae_title: Mapped[str] = mapped_column(String(16), default="")
    peer: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    #: HMAC-SHA256 (local secret) of the PatientID; never the identifier itself.
    patient_hash: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
