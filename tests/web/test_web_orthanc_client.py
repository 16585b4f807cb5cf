"""Orthanc's DICOMweb plugin as the node's client, as a hospital sets it up.

Orthanc (1.10, DICOMweb plugin 1.7) is told about the node as a DICOMweb server with the bearer
token in its ``HttpHeaders`` (``PUT /dicom-web/servers/NODE``), then: the whole 133-slice CT
series goes to the node by ``/stow`` (chunked, a 73-character boundary, a Content-Length per
part), the node analyses it and makes its SR, ``/qido`` finds the study, the CT and the SR, and
``/retrieve`` brings the study with the SR into a second Orthanc by WADO-RS.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest

from scp_node.web import token_sha256
from tests.support.net import free_port, wait_for
from tests.support.node import NodeProcess, start_node, write_config
from tests.support.orthanc import DICOMWEB_PLUGIN, Orthanc, start_orthanc
from tests.support.paths import CT_DIR, need_data, tool
from tests.web.conftest import TOKEN

pytestmark = pytest.mark.integration


@pytest.fixture
def two_orthancs(tmp_path: Path) -> Iterator[tuple[Orthanc, Orthanc]]:
    tool("Orthanc")
    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip("orthanc-dicomweb not installed")
    a = start_orthanc(tmp_path / "orthanc-a", {})
    try:
        b = start_orthanc(tmp_path / "orthanc-b", {}, aet="ORTHANCB")
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def _audit(node: NodeProcess) -> list[tuple[str, str, str]]:
    with sqlite3.connect(node.config.parent / "index.db") as con:
        return con.execute("select event, outcome, detail from audit_events order by id").fetchall()


def _value(obj: dict[str, Any], tag: str) -> str:
    """A value from Orthanc's ``/qido`` answer (its own JSON: ``{"Name", "vr", "Value": "a\\b"}``)."""
    return str(obj.get(tag, {}).get("Value", ""))


def test_orthanc_stows_a_ct_series_queries_and_retrieves_it_with_the_sr(
        tmp_path: Path, test_model_dir: Path, two_orthancs: tuple[Orthanc, Orthanc]) -> None:
    a, b = two_orthancs
    files = sorted(need_data(CT_DIR).glob("*.dcm"))
    assert len(files) == 133
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)

    folder = tmp_path / "node"
    folder.mkdir()
    web_port = free_port()
    extra = f'\n[web]\nhost = "127.0.0.1"\nport = {web_port}\ntoken_sha256 = ["{token_sha256(TOKEN)}"]\n'
    # 5 s without a new slice completes the series (Orthanc may send it in more than one request)
    config = write_config(folder, model_dir=test_model_dir, stable_seconds=5.0, extra=extra)
    node = start_node(config, web_port)
    timings: dict[str, float] = {}
    try:
        for o in (a, b):
            o.request("PUT", "/dicom-web/servers/NODE", {
                "Url": f"http://127.0.0.1:{web_port}/dicom-web/",
                "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}})
        for f in files:
            a.upload(f)
        (orthanc_study,) = [x["ID"] for x in a.request("POST", "/tools/lookup", study_uid.encode())
                            if x["Type"] == "Study"]

        # STOW-RS: the whole series, in Orthanc's way of sending it
        start = time.monotonic()
        a.request("POST", "/dicom-web/servers/NODE/stow", {"Resources": [orthanc_study], "Synchronous": True},
                  timeout=600)
        timings["stow"] = time.monotonic() - start
        stored = node.config.parent / "storage" / study_uid / series_uid
        assert sorted(p.name for p in stored.glob("*.dcm")) == sorted(
            f"{pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm" for f in files)
        for f in (files[0], files[66], files[-1]):  # byte for byte as Orthanc had them
            sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            assert (stored / f"{sop}.dcm").read_bytes() == f.read_bytes()

        # analysed: the SR appears, found through Orthanc's QIDO-RS client
        def sr_series() -> list[dict[str, Any]]:
            failed = [d for e, _, d in _audit(node) if e == "analysis.failed" and "(final)" in d]
            assert not failed, f"the analysis failed, so no SR can appear: {failed[0][:300]}"
            return a.request("POST", "/dicom-web/servers/NODE/qido", {
                "Uri": f"/studies/{study_uid}/series", "Arguments": {"Modality": "SR"}})

        start = time.monotonic()
        (sr,) = wait_for(sr_series, 600, interval=2.0, what="the node's SR, by Orthanc's QIDO-RS")
        timings["analysis"] = time.monotonic() - start
        sr_series_uid = _value(sr, "0020000E")
        (study,) = a.request("POST", "/dicom-web/servers/NODE/qido", {
            "Uri": "/studies", "Arguments": {"PatientID": str(first.PatientID)}})
        assert _value(study, "0020000D") == study_uid
        # (Orthanc's /qido answer keeps the first value of a multi-valued attribute and drops numbers,
        # so ModalitiesInStudy and the counts are checked by series and by instance instead.)
        every = a.request("POST", "/dicom-web/servers/NODE/qido", {"Uri": f"/studies/{study_uid}/series",
                                                                   "Arguments": {}})
        assert sorted(_value(se, "00080060") for se in every) == ["CT", "SR"]
        ct = a.request("POST", "/dicom-web/servers/NODE/qido", {
            "Uri": f"/studies/{study_uid}/series/{series_uid}/instances", "Arguments": {}})
        assert len(ct) == 133

        # WADO-RS: the study (CT and SR) into the second Orthanc
        start = time.monotonic()
        b.request("POST", "/dicom-web/servers/NODE/retrieve", {"Resources": [{"Study": study_uid}]}, timeout=600)
        timings["retrieve"] = time.monotonic() - start
        (b_study,) = [x["ID"] for x in b.request("POST", "/tools/lookup", study_uid.encode()) if x["Type"] == "Study"]
        by_series = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in b.series_of_study(b_study)}
        assert len(by_series[series_uid]["Instances"]) == 133
        assert by_series[sr_series_uid]["MainDicomTags"]["Modality"] == "SR"
        (b_sr,) = by_series[sr_series_uid]["Instances"]
        sr_file = next(node.config.parent.joinpath("storage", study_uid, sr_series_uid).glob("*.dcm"))
        assert b.request("GET", f"/instances/{b_sr}/file") == sr_file.read_bytes()  # the node's SR, unchanged
    finally:
        assert node.stop() == 0, node.output()[-3000:]
        print(f"Orthanc -> node: {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}")
    events = _audit(node)
    assert not [d for e, _, d in events if e in ("stow.refused", "instance.rejected", "web.unauthorized")]
    assert sum(1 for e, _, _ in events if e == "instance.stored") == 133
    assert any(e == "stow.received" and "133 stored, 0 failed" in d for e, _, d in events) or \
        sum(int(d.split(" stored")[0]) for e, _, d in events if e == "stow.received") == 133
    assert "sr.created" in {e for e, _, _ in events}
    assert TOKEN not in node.output()
