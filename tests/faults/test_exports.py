"""Destination PACS down: backoff with a ceiling, kept across restarts, dead after the last attempt,
shown by ``scp-node status`` and the audit, and delivered once after ``scp-node exports retry``."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.support.net import wait_for
from tests.support.node import cli, start_node, write_config
from tests.support.orthanc import Orthanc
from tests.support.paths import CXR, need_data

from .helpers import Proxy, count_event, events, orthanc_sr_instances, query, set_keys, storescu

pytestmark = pytest.mark.integration

ATTEMPTS = 4
CEILING = 1.5


def test_pacs_down_backoff_restart_dead_letter_and_retry(tmp_path: Path, orthanc: Orthanc, node_port: int,
                                                         test_model_dir: Path, counts: dict) -> None:
    proxy = Proxy(orthanc.dicom_port, mode="refuse")  # accepts TCP and hangs up: the PACS is down
    folder = tmp_path / "node"
    folder.mkdir()
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=1,
                          peers=[("STORESCU", "127.0.0.1")],
                          destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                         "port": proxy.port}])
    config.write_text(config.read_text().replace("backoff_initial_seconds = 1.0", "backoff_initial_seconds = 0.5")
                      .replace("backoff_max_seconds = 2.0", f"backoff_max_seconds = {CEILING}"))
    set_keys(config, "export", max_attempts=ATTEMPTS)
    node = start_node(config, node_port)
    try:
        assert storescu(node_port, [need_data(CXR / "RG1_UNCR.dcm")]).wait(timeout=120) == 0
        wait_for(lambda: count_event(folder, "export.failed") >= 1, 180, interval=0.2, what="a failed export")
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    # Survives a restart: the job is still pending with its attempts counted.
    (state, attempts), = query(folder, "select state, attempts from export_jobs")
    assert state == "PENDING" and attempts >= 1
    node = start_node(config, node_port, log_name="node2.log")
    try:
        wait_for(lambda: count_event(folder, "export.dead"), 120, interval=0.2, what="the export dead-lettered")
        status = cli("status", "--config", str(config), "--json")
        st = json.loads(status.stdout)
        text = cli("status", "--config", str(config)).stdout
        assert st["exports"]["dead"] == 1 and st["dead_exports"][0]["attempts"] == ATTEMPTS, status.stdout
        assert "dead export" in text and "exports retry" in text, text
        assert orthanc_sr_instances(orthanc) == 0
        delays = [float(m.group(1)) for _, _, d in events(folder, "export.failed")
                  if (m := re.search(r"next try in ([0-9.]+) s", d))]
        assert delays and max(delays) <= CEILING + 0.5, delays
        # The PACS returns; the admin requeues the dead export.
        proxy.mode = "forward"
        r = cli("exports", "retry", "--config", str(config))
        assert r.returncode == 0 and "1 dead export" in r.stdout, r.stdout + r.stderr
        wait_for(lambda: count_event(folder, "export.ok"), 120, interval=0.2, what="the export delivered")
        time.sleep(3)
    finally:
        assert node.stop() == 0, node.output()[-3000:]
        proxy.close()
    srs = orthanc_sr_instances(orthanc)
    counts.update(backoff_initial_s=0.5, backoff_ceiling_s=CEILING, attempts_before_dead=ATTEMPTS,
                  export_failed_rows=count_event(folder, "export.failed"),
                  export_dead_rows=count_event(folder, "export.dead"), backoff_delays_s=delays,
                  exports_expected=1, sr_in_orthanc_after_retry=srs, connections_seen_by_pacs=proxy.connections)
    assert srs == 1 and count_event(folder, "export.ok") == 1
    assert query(folder, "select state from export_jobs") == [("DONE",)]
