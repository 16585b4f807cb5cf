"""The node as a subprocess with ``[web]``: STOW-RS in, the SR out by QIDO/WADO and to Orthanc.

Real peers only: ``scp-node serve`` with the tiny test model, dicomweb-client as the DICOMweb
client, Orthanc with its DICOMweb plugin as the STOW-RS export destination.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from scp_node.web import token_sha256
from tests.support.net import free_port, wait_for
from tests.support.node import NodeProcess, start_node, write_config
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.paths import CT_DIR, CXR, need_data
from tests.web.conftest import TOKEN

pytestmark = pytest.mark.integration

ANY_TS = (("application/dicom", "*"),)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    o = start_orthanc(tmp_path / "orthanc", {})
    yield o
    o.stop()


def _start(tmp_path: Path, model: Path, *, stable: float = 1.0,
           destinations: list[dict[str, object]] = ()) -> tuple[NodeProcess, str]:
    folder = tmp_path / "node"
    folder.mkdir()
    web_port = free_port()
    extra = f'\n[web]\nhost = "127.0.0.1"\nport = {web_port}\ntoken_sha256 = ["{token_sha256(TOKEN)}"]\n'
    config = write_config(folder, model_dir=model, stable_seconds=stable, destinations=list(destinations),
                          extra=extra)
    node = start_node(config, web_port)  # returns once the DICOMweb port listens
    return node, f"http://127.0.0.1:{web_port}/dicom-web"


def _client(root: str) -> DICOMwebClient:
    c = DICOMwebClient(root, headers={"Authorization": f"Bearer {TOKEN}"})
    c.set_http_retry_params(retry=False)
    return c


def _audit(node: NodeProcess) -> list[tuple[str, str, str]]:
    with sqlite3.connect(node.config.parent / "index.db") as con:
        return con.execute("select event, outcome, detail from audit_events order by id").fetchall()


def test_stow_cxr_sr_by_qido_wado_and_stow_export_to_orthanc(tmp_path: Path, test_model_dir: Path,
                                                             pacs: Orthanc) -> None:
    cxr = need_data(CXR / "RG1_UNCR.dcm")
    node, root = _start(tmp_path, test_model_dir, destinations=[
        {"name": "pacs-web", "kind": "dicomweb", "url": f"{pacs.url}/dicom-web"}])
    try:
        c = _client(root)
        src = pydicom.dcmread(cxr)
        rsp = c.store_instances([src])
        assert rsp.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        (study,) = c.search_for_studies(search_filters={"PatientID": src.PatientID})
        assert Dataset.from_json(study).StudyInstanceUID == src.StudyInstanceUID

        def sr_series() -> list[dict]:
            failed = [d for e, _, d in _audit(node) if e == "analysis.failed" and "(final)" in d]
            assert not failed, f"the analysis failed, so no SR can appear: {failed[0][:300]}"
            return c.search_for_series(src.StudyInstanceUID, search_filters={"Modality": "SR"})

        (sr_se,) = wait_for(sr_series, 240, interval=1.0, what="the SR in QIDO")
        sr_series_uid = Dataset.from_json(sr_se).SeriesInstanceUID
        (sr_inst,) = c.search_for_instances(src.StudyInstanceUID, sr_series_uid)
        sr_uid = Dataset.from_json(sr_inst).SOPInstanceUID
        assert sr_uid in {Dataset.from_json(i).SOPInstanceUID for i in c.search_for_instances()}
        stored = node.config.parent / "storage" / src.StudyInstanceUID / sr_series_uid / f"{sr_uid}.dcm"
        url = f"{root}/studies/{src.StudyInstanceUID}/series/{sr_series_uid}/instances/{sr_uid}"
        got = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom"},
                           timeout=60)
        assert got.status_code == 200 and got.content == stored.read_bytes()
        sr = c.retrieve_instance(src.StudyInstanceUID, sr_series_uid, sr_uid, media_types=ANY_TS)
        assert sr.Modality == "SR" and sr.StudyInstanceUID == src.StudyInstanceUID
        meta = Dataset.from_json(c.retrieve_instance_metadata(src.StudyInstanceUID, sr_series_uid, sr_uid))
        assert meta.SOPInstanceUID == sr_uid and meta.ContentSequence

        # Orthanc received the SR by STOW-RS.
        def orthanc_sr() -> list[dict]:
            found = pacs.request("POST", "/tools/lookup", src.StudyInstanceUID.encode())
            studies = [f["ID"] for f in found if f["Type"] == "Study"]
            return [s for sid in studies for s in pacs.series_of_study(sid)
                    if s["MainDicomTags"].get("SeriesInstanceUID") == sr_series_uid]

        (pacs_sr,) = wait_for(orthanc_sr, 60, interval=1.0, what="the SR in Orthanc")
        assert pacs_sr["MainDicomTags"]["Modality"] == "SR"

        # Refusals: each gets its status and an audit row, and the node keeps serving.
        ctype = 'multipart/related; type="application/dicom"; boundary=b'
        auth = {"Authorization": f"Bearer {TOKEN}"}
        bad = requests.post(f"{root}/studies", data=b"--b\r\n\r\nno end", timeout=30,
                            headers=dict(auth, **{"Content-Type": ctype}))
        assert bad.status_code == 400
        junk = requests.post(f"{root}/studies", data=b"--b\r\nContent-Type: application/dicom\r\n\r\nnot dicom"
                             b"\r\n--b--\r\n", headers=dict(auth, **{"Content-Type": ctype}), timeout=30)
        assert junk.status_code == 409
        assert Dataset.from_json(junk.json()).FailedSOPSequence[0].FailureReason == 0xC000
        assert requests.get(f"{root}/studies", timeout=30).status_code == 401
        assert len(c.search_for_studies()) == 1
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    events = _audit(node)
    names = [e for e, _, _ in events]
    for name in ("stow.received", "instance.stored", "series.complete", "analysis.finished", "sr.created",
                 "export.ok", "stow.refused", "instance.rejected", "web.unauthorized"):
        assert name in names, name
    assert any(e == "export.ok" and "pacs-web" in d for e, _, d in events)
    assert any(e == "stow.refused" and "HTTP 400" in d for e, _, d in events)
    assert any(e == "instance.rejected" and "0xC000" in d for e, _, d in events)
    pid = str(pydicom.dcmread(cxr, stop_before_pixels=True).PatientID)
    assert not any(pid in d for _, _, d in events)
    assert TOKEN not in node.output()


def test_stow_the_133_slice_ct_and_find_it(tmp_path: Path, test_model_dir: Path) -> None:
    files = sorted(need_data(CT_DIR).glob("*.dcm"))
    assert len(files) == 133
    # A long completion window: this test is about receiving, not the 30 s CT analysis.
    node, root = _start(tmp_path, test_model_dir, stable=3600)
    try:
        c = _client(root)
        rsp = c.store_instances([pydicom.dcmread(f) for f in files])
        assert len(rsp.ReferencedSOPSequence) == 133 and "FailedSOPSequence" not in rsp
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        (study,) = c.search_for_studies(search_filters={"StudyInstanceUID": first.StudyInstanceUID})
        st = Dataset.from_json(study)
        assert st.NumberOfStudyRelatedInstances == 133 and st.ModalitiesInStudy == "CT"
        inst = c.search_for_instances(first.StudyInstanceUID, first.SeriesInstanceUID)
        assert len(inst) == 133
        storage = node.config.parent / "storage"
        for f in (files[0], files[66], files[-1]):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            got = c.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                      media_types=ANY_TS)
            assert got.SOPInstanceUID == ds.SOPInstanceUID
            assert (storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm").read_bytes() \
                == f.read_bytes()
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    assert sum(1 for e, _, _ in _audit(node) if e == "instance.stored") == 133


def test_stow_export_sender_delivers_an_sr_to_orthanc(tmp_path: Path, pacs: Orthanc) -> None:
    """The exporter on its own (the queue's retry/dead-letter is shared with C-STORE)."""
    from scp_node.config import Destination
    from scp_node.export import ExportError
    from scp_node.export.stow import send_stow

    sr_file = next(iter(sorted(need_data(CXR.parent / "sr_examples" / "highdicom").glob("*.dcm"))))
    sr = pydicom.dcmread(sr_file, stop_before_pixels=True)
    dest = Destination("pacs-web", "", "127.0.0.1", pacs.http_port, kind="dicomweb", url=f"{pacs.url}/dicom-web")
    assert send_stow(dest, sr_file, timeout=30) == 200
    found = pacs.request("POST", "/tools/lookup", str(sr.SOPInstanceUID).encode())
    assert [f["Type"] for f in found] == ["Instance"]
    with pytest.raises(ExportError, match="HTTP 404"):
        send_stow(Destination("bad", "", "127.0.0.1", pacs.http_port, kind="dicomweb", url=f"{pacs.url}/nope"),
                  sr_file, timeout=30)
