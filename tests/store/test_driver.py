"""The receive path's statements on SQLite's driver: same rows as SQLAlchemy writes, same errors."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from scp_node.store.db import Database
from scp_node.store.driver import DriverTransaction
from scp_node.store.models import Patient, Series, SeriesState, Study

_SERIES_INSERT = insert(Series.__table__)
_PATIENT_INSERT = insert(Patient.__table__)
_STUDY_INSERT = insert(Study.__table__)
_FIND = select(Series.__table__.c.state, Series.__table__.c.last_received_at, Series.__table__.c.version)


def _series(study_fk: int, uid: str, when: datetime) -> dict[str, object]:
    return dict(series_instance_uid=uid, study_fk=study_fk, state=SeriesState.COMPLETE, version=3,
                first_received_at=when, last_received_at=when, version_started_at=when, modality="CT",
                body_part_examined="", series_description="", series_number=None, is_prior=False)


def test_driver_rows_read_back_as_sqlalchemy_writes_them(index_db: Database) -> None:
    """Enum and aware datetime go through the column types' own processors both ways."""
    when = datetime(2026, 11, 23, 19, 30, 1, 123456, tzinfo=timezone.utc)
    with index_db.index_transaction() as tx:
        assert isinstance(tx, DriverTransaction)
        patient = tx.insert(_PATIENT_INSERT, dict(patient_id="P", issuer_of_patient_id="", patient_name="N"))
        study = tx.insert(_STUDY_INSERT, dict(study_instance_uid="1.2.3", patient_fk=patient, study_date="",
                                              accession_number="", study_description=""))
        tx.insert(_SERIES_INSERT, _series(study, "1.2.3.4", when))
        assert tx.first(_FIND, {}) == (SeriesState.COMPLETE, when, 3)
    with index_db.session() as s:  # the ORM reads what the driver wrote
        row = s.scalars(select(Series)).one()
        assert (row.state, row.last_received_at, row.version) == (SeriesState.COMPLETE, when, 3)
    with index_db.transaction() as conn:  # and the driver reads what SQLAlchemy wrote
        conn.execute(_SERIES_INSERT, _series(study, "1.2.3.5", when))
    with index_db.index_transaction() as tx:
        assert tx.first(_FIND.where(Series.__table__.c.series_instance_uid == "1.2.3.5"), {})[0] \
            is SeriesState.COMPLETE


def test_a_column_left_to_a_python_default_is_refused(index_db: Database) -> None:
    """The driver skips SQLAlchemy's execution context, so it cannot fill Python-side defaults."""
    with pytest.raises(ValueError, match="no value given for"):
        with index_db.index_transaction() as tx:
            tx.insert(_PATIENT_INSERT, dict(patient_id="P"))


def test_driver_errors_are_sqlalchemy_errors_and_roll_back(index_db: Database) -> None:
    values = dict(patient_id="P", issuer_of_patient_id="", patient_name="N")
    study = dict(study_instance_uid="1.2.3", study_date="", accession_number="", study_description="")
    with index_db.index_transaction() as tx:
        study["patient_fk"] = tx.insert(_PATIENT_INSERT, values)
    with pytest.raises(IntegrityError):
        with index_db.index_transaction() as tx:
            tx.insert(_PATIENT_INSERT, values)  # fine on its own...
            tx.insert(_STUDY_INSERT, study)
            tx.insert(_STUDY_INSERT, study)  # ...but this UNIQUE violation rolls back all three
    with index_db.session() as s:
        assert len(s.scalars(select(Patient)).all()) == 1
        assert s.scalars(select(Study)).all() == []
    with pytest.raises(OperationalError):
        with index_db.index_transaction() as tx:
            tx.first(select(Patient.__table__.c.id).where(Patient.__table__.c.patient_id == "missing"), {})
            tx.begin()  # a second BEGIN inside the transaction: "cannot start a transaction within a transaction"
    with index_db.index_transaction() as tx:  # the connection is usable again
        assert tx.first(select(Patient.__table__.c.patient_id), {}) == ("P",)


def test_timestamps_are_stored_in_sqlalchemys_text_form(index_db: Database) -> None:
    """SQLite keeps datetimes as text compared as text (the completion window's queries): the
    driver must write SQLAlchemy's form, microseconds always present, not sqlite3's own."""
    whole_second = datetime(2026, 11, 23, 19, 30, 1, tzinfo=timezone.utc)
    with index_db.index_transaction() as tx:
        patient = tx.insert(_PATIENT_INSERT, dict(patient_id="P", issuer_of_patient_id="", patient_name="N"))
        study = tx.insert(_STUDY_INSERT, dict(study_instance_uid="1.2.3", patient_fk=patient, study_date="",
                                              accession_number="", study_description=""))
        tx.insert(_SERIES_INSERT, _series(study, "1.2.3.4", whole_second))
    with index_db.transaction() as conn:
        conn.execute(_SERIES_INSERT, _series(study, "1.2.3.5", whole_second))
        stored = conn.exec_driver_sql("SELECT last_received_at FROM series ORDER BY id").scalars().all()
    assert stored == ["2026-11-23 19:30:01.000000"] * 2
