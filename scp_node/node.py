"""The running node: the DIMSE listener (scp_node.dimse), the index, the job loops.

:class:`Node` wires the data path together — handlers -> store -> scheduler -> engine -> report
-> export — and owns their life cycle: ``start`` (recover interrupted work, load the model,
open the port, start the loops) and ``stop`` (close the port, let the running job reach its
safe point, close the database).

Its role (``serve --role``) says which parts run: ``all`` (everything, the single-machine node),
``receiver`` (DIMSE and DICOMweb in, indexed; no model, no job loops) or ``worker`` (the model,
series completion, analysis and export; no port).  Several receivers and workers share one
PostgreSQL index and one storage folder; each registers in the fleet table (scheduler.fleet).
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.dataset import Dataset

from . import __version__
from .audit import Event
from .config import Config
from .engine.result import AnalysisResult
from .export.dispatch import send_result
from .ops import stats
from .scheduler import analysis, exports
from .scheduler.analysis import AnalysisQueue
from .scheduler.completion import SeriesCompletion
from .scheduler.exports import ExportQueue
from .scheduler.fleet import FleetMember, dead_claimants_here, node_name, requeue_expired
from .runtime import LOCK_FILE, PID_FILE, open_database, schema_problem
from .runtime import gpu_memory as _gpu_memory
from .startup import StartupError, check_role, load_engine, prepare_model_dir
from .store.ingest import Ingestor

log = logging.getLogger(__name__)

__all__ = ["Node", "StartupError", "check_role", "prepare_model_dir"]


class Node:
    """scp_node as one process: DIMSE SCP, series completion, analysis and export loops (those
    of its ``role``: all, receiver or worker)."""

    def __init__(self, config: Config, role: str = "all") -> None:
        check_role(role, config.store.database_url)
        self.config = config
        self.role = role
        #: This process in the fleet table and in the claims it takes.
        self.name = node_name(role)
        self.db, self.audit = open_database(config)
        self.member = FleetMember(self.db, self.name, role, config.node.ae_title, __version__,
                                  config.scheduler.claim_lease_seconds)
        self.ingestor = Ingestor(self.db, config.store.storage_dir, self.audit, config.store.duplicate_policy,
                                 min_free_bytes=config.store.min_free_bytes,
                                 min_free_percent=config.store.min_free_percent)
        self._listening: Any = None  # the port's socket, shared by every receiver process
        self._listener: Any = None
        self._receivers: Any = None
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self._engine: Any = None
        self._web: Any = None
        self._ops: Any = None  # [ops]: /metrics and /healthz (scp_node.ops.server)
        self._atna: Any = None  # [audit] syslog_url: audit rows to the ATNA repository (scp_node.audit.syslog)
        self._stopped = threading.Event()

    # -- analysis ----------------------------------------------------------------------------
    def _load_engine(self) -> Any:
        """The model of ``[engine]``, loaded (in this process, or asked of its server)."""
        return load_engine(self.config, self.audit)

    def _build_report(self, evidence: list[Dataset], result: AnalysisResult) -> Dataset:
        from .report import ReportingNode, build_measurement_report

        r = self.config.report
        node = ReportingNode(ae_title=self.config.node.ae_title, station_name=r.station_name,
                             institution_name=r.institution_name, software_version=__version__)
        with stats.timed("report_build"):
            return build_measurement_report(evidence, result, node=node, series_number=r.series_number)

    @staticmethod
    def _write_report(sr: Dataset, path: Path, result: AnalysisResult) -> None:
        """The SR, then its JSON findings sidecar (``<sop>.json`` beside it), both durably."""
        from .report import findings_json, write_report
        from .store.files import write_durably

        stats.analysis_result(result)  # [ops] metrics: stage times and tokens of the engine's work
        with stats.timed("report_write"):
            write_report(sr, path)
        sidecar = json.dumps(findings_json(sr, result), indent=2, ensure_ascii=False)
        write_durably(path.with_suffix(".json"), sidecar.encode("utf-8"))

    def _queues(self) -> tuple[SeriesCompletion, AnalysisQueue, ExportQueue]:
        from .engine import SeriesSkipped

        c = self.config
        completion = SeriesCompletion(self.db, self.audit, c.scheduler.series_stable_seconds,
                                      c.scheduler.series_max_wait_seconds)
        analysis_q = AnalysisQueue(self.db, self.audit, c.store.storage_dir, self._engine, self._build_report,
                                   self._write_report, c.destinations + c.hl7_destinations + c.webhooks,
                                   c.scheduler.max_analysis_attempts,
                                   skip_exceptions=(SeriesSkipped,), notify_not_analysed=c.report.notify_not_analysed,
                                   priors=self._prior_lookup(), worker=self.name,
                                   lease_seconds=c.scheduler.claim_lease_seconds)
        send = partial(send_result, calling_ae_title=c.node.ae_title, timeout=c.node.network_timeout, index=self.db)
        export_q = ExportQueue(self.db, self.audit, c.store.storage_dir,
                               c.destinations + c.hl7_destinations + c.webhooks, c.export, send,
                               worker=self.name, lease_seconds=c.scheduler.claim_lease_seconds)
        return completion, analysis_q, export_q

    def _prior_lookup(self) -> Any:
        """``[scheduler] compare_priors``: the prior finder (local index, then the [[priors]] PACS)."""
        c = self.config
        if not c.scheduler.compare_priors:
            return None
        from .scheduler.priors import PriorLookup

        return PriorLookup(self.db, self.audit, c.store.storage_dir, c.priors, own_ae_title=c.node.ae_title,
                           lookback_days=c.scheduler.prior_lookback_days, ingestor=self.ingestor)

    @staticmethod
    def _drain(run_once: Any, stopped: threading.Event) -> None:
        """Run a queue until it is empty (or the node stops); called by the scheduler."""
        while not stopped.is_set() and run_once():
            pass

    # -- life cycle --------------------------------------------------------------------------
    @property
    def receives(self) -> bool:
        """Runs the DIMSE port (and [web]): roles all and receiver."""
        return self.role != "worker"

    @property
    def works(self) -> bool:
        """Loads the model and runs completion, analysis and export: roles all and worker."""
        return self.role != "receiver"

    def start(self) -> None:
        c = self.config
        if (problem := schema_problem(c, self.db)) is not None:  # before the lock: stop() then writes nothing
            raise StartupError(problem)
        self._lock_var_dir()
        if c.ops is not None:  # first: a monitor sees the start (503 until every part is up)
            self._start_ops()
        if c.audit.syslog_url:  # its cursor starts before this start's first row
            from .audit.syslog import SyslogForwarder

            try:
                self._atna = SyslogForwarder(self.db, c.audit, c.node.ae_title, c.var_dir,
                                             poll=c.scheduler.poll_seconds)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise StartupError(f"[audit] syslog_ca / syslog_cert / syslog_key: {exc}") from None
        if self.works and c.engine.backend == "transformers":  # a served model's weights are the server's
            prepare_model_dir(c)
        c.store.storage_dir.mkdir(parents=True, exist_ok=True)
        self._join_fleet()
        self._recover()
        if self.works:
            self._engine = self._load_engine()
            completion, analysis_q, export_q = self._queues()
        if self.receives:
            self._listen()
            if c.web is not None:
                from .web import WebStartError, start_web

                try:
                    self._web = start_web(c, self.db, self.audit, self.ingestor)
                except WebStartError as exc:
                    raise StartupError(str(exc)) from None
        poll = c.scheduler.poll_seconds
        common = dict(trigger="interval", seconds=poll, max_instances=1, coalesce=True)
        if self.works:
            self.scheduler.add_job(completion.run_once, id="series-completion", **common)
            self.scheduler.add_job(self._drain, args=[analysis_q.run_once, self._stopped], id="analysis", **common)
            self.scheduler.add_job(self._drain, args=[export_q.run_once, self._stopped], id="export", **common)
        self.scheduler.add_job(self._write_pid, trigger="interval", seconds=5, id="heartbeat", max_instances=1,
                               coalesce=True)
        # Everything loaded so far (torch, transformers, the model, the modules) lives as long as
        # the process: out of the collector's sight, a full collection — which allocation-heavy
        # association handling triggers often — no longer walks the whole heap each time.
        gc.freeze()
        self._write_pid()
        ident = self._engine.identity if self._engine is not None else None
        self.audit.record(Event.NODE_STARTED, ae_title=c.node.ae_title,
                          peer=f"{c.node.host}:{c.node.port}" if self.receives else "",
                          detail=f"scp_node {__version__}; role {self.role} as {self.name}"
                                 + (f"; model {ident.name}" + (" (TEST MODEL)" if ident.is_test_model else "")
                                    if ident is not None else ""))
        if self._atna is not None:
            self._atna.start()
        if self.receives:
            log.info("listening as %s on %s:%d (role %s)", c.node.ae_title, c.node.host, c.node.port, self.role)
        else:
            log.info("worker %s running", self.name)

    def _join_fleet(self) -> None:
        """Register in the fleet table and start beating now, before the (slow) model load: the
        others see this node as live from its first second, and its claims never lapse."""
        s = self.config.scheduler
        self.member.register()
        self.scheduler.add_job(self.member.beat, trigger="interval", seconds=s.heartbeat_seconds,
                               id="fleet-heartbeat", max_instances=1, coalesce=True)
        if self.works and not self.db.is_sqlite:
            # Any worker takes back the jobs of a worker that stopped renewing its claims.
            self.scheduler.add_job(requeue_expired, args=[self.db, self.audit, s.max_analysis_attempts],
                                   trigger="interval", seconds=s.heartbeat_seconds, id="claims",
                                   max_instances=1, coalesce=True)
        self.scheduler.start()

    def _recover(self) -> None:
        """Clear what a stop left half-done.

        On SQLite there is one node: every RUNNING job and SENDING export was this node's, in a
        previous life, and runs again now.  On a shared index only the work nobody can still be
        doing is taken back (no claimant, a lapsed lease, or a claimant that was a process of this
        host and is gone -- a node restarted after kill -9 takes its own work back at once; a
        worker that died elsewhere lets its claims lapse after ``claim_lease_seconds``), and the
        storage sweep (temporary and unindexed
        files) runs only when no other node is live: another node's file between its write and
        its index commit looks exactly like a crash's leftover.
        """
        c = self.config
        shared = not self.db.is_sqlite
        others = self.member.others_alive(c.scheduler.heartbeat_seconds) if shared else []
        if others:
            log.info("storage sweep skipped: %d other nodes are live on this index (%s)", len(others),
                     ", ".join(others[:5]))
        else:
            self.ingestor.recover()
        if not self.works:
            return
        dead = dead_claimants_here(self.db) if shared else []  # this host's processes gone (kill -9)
        n_jobs = analysis.requeue_interrupted(self.db, self.audit, c.scheduler.max_analysis_attempts, shared=shared,
                                              dead=dead)
        n_exp = exports.requeue_interrupted(self.db, self.audit, shared=shared, dead=dead)
        if n_jobs or n_exp:
            log.info("recovered %d interrupted analysis jobs and %d interrupted exports", n_jobs, n_exp)

    def _start_ops(self) -> None:
        """``[ops]``: metrics from every process (a fresh folder beside the storage; the receivers
        inherit it), then the HTTP port for /metrics and /healthz."""
        from .ops.server import OpsServer, OpsStartError

        stats.enable(self.config.var_dir / "metrics")
        server = OpsServer(self)
        try:
            server.start()
        except OpsStartError as exc:
            raise StartupError(str(exc)) from None
        self._ops = server

    def _listen(self) -> None:
        """Open the port and start receiving: here, and in the child receiver processes."""
        from .dimse.listener import DimseListener, ListenError, open_listening_socket
        from .dimse.receivers import ReceiverProcesses, receiver_count
        from .dimse.tls import TLSConfigError, server_context

        c = self.config
        try:
            server_context(c.node)  # a bad TLS setup stops the start before any receiver runs
            self._listening = open_listening_socket(c.node.host, c.node.port)
            total = receiver_count(c)
            if total > 1:
                self._receivers = ReceiverProcesses(c, self._listening, total)
                self._receivers.start()  # children first: callers wait in the backlog until all serve
            self._listener = DimseListener(c, self.audit, self.ingestor, self._listening,
                                           self._receivers.counts(0) if self._receivers else None)
            self._listener.start()
        except (TLSConfigError, ListenError) as exc:
            raise StartupError(str(exc)) from None
        if self._receivers is not None:
            self._receivers.supervise(self._receiver_restarted)

    def _receiver_restarted(self, slot: int, exit_code: int | None) -> None:
        how = f"was killed by signal {-exit_code}" if exit_code is not None and exit_code < 0 else \
            f"exited with code {exit_code}"
        log.error("receiver process %d %s; a new one was started", slot, how)
        self.audit.record(Event.RECEIVER_RESTARTED, outcome="failure", ae_title=self.config.node.ae_title,
                          detail=f"receiver process {slot} {how}; a new one was started")

    def _lock_var_dir(self) -> None:
        """One node per storage: a second ``serve`` with the same config must not run the crash
        recovery (or anything else) beside a live node, so it stops here with a clear message."""
        var = self.config.var_dir
        try:
            var.mkdir(parents=True, exist_ok=True)
            fh = open(var / LOCK_FILE, "a+")
        except OSError as exc:
            raise StartupError(f"cannot use the run-time folder {var}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise StartupError(f"another scp-node is already running with the storage in {var} "
                               f"(lock file {LOCK_FILE} is held); stop it first") from None
        self._lock_file = fh

    def stop(self) -> None:
        """Stop accepting, let the running job reach its end, close everything."""
        if getattr(self, "_lock_file", None) is None:
            # start() never got the lock: this process owns nothing to stop (not the pid file,
            # not the audit's node.stopped row of the node that does hold it).
            self.db.dispose()
            return
        self._stopped.set()
        if self._web is not None:
            self._web.stop()
            self._web = None
        if self._listener is not None:
            grace = min(self.config.node.dimse_timeout, 30.0)
            if self._receivers is not None:
                self._receivers.terminate()  # they finish their associations while this one does
            self._listener.stop(grace)
            if self._receivers is not None:
                self._receivers.join(grace + 5)
            self._listener = self._receivers = None
            self._listening.close()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        close = getattr(self._engine, "close", None)  # the served backend's request threads
        if close is not None:
            close()
        if self._ops is not None:
            self._ops.stop()
            self._ops = None
        self.audit.record(Event.NODE_STOPPED, ae_title=self.config.node.ae_title,
                          detail=f"role {self.role} as {self.name}")
        try:
            self.member.stopped()
        except Exception:  # noqa: BLE001 - the row then shows as lost in `status`, nothing worse
            log.exception("could not mark this node stopped in the fleet table")
        if self._atna is not None:  # the last rows, node.stopped included
            self._atna.stop()
            self._atna = None
        self._remove_pid()
        self.db.dispose()
        self._lock_file.close()  # releases the flock
        self._lock_file = None

    @property
    def pid_path(self) -> Path:
        return self.config.var_dir / PID_FILE

    def _write_pid(self) -> None:
        """The pid file doubles as a heartbeat: what `scp-node status` cannot read from the DB
        (the process's GPU memory) is refreshed here every few seconds."""
        c = self.config.node
        info: dict[str, Any] = {"pid": os.getpid(), "host": c.host, "port": c.port, "ae_title": c.ae_title,
                                "heartbeat": time.time(), "role": self.role, "name": self.name}
        info["receiver_processes"] = (1 + (self._receivers.alive() if self._receivers is not None else 0)
                                      if self.receives else 0)
        info.update(_gpu_memory())
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pid_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(self.pid_path)

    def _remove_pid(self) -> None:
        try:
            self.pid_path.unlink()
        except FileNotFoundError:
            pass
