"""Fixtures for the DICOMweb tests: the web app in-process over a real index, and tokens.

The in-process server is the real uvicorn + Starlette app over a real SQLite index, ingestor
and audit trail (no model, no scheduler), so protocol details are tested in seconds; the
end-to-end tests in ``test_web_node.py`` run the whole node as a subprocess.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from scp_node.audit import AuditTrail
from scp_node.config import WebConfig
from scp_node.store.db import Database
from scp_node.store.ingest import Ingestor
from scp_node.web import WebServer, create_app, token_sha256
from tests.support.net import free_port

TOKEN = "test-token-5f0c9d"  # a test value, not a secret


@dataclass
class WebNode:
    """The DICOMweb app served in-process, with what a test needs to look behind it."""

    url: str
    db_path: Path
    storage_dir: Path
    server: WebServer

    @property
    def root(self) -> str:
        return self.url + "/dicom-web"

    def audit(self, event: str | None = None) -> list[tuple[str, str, str, str]]:
        with sqlite3.connect(self.db_path) as con:
            rows = con.execute("select event, outcome, peer, detail from audit_events order by id").fetchall()
        return [r for r in rows if event is None or r[0] == event]


def serve_in_process(tmp_path: Path, *, max_body_bytes: int = 2 * 1024**3,
                     tls: tuple[str, str] | None = None, cors_origins: tuple[str, ...] = (),
                     connection_guard: bool = True) -> WebNode:
    db_path = tmp_path / "index.db"
    db = Database(f"sqlite:///{db_path}")
    audit = AuditTrail(db, b"k" * 32)
    storage = tmp_path / "storage"
    ingestor = Ingestor(db, storage, audit, "keep_first")
    web = WebConfig(host="127.0.0.1", port=free_port(), token_sha256=(token_sha256(TOKEN),),
                    max_body_bytes=max_body_bytes, tls_cert=tls[0] if tls else "", tls_key=tls[1] if tls else "",
                    cors_origins=cors_origins, connection_guard=connection_guard)
    server = WebServer(create_app(web, db, audit, ingestor, tmp_path / "spool"), web)
    server.start()
    scheme = "https" if tls else "http"
    return WebNode(f"{scheme}://127.0.0.1:{web.port}", db_path, storage, server)


@pytest.fixture(params=[True, False], ids=["guarded", "uvicorn-protocol"])
def web_node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[WebNode]:
    """The protocol tests run on both HTTP protocols: the guarded one (scp_node.web.uvicorn_internals)
    and uvicorn's own (``[web] connection_guard = false``), so the guard never changes behaviour."""
    node = serve_in_process(tmp_path, connection_guard=request.param)
    yield node
    node.server.stop()
