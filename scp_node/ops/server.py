"""The ops port: ``GET /metrics`` (Prometheus text format) and ``GET /healthz`` (JSON; 200 or 503).

A small threaded HTTP server on ``[ops] host:port`` (loopback by default), beside the node in
its own threads.  It serves counts, states and names of configured parts only -- no patient
data, nothing from the wire -- and has no other routes.  A client gets 10 s to send its request.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .health import check
from .metrics import registry_for

log = logging.getLogger(__name__)


class OpsStartError(RuntimeError):
    """The ops port cannot be opened."""


def _handler(node: Any, registry: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds for a client to send its request (no slow client holds a thread)
        server_version = "scp-node-ops"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                except Exception as exc:  # noqa: BLE001 - a scrape must not kill the thread
                    log.exception("collecting metrics failed")
                    body, status, ctype = f"metrics failed: {type(exc).__name__}\n".encode(), 500, "text/plain"
            elif path == "/healthz":
                parts = check(node)
                failing = {k: v for k, v in parts.items() if v}
                body = json.dumps({"status": "failing" if failing else "ok",
                                   "parts": {k: v or "ok" for k, v in parts.items()}}, indent=1).encode()
                status, ctype = (503 if failing else 200), "application/json"
            else:
                body, status, ctype = b"not found: /metrics and /healthz are served here\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug("ops %s %s", self.address_string(), format % args)

    return Handler


class OpsServer:
    """``start()`` binds (raising :class:`OpsStartError`), ``stop()`` closes."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ops = self.node.config.ops
        try:
            server = ThreadingHTTPServer((ops.host, ops.port), _handler(self.node, registry_for(self.node)))
        except OSError as exc:
            raise OpsStartError(f"[ops] cannot listen on {ops.host}:{ops.port}: {exc.strerror or exc}") from None
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="OpsServer", daemon=True)
        self._thread.start()
        log.info("metrics and health on http://%s:%d/metrics and /healthz", ops.host, server.server_address[1])

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
