"""The spine through a model server: Orthanc -> node -> OpenAI-compatible server -> SR back into Orthanc.

The same run as ``test_spine.py``, with ``[engine] backend = "openai"``: the node runs no model, it
sends each series to ``transformers serve`` (a real server, on CPU, serving the tiny test model from
its local folder, offline) and writes the SR from the answer. Checked besides the SRs: the SR names
the served model, the configured weights hash and that the node could not read the weights; every
request is in the audit, without PHI or image bytes; the server ignored ``response_format`` and the
audit says the lenient parser was the fallback. The answer mode is the default, "report": two
requests per series (report, then extraction).
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

from scp_node.engine.modeldir import weights_sha256
from tests.integration.test_spine import _check_sr_file, _upload_series, _wait_sr
from tests.support.llm_server import LLMServer, start_llm_server
from tests.support.node import cli, start_node, write_config
from tests.support.orthanc import Orthanc
from tests.support.paths import CT_DIR, CXR, need_data, tool

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llm_server(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLMServer]:
    server = start_llm_server(test_model_dir, tmp_path_factory.mktemp("llm") / "serve.log")
    yield server
    server.stop()


def _served_config(tmp_path: Path, model: Path, port: int, orthanc: Orthanc, server: LLMServer) -> Path:
    folder = tmp_path / "node"
    folder.mkdir()
    path = write_config(folder, model_dir=folder / "no-model-here", port=port, stable_seconds=1.0,
                        peers=[("ORTHANC", "127.0.0.1")],
                        destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                       "port": orthanc.dicom_port}])
    served = "\n".join([
        "[engine]", 'backend = "openai"', f'base_url = "{server.base_url}"', f'model = "{server.model}"',
        f'weights_sha256 = "{weights_sha256(model)}"', "max_concurrent = 2", "max_retries = 1",
        "retry_backoff_seconds = 0.5", "max_findings = 1", "max_text_chars = 20",
        "ct_max_slices = 16",  # the whole CT is sent; 16 of its slices go to the server (CPU time)
    ])
    path.write_text(path.read_text().replace("[engine]", served, 1))
    return path


def test_orthanc_node_server_sr_back(tmp_path: Path, orthanc: Orthanc, node_port: int, test_model_dir: Path,
                                     llm_server: LLMServer) -> None:
    cxr = need_data(CXR / "RG1_UNCR.dcm")
    ct_files = sorted(need_data(CT_DIR).glob("*.dcm"))
    config = _served_config(tmp_path, test_model_dir, node_port, orthanc, llm_server)
    node = start_node(config, node_port)
    try:
        cxr_study, cxr_series = _upload_series(orthanc, [cxr])
        ct_study, ct_series = _upload_series(orthanc, ct_files)
        orthanc.push_series(cxr_series)
        orthanc.push_series(ct_series)
        cxr_sr = _wait_sr(orthanc, cxr_study, timeout=240)
        ct_sr = _wait_sr(orthanc, ct_study, timeout=600)
        sr1 = _check_sr_file(orthanc, cxr_sr[0], cxr, tmp_path / "cxr-sr.dcm")
        _check_sr_file(orthanc, ct_sr[0], ct_files[0], tmp_path / "ct-sr.dcm")
        status = cli("status", "--config", str(config))
        assert "done 2" in status.stdout, status.stdout
    finally:
        assert node.stop() == 0, node.output()[-3000:]

    # The SR names the served model, the configured hash, and where the hash came from.
    dump = subprocess.run([tool("dsrdump"), "+Pt", "+Pl", str(tmp_path / "cxr-sr.dcm")], capture_output=True,
                          text=True).stdout
    assert f"weights_sha256={weights_sha256(test_model_dir)}" in dump
    assert "openai-compatible server 127.0.0.1" in dump and "weights not readable by the node" in dump, dump
    assert str(test_model_dir) in dump
    assert any("TEST MODEL" in str(item.get("ContributionDescription", ""))
               for item in sr1.ContributingEquipmentSequence)

    with sqlite3.connect(config.parent / "index.db") as con:
        rows = con.execute("select event, outcome, peer, series_instance_uid, detail from audit_events "
                           "order by id").fetchall()
        audit_dump = "\n".join(ln for ln in con.iterdump() if "audit_events" in ln)
    server_rows = [r for r in rows if r[0] == "engine.server"]
    assert len(server_rows) == 1 and server_rows[0][1] == "success", server_rows
    requests = [r for r in rows if r[0] == "engine.request"]
    shown = "\n".join(map(str, [r for r in rows if r[0].startswith(("engine", "analysis"))]))
    # Report mode (the default answer_mode): per series the report, then the extraction with the
    # schema; a config without answer_mode (older) answers in one request.
    series = {pydicom.dcmread(cxr, stop_before_pixels=True).SeriesInstanceUID,
              pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID}
    assert {r[3] for r in requests} == series, shown
    for uid in series:
        turns = [r[4].split(":", 1)[0] for r in requests if r[3] == uid]
        assert turns in (["report", "extraction"], ["answer"]), shown
    for event, outcome, peer, _, detail in requests:
        assert peer == f"127.0.0.1:{llm_server.port}"
        assert "HTTP 200" in detail and "attempt 1 of 2" in detail, detail
        if detail.startswith("report: "):
            assert outcome == "success" and "response_format none" in detail, detail
        else:
            # transformers serve ignores response_format: the audit says the lenient parser was the fallback.
            assert detail.startswith(("extraction: ", "answer: ")) and "response_format json_schema" in detail, detail
            assert outcome == "warning" and "lenient parser fallback" in detail, detail
    assert any("16 image(s), png" in r[4] for r in requests), requests  # ct_max_slices = 16
    # No PHI and no image bytes in the audit or the node's log.
    pid = str(pydicom.dcmread(cxr, stop_before_pixels=True).PatientID)
    assert pid not in audit_dump
    for text in (audit_dump, node.output()):
        assert "data:image" not in text and "base64" not in text
