"""``[ops]``: /metrics scraped with prometheus_client's text parser shows what happened, counted in
every receiver process; /healthz is 200 while every part lives and 503, naming the part, when the
engine (a model server) stops."""

from __future__ import annotations

import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.faults.helpers import acknowledged, copy_series, set_keys, storescu
from tests.support.net import free_port, wait_for
from tests.support.node import start_node, write_config
from tests.support.ops import healthz, scrape
from tests.support.paths import CT_DIR, data_files

pytestmark = pytest.mark.integration


def _instances_by_pid(metrics_dir: Path) -> dict[int, float]:
    """Stored instances per process, read from the multiprocess files the node's processes wrote."""
    out: dict[int, float] = {}
    for f in metrics_dir.glob("counter_*.db"):
        pid = int(f.stem.split("_")[1])
        for key, value, *_rest in MmapedDict.read_all_values_from_file(str(f)):
            name, sample, labels, _help = json.loads(key)
            if sample == "scp_node_instances_received_total" and labels.get("outcome") == "stored":
                out[pid] = out.get(pid, 0.0) + value
    return out


def test_metrics_count_every_receiver_process(tmp_path: Path, node_port: int, test_model_dir: Path) -> None:
    files = data_files(CT_DIR, at_least=10)[:10]
    series = [copy_series(files, tmp_path / f"copy{i}") for i in range(4)]
    folder = tmp_path / "node"
    folder.mkdir()
    ops_port = free_port()
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=3600,
                          peers=[("STORESCU", "127.0.0.1")], extra=f"[ops]\nport = {ops_port}\n")
    set_keys(config, "node", receiver_processes=3)
    node = start_node(config, node_port)
    try:
        status, health = wait_for(lambda: (h := healthz(ops_port))[0] == 200 and h, 30, what="healthz 200")
        assert health == {"status": "ok", "parts": {"dimse": "ok", "index": "ok", "engine": "ok", "scheduler": "ok"}}
        before = scrape(ops_port)
        assert before.value("scp_node_instances_received_total") == 0
        senders = [storescu(node_port, s) for s in series]
        acked = [f for p in senders for f in acknowledged(p.communicate(timeout=300)[0])]
        assert len(acked) == 40
        m = scrape(ops_port)
        node_pid = json.loads((folder / "scp-node.pid").read_text())["pid"]
        by_pid = _instances_by_pid(folder / "metrics")
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    with sqlite3.connect(folder / "index.db") as con:
        stored_bytes = con.execute("select sum(size) from instances").fetchone()[0]
    assert m.types["scp_node_instances_received"] == "counter"
    assert m.value("scp_node_instances_received_total", via="dimse", outcome="stored") == 40
    assert m.value("scp_node_received_bytes_total", via="dimse") == stored_bytes
    assert m.value("scp_node_store_seconds_count", via="dimse") == 40
    assert m.value("scp_node_store_seconds_bucket", via="dimse", le="+Inf") == 40
    assert 0 < m.value("scp_node_store_seconds_sum", via="dimse") < 40 * 10
    assert m.value("scp_node_associations_total", result="accepted") == 4
    assert m.value("scp_node_associations_total", result="rejected") == 0
    assert m.value("scp_node_audit_events_total", event="instance.stored", outcome="success") == 40
    assert m.value("scp_node_series_receiving") == 4
    assert m.value("scp_node_receiver_processes") == 3
    assert m.value("scp_node_disk_free_bytes") > 0
    assert all(m.value("scp_node_health", part=p) == 1 for p in ("dimse", "index", "engine", "scheduler"))
    # The counts come from every process: the child receivers' files hold part of them.
    assert sum(by_pid.values()) == 40
    children = {pid: n for pid, n in by_pid.items() if pid != node_pid}
    assert sum(children.values()) > 0, by_pid


class _FakeModelServer:
    """The engine for this test: an OpenAI-compatible server's ``GET /v1/models`` (all the node asks
    before analysing); stop() takes it away as a crashed vLLM would, start() brings it back."""

    def __init__(self, port: int, model: str) -> None:
        self.port, self.model = port, model
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        model = self.model

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()
                self.send_response(200 if self.path == "/v1/models" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def test_healthz_names_the_engine_when_it_stops(tmp_path: Path, node_port: int, test_model_dir: Path) -> None:
    folder = tmp_path / "node"
    folder.mkdir()
    ops_port, llm_port = free_port(), free_port()
    engine = _FakeModelServer(llm_port, "medgemma-test")
    engine.start()
    config = write_config(folder, model_dir=test_model_dir, port=node_port, extra=f"[ops]\nport = {ops_port}\n")
    set_keys(config, "engine", backend="openai", base_url=f"http://127.0.0.1:{llm_port}/v1", model="medgemma-test",
             weights_sha256="ab" * 32)
    set_keys(config, "node", receiver_processes=1)
    node = start_node(config, node_port)
    try:
        wait_for(lambda: healthz(ops_port)[0] == 200, 30, what="healthz 200")
        engine.stop()
        status, body = wait_for(lambda: (h := healthz(ops_port))[0] == 503 and h, 30, what="healthz 503")
        assert body["status"] == "failing"
        assert body["parts"]["engine"].startswith(f"model server http://127.0.0.1:{llm_port}/v1 is not answering")
        assert [p for p, v in body["parts"].items() if v != "ok"] == ["engine"]
        m = scrape(ops_port)
        assert m.value("scp_node_health", part="engine") == 0 and m.value("scp_node_health", part="dimse") == 1
        engine.start()  # back: healthy again
        wait_for(lambda: healthz(ops_port)[0] == 200, 30, what="healthz 200 again")
    finally:
        engine.stop()
        assert node.stop() == 0, node.output()[-3000:]


def test_ops_port_in_use_stops_the_start(tmp_path: Path, node_port: int, test_model_dir: Path) -> None:
    import socket
    import subprocess
    import sys

    from tests.support.paths import REPO

    folder = tmp_path / "node"
    folder.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = write_config(folder, model_dir=test_model_dir, port=node_port, extra=f"[ops]\nport = {port}\n")
        r = subprocess.run([sys.executable, "-m", "scp_node", "serve", "--config", str(config)], capture_output=True,
                           text=True, timeout=120, cwd=REPO, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"[ops] cannot listen on 127.0.0.1:{port}" in r.stderr
