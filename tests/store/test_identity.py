"""A PACS never mixes patients (issue 21): an instance whose Study, Series and Patient disagree with
what the index holds for its UIDs is refused inside the index transaction.

Compared: for an existing series, its Study Instance UID and its patient's Patient ID + Issuer of
Patient ID; for an existing study (a new series), its patient's Patient ID.  A replacement may not
move an instance to another series.  Refused with :class:`IdentityConflict` (0xA900): no file, no
row, the existing series untouched (not even its receive timer or its completion state).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql

from scp_node.audit import AuditTrail, Event
from scp_node.dimse.status_codes import StoreStatus
from scp_node.store import index
from scp_node.store.db import Database
from scp_node.store.driver import CoreTransaction
from scp_node.store.ingest import IdentityConflict, IngestOutcome, Ingestor, InvalidInstance
from scp_node.store.models import AuditEvent, Instance, Patient, Series, SeriesState, Study
from tests.store.realdata import CT_PATIENT_ID, CT_SLICES, ORIGIN, count, read_bytes, rewritten

ATTACKER_ID = "ATTACKER-0042"


@pytest.fixture(params=["sqlite-driver", "sqlalchemy-core", "postgresql"])
def index_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Each test on SQLite's driver path, through SQLAlchemy's Core execution (PostgreSQL's path)
    on SQLite, and on a real PostgreSQL (the run's throw-away cluster, tests/support/postgres.py)."""
    if request.param == "postgresql":
        db = Database(request.getfixturevalue("postgres_url"))
        yield db
        db.dispose()
        return
    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    if request.param == "sqlalchemy-core":
        @contextmanager
        def core() -> Iterator[CoreTransaction]:
            with db.transaction() as conn:
                yield CoreTransaction(conn)

        db.index_transaction = core  # type: ignore[method-assign]
    yield db
    db.dispose()


def _files(storage: Path) -> list[Path]:
    return sorted(p for p in storage.rglob("*") if p.is_file()) if storage.exists() else []


def _snapshot(db: Database, storage: Path) -> dict[str, Any]:
    """Everything a refused store must leave as it was."""
    with db.session() as s:
        series = [(r.id, r.series_instance_uid, r.study_fk, r.state, r.version, r.last_received_at,
                   r.completed_at) for r in s.scalars(select(Series).order_by(Series.id))]
        instances = [(r.sop_instance_uid, r.series_fk, r.sha256, r.path)
                     for r in s.scalars(select(Instance).order_by(Instance.id))]
    return dict(series=series, instances=instances, patients=count(db, Patient), studies=count(db, Study),
                stored_events=_events(db, Event.INSTANCE_STORED), files=_files(storage))


def _events(db: Database, event: str) -> int:
    with db.session() as s:
        return len(list(s.scalars(select(AuditEvent).where(AuditEvent.event == event))))


def _first_series(ingestor: Ingestor) -> pydicom.Dataset:
    for path in CT_SLICES[:3]:
        assert ingestor.ingest(read_bytes(path), ORIGIN) is IngestOutcome.STORED
    return pydicom.dcmread(CT_SLICES[0], stop_before_pixels=True)


def _no_patient_data(message: str) -> None:
    assert ATTACKER_ID not in message and CT_PATIENT_ID not in message


@pytest.mark.parametrize(("attack", "changes", "reason"), [
    ("other study and patient", dict(StudyInstanceUID="new", PatientID=ATTACKER_ID), index.SERIES_CONFLICT),
    ("other patient, same study", dict(PatientID=ATTACKER_ID), index.SERIES_CONFLICT),
    ("other issuer of the same patient ID", dict(IssuerOfPatientID="OTHER-HOSPITAL"), index.SERIES_CONFLICT),
    ("other study, same patient", dict(StudyInstanceUID="new"), index.SERIES_CONFLICT),
    ("no patient ID", dict(PatientID=""), index.SERIES_CONFLICT),
    ("new series in the study, other patient", dict(SeriesInstanceUID="new", PatientID=ATTACKER_ID),
     index.STUDY_CONFLICT),
])
def test_an_instance_of_another_identity_is_refused_and_changes_nothing(
        ingestor: Ingestor, index_db: Database, storage_dir: Path, attack: str, changes: dict[str, str],
        reason: str) -> None:
    _first_series(ingestor)
    before = _snapshot(index_db, storage_dir)
    values = {k: generate_uid() if v == "new" else v for k, v in changes.items()}
    data = rewritten(CT_SLICES[3], SOPInstanceUID=generate_uid(), **values)

    with pytest.raises(IdentityConflict) as info:
        ingestor.ingest(data, ORIGIN)

    assert str(info.value) == reason, attack
    assert isinstance(info.value, InvalidInstance)
    assert info.value.status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    _no_patient_data(str(info.value))
    assert _snapshot(index_db, storage_dir) == before  # no file, no row, the series untouched


def test_a_refused_instance_does_not_reopen_a_completed_series(ingestor: Ingestor, index_db: Database,
                                                               storage_dir: Path) -> None:
    first = _first_series(ingestor)
    with index_db.session() as s:
        s.execute(update(Series).values(state=SeriesState.COMPLETE))
    before = _snapshot(index_db, storage_dir)
    attack = rewritten(CT_SLICES[3], SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(),
                       PatientID=ATTACKER_ID)
    with pytest.raises(IdentityConflict):
        ingestor.ingest(attack, ORIGIN)
    assert _snapshot(index_db, storage_dir) == before
    with index_db.session() as s:
        series = s.scalars(select(Series).where(Series.series_instance_uid == first.SeriesInstanceUID)).one()
        assert (series.state, series.version) == (SeriesState.COMPLETE, 1)


@pytest.mark.parametrize(("changes", "outcome"), [
    (dict(PatientName="Other^Spelling"), IngestOutcome.STORED),  # names are not compared
    (dict(SeriesInstanceUID="new"), IngestOutcome.STORED),  # a new series of the same study and patient
    (dict(PatientID=CT_PATIENT_ID + "  "), IngestOutcome.STORED),  # padding is not a difference
])
def test_the_same_identity_is_still_accepted(ingestor: Ingestor, index_db: Database, storage_dir: Path,
                                             changes: dict[str, str], outcome: IngestOutcome) -> None:
    _first_series(ingestor)
    values = {k: generate_uid() if v == "new" else v for k, v in changes.items()}
    assert ingestor.ingest(rewritten(CT_SLICES[3], **values), ORIGIN) is outcome
    assert count(index_db, Instance) == 4 and count(index_db, Study) == 1


def test_a_replacement_may_not_change_the_patient(index_db: Database, storage_dir: Path,
                                                  audit_trail: AuditTrail) -> None:
    ingestor = Ingestor(index_db, storage_dir, audit_trail, "replace")
    _first_series(ingestor)
    before = _snapshot(index_db, storage_dir)
    same_sop_other_patient = rewritten(CT_SLICES[0], PatientID=ATTACKER_ID)
    with pytest.raises(IdentityConflict, match="Series Instance UID already belongs"):
        ingestor.ingest(same_sop_other_patient, ORIGIN)
    assert _snapshot(index_db, storage_dir) == before
    # A replacement that keeps the identity still replaces.
    assert ingestor.ingest(rewritten(CT_SLICES[0], InstanceNumber=999), ORIGIN) is IngestOutcome.REPLACED


def test_a_replacement_may_not_move_to_another_study(index_db: Database, storage_dir: Path,
                                                     audit_trail: AuditTrail) -> None:
    ingestor = Ingestor(index_db, storage_dir, audit_trail, "replace")
    _first_series(ingestor)
    # another series, of another study, already in the index
    other = rewritten(CT_SLICES[4], SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(),
                      SeriesInstanceUID=generate_uid())
    assert ingestor.ingest(other, ORIGIN) is IngestOutcome.STORED
    other_ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(other), stop_before_pixels=True)
    before = _snapshot(index_db, storage_dir)
    moved = rewritten(CT_SLICES[0], StudyInstanceUID=other_ds.StudyInstanceUID,
                      SeriesInstanceUID=other_ds.SeriesInstanceUID)
    with pytest.raises(IdentityConflict, match="SOP Instance UID already belongs to another series"):
        ingestor.ingest(moved, ORIGIN)
    assert _snapshot(index_db, storage_dir) == before


def test_keep_first_never_moves_an_instance_either(ingestor: Ingestor, index_db: Database,
                                                   storage_dir: Path) -> None:
    """Under keep_first a different copy is only audited as a duplicate: nothing is moved."""
    _first_series(ingestor)
    before = _snapshot(index_db, storage_dir)
    moved = rewritten(CT_SLICES[0], StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                      PatientID=ATTACKER_ID)
    assert ingestor.ingest(moved, ORIGIN) is IngestOutcome.DUPLICATE_KEPT_FIRST
    assert _snapshot(index_db, storage_dir) == before


def test_a_conflict_in_a_shared_transaction_fails_alone(index_db: Database, storage_dir: Path,
                                                        audit_trail: AuditTrail) -> None:
    """Group commit: the conflicting store's batch is retried one by one, so the conflict fails
    only its own store and every other store of the batch is kept."""
    first = Ingestor(index_db, storage_dir, audit_trail, "keep_first")
    ds = _first_series(first)

    class SlowIngestor(Ingestor):
        def _decide_and_index(self, conn, unit):  # type: ignore[no-untyped-def]
            time.sleep(0.03)  # a slow commit: the other stores queue behind it
            return super()._decide_and_index(conn, unit)

    ingestor = SlowIngestor(index_db, storage_dir, audit_trail, "keep_first")
    payloads = [read_bytes(p) for p in CT_SLICES[3:]]
    attack_sop = generate_uid()
    bad = 2
    payloads.insert(bad, rewritten(CT_SLICES[3], SOPInstanceUID=attack_sop, StudyInstanceUID=generate_uid(),
                                   PatientID=ATTACKER_ID))
    barrier = threading.Barrier(len(payloads))
    outcomes: dict[int, object] = {}

    def send(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = ingestor.ingest(payloads[i], ORIGIN)
        except Exception as exc:  # noqa: BLE001 - asserted below
            outcomes[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert isinstance(outcomes[bad], IdentityConflict), outcomes
    others = [outcomes[i] for i in range(len(payloads)) if i != bad]
    assert others == [IngestOutcome.STORED] * (len(payloads) - 1)
    assert ingestor._group.batches < ingestor._group.units  # some stores shared a transaction
    assert count(index_db, Instance) == len(CT_SLICES)
    with index_db.session() as s:
        assert s.scalars(select(Instance).where(Instance.sop_instance_uid == attack_sop)).first() is None
        series = s.scalars(select(Series)).one()
        assert series.series_instance_uid == ds.SeriesInstanceUID
        assert {p.patient_id for p in s.scalars(select(Patient))} == {CT_PATIENT_ID}
    assert len(_files(storage_dir)) == len(CT_SLICES)


def test_the_identity_is_read_in_the_same_select_on_postgresql() -> None:
    """No extra round trip: the series and study look-ups join to their study and patient, in
    Core statements that PostgreSQL's dialect compiles as they are."""
    for stmt, table in ((index._FIND_SERIES, "series"), (index._FIND_STUDY, "studies")):
        sql = str(stmt.compile(dialect=postgresql.dialect()))
        assert sql.count("SELECT") == 1 and "JOIN patients" in sql and f"FROM {table}" in sql, sql
