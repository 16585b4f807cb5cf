"""The command line as an admin uses it: refusals with clear messages, status, the demo config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.net import free_port
from tests.support.node import cli, start_node, write_config
from tests.support.paths import REPO

pytestmark = pytest.mark.integration


def test_serve_refuses_a_missing_model_dir(tmp_path: Path) -> None:
    config = write_config(tmp_path, model_dir=tmp_path / "no-such-model")
    r = cli("serve", "--config", str(config))
    assert r.returncode == 2
    assert "no-such-model" in r.stderr and "model" in r.stderr.lower()
    assert "Traceback" not in r.stderr


def test_serve_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    fake = tmp_path / "weights"
    fake.mkdir()
    (fake / "README.txt").write_text("not a model")
    config = write_config(tmp_path, model_dir=fake)
    r = cli("serve", "--config", str(config))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "model" in r.stderr.lower()


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[node]\nport = "eleven"\n')
    r = cli("status", "--config", str(config))
    assert r.returncode == 2 and "[node] port" in r.stderr, r.stderr


def test_demo_config_creates_the_test_model_and_status_reports(tmp_path: Path) -> None:
    """The README's demo config, copied so its relative var/ lands in tmp_path."""
    (tmp_path / "config").mkdir()
    demo = tmp_path / "config" / "demo.toml"
    port = free_port()
    text = (REPO / "config" / "demo.toml").read_text().replace("port = 11112", f"port = {port}")
    demo.write_text(text)
    r = cli("status", "--config", str(demo))
    assert r.returncode == 1 and "not running" in r.stdout
    node = start_node(demo, port)
    try:
        assert (tmp_path / "var" / "test-model" / "config.json").exists()
        r = cli("status", "--config", str(demo), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        st = json.loads(r.stdout)
        assert st["running"] and st["port"] == port and st["port_open"]
        assert st["heartbeat_age_seconds"] is not None and st["heartbeat_age_seconds"] < 30
        assert st["gpu"] == {}  # CPU here: no GPU memory to report
        assert set(st["analysis"]) >= {"pending", "running", "done", "failed"}
    finally:
        assert node.stop() == 0
    r = cli("audit", "tail", "--config", str(demo))
    assert "node.started" in r.stdout and "TEST MODEL" in r.stdout and "node.stopped" in r.stdout
    shutil.rmtree(tmp_path / "var")


def test_audit_tail_follow_prints_new_events_as_they_happen(tmp_path: Path, test_model_dir: Path) -> None:
    """`audit tail --follow` keeps printing, like `tail -f`: start it, then make events happen."""
    import subprocess
    import sys
    import time

    from tests.support.node import _env

    port = free_port()
    config = write_config(tmp_path, model_dir=test_model_dir, port=port, peers=[("ECHOSCU", "127.0.0.1")])
    cli("status", "--config", str(config))  # creates the empty index
    follower = subprocess.Popen([sys.executable, "-m", "scp_node", "audit", "tail", "--config", str(config),
                                 "--follow", "--interval", "0.2"], stdout=subprocess.PIPE, text=True,
                                cwd=REPO, env=_env(), stdin=subprocess.DEVNULL)
    try:
        node = start_node(config, port)
        node.stop()
        time.sleep(2)  # a few poll intervals
    finally:
        follower.terminate()
        seen, _ = follower.communicate(timeout=10)
    # Both events were written after the follower had printed the (empty) history.
    assert "node.started" in seen and "node.stopped" in seen, seen


def test_a_second_serve_on_the_same_storage_refuses_and_leaves_the_first_alone(
        tmp_path: Path, test_model_dir: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, model_dir=test_model_dir, port=port)
    first = start_node(config, port)
    try:
        second = cli("serve", "--config", str(config), timeout=120)
        assert second.returncode == 2 and "already running" in second.stderr, second.stderr
        st = cli("status", "--config", str(config))
        assert st.returncode == 0 and "running" in st.stdout  # pid file of the first one still there
    finally:
        assert first.stop() == 0
