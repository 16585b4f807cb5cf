"""Limits and stopping: past ``max_associations`` a caller gets A-ASSOCIATE-RJ (transient, local
limit exceeded) and the node keeps serving; SIGTERM with a store in flight exits 0 and loses nothing."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.net import wait_for
from tests.support.node import start_node, write_config
from tests.support.paths import CT_DIR, data_files, need_data, tool

from .helpers import acknowledged, copy_series, count_event, events, indexed_sops, instance_counts, set_keys, \
    sop_of, stored_files, storescu

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("receive_path")]  # fast path and pynetdicom's own


def _echo(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("echoscu"), "-v", "-aet", "ECHOSCU", "-aec", "SCPNODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def test_past_max_associations_rejected_transient_and_still_serving(tmp_path: Path, node_port: int,
                                                                    test_model_dir: Path, counts: dict) -> None:
    folder = tmp_path / "node"
    folder.mkdir()
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=3600,
                          peers=[("ECHOSCU", "127.0.0.1"), ("PYSCU", "127.0.0.1")])
    set_keys(config, "node", max_associations=2)
    node = start_node(config, node_port)
    held = []
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        for _ in range(2):
            assoc = ae.associate("127.0.0.1", node_port, ae_title="SCPNODE")
            assert assoc.is_established
            held.append(assoc)
        refused = [_echo(node_port) for _ in range(3)]
        for r in refused:
            out = (r.stdout + r.stderr).lower()
            assert r.returncode != 0 and "reject" in out and "transient" in out and "local limit exceeded" in out, out
        rows = [d for _, _, d in events(folder, "association.rejected") if "maximum concurrent" in d]
        for assoc in held:
            assoc.release()
        wait_for(lambda: _echo(node_port).returncode == 0, 30, what="the node serving again")
        assert node.proc.poll() is None
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    counts.update(max_associations=2, held=2, over_limit_tried=len(refused), rejected_transient=len(refused),
                  audit_rows=len(rows))
    assert len(rows) == len(refused)


def test_sigterm_with_a_store_in_flight_exits_0_and_loses_nothing(tmp_path: Path, node_port: int,
                                                                  test_model_dir: Path, counts: dict) -> None:
    files = copy_series(data_files(CT_DIR, at_least=60)[:60], tmp_path / "ct")
    folder = tmp_path / "node"
    folder.mkdir()
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=3600,
                          peers=[("STORESCU", "127.0.0.1")])
    node = start_node(config, node_port)
    sender = storescu(node_port, files)
    wait_for(lambda: instance_counts(folder)[0] >= 5, 120, interval=0.05, what="first instances indexed")
    node.proc.send_signal(signal.SIGTERM)
    rc = node.proc.wait(timeout=90)
    out = sender.communicate(timeout=120)[0]
    acked = acknowledged(out)
    indexed = indexed_sops(folder)
    missing = [f for f in acked if sop_of(f) not in indexed]
    rows, nfiles = instance_counts(folder)
    leftovers = [p for p in stored_files(folder) if p.name.endswith(".tmp")]
    counts.update(exit_code=rc, sent_with_success=len(acked), indexed=rows, files=nfiles,
                  acknowledged_but_missing=len(missing), temp_files_left=len(leftovers), sent_total=len(files))
    assert rc == 0, node.output()[-3000:]
    assert not missing and not leftovers and rows == nfiles
    assert count_event(folder, "node.stopped") == 1
    # Stopped accepting: the port is closed.
    assert _echo(node_port).returncode != 0
