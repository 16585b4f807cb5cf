"""Bearer tokens for every DICOMweb route; the config keeps only their SHA-256.

A pure ASGI middleware in front of the whole app, so no route can be added without it.  Tokens
are compared as SHA-256 digests in constant time; a refusal is audited with the client address
and the request path (never the token, never the query string, which may carry a PatientID).

Refusals are audited at a bounded rate (:class:`AuditRateLimit`): per client address the first
:data:`REFUSED_ROWS_PER_INTERVAL` refusals of an interval get a row each; after that one row per
:data:`REFUSED_ROW_INTERVAL_SECONDS` carries the count of refusals since the last row, so a
client hammering the port cannot grow the audit table (or the log) by a row per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from ..audit import AuditTrail, Event
from .media import DicomJSONResponse

log = logging.getLogger(__name__)


#: Refusals from one address audited one row each within an interval ...
REFUSED_ROWS_PER_INTERVAL = 10
#: ... and after those, one row per interval with the count since the last row.
REFUSED_ROW_INTERVAL_SECONDS = 60.0


@dataclass
class _Tally:
    start: float  #: when this key's interval began
    rows: int = 0  #: rows of their own written in the interval
    pending: int = 0  #: counted since the last row, not written yet
    detail: str = ""  #: what the last of those was


@dataclass
class AuditRateLimit:
    """Which occurrences of a repeated event get an audit row, and the counts the others leave.

    Per key (a client address), the first ``burst`` occurrences in an interval of ``interval``
    seconds get a row of their own; later ones are counted, and one row per interval carries
    the count since the last row (:meth:`due`).  An interval with none starts the next burst.
    At most ``max_keys`` keys are kept: past that, new keys share the key ``overflow_key``.
    Not thread-safe: used on one event loop.
    """

    interval: float = REFUSED_ROW_INTERVAL_SECONDS
    burst: int = REFUSED_ROWS_PER_INTERVAL
    max_keys: int = 1024
    overflow_key: Hashable = "(other addresses)"
    clock: Callable[[], float] = time.monotonic
    _tallies: dict[Hashable, _Tally] = field(default_factory=dict, init=False)
    _timer: Any = field(default=None, init=False)

    def note(self, key: Hashable, detail: str = "") -> bool:
        """Count one occurrence; True when it gets a row of its own now."""
        now = self.clock()
        tally = self._tallies.get(key)
        if tally is None:
            if len(self._tallies) >= self.max_keys:
                self._forget(now)
                if len(self._tallies) >= self.max_keys:
                    key = self.overflow_key
                    tally = self._tallies.get(key)
            if tally is None:
                tally = self._tallies[key] = _Tally(now)
        if not tally.pending and now - tally.start >= self.interval:
            tally.start, tally.rows = now, 0  # a quiet interval: a new burst
        if tally.rows < self.burst and not tally.pending:
            tally.rows += 1
            return True
        tally.pending += 1
        tally.detail = detail
        return False

    def due(self) -> list[tuple[Hashable, int, str]]:
        """(key, count, last detail) of each key whose counted occurrences are due for a row."""
        now = self.clock()
        out = []
        for key, tally in self._tallies.items():
            if tally.pending and now - tally.start >= self.interval:
                out.append((key, tally.pending, tally.detail))
                # The next interval is counted too (rows = burst): a burst only after a quiet one.
                tally.start, tally.rows, tally.pending = now, self.burst, 0
        return out

    def drain(self) -> list[tuple[Hashable, int, str]]:
        """Every count not written yet, due or not (at stop: nothing counted is lost)."""
        out = [(key, t.pending, t.detail) for key, t in self._tallies.items() if t.pending]
        for tally in self._tallies.values():
            tally.pending = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return out

    def next_due_in(self) -> float | None:
        """Seconds until the next row of counted occurrences is due (None: nothing counted)."""
        now = self.clock()
        waits = [tally.start + self.interval - now for tally in self._tallies.values() if tally.pending]
        return max(0.0, min(waits)) if waits else None

    def flush_later(self, write: Callable[[list[tuple[Hashable, int, str]]], None]) -> None:
        """On the running event loop: write the due rows (in a worker thread) when they are due."""
        if self._timer is not None:
            return
        wait = self.next_due_in()
        if wait is None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timer = None
            rows = self.due()
            if rows:
                loop.run_in_executor(None, write, rows)
            self.flush_later(write)

        self._timer = loop.call_later(wait, fire)

    def _forget(self, now: float) -> None:
        for key in [k for k, t in self._tallies.items() if not t.pending and now - t.start >= self.interval]:
            del self._tallies[key]


def token_sha256(token: str) -> str:
    """What goes into ``[web] token_sha256`` for a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class BearerAuth:
    """Lets a request through only with ``Authorization: Bearer <token>`` of a configured hash."""

    def __init__(self, app: ASGIApp, hashes: Iterable[str], audit: AuditTrail,
                 limit: AuditRateLimit | None = None) -> None:
        self.app = app
        self.hashes = [bytes.fromhex(h) for h in hashes]
        self.audit = audit
        self.limit = limit if limit is not None else AuditRateLimit(
            interval=REFUSED_ROW_INTERVAL_SECONDS, burst=REFUSED_ROWS_PER_INTERVAL)

    def _valid(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
        ok = False
        for h in self.hashes:  # no early exit: the time does not tell which hash came close
            ok |= hmac.compare_digest(digest, h)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if self._valid(header):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        peer = client[0] if client else ""
        why = "missing" if not header else "invalid"
        path = str(scope.get("path", ""))[:200]
        detail = f"{scope.get('method')} {path}: {why} bearer token"
        if self.limit.note(peer, detail):
            log.warning("DICOMweb request refused: %s bearer token (%s %s from %s)", why, scope.get("method"), path,
                        peer)
            await run_in_threadpool(self.audit.record, Event.WEB_UNAUTHORIZED, outcome="failure", peer=peer,
                                    detail=detail)
        else:
            self.limit.flush_later(self._write_counted)
        rsp = DicomJSONResponse({"error": "a valid bearer token is required"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="scp_node"'})
        await rsp(scope, receive, send)

    def write_pending(self) -> None:
        """Write the rows of refusals counted so far (the server has stopped: nothing else runs)."""
        self._write_counted(self.limit.drain())

    def _write_counted(self, rows: list[tuple[Hashable, int, str]]) -> None:
        """The rows for refusals counted instead of audited one by one (in a worker thread)."""
        for peer, count, last in rows:
            log.warning("DICOMweb requests refused: %d more without a valid bearer token from %s", count, peer)
            self.audit.record(Event.WEB_UNAUTHORIZED, outcome="failure", peer=str(peer),
                              detail=f"{count} requests refused since the last row (rate-limited audit); "
                                     f"last: {last}")
