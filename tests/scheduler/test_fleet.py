"""The fleet table: nodes register, beat and stop; ``status`` lists the live and the lost with
the claims they hold; a starting node sees who else is live (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select, update

from scp_node.monitor import fleet_nodes, render_fleet
from scp_node.scheduler.fleet import FleetMember, node_name
from scp_node.store.db import Database
from scp_node.store.models import AnalysisJob, ExportJob, ExportState, JobState, NodeRecord, Report, utcnow
from tests.scheduler.test_claims import make_series


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'index.db'}" if request.param == "sqlite" else \
        str(request.getfixturevalue("postgres_url"))
    database = Database(url)
    yield database
    database.dispose()


def member(db: Database, name: str, role: str = "worker") -> FleetMember:
    m = FleetMember(db, name, role, "SCPNODE", "1.0", lease_seconds=30)
    m.register()
    return m


def listed(db: Database, heartbeat: float = 2.0) -> dict[str, dict]:
    with db.session() as s:
        return {n["name"]: n for n in fleet_nodes(s, heartbeat)}


def test_node_name_is_host_pid_role() -> None:
    assert node_name("worker") == f"{socket.gethostname()}:{os.getpid()}:worker"
    assert node_name("receiver", host="h", pid=7) == "h:7:receiver"


def test_registered_nodes_are_listed_with_role_host_pid_and_claims(db: Database) -> None:
    rx = member(db, "host-a:10:receiver", "receiver")
    w1 = member(db, "host-b:20:worker")
    member(db, "host-c:30:worker")
    make_series(db, 2)
    with db.session() as s:  # w1 holds one running analysis; nobody holds the other
        job = s.scalars(select(AnalysisJob).order_by(AnalysisJob.id)).first()
        job.state, job.claimed_by, job.lease_until = JobState.RUNNING, w1.name, utcnow()
    nodes = listed(db)
    assert set(nodes) == {"host-a:10:receiver", "host-b:20:worker", "host-c:30:worker"}
    a = nodes[rx.name]
    assert (a["role"], a["host"], a["pid"], a["state"], a["claims"]) == ("receiver", "host-a", 10, "live", 0)
    assert nodes[w1.name]["claims"] == 1 and nodes["host-c:30:worker"]["claims"] == 0
    assert 0 <= nodes[w1.name]["heartbeat_age_seconds"] < 5
    text = "\n".join(render_fleet(list(nodes.values())))
    assert "fleet     3 live" in text and "receiver host-a:10:receiver" in text and "1 claims" in text


def test_a_silent_node_is_lost_a_stopped_one_is_not_listed(db: Database) -> None:
    w1, w2 = member(db, "h:1:worker"), member(db, "h:2:worker")
    member(db, "h:3:worker")
    with db.session() as s:
        s.execute(update(NodeRecord).where(NodeRecord.name == w1.name)
                  .values(heartbeat_at=utcnow() - timedelta(seconds=7)))  # > 3 beats of 2 s
        s.execute(update(NodeRecord).where(NodeRecord.name == "h:3:worker")
                  .values(heartbeat_at=utcnow() - timedelta(hours=2)))  # lost long ago: forgotten
    w2.stopped()
    nodes = listed(db)
    assert set(nodes) == {w1.name}
    assert nodes[w1.name]["state"] == "lost" and nodes[w1.name]["heartbeat_age_seconds"] >= 7
    assert "(LOST)" in "\n".join(render_fleet(list(nodes.values())))
    w1.beat()  # it speaks again
    assert listed(db)[w1.name]["state"] == "live"


def test_beat_refreshes_the_heartbeat_and_others_alive_sees_the_live_ones(db: Database) -> None:
    a, b = member(db, "h:1:worker"), member(db, "h:2:receiver", "receiver")
    member(db, "h:3:worker").stopped()
    with db.session() as s:
        s.execute(update(NodeRecord).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert a.others_alive(2.0) == []
    b.beat()
    assert a.others_alive(2.0) == ["h:2:receiver"]
    assert b.others_alive(2.0) == []  # a has not beaten for 60 s


def test_register_again_clears_a_previous_stop(db: Database) -> None:
    a = member(db, "h:1:all", "all")
    a.stopped()
    assert listed(db) == {}
    a.register()
    assert set(listed(db)) == {"h:1:all"}
    with db.session() as s:
        assert len(s.scalars(select(NodeRecord)).all()) == 1


def test_a_single_all_node_adds_no_fleet_lines(db: Database) -> None:
    member(db, "h:1:all", "all")
    assert render_fleet(list(listed(db).values())) == []


def test_export_claims_count_too(db: Database) -> None:
    w = member(db, "h:9:worker")
    make_series(db, 1)
    with db.session() as s:
        job = s.scalars(select(AnalysisJob)).one()
        job.state = JobState.DONE
        report = Report(job=job, sop_instance_uid="1.2.3", series_instance_uid="1.2.4", study_instance_uid="1.2.5",
                        path="x.dcm", model_name="m")
        s.add(ExportJob(report=report, destination="pacs", state=ExportState.SENDING,
                        claimed_by=w.name))
    assert listed(db)[w.name]["claims"] == 1


def test_claims_of_a_dead_process_of_this_host_are_taken_back_at_start(db: Database) -> None:
    """A node restarted after kill -9 takes back the work its previous process held at once
    (its pid is gone on this host); a live process's claim, one of another host and one whose
    lease still runs are left to their leases."""
    from scp_node.audit import AuditTrail
    from scp_node.scheduler.analysis import requeue_interrupted
    from scp_node.scheduler.fleet import dead_claimants_here

    gone = 2 ** 22 + 12345  # above the kernel's pid_max default: no such process
    host = socket.gethostname()
    claimants = [f"{host}:{gone}:all", f"{host}:{os.getpid()}:worker", f"elsewhere:{gone}:worker"]
    make_series(db, len(claimants))
    until = utcnow() + timedelta(minutes=5)
    with db.session() as s:
        jobs = s.scalars(select(AnalysisJob).order_by(AnalysisJob.id)).all()
        for job, name in zip(jobs, claimants):
            job.state, job.claimed_by, job.lease_until, job.attempts = JobState.RUNNING, name, until, 1
    assert dead_claimants_here(db) == [f"{host}:{gone}:all"]
    audit = AuditTrail(db, b"k" * 32)
    assert requeue_interrupted(db, audit, 3, shared=True) == 0  # every lease still runs
    assert requeue_interrupted(db, audit, 3, shared=True, dead=dead_claimants_here(db)) == 1
    with db.session() as s:
        states = [(j.claimed_by, j.state) for j in s.scalars(select(AnalysisJob).order_by(AnalysisJob.id))]
    assert states == [("", JobState.PENDING), (claimants[1], JobState.RUNNING), (claimants[2], JobState.RUNNING)]
