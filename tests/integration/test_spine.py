"""The spine, end to end: Orthanc pushes a CXR and the 133-slice CT; an SR for each comes back.

Real peers only: Orthanc from Debian is the PACS, scp_node runs as a subprocess with the tiny
test model, and DCMTK's ``dsrdump`` and dicom3tools' ``dciodvfy`` judge the SRs.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.support.net import wait_for
from tests.support.node import cli, start_node, write_config
from tests.support.orthanc import Orthanc
from tests.support.paths import CT_DIR, CXR, need_data, tool

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("receive_path")]  # fast path and pynetdicom's own


def _node_config(tmp_path: Path, model: Path, port: int, orthanc: Orthanc, stable: float = 1.0) -> Path:
    folder = tmp_path / "node"
    folder.mkdir()
    return write_config(folder, model_dir=model, port=port, stable_seconds=stable,
                        peers=[("ORTHANC", "127.0.0.1"), ("STORESCU", "127.0.0.1"), ("ECHOSCU", "127.0.0.1")],
                        destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                       "port": orthanc.dicom_port}])


def _upload_series(orthanc: Orthanc, files: list[Path]) -> tuple[str, str]:
    """Give Orthanc the files; return (study id, series id) in Orthanc."""
    last = {}
    for f in files:
        last = orthanc.upload(f)
    return last["ParentStudy"], last["ParentSeries"]


def _wait_sr(orthanc: Orthanc, study_id: str, timeout: float) -> list[dict]:
    return wait_for(lambda: orthanc.sr_series(study_id), timeout, interval=1.0, what="an SR in Orthanc")


def _check_sr_file(orthanc: Orthanc, sr_series: dict, source: Path, out: Path) -> pydicom.Dataset:
    instance_id = sr_series["Instances"][0]
    out.write_bytes(orthanc.request("GET", f"/instances/{instance_id}/file"))
    sr = pydicom.dcmread(out)
    src = pydicom.dcmread(source, stop_before_pixels=True)
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.PatientID == src.PatientID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.VerificationFlag == "UNVERIFIED"
    v = subprocess.run([tool("dciodvfy"), str(out)], capture_output=True, text=True)
    errors = [ln for ln in (v.stdout + v.stderr).splitlines() if ln.startswith("Error")]
    assert v.returncode == 0 and not errors, v.stdout + v.stderr
    d = subprocess.run([tool("dsrdump"), "+Pt", "+Pl", str(out)], capture_output=True, text=True)
    assert d.returncode == 0, d.stderr
    assert "1500" in d.stdout and "Imaging Measurement Report" in d.stdout, d.stdout[:2000]
    assert "TEST MODEL" in d.stdout.upper()
    assert "reviewed by a physician" in d.stdout
    return sr


def _audit_events(config_dir: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(config_dir / "index.db") as con:
        return con.execute("select event, series_instance_uid, detail from audit_events order by id").fetchall()


def test_orthanc_pushes_cxr_and_ct_and_gets_an_sr_back(tmp_path: Path, orthanc: Orthanc, node_port: int,
                                                        test_model_dir: Path) -> None:
    cxr = need_data(CXR / "RG1_UNCR.dcm")
    ct_files = sorted(need_data(CT_DIR).glob("*.dcm"))
    assert len(ct_files) == 133
    config = _node_config(tmp_path, test_model_dir, node_port, orthanc)
    node = start_node(config, node_port)
    try:
        cxr_study, cxr_series = _upload_series(orthanc, [cxr])
        ct_study, ct_series = _upload_series(orthanc, ct_files)
        orthanc.push_series(cxr_series)
        orthanc.push_series(ct_series)
        cxr_sr = _wait_sr(orthanc, cxr_study, timeout=240)
        ct_sr = _wait_sr(orthanc, ct_study, timeout=600)
        sr1 = _check_sr_file(orthanc, cxr_sr[0], cxr, tmp_path / "cxr-sr.dcm")
        sr2 = _check_sr_file(orthanc, ct_sr[0], ct_files[0], tmp_path / "ct-sr.dcm")
        # The CT SR references all the slices it analysed (evidence), from the source series.
        refs = [i.ReferencedSOPInstanceUID for s in sr2.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
        assert len(refs) == 133
        assert sr1.SOPInstanceUID != sr2.SOPInstanceUID
        status = cli("status", "--config", str(config))
        assert status.returncode == 0, status.stdout + status.stderr
        assert "running" in status.stdout and "done 2" in status.stdout, status.stdout
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    events = [e for e, _, _ in _audit_events(config.parent)]
    for name in ("association.accepted", "instance.stored", "series.complete", "analysis.started",
                 "analysis.finished", "sr.created", "export.ok"):
        assert name in events, name
    assert events.count("instance.stored") == 134
    assert events.count("export.ok") == 2
    # The clear PatientID never appears in the audit trail.
    pid = str(pydicom.dcmread(cxr, stop_before_pixels=True).PatientID)
    with sqlite3.connect(config.parent / "index.db") as con:
        dump = "\n".join(con.iterdump())
    audit_lines = [ln for ln in dump.splitlines() if "audit_events" in ln]
    assert audit_lines and not any(pid in ln for ln in audit_lines)
    tail = cli("audit", "tail", "--config", str(config), "-n", "5")
    assert tail.returncode == 0 and "export.ok" in tail.stdout
