"""Receiver processes (scp_node.dimse.receivers): several processes accept on the node's one port, every
instance is indexed once, and no receiver outlives the node — not after SIGTERM, not after kill -9."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.net import wait_for
from tests.support.node import cli, start_node, write_config
from tests.support.paths import CT_DIR, data_files, need_data

from .helpers import acknowledged, copy_series, events, indexed_sops, instance_counts, set_keys, sop_of, storescu

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("receive_path")]  # fast path and pynetdicom's own


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` and that are receivers (spawned by multiprocessing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and "spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(tmp_path: Path, port: int, model: Path, receivers: int) -> tuple[Path, object]:
    folder = tmp_path / "node"
    folder.mkdir(exist_ok=True)
    config = write_config(folder, model_dir=model, port=port, stable_seconds=3600,
                          peers=[("STORESCU", "127.0.0.1")])
    set_keys(config, "node", receiver_processes=receivers)
    return folder, start_node(config, port)


def test_three_receivers_share_the_port_and_index_every_instance_once(tmp_path: Path, node_port: int,
                                                                       test_model_dir: Path, counts: dict) -> None:
    ct = data_files(CT_DIR, at_least=40)[:40]
    series = [copy_series(ct, tmp_path / f"copy{i}") for i in range(4)]
    folder, node = _start(tmp_path, node_port, test_model_dir, receivers=3)
    try:
        children = _children(node.proc.pid)
        assert len(children) == 2, children
        # The heartbeat is written every 5 s; the first one at start already counts the receivers.
        status = json.loads(cli("status", "--config", str(node.config), "--json").stdout)
        assert status["receiver_processes"] == 3, status
        senders = [storescu(node_port, files) for files in series]
        outputs = [s.communicate(timeout=300)[0] for s in senders]
        acked = [f for out in outputs for f in acknowledged(out)]
        indexed = indexed_sops(folder)
        rows, files = instance_counts(folder)
        # Which process received what is not visible to a sender; CPU time shows every child worked.
        child_cpu = [sum(int(v) for v in Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
                     for c in children]
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    sent = sum(len(s) for s in series)
    counts.update(receivers=3, sent=sent, sent_with_success=len(acked), indexed=rows, files=files,
                  child_cpu_ticks=child_cpu)
    assert len(acked) == sent and rows == files == sent
    assert all(sop_of(f) in indexed for f in acked)
    assert all(t > 0 for t in child_cpu), child_cpu
    assert all(not _alive(c) for c in children)


def test_kill_9_of_the_node_takes_its_receivers_and_a_restart_gets_the_port(tmp_path: Path, node_port: int,
                                                                             test_model_dir: Path,
                                                                             counts: dict) -> None:
    folder, node = _start(tmp_path, node_port, test_model_dir, receivers=2)
    children = _children(node.proc.pid)
    assert len(children) == 1, children
    node.kill9()
    wait_for(lambda: not any(_alive(c) for c in children), 10, interval=0.1, what="receivers gone with the node")
    # Nothing holds the port any more: the node starts again on it and serves.
    again = start_node(node.config, node_port, log_name="node2.log")
    try:
        files = copy_series(data_files(CT_DIR, at_least=5)[:5], tmp_path / "ct")
        out = storescu(node_port, files).communicate(timeout=120)[0]
        assert len(acknowledged(out)) == 5, out
    finally:
        assert again.stop() == 0, again.output()[-3000:]
    counts.update(receivers_before_kill=len(children), receivers_left_after_kill=0, restarted_on_same_port=True)


def test_sigterm_stops_every_receiver_and_exits_0(tmp_path: Path, node_port: int, test_model_dir: Path) -> None:
    _folder, node = _start(tmp_path, node_port, test_model_dir, receivers=2)
    children = _children(node.proc.pid)
    assert len(children) == 1
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=90) == 0, node.output()[-3000:]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(c) for c in children):
        time.sleep(0.1)
    assert not any(_alive(c) for c in children)


def test_a_receiver_that_dies_is_replaced_audited_and_the_node_keeps_serving(tmp_path: Path, node_port: int,
                                                                             test_model_dir: Path,
                                                                             counts: dict) -> None:
    folder, node = _start(tmp_path, node_port, test_model_dir, receivers=2)
    try:
        [victim] = _children(node.proc.pid)
        os.kill(victim, signal.SIGKILL)  # as the OOM killer would
        wait_for(lambda: len([c for c in _children(node.proc.pid) if c != victim]) == 1, 30, interval=0.2,
                 what="a new receiver")
        [replacement] = [c for c in _children(node.proc.pid) if c != victim]
        rows = events(folder, "node.receiver_restarted")
        assert len(rows) == 1 and "killed by signal 9" in rows[0][2], rows
        files = copy_series(data_files(CT_DIR, at_least=20)[:20], tmp_path / "ct")
        senders = [storescu(node_port, files[i::2]) for i in range(2)]
        acked = [f for s in senders for f in acknowledged(s.communicate(timeout=120)[0])]
        assert len(acked) == 20 and instance_counts(folder) == (20, 20)
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    assert not _alive(replacement)
    counts.update(receivers=2, killed=1, replaced=1, audit_rows=len(rows), stored_after=len(acked))
