"""The index rows of one received instance, written with Core statements built once.

The receive path is the node's hottest loop.  Going through the ORM's unit of work cost a
received CT slice about as much CPU as pynetdicom's whole DIMSE handling (profiled with py-spy
under ``benchmarks/ingest_bench.py``); these few prebuilt statements do the same work — find or
create patient, study and series, reopen a completed series, insert or replace the instance row
and its audit row — for a fraction of that, on SQLite straight on the driver's cursor
(:mod:`.driver`).  Everything runs inside the caller's transaction, so it commits or rolls back
with it.  The statements are module constants: the driver compiles each once per process.

A PACS never mixes patients: the look-ups of an existing series and study join to the study
and patient they belong to (same select, no extra round trip), and an instance whose Study
Instance UID, Patient ID or Issuer of Patient ID disagree with what the index holds for its
Series or Study Instance UID — or a replacement that would move an instance to another series —
raises :class:`~scp_node.store.ingest.IdentityConflict` inside the transaction, which then
rolls back whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from sqlalchemy import bindparam, insert, select, update

from .driver import IndexTransaction
from .errors import IdentityConflict
from .models import AuditEvent, Instance, Patient, SeriesState, Series, Study, utcnow

_PATIENTS, _STUDIES = Patient.__table__, Study.__table__
_SERIES, _INSTANCES = Series.__table__, Instance.__table__

_FIND_INSTANCE = select(_INSTANCES.c.id, _INSTANCES.c.sha256, _INSTANCES.c.path, _INSTANCES.c.series_fk).where(
    _INSTANCES.c.sop_instance_uid == bindparam("b_sop_uid"))
#: The series with the identity it belongs to (its study's UID, its patient's ID and issuer).
_FIND_SERIES = select(_SERIES.c.id, _SERIES.c.state, _SERIES.c.version, _STUDIES.c.study_instance_uid,
                      _PATIENTS.c.patient_id, _PATIENTS.c.issuer_of_patient_id).select_from(
    _SERIES.join(_STUDIES, _SERIES.c.study_fk == _STUDIES.c.id).join(
        _PATIENTS, _STUDIES.c.patient_fk == _PATIENTS.c.id)).where(
    _SERIES.c.series_instance_uid == bindparam("b_series_uid"))
#: The study with its patient's ID.
_FIND_STUDY = select(_STUDIES.c.id, _PATIENTS.c.patient_id).select_from(
    _STUDIES.join(_PATIENTS, _STUDIES.c.patient_fk == _PATIENTS.c.id)).where(
    _STUDIES.c.study_instance_uid == bindparam("b_study_uid"))
_FIND_PATIENT = select(_PATIENTS.c.id).where(
    _PATIENTS.c.patient_id == bindparam("b_patient_id"),
    _PATIENTS.c.issuer_of_patient_id == bindparam("b_issuer"),
    _PATIENTS.c.patient_name == bindparam("b_patient_name"))
_TOUCH_SERIES = update(_SERIES).where(_SERIES.c.id == bindparam("b_id")).values(
    last_received_at=bindparam("b_now"))
#: A late arrival: a new analysis version of the series starts collecting.
_REOPEN_SERIES = update(_SERIES).where(_SERIES.c.id == bindparam("b_id")).values(
    state=SeriesState.RECEIVING, version=bindparam("b_version"), version_started_at=bindparam("b_now"),
    last_received_at=bindparam("b_now"), completed_at=None)
_INSERT_INSTANCE = insert(_INSTANCES)
_REPLACE_INSTANCE = update(_INSTANCES).where(_INSTANCES.c.id == bindparam("b_id"))
_INSERT_AUDIT = insert(AuditEvent.__table__)
_INSERT_SERIES = insert(_SERIES)
_INSERT_STUDY = insert(_STUDIES)
_INSERT_PATIENT = insert(_PATIENTS)


@dataclass(frozen=True)
class InstanceRow:
    """What the index keeps of one instance (the header values already read and bounded)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    calling_ae_title: str
    peer_address: str
    #: patient_id, issuer_of_patient_id, patient_name — for a new patient row only.
    patient: dict[str, str]
    #: study_date, accession_number, study_description — for a new study row only.
    study: dict[str, Any]
    #: modality, body_part_examined, series_description, series_number — for a new series row only.
    series: dict[str, Any]

    @classmethod
    def from_header(cls, ds: Any, path: str, size: int, digest: str, ae_title: str, address: str, sop_uid: str,
                    sop_class: str, study_uid: str, series_uid: str, transfer_syntax: str) -> InstanceRow:
        """The index values of one instance, read from its header (a pydicom ``Dataset`` or a
        :class:`~scp_node.store.scan.ScannedHeader`) and bounded to the column sizes; the UIDs
        (the file meta's transfer syntax too) as the caller checked them."""
        return cls(
            sop_instance_uid=sop_uid, sop_class_uid=sop_class, study_instance_uid=study_uid,
            series_instance_uid=series_uid, instance_number=_int_or_none(ds, "InstanceNumber"),
            transfer_syntax_uid=transfer_syntax, path=path, size=size,
            sha256=digest, calling_ae_title=ae_title[:16], peer_address=address[:64],
            patient=dict(patient_id=_text(ds, "PatientID", 64), issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64),
                         patient_name=_text(ds, "PatientName", 324)),
            study=dict(study_date=_text(ds, "StudyDate", 8), accession_number=_text(ds, "AccessionNumber", 16),
                       study_description=_text(ds, "StudyDescription", 64)),
            series=dict(modality=_text(ds, "Modality", 16), body_part_examined=_text(ds, "BodyPartExamined", 16),
                        series_description=_text(ds, "SeriesDescription", 64),
                        series_number=_int_or_none(ds, "SeriesNumber")))


@dataclass(frozen=True)
class ExistingInstance:
    id: int
    sha256: str
    path: str
    series_id: int


def _text(ds: Any, keyword: str, limit: int) -> str:
    value = ds.get(keyword, "")
    return ("" if value is None else str(value))[:limit]


def _int_or_none(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def find_instance(tx: IndexTransaction, sop_uid: str) -> ExistingInstance | None:
    row = tx.first(_FIND_INSTANCE, {"b_sop_uid": sop_uid})
    return None if row is None else ExistingInstance(int(row[0]), row[1], row[2], int(row[3]))


def index_instance(tx: IndexTransaction, row: InstanceRow, existing: ExistingInstance | None) -> None:
    """Insert (or, for a replacement, update) the instance row under its series, creating the
    patient, study and series rows it needs; a completed series is reopened as a new version."""
    now = utcnow()
    series_id, version = _series(tx, row, now, existing)
    values = dict(sop_class_uid=row.sop_class_uid, series_fk=series_id, instance_number=row.instance_number,
                  transfer_syntax_uid=row.transfer_syntax_uid, path=row.path, size=row.size, sha256=row.sha256,
                  received_at=now, calling_ae_title=row.calling_ae_title, peer_address=row.peer_address,
                  series_version=version)
    if existing is None:
        tx.run(_INSERT_INSTANCE, dict(values, sop_instance_uid=row.sop_instance_uid))
    else:
        tx.run(_REPLACE_INSTANCE, dict(values, b_id=existing.id))


def add_audit(tx: IndexTransaction, values: dict[str, object]) -> None:
    """One audit row (values from :meth:`AuditTrail.values`) in the same transaction."""
    tx.run(_INSERT_AUDIT, values)


#: The refusals (no patient identifier in them: they reach the log, the audit, the Error Comment).
SERIES_CONFLICT = "Series Instance UID already belongs to another study/patient"
STUDY_CONFLICT = "Study Instance UID already belongs to another patient"
MOVE_CONFLICT = "SOP Instance UID already belongs to another series"


def _conflict(reason: str) -> NoReturn:
    raise IdentityConflict(reason)


def _same(held: str | None, given: str) -> bool:
    """One identifier as the index holds it and as the instance gives it (padding aside)."""
    return (held or "").strip() == given.strip()


def _series(tx: IndexTransaction, row: InstanceRow, now: Any, existing: ExistingInstance | None) -> tuple[int, int]:
    found = tx.first(_FIND_SERIES, {"b_series_uid": row.series_instance_uid})
    if found is None:
        if existing is not None:  # a replacement may not move the instance to a new series
            _conflict(MOVE_CONFLICT)
        study_id = _study(tx, row)
        series_id = tx.insert(_INSERT_SERIES, dict(
            series_instance_uid=row.series_instance_uid, study_fk=study_id, state=SeriesState.RECEIVING,
            version=1, first_received_at=now, last_received_at=now, version_started_at=now, is_prior=False,
            **row.series))
        return series_id, 1
    series_id, state, version = int(found[0]), found[1], int(found[2])
    if (found[3] != row.study_instance_uid or not _same(found[4], row.patient["patient_id"])
            or not _same(found[5], row.patient["issuer_of_patient_id"])):
        _conflict(SERIES_CONFLICT)
    if existing is not None and existing.series_id != series_id:
        _conflict(MOVE_CONFLICT)
    if state is SeriesState.COMPLETE:
        tx.run(_REOPEN_SERIES, {"b_id": series_id, "b_version": version + 1, "b_now": now})
        return series_id, version + 1
    tx.run(_TOUCH_SERIES, {"b_id": series_id, "b_now": now})
    return series_id, version


def _study(tx: IndexTransaction, row: InstanceRow) -> int:
    found = tx.first(_FIND_STUDY, {"b_study_uid": row.study_instance_uid})
    p = row.patient
    if found is not None:
        if not _same(found[1], p["patient_id"]):
            _conflict(STUDY_CONFLICT)
        return int(found[0])
    patient = tx.first(_FIND_PATIENT, {"b_patient_id": p["patient_id"], "b_issuer": p["issuer_of_patient_id"],
                                       "b_patient_name": p["patient_name"]})
    patient_id = int(patient[0]) if patient is not None else tx.insert(_INSERT_PATIENT, dict(p))
    return tx.insert(_INSERT_STUDY, dict(study_instance_uid=row.study_instance_uid, patient_fk=patient_id,
                                         **row.study))
