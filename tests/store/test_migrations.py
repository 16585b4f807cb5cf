"""The index schema under Alembic: an index the first release made, with data in it, upgraded to
head by the real ``scp-node db upgrade`` on SQLite and on PostgreSQL; ``serve`` refusing the old
schema until then; a fresh database created at head.

The first release's index is built the way that release built it: ``create_all`` of its models,
kept frozen in :mod:`tests.store.first_release_models`.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.orm import Session

from scp_node.store import schema
from scp_node.store.db import Database
from scp_node.store.models import (AnalysisJob, AuditEvent, Base, ExportJob, ExportState, Instance, JobState,
                                   NodeRecord, Patient, PriorFetch, PriorFetchState, Report, Series, SeriesState,
                                   Study)
from tests.store import first_release_models as old
from tests.support.node import cli, write_config

T0 = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
ENV_URL = "SCP_NODE__STORE__DATABASE_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


def first_release_index(url: str) -> None:
    """An index as the first release left it: its create_all, then a node's worth of rows."""
    engine = create_engine(url)
    old.Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        patient = old.Patient(patient_id="PAT-1", issuer_of_patient_id="HOSP", patient_name="Doe^Jane")
        study = old.Study(study_instance_uid="1.2.3.1", patient=patient, study_date="20250304",
                          accession_number="ACC1", study_description="CT CHEST")
        series = old.Series(series_instance_uid="1.2.3.1.1", study=study, modality="CT", series_number=2,
                            state=old.SeriesState.COMPLETE, version=2, first_received_at=T0, last_received_at=T0,
                            version_started_at=T0, completed_at=T0 + timedelta(seconds=30))
        s.add_all([
            old.Instance(sop_instance_uid=f"1.2.3.1.1.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                         series=series, instance_number=i, transfer_syntax_uid="1.2.840.10008.1.2.1",
                         path=f"1.2.3.1/1.2.3.1.1/1.2.3.1.1.{i}.dcm", size=524_288 + i, sha256=f"{i:064x}",
                         received_at=T0, calling_ae_title="ORTHANC", peer_address="127.0.0.1", series_version=2)
            for i in range(1, 4)])
        done = old.AnalysisJob(series=series, series_version=1, state=old.JobState.DONE, attempts=1,
                               created_at=T0, started_at=T0, finished_at=T0 + timedelta(minutes=1))
        running = old.AnalysisJob(series=series, series_version=2, state=old.JobState.RUNNING, attempts=1,
                                  created_at=T0, started_at=T0 + timedelta(minutes=2))
        report = old.Report(job=done, sop_instance_uid="1.2.3.9.1", series_instance_uid="1.2.3.9",
                            study_instance_uid="1.2.3.1", path="1.2.3.1/1.2.3.9/1.2.3.9.1.dcm",
                            model_name="medgemma-1.5-4b-it", is_test_model=True, findings_text="No nodule.",
                            structured_json='{"triage": "normal"}', triage="normal", created_at=T0)
        s.add_all([done, running, report,
                   old.ExportJob(report=report, destination="pacs", state=old.ExportState.DONE, attempts=1,
                                 next_attempt_at=T0, created_at=T0, delivered_at=T0 + timedelta(minutes=3)),
                   old.ExportJob(report=report, destination="ris", state=old.ExportState.DEAD, attempts=5,
                                 next_attempt_at=T0, last_error="association rejected", created_at=T0)])
        s.add_all([old.AuditEvent(time=T0 + timedelta(seconds=i), event=event, ae_title="ORTHANC",
                                  study_instance_uid="1.2.3.1", patient_hash="ab" * 32, detail=f"row {i}")
                   for i, event in enumerate(["instance.stored", "series.complete", "report.created"])])
    engine.dispose()


def no_differences(url: str) -> list[Any]:
    """What Alembic's autogenerate would still change to reach the models (types compared too)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()


def node_config(tmp_path: Path, url: str) -> tuple[Path, dict[str, str]]:
    """A node config using ``url`` as its index (through the environment override, as an admin may)."""
    return write_config(tmp_path, model_dir=tmp_path / "no-model-needed"), {ENV_URL: url}


def test_a_first_release_index_is_refused_by_serve_then_upgraded_with_its_data(tmp_path: Path,
                                                                               index_url: str) -> None:
    first_release_index(index_url)
    config, env = node_config(tmp_path, index_url)
    tables_before = set(inspect(create_engine(index_url)).get_table_names())

    served = cli("serve", "--config", str(config), env=env, timeout=120)
    assert served.returncode == 2, served.stderr
    assert "revision 0001" in served.stderr and "needs 0002" in served.stderr
    assert f"scp-node db upgrade --config {config}" in served.stderr
    current = cli("db", "current", "--config", str(config), env=env)
    assert current.returncode == 1 and "index schema 0001, this scp_node 0002" in current.stdout, current.stdout
    status = cli("status", "--config", str(config), env=env)
    assert status.returncode == 2 and "scp-node db upgrade" in status.stderr, status.stdout + status.stderr
    # Opening it (serve, db current) changed nothing: no tables were added, no version stamped.
    assert set(inspect(create_engine(index_url)).get_table_names()) == tables_before

    upgraded = cli("db", "upgrade", "--config", str(config), env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "upgraded from revision 0001 to 0002" in upgraded.stdout
    assert no_differences(index_url) == []

    db = Database(index_url)
    try:
        assert schema.revision_of(db) == schema.HEAD
        with db.session() as s:
            patient = s.scalars(select(Patient)).one()
            assert (patient.patient_id, patient.issuer_of_patient_id, patient.patient_name) == \
                ("PAT-1", "HOSP", "Doe^Jane")
            series = s.scalars(select(Series)).one()
            assert (series.study.accession_number, series.state, series.version) == ("ACC1", SeriesState.COMPLETE, 2)
            assert series.completed_at == T0 + timedelta(seconds=30) and series.is_prior is False
            instances = s.scalars(select(Instance).order_by(Instance.instance_number)).all()
            assert [(i.instance_number, i.size, i.series_version) for i in instances] == \
                [(1, 524_289, 2), (2, 524_290, 2), (3, 524_291, 2)]
            jobs = s.scalars(select(AnalysisJob).order_by(AnalysisJob.series_version)).all()
            assert [(j.state, j.claimed_by, j.lease_until) for j in jobs] == \
                [(JobState.DONE, "", None), (JobState.RUNNING, "", None)]
            report = s.scalars(select(Report)).one()
            assert (report.job_fk, report.triage, report.is_test_model) == (jobs[0].id, "normal", True)
            exports = s.scalars(select(ExportJob).order_by(ExportJob.destination)).all()
            assert [(e.destination, e.state, e.attempts, e.claimed_by, e.lease_until) for e in exports] == \
                [("pacs", ExportState.DONE, 1, "", None), ("ris", ExportState.DEAD, 5, "", None)]
            assert exports[1].last_error == "association rejected"
            audit = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
            assert [(a.event, a.time, a.patient_hash) for a in audit] == \
                [(e, T0 + timedelta(seconds=i), "ab" * 32)
                 for i, e in enumerate(["instance.stored", "series.complete", "report.created"])]
            # The new columns and tables take rows.
            series.is_prior = True
            jobs[1].claimed_by, jobs[1].lease_until = "host:1:worker", T0 + timedelta(minutes=5)
            s.add(NodeRecord(name="host:1:worker", role="worker", host="host", pid=1))
            s.add(PriorFetch(job_fk=jobs[1].id, study_instance_uid="1.2.3.1", source="local",
                             state=PriorFetchState.NONE))
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Series).where(Series.is_prior)) == 1
            assert s.scalars(select(PriorFetch.state)).one() is PriorFetchState.NONE
            assert s.scalars(select(AnalysisJob.lease_until).where(AnalysisJob.claimed_by != "")).one() == \
                T0 + timedelta(minutes=5)
    finally:
        db.dispose()

    again = cli("db", "upgrade", "--config", str(config), env=env)
    assert again.returncode == 0 and "already at revision 0002" in again.stdout, again.stdout + again.stderr
    assert cli("db", "current", "--config", str(config), env=env).returncode == 0


def test_a_fresh_database_is_created_at_head(index_url: str) -> None:
    db = Database(index_url)
    try:
        assert schema.revision_of(db) == schema.HEAD
        schema.ensure_current(db)
    finally:
        db.dispose()
    assert no_differences(index_url) == []


def test_head_is_the_newest_migration_script() -> None:
    """The constant every open compares with (read without Alembic) is Alembic's head."""
    assert schema.heads() == [schema.HEAD]
    assert schema.known_revisions() == {schema.FIRST_RELEASE, schema.HEAD}


def test_an_index_a_development_build_extended_with_create_all_upgrades(tmp_path: Path) -> None:
    """Builds between the first release and Alembic ran create_all on open: new tables, no new
    columns, no version table.  Revision 0002 adds only what is missing."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    first_release_index(url)
    engine = create_engine(url)
    Base.metadata.create_all(engine)  # adds nodes and prior_fetches, not the columns
    engine.dispose()
    db = Database(url)
    try:
        assert schema.revision_of(db) == schema.FIRST_RELEASE
        assert schema.upgrade(db) == (schema.FIRST_RELEASE, schema.HEAD)
    finally:
        db.dispose()
    assert no_differences(url) == []


def test_a_database_of_something_else_is_not_taken_for_an_index(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'other.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    engine.dispose()
    db = Database(url)
    try:
        with pytest.raises(schema.SchemaError, match="none of an scp_node index"):
            schema.ensure_current(db)
    finally:
        db.dispose()


def test_upgrade_refuses_while_a_node_runs_on_the_storage(tmp_path: Path) -> None:
    import fcntl

    from scp_node.runtime import LOCK_FILE

    config = write_config(tmp_path, model_dir=tmp_path / "m")
    with open(tmp_path / LOCK_FILE, "a+") as held:  # what a running node holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        refused = cli("db", "upgrade", "--config", str(config))
    assert refused.returncode == 2 and "stop it before upgrading" in refused.stderr, refused.stderr
    assert cli("db", "upgrade", "--config", str(config)).returncode == 0
