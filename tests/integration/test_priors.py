"""Priors end to end: Orthanc holds earlier studies, a modality (DCMTK storescu) pushes new ones to
the node (a subprocess with the tiny test model), and the node looks for each patient's prior.

* Patient A: Orthanc holds a chest X-ray a year earlier (made from a real CXR with new UIDs).
  The node C-FINDs it (study, then series level) and C-MOVEs it out of Orthanc (Orthanc's verbose
  log names both requests); the prior is indexed with ``is_prior``, gets no analysis job, the
  PriorFetch row is DONE, and the SR comes back.
* Patient B: no earlier study anywhere: the SR comes back, the PriorFetch row says none.
* Patient C: Orthanc's earlier study has another birth date: nothing is retrieved, no comparison
  is made, the audit says why (without the dates).
* The PACS's query port closed (``timeout_seconds = 5``): the SR still comes back, the lookup
  took less than the timeout, and ``scp-node status`` shows the failed prior fetch.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.support.net import free_port, wait_for
from tests.support.node import NodeProcess, cli, start_node, write_config
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.paths import tool
from tests.support.priors import derived_cxr

pytestmark = pytest.mark.integration

def _node(folder: Path, model: Path, port: int, orthanc: Orthanc, prior_port: int, timeout: float = 30) -> Path:
    folder.mkdir(parents=True)
    return write_config(folder, model_dir=model, port=port, stable_seconds=1.0,
                        peers=[("ORTHANC", "127.0.0.1"), ("STORESCU", "127.0.0.1")],
                        destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                       "port": orthanc.dicom_port}],
                        extra=("[[priors]]\nname = \"orthanc\"\nae_title = \"ORTHANC\"\nhost = \"127.0.0.1\"\n"
                               f"port = {prior_port}\nlookback_days = 1825\ntimeout_seconds = {timeout}\n"))


def _push(port: int, *files: Path) -> None:
    """The modality sends the new study to the node."""
    r = subprocess.run([tool("storescu"), "-aet", "STORESCU", "-aec", "SCPNODE", "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _sr_in_orthanc(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    found = orthanc.request("POST", "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    return orthanc.sr_series(found[0]) if found else []


def _rows(folder: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(folder / "index.db") as con:
        return con.execute(sql, args).fetchall()


def _when(value: Any) -> datetime:
    """A timestamp column as SQLite (ISO text) or PostgreSQL (a datetime) gives it back."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _sidecar(folder: Path, study_uid: str) -> tuple[pydicom.Dataset, dict[str, Any]]:
    [(rel,)] = _rows(folder, "select path from reports where study_instance_uid = ?", study_uid)
    sr_path = folder / "storage" / rel
    return pydicom.dcmread(sr_path), json.loads(sr_path.with_suffix(".json").read_text(encoding="utf-8"))


def _check_report_comparison(sr: pydicom.Dataset, sidecar: dict[str, Any], status: str,
                             prior_study_uid: str = "") -> None:
    """What the SR and the sidecar say about the prior: the status; for a compared prior, the prior
    study in Pertinent Other Evidence (never in the current study's evidence) and a coded change on
    every finding (the grammar makes at least one finding when a prior is compared); otherwise the
    sentence that says why there was no comparison."""
    assert sidecar["comparison"]["status"] == status, sidecar.get("comparison")
    text = _sr_text(sr)
    if prior_study_uid:
        assert sidecar["comparison"]["prior_study_instance_uid"] == prior_study_uid
        evidence = {str(item.StudyInstanceUID) for item in sr.get("PertinentOtherEvidenceSequence", [])}
        assert prior_study_uid in evidence
        assert prior_study_uid not in {str(i.StudyInstanceUID) for i in
                                       sr.get("CurrentRequestedProcedureEvidenceSequence", [])}
        findings = sidecar["findings"]
        assert findings and all(f["change"] in ("new", "improved", "stable", "worsened", "resolved")
                                for f in findings), findings
        assert text.count("Qualitative Difference") == len(findings)
        assert "Comparison with Prior Study Done" in text
    else:
        expected = {"none": "No prior study available for comparison.",
                    "not_comparable": "Prior study not comparable:",
                    "unavailable": "Prior study could not be retrieved:"}[status]
        assert expected in text, text


def _sr_text(sr: pydicom.Dataset) -> str:
    """Every concept name and text/code value of the SR content tree, as one string."""
    parts: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                for code in item.get(seq, []):
                    parts.append(str(code.CodeMeaning))
            if "TextValue" in item:
                parts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return "\n".join(parts)


def test_prior_fetched_none_and_refused(tmp_path: Path, node_port: int, test_model_dir: Path) -> None:
    orthanc = start_orthanc(tmp_path / "orthanc", {"scpnode": ("SCPNODE", "127.0.0.1", node_port)}, verbose=True)
    folder = tmp_path / "node"
    node: NodeProcess | None = None
    try:
        a_prior = derived_cxr(tmp_path / "a_2023.dcm", study_date="20230110", patient_id="PAT-A")
        a_lateral = derived_cxr(tmp_path / "a_2023_lat.dcm", study_date="20231110", patient_id="PAT-A",
                                ViewPosition="LL")  # newer, but not a frontal view
        c_prior = derived_cxr(tmp_path / "c_2023.dcm", study_date="20230110", patient_id="PAT-C",
                              birth_date="19550505")
        for f in (a_prior, a_lateral, c_prior):
            assert orthanc.upload(f)["Status"] == "Success"
        a_now = derived_cxr(tmp_path / "a_2024.dcm", study_date="20240110", patient_id="PAT-A")
        b_now = derived_cxr(tmp_path / "b_2024.dcm", study_date="20240110", patient_id="PAT-B")
        c_now = derived_cxr(tmp_path / "c_2024.dcm", study_date="20240110", patient_id="PAT-C", birth_date="19600101")
        node = start_node(_node(folder, test_model_dir, node_port, orthanc, orthanc.dicom_port), node_port)
        _push(node_port, a_now, b_now, c_now)
        for f in (a_now, b_now, c_now):
            wait_for(lambda f=f: _sr_in_orthanc(orthanc, _uids(f)[0]), 300, interval=1.0,
                     what=f"the SR of {f.name} in Orthanc")
        status = cli("status", "--config", str(folder / "node.toml"))
    finally:
        if node is not None:
            assert node.stop() == 0, node.output()[-3000:]
        orthanc.stop()
    log = orthanc.log()
    output = node.output() if node is not None else ""

    # A: C-FIND (study, series) and C-MOVE of the PA series only, seen by Orthanc.
    a_study, _ = _uids(a_now)
    prior_study, prior_series = _uids(a_prior)
    assert log.count("Incoming Find request from AET SCPNODE") >= 2 * 2  # A and C: study + series level each
    assert 'Move-SCU request received for AET "SCPNODE"' in log
    assert log.count("Incoming Move request from AET SCPNODE") == 1  # A's prior only; C's is never retrieved
    [(is_prior, state)] = _rows(folder, "select is_prior, state from series where series_instance_uid = ?", prior_series)
    assert is_prior == 1 and state == "COMPLETE"
    assert _rows(folder, "select count(*) from analysis_jobs j join series s on j.series_fk = s.id "
                         "where s.series_instance_uid = ?", prior_series) == [(0,)]
    assert _rows(folder, "select count(*) from series where series_instance_uid = ?", _uids(a_lateral)[1]) == [(0,)]
    fetches = {row[0]: row[1:] for row in _rows(
        folder, "select study_instance_uid, state, source, prior_study_instance_uid, detail from prior_fetches")}
    assert fetches[a_study][:3] == ("DONE", "orthanc", prior_study)
    assert "365 days earlier" in fetches[a_study][3]
    # B: none, locally or in Orthanc.
    assert fetches[_uids(b_now)[0]][0] == "NONE"
    assert "no earlier comparable study" in fetches[_uids(b_now)[0]][3]
    # C: the birth date differs: refused from the C-FIND answer, nothing retrieved, audited.
    assert fetches[_uids(c_now)[0]][:3] == ("REFUSED", "orthanc", _uids(c_prior)[0])
    assert _rows(folder, "select count(*) from series where series_instance_uid = ?", _uids(c_prior)[1]) == [(0,)]
    [(outcome, detail)] = _rows(folder, "select outcome, detail from audit_events where event = 'prior.refused'")
    assert outcome == "warning" and "prior not comparable: birth date differs" in detail
    assert "1955" not in detail and "1960" not in detail and "PAT-C" not in detail
    events = [e for (e,) in _rows(folder, "select event from audit_events where event like 'prior.%' order by id")]
    assert events.count("prior.retrieve") == 1 and events.count("prior.found") == 1
    assert events.count("prior.none") == 1 and events.count("prior.query") >= 4
    # Three SRs, three done analyses; no identifier of the patients in the node's log.
    assert _rows(folder, "select state, count(*) from analysis_jobs group by state") == [("DONE", 3)]
    assert not any(p in output for p in ("PAT-A", "PAT-B", "PAT-C"))
    assert "prior fetches  0 pending, 0 failed" in status.stdout, status.stdout + status.stderr

    _check_report_comparison(*_sidecar(folder, a_study), "compared", prior_study)
    _check_report_comparison(*_sidecar(folder, _uids(b_now)[0]), "none")
    _check_report_comparison(*_sidecar(folder, _uids(c_now)[0]), "not_comparable")


def test_closed_query_port_costs_at_most_the_timeout(tmp_path: Path, node_port: int, test_model_dir: Path) -> None:
    orthanc = start_orthanc(tmp_path / "orthanc", {"scpnode": ("SCPNODE", "127.0.0.1", node_port)})
    folder = tmp_path / "node"
    node: NodeProcess | None = None
    timeout = 5.0
    try:
        assert orthanc.upload(derived_cxr(tmp_path / "prior.dcm", study_date="20230110"))["Status"] == "Success"
        now = derived_cxr(tmp_path / "now.dcm", study_date="20240110")
        closed = free_port()  # the PACS's query port: nothing listens there
        node = start_node(_node(folder, test_model_dir, node_port, orthanc, closed, timeout=timeout), node_port)
        pushed = time.monotonic()
        _push(node_port, now)
        wait_for(lambda: _sr_in_orthanc(orthanc, _uids(now)[0]), 300, interval=0.5, what="the SR in Orthanc")
        elapsed = time.monotonic() - pushed
        status = cli("status", "--config", str(folder / "node.toml"))
    finally:
        if node is not None:
            assert node.stop() == 0, node.output()[-3000:]
        orthanc.stop()
    [(state, detail, created, finished)] = _rows(
        folder, "select state, detail, created_at, finished_at from prior_fetches")
    assert state == "FAILED" and "orthanc" in detail and "failed (port closed" in detail
    lookup = (_when(finished) - _when(created)).total_seconds()
    assert lookup < timeout
    # Push to SR: the completion window, the lookup (bounded by the timeout), the analysis, the export.
    [(started, done)] = _rows(folder, "select started_at, finished_at from analysis_jobs")
    analysis = (_when(done) - _when(started)).total_seconds()
    assert elapsed < timeout + (analysis - lookup) + 1.0 + 15.0, (elapsed, analysis, lookup)
    assert [o for (o,) in _rows(folder, "select outcome from audit_events where event = 'prior.query'")] == ["failure"]
    assert "prior fetches  0 pending, 1 failed" in status.stdout, status.stdout + status.stderr
    assert "failed (port closed" in status.stdout
    _check_report_comparison(*_sidecar(folder, _uids(now)[0]), "unavailable")
