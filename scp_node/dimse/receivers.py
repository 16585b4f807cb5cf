"""The receiver processes: the DIMSE port served from every core.

A Python process runs one thread at a time.  Receiving from several modalities at once, a single
process spends its CPU on pynetdicom's per-association threads queueing for that one lock, and
uses one core however many the machine has.  So the node receives in ``[node]
receiver_processes`` processes, the classic pre-fork design: the node process opens the
listening socket, and each receiver (the node process itself and its child processes) accepts
connections from that one socket.  The children only receive — no model, no scheduler — and
write to the same index and storage as the node process.  Nothing else can join the socket
(unlike ``SO_REUSEPORT``, where any process of the same user could bind the port and take
connections), and a child dies with the node: a ``kill -9`` of the node leaves no receiver
behind answering on its port.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

from .. import logs
from ..config import Config
from ..handlers.association import AssociationCounts
from ..runtime import open_database
from ..store.ingest import Ingestor
from .listener import DimseListener, ListenError

log = logging.getLogger(__name__)


def receiver_count(config: Config) -> int:
    """``[node] receiver_processes``; 0 means one per CPU core, at most 4."""
    n = config.node.receiver_processes
    return n if n > 0 else max(1, min(4, os.cpu_count() or 1))


class ReceiverProcesses:
    """The node's child receivers: started after recovery, stopped (SIGTERM, then SIGKILL) at stop."""

    def __init__(self, config: Config, listening: socket.socket, total: int) -> None:
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process that has threads
        self.config = config
        self.listening = listening
        self.slots: Any = self._ctx.Array(ctypes.c_int, total, lock=False)
        self._procs: list[Any] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._joined = threading.Event()
        self._supervisor: threading.Thread | None = None

    def counts(self, slot: int) -> AssociationCounts:
        return AssociationCounts(self.slots, slot)

    def _spawn(self, slot: int) -> tuple[Any, Any]:
        event = self._ctx.Event()
        proc = self._ctx.Process(target=run_receiver, name=f"scp-node-receiver-{slot}", daemon=False,
                                 args=(self.config, self.listening, self.slots, slot, os.getpid(),
                                       logging.getLogger().getEffectiveLevel(), event))
        proc.start()
        return proc, event

    def start(self, timeout: float = 120.0) -> None:
        """Start the children and wait until each serves (or has died: then raise ListenError)."""
        ready = []
        for slot in range(1, len(self.slots)):
            proc, event = self._spawn(slot)
            self._procs.append(proc)
            ready.append(event)
        deadline = time.monotonic() + timeout
        for proc, event in zip(self._procs, ready):
            while not event.wait(0.2):
                if not proc.is_alive() or time.monotonic() > deadline:
                    self.terminate()
                    self.join(10)
                    raise ListenError(f"receiver process {proc.name} did not start (exit code {proc.exitcode})")
        log.info("receiving in %d processes", len(self.slots))

    def supervise(self, on_restart: Callable[[int, int | None], None], interval: float = 2.0) -> None:
        """Replace a receiver that dies (a crash, the OOM killer) while the node runs.

        The watching thread lives until the receivers are joined at stop: a child's
        ``PR_SET_PDEATHSIG`` fires when the *thread* that started it ends, so a replacement started
        from a short-lived scheduler thread would be killed with that thread.
        """
        self._supervisor = threading.Thread(target=self._supervise, args=(on_restart, interval),
                                            name="ReceiverSupervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self, on_restart: Callable[[int, int | None], None], interval: float) -> None:
        while not self._stopping.wait(interval):
            with self._lock:
                if self._stopping.is_set():
                    break
                for i, proc in enumerate(self._procs):
                    if proc.is_alive():
                        continue
                    slot, code = i + 1, proc.exitcode
                    self.slots[slot] = 0  # its associations died with it
                    self._procs[i], _ready = self._spawn(slot)
                    on_restart(slot, code)
        self._joined.wait()  # keep the children's parent thread alive until they are gone

    def alive(self) -> int:
        return sum(1 for p in self._procs if p.is_alive())

    def terminate(self) -> None:
        """SIGTERM each receiver: it stops accepting, finishes its associations and exits 0."""
        with self._lock:
            self._stopping.set()  # no replacement is started from now on
            for p in self._procs:
                if p.is_alive():
                    p.terminate()

    def join(self, timeout: float) -> None:
        """Wait for the receivers to exit; kill what is still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        for p in self._procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("receiver %s did not stop in time; killing it", p.name)
                p.kill()
                p.join(5)
        self._procs = []
        self._joined.set()
        if self._supervisor is not None:
            self._supervisor.join(5)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the node process dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the node died before the line above took effect
        os._exit(1)


def run_receiver(config: Config, listening: socket.socket, slots: Any, slot: int, parent_pid: int,
                 log_level: int, ready: Any) -> None:
    """A child receiver's whole life: serve DIMSE on the shared socket until SIGTERM."""
    _die_with_parent(parent_pid)
    logs.configure(verbose=log_level <= logging.DEBUG)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which stops us in order
    db, audit = open_database(config)
    s = config.store
    ingestor = Ingestor(db, s.storage_dir, audit, s.duplicate_policy, min_free_bytes=s.min_free_bytes,
                        min_free_percent=s.min_free_percent)
    listener = DimseListener(config, audit, ingestor, listening, AssociationCounts(slots, slot))
    listener.start()
    gc.freeze()  # the modules loaded so far live as long as the receiver (see Node.start)
    ready.set()
    stop.wait()
    listener.stop(grace=min(config.node.dimse_timeout, 30.0))
    db.dispose()
