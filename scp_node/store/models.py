"""The index: SQLAlchemy 2 models for the DICOM information model and the node's work queues.

Patient -> Study -> Series -> Instance mirrors DICOM's own hierarchy.  The work state
(series completion, analysis jobs, reports, exports) lives in the same database so that a
restart neither loses nor repeats work: every state change is one committed row update.
The audit trail (:class:`AuditEvent`) is append-only through the code; it holds keyed hashes of
patient identifiers, never the clear values.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (BigInteger, Boolean, DateTime, Enum, ForeignKey, Index, Integer, String, Text,
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
    #: Retrieved from a PACS as the prior of another study (scp_node.scheduler.priors): indexed
    #: and kept like any series, never analysed itself.
    is_prior: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
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
    #: The worker (NodeRecord.name) holding a RUNNING job, and until when its claim holds: a
    #: worker renews it while it works; one that dies lets it expire and another runs the job.
    claimed_by: Mapped[str] = mapped_column(String(128), default="", server_default="")
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
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
    #: As on AnalysisJob: the worker sending it and until when that claim holds.
    claimed_by: Mapped[str] = mapped_column(String(128), default="", server_default="")
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
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


class NodeRecord(Base):
    """One running scp_node process (``serve --role ...``) sharing this index: its heartbeat.

    Every node writes its row at start and refreshes ``heartbeat_at`` every few seconds;
    ``scp-node status`` lists the live ones (the fleet) from here.
    """

    __tablename__ = "nodes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Unique per process: "<host>:<pid>:<role>" (the claims on jobs name it).
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    ae_title: Mapped[str] = mapped_column(String(16), default="")
    version: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class PriorFetchState(str, enum.Enum):
    """What became of one search for, and retrieval of, a prior study."""

    PENDING = "pending"  #: C-FIND / C-MOVE in progress
    DONE = "done"  #: the prior is in the index (found locally or retrieved)
    NONE = "none"  #: no comparable prior exists (locally or at any source)
    FAILED = "failed"  #: a source was down, slow or refused; the analysis went on without it
    REFUSED = "refused"  #: a prior was found but is not comparable (other sex / birth date): reason kept


class PriorFetch(Base):
    """The prior study looked up for one analysis job: where it came from and how it went."""

    __tablename__ = "prior_fetches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("analysis_jobs.id"), index=True)
    #: The current study (the one being analysed).
    study_instance_uid: Mapped[str] = mapped_column(UID)
    #: The prior chosen (empty while unknown, or when none).
    prior_study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    prior_series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    #: "local" or the [[priors]] source's name.
    source: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[PriorFetchState] = mapped_column(Enum(PriorFetchState, native_enum=False),
                                                   default=PriorFetchState.PENDING, index=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
