"""uvicorn in a background thread of the node process, started and stopped by :class:`Node`.

The listening socket is bound here, synchronously, so "port in use" or a bad TLS file is a
startup error the admin sees at once instead of a thread dying quietly.  uvicorn's access log is
off: its lines carry query strings, and a QIDO query string may carry a PatientID.

Connections are bounded (``[web]`` keys; the protocol is :mod:`.uvicorn_internals`):

- ``header_timeout_seconds``: a connection must deliver a complete request head within this
  (from when it opened, or from the first byte of a later request on a kept-alive connection);
  uvicorn itself has no such timeout, so a client that never finishes its headers ("half-open",
  slowloris) would otherwise hold a connection for ever.
- ``keep_alive_seconds``: an idle kept-alive connection is closed after this (uvicorn's
  ``timeout_keep_alive``).
- ``max_connections``: a connection past this many open ones is answered 503 and closed at once
  (and uvicorn's ``limit_concurrency`` answers 503 should its tasks ever outnumber it).

Connections closed this way are audited (``web.connection_closed``) at a bounded rate: per
client address the first one gets a row, later ones are counted and one row per minute carries
the count (:class:`scp_node.web.auth.AuditRateLimit`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
import time
from typing import Any, Hashable

import uvicorn
from starlette.types import ASGIApp

from ..config import WebConfig
from .auth import AuditRateLimit, BearerAuth
from .uvicorn_internals import guarded_protocol

log = logging.getLogger(__name__)

#: Audit event: connections the server closed for a limit (header timeout, max_connections).
WEB_CONNECTION_CLOSED = "web.connection_closed"
#: Per client address and reason: the first closed connection gets a row of its own, then one
#: row per interval carries the count.
CLOSED_ROWS_PER_INTERVAL = 1
CLOSED_ROW_INTERVAL_SECONDS = 60.0


class WebStartError(RuntimeError):
    """The DICOMweb service cannot start; the message says what to fix."""


class ConnectionGuard:
    """What the connections of one server share: the limits, and the audit of closed connections.

    Called on the server's event loop only (``write_pending`` once it has stopped).  ``audit``
    may be None (log lines only).  One :class:`AuditRateLimit` per reason, keyed by address.
    """

    REASONS = ("header_timeout", "max_connections")

    def __init__(self, web: WebConfig, audit: Any = None) -> None:
        self.header_timeout = float(web.header_timeout_seconds)
        self.max_connections = int(web.max_connections)
        self.audit = audit
        self.limits = {reason: AuditRateLimit(interval=CLOSED_ROW_INTERVAL_SECONDS, burst=CLOSED_ROWS_PER_INTERVAL)
                       for reason in self.REASONS}
        self.closed = dict.fromkeys(self.REASONS, 0)  #: totals since start

    def closed_one(self, reason: str, peer: str) -> None:
        """A connection closed for ``reason``: audited now, or counted for a later row."""
        self.closed[reason] += 1
        limit = self.limits[reason]
        if limit.note(peer, "since the last row"):  # (the note the counted ones' row gets)
            asyncio.get_running_loop().run_in_executor(None, self._record, reason, [(peer, 1, "")])
        else:
            limit.flush_later(functools.partial(self._record, reason))

    def write_pending(self) -> None:
        """Write the rows of closed connections counted so far (the server has stopped)."""
        for reason, limit in self.limits.items():
            self._record(reason, limit.drain())

    def _record(self, reason: str, rows: list[tuple[Hashable, int, str]]) -> None:
        what = (f"sent no complete request header within {self.header_timeout:g} s" if reason == "header_timeout"
                else f"over max_connections ({self.max_connections} open): answered 503")
        for peer, count, note in rows:
            detail = f"{count} connection{'s' if count != 1 else ''} closed by the server: {what}"
            if note:
                detail += f" ({note})"
            log.warning("DICOMweb connection from %s: %s", peer, detail)
            if self.audit is not None:
                self.audit.record(WEB_CONNECTION_CLOSED, outcome="failure", peer=str(peer), detail=detail)


class WebServer:
    """One uvicorn server on ``[web] host:port`` (HTTPS when tls_cert/tls_key are set)."""

    def __init__(self, app: ASGIApp, web: WebConfig, audit: Any = None) -> None:
        self.web = web
        if audit is None:  # the app's own trail (create_app puts it in app.state.ctx)
            audit = getattr(getattr(getattr(app, "state", None), "ctx", None), "audit", None)
        self.guard = ConnectionGuard(web, audit)
        # [web] connection_guard = false: uvicorn's own protocol (no header timeout, no 503 of
        # our own; keep-alive and limit_concurrency still apply) -- the library's path, should
        # an upgrade of uvicorn break scp_node.web.uvicorn_internals.
        protocol: Any = guarded_protocol(self.guard) if web.connection_guard else "h11"
        ssl = dict(ssl_certfile=web.tls_cert, ssl_keyfile=web.tls_key) if web.tls_cert else {}
        # limit_concurrency counts the connection asking too (503 at `>=`): one more, so that
        # max_connections connections are served and the 503 comes from GuardedH11Protocol.
        self.config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                     timeout_graceful_shutdown=10, server_header=False, http=protocol,
                                     timeout_keep_alive=web.keep_alive_seconds,  # type: ignore[arg-type]
                                     limit_concurrency=int(web.max_connections) + 1, **ssl)
        self.server = uvicorn.Server(self.config)
        self._app = app
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.web.tls_cert else "http"

    def start(self, timeout: float = 15.0) -> None:
        try:
            self.config.load()  # reads the TLS files now, in the caller's thread
        except (OSError, ValueError) as exc:
            raise WebStartError(f"[web] TLS certificate/key cannot be used: {exc}") from None
        family = socket.AF_INET6 if ":" in self.web.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.web.host, self.web.port))
        except OSError as exc:
            sock.close()
            raise WebStartError(f"cannot listen on {self.web.host}:{self.web.port}: {exc.strerror or exc}") from None
        self._sock = sock
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="dicomweb",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise WebStartError("the DICOMweb server did not start (see the log above)")
            time.sleep(0.05)
        log.info("DICOMweb on %s://%s:%d/dicom-web", self.scheme, self.web.host, self.web.port)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running requests finish (up to uvicorn's graceful timeout)."""
        self.server.should_exit = True
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout)
            stopped = not self._thread.is_alive()
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if stopped:  # (a loop still running may still count: its counts stay unwritten)
            self._write_pending()

    def _write_pending(self) -> None:
        """Counted refusals and closed connections not yet in the audit get their rows now."""
        self.guard.write_pending()
        layer = getattr(self._app, "middleware_stack", None)  # Starlette builds it at the first request
        for _ in range(16):
            if layer is None:
                break
            if isinstance(layer, BearerAuth):
                layer.write_pending()
                break
            layer = getattr(layer, "app", None)
