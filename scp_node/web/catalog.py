"""What the DICOMweb routes can see: the received instances and the node's own SRs, as records.

Received instances live in the index (patients/studies/series/instances); the SRs this node
wrote live in ``reports`` with their files under the same storage folder.  A viewer must find
both the same way, so this module merges them into one list of flat records per level.  The
few SR attributes the ``reports`` table does not hold (SOP Class, series number...) are read
from the SR file header once and cached: SRs never change after they are written.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pydicom
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..store.db import Database
from ..store.models import Instance, Patient, Report, Series, Study

STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "AccessionNumber", "StudyDescription", "PatientID",
              "IssuerOfPatientID", "PatientName")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined")
INSTANCE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")


@dataclass
class Record:
    """One study, series or instance: indexed attributes (by keyword) and a representative file."""

    attrs: dict[str, Any]
    #: Absolute path of the instance (instance level) or of one instance in it (study/series).
    path: Path
    #: Transfer syntax of that file (instance level).
    transfer_syntax: str = ""
    sort_key: tuple[Any, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Scope:
    """UID constraints, each a set of accepted UIDs or None for any (from the URL and the query)."""

    study: frozenset[str] | None = None
    series: frozenset[str] | None = None
    sop: frozenset[str] | None = None
    patient_id: str | None = None


class _SRHeaders:
    """SR file headers by path, read once (the node writes each SR exactly once)."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> dict[str, Any]:
        key = str(path)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            info = dict(SOPClassUID=str(ds.get("SOPClassUID", "")), Modality=str(ds.get("Modality", "SR")),
                        SeriesNumber=_int(ds.get("SeriesNumber")), InstanceNumber=_int(ds.get("InstanceNumber")),
                        SeriesDescription=str(ds.get("SeriesDescription", "")),
                        TransferSyntaxUID=str(ds.file_meta.get("TransferSyntaxUID", "")))
        except (OSError, ValueError, TypeError, AttributeError, pydicom.errors.InvalidDicomError):
            return {}  # not cached: a missing file may be a report still being written
        with self._lock:
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[key] = info
        return info


def _int(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _study_attrs(study: Study, patient: Patient) -> dict[str, Any]:
    return dict(StudyInstanceUID=study.study_instance_uid, StudyDate=study.study_date,
                AccessionNumber=study.accession_number, StudyDescription=study.study_description,
                PatientID=patient.patient_id, IssuerOfPatientID=patient.issuer_of_patient_id,
                PatientName=patient.patient_name)


class Catalog:
    """Read-only queries over the index for QIDO-RS and WADO-RS."""

    def __init__(self, db: Database, storage_dir: Path) -> None:
        self.db = db
        self.storage_dir = storage_dir
        self._sr = _SRHeaders()

    # -- shared filters ----------------------------------------------------------------------
    @staticmethod
    def _where_study(q: Any, scope: Scope) -> Any:
        if scope.study is not None:
            q = q.where(Study.study_instance_uid.in_(scope.study))
        if scope.patient_id is not None:
            q = q.where(Patient.patient_id == scope.patient_id)
        return q

    def _reports(self, session: Session, scope: Scope) -> list[tuple[Report, Study, Patient]]:
        q = (select(Report, Study, Patient).join(Study, Study.study_instance_uid == Report.study_instance_uid)
             .join(Patient, Study.patient_fk == Patient.id))
        q = self._where_study(q, scope)
        if scope.series is not None:
            q = q.where(Report.series_instance_uid.in_(scope.series))
        if scope.sop is not None:
            q = q.where(Report.sop_instance_uid.in_(scope.sop))
        return [tuple(r) for r in session.execute(q.order_by(Report.id)).all()]  # type: ignore[misc]

    # -- levels ------------------------------------------------------------------------------
    def studies(self, scope: Scope) -> list[Record]:
        with self.db.session() as session:
            q = select(Study, Patient).join(Patient, Study.patient_fk == Patient.id)
            rows = session.execute(self._where_study(q, scope).order_by(Study.id)).all()
            if not rows:
                return []
            ids = [s.id for s, _ in rows]
            uids = [s.study_instance_uid for s, _ in rows]
            n_series: dict[int, int] = defaultdict(int)
            modalities: dict[int, set[str]] = defaultdict(set)
            for study_fk, modality in session.execute(
                    select(Series.study_fk, Series.modality).where(Series.study_fk.in_(ids))):
                n_series[study_fk] += 1
                if modality:
                    modalities[study_fk].add(modality)
            n_inst = dict(session.execute(select(Series.study_fk, func.count(Instance.id))
                                          .join(Instance, Instance.series_fk == Series.id)
                                          .where(Series.study_fk.in_(ids)).group_by(Series.study_fk)).all())
            first_path = dict(session.execute(select(Series.study_fk, func.min(Instance.path))
                                              .join(Instance, Instance.series_fk == Series.id)
                                              .where(Series.study_fk.in_(ids)).group_by(Series.study_fk)).all())
            sr_series: dict[str, set[str]] = defaultdict(set)
            sr_count: dict[str, int] = defaultdict(int)
            for study_uid, series_uid in session.execute(
                    select(Report.study_instance_uid, Report.series_instance_uid)
                    .where(Report.study_instance_uid.in_(uids))):
                sr_series[study_uid].add(series_uid)
                sr_count[study_uid] += 1
        out = []
        for study, patient in rows:
            mods = set(modalities[study.id]) | ({"SR"} if sr_count[study.study_instance_uid] else set())
            attrs = _study_attrs(study, patient)
            attrs.update(ModalitiesInStudy=sorted(mods),
                         NumberOfStudyRelatedSeries=n_series[study.id] + len(sr_series[study.study_instance_uid]),
                         NumberOfStudyRelatedInstances=n_inst.get(study.id, 0) + sr_count[study.study_instance_uid])
            path = self.storage_dir / first_path[study.id] if study.id in first_path else self.storage_dir
            out.append(Record(attrs, path, sort_key=(study.id,)))
        return out

    def series(self, scope: Scope) -> list[Record]:
        with self.db.session() as session:
            q = (select(Series, Study, Patient).join(Study, Series.study_fk == Study.id)
                 .join(Patient, Study.patient_fk == Patient.id))
            q = self._where_study(q, scope)
            if scope.series is not None:
                q = q.where(Series.series_instance_uid.in_(scope.series))
            rows = session.execute(q.order_by(Series.id)).all()
            ids = [se.id for se, _, _ in rows]
            counts = dict(session.execute(select(Instance.series_fk, func.count(Instance.id))
                                          .where(Instance.series_fk.in_(ids)).group_by(Instance.series_fk)).all())
            paths = dict(session.execute(select(Instance.series_fk, func.min(Instance.path))
                                         .where(Instance.series_fk.in_(ids)).group_by(Instance.series_fk)).all())
            reports = self._reports(session, Scope(scope.study, scope.series, None, scope.patient_id))
        out = []
        for se, study, patient in rows:
            attrs = _study_attrs(study, patient)
            attrs.update(SeriesInstanceUID=se.series_instance_uid, Modality=se.modality,
                         SeriesNumber=se.series_number, SeriesDescription=se.series_description,
                         BodyPartExamined=se.body_part_examined,
                         NumberOfSeriesRelatedInstances=counts.get(se.id, 0))
            path = self.storage_dir / paths[se.id] if se.id in paths else self.storage_dir
            out.append(Record(attrs, path, sort_key=(0, se.id)))
        by_series: dict[str, Record] = {}
        for rep, study, patient in reports:
            rec = by_series.get(rep.series_instance_uid)
            if rec is not None:
                rec.attrs["NumberOfSeriesRelatedInstances"] += 1
                continue
            path = self.storage_dir / rep.path
            hdr = self._sr.get(path)
            attrs = _study_attrs(study, patient)
            attrs.update(SeriesInstanceUID=rep.series_instance_uid, Modality=hdr.get("Modality") or "SR",
                         SeriesNumber=hdr.get("SeriesNumber"), SeriesDescription=hdr.get("SeriesDescription", ""),
                         BodyPartExamined="", NumberOfSeriesRelatedInstances=1)
            by_series[rep.series_instance_uid] = Record(attrs, path, sort_key=(1, rep.id))
        return out + list(by_series.values())

    def instances(self, scope: Scope) -> list[Record]:
        with self.db.session() as session:
            q = (select(Instance, Series, Study, Patient).join(Series, Instance.series_fk == Series.id)
                 .join(Study, Series.study_fk == Study.id).join(Patient, Study.patient_fk == Patient.id))
            q = self._where_study(q, scope)
            if scope.series is not None:
                q = q.where(Series.series_instance_uid.in_(scope.series))
            if scope.sop is not None:
                q = q.where(Instance.sop_instance_uid.in_(scope.sop))
            rows = session.execute(q.order_by(Series.id, Instance.instance_number, Instance.id)).all()
            reports = self._reports(session, scope)
        out = []
        for i, (inst, se, study, patient) in enumerate(rows):
            attrs = _study_attrs(study, patient)
            attrs.update(SeriesInstanceUID=se.series_instance_uid, Modality=se.modality,
                         SeriesNumber=se.series_number, SeriesDescription=se.series_description,
                         BodyPartExamined=se.body_part_examined, SOPInstanceUID=inst.sop_instance_uid,
                         SOPClassUID=inst.sop_class_uid, InstanceNumber=inst.instance_number)
            out.append(Record(attrs, self.storage_dir / inst.path, inst.transfer_syntax_uid, sort_key=(0, i)))
        for rep, study, patient in reports:
            path = self.storage_dir / rep.path
            hdr = self._sr.get(path)
            if not hdr:
                continue  # the file is not readable (yet): not served rather than served broken
            attrs = _study_attrs(study, patient)
            attrs.update(SeriesInstanceUID=rep.series_instance_uid, Modality=hdr.get("Modality") or "SR",
                         SeriesNumber=hdr.get("SeriesNumber"), SeriesDescription=hdr.get("SeriesDescription", ""),
                         BodyPartExamined="", SOPInstanceUID=rep.sop_instance_uid,
                         SOPClassUID=hdr.get("SOPClassUID", ""), InstanceNumber=hdr.get("InstanceNumber"))
            out.append(Record(attrs, path, hdr.get("TransferSyntaxUID", ""), sort_key=(1, rep.id)))
        return out


def uids_of(records: Iterable[Record], keyword: str) -> set[str]:
    return {str(r.attrs.get(keyword, "")) for r in records}
