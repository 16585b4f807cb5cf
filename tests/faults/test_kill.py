"""``kill -9`` of the node during ingest, analysis and export, then ``serve`` again.

Counted: instances the sender got Success for vs. instances indexed after the kill; interrupted
analysis jobs vs. reruns; exports expected vs. SR instances that reached Orthanc.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.net import wait_for
from tests.support.node import start_node, write_config
from tests.support.orthanc import Orthanc
from tests.support.paths import CT_DIR, CXR, need_data

from .helpers import (Proxy, acknowledged, copy_series, count_event, indexed_sops, instance_counts,
                      orthanc_sr_instances, query, sop_of, stored_files, storescu)

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, model: Path, port: int, stable: float, dest_port: int | None = None,
            aet: str = "ORTHANC") -> Path:
    folder = tmp_path / "node"
    folder.mkdir(exist_ok=True)
    dests = [{"name": "pacs", "ae_title": aet, "host": "127.0.0.1", "port": dest_port}] if dest_port else []
    config = write_config(folder, model_dir=model, port=port, stable_seconds=stable,
                          peers=[("STORESCU", "127.0.0.1"), ("ORTHANC", "127.0.0.1")], destinations=dests)
    return config


@pytest.mark.usefixtures("receive_path")  # fast path and pynetdicom's own
def test_kill9_during_ingest_keeps_every_acknowledged_instance(tmp_path: Path, node_port: int,
                                                               test_model_dir: Path, counts: dict) -> None:
    ct = sorted(need_data(CT_DIR).glob("*.dcm"))
    copies = [copy_series(ct[i * 30:(i + 1) * 30], tmp_path / f"copy{i}") for i in range(3)]
    config = _config(tmp_path, test_model_dir, node_port, stable=3600)
    folder = config.parent
    node = start_node(config, node_port)
    senders = [storescu(node_port, files) for files in copies]
    wait_for(lambda: instance_counts(folder)[0] >= 15, 120, interval=0.05, what="first instances indexed")
    node.kill9()
    outputs = [p.communicate(timeout=120)[0] for p in senders]
    acked = [f for out in outputs for f in acknowledged(out)]
    total = sum(len(c) for c in copies)
    assert 0 < len(acked) < total, "the kill must land while instances are in flight"

    node = start_node(config, node_port, log_name="node2.log")
    try:
        indexed = indexed_sops(folder)
        missing = [f for f in acked if sop_of(f) not in indexed]
        rows, files = instance_counts(folder)
        leftovers = [p for p in stored_files(folder) if p.name.endswith((".tmp", ".new"))]
        # The senders resend everything (as a modality does after failures): all of it arrives once.
        resend = [storescu(node_port, files_) for files_ in copies]
        assert all(p.wait(timeout=300) == 0 for p in resend)
        after = instance_counts(folder)
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    counts.update(sent_with_success_before_kill=len(acked), indexed_after_restart=rows,
                  acknowledged_but_missing=len(missing), files_on_disk=files, temp_files_left=len(leftovers),
                  after_resend_indexed=after[0], after_resend_expected=total)
    assert not missing and not leftovers
    assert rows == files and rows >= len(acked)
    assert after == (total, total)


def test_kill9_during_analysis_runs_the_job_again_exactly_once(tmp_path: Path, orthanc: Orthanc, node_port: int,
                                                               test_model_dir: Path, counts: dict) -> None:
    # A CXR (a CT would do the same, but the CT report path currently fails in the report module
    # with the random test model); a longer generation widens the window the kill lands in.
    files = [need_data(CXR / "RG1_UNCR.dcm")]
    config = _config(tmp_path, test_model_dir, node_port, stable=1, dest_port=orthanc.dicom_port)
    config.write_text(config.read_text().replace("max_new_tokens = 24", "max_new_tokens = 400"))
    folder = config.parent
    node = start_node(config, node_port)
    assert storescu(node_port, files).wait(timeout=300) == 0
    wait_for(lambda: count_event(folder, "analysis.started"), 120, interval=0.05, what="analysis started")
    node.kill9()
    finished_before = count_event(folder, "analysis.finished")
    assert finished_before == 0, "the analysis finished before the kill; nothing was interrupted"

    node = start_node(config, node_port, log_name="node2.log")
    try:
        wait_for(lambda: count_event(folder, "export.ok"), 300, interval=0.5, what="the SR exported")
        time.sleep(4)  # a repeated analysis or export would show up here
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    srs = orthanc_sr_instances(orthanc)
    counts.update(jobs_interrupted=1, analysis_started=count_event(folder, "analysis.started"),
                  analysis_finished=count_event(folder, "analysis.finished"),
                  requeued=count_event(folder, "analysis.requeued"), exports_expected=1, sr_in_orthanc=srs)
    assert count_event(folder, "analysis.requeued") == 1
    assert count_event(folder, "analysis.started") == 2
    assert count_event(folder, "analysis.finished") == 1
    assert query(folder, "select state from analysis_jobs") == [("DONE",)]
    assert srs == 1 and count_event(folder, "export.ok") == 1


def test_kill9_during_export_delivers_once_after_restart(tmp_path: Path, orthanc: Orthanc, node_port: int,
                                                         test_model_dir: Path, counts: dict) -> None:
    proxy = Proxy(orthanc.dicom_port, mode="stall")  # the PACS accepts TCP and never answers: a hung send
    config = _config(tmp_path, test_model_dir, node_port, stable=1, dest_port=proxy.port)
    folder = config.parent
    node = start_node(config, node_port)
    try:
        assert storescu(node_port, [need_data(CXR / "RG1_UNCR.dcm")]).wait(timeout=120) == 0
        wait_for(lambda: query(folder, "select 1 from export_jobs where state = 'SENDING'"), 180,
                 interval=0.1, what="an export in flight")
        node.kill9()
        proxy.mode = "forward"
        node = start_node(config, node_port, log_name="node2.log")
        wait_for(lambda: count_event(folder, "export.ok"), 120, interval=0.5, what="the SR exported")
        time.sleep(4)
    finally:
        assert node.stop() == 0, node.output()[-3000:]
        proxy.close()
    srs = orthanc_sr_instances(orthanc)
    counts.update(exports_interrupted=1, exports_requeued=count_event(folder, "export.requeued"),
                  exports_expected=1, export_ok=count_event(folder, "export.ok"), sr_in_orthanc=srs)
    assert count_event(folder, "export.requeued") == 1
    assert srs == 1 and count_event(folder, "export.ok") == 1
    assert count_event(folder, "analysis.finished") == 1
