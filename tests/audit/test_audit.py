"""Audit: the HMAC secret, keyed hashes, rows without clear patient identifiers, no forged lines."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text

from scp_node.audit import AuditTrail, Event, keyed_hash, load_or_create_secret
from scp_node.store.db import Database
from scp_node.store.ingest import Ingestor, InvalidInstance
from scp_node.store.models import AuditEvent
from tests.store.realdata import CT_PATIENT_ID, CT_SLICES, CXR_DX_J2K, ORIGIN, count, read_bytes, rewritten

# Real files with over-long values, and an invalid UID on purpose: pydicom warns when reading them.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.valuerep")


# -- the secret -------------------------------------------------------------------------------

def test_secret_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "var" / "audit.key"
    key = load_or_create_secret(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == key
    assert load_or_create_secret(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["audit.key"]  # no temporary file left
    assert load_or_create_secret(tmp_path / "other.key") != key


def test_existing_secret_is_used_as_is(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    path.write_bytes(b"k" * 20)
    assert load_or_create_secret(path) == b"k" * 20


def test_too_short_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="too short"):
        load_or_create_secret(path)


def test_concurrent_first_starts_agree_on_one_secret(tmp_path: Path) -> None:
    """Several processes starting at once: none may read a half-written (empty) key."""
    for round_ in range(20):
        path = tmp_path / f"r{round_}" / "audit.key"
        barrier = threading.Barrier(8)
        keys: list[object] = []

        def start() -> None:
            barrier.wait()
            try:
                keys.append(load_or_create_secret(path))
            except Exception as exc:  # noqa: BLE001 - asserted below
                keys.append(exc)

        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(keys) == 8 and len(set(keys)) == 1, keys
        assert keys[0] == path.read_bytes()
        assert [p.name for p in path.parent.iterdir()] == ["audit.key"]


# -- keyed hash -------------------------------------------------------------------------------

def test_keyed_hash_is_deterministic_and_keyed() -> None:
    a, b = b"a" * 32, b"b" * 32
    h = keyed_hash(a, "PAT-123")
    assert h == keyed_hash(a, "PAT-123")
    assert len(h) == 32 and int(h, 16) >= 0
    assert h != keyed_hash(b, "PAT-123")
    assert h != keyed_hash(a, "PAT-124")
    assert "PAT-123" not in h
    assert keyed_hash(a, "") == "" and keyed_hash(a, None) == ""


# -- rows -------------------------------------------------------------------------------------

def all_cells(db: Database) -> list[str]:
    """Every value of every column of every audit row, as text."""
    with db.session() as s:
        rows = s.execute(text("SELECT * FROM audit_events")).all()
    return [str(v) for row in rows for v in row]


def test_rows_never_hold_the_clear_patient_id(index_db: Database, storage_dir: Path,
                                              audit_trail: AuditTrail, audit_secret: bytes) -> None:
    ingestor = Ingestor(index_db, storage_dir, audit_trail)
    cxr_pid = "2010101610-1"  # PatientID of the Canon DX
    for p in CT_SLICES[:2]:
        ingestor.ingest(read_bytes(p), ORIGIN)
    ingestor.ingest(read_bytes(CT_SLICES[0]), ORIGIN)  # duplicate event
    ingestor.ingest(read_bytes(CXR_DX_J2K), ORIGIN)
    with pytest.raises(InvalidInstance):
        ingestor.ingest(rewritten(CT_SLICES[2], SOPInstanceUID="../x"), ORIGIN)

    cells = all_cells(index_db)
    assert len(cells) > 0 and count(index_db, AuditEvent) == 4
    assert not [c for c in cells if CT_PATIENT_ID in c or cxr_pid in c]
    with index_db.session() as s:
        hashes = {r.sop_instance_uid: r.patient_hash for r in s.scalars(select(AuditEvent))}
    assert set(hashes.values()) == {keyed_hash(audit_secret, CT_PATIENT_ID), keyed_hash(audit_secret, cxr_pid)}


def test_record_hashes_patient_id_and_escapes_control_characters(index_db: Database, audit_trail: AuditTrail,
                                                          audit_secret: bytes) -> None:
    audit_trail.record(Event.INSTANCE_REJECTED, outcome="failure", ae_title="EVIL\r\n\x1bAE",
                       peer="1.2.3.4\n2024-01-01 fake line", study_uid="1.2\r3", series_uid="4\n5",
                       sop_uid="6\r\n7", patient_id="SECRET-PID-42",
                       detail="line one\r\n2024-01-01T00:00:00 INFO instance.stored forged\nthree")
    (row,) = all_rows(index_db)
    values = [getattr(row, c) for c in ("event", "outcome", "ae_title", "peer", "study_instance_uid",
                                        "series_instance_uid", "sop_instance_uid", "patient_hash", "detail")]
    assert all("\r" not in v and "\n" not in v and "\x1b" not in v for v in values)
    assert row.detail == "line one\\r\\n2024-01-01T00:00:00 INFO instance.stored forged\\nthree"
    assert row.ae_title == "EVIL\\r\\n\\x1bAE"
    assert row.patient_hash == keyed_hash(audit_secret, "SECRET-PID-42")
    assert not [c for c in all_cells(index_db) if "SECRET-PID-42" in c]
    assert row.time.tzinfo is not None


def test_long_values_are_cut_to_the_column_size(index_db: Database, audit_trail: AuditTrail) -> None:
    audit_trail.record(Event.ECHO, ae_title="A" * 40, peer="p" * 100, detail="d" * 5000)
    (row,) = all_rows(index_db)
    assert (len(row.ae_title), len(row.peer), len(row.detail)) == (16, 64, 2000)


def test_add_commits_or_rolls_back_with_the_work(index_db: Database, audit_trail: AuditTrail) -> None:
    with pytest.raises(RuntimeError):
        with index_db.session() as s:
            audit_trail.add(s, Event.INSTANCE_STORED, detail="never happened")
            raise RuntimeError("the work failed")
    assert all_rows(index_db) == []
    with index_db.session() as s:
        audit_trail.add(s, Event.INSTANCE_STORED, detail="happened")
    assert [r.detail for r in all_rows(index_db)] == ["happened"]


def test_record_never_raises(index_db: Database, audit_trail: AuditTrail, caplog: pytest.LogCaptureFixture) -> None:
    with index_db.session() as s:
        s.execute(text("DROP TABLE audit_events"))
    audit_trail.record(Event.NODE_STARTED, detail="x")  # logged, not raised
    assert "could not write audit event node.started" in caplog.text


def all_rows(db: Database) -> list[AuditEvent]:
    with db.session() as s:
        rows = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))
        for r in rows:
            s.expunge(r)
        return rows
