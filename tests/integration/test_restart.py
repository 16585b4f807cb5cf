"""A stop between receiving and analysing: after ``serve`` again the series is analysed once and
its SR exported once (the completion timer and the queues live in the database)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.net import wait_for
from tests.support.node import start_node, write_config
from tests.support.orthanc import Orthanc
from tests.support.paths import CXR, need_data, tool

pytestmark = pytest.mark.integration


def _count(db: Path, event: str) -> int:
    with sqlite3.connect(db) as con:
        return int(con.execute("select count(*) from audit_events where event = ?", (event,)).fetchone()[0])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_stop_after_receive_then_serve_again_analyses_once(tmp_path: Path, orthanc: Orthanc, node_port: int,
                                                           test_model_dir: Path, sig: int) -> None:
    folder = tmp_path / "node"
    folder.mkdir()
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=4,
                          peers=[("STORESCU", "127.0.0.1")],
                          destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                         "port": orthanc.dicom_port}])
    db = folder / "index.db"
    node = start_node(config, node_port)
    r = subprocess.run([tool("storescu"), "-aet", "STORESCU", "-aec", "SCPNODE", "127.0.0.1", str(node_port),
                        str(need_data(CXR / "RG1_UNCR.dcm"))], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    node.stop(sig)
    assert _count(db, "instance.stored") == 1
    assert _count(db, "analysis.started") == 0, "stopped before the series was complete"

    node = start_node(config, node_port, log_name="node2.log")
    try:
        study = wait_for(lambda: orthanc.get("/studies"), 120, what="the SR's study in Orthanc")[0]
        wait_for(lambda: orthanc.sr_series(study), 120, what="an SR in Orthanc")
        time.sleep(4)  # a second analysis or export would show up within this window
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    sr = orthanc.sr_series(study)
    assert len(sr) == 1 and len(sr[0]["Instances"]) == 1
    assert _count(db, "analysis.finished") == 1
    assert _count(db, "export.ok") == 1
