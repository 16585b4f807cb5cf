"""uvicorn in a background thread of the node process, started and stopped by :class:`Node`.

The listening socket is bound here, synchronously, so "port in use" or a bad TLS file is a
startup error the admin sees at once instead of a thread dying quietly.  uvicorn's access log is
off: its lines carry query strings, and a QIDO query string may carry a PatientID.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from ..config import WebConfig

log = logging.getLogger(__name__)


class WebStartError(RuntimeError):
    """The DICOMweb service cannot start; the message says what to fix."""


class WebServer:
    """One uvicorn server on ``[web] host:port`` (HTTPS when tls_cert/tls_key are set)."""

    def __init__(self, app: ASGIApp, web: WebConfig) -> None:
        self.web = web
        ssl = dict(ssl_certfile=web.tls_cert, ssl_keyfile=web.tls_key) if web.tls_cert else {}
        self.config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                     timeout_graceful_shutdown=10, server_header=False, **ssl)
        self.server = uvicorn.Server(self.config)
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
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
