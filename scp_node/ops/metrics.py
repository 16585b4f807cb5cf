"""``/metrics``: the node's state for Prometheus, read when scraped.

Two sources, one registry:

- :mod:`scp_node.ops.stats`: what the processes measure as they work (instances and bytes
  received, store latency, analysis stage times, tokens), added up over every process by
  prometheus-client's ``MultiProcessCollector``.
- :class:`NodeCollector`: what the index and the node already know, read at each scrape: the
  audit trail's counts since the node started (associations accepted / rejected / aborted,
  series completed, every event by outcome), queue depths, exports by destination and state,
  disk space, GPU memory, the engine's last speed, the health of each part.

The audit counts come from the rows themselves, so the child receivers' associations are
counted like the node's own.  Rows are counted once they are older than a minute (kept as a
running total) plus whatever is newer at each scrape, so a long scrape history never re-reads
old rows.
"""

from __future__ import annotations

import shutil
import threading
from collections import Counter as Tally
from datetime import datetime, timedelta
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from .. import __version__
from ..store.db import Database
from ..store.models import (AnalysisJob, AuditEvent, ExportJob, ExportState, JobState, Series, SeriesState,
                            utcnow)
from . import stats
from .health import check

#: Audit events counted into their own metric families (besides scp_node_audit_events_total).
_ASSOCIATIONS = {"association.accepted": "accepted", "association.rejected": "rejected",
                 "association.aborted": "aborted"}
_SETTLE = timedelta(seconds=60)


class AuditCounts:
    """Audit rows by (event, outcome) since the node started."""

    def __init__(self, db: Database) -> None:
        self.db = db
        with db.session() as s:
            self._settled_id = int(s.scalar(select(func.max(AuditEvent.id))) or 0)
        self._settled: Tally[tuple[str, str]] = Tally()
        self._lock = threading.Lock()

    def _group(self, s: Any, low: int, high: int | None) -> Tally[tuple[str, str]]:
        q = select(AuditEvent.event, AuditEvent.outcome, func.count()).where(AuditEvent.id > low)
        if high is not None:
            q = q.where(AuditEvent.id <= high)
        return Tally({(e, o): int(n) for e, o, n in s.execute(q.group_by(AuditEvent.event, AuditEvent.outcome))})

    def counts(self) -> Tally[tuple[str, str]]:
        with self._lock, self.db.session() as s:
            settle = s.scalar(select(func.max(AuditEvent.id)).where(AuditEvent.id > self._settled_id,
                                                                     AuditEvent.time < utcnow() - _SETTLE))
            if settle:
                self._settled += self._group(s, self._settled_id, int(settle))
                self._settled_id = int(settle)
            return self._settled + self._group(s, self._settled_id, None)


class NodeCollector(Collector):
    """The index's and the node's view, collected at each scrape."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.audit = AuditCounts(node.db)
        self._started_after: datetime = utcnow()  # analysis jobs started after this: queue wait observed
        self._lock = threading.Lock()

    def describe(self) -> list[Any]:
        return []  # no collect() at registration

    def _queue_wait(self, s: Any) -> None:
        """Observe how long each job started since the last scrape waited in the queue."""
        rows = s.execute(select(AnalysisJob.created_at, AnalysisJob.started_at)
                         .where(AnalysisJob.started_at > self._started_after)
                         .order_by(AnalysisJob.started_at)).all()
        for created, started in rows:
            stats.stage("queue_wait", (started - created).total_seconds())
            self._started_after = max(self._started_after, started)

    def collect(self) -> Iterator[Any]:
        node, db = self.node, self.node.db
        counts = self.audit.counts()
        audit = CounterMetricFamily("scp_node_audit_events", "Audit rows written since the node started",
                                    labels=["event", "outcome"])
        assoc = CounterMetricFamily("scp_node_associations", "DIMSE associations since the node started "
                                    "(every receiver process)", labels=["result"])
        tally: Tally[str] = Tally()
        for (event, outcome), n in sorted(counts.items()):
            audit.add_metric([event, outcome], n)
            if event in _ASSOCIATIONS:
                tally[_ASSOCIATIONS[event]] += n
        for result in ("accepted", "rejected", "aborted"):
            assoc.add_metric([result], tally[result])
        yield audit
        yield assoc
        yield CounterMetricFamily("scp_node_series_completed", "Series found complete since the node started",
                                  value=sum(n for (e, _), n in counts.items() if e == "series.complete"))
        with self._lock, db.session() as s:
            self._queue_wait(s)
            jobs = dict(s.execute(select(AnalysisJob.state, func.count()).group_by(AnalysisJob.state)).all())
            oldest = s.scalar(select(func.min(AnalysisJob.created_at)).where(AnalysisJob.state == JobState.PENDING))
            receiving = s.scalar(select(func.count()).select_from(Series)
                                 .where(Series.state == SeriesState.RECEIVING)) or 0
            exports = s.execute(select(ExportJob.destination, ExportJob.state, func.count())
                                .group_by(ExportJob.destination, ExportJob.state)).all()
        g = GaugeMetricFamily("scp_node_analysis_jobs", "Analysis jobs in the index by state "
                              "(pending + running: the queue depth)", labels=["state"])
        for state in JobState:
            g.add_metric([state.value], int(jobs.get(state, 0)))
        yield g
        yield GaugeMetricFamily("scp_node_analysis_oldest_pending_seconds", "Age of the oldest pending analysis job",
                                value=(utcnow() - oldest).total_seconds() if oldest is not None else 0.0)
        yield GaugeMetricFamily("scp_node_series_receiving", "Series still receiving (not complete yet)",
                                value=int(receiving))
        g = GaugeMetricFamily("scp_node_exports", "Export jobs by destination and state", labels=["destination", "state"])
        have = {(d, st): int(n) for d, st, n in exports}
        names = sorted({d for d, _ in have} | {d.name for d in node.config.destinations}
                       | {d.name for d in node.config.hl7_destinations} | {d.name for d in node.config.webhooks})
        for name in names:
            for state in ExportState:
                g.add_metric([name, state.value], have.get((name, state), 0))
        yield g
        yield from self._disk()
        yield from self._engine()
        health = check(node)
        g = GaugeMetricFamily("scp_node_health", "1 when the part is alive (as /healthz)", labels=["part"])
        for part, problem in health.items():
            g.add_metric([part], 0.0 if problem else 1.0)
        yield g
        receivers = getattr(node, "_receivers", None)
        yield GaugeMetricFamily("scp_node_receiver_processes", "Processes receiving DIMSE on the port",
                                value=1 + (receivers.alive() if receivers is not None else 0))

    def _disk(self) -> Iterator[Any]:
        store = self.node.config.store
        try:
            usage = shutil.disk_usage(store.storage_dir)
        except OSError:
            return
        yield GaugeMetricFamily("scp_node_disk_free_bytes", "Free space on the storage folder's file system",
                                value=usage.free)
        yield GaugeMetricFamily("scp_node_disk_total_bytes", "Size of the storage folder's file system",
                                value=usage.total)
        yield GaugeMetricFamily("scp_node_disk_min_free_bytes", "The disk guard's watermark: stores are refused "
                                "below it", value=max(store.min_free_bytes, int(usage.total * store.min_free_percent / 100)))

    def _engine(self) -> Iterator[Any]:
        engine = getattr(self.node, "_engine", None)
        info = GaugeMetricFamily("scp_node_info", "The node's version and model", labels=["version", "model", "test_model"])
        ident = getattr(engine, "identity", None) if getattr(engine, "loaded", False) else None
        info.add_metric([__version__, getattr(ident, "name", ""), str(bool(getattr(ident, "is_test_model", False))).lower()],
                        1.0)
        yield info
        if stats.last_tokens_per_second is not None:
            yield GaugeMetricFamily("scp_node_engine_tokens_per_second", "Generated tokens per second of the "
                                    "engine's last analysis", value=stats.last_tokens_per_second)
        from ..runtime import gpu_memory as _gpu_memory

        gpu = _gpu_memory()
        if gpu:
            for key in ("allocated", "reserved", "total"):
                yield GaugeMetricFamily(f"scp_node_gpu_memory_{key}_bytes", f"GPU memory {key} (torch, {gpu['gpu_device']})",
                                        value=gpu[f"gpu_memory_{key}_bytes"])


def registry_for(node: Any) -> CollectorRegistry:
    """The registry ``/metrics`` serves: the node's collector, then every process's measurements."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    where = stats.folder()
    if where is not None:
        multiprocess.MultiProcessCollector(registry, path=str(where))
    return registry
