"""Ingest: bytes kept as received, index rows, duplicate policy, refusals, no orphans, late arrivals."""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from sqlalchemy import false, select, text

from scp_node.audit import AuditTrail, Event
from scp_node.scheduler.completion import SeriesCompletion
from scp_node.store import index
from scp_node.store.db import Database
from scp_node.store.driver import CoreTransaction
from scp_node.dimse.status_codes import StoreStatus
from scp_node.store.ingest import (IdentityConflict, IngestOutcome, Ingestor, InvalidInstance, Origin, StorageFailure,
                                   parse_header)
from scp_node.store.models import AuditEvent, Instance, Patient, Series, SeriesState, Study
from tests.store.realdata import (CT_PATIENT_ID, CT_SLICES, CXR_DX_J2K, CXR_UNCR, ORIGIN, SMALL_MR,
                                  TS_CT_EXPLICIT, TS_CT_IMPLICIT, count, read_bytes, rewritten)

# The refusal tests feed invalid UIDs on purpose; pydicom warns when it reads them.
pytestmark = pytest.mark.filterwarnings("ignore:(Invalid value for VR UI|The value length):UserWarning")


@pytest.fixture(params=["sqlite-driver", "sqlalchemy-core"])
def index_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Every test here twice: with the index statements on SQLite's driver (the default) and
    through SQLAlchemy's execution layer (the path any other database takes)."""
    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    if request.param == "sqlalchemy-core":
        @contextmanager
        def core() -> Iterator[CoreTransaction]:
            with db.transaction() as conn:
                yield CoreTransaction(conn)

        db.index_transaction = core  # type: ignore[method-assign]
    yield db
    db.dispose()


def stored_files(storage: Path) -> list[Path]:
    return sorted(p for p in storage.rglob("*") if p.is_file()) if storage.exists() else []


def audit_rows(db: Database, event: str | None = None) -> list[AuditEvent]:
    with db.session() as s:
        q = select(AuditEvent).order_by(AuditEvent.id)
        if event:
            q = q.where(AuditEvent.event == event)
        return list(s.scalars(q))


def instance_row(db: Database, sop_uid: str) -> Instance:
    with db.session() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one()
        s.expunge(row)
        return row


# -- a new instance -----------------------------------------------------------------------------

def test_cxr_is_stored_byte_for_byte_and_indexed(ingestor: Ingestor, index_db: Database,
                                                storage_dir: Path) -> None:
    data = read_bytes(CXR_UNCR)
    ds = pydicom.dcmread(CXR_UNCR, stop_before_pixels=True)
    origin = Origin(ae_title="MODALITY1", address="192.168.7.9", via="dimse")

    assert ingestor.ingest(data, origin) is IngestOutcome.STORED

    rel = Path(ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm")
    stored = storage_dir / rel
    assert stored.read_bytes() == data  # preamble, file meta and dataset exactly as received
    assert stored.read_bytes()[128:132] == b"DICM"
    assert stored_files(storage_dir) == [stored]  # no temporary file left next to it

    with index_db.session() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.sop_instance_uid == ds.SOPInstanceUID
        assert inst.sop_class_uid == ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
        assert inst.path == rel.as_posix()
        assert inst.size == len(data) == stored.stat().st_size
        assert inst.sha256 == hashlib.sha256(data).hexdigest()
        assert inst.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        assert inst.instance_number == 1
        assert inst.calling_ae_title == "MODALITY1" and inst.peer_address == "192.168.7.9"
        assert inst.series_version == 1
        assert inst.received_at.tzinfo is not None
        series = inst.series
        assert series.series_instance_uid == ds.SeriesInstanceUID
        assert (series.modality, series.body_part_examined, series.series_number) == ("CR", "CHEST", 1)
        assert series.state is SeriesState.RECEIVING and series.version == 1
        study = series.study
        assert study.study_instance_uid == ds.StudyInstanceUID
        assert study.study_date == "20040826"
        assert study.accession_number == str(ds.AccessionNumber)
        assert (study.patient.patient_id, study.patient.patient_name) == ("9RG1", "CompressedSamples^RG1")

    (row,) = audit_rows(index_db, Event.INSTANCE_STORED)
    assert row.sop_instance_uid == ds.SOPInstanceUID and row.ae_title == "MODALITY1"
    assert row.peer == "192.168.7.9" and f"{len(data)} bytes via dimse" in row.detail


def test_compressed_cxr_is_kept_compressed(ingestor: Ingestor, index_db: Database, storage_dir: Path) -> None:
    data = read_bytes(CXR_DX_J2K)
    assert ingestor.ingest(data, ORIGIN) is IngestOutcome.STORED
    (stored,) = stored_files(storage_dir)
    assert stored.read_bytes() == data
    with index_db.session() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.transfer_syntax_uid == "1.2.840.10008.1.2.4.90"
        assert inst.series.modality == "DX"


def test_ct_slices_share_one_patient_study_series(ingest_files, index_db: Database, storage_dir: Path) -> None:
    slices = CT_SLICES[:4]
    assert ingest_files(*slices) == [IngestOutcome.STORED] * 4
    for path in slices:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        target = storage_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert target.read_bytes() == path.read_bytes()
        row = instance_row(index_db, ds.SOPInstanceUID)
        assert row.instance_number == int(ds.InstanceNumber)
    assert (count(index_db, Patient), count(index_db, Study), count(index_db, Series),
            count(index_db, Instance)) == (1, 1, 1, 4)
    with index_db.session() as s:
        series = s.scalars(select(Series)).one()
        assert series.modality == "CT" and series.body_part_examined == "CHEST"
        assert series.series_number == 3000566
        assert series.study.patient.patient_id == CT_PATIENT_ID
        assert series.first_received_at <= series.last_received_at


# -- duplicates -------------------------------------------------------------------------------

def test_identical_copy_is_a_duplicate_without_a_new_row_or_rewrite(ingestor: Ingestor, index_db: Database,
                                                                    storage_dir: Path) -> None:
    data = read_bytes(CT_SLICES[0])
    assert ingestor.ingest(data, ORIGIN) is IngestOutcome.STORED
    (stored,) = stored_files(storage_dir)
    inode = stored.stat().st_ino
    received_at = instance_row(index_db, pydicom.dcmread(CT_SLICES[0], stop_before_pixels=True).SOPInstanceUID
                               ).received_at

    assert ingestor.ingest(data, Origin("OTHER", "10.9.9.9")) is IngestOutcome.DUPLICATE_IDENTICAL

    assert count(index_db, Instance) == 1
    assert stored_files(storage_dir) == [stored] and stored.stat().st_ino == inode  # not rewritten
    (dup,) = audit_rows(index_db, Event.INSTANCE_DUPLICATE)
    assert dup.outcome == "success" and "identical" in dup.detail and dup.ae_title == "OTHER"
    assert len(audit_rows(index_db, Event.INSTANCE_STORED)) == 1
    with index_db.session() as s:
        assert s.scalars(select(Instance)).one().received_at == received_at


def test_different_bytes_same_uid_keep_first(ingestor: Ingestor, index_db: Database, storage_dir: Path) -> None:
    first, second = read_bytes(TS_CT_EXPLICIT), read_bytes(TS_CT_IMPLICIT)
    assert first != second
    uid = pydicom.dcmread(TS_CT_EXPLICIT, stop_before_pixels=True).SOPInstanceUID
    assert pydicom.dcmread(TS_CT_IMPLICIT, stop_before_pixels=True).SOPInstanceUID == uid

    assert ingestor.ingest(first, ORIGIN) is IngestOutcome.STORED
    assert ingestor.ingest(second, ORIGIN) is IngestOutcome.DUPLICATE_KEPT_FIRST

    (stored,) = stored_files(storage_dir)
    assert stored.read_bytes() == first
    row = instance_row(index_db, uid)
    assert row.sha256 == hashlib.sha256(first).hexdigest()
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    (dup,) = audit_rows(index_db, Event.INSTANCE_DUPLICATE)
    assert dup.outcome == "warning" and "keep_first" in dup.detail and dup.sop_instance_uid == uid


def test_different_bytes_same_uid_replace(index_db: Database, storage_dir: Path, audit_trail: AuditTrail) -> None:
    ingestor = Ingestor(index_db, storage_dir, audit_trail, "replace")
    first, second = read_bytes(TS_CT_EXPLICIT), read_bytes(TS_CT_IMPLICIT)
    uid = pydicom.dcmread(TS_CT_EXPLICIT, stop_before_pixels=True).SOPInstanceUID

    assert ingestor.ingest(first, ORIGIN) is IngestOutcome.STORED
    assert ingestor.ingest(second, Origin("SECOND", "10.0.0.2")) is IngestOutcome.REPLACED

    (stored,) = stored_files(storage_dir)  # swapped in place: no ".new" file, no second file
    assert stored.read_bytes() == second
    assert count(index_db, Instance) == 1
    row = instance_row(index_db, uid)
    assert row.sha256 == hashlib.sha256(second).hexdigest()
    assert row.size == len(second)
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2"
    assert row.calling_ae_title == "SECOND"
    stored_events = audit_rows(index_db, Event.INSTANCE_STORED)
    assert len(stored_events) == 2 and "replaced" in stored_events[1].detail
    # the identical second copy is still just a duplicate under "replace"
    assert ingestor.ingest(second, ORIGIN) is IngestOutcome.DUPLICATE_IDENTICAL


class _Crash(BaseException):
    """Stands for kill -9: nothing after it runs (not even ``except Exception``)."""


def test_replace_crash_after_commit_leaves_the_index_pointing_at_a_whole_file(
        index_db: Database, storage_dir: Path, audit_trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> None:
    ingestor = Ingestor(index_db, storage_dir, audit_trail, "replace")
    first, second = read_bytes(TS_CT_EXPLICIT), read_bytes(TS_CT_IMPLICIT)
    uid = pydicom.dcmread(TS_CT_EXPLICIT, stop_before_pixels=True).SOPInstanceUID
    ingestor.ingest(first, ORIGIN)
    old_path = storage_dir / instance_row(index_db, uid).path

    def crash(_path: Path) -> None:
        raise _Crash()

    monkeypatch.setattr("scp_node.store.ingest.remove_quietly", crash)  # the old file's removal never runs
    with pytest.raises(_Crash):
        ingestor.ingest(second, ORIGIN)
    monkeypatch.undo()
    row = instance_row(index_db, uid)
    assert (storage_dir / row.path).read_bytes() == second  # committed: the index has the new, whole file
    assert old_path.read_bytes() == first and row.sha256 == hashlib.sha256(second).hexdigest()
    # At the next start the old copy, which nothing refers to, is quarantined (never deleted).
    assert Ingestor(index_db, storage_dir, audit_trail).recover() == (0, 1)
    assert stored_files(storage_dir) == [storage_dir / row.path]
    assert (storage_dir.parent / "quarantine" / old_path.relative_to(storage_dir)).read_bytes() == first


def test_replace_with_other_series_uid_is_refused_and_leaves_no_orphan(index_db: Database, storage_dir: Path,
                                                                       audit_trail: AuditTrail) -> None:
    """A replacement may not move an instance to another series (issue 21): refused, the stored
    copy and its row untouched, no file left by the refused one."""
    ingestor = Ingestor(index_db, storage_dir, audit_trail, "replace")
    first = read_bytes(SMALL_MR)
    moved = rewritten(SMALL_MR, SeriesInstanceUID="1.2.826.0.1.3680043.8.498.999")
    uid = pydicom.dcmread(SMALL_MR, stop_before_pixels=True).SOPInstanceUID

    assert ingestor.ingest(first, ORIGIN) is IngestOutcome.STORED
    with pytest.raises(IdentityConflict, match="SOP Instance UID already belongs to another series") as info:
        ingestor.ingest(moved, ORIGIN)
    assert info.value.status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS

    row = instance_row(index_db, uid)
    assert "/1.2.826.0.1.3680043.8.498.999/" not in row.path
    assert stored_files(storage_dir) == [storage_dir / row.path]
    assert (storage_dir / row.path).read_bytes() == first
    assert count(index_db, Series) == 1


# -- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
@pytest.mark.parametrize("bad", ["../x", "1.2/3", "1.2.3/../../../etc/passwd", "1." + "2" * 63, "1.2.3a", ""])
def test_unsafe_uids_are_refused_and_leave_no_file(ingestor: Ingestor, index_db: Database, storage_dir: Path,
                                                   keyword: str, bad: str) -> None:
    if bad == "" and keyword == "SOPInstanceUID":
        data = rewritten(SMALL_MR, SOPInstanceUID=None)
    else:
        data = rewritten(SMALL_MR, **{keyword: bad})
    with pytest.raises(InvalidInstance, match=keyword):
        ingestor.ingest(data, ORIGIN)
    assert stored_files(storage_dir) == []
    assert not (storage_dir.parent / "etc").exists()
    assert count(index_db, Instance) == 0 and count(index_db, Series) == 0


def test_uid_of_exactly_64_characters_is_accepted(ingestor: Ingestor, storage_dir: Path) -> None:
    uid = "1." + "2" * 62
    assert len(uid) == 64
    assert ingestor.ingest(rewritten(SMALL_MR, SOPInstanceUID=uid), ORIGIN) is IngestOutcome.STORED
    assert [p.name for p in stored_files(storage_dir)] == [f"{uid}.dcm"]


@pytest.mark.parametrize("data", [
    b"",
    b"hello, this is not DICOM at all" * 10,
    b"\x00" * 128 + b"DICM" + b"\xff" * 64,
    b"%PDF-1.7\n" + b"\x00" * 500,
])
def test_non_dicom_bytes_are_refused(ingestor: Ingestor, storage_dir: Path, index_db: Database,
                                     data: bytes) -> None:
    with pytest.raises(InvalidInstance):
        ingestor.ingest(data, ORIGIN)
    assert stored_files(storage_dir) == [] and count(index_db, Instance) == 0


@pytest.mark.parametrize("path, keep", [
    (CT_SLICES[0], 0.5),  # cut inside the pixel data
    (CT_SLICES[0], 0.999),
    (CXR_UNCR, 0.9),
    (CXR_DX_J2K, 0.7),  # encapsulated pixel data without its delimiter
    (TS_CT_EXPLICIT, 0.02),  # cut inside the header
])
def test_truncated_file_is_refused(ingestor: Ingestor, storage_dir: Path, index_db: Database,
                                   path: Path, keep: float) -> None:
    data = read_bytes(path)
    with pytest.raises(InvalidInstance):
        ingestor.ingest(data[:int(len(data) * keep)], ORIGIN)
    assert stored_files(storage_dir) == [] and count(index_db, Instance) == 0


def test_truncated_deflated_file_is_refused_as_invalid() -> None:
    deflated = read_bytes(SMALL_MR.parents[2] / "cornerstone_ct" /
                          "CTImage.dcm_DeflatedExplicitVRLittleEndianTransferSyntax_1.2.840.10008.1.2.1.99.dcm")
    parse_header(deflated)  # whole: fine
    with pytest.raises(InvalidInstance):
        parse_header(deflated[: len(deflated) // 2])


def test_sop_class_must_match_the_presentation_context(ingestor: Ingestor, storage_dir: Path) -> None:
    with pytest.raises(InvalidInstance, match="does not match the presentation context") as info:
        ingestor.ingest(read_bytes(SMALL_MR), ORIGIN, expected_sop_class="1.2.840.10008.5.1.4.1.1.2")
    assert info.value.status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert stored_files(storage_dir) == []


def test_media_storage_uid_must_match(ingestor: Ingestor, storage_dir: Path) -> None:
    ds = pydicom.dcmread(SMALL_MR)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=False)  # keeps the (now inconsistent) file meta as set
    with pytest.raises(InvalidInstance, match="MediaStorageSOPInstanceUID"):
        ingestor.ingest(buf.getvalue(), ORIGIN)
    assert stored_files(storage_dir) == []


# -- index failures: no orphan file, StorageFailure -------------------------------------------

def test_dropped_instances_table_is_a_storage_failure(ingestor: Ingestor, index_db: Database,
                                                      storage_dir: Path) -> None:
    with index_db.session() as s:
        s.execute(text("DROP TABLE instances"))
    with pytest.raises(StorageFailure, match="index"):
        ingestor.ingest(read_bytes(CT_SLICES[0]), ORIGIN)
    assert stored_files(storage_dir) == []


def test_failed_index_commit_removes_the_written_file(ingestor: Ingestor, index_db: Database,
                                                      storage_dir: Path) -> None:
    # The duplicate check reads instances fine; the commit then fails on the audit insert.
    with index_db.session() as s:
        s.execute(text("DROP TABLE audit_events"))
    with pytest.raises(StorageFailure, match="index write failed"):
        ingestor.ingest(read_bytes(CT_SLICES[0]), ORIGIN)
    assert stored_files(storage_dir) == []
    assert count(index_db, Instance) == 0 and count(index_db, Series) == 0  # rolled back together


def test_constraint_failure_on_every_retry_removes_the_file(ingestor: Ingestor, index_db: Database,
                                                            storage_dir: Path) -> None:
    with index_db.session() as s:
        s.execute(text("CREATE TRIGGER no_inst BEFORE INSERT ON instances BEGIN SELECT RAISE(ABORT, 'no'); END"))
    with pytest.raises(StorageFailure, match="IntegrityError"):
        ingestor.ingest(read_bytes(CT_SLICES[0]), ORIGIN)
    assert stored_files(storage_dir) == []
    assert count(index_db, Instance) == 0


def test_failed_replace_keeps_the_old_file_and_row(index_db: Database, storage_dir: Path,
                                                   audit_trail: AuditTrail) -> None:
    ingestor = Ingestor(index_db, storage_dir, audit_trail, "replace")
    first, second = read_bytes(TS_CT_EXPLICIT), read_bytes(TS_CT_IMPLICIT)
    ingestor.ingest(first, ORIGIN)
    with index_db.session() as s:
        s.execute(text("CREATE TRIGGER no_upd BEFORE UPDATE ON instances BEGIN SELECT RAISE(ABORT, 'no'); END"))
    with pytest.raises(StorageFailure):
        ingestor.ingest(second, ORIGIN)
    (stored,) = stored_files(storage_dir)  # the ".new" file is gone
    assert stored.read_bytes() == first
    uid = pydicom.dcmread(TS_CT_EXPLICIT, stop_before_pixels=True).SOPInstanceUID
    assert instance_row(index_db, uid).sha256 == hashlib.sha256(first).hexdigest()


def test_unwritable_storage_is_a_storage_failure(index_db: Database, tmp_path: Path,
                                                 audit_trail: AuditTrail) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"x")
    ingestor = Ingestor(index_db, blocker, audit_trail)
    with pytest.raises(StorageFailure, match="cannot write file"):
        ingestor.ingest(read_bytes(SMALL_MR), ORIGIN)
    assert count(index_db, Instance) == 0


# -- late arrival, concurrency ----------------------------------------------------------------

def test_late_arrival_after_completion_starts_a_new_version(ingestor: Ingestor, index_db: Database,
                                                            audit_trail: AuditTrail) -> None:
    for p in CT_SLICES[:2]:
        ingestor.ingest(read_bytes(p), ORIGIN)
    with index_db.session() as s:
        last = s.scalars(select(Series)).one().last_received_at
    assert SeriesCompletion(index_db, audit_trail, 5, 3600).run_once(now=last + timedelta(seconds=6)) == 1
    with index_db.session() as s:
        series = s.scalars(select(Series)).one()
        assert series.state is SeriesState.COMPLETE and series.completed_at is not None

    assert ingestor.ingest(read_bytes(CT_SLICES[2]), ORIGIN) is IngestOutcome.STORED

    with index_db.session() as s:
        series = s.scalars(select(Series)).one()
        assert series.state is SeriesState.RECEIVING
        assert series.version == 2
        assert series.completed_at is None
        assert series.version_started_at > last
        versions = sorted(i.series_version for i in series.instances)
        assert versions == [1, 1, 2]
    # a duplicate of an old instance does not reopen anything
    ingestor.ingest(read_bytes(CT_SLICES[0]), ORIGIN)
    with index_db.session() as s:
        assert s.scalars(select(Series)).one().version == 2


def test_concurrent_ingest_of_one_new_series_creates_one_row_each(ingestor: Ingestor, index_db: Database,
                                                                  storage_dir: Path) -> None:
    payloads = [read_bytes(p) for p in CT_SLICES]
    barrier = threading.Barrier(len(payloads))
    outcomes: list[object] = []

    def send(data: bytes) -> None:
        barrier.wait()
        try:
            outcomes.append(ingestor.ingest(data, ORIGIN))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=send, args=(d,)) for d in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes == [IngestOutcome.STORED] * len(payloads)
    assert (count(index_db, Patient), count(index_db, Study), count(index_db, Series),
            count(index_db, Instance)) == (1, 1, 1, len(payloads))
    assert len(stored_files(storage_dir)) == len(payloads)


def test_same_instance_from_two_threads_is_stored_once(ingestor: Ingestor, index_db: Database,
                                                       storage_dir: Path) -> None:
    data = read_bytes(CT_SLICES[0])
    barrier = threading.Barrier(4)
    outcomes: list[object] = []

    def send() -> None:
        barrier.wait()
        outcomes.append(ingestor.ingest(data, ORIGIN))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(o.value for o in outcomes) == sorted(["stored"] + ["duplicate-identical"] * 3)
    assert count(index_db, Instance) == 1 and len(stored_files(storage_dir)) == 1


def test_integrity_error_on_the_series_row_is_retried(index_db: Database, storage_dir: Path,
                                                      audit_trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> None:
    """Losing the race for the series row: another association inserted it first.

    On SQLite (BEGIN IMMEDIATE) the race cannot happen for real; on a server database it can. The
    first attempt's series look-up is blinded (as a look-up before the other transaction committed
    would be), so the series insert fails with the real IntegrityError the retry path handles.
    """
    Ingestor(index_db, storage_dir, audit_trail).ingest(read_bytes(CT_SLICES[0]), ORIGIN)
    attempts: list[int] = []
    seeing = index._FIND_SERIES

    class RacingIngestor(Ingestor):
        def _decide_and_index(self, conn, unit):  # type: ignore[no-untyped-def]
            monkeypatch.setattr(index, "_FIND_SERIES", seeing.where(false()) if not attempts else seeing)
            attempts.append(1)
            return super()._decide_and_index(conn, unit)

    racing = RacingIngestor(index_db, storage_dir, audit_trail)
    assert racing.ingest(read_bytes(CT_SLICES[1]), ORIGIN) is IngestOutcome.STORED
    assert len(attempts) == 2
    assert (count(index_db, Series), count(index_db, Instance)) == (1, 2)
    assert len(stored_files(storage_dir)) == 2
    assert len(audit_rows(index_db, Event.INSTANCE_STORED)) == 2  # the failed attempt left no row


def test_recover_quarantines_unindexed_files_and_never_deletes_them(index_db: Database, storage_dir: Path,
                                                                    ingestor: Ingestor, tmp_path: Path) -> None:
    from tests.store.realdata import CT_SLICES, ORIGIN, read_bytes

    for i in range(3):
        ingestor.ingest(read_bytes(CT_SLICES[i]), ORIGIN)
    stored = sorted(p for p in storage_dir.rglob("*.dcm"))
    # An index that does not belong to this storage (empty): nothing is touched.
    other = Ingestor(Database(f"sqlite:///{tmp_path / 'other.db'}"), storage_dir, ingestor.audit)
    assert other.recover() == (0, 0)
    assert sorted(storage_dir.rglob("*.dcm")) == stored
    # A file the index never accepted (a crash between write and commit) is moved aside, not deleted.
    stray = stored[0].with_name("1.2.3.4.dcm")
    stray.write_bytes(b"x")
    (stored[0].parent / ".x.dcm.abc.tmp").write_bytes(b"partial")
    assert ingestor.recover() == (1, 1)
    assert not stray.exists() and sorted(storage_dir.rglob("*.dcm")) == stored
    assert (storage_dir.parent / "quarantine" / stray.relative_to(storage_dir)).read_bytes() == b"x"


def test_concurrent_stores_share_commits_and_a_failing_one_fails_alone(
        index_db: Database, storage_dir: Path, audit_trail: AuditTrail) -> None:
    """Group commit with real rows and files: stores that arrive during a commit are committed
    together; one that fails inside the shared transaction is retried alone and fails alone."""
    import time as _time

    payloads = [read_bytes(p) for p in CT_SLICES]
    bad_sop = pydicom.dcmread(BytesIO(payloads[2]), stop_before_pixels=True).SOPInstanceUID

    class SlowIngestor(Ingestor):
        def _decide_and_index(self, conn, unit):  # type: ignore[no-untyped-def]
            _time.sleep(0.03)  # a slow commit: the other stores queue behind it
            if unit.row.sop_instance_uid == bad_sop:
                raise RuntimeError("this instance cannot be indexed")
            return super()._decide_and_index(conn, unit)

    ingestor = SlowIngestor(index_db, storage_dir, audit_trail, "keep_first")
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
    assert isinstance(outcomes[2], RuntimeError)
    assert [outcomes[i] for i in range(len(payloads)) if i != 2] == [IngestOutcome.STORED] * (len(payloads) - 1)
    assert count(index_db, Instance) == len(payloads) - 1
    files = stored_files(storage_dir)
    assert len(files) == len(payloads) - 1 and not [f for f in files if f.name.endswith(".tmp")]
    assert ingestor._group.batches < ingestor._group.units  # some stores shared a transaction


# -- file names: the plain name is never taken over ----------------------------------------------

def _indexed_files(db: Database, storage: Path) -> dict[Path, str]:
    with db.session() as s:
        return {storage / i.path: i.sha256 for i in s.scalars(select(Instance))}


def test_a_taken_plain_name_is_left_alone_and_the_instance_gets_its_own(ingestor: Ingestor, index_db: Database,
                                                                         storage_dir: Path) -> None:
    """The plain name held by a file the index does not know (another receiver process's store of
    the same instance, not yet committed, or what a crash left) is never overwritten."""
    data = read_bytes(CT_SLICES[0])
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    plain = storage_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    plain.parent.mkdir(parents=True)
    plain.write_bytes(b"another store's bytes")

    assert ingestor.ingest(data, ORIGIN) is IngestOutcome.STORED

    assert plain.read_bytes() == b"another store's bytes"
    row = instance_row(index_db, ds.SOPInstanceUID)
    own = storage_dir / row.path
    assert own != plain and own.parent == plain.parent and own.name.startswith(f"{ds.SOPInstanceUID}.")
    assert own.read_bytes() == data
    assert stored_files(storage_dir) == sorted([plain, own])  # no temporary file left


def test_without_hard_links_every_instance_gets_a_name_of_its_own(ingestor: Ingestor, index_db: Database,
                                                                  storage_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    def no_links(_src: object, _dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    data = [read_bytes(p) for p in CT_SLICES[:2]]
    assert [ingestor.ingest(d, ORIGIN) for d in data] == [IngestOutcome.STORED] * 2
    assert ingestor.ingest(data[0], ORIGIN) is IngestOutcome.DUPLICATE_IDENTICAL
    indexed = _indexed_files(index_db, storage_dir)
    assert sorted(indexed) == stored_files(storage_dir)
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in indexed} == set(indexed.values())


def test_a_duplicate_that_found_the_plain_name_free_leaves_no_file(index_db: Database, storage_dir: Path,
                                                                   audit_trail: AuditTrail) -> None:
    """After a replacement the index names ``<sop>.<random>.dcm`` and the plain name is free: an
    identical copy arriving then is linked to it before the transaction, found to be a duplicate
    and that name removed again."""
    ingestor = Ingestor(index_db, storage_dir, audit_trail, "replace")
    first, second = read_bytes(TS_CT_EXPLICIT), read_bytes(TS_CT_IMPLICIT)
    assert ingestor.ingest(first, ORIGIN) is IngestOutcome.STORED
    assert ingestor.ingest(second, ORIGIN) is IngestOutcome.REPLACED
    (kept,) = stored_files(storage_dir)
    assert ingestor.ingest(second, ORIGIN) is IngestOutcome.DUPLICATE_IDENTICAL
    assert stored_files(storage_dir) == [kept] and kept.read_bytes() == second
    # and a third, different copy takes the free plain name; the second copy's file goes
    third = rewritten(TS_CT_EXPLICIT, InstanceNumber=77)
    assert ingestor.ingest(third, ORIGIN) is IngestOutcome.REPLACED
    (now,) = stored_files(storage_dir)
    assert now.read_bytes() == third and now.name == f"{pydicom.dcmread(BytesIO(third)).SOPInstanceUID}.dcm"


def _store_in_own_process(db_url: str, storage: str, secret: bytes, policy: str, payloads: list[bytes],
                          start: Any) -> list[str]:
    """One receiver process: its own engine, ingestor and group commit (see the test below)."""
    from scp_node.audit import AuditTrail as Trail
    from scp_node.store.db import Database as Db
    from scp_node.store.ingest import Ingestor as Ing, Origin as Org

    db = Db(db_url)
    ing = Ing(db, Path(storage), Trail(db, secret), policy)
    start.wait()
    outcomes = [ing.ingest(p, Org("RACE", "127.0.0.1")).value for p in payloads]
    db.dispose()
    return outcomes


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_two_processes_storing_the_same_new_instances_keep_one_whole_file_each(
        policy: str, tmp_path: Path, audit_secret: bytes) -> None:
    """Two receiver processes race on the same new SOP Instance UIDs, half of them with different
    bytes: each instance ends with one index row that names a file holding exactly the bytes its
    digest says, and no file is left that the index does not name."""
    import multiprocessing

    db_url, storage = f"sqlite:///{tmp_path / 'index.db'}", tmp_path / "storage"
    Database(db_url).dispose()  # the schema, once, before the race
    a, b = [], []
    for i, path in enumerate(CT_SLICES[:8]):
        data = read_bytes(path)
        a.append(data)
        b.append(data if i % 2 else rewritten(path, InstanceNumber=1000 + i))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            results = [pool.apply_async(_store_in_own_process, (db_url, str(storage), audit_secret, policy,
                                                                 payloads, start)) for payloads in (a, b)]
            outcomes_a, outcomes_b = [r.get(120) for r in results]
    for i, pair in enumerate(zip(outcomes_a, outcomes_b)):
        assert "stored" in pair, (i, pair)  # exactly one of the two created it ...
        assert sorted(pair)[0] != sorted(pair)[1]
    db = Database(db_url)
    try:
        indexed = _indexed_files(db, storage)
        assert len(indexed) == 8
        assert sorted(indexed) == stored_files(storage)  # ... and nothing else is left
        for file, digest in indexed.items():
            assert hashlib.sha256(file.read_bytes()).hexdigest() == digest
    finally:
        db.dispose()
