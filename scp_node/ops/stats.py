"""What the node measures as it works: the hooks the data path calls, cheap and safe when off.

Stores happen in the receiver processes as well as in the node process, so these counters and
histograms use prometheus-client's multiprocess mode: each process writes its values to its own
memory-mapped file in ``<var>/metrics`` (``PROMETHEUS_MULTIPROC_DIR``) and ``/metrics`` adds
them up (:mod:`scp_node.ops.metrics`).  The node sets the folder in its environment before the
receivers are spawned, so they inherit it; nothing here imports prometheus-client until a hook
is called with that folder set, so a node without ``[ops]`` (and the CLI) never loads it.

No label value here comes from the wire: ``via`` and ``outcome`` are the node's own words.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

#: Set (to the metrics folder) in the node's environment when ``[ops]`` is on; children inherit it.
ENV = "SCP_NODE_METRICS_DIR"
_PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_lock = threading.Lock()
_metrics: SimpleNamespace | None = None
#: The engine's speed in its last analysis (generated tokens per second of generation), this process.
last_tokens_per_second: float | None = None

STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def enable(folder: Path) -> None:
    """In the node process, before any receiver starts: an empty metrics folder, multiprocess mode.

    Called only with the node's lock held: the folder belongs to this node (a stale file from an
    earlier run would add its counts to this run's)."""
    global _metrics
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.db"):
        old.unlink()
    os.environ[ENV] = str(folder)
    os.environ[_PROMETHEUS_ENV] = str(folder)
    with _lock:
        _metrics = None  # (re)made with this folder at first use


def folder() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def _get() -> SimpleNamespace | None:
    global _metrics
    if _metrics is not None:
        return _metrics
    where = os.environ.get(ENV)
    if not where:
        return None
    with _lock:
        if _metrics is None:
            os.environ[_PROMETHEUS_ENV] = where
            from prometheus_client import Counter, Histogram, values

            # prometheus-client picks its value class when first imported; whatever imported it
            # before the folder was set (or with another folder), this process writes there now.
            values.ValueClass = values.MultiProcessValue()
            _metrics = SimpleNamespace(
                instances=Counter("scp_node_instances_received", "Instances received (C-STORE and STOW-RS), "
                                  "by how they arrived and what became of them", ["via", "outcome"], registry=None),
                bytes=Counter("scp_node_received_bytes", "Bytes of instances stored (new or replacing a copy)",
                              ["via"], registry=None),
                store=Histogram("scp_node_store_seconds", "Time to keep one instance: checks, durable file, "
                                "index commit (what the sender waits for before its answer)", ["via"],
                                buckets=STORE_BUCKETS, registry=None),
                stage=Histogram("scp_node_analysis_stage_seconds", "Time of each stage of an analysis: "
                                "queue_wait, prepare, generate_<turn>, report, export_<kind>", ["stage"],
                                buckets=STAGE_BUCKETS, registry=None),
                tokens=Counter("scp_node_engine_generated_tokens", "Tokens the engine generated", registry=None),
                generate=Counter("scp_node_engine_generate_seconds", "Seconds the engine spent generating",
                                 registry=None),
            )
    return _metrics


def stored(via: str, outcome: str, seconds: float, size: int) -> None:
    """One instance through :meth:`scp_node.store.ingest.Ingestor.ingest` (any outcome)."""
    m = _get()
    if m is None:
        return
    m.instances.labels(via, outcome).inc()
    m.store.labels(via).observe(seconds)
    if outcome in ("stored", "replaced") and size > 0:
        m.bytes.labels(via).inc(size)


def stage(name: str, seconds: float) -> None:
    m = _get()
    if m is not None and seconds >= 0:
        m.stage.labels(name).observe(seconds)


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Time a stage; it is observed whether the block succeeds or raises."""
    if _get() is None:
        yield
        return
    started = time.monotonic()
    try:
        yield
    finally:
        stage(name, time.monotonic() - started)


def analysis_result(result: Any) -> None:
    """An engine result (scp_node.engine.result.AnalysisResult): its stages and token counts."""
    global last_tokens_per_second
    if _get() is None or getattr(result, "not_analysed", ""):
        return
    prepare = float(getattr(result, "prepare_seconds", 0.0) or 0.0)
    if prepare > 0:
        stage("prepare", prepare)
    turns = list(getattr(result, "turns", None) or [])
    pairs = [(f"generate_{t.name}", float(t.seconds), int(t.new_tokens)) for t in turns] or \
        [("generate", float(getattr(result, "seconds", 0.0) or 0.0), int(getattr(result, "generated_tokens", 0) or 0))]
    m = _get()
    assert m is not None
    tokens = seconds = 0.0
    for name, secs, new in pairs:
        stage(name, secs)
        tokens += new
        seconds += secs
    m.tokens.inc(tokens)
    m.generate.inc(seconds)
    if seconds > 0 and tokens > 0:
        last_tokens_per_second = tokens / seconds
