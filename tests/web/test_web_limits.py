"""DICOMweb connection limits and the rate of refusal audit rows.

- A connection that never completes its request head (slowloris, a half-open connection) is
  closed after ``header_timeout_seconds``; an idle kept-alive one after ``keep_alive_seconds``;
  a connection past ``max_connections`` gets 503 and is closed.  Closed connections are audited,
  one row per client address and interval, with counts.
- Unauthenticated requests are audited one row each only up to a burst per address and
  interval; after that one row per interval carries the count.

The in-process tests run the real uvicorn + Starlette app (see conftest); the last test runs
``scp-node serve`` as a subprocess, the way an attacker on the LAN meets it.
"""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from scp_node.audit import AuditTrail
from scp_node.config import WebConfig
from scp_node.store.db import Database
from scp_node.store.ingest import Ingestor
from scp_node.web import WebServer, create_app, token_sha256
from scp_node.web import auth as web_auth
from scp_node.web.auth import AuditRateLimit
from tests.support.net import free_port, wait_for
from tests.support.node import start_node, write_config
from tests.web.conftest import TOKEN, WebNode

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _serve(tmp_path: Path, *, header_timeout: float = 30.0, keep_alive: float = 5.0, max_connections: int = 64,
           row_interval: float = 60.0) -> WebNode:
    db_path = tmp_path / "index.db"
    db = Database(f"sqlite:///{db_path}")
    audit = AuditTrail(db, b"k" * 32)
    ingestor = Ingestor(db, tmp_path / "storage", audit, "keep_first")
    web = WebConfig(host="127.0.0.1", port=free_port(), token_sha256=(token_sha256(TOKEN),),
                    header_timeout_seconds=header_timeout, keep_alive_seconds=keep_alive,
                    max_connections=max_connections)
    server = WebServer(create_app(web, db, audit, ingestor, tmp_path / "spool"), web)
    for limit in server.guard.limits.values():
        limit.interval = row_interval
    server.start()
    return WebNode(f"http://127.0.0.1:{web.port}", db_path, tmp_path / "storage", server)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[WebNode]:
    node = _serve(tmp_path, header_timeout=1.0, keep_alive=1.0, max_connections=4, row_interval=1.5)
    yield node
    node.server.stop()


def _connect(node: WebNode) -> socket.socket:
    port = int(node.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    return s


def _closed_after(s: socket.socket, start: float) -> float:
    """Seconds from ``start`` until the server closed ``s`` (reads and drops what it sent)."""
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return time.monotonic() - start


def test_half_open_connections_closed_and_audited_at_a_bounded_rate(limited: WebNode) -> None:
    start = time.monotonic()
    silent = _connect(limited)  # connects, sends nothing
    partial = _connect(limited)  # a request head that never ends
    partial.sendall(b"GET /dicom-web/studies HTTP/1.1\r\nHost: node\r\n")
    trickle = _connect(limited)  # slowloris: a header line now and then, never the blank line
    trickle.sendall(b"GET /dicom-web/studies HTTP/1.1\r\n")
    time.sleep(0.5)
    trickle.sendall(b"X-a: b\r\n")
    waits = [_closed_after(s, start) for s in (silent, partial, trickle)]
    assert all(0.9 <= w < 4.0 for w in waits), waits  # header_timeout_seconds = 1, from the connection's start
    rows = wait_for(lambda: len(limited.audit("web.connection_closed")) >= 2 and limited.audit("web.connection_closed"),
                    10, what="the counted row")
    assert len(rows) == 2, rows  # the first one, then one row with the count of the others
    assert all(r[1] == "failure" and r[2] == "127.0.0.1" for r in rows)
    assert rows[0][3].startswith("1 connection closed") and "request header within 1 s" in rows[0][3]
    assert rows[1][3].startswith("2 connections closed") and "since the last row" in rows[1][3]
    for s in (silent, partial, trickle):
        s.close()
    assert requests.get(limited.root + "/studies", headers=AUTH, timeout=10).status_code == 200


def _response(s: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body): a bare recv() may return only part
    of it, and the rest would then be read as the next request's answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, data
        body += chunk
    return head


def test_complete_heads_are_served_and_idle_keep_alive_is_closed(limited: WebNode) -> None:
    s = _connect(limited)
    head = f"GET /dicom-web/studies HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    s.sendall(head[:20])  # slow, but complete within the header timeout
    time.sleep(0.5)
    s.sendall(head[20:])
    assert _response(s).startswith(b"HTTP/1.1 200")
    time.sleep(0.7)  # a second request on the kept-alive connection
    s.sendall(head)
    assert _response(s).startswith(b"HTTP/1.1 200")
    start = time.monotonic()
    assert 0.8 <= _closed_after(s, start) < 3.0  # keep_alive_seconds = 1
    s.close()
    assert not limited.audit("web.connection_closed")  # closing an idle keep-alive one is routine


def test_connections_past_max_connections_get_503(limited: WebNode) -> None:
    held = [_connect(limited) for _ in range(4)]  # max_connections = 4
    time.sleep(0.2)
    extra = _connect(limited)
    assert extra.recv(65536).startswith(b"HTTP/1.1 503")
    assert _closed_after(extra, time.monotonic()) < 2.0
    rows = wait_for(lambda: limited.audit("web.connection_closed"), 10, what="the audit row")
    assert "max_connections (4 open)" in rows[0][3]
    for s in held:
        s.close()
    wait_for(lambda: requests.get(limited.root + "/studies", headers=AUTH, timeout=10).status_code == 200, 10,
             what="the node serving again")


def test_unauthenticated_requests_audited_at_a_bounded_rate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_auth, "REFUSED_ROW_INTERVAL_SECONDS", 1.5)
    node = _serve(tmp_path)
    try:
        session = requests.Session()
        started = time.monotonic()
        statuses = [session.get(node.root + "/studies", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code
                    for _ in range(40)]
        took = time.monotonic() - started
        assert statuses == [401] * 40

        def counted() -> list[tuple[str, str, str, str]]:
            return [r for r in node.audit("web.unauthorized") if "since the last row" in r[3]]

        def total(rows: list[tuple[str, str, str, str]]) -> int:
            return sum(int(r[3].split()[0]) for r in rows)

        rows = wait_for(lambda: total(counted()) == 30 and counted(), 15, what="the counted rows")
        own = [r for r in node.audit("web.unauthorized") if r not in rows]
        assert len(own) == web_auth.REFUSED_ROWS_PER_INTERVAL  # a burst of rows of their own ...
        assert all("invalid bearer token" in r[3] and "wrong" not in r[3] for r in own)
        assert len(rows) <= took / 1.5 + 1  # ... then one row per interval with the count
        assert all(r[2] == "127.0.0.1" and "last: GET /dicom-web/studies: invalid bearer token" in r[3] for r in rows)
        assert session.get(node.root + "/studies", headers=AUTH, timeout=10).status_code == 200
    finally:
        node.server.stop()


def test_counted_refusals_and_closed_connections_are_written_at_stop(tmp_path: Path) -> None:
    node = _serve(tmp_path, header_timeout=0.5, row_interval=60.0)
    stopped = False
    try:
        with requests.Session() as session:
            for _ in range(15):
                assert session.get(node.root + "/studies", timeout=10).status_code == 401
        socks = [_connect(node) for _ in range(3)]
        for s in socks:
            _closed_after(s, time.monotonic())
            s.close()
        time.sleep(0.3)
        assert len(node.audit("web.unauthorized")) == 10 and len(node.audit("web.connection_closed")) == 1
        node.server.stop()
        stopped = True
    finally:
        if not stopped:
            node.server.stop()
    refused = node.audit("web.unauthorized")
    closed = node.audit("web.connection_closed")
    assert len(refused) == 11 and refused[-1][3].startswith("5 requests refused since the last row")
    assert len(closed) == 2 and closed[-1][3].startswith("2 connections closed") and "since the last row" in closed[-1][3]


def test_rate_limit_bursts_counts_and_quiet_intervals() -> None:
    now = [0.0]
    limit = AuditRateLimit(interval=60.0, burst=2, max_keys=2, clock=lambda: now[0])
    assert [limit.note("a") for _ in range(5)] == [True, True, False, False, False]
    assert limit.note("b") and limit.due() == []
    now[0] = 30.0
    assert not limit.note("a", "last") and limit.next_due_in() == 30.0
    now[0] = 60.0
    assert limit.due() == [("a", 4, "last")]
    now[0] = 61.0
    assert not limit.note("a")  # right after a counted row: still counted, not a new burst
    now[0] = 121.0
    assert limit.due() == [("a", 1, "")]
    now[0] = 200.0  # a quiet interval: a new burst
    assert limit.note("a") and limit.due() == []
    now[0] = 200.5
    assert limit.note("c")  # past max_keys: "b" (quiet for an interval) is forgotten to make room
    assert limit.note("d") and limit.note("e") and not limit.note("f")  # still full: d, e, f share one key
    assert limit._tallies.keys() == {"a", "c", "(other addresses)"}


@pytest.mark.integration
def test_node_closes_half_open_connections_and_limits_refusal_rows(tmp_path: Path, test_model_dir: Path) -> None:
    """``scp-node serve`` with [web]: a half-open connection is closed and audited, a refusal flood
    leaves a bounded number of audit rows and log lines."""
    folder = tmp_path / "node"
    folder.mkdir()
    web_port = free_port()
    extra = (f'\n[web]\nhost = "127.0.0.1"\nport = {web_port}\ntoken_sha256 = ["{token_sha256(TOKEN)}"]\n'
             "header_timeout_seconds = 1\nkeep_alive_seconds = 1\nmax_connections = 8\n")
    config = write_config(folder, model_dir=test_model_dir, stable_seconds=3600, extra=extra)
    node = start_node(config, web_port)
    try:
        start = time.monotonic()
        half_open = socket.create_connection(("127.0.0.1", web_port))
        half_open.settimeout(15)
        half_open.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: node\r\nContent-Ty")
        assert _closed_after(half_open, start) < 5.0
        half_open.close()
        root = f"http://127.0.0.1:{web_port}/dicom-web"
        with requests.Session() as s:
            assert all(s.get(f"{root}/studies", timeout=10).status_code == 401 for _ in range(60))
            assert s.get(f"{root}/studies", headers=AUTH, timeout=10).status_code == 200
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    with sqlite3.connect(folder / "index.db") as con:
        rows = con.execute("select event, detail from audit_events where event like 'web.%'").fetchall()
    closed = [d for e, d in rows if e == "web.connection_closed"]
    refused = [d for e, d in rows if e == "web.unauthorized"]
    assert len(closed) == 1 and "request header within 1 s" in closed[0]
    # A row each for the first 10; the other 50 are counted, and their row is written at the stop.
    assert len(refused) == web_auth.REFUSED_ROWS_PER_INTERVAL + 1
    assert refused[-1].startswith("50 requests refused since the last row")
    log = node.output()
    assert log.count("DICOMweb request refused") == web_auth.REFUSED_ROWS_PER_INTERVAL
