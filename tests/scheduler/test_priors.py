"""Priors: the choice rules (pure), and PriorLookup over the real index, real files and a real
Orthanc (C-FIND + C-GET into the index), a closed port and a PACS that never answers."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from sqlalchemy import select

from scp_node.audit import AuditTrail, Event
from scp_node.config import PriorSource
from scp_node.engine.result import AnalysisResult, PriorStudy
from scp_node.scheduler.analysis import AnalysisQueue
from scp_node.scheduler.completion import SeriesCompletion
from scp_node.scheduler.prior_rules import (SeriesFacts, choose_prior, comparable, identity_conflict,
                                            interval_days, is_earlier)
from scp_node.scheduler.priors import PriorLookup
from scp_node.store.db import Database
from scp_node.store.ingest import Ingestor
from scp_node.store.models import (AnalysisJob, AuditEvent, PriorFetch, PriorFetchState, Series, SeriesState,
                                   utcnow)
from tests.scheduler.fakes import MODEL, FakeWriter, build_report
from tests.store.realdata import ORIGIN
from tests.support.net import free_port
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.priors import PATIENT_ID, derived_cxr

# -- the rules --------------------------------------------------------------------------------

CURRENT = SeriesFacts("1.1", "1.1.1", study_date="20240110", study_time="093000", modality="CR",
                      body_part_examined="CHEST", view_position="PA", patient_id="P1")


def cand(n: int, study_date: str, **kw: Any) -> SeriesFacts:
    values = dict(study_time="080000", modality="CR", body_part_examined="CHEST", view_position="PA", patient_id="P1")
    values.update(kw)
    return SeriesFacts(f"2.{n}", f"2.{n}.1", study_date=study_date, **values)  # type: ignore[arg-type]


def test_the_most_recent_earlier_frontal_chest_view_is_chosen() -> None:
    pa_2022, ap_2023, lateral_2023b = cand(1, "20220301"), cand(2, "20230301", view_position="AP"), \
        cand(3, "20230601", view_position="LL")
    assert choose_prior(CURRENT, [pa_2022, lateral_2023b, ap_2023], 1825) == ap_2023  # the lateral is newer: not frontal
    # No View Position: a chest series counts as frontal; without a body part it does not.
    no_view = cand(4, "20230901", view_position="")
    assert choose_prior(CURRENT, [pa_2022, no_view], 1825) == no_view
    assert choose_prior(CURRENT, [pa_2022, replace(no_view, body_part_examined="")], 1825) == pa_2022
    # A PA view of another body part is not a chest film.
    assert choose_prior(CURRENT, [cand(5, "20231001", body_part_examined="HAND")], 1825) is None


def test_cr_and_dx_are_one_family_ct_and_mr_need_the_same_body_part() -> None:
    assert comparable(CURRENT, cand(1, "20230101", modality="DX"))
    assert not comparable(CURRENT, cand(1, "20230101", modality="CT"))
    ct = SeriesFacts("1.1", "1.1.1", study_date="20240110", modality="CT", body_part_examined="CHEST", patient_id="P1")
    assert comparable(ct, replace(ct, study_instance_uid="2.1", body_part_examined="chest"))  # case-insensitive
    assert not comparable(ct, replace(ct, study_instance_uid="2.1", body_part_examined="HEAD"))
    assert not comparable(ct, replace(ct, study_instance_uid="2.1", body_part_examined=""))
    assert not comparable(ct, replace(ct, study_instance_uid="2.1", modality="MR"))
    # Neither names a body part: the same (non-empty) series description decides.
    bare = replace(ct, body_part_examined="", series_description="Thorax 1.25mm")
    assert comparable(bare, replace(bare, study_instance_uid="2.1", series_description="THORAX 1.25MM"))
    assert not comparable(bare, replace(bare, study_instance_uid="2.1", series_description="Abdomen"))
    assert not comparable(replace(bare, series_description=""), replace(bare, series_description=""))
    # Modalities the engine does not read are never compared.
    us = replace(ct, modality="US")
    assert not comparable(us, replace(us, study_instance_uid="2.1"))


def test_earlier_means_an_earlier_date_or_the_same_day_at_an_earlier_time() -> None:
    assert is_earlier(CURRENT, cand(1, "20240109", study_time="235959"))
    assert is_earlier(CURRENT, cand(1, "20240110", study_time="0800"))
    assert not is_earlier(CURRENT, cand(1, "20240110", study_time="100000"))
    assert not is_earlier(CURRENT, cand(1, "20240110", study_time=""))  # same day, time unknown
    assert not is_earlier(CURRENT, cand(1, "20240111"))
    assert not is_earlier(CURRENT, cand(1, ""))
    assert not is_earlier(replace(CURRENT, study_date=""), cand(1, "20200101"))
    # Not the same study, however its date reads.
    same = replace(cand(1, "20230101"), study_instance_uid=CURRENT.study_instance_uid)
    assert choose_prior(CURRENT, [same], 1825) is None


def test_lookback_bounds_how_old_a_prior_may_be() -> None:
    old = cand(1, "20190110")
    assert interval_days(CURRENT.study_date, old.study_date) == 1826
    assert choose_prior(CURRENT, [old], 1825) is None
    assert choose_prior(CURRENT, [old], 1826) == old
    assert choose_prior(CURRENT, [old, cand(2, "20240101")], 30).study_instance_uid == "2.2"  # type: ignore[union-attr]


def test_only_the_same_patient_id_and_issuer() -> None:
    assert choose_prior(CURRENT, [cand(1, "20230101", patient_id="P2")], 1825) is None
    assert choose_prior(CURRENT, [cand(1, "20230101", issuer_of_patient_id="HOSP-B")], 1825) is None
    with_issuer = replace(CURRENT, issuer_of_patient_id="HOSP-A")
    assert choose_prior(with_issuer, [cand(1, "20230101")], 1825) is None
    assert choose_prior(with_issuer, [cand(1, "20230101", issuer_of_patient_id="HOSP-A")], 1825) is not None
    assert choose_prior(replace(CURRENT, patient_id=""), [cand(1, "20230101", patient_id="")], 1825) is None


def test_identity_conflict_names_the_attribute_never_the_value() -> None:
    a = replace(CURRENT, patient_sex="F", patient_birth_date="19600101")
    assert identity_conflict(a, replace(a, patient_birth_date="19610101")) == "birth date differs"
    assert identity_conflict(a, replace(a, patient_sex="M")) == "sex differs"
    assert identity_conflict(a, replace(a, patient_sex="M", patient_birth_date="1961")) == "sex and birth date differ"
    assert identity_conflict(a, replace(a, patient_sex="", patient_birth_date="")) == ""  # unknown is no conflict
    assert identity_conflict(a, replace(a, patient_sex="f")) == ""


# -- PriorLookup over the real index ------------------------------------------------------------

STABLE = 10.0


def _ingest(ingestor: Ingestor, *paths: Path) -> None:
    for p in paths:
        ingestor.ingest(p.read_bytes(), ORIGIN)


def _complete(db: Database, audit: AuditTrail) -> None:
    """Close every series (the completion rule after the quiet time): jobs for the analysable ones."""
    SeriesCompletion(db, audit, STABLE, 3600).run_once(now=utcnow() + timedelta(seconds=STABLE + 1))


def _job_of(db: Database, path: Path) -> tuple[int, str]:
    series_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
    with db.session() as s:
        job = s.scalars(select(AnalysisJob).join(Series).where(Series.series_instance_uid == series_uid)).one()
        return job.id, series_uid


def _fetches(db: Database) -> list[PriorFetch]:
    with db.session() as s:
        rows = list(s.scalars(select(PriorFetch).order_by(PriorFetch.id)))
        s.expunge_all()
        return rows


def _events(db: Database, prefix: str = "prior.") -> list[tuple[str, str, str]]:
    with db.session() as s:
        return [(e.event, e.outcome, e.detail) for e in
                s.scalars(select(AuditEvent).where(AuditEvent.event.startswith(prefix)).order_by(AuditEvent.id))]


def _lookup(db: Database, audit: AuditTrail, storage: Path, *sources: PriorSource,
            ingestor: Ingestor | None = None) -> PriorLookup:
    return PriorLookup(db, audit, storage, tuple(sources), own_ae_title="SCPNODE", lookback_days=1825,
                       ingestor=ingestor)


def test_local_prior_found_checked_and_recorded(tmp_path: Path, index_db: Database, audit_trail: AuditTrail,
                                                ingestor: Ingestor, storage_dir: Path) -> None:
    files = dict(current=derived_cxr(tmp_path / "c.dcm", study_date="20240110"),
                 last_year=derived_cxr(tmp_path / "p1.dcm", study_date="20230112"),
                 older=derived_cxr(tmp_path / "p2.dcm", study_date="20210110"),
                 lateral=derived_cxr(tmp_path / "p3.dcm", study_date="20231201", ViewPosition="LL"),
                 someone_else=derived_cxr(tmp_path / "x.dcm", study_date="20231215", patient_id="OTHER"))
    _ingest(ingestor, *files.values())
    _complete(index_db, audit_trail)
    job_id, series_uid = _job_of(index_db, files["current"])

    prior, comparison = _lookup(index_db, audit_trail, storage_dir).find(job_id, series_uid)

    want = pydicom.dcmread(files["last_year"], stop_before_pixels=True)
    assert isinstance(prior, PriorStudy)
    assert (prior.study_instance_uid, prior.series_instance_uid, prior.study_date, prior.source,
            prior.interval_days) == (want.StudyInstanceUID, want.SeriesInstanceUID, "20230112", "local", 363)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in prior.paths] == [want.SOPInstanceUID]
    assert (comparison.status, comparison.prior_study_instance_uid, comparison.prior_study_date,
            comparison.interval_days, comparison.source) == ("compared", want.StudyInstanceUID, "20230112", 363, "local")
    [fetch] = _fetches(index_db)
    assert (fetch.job_fk, fetch.state, fetch.source, fetch.prior_study_instance_uid) == \
        (job_id, PriorFetchState.DONE, "local", want.StudyInstanceUID)
    assert [e[:2] for e in _events(index_db)] == [(Event.PRIOR_FOUND, "success")]
    # Run again (a retried job): the same row, the same answer.
    assert _lookup(index_db, audit_trail, storage_dir).find(job_id, series_uid)[0] == prior
    assert len(_fetches(index_db)) == 1


def test_birth_date_mismatch_stops_the_comparison(tmp_path: Path, index_db: Database, audit_trail: AuditTrail,
                                                  ingestor: Ingestor, storage_dir: Path) -> None:
    current = derived_cxr(tmp_path / "c.dcm", study_date="20240110", birth_date="19600101")
    _ingest(ingestor, current, derived_cxr(tmp_path / "p.dcm", study_date="20230110", birth_date="19710203"))
    _complete(index_db, audit_trail)

    prior, comparison = _lookup(index_db, audit_trail, storage_dir).find(*_job_of(index_db, current))

    assert prior is None
    assert (comparison.status, comparison.reason) == ("not_comparable", "prior not comparable: birth date differs")
    assert comparison.prior_study_instance_uid == ""  # another person's study is not referenced
    [fetch] = _fetches(index_db)
    assert fetch.state is PriorFetchState.REFUSED and "birth date differs" in fetch.detail
    [(event, outcome, detail)] = _events(index_db)
    assert (event, outcome) == (Event.PRIOR_REFUSED, "warning")
    assert "birth date differs" in detail and "1971" not in detail and "1960" not in detail and PATIENT_ID not in detail


def test_no_prior_says_so(tmp_path: Path, index_db: Database, audit_trail: AuditTrail, ingestor: Ingestor,
                          storage_dir: Path) -> None:
    current = derived_cxr(tmp_path / "c.dcm", study_date="20240110")
    later = derived_cxr(tmp_path / "l.dcm", study_date="20240301")  # after the current study: not a prior
    _ingest(ingestor, current, later)
    _complete(index_db, audit_trail)

    prior, comparison = _lookup(index_db, audit_trail, storage_dir).find(*_job_of(index_db, current))

    assert prior is None and comparison.status == "none"
    assert comparison.reason == "no earlier comparable study of this patient in the local index"
    assert _fetches(index_db)[0].state is PriorFetchState.NONE
    assert [e[:2] for e in _events(index_db)] == [(Event.PRIOR_NONE, "success")]


class PriorEngine:
    """The engine seam as the node calls it with a prior: records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Path], PriorStudy | None]] = []

    def analyse_series(self, paths: list[Path], prior: PriorStudy | None = None) -> AnalysisResult:
        self.calls.append((list(paths), prior))
        return AnalysisResult(modality="CR", findings_text="No change.", model=MODEL)


def test_the_queue_gives_the_engine_the_prior_and_the_result_its_comparison(
        tmp_path: Path, index_db: Database, audit_trail: AuditTrail, ingestor: Ingestor, storage_dir: Path) -> None:
    current = derived_cxr(tmp_path / "c.dcm", study_date="20240110")
    _ingest(ingestor, derived_cxr(tmp_path / "p.dcm", study_date="20230110"))
    _complete(index_db, audit_trail)  # the prior's own job (it was received as an ordinary study) runs first
    _ingest(ingestor, current)
    _complete(index_db, audit_trail)
    engine, results = PriorEngine(), []

    def write(sr: Any, path: Path, result: AnalysisResult) -> None:
        results.append(result)
        FakeWriter()(sr, path, result)

    queue = AnalysisQueue(index_db, audit_trail, storage_dir, engine, build_report, write, (),
                          priors=_lookup(index_db, audit_trail, storage_dir))
    assert queue.run_once() and queue.run_once()
    (_, first_prior), (paths, prior) = engine.calls
    assert first_prior is None and results[0].comparison.status == "none"
    assert prior is not None and prior.study_date == "20230110" and prior.paths
    assert results[1].comparison.status == "compared" and results[1].comparison.interval_days == 365


# -- PriorLookup against a PACS -------------------------------------------------------------------


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    orthanc = start_orthanc(tmp_path / "orthanc", {"scpnode": ("SCPNODE", "127.0.0.1", free_port())}, verbose=True)
    yield orthanc
    orthanc.stop()


def _source(port: int, **kw: Any) -> PriorSource:
    values: dict[str, Any] = {"timeout_seconds": 20.0, "retrieve": "c-get", "move_destination": "SCPNODE", **kw}
    return PriorSource(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=port, **values)


@pytest.mark.integration
def test_prior_retrieved_by_c_get_is_indexed_as_a_prior_and_never_analysed(
        tmp_path: Path, pacs: Orthanc, index_db: Database, audit_trail: AuditTrail, ingestor: Ingestor,
        storage_dir: Path) -> None:
    current = derived_cxr(tmp_path / "c.dcm", study_date="20240110")
    remote = derived_cxr(tmp_path / "p.dcm", study_date="20230110")
    pacs.upload(remote)
    pacs.upload(derived_cxr(tmp_path / "lat.dcm", study_date="20231110", ViewPosition="LL"))  # newer, not frontal
    _ingest(ingestor, current)
    _complete(index_db, audit_trail)

    prior, comparison = _lookup(index_db, audit_trail, storage_dir, _source(pacs.dicom_port),
                                ingestor=ingestor).find(*_job_of(index_db, current))

    want = pydicom.dcmread(remote, stop_before_pixels=True)
    assert prior is not None and (prior.series_instance_uid, prior.source) == (want.SeriesInstanceUID, "pacs")
    assert [str(pydicom.dcmread(p).SOPInstanceUID) for p in prior.paths] == [want.SOPInstanceUID]
    assert (comparison.status, comparison.source, comparison.interval_days) == ("compared", "pacs", 365)
    [fetch] = _fetches(index_db)
    assert (fetch.state, fetch.source, fetch.prior_series_instance_uid) == \
        (PriorFetchState.DONE, "pacs", want.SeriesInstanceUID)
    events = _events(index_db)
    assert [e[:2] for e in events] == [(Event.PRIOR_QUERY, "success")] * 3 + [(Event.PRIOR_RETRIEVE, "success"),
                                                                            (Event.PRIOR_FOUND, "success")]
    assert "2 studies" in events[0][2] and "1 completed, 0 failed" in events[3][2]
    assert "C-GET-SCU request received" in pacs.log()
    # The retrieved series is a prior: the completion closes it without an analysis job.
    _complete(index_db, audit_trail)
    with index_db.session() as s:
        row = s.scalars(select(Series).where(Series.series_instance_uid == want.SeriesInstanceUID)).one()
        assert row.is_prior and row.state is SeriesState.COMPLETE
        assert s.scalars(select(AnalysisJob).where(AnalysisJob.series_fk == row.id)).first() is None


@pytest.mark.integration
def test_pacs_birth_date_mismatch_retrieves_nothing(tmp_path: Path, pacs: Orthanc, index_db: Database,
                                                    audit_trail: AuditTrail, ingestor: Ingestor,
                                                    storage_dir: Path) -> None:
    current = derived_cxr(tmp_path / "c.dcm", study_date="20240110", birth_date="19600101")
    pacs.upload(derived_cxr(tmp_path / "p.dcm", study_date="20230110", birth_date="19550505"))
    _ingest(ingestor, current)
    _complete(index_db, audit_trail)

    prior, comparison = _lookup(index_db, audit_trail, storage_dir, _source(pacs.dicom_port),
                                ingestor=ingestor).find(*_job_of(index_db, current))

    assert prior is None and comparison.status == "not_comparable" and "birth date differs" in comparison.reason
    assert _fetches(index_db)[0].state is PriorFetchState.REFUSED
    assert [e[0] for e in _events(index_db)] == [Event.PRIOR_QUERY, Event.PRIOR_QUERY, Event.PRIOR_REFUSED]
    with index_db.session() as s:
        assert len(s.scalars(select(Series)).all()) == 1  # nothing of the other person was retrieved
    assert "C-GET-SCU request received" not in pacs.log()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts TCP connections (the kernel's backlog) and never answers: a hung PACS."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield int(server.getsockname()[1])
    server.close()


@pytest.mark.parametrize("down", ["closed", "silent"])
def test_a_pacs_down_or_hung_costs_at_most_its_timeout(down: str, silent_port: int, tmp_path: Path,
                                                       index_db: Database, audit_trail: AuditTrail,
                                                       ingestor: Ingestor, storage_dir: Path) -> None:
    current = derived_cxr(tmp_path / "c.dcm", study_date="20240110")
    _ingest(ingestor, current)
    _complete(index_db, audit_trail)
    port = free_port() if down == "closed" else silent_port
    started = time.monotonic()

    prior, comparison = _lookup(index_db, audit_trail, storage_dir, _source(port, timeout_seconds=2.0),
                                ingestor=ingestor).find(*_job_of(index_db, current))

    elapsed = time.monotonic() - started
    assert prior is None and comparison.status == "unavailable"
    if down == "closed":
        assert elapsed < 2 and "failed (port closed" in comparison.reason
    else:
        assert 1.5 < elapsed < 4 and comparison.reason == "PACS pacs did not answer within 2 s"
    assert _fetches(index_db)[0].state is PriorFetchState.FAILED
    assert [e[:2] for e in _events(index_db)] == [(Event.PRIOR_QUERY, "failure"), (Event.PRIOR_NONE, "failure")]
