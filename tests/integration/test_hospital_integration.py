"""The node's results beyond the PACS, end to end with real peers: Orthanc pushes a CXR and the
chest CT, the node (a subprocess with the tiny test model) analyses them, and besides the SRs in
Orthanc, the test RIS (hl7apy's MLLP server) receives a parseable HL7 v2.5.1 ORU^R01 for each
and answers AA, a webhook gets each SR's JSON sidecar by HTTPS POST; /metrics, scraped with
prometheus_client's parser, shows what happened."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pydicom
import pytest

from tests.support.mllp import MLLPListener
from tests.support.net import free_port, wait_for
from tests.support.node import start_node, write_config
from tests.support.ops import healthz, scrape
from tests.support.orthanc import Orthanc
from tests.support.paths import CT_DIR, CXR, need_data

pytestmark = pytest.mark.integration


def _upload(orthanc: Orthanc, files: list[Path]) -> tuple[str, str]:
    last = {}
    for f in files:
        last = orthanc.upload(f)
    return last["ParentStudy"], last["ParentSeries"]


def test_oru_r01_for_cxr_and_ct(tmp_path: Path, orthanc: Orthanc, node_port: int, test_model_dir: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    cxr = need_data(CXR / "RG1_UNCR.dcm")
    ct_files = sorted(need_data(CT_DIR).glob("*.dcm"))
    monkeypatch.setenv("SCP_NODE__ENGINE__CT_MAX_SLICES", "12")  # the message, not the model, is tested here
    folder = tmp_path / "node"
    folder.mkdir()
    ops_port = free_port()
    from tests.export.test_webhook import Receiver
    from tests.support.rsyslog import make_certs

    certs = make_certs(tmp_path / "certs")
    hook = Receiver(certs)
    (tmp_path / "hook.token").write_text("hook-token")
    with MLLPListener("AA") as (hl7_port, rx):
        config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=1.0,
                              peers=[("ORTHANC", "127.0.0.1")],
                              destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                             "port": orthanc.dicom_port}],
                              extra=("[[hl7_destinations]]\nname = \"ris\"\nhost = \"127.0.0.1\"\n"
                                     f"port = {hl7_port}\nsending_facility = \"RADIOLOGY\"\n"
                                     "receiving_application = \"TESTRIS\"\nreceiving_facility = \"HOSP\"\n"
                                     f"\n[[webhooks]]\nname = \"dashboard\"\n"
                                     f"url = \"https://127.0.0.1:{hook.port}/scp\"\n"
                                     f"token_file = \"{tmp_path / 'hook.token'}\"\ntls_ca = \"{certs.ca}\"\n"
                                     f"\n[ops]\nport = {ops_port}\n"))
        node = start_node(config, node_port)
        try:
            cxr_study, cxr_series = _upload(orthanc, [cxr])
            ct_study, ct_series = _upload(orthanc, ct_files)
            orthanc.push_series(cxr_series)
            orthanc.push_series(ct_series)
            wait_for(lambda: orthanc.sr_series(cxr_study), 240, interval=1.0, what="the CXR SR in Orthanc")
            wait_for(lambda: orthanc.sr_series(ct_study), 600, interval=1.0, what="the CT SR in Orthanc")
            wait_for(lambda: len(rx.received) >= 2 or None, 60, interval=0.5, what="two ORU^R01 at the RIS")
            wait_for(lambda: scrape(ops_port).value("scp_node_exports", state="done") == 6, 30,
                     what="6 exports done in /metrics")
            m = scrape(ops_port)
            health = healthz(ops_port)
        finally:
            assert node.stop() == 0, node.output()[-3000:]
            hook.close()
        messages = rx.messages()  # parsed strictly as HL7 v2.5.1
    assert len(messages) == 2
    sources = {str(ds.StudyInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True)
                                                      for f in (cxr, ct_files[0]))}
    seen = set()
    for msg in messages:
        assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msg.msh.msh_12.to_er7() == "2.5.1"
        assert msg.msh.msh_5.to_er7() == "TESTRIS" and msg.msh.msh_4.to_er7() == "RADIOLOGY"
        order = msg.oru_r01_patient_result.oru_r01_order_observation
        study_uid = order.obr.obr_20.to_er7()
        src = sources[study_uid]
        seen.add(str(src.Modality))
        pid = msg.oru_r01_patient_result.oru_r01_patient.pid
        assert pid.pid_3.to_er7().split("^")[0] == src.PatientID
        assert order.obr.obr_18.to_er7() == str(src.get("AccessionNumber", "") or "")
        assert order.obr.obr_25.to_er7() == "P"
        obx = [(o.obx.obx_3.to_er7().split("^")[0], o.obx.obx_5.to_er7(), o.obx.obx_11.to_er7())
               for o in order.oru_r01_observation]
        assert {status for _, _, status in obx} == {"P"}
        assert ("110180", study_uid, "P") in obx
        assert any(code == "121106" and "must be reviewed by a physician" in value for code, value, _ in obx)
        assert any(code == "121106" and value.startswith("TEST MODEL") for code, value, _ in obx)
    assert seen == {"CR", "CT"}
    with sqlite3.connect(folder / "index.db") as con:
        states = con.execute("select destination, state, attempts from export_jobs order by id").fetchall()
        ok = con.execute("select count(*) from audit_events where event = 'export.ok' and detail like "
                         "'delivered to ris%'").fetchone()[0]
    assert sorted(states) == [("dashboard", "DONE", 1), ("dashboard", "DONE", 1), ("pacs", "DONE", 1),
                              ("pacs", "DONE", 1), ("ris", "DONE", 1), ("ris", "DONE", 1)]
    # The webhook got each SR's sidecar (JSON, no patient identifiers) with the bearer token.
    assert len(hook.requests) == 2
    bodies = [json.loads(body) for _, _, body in hook.requests]
    assert {b["exam"]["modality"] for b in bodies} == {"CR", "CT"}
    assert all(h["Authorization"] == "Bearer hook-token" for _, h, _ in hook.requests)
    assert not any(str(ds.PatientID).encode() in body for ds in sources.values() for _, _, body in hook.requests)
    assert ok == 2
    # /metrics after the run: the counts that happened.
    assert health[0] == 200 and health[1]["status"] == "ok", health
    assert m.value("scp_node_instances_received_total", via="dimse", outcome="stored") == 134
    assert m.value("scp_node_store_seconds_count") == 134
    with sqlite3.connect(folder / "index.db") as con:
        stored_bytes = con.execute("select sum(size) from instances").fetchone()[0]
    assert m.value("scp_node_received_bytes_total") == stored_bytes
    assert m.value("scp_node_associations_total", result="accepted") >= 2
    assert m.value("scp_node_associations_total", result="rejected") == 0
    assert m.value("scp_node_series_completed_total") == 2
    assert m.value("scp_node_analysis_jobs", state="done") == 2
    assert m.value("scp_node_analysis_jobs", state="pending") == m.value("scp_node_analysis_jobs", state="running") == 0
    for dest in ("pacs", "ris"):
        assert m.value("scp_node_exports", destination=dest, state="done") == 2
        assert m.value("scp_node_exports", destination=dest, state="dead") == 0
    assert m.value("scp_node_analysis_stage_seconds_count", stage="queue_wait") == 2
    assert m.value("scp_node_analysis_stage_seconds_count", stage="prepare") == 2
    assert sum(v for n, lab, v in m.samples if n == "scp_node_analysis_stage_seconds_count"
               and lab["stage"].startswith("generate")) >= 2
    assert m.value("scp_node_analysis_stage_seconds_count", stage="report_build") == 2
    assert m.value("scp_node_analysis_stage_seconds_count", stage="export_dimse") == 2
    assert m.value("scp_node_analysis_stage_seconds_count", stage="export_hl7") == 2
    assert m.value("scp_node_engine_generated_tokens_total") > 0
    assert m.value("scp_node_engine_tokens_per_second") > 0
    assert m.value("scp_node_audit_events_total", event="export.ok") == 6
    assert m.value("scp_node_analysis_stage_seconds_count", stage="export_webhook") == 2
