"""``/healthz``: is each part of the node alive? Each check says what is wrong, or nothing.

- ``dimse``: the port's socket is open, this process's acceptor runs, every child receiver runs.
- ``index``: the database answers a query.
- ``engine``: the model is loaded; with ``[engine] backend = "openai"`` the model server also
  answers ``GET /models`` and lists the configured model (asked at most every 5 s, 5 s timeout;
  only the configured server, which the config allowed, is asked).
- ``scheduler``: the job loops' scheduler runs and its heartbeat job (every 5 s) ran within
  ``[ops] heartbeat_max_seconds`` (a wedged scheduler stops it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy import text

log = logging.getLogger(__name__)

_PROBE_EVERY = 5.0
_PROBE_TIMEOUT = 5.0


class _ServerProbe:
    """The openai backend's server: last answer of ``GET <base_url>/models``, refreshed at most every 5 s."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = 0.0
        self._problem: str | None = None

    def problem(self, engine_config: Any) -> str | None:
        with self._lock:
            if time.monotonic() - self._at < _PROBE_EVERY:
                return self._problem
            self._problem = self._ask(engine_config)
            self._at = time.monotonic()
            return self._problem

    @staticmethod
    def _ask(e: Any) -> str | None:
        url = e.base_url.rstrip("/") + "/models"
        headers = {"Accept": "application/json"}
        if e.api_key_file:
            try:
                headers["Authorization"] = "Bearer " + Path(e.api_key_file).read_text().strip()
            except OSError as exc:
                return f"cannot read api_key_file: {exc.strerror or exc}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        try:
            with opener.open(urllib.request.Request(url, headers=headers), timeout=_PROBE_TIMEOUT) as rsp:
                served = [str(m.get("id")) for m in json.loads(rsp.read()).get("data", []) if isinstance(m, dict)]
        except urllib.error.HTTPError as exc:
            return f"model server {e.base_url} answered HTTP {exc.code}"
        except (OSError, ValueError, AttributeError) as exc:
            return f"model server {e.base_url} is not answering ({type(exc).__name__})"
        if e.model not in served:
            return f"model server {e.base_url} does not serve {e.model!r}"
        return None


_probes: dict[int, _ServerProbe] = {}


def _dimse(node: Any) -> str | None:
    listening = getattr(node, "_listening", None)
    listener = getattr(node, "_listener", None)
    if listening is None or listener is None or listening.fileno() < 0:
        return "the DIMSE port is not open"
    if getattr(listener, "_server", None) is None or \
            not any(t.name == "AcceptorServer" and t.is_alive() for t in threading.enumerate()):
        return "the DIMSE acceptor is not running"
    receivers = getattr(node, "_receivers", None)
    if receivers is not None:
        want, alive = len(receivers.slots) - 1, receivers.alive()
        if alive < want:
            return f"{alive} of {want} child receiver processes running"
    return None


def _index(node: Any) -> str | None:
    try:
        with node.db.session() as s:
            s.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return f"the index does not answer ({type(exc).__name__})"
    return None


def _engine(node: Any) -> str | None:
    engine = getattr(node, "_engine", None)
    if engine is None or not getattr(engine, "loaded", True):
        return "the model is not loaded"
    e = node.config.engine
    if e.backend == "openai":
        probe = _probes.setdefault(id(node), _ServerProbe())
        return probe.problem(e)
    return None


def _scheduler(node: Any) -> str | None:
    scheduler = getattr(node, "scheduler", None)
    if scheduler is None or not scheduler.running:
        return "the job scheduler is not running"
    try:
        beat = float(json.loads(node.pid_path.read_text())["heartbeat"])
    except (OSError, ValueError, KeyError):
        return "no heartbeat yet"
    age = time.time() - beat
    limit = node.config.ops.heartbeat_max_seconds if node.config.ops is not None else 30.0
    if age > limit:
        return f"the scheduler's heartbeat is {age:.0f} s old"
    return None


def check(node: Any) -> dict[str, str | None]:
    """Each part and what is wrong with it (None: alive)."""
    role = getattr(node, "role", "all")  # a worker has no port, a receiver no model
    return {"dimse": _dimse(node) if role != "worker" else None, "index": _index(node),
            "engine": _engine(node) if role != "receiver" else None, "scheduler": _scheduler(node)}
