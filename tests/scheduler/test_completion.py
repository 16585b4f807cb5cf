"""Series completion: quiet for N seconds, or the forced ceiling; one job per version; audited."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from scp_node.audit import AuditTrail, Event
from scp_node.scheduler.completion import SeriesCompletion
from scp_node.store.db import Database
from scp_node.store.ingest import Ingestor
from scp_node.store.models import AnalysisJob, AuditEvent, JobState, Series, SeriesState
from tests.scheduler.fakes import after_quiet, series_row, set_series_times
from tests.store.realdata import CXR_UNCR, ORIGIN, read_bytes

STABLE = 30.0
CEILING = 600.0


def jobs(db: Database) -> list[tuple[int, JobState]]:
    with db.session() as s:
        return [(j.series_version, j.state) for j in s.scalars(select(AnalysisJob).order_by(AnalysisJob.id))]


def complete_events(db: Database) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event == Event.SERIES_COMPLETE)))


def test_series_closes_only_after_the_quiet_period(index_db: Database, audit_trail: AuditTrail,
                                                   ingest_ct) -> None:
    ingest_ct(0, 1, 2)
    completion = SeriesCompletion(index_db, audit_trail, STABLE, CEILING)

    assert completion.run_once(now=after_quiet(index_db, STABLE - 1)) == 0
    assert series_row(index_db).state is SeriesState.RECEIVING and jobs(index_db) == []

    now = after_quiet(index_db, STABLE)
    assert completion.run_once(now=now) == 1
    series = series_row(index_db)
    assert series.state is SeriesState.COMPLETE and series.completed_at == now
    assert jobs(index_db) == [(1, JobState.PENDING)]
    (event,) = complete_events(index_db)
    assert event.series_instance_uid == series.series_instance_uid
    assert "version 1, 3 instances" in event.detail and "forced" not in event.detail
    assert event.patient_hash and event.patient_hash == audit_trail.patient_hash("LIDC-IDRI-0001")

    # nothing more to do: no second job, no second event
    assert completion.run_once(now=now + timedelta(hours=5)) == 0
    assert jobs(index_db) == [(1, JobState.PENDING)] and len(complete_events(index_db)) == 1


def test_a_new_instance_restarts_the_quiet_period(index_db: Database, audit_trail: AuditTrail, ingest_ct) -> None:
    ingest_ct(0)
    first = series_row(index_db).last_received_at
    ingest_ct(1)
    last = series_row(index_db).last_received_at
    assert last >= first
    # quiet measured from the last instance, not the first
    set_series_times(index_db, last_received_at=first + timedelta(seconds=20))
    completion = SeriesCompletion(index_db, audit_trail, STABLE, CEILING)
    assert completion.run_once(now=first + timedelta(seconds=STABLE + 1)) == 0
    assert completion.run_once(now=first + timedelta(seconds=20 + STABLE)) == 1


def test_forced_ceiling_closes_a_busy_series(index_db: Database, audit_trail: AuditTrail, ingest_ct) -> None:
    ingest_ct(0, 1)
    start = series_row(index_db).version_started_at
    now = start + timedelta(seconds=CEILING)
    set_series_times(index_db, last_received_at=now - timedelta(seconds=1))  # still receiving
    completion = SeriesCompletion(index_db, audit_trail, STABLE, CEILING)

    assert completion.run_once(now=now - timedelta(seconds=1)) == 0
    assert completion.run_once(now=now) == 1
    assert series_row(index_db).state is SeriesState.COMPLETE
    assert jobs(index_db) == [(1, JobState.PENDING)]
    (event,) = complete_events(index_db)
    assert "forced by the ceiling" in event.detail


def test_late_arrival_gets_its_own_job_version(index_db: Database, audit_trail: AuditTrail, ingest_ct) -> None:
    ingest_ct(0, 1)
    completion = SeriesCompletion(index_db, audit_trail, STABLE, CEILING)
    assert completion.run_once(now=after_quiet(index_db, STABLE)) == 1
    ingest_ct(2)  # after completion: version 2 starts collecting
    assert series_row(index_db).state is SeriesState.RECEIVING
    assert completion.run_once(now=after_quiet(index_db, STABLE - 1)) == 0
    assert completion.run_once(now=after_quiet(index_db, STABLE)) == 1
    assert jobs(index_db) == [(1, JobState.PENDING), (2, JobState.PENDING)]
    assert "version 2, 3 instances" in complete_events(index_db)[-1].detail


def test_one_job_per_version_even_if_a_series_is_reopened(index_db: Database, audit_trail: AuditTrail,
                                                          ingest_ct) -> None:
    ingest_ct(0)
    completion = SeriesCompletion(index_db, audit_trail, STABLE, CEILING)
    now = after_quiet(index_db, STABLE)
    assert completion.run_once(now=now) == 1
    # an admin (or a bug) puts the series back to RECEIVING without a new version
    with index_db.session() as s:
        s.execute(update(Series).values(state=SeriesState.RECEIVING))
    assert completion.run_once(now=now) == 1
    assert jobs(index_db) == [(1, JobState.PENDING)]


def test_several_series_are_judged_independently(index_db: Database, audit_trail: AuditTrail,
                                                 ingestor: Ingestor, ingest_ct) -> None:
    ingest_ct(0)
    ingestor.ingest(read_bytes(CXR_UNCR), ORIGIN)
    with index_db.session() as s:
        ct_last = s.scalars(select(Series).where(Series.modality == "CT")).one().last_received_at
        s.execute(update(Series).where(Series.modality == "CR")
                  .values(last_received_at=ct_last + timedelta(seconds=100)))
    completion = SeriesCompletion(index_db, audit_trail, STABLE, CEILING)
    assert completion.run_once(now=ct_last + timedelta(seconds=STABLE)) == 1
    with index_db.session() as s:
        states = {r.modality: r.state for r in s.scalars(select(Series))}
    assert states == {"CT": SeriesState.COMPLETE, "CR": SeriesState.RECEIVING}


def test_a_series_of_a_prior_study_is_analysed_only_when_found_locally(
        index_db: Database, audit_trail: AuditTrail, ingest_ct) -> None:
    """A study named as a prior retrieved from a PACS is a prior, never analysed; one found in the
    local index was received as any study, so a series that arrives later in it is analysed."""
    from scp_node.store.models import PriorFetch, PriorFetchState

    ingest_ct(0, 1)
    series = series_row(index_db)
    with index_db.session() as s:
        study_uid = s.get(Series, series.id).study.study_instance_uid
        job = AnalysisJob(series_fk=series.id, series_version=99, state=JobState.DONE)  # another job's fetch
        s.add(job)
        s.flush()
        s.add(PriorFetch(job_fk=job.id, study_instance_uid="1.2.3", prior_study_instance_uid=study_uid,
                         source="local", state=PriorFetchState.DONE))
    completion = SeriesCompletion(index_db, audit_trail, STABLE, CEILING)
    assert completion.run_once(now=after_quiet(index_db, STABLE)) == 1
    assert not series_row(index_db).is_prior and (1, JobState.PENDING) in jobs(index_db)

    with index_db.session() as s:  # the same study, now named as retrieved from a PACS
        s.execute(update(PriorFetch).values(source="pacs"))
        s.execute(update(Series).values(state=SeriesState.RECEIVING, version=2))
    assert completion.run_once(now=after_quiet(index_db, STABLE)) == 1
    assert series_row(index_db).is_prior and (2, JobState.PENDING) not in jobs(index_db)
