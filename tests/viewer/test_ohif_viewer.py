"""The SR in OHIF Viewer, as a radiologist opens it: study, guided tour away, SR series, region.

OHIF is the prebuilt static ``dist/`` of the npm package ``@ohif/app`` 3.13 (no build); headless
Debian ``chromium`` is driven by ``puppeteer-core`` (``drive_ohif.js``). Each test runs two ways:

* ``orthanc``: the images and the SR in Orthanc, OHIF served with a same-origin proxy to
  Orthanc's DICOMweb (the PACS a site already has);
* ``node``: OHIF's data source points straight at the node's DICOMweb (the real app over a real
  index, the SR recorded as the node's own report), cross-origin with ``[web] cors_origins`` and
  the bearer token in the viewer URL's ``token`` parameter: nothing in between.

Screenshots are kept under ``test-artifacts/viewer`` (``cxr-*``/``ct-*``: Orthanc;
``cxr-node-*``/``ct-node-*``: the node).

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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

from scp_node.engine.answer import region_for
from scp_node.engine.preprocess import PadTransform
from scp_node.engine.result import Comparison, Finding, ImageRegion, SourceImageRef, StructuredFindings
from scp_node.report import ReportingNode, build_measurement_report, write_report
from tests.report.conftest import CT_SERIES, CXR_MONO1, CXR_RG1, _make_result

#: The 440 x 440 CR. (The padded 1955 x 1841 RG1_UNCR never paints in OHIF 3.13: its 7 MB
#: 15-bit MONOCHROME1 frame request is aborted by the viewer; the SR region itself is valid and
#: its placement on that image is checked in tests/report.)
CXR = CXR_MONO1
from tests.support.net import free_port
from tests.support.orthanc import DICOMWEB_PLUGIN, start_orthanc
from tests.viewer.ohif_server import OhifServer
from tests.web.conftest import TOKEN, serve_in_process

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
    _require(CXR.exists() and CT_SERIES.is_dir(), "shared test data")
    return {"chromium": str(chromium), "node": str(node)}


def _drive(tools: dict[str, str], url: str, study_uid: str, label: str, tmp: Path, query: str = "") -> dict:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    config = {"url": url, "studyUID": study_uid, "outDir": str(ARTIFACTS), "label": label,
              "chromium": tools["chromium"], "puppeteerDir": str(CACHE),
              "userDataDir": str(tmp / f"chromium-{label}"), "query": query}
    run = subprocess.run([tools["node"], str(DRIVER), json.dumps(config)], capture_output=True,
                         text=True, timeout=180, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"driver printed no result (rc {run.returncode}):\n{run.stderr[-3000:]}"
    result = json.loads(lines[-1])
    (ARTIFACTS / f"{label}-result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return result


def _node() -> ReportingNode:
    return ReportingNode(ae_title="SCPNODE", station_name="SCPNODE-01")


@pytest.fixture(params=["orthanc", "node"])
def via(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _stow(root: str, files: list[Path]) -> None:
    import requests

    boundary = "ohif-test-boundary"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes()
                    + b"\r\n" for f in files) + b"--" + boundary.encode() + b"--\r\n"
    rsp = requests.post(root + "/studies", data=body, timeout=120, headers={
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert rsp.status_code == 200, rsp.text[:500]


def _as_the_nodes_report(storage: Path, db_path: Path, sr_file: Path) -> None:
    """Record ``sr_file`` as this node's own SR of its series (as the analysis queue does)."""
    from scp_node.store.db import Database
    from scp_node.store.models import AnalysisJob, Report, Series

    sr = pydicom.dcmread(sr_file, stop_before_pixels=True)
    rel = Path(sr.StudyInstanceUID, sr.SeriesInstanceUID, f"{sr.SOPInstanceUID}.dcm")
    (storage / rel).parent.mkdir(parents=True)
    shutil.copyfile(sr_file, storage / rel)
    referenced = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
    db = Database(f"sqlite:///{db_path}")
    try:
        with db.session() as s:
            series = s.query(Series).filter(Series.series_instance_uid == referenced).one()
            job = AnalysisJob(series=series, series_version=1)
            s.add(Report(job=job, sop_instance_uid=sr.SOPInstanceUID, series_instance_uid=sr.SeriesInstanceUID,
                         study_instance_uid=sr.StudyInstanceUID, path=rel.as_posix(), model_name="test"))
    finally:
        db.dispose()


@contextmanager
def _viewer(via: str, tmp_path: Path, images: list[Path], sr: Path) -> Iterator[tuple[OhifServer, str]]:
    """OHIF with the images and the SR behind it, ``via`` Orthanc or the node; yields the viewer
    and what its URL needs besides the study (the node's token)."""
    port = free_port()
    if via == "orthanc":
        orthanc = start_orthanc(tmp_path / "orthanc", {})
        try:
            for path in images + [sr]:
                orthanc.upload(path)
            with OhifServer(DIST, orthanc.url, port) as server:
                yield server, ""
        finally:
            orthanc.stop()
        return
    node = serve_in_process(tmp_path / "node", cors_origins=(f"http://127.0.0.1:{port}",))
    try:
        _stow(node.root, images)
        _as_the_nodes_report(node.storage_dir, node.db_path, sr)
        with OhifServer(DIST, node.url, port, direct=True) as server:
            yield server, f"&token={TOKEN}"
    finally:
        node.server.stop()
    unauthorized = node.audit("web.unauthorized")
    assert not unauthorized, unauthorized[:3]  # every request OHIF made carried the token


def test_cxr_region_in_ohif(tools, tmp_path, via):
    source = pydicom.dcmread(CXR, stop_before_pixels=True)
    result = _make_result([source], "{}", test_model=False)
    region = region_for([400, 100, 700, 450], None, [PadTransform.for_shape(int(source.Rows), int(source.Columns))])
    result.structured = StructuredFindings(
        findings=(Finding("pleural_effusion", "Right pleural effusion.", "right lower lobe", 42.0, region),),
        impression="Right pleural effusion.", triage="abnormal")
    sr = write_report(build_measurement_report([source], result, node=_node()), tmp_path / "sr.dcm")
    label = "cxr" if via == "orthanc" else f"cxr-{via}"
    with _viewer(via, tmp_path, [CXR], sr) as (server, query):
        shown = _drive(tools, server.origin, str(source.StudyInstanceUID), label, tmp_path, query)
    report = json.dumps(shown, indent=1, ensure_ascii=False)[:4000]
    assert shown["ok"], report  # an SVG annotation (the SCOORD rectangle) is drawn
    assert "SR image painted" in shown["steps"], report  # on the referenced image, painted
    # OHIF labels a TID 1410 region with its NUM and finding site (code meanings)
    assert any("Diameter: 42.00 mm" in t and "Lower lobe of lung" in t for t in shown["svgText"]), report


def test_cxr_with_a_compared_prior_in_ohif(tools, tmp_path, via):
    """The SR of issue 17: a prior of another study (RG1_UNCR's, not in the PACS here) as Pertinent
    Other Evidence, a coded change in the finding and the comparison container: OHIF still opens
    it, draws the region on the current image and labels it as before."""
    source = pydicom.dcmread(CXR, stop_before_pixels=True)
    prior = pydicom.dcmread(CXR_RG1, stop_before_pixels=True)
    result = _make_result([source], "{}", test_model=False)
    region = region_for([400, 100, 700, 450], None, [PadTransform.for_shape(int(source.Rows), int(source.Columns))])
    result.structured = StructuredFindings(
        findings=(Finding("pleural_effusion", "Right pleural effusion.", "right lower lobe", 42.0, region,
                          change="worsened"),),
        impression="Right pleural effusion.", triage="abnormal", comparison="The effusion has increased.")
    result.comparison = Comparison(status="compared", prior_study_instance_uid=prior.StudyInstanceUID,
                                   prior_series_instance_uid=prior.SeriesInstanceUID, prior_study_date="20040826",
                                   interval_days=30, source="local",
                                   prior_sources=[SourceImageRef(prior.SOPClassUID, prior.SOPInstanceUID)])
    built = build_measurement_report([source], result, node=_node())
    assert "PertinentOtherEvidenceSequence" in built
    sr = write_report(built, tmp_path / "sr.dcm")
    label = "cxr-prior" if via == "orthanc" else f"cxr-prior-{via}"
    with _viewer(via, tmp_path, [CXR], sr) as (server, query):
        shown = _drive(tools, server.origin, str(source.StudyInstanceUID), label, tmp_path, query)
    report = json.dumps(shown, indent=1, ensure_ascii=False)[:4000]
    assert shown["ok"], report
    assert "SR image painted" in shown["steps"], report
    assert any("Diameter: 42.00 mm" in t and "Lower lobe of lung" in t for t in shown["svgText"]), report


#: 20 consecutive slices (instance numbers 60..79, 2.5 mm apart) of the 133-slice LIDC chest CT:
#: enough of a stack to show that OHIF jumps to the referenced slice, small enough to upload fast.
CT_FIRST, CT_COUNT, CT_REGION_INDEX = 60, 20, 9


def test_ct_region_on_its_slice_in_ohif(tools, tmp_path, via):
    headers = {}
    for path in CT_SERIES.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if CT_FIRST <= int(ds.InstanceNumber) < CT_FIRST + CT_COUNT:
            headers[int(ds.InstanceNumber)] = (path, ds)
    assert sorted(headers) == list(range(CT_FIRST, CT_FIRST + CT_COUNT))
    paths = [headers[n][0] for n in sorted(headers)]
    series = [headers[n][1] for n in sorted(headers)]
    target = series[CT_REGION_INDEX]
    result = _make_result(series, "{}", test_model=False)
    result.structured = StructuredFindings(
        # around the round opacity in the anterior right lung on that slice (rows, columns in pixels)
        findings=(Finding("mass", "Mass right middle lobe.", "right middle lobe", 30.0,
                          ImageRegion(CT_REGION_INDEX, (0, 0, 0, 0), 185.0, 137.0, 245.0, 197.0)),),
        impression="Right middle lobe mass.", triage="abnormal")
    sr = write_report(build_measurement_report(series, result, node=_node()), tmp_path / "sr.dcm")
    label = "ct" if via == "orthanc" else f"ct-{via}"
    with _viewer(via, tmp_path, paths, sr) as (server, query):
        shown = _drive(tools, server.origin, str(target.StudyInstanceUID), label, tmp_path, query)
    report = json.dumps(shown, indent=1, ensure_ascii=False)[:4000]
    assert shown["ok"], report  # the SCOORD rectangle is drawn as an SVG annotation
    assert "SR image painted" in shown["steps"], report
    # the SR viewport shows the referenced slice of the 20, not the first one
    on_target = [v for v in shown["viewports"] if v["sopInstanceUID"] == str(target.SOPInstanceUID)]
    assert on_target, report
    assert on_target[0]["instanceNumber"] == int(target.InstanceNumber) == CT_FIRST + CT_REGION_INDEX, report
    assert on_target[0]["count"] == CT_COUNT, report
    # the overlay reads "I:69 (10/20)": instance number, then position in the stack
    assert f"I:{CT_FIRST + CT_REGION_INDEX} ({CT_REGION_INDEX + 1}/{CT_COUNT})" in shown["overlay"], report
    assert any("Diameter: 30.00 mm" in t and "Middle lobe of right lung" in t for t in shown["svgText"]), report
