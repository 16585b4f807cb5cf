"""[[webhooks]]: the SR's JSON sidecar by HTTPS POST with a bearer token from a file, through the
export queue (retried with backoff on a failure, delivered once the receiver answers 2xx)."""

from __future__ import annotations

import json
import ssl
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from scp_node.audit import AuditTrail, Event
from scp_node.config import ConfigError, ExportConfig, WebhookDestination, from_mapping
from scp_node.export.c_store import ExportError
from scp_node.export.webhook import send_webhook
from scp_node.scheduler.exports import ExportQueue
from scp_node.store.db import Database
from scp_node.store.models import AuditEvent, ExportJob, ExportState, utcnow
from tests.export.test_hl7 import _queued  # a real CXR analysed by a fake engine, SR + sidecar written
from tests.store.realdata import CXR_UNCR
from tests.support.rsyslog import Certs, make_certs


class Receiver:
    """An HTTPS endpoint on loopback (certificate from the test CA) that records each POST."""

    def __init__(self, certs: Certs) -> None:
        self.status: list[int] = []
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        me = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                me.requests.append((self.path, dict(self.headers), body))
                code = me.status.pop(0) if me.status else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs.server_cert, certs.server_key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


@pytest.fixture
def receiver(certs: Certs):  # type: ignore[no-untyped-def]
    r = Receiver(certs)
    yield r
    r.close()


def _dest(receiver: Receiver, certs: Certs, tmp_path: Path) -> WebhookDestination:
    token = tmp_path / "webhook.token"
    token.write_text("s3cret-token\n")
    return WebhookDestination(name="dash", url=f"https://127.0.0.1:{receiver.port}/hooks/scp", token_file=str(token),
                              tls_ca=str(certs.ca), timeout_seconds=10)


def test_queue_posts_the_sidecar_with_bearer_token_and_retries(index_db: Database, audit_trail: AuditTrail,
                                                               storage_dir: Path, ingestor, receiver: Receiver,  # type: ignore[no-untyped-def]
                                                               certs: Certs, tmp_path: Path) -> None:
    dest = _dest(receiver, certs, tmp_path)
    _queued(index_db, audit_trail, storage_dir, ingestor, dest)
    queue = ExportQueue(index_db, audit_trail, storage_dir, (dest,),
                        ExportConfig(max_attempts=3, backoff_initial_seconds=10.0), lambda d, p: send_webhook(d, p))
    receiver.status = [503]
    assert queue.run_once()
    with index_db.session() as s:
        job = s.scalars(select(ExportJob)).one()
        assert (job.state, job.attempts) == (ExportState.PENDING, 1) and "HTTP 503" in job.last_error
        s.execute(update(ExportJob).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    assert queue.run_once()
    with index_db.session() as s:
        job = s.scalars(select(ExportJob)).one()
        assert (job.state, job.attempts) == (ExportState.DONE, 2)
        report_path = storage_dir / job.report.path
        ok = s.scalars(select(AuditEvent).where(AuditEvent.event == Event.EXPORT_OK)).one()
    assert "delivered to dash" in ok.detail and ok.peer == f"127.0.0.1:{receiver.port}"
    assert len(receiver.requests) == 2
    path, headers, body = receiver.requests[-1]
    assert path == "/hooks/scp"
    assert headers["Authorization"] == "Bearer s3cret-token"
    assert headers["Content-Type"].startswith("application/json")
    assert receiver.requests[0][1]["Idempotency-Key"] == headers["Idempotency-Key"]
    sidecar = json.loads(body)
    assert body == report_path.with_suffix(".json").read_bytes()
    assert sidecar["schema"] == "scp_node.findings/2" and sidecar["impression"]
    src = pydicom.dcmread(CXR_UNCR, stop_before_pixels=True)
    assert str(src.PatientID).encode() not in body and str(src.PatientName).encode() not in body


def test_untrusted_certificate_and_http_errors_fail(receiver: Receiver, certs: Certs, tmp_path: Path) -> None:
    sr = tmp_path / "x.dcm"
    sr.write_bytes(b"")
    sr.with_suffix(".json").write_text("{}")
    untrusted = WebhookDestination(name="dash", url=f"https://127.0.0.1:{receiver.port}/h", timeout_seconds=5)
    with pytest.raises(ExportError, match="TLS to dash"):
        send_webhook(untrusted, sr)
    receiver.status = [401]
    with pytest.raises(ExportError, match="HTTP 401"):
        send_webhook(_dest(receiver, certs, tmp_path), sr)
    assert send_webhook(_dest(receiver, certs, tmp_path), sr) == 200


def test_webhook_config(tmp_path: Path) -> None:
    cfg = from_mapping({"webhooks": [{"name": "dash", "url": "https://dash.local/in", "token_file": "t.txt",
                                      "modalities": ["cr"]}]}, tmp_path, environ={})
    (w,) = cfg.webhooks
    assert (w.kind, w.host, w.port, w.token_file, w.modalities) == ("webhook", "dash.local", 443,
                                                                    str(tmp_path / "t.txt"), ("CR",))
    assert "t.txt" not in repr(w)
    for bad in ({"name": "x", "url": "http://dash.local/in"}, {"url": "https://d/in"},
                {"name": "x", "url": "https://d/in", "token": "inline"}):
        with pytest.raises(ConfigError, match=r"\[\[webhooks\]\]"):
            from_mapping({"webhooks": [bad]}, tmp_path, environ={})
