"""The node's parts on PostgreSQL (a throw-away cluster, tests/support/postgres.py): the ingest of
real files -- concurrent stores of one new study from threads and from two "processes" --, the
audit trail, the queues from completion through analysis to export, and QIDO-RS through the
real web app.  The same code runs on SQLite everywhere else in the suite.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from scp_node.audit import AuditTrail, Event
from scp_node.config import ExportConfig, WebConfig
from scp_node.scheduler.analysis import AnalysisQueue
from scp_node.scheduler.completion import SeriesCompletion
from scp_node.scheduler.exports import ExportQueue
from scp_node.store import schema
from scp_node.store.db import Database
from scp_node.store.ingest import IngestOutcome, Ingestor
from scp_node.store.models import (AnalysisJob, AuditEvent, ExportJob, ExportState, Instance, JobState, Patient,
                                   Report, Series, SeriesState, Study)
from scp_node.web import WebServer, create_app, token_sha256
from tests.scheduler.fakes import DESTINATIONS, FakeEngine, FakeSender, FakeWriter, after_quiet, build_report
from tests.store.realdata import CT_PATIENT_ID, CT_SLICES, CXR_UNCR, ORIGIN, count, read_bytes
from tests.support.net import free_port

SECRET = b"s" * 32


@pytest.fixture
def pg_db(postgres_url: str) -> Iterator[Database]:
    db = Database(postgres_url)
    yield db
    db.dispose()


@pytest.fixture
def pg_audit(pg_db: Database) -> AuditTrail:
    return AuditTrail(pg_db, SECRET)


@pytest.fixture
def pg_ingestor(pg_db: Database, pg_audit: AuditTrail, tmp_path: Path) -> Ingestor:
    return Ingestor(pg_db, tmp_path / "storage", pg_audit, "keep_first")


def test_the_index_is_postgresql_at_head(pg_db: Database) -> None:
    assert pg_db.engine.dialect.name == "postgresql" and not pg_db.is_sqlite
    assert schema.revision_of(pg_db) == schema.HEAD


def test_real_files_are_stored_indexed_and_audited(pg_db: Database, pg_ingestor: Ingestor, tmp_path: Path) -> None:
    data = read_bytes(CXR_UNCR)
    ds = pydicom.dcmread(CXR_UNCR, stop_before_pixels=True)
    assert pg_ingestor.ingest(data, ORIGIN) is IngestOutcome.STORED
    assert pg_ingestor.ingest(data, ORIGIN) is IngestOutcome.DUPLICATE_IDENTICAL
    with pg_db.session() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.sop_instance_uid == ds.SOPInstanceUID and inst.size == len(data)
        assert (tmp_path / "storage" / inst.path).read_bytes() == data
        assert inst.received_at.tzinfo is not None  # aware datetimes back from PostgreSQL too
        assert inst.series.state is SeriesState.RECEIVING and inst.series.is_prior is False
        events = [(e.event, e.patient_hash) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    digest = AuditTrail(pg_db, SECRET).patient_hash(str(ds.PatientID))
    assert events == [(Event.INSTANCE_STORED, digest), (Event.INSTANCE_DUPLICATE, digest)]
    assert str(ds.PatientID) not in {h for _e, h in events}


def test_concurrent_stores_of_one_new_series_from_threads_and_processes(postgres_url: str, tmp_path: Path) -> None:
    """Eight slices of one new study, from 8 threads in each of two "processes" (two Database and
    Ingestor objects: separate pools and group commits), every slice sent by both.  The two race
    to create the same patient, study and series rows: the loser's insert fails on the unique
    constraint, which on PostgreSQL aborts its transaction, and the store is retried in a new one.
    Every instance ends up indexed once, every store succeeds, nothing is left over on disk."""
    storage = tmp_path / "storage"
    dbs = [Database(postgres_url) for _ in range(2)]
    try:
        ingestors = [Ingestor(db, storage, AuditTrail(db, SECRET), "keep_first") for db in dbs]
        blobs = [read_bytes(p) for p in CT_SLICES]
        start = threading.Barrier(16)

        def send(k: int) -> list[IngestOutcome]:
            ingestor = ingestors[k % 2]
            start.wait(30)
            order = blobs if k % 2 else blobs[::-1]
            return [ingestor.ingest(b, ORIGIN) for b in order[k // 2 % 8:] + order[:k // 2 % 8]]

        with ThreadPoolExecutor(16) as pool:
            outcomes = [o for got in pool.map(send, range(16)) for o in got]
        assert len(outcomes) == 16 * 8
        assert outcomes.count(IngestOutcome.STORED) == 8
        assert set(outcomes) == {IngestOutcome.STORED, IngestOutcome.DUPLICATE_IDENTICAL}
        db = dbs[0]
        assert (count(db, Patient), count(db, Study), count(db, Series), count(db, Instance)) == (1, 1, 1, 8)
        with db.session() as s:
            assert s.scalars(select(Patient.patient_id)).one() == CT_PATIENT_ID
            stored = s.scalar(select(func.count()).select_from(AuditEvent)
                              .where(AuditEvent.event == Event.INSTANCE_STORED))
            paths = set(s.scalars(select(Instance.path)))
        assert stored == 8
        on_disk = {p.relative_to(storage).as_posix() for p in storage.rglob("*") if p.is_file()}
        assert on_disk == paths
    finally:
        for db in dbs:
            db.dispose()


def test_completion_analysis_and_export_queues(pg_db: Database, pg_audit: AuditTrail, pg_ingestor: Ingestor,
                                               tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    for path in CT_SLICES[:3]:
        pg_ingestor.ingest(read_bytes(path), ORIGIN)
    completion = SeriesCompletion(pg_db, pg_audit, 10.0, 3600)
    completion.run_once(now=after_quiet(pg_db, 10.0))
    with pg_db.session() as s:
        assert s.scalars(select(Series.state)).one() is SeriesState.COMPLETE
        assert s.scalars(select(AnalysisJob.state)).one() is JobState.PENDING

    engine, writer = FakeEngine(), FakeWriter()
    analysis = AnalysisQueue(pg_db, pg_audit, storage, engine, build_report, writer, DESTINATIONS)
    assert analysis.run_once() is True and analysis.run_once() is False
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 3
    with pg_db.session() as s:
        job = s.scalars(select(AnalysisJob)).one()
        assert (job.state, job.attempts) == (JobState.DONE, 1)
        report = s.scalars(select(Report)).one()
        assert report.job_fk == job.id and (storage / report.path).exists()

    sender = FakeSender(failures=[ConnectionError("PACS down")])
    policy = ExportConfig(max_attempts=3, backoff_initial_seconds=0.0, backoff_multiplier=1.0,
                          backoff_max_seconds=0.0)
    exports = ExportQueue(pg_db, pg_audit, storage, DESTINATIONS, policy, sender)
    for _ in range(5):
        exports.run_once()
    with pg_db.session() as s:
        rows = s.execute(select(ExportJob.destination, ExportJob.state, ExportJob.attempts)
                         .order_by(ExportJob.destination)).all()
    assert sorted(name for name, _p in sender.sent) == sorted([d.name for d in DESTINATIONS] + [DESTINATIONS[0].name])
    assert {(d, st) for d, st, _a in rows} == {(d.name, ExportState.DONE) for d in DESTINATIONS}
    assert sorted(a for _d, _st, a in rows) == [1, 2]
    with pg_db.session() as s:
        names = [e for e in s.scalars(select(AuditEvent.event).order_by(AuditEvent.id))]
    for event in (Event.SERIES_COMPLETE, Event.EXPORT_OK):
        assert event in names, names


def test_qido_rs_through_the_web_app(pg_db: Database, pg_audit: AuditTrail, pg_ingestor: Ingestor,
                                     tmp_path: Path) -> None:
    token = "pg-test-token"
    web = WebConfig(host="127.0.0.1", port=free_port(), token_sha256=(token_sha256(token),))
    server = WebServer(create_app(web, pg_db, pg_audit, pg_ingestor, tmp_path / "spool"), web)
    server.start()
    try:
        root = f"http://127.0.0.1:{web.port}/dicom-web"
        client = DICOMwebClient(root, headers={"Authorization": f"Bearer {token}"})
        client.set_http_retry_params(retry=False)
        cxr = pydicom.dcmread(CXR_UNCR)
        client.store_instances([cxr] + [pydicom.dcmread(p) for p in CT_SLICES[:4]])  # STOW-RS
        ct = pydicom.dcmread(CT_SLICES[0], stop_before_pixels=True)

        def studies(**filters: object) -> list[str]:
            return [Dataset.from_json(r).StudyInstanceUID for r in client.search_for_studies(search_filters=filters)]

        assert sorted(studies()) == sorted([cxr.StudyInstanceUID, ct.StudyInstanceUID])
        assert studies(PatientID=str(cxr.PatientID)[:2] + "*") == [cxr.StudyInstanceUID]
        assert studies(PatientName=str(cxr.PatientName).upper()[:3] + "*") == [cxr.StudyInstanceUID]
        assert studies(ModalitiesInStudy="CT") == [ct.StudyInstanceUID]
        (se,) = client.search_for_series(study_instance_uid=ct.StudyInstanceUID)
        assert Dataset.from_json(se).NumberOfSeriesRelatedInstances == 4
        scope = dict(study_instance_uid=ct.StudyInstanceUID, series_instance_uid=ct.SeriesInstanceUID)
        every = [Dataset.from_json(i).SOPInstanceUID for i in client.search_for_instances(**scope)]
        pages = [Dataset.from_json(i).SOPInstanceUID for off in (0, 2)
                 for i in client.search_for_instances(**scope, limit=2, offset=off)]
        assert len(every) == 4 and pages == every
        rsp = requests.get(f"{root}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/"
                           f"{ct.SOPInstanceUID}", headers={"Authorization": f"Bearer {token}",
                                                             "Accept": 'multipart/related; type="application/dicom"'},
                           timeout=30)
        assert rsp.status_code == 200 and read_bytes(CT_SLICES[0]) in rsp.content  # WADO-RS, byte-identical
    finally:
        server.stop()
