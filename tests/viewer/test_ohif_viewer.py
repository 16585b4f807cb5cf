"""The SR in OHIF Viewer, as a radiologist opens it: study, guided tour away, SR series, region.

OHIF is the prebuilt static ``dist/`` of the npm package ``@ohif/app`` 3.13 (no build), served with
a same-origin proxy to Orthanc's DICOMweb; headless Debian ``chromium`` is driven by
``puppeteer-core`` (``drive_ohif.js``). Screenshots are kept under ``test-artifacts/viewer``.

Skips cleanly when chromium, the OHIF build or puppeteer-core are missing and CI is unset; in CI
a missing piece fails. Install (see .ci/run)::

    apt-get install -y chromium nodejs npm
    PUPPETEER_SKIP_DOWNLOAD=1 npm install --prefix ~/.cache/scp_node/ohif puppeteer-core@24
    npm pack @ohif/app@3.13.2 --pack-destination ~/.cache/scp_node/ohif
    tar -xzf ~/.cache/scp_node/ohif/ohif-app-3.13.2.tgz -C ~/.cache/scp_node/ohif/ohif-app --strip-components=1
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from scp_node.engine.answer import region_for
from scp_node.engine.preprocess import PadTransform
from scp_node.engine.result import Finding, StructuredFindings
from scp_node.report import ReportingNode, build_measurement_report, write_report
from tests.report.conftest import CXR_MONO1, _make_result

#: The 440 x 440 CR. (The padded 1955 x 1841 RG1_UNCR never paints in OHIF 3.13: its 7 MB
#: 15-bit MONOCHROME1 frame request is aborted by the viewer; the SR region itself is valid and
#: its placement on that image is checked in tests/report.)
CXR = CXR_MONO1
from tests.support.net import free_port
from tests.support.orthanc import DICOMWEB_PLUGIN, start_orthanc
from tests.viewer.ohif_server import OhifServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "viewer"
CACHE = Path(os.environ.get("SCP_NODE_OHIF_DIR", Path.home() / ".cache" / "scp_node" / "ohif"))
DIST = CACHE / "ohif-app" / "dist"
DRIVER = Path(__file__).with_name("drive_ohif.js")


def _require(condition: bool, what: str) -> None:
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"viewer test needs {what} in CI (see tests/viewer/test_ohif_viewer.py)")
    pytest.skip(f"{what} not installed")


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    node = shutil.which("node")
    _require(chromium is not None, "chromium")
    _require(node is not None, "node")
    _require((DIST / "index.html").is_file(), f"OHIF static build ({DIST})")
    _require((CACHE / "node_modules" / "puppeteer-core").is_dir(), "puppeteer-core")
    _require(Path(DICOMWEB_PLUGIN).exists(), "orthanc-dicomweb")
    _require(CXR.exists(), "shared test data")
    return {"chromium": str(chromium), "node": str(node)}


def _drive(tools: dict[str, str], url: str, study_uid: str, label: str, tmp: Path) -> dict:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    config = {"url": url, "studyUID": study_uid, "outDir": str(ARTIFACTS), "label": label,
              "chromium": tools["chromium"], "puppeteerDir": str(CACHE),
              "userDataDir": str(tmp / f"chromium-{label}")}
    run = subprocess.run([tools["node"], str(DRIVER), json.dumps(config)], capture_output=True,
                         text=True, timeout=180, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"driver printed no result (rc {run.returncode}):\n{run.stderr[-3000:]}"
    result = json.loads(lines[-1])
    (ARTIFACTS / f"{label}-result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return result


def _node() -> ReportingNode:
    return ReportingNode(ae_title="SCPNODE", station_name="SCPNODE-01")


def test_cxr_region_in_ohif(tools, tmp_path):
    source = pydicom.dcmread(CXR, stop_before_pixels=True)
    result = _make_result([source], "{}", test_model=False)
    region = region_for([400, 100, 700, 450], None, [PadTransform.for_shape(int(source.Rows), int(source.Columns))])
    result.structured = StructuredFindings(
        findings=(Finding("pleural_effusion", "Right pleural effusion.", "right lower lobe", 42.0, region),),
        impression="Right pleural effusion.", triage="abnormal")
    sr = write_report(build_measurement_report([source], result, node=_node()), tmp_path / "sr.dcm")
    orthanc = start_orthanc(tmp_path / "orthanc", {})
    try:
        orthanc.upload(CXR)
        orthanc.upload(sr)
        with OhifServer(DIST, orthanc.url, free_port()) as server:
            shown = _drive(tools, server.origin, str(source.StudyInstanceUID), "cxr", tmp_path)
    finally:
        orthanc.stop()
    report = json.dumps(shown, indent=1, ensure_ascii=False)[:4000]
    assert shown["ok"], report  # an SVG annotation (the SCOORD rectangle) is drawn
    assert "SR image painted" in shown["steps"], report  # on the referenced image, painted
    # OHIF labels a TID 1410 region with its NUM and finding site (code meanings)
    assert any("Diameter: 42.00 mm" in t and "Lower lobe of lung" in t for t in shown["svgText"]), report
