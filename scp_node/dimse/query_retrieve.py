"""Query/Retrieve SCU: find a patient's earlier studies at a PACS and fetch one series of them.

Why: a radiologist reads a new film against the last one, and the last one is often only in the
PACS (scp_node.scheduler.priors decides which study is wanted; this module only talks DIMSE).

* C-FIND, Study Root, STUDY level: Patient ID (+ Issuer of Patient ID when the current study has
  one) and a Study Date range ``YYYYMMDD-YYYYMMDD``; then SERIES level within one study. The
  keys the prior rules need (Modality, Body Part Examined, View Position, Patient's Sex and Birth
  Date) are asked for as return keys and checked here, not trusted to the PACS's matching.
* C-MOVE, SERIES level, to the node's own AE title (``move_destination``): the PACS opens an
  association to the node's port and C-STOREs the series; the node's C-STORE SCP commits each
  instance to the index before it answers, so when the C-MOVE's final response is here the
  instances are indexed.
* C-GET, SERIES level, for a PACS that prefers it: the instances come back on this association
  (SCP role for the storage classes a prior can be) and go to the node's :class:`Ingestor`.

Every operation is bounded by one deadline (``PriorSource.timeout_seconds`` for the whole search
and retrieval of a source): pynetdicom's connection, ACSE, DIMSE and network timeouts are set to
what is left, and a watchdog aborts the association when the deadline passes, so a closed port
fails at once and a PACS that accepts but never answers costs at most the timeout.  Nothing here
logs a patient identifier: only UIDs, counts, statuses and the source's name.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
                         JPEGLSNearLossless, RLELossless)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage, CTImageStorage, DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing, EnhancedCTImageStorage, EnhancedMRImageStorage, MRImageStorage,
    SecondaryCaptureImageStorage, StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove)

from .. import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from ..config import PriorSource

log = logging.getLogger(__name__)

#: What a prior can be, for C-GET's storage contexts (SCP role): the images the engine reads.
GET_STORAGE_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                       DigitalXRayImageStorageForProcessing, CTImageStorage, EnhancedCTImageStorage,
                       MRImageStorage, EnhancedMRImageStorage, SecondaryCaptureImageStorage)
#: One context per (class, syntax), so the PACS can send each instance as it holds it.
GET_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEG2000,
                         JPEGLSLossless, JPEGLSNearLossless, JPEGLosslessSV1, JPEGBaseline8Bit, RLELossless,
                         DeflatedExplicitVRLittleEndian)
_PENDING = (0xFF00, 0xFF01)
_WARNING = (0xB000,)  #: C-MOVE / C-GET: sub-operations done, some failed or warned


class QueryRetrieveError(RuntimeError):
    """The PACS could not be searched or did not deliver; ``timed_out``: the deadline passed."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class StudyMatch:
    """One C-FIND STUDY-level answer (the values as the PACS returned them, stripped)."""

    study_instance_uid: str
    study_date: str
    study_time: str
    patient_id: str
    issuer_of_patient_id: str
    patient_sex: str
    patient_birth_date: str
    modalities: tuple[str, ...]


@dataclass(frozen=True)
class SeriesMatch:
    """One C-FIND SERIES-level answer."""

    series_instance_uid: str
    modality: str
    body_part_examined: str
    view_position: str
    series_description: str
    series_number: int | None
    instances: int | None  #: NumberOfSeriesRelatedInstances, when the PACS says


@dataclass(frozen=True)
class RetrieveOutcome:
    """The final C-MOVE / C-GET response's counts (``stored``: C-GET instances the node kept)."""

    status: int
    completed: int
    failed: int
    warning: int
    stored: int = 0


#: C-GET hands each received instance here: (Part 10 bytes or a spool file, SOP Class UID); it
#: raises to refuse one (the status answered is then a failure, the PACS counts it failed).
StoreTarget = Callable[[bytes | Path, str], object]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


class QueryRetrieveSCU:
    """One ``[[priors]]`` source as seen from the node: C-FIND, C-MOVE, C-GET under one deadline."""

    def __init__(self, source: PriorSource, calling_ae_title: str, deadline: float | None = None) -> None:
        """``deadline``: ``time.monotonic()`` by which everything asked of this source must be
        over (default: now + ``source.timeout_seconds``)."""
        self.source = source
        self.calling_ae_title = calling_ae_title
        self.deadline = deadline if deadline is not None else time.monotonic() + source.timeout_seconds

    # -- the operations ------------------------------------------------------------------------
    def find_studies(self, patient_id: str, issuer_of_patient_id: str, date_from: str,
                     date_to: str) -> list[StudyMatch]:
        """C-FIND STUDY level: the patient's studies dated ``date_from``..``date_to`` (DA)."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = patient_id
        query.IssuerOfPatientID = issuer_of_patient_id
        query.StudyDate = f"{date_from}-{date_to}"
        for keyword in ("StudyInstanceUID", "StudyTime", "PatientSex", "PatientBirthDate", "ModalitiesInStudy"):
            setattr(query, keyword, "")
        return [StudyMatch(study_instance_uid=_text(d, "StudyInstanceUID"), study_date=_text(d, "StudyDate"),
                           study_time=_text(d, "StudyTime"), patient_id=_text(d, "PatientID"),
                           issuer_of_patient_id=_text(d, "IssuerOfPatientID"), patient_sex=_text(d, "PatientSex"),
                           patient_birth_date=_text(d, "PatientBirthDate"),
                           modalities=tuple(m for m in _text(d, "ModalitiesInStudy").split("\\") if m))
                for d in self._find(query, "study") if _text(d, "StudyInstanceUID")]

    def find_series(self, study_instance_uid: str) -> list[SeriesMatch]:
        """C-FIND SERIES level within one study, with the keys the prior rules look at."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_instance_uid
        for keyword in ("SeriesInstanceUID", "Modality", "BodyPartExamined", "ViewPosition", "SeriesDescription",
                        "SeriesNumber", "NumberOfSeriesRelatedInstances"):
            setattr(query, keyword, "")
        return [SeriesMatch(series_instance_uid=_text(d, "SeriesInstanceUID"), modality=_text(d, "Modality"),
                            body_part_examined=_text(d, "BodyPartExamined"), view_position=_text(d, "ViewPosition"),
                            series_description=_text(d, "SeriesDescription"), series_number=_int(d, "SeriesNumber"),
                            instances=_int(d, "NumberOfSeriesRelatedInstances"))
                for d in self._find(query, "series") if _text(d, "SeriesInstanceUID")]

    def move_series(self, study_instance_uid: str, series_instance_uid: str) -> RetrieveOutcome:
        """C-MOVE one series to ``source.move_destination`` (the node itself, by default)."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        with self._association(ae, "C-MOVE") as assoc:
            responses = assoc.send_c_move(self._series_identifier(study_instance_uid, series_instance_uid),
                                          self.source.move_destination, StudyRootQueryRetrieveInformationModelMove)
            return self._retrieve_outcome(responses, "C-MOVE")

    def get_series(self, study_instance_uid: str, series_instance_uid: str, store: StoreTarget) -> RetrieveOutcome:
        """C-GET one series; each instance on this association goes to ``store``."""
        stored = [0]

        def on_store(event: Any) -> int:
            try:
                store(_received(event), str(event.context.abstract_syntax))
            except Exception as exc:  # noqa: BLE001 - the PACS counts it failed; the reason is logged
                log.warning("prior %s: C-GET instance not kept: %s", self.source.name, type(exc).__name__)
                return 0xA700
            stored[0] += 1
            return 0x0000

        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in GET_STORAGE_CLASSES:
            for syntax in GET_TRANSFER_SYNTAXES:
                ae.add_requested_context(sop_class, syntax)
        roles = [build_role(sop_class, scp_role=True) for sop_class in GET_STORAGE_CLASSES]
        with self._association(ae, "C-GET", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            responses = assoc.send_c_get(self._series_identifier(study_instance_uid, series_instance_uid),
                                         StudyRootQueryRetrieveInformationModelGet)
            outcome = self._retrieve_outcome(responses, "C-GET")
        return RetrieveOutcome(outcome.status, outcome.completed, outcome.failed, outcome.warning, stored[0])

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def where(self) -> str:
        s = self.source
        return f"PACS {s.name} ({s.ae_title}@{s.host}:{s.port})"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _timed_out(self) -> QueryRetrieveError:
        return QueryRetrieveError(f"PACS {self.source.name} did not answer within "
                                  f"{self.source.timeout_seconds:g} s", timed_out=True)

    def _ae(self) -> AE:
        left = self.remaining()
        if left <= 0:
            raise self._timed_out()
        ae = AE(ae_title=self.calling_ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = max(left, 0.1)
        return ae

    @staticmethod
    def _series_identifier(study_instance_uid: str, series_instance_uid: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_instance_uid
        ds.SeriesInstanceUID = series_instance_uid
        return ds

    def _association(self, ae: AE, what: str, **kwargs: Any) -> "_Bounded":
        return _Bounded(self, ae, what, kwargs)

    def _find(self, query: Dataset, level: str) -> list[Dataset]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        found: list[Dataset] = []
        with self._association(ae, f"C-FIND {level}") as assoc:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = int(status.Status) if status is not None and "Status" in status else None
                if code in _PENDING:
                    if identifier is not None:
                        found.append(identifier)
                    continue
                if code == 0x0000:
                    return found
                if code is None:
                    break
                raise QueryRetrieveError(f"{self.where} answered C-FIND ({level}) with status 0x{code:04X}")
        raise self._timed_out() if self.remaining() <= 0 else QueryRetrieveError(
            f"{self.where}: C-FIND ({level}) ended without a final response (association aborted or timed out)")

    def _retrieve_outcome(self, responses: Iterator[tuple[Dataset, Dataset | None]], what: str) -> RetrieveOutcome:
        last: Dataset | None = None
        for status, _ in responses:
            if status is None or "Status" not in status:
                break
            last = status
            if int(status.Status) not in _PENDING:
                break
        if last is None or int(last.Status) in _PENDING:
            if self.remaining() <= 0:
                raise self._timed_out()
            raise QueryRetrieveError(f"{self.where}: {what} ended without a final response "
                                     "(association aborted or timed out)")
        code = int(last.Status)
        outcome = RetrieveOutcome(code, _int(last, "NumberOfCompletedSuboperations") or 0,
                                  _int(last, "NumberOfFailedSuboperations") or 0,
                                  _int(last, "NumberOfWarningSuboperations") or 0)
        if code == 0x0000 or code in _WARNING:
            return outcome
        why = {0xA801: "move destination unknown to the PACS", 0xA701: "out of resources (matches)",
               0xA702: "out of resources (sub-operations)", 0xFE00: "cancelled"}.get(code, "")
        comment = str(last.get("ErrorComment", "") or "")
        raise QueryRetrieveError(f"{self.where} answered {what} with status 0x{code:04X}"
                                 + (f" ({why})" if why else "") + (f": {comment}" if comment else "")
                                 + f"; {outcome.completed} completed, {outcome.failed} failed")


def _received(event: Any) -> bytes | Path:
    """A C-STORE's data set on the C-GET association: pynetdicom's spool file when it wrote one
    (``STORE_RECV_CHUNKED_DATASET``, the node's library path), else Part 10 bytes."""
    try:
        path = event.dataset_path
    except AttributeError:
        path = None
    return Path(path) if path is not None else event.encoded_dataset(include_meta=True)


class _Bounded:
    """An association for one operation that the deadline ends: a watchdog aborts it, and leaving
    the ``with`` releases it (or aborts one that is no longer established)."""

    def __init__(self, scu: QueryRetrieveSCU, ae: AE, what: str, kwargs: dict[str, Any]) -> None:
        self.scu, self.ae, self.what, self.kwargs = scu, ae, what, kwargs
        self.assoc: Any = None
        self.fired = threading.Event()
        self.timer: threading.Timer | None = None

    def __enter__(self) -> Any:
        s = self.scu.source
        started = time.monotonic()
        self.assoc = self.ae.associate(s.host, s.port, ae_title=s.ae_title, **self.kwargs)
        if not self.assoc.is_established:
            if self.scu.remaining() <= 0:
                raise self.scu._timed_out()
            how = "was rejected" if self.assoc.is_rejected else \
                "failed (port closed, host unreachable or aborted)"
            raise QueryRetrieveError(f"association to {self.scu.where} for {self.what} {how} "
                                     f"after {time.monotonic() - started:.1f} s")
        self.timer = threading.Timer(max(self.scu.remaining(), 0.0), self._expire)
        self.timer.daemon = True
        self.timer.start()
        return self.assoc

    def _expire(self) -> None:
        self.fired.set()
        if self.assoc is not None and self.assoc.is_established:
            log.warning("prior %s: %s still running at the deadline; association aborted",
                        self.scu.source.name, self.what)
            self.assoc.abort()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.assoc is not None and self.assoc.is_established:
            if exc_type is None and not self.fired.is_set():
                self.assoc.release()
            else:
                self.assoc.abort()
        if self.fired.is_set() and exc_type is None:
            raise self.scu._timed_out()
