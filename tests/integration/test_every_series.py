"""Every series gets an answer: a single CT slice and a 3-image MR series, fewer images than a
volume needs, are read as 2D images, not skipped. Orthanc pushes both to the node (a subprocess
with the tiny test model, report mode); an SR for each comes back into Orthanc's study and passes
dciodvfy and dsrdump, as in the spine test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.support.net import wait_for
from tests.support.node import cli, start_node, write_config
from tests.support.orthanc import Orthanc
from tests.support.paths import CT_DIR, DATA, data_files, tool

pytestmark = pytest.mark.integration

MR_DIR = DATA / "mr_wrist_dcm4che"


def _check_sr(orthanc: Orthanc, study_id: str, source: Path, out: Path) -> pydicom.Dataset:
    [sr_series] = wait_for(lambda: orthanc.sr_series(study_id), 300, interval=1.0, what="an SR in Orthanc")
    out.write_bytes(orthanc.request("GET", f"/instances/{sr_series['Instances'][0]}/file"))
    sr = pydicom.dcmread(out)
    src = pydicom.dcmread(source, stop_before_pixels=True)
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sr.VerificationFlag == "UNVERIFIED"
    v = subprocess.run([tool("dciodvfy"), str(out)], capture_output=True, text=True)
    errors = [ln for ln in (v.stdout + v.stderr).splitlines() if ln.startswith("Error")]
    assert v.returncode == 0 and not errors, v.stdout + v.stderr
    d = subprocess.run([tool("dsrdump"), "+Pt", "+Pl", str(out)], capture_output=True, text=True)
    assert d.returncode == 0 and "1500" in d.stdout and "reviewed by a physician" in d.stdout, d.stdout[:2000]
    return sr


def test_single_ct_slice_and_three_mr_images_each_get_an_sr(tmp_path: Path, orthanc: Orthanc, node_port: int,
                                                            test_model_dir: Path) -> None:
    ct = data_files(CT_DIR, at_least=61)[60]
    mr = data_files(MR_DIR, at_least=3)[:3]
    folder = tmp_path / "node"
    folder.mkdir()
    config = write_config(folder, model_dir=test_model_dir, port=node_port,
                          peers=[("ORTHANC", "127.0.0.1")],
                          destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                         "port": orthanc.dicom_port}],
                          extra="[report]\nnotify_not_analysed = true\n")
    node = start_node(config, node_port)
    try:
        studies = []
        for files in ([ct], mr):
            last = {}
            for f in files:
                last = orthanc.upload(f)
            orthanc.push_series(last["ParentSeries"])
            studies.append(last["ParentStudy"])
        ct_sr = _check_sr(orthanc, studies[0], ct, tmp_path / "ct-sr.dcm")
        mr_sr = _check_sr(orthanc, studies[1], mr[0], tmp_path / "mr-sr.dcm")
        status = cli("status", "--config", str(config))
        assert "done 2" in status.stdout and "not analysed  none" in status.stdout, status.stdout
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    # read as 2D images with the 2D profiles, in report mode (the model's report, then the extraction)
    for sr, profile, images in ((ct_sr, "ct-images", 1), (mr_sr, "mr-images", 3)):
        [sidecar] = list((folder / "storage").rglob(f"{sr.SOPInstanceUID}.json"))
        found = json.loads(sidecar.read_text())
        assert found["model"]["prompt_profile"] == profile and found["answer_mode"] == "report"
        assert [t["name"] for t in found["turns"]] == ["report", "extraction"]
        assert found["exam"]["source_instance_count"] == images
