"""What `scp-node status` shows: is the node up, how deep are the queues, what failed last, and
the fleet: every node (receiver, worker, all) that shares the index, from its heartbeat row."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from .config import Config
from .runtime import PID_FILE
from .store.db import Database
from .store.models import (AnalysisJob, AuditEvent, ExportJob, ExportState, Instance, JobState, NodeRecord,
                           Series, SeriesState, utcnow)

#: A node whose heartbeat is older than this many ``[scheduler] heartbeat_seconds`` is "lost".
LOST_AFTER_BEATS = 3
#: A lost node is listed this long after its last heartbeat, then left out (its row stays).
FORGET_LOST_SECONDS = 3600.0


@dataclass
class NodeStatus:
    running: bool
    pid: int | None
    ae_title: str
    host: str
    port: int
    port_open: bool
    instances: int
    series_receiving: int
    analysis: dict[str, int] = field(default_factory=dict)
    exports: dict[str, int] = field(default_factory=dict)
    dead_exports: list[dict[str, Any]] = field(default_factory=list)
    last_errors: list[dict[str, str]] = field(default_factory=list)
    #: From the node's heartbeat (pid file): seconds since it was written, GPU memory if on CUDA.
    heartbeat_age_seconds: float | None = None
    #: Processes receiving DIMSE on the port (the node's own and its live child receivers).
    receiver_processes: int | None = None
    gpu: dict[str, Any] = field(default_factory=dict)
    #: This config's node: all, receiver or worker (from its pid file; "" when not running).
    role: str = ""
    #: Every node sharing the index (:func:`fleet_nodes`): live and lost, never stopped ones.
    fleet: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def collect(config: Config, db: Database, errors: int = 5) -> NodeStatus:
    """Read the pid file and the index; never changes anything."""
    pid = None
    beat: dict[str, Any] = {}
    try:
        beat = json.loads((config.var_dir / PID_FILE).read_text())
        pid = int(beat["pid"])
    except (FileNotFoundError, ValueError, KeyError):
        pass
    running = pid is not None and _pid_alive(pid)
    n = config.node
    with db.session() as s:
        def counts(model: Any, column: Any) -> dict[str, int]:
            rows = s.execute(select(column, func.count()).select_from(model).group_by(column)).all()
            return {getattr(k, "value", str(k)): int(v) for k, v in rows}

        analysis = {st.value: 0 for st in JobState} | counts(AnalysisJob, AnalysisJob.state)
        exports = {st.value: 0 for st in ExportState} | counts(ExportJob, ExportJob.state)
        dead = [{"id": j.id, "destination": j.destination, "attempts": j.attempts, "error": j.last_error,
                 "sop_instance_uid": j.report.sop_instance_uid}
                for j in s.scalars(select(ExportJob).where(ExportJob.state == ExportState.DEAD).limit(20))]
        last = [{"time": e.time.isoformat(timespec="seconds"), "event": e.event, "detail": e.detail}
                for e in s.scalars(select(AuditEvent).where(AuditEvent.outcome == "failure")
                                   .order_by(AuditEvent.id.desc()).limit(errors))]
        fleet = fleet_nodes(s, config.scheduler.heartbeat_seconds)
        instances = int(s.scalar(select(func.count()).select_from(Instance)) or 0)
        receiving = int(s.scalar(select(func.count()).select_from(Series)
                                 .where(Series.state == SeriesState.RECEIVING)) or 0)
    role = str(beat.get("role", "all")) if running else ""
    return NodeStatus(running=running, pid=pid if running else None, ae_title=n.ae_title, host=n.host,
                      port=n.port, port_open=_port_open(n.host, n.port) if running and role != "worker" else False,
                      role=role, fleet=fleet,
                      instances=instances, series_receiving=receiving, analysis=analysis, exports=exports,
                      dead_exports=dead, last_errors=last,
                      heartbeat_age_seconds=round(time.time() - float(beat["heartbeat"]), 1)
                      if running and "heartbeat" in beat else None,
                      receiver_processes=int(beat["receiver_processes"]) if running and "receiver_processes" in beat
                      else None,
                      gpu={k: v for k, v in beat.items() if k.startswith("gpu_")} if running else {})


def fleet_nodes(session: Any, heartbeat_seconds: float, now: Any = None) -> list[dict[str, Any]]:
    """The nodes sharing this index: name, role, host, pid, heartbeat age, claims held (running
    analyses and sending exports), "live" or "lost" (no heartbeat for 3 periods; listed for an
    hour after the last one).  Stopped nodes are left out."""
    now = now or utcnow()
    rows = session.scalars(select(NodeRecord).where(
        NodeRecord.stopped_at.is_(None), NodeRecord.heartbeat_at >= now - timedelta(seconds=FORGET_LOST_SECONDS))
        .order_by(NodeRecord.role, NodeRecord.host, NodeRecord.pid)).all()
    claims: dict[str, int] = {}
    for model, busy in ((AnalysisJob, JobState.RUNNING), (ExportJob, ExportState.SENDING)):
        for name, n in session.execute(select(model.claimed_by, func.count()).where(
                model.state == busy, model.claimed_by != "").group_by(model.claimed_by)):
            claims[name] = claims.get(name, 0) + int(n)
    lost = timedelta(seconds=heartbeat_seconds * LOST_AFTER_BEATS)
    return [{"name": r.name, "role": r.role, "host": r.host, "pid": r.pid, "ae_title": r.ae_title,
             "version": r.version, "started_at": r.started_at.isoformat(timespec="seconds"),
             "heartbeat_age_seconds": round(max(0.0, (now - r.heartbeat_at).total_seconds()), 1),
             "state": "lost" if now - r.heartbeat_at > lost else "live", "claims": claims.get(r.name, 0)}
            for r in rows]


def render_fleet(nodes: list[dict[str, Any]]) -> list[str]:
    """One line per node of the fleet (empty when this is the only node, role all)."""
    if not nodes or (len(nodes) == 1 and nodes[0]["role"] == "all" and nodes[0]["state"] == "live"):
        return []
    lines = [f"fleet     {sum(n['state'] == 'live' for n in nodes)} live"
             + (f", {sum(n['state'] == 'lost' for n in nodes)} lost" if any(n["state"] == "lost" for n in nodes)
                else "")]
    for n in nodes:
        lines.append(f"  {n['role']:<8} {n['name']}  heartbeat {n['heartbeat_age_seconds']:.0f} s ago"
                     f"{' (LOST)' if n['state'] == 'lost' else ''}, {n['claims']} claims")
    return lines


def render(st: NodeStatus) -> str:
    lines = [f"node      {'running (pid %d)' % st.pid if st.running else 'not running'}"
             + (f", role {st.role}" if st.role and st.role != "all" else ""),
             ("listen    none (a worker has no DIMSE port)" if st.role == "worker" else
              f"listen    {st.ae_title} @ {st.host}:{st.port} ({'open' if st.port_open else 'closed'})"
              + (f", {st.receiver_processes} receiver processes" if st.receiver_processes else "")),
             f"index     {st.instances} instances, {st.series_receiving} series receiving",
             "analysis  " + ", ".join(f"{k} {v}" for k, v in st.analysis.items()),
             "exports   " + ", ".join(f"{k} {v}" for k, v in st.exports.items())]
    if st.gpu:
        gib = 1024 ** 3
        lines.append(f"gpu       {st.gpu.get('gpu_device', '?')}: "
                     f"{st.gpu.get('gpu_memory_allocated_bytes', 0) / gib:.1f} GiB allocated, "
                     f"{st.gpu.get('gpu_memory_reserved_bytes', 0) / gib:.1f} GiB reserved of "
                     f"{st.gpu.get('gpu_memory_total_bytes', 0) / gib:.1f} GiB")
    elif st.running and st.role != "receiver":
        lines.append("gpu       not in use (CPU)")
    lines += render_fleet(st.fleet)
    for d in st.dead_exports:
        lines.append(f"  dead export {d['id']} -> {d['destination']} after {d['attempts']} attempts: {d['error']}")
    if st.dead_exports:
        lines.append("  (retry with: scp-node exports retry --config FILE)")
    lines.append("last errors" + ("" if st.last_errors else "  none"))
    for e in st.last_errors:
        lines.append(f"  {e['time']} {e['event']}: {e['detail']}")
    return "\n".join(lines)
