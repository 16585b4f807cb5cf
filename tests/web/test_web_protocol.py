"""STOW-RS, QIDO-RS, WADO-RS and the bearer tokens against the real app served in-process.

dicomweb-client is the client where it can express the request; ``requests`` sends what a
well-behaved client cannot (broken bodies, wrong media types, no token).
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from scp_node.export import ExportError
from scp_node.export.stow import send_stow
from scp_node.config import Destination
from tests.support.paths import CT_DIR, CXR, data_files, need_data
from tests.web.conftest import TOKEN, WebNode, serve_in_process

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ANY_TS = (("application/dicom", "*"),)


def client(node: WebNode, token: str = TOKEN) -> DICOMwebClient:
    c = DICOMwebClient(node.root, headers={"Authorization": f"Bearer {token}"})
    c.set_http_retry_params(retry=False)
    return c


def multipart(*parts: bytes, boundary: str = "xyz-boundary", part_type: str = "application/dicom") -> bytes:
    body = b"".join(b"--" + boundary.encode() + f"\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n"
                    for p in parts)
    return body + b"--" + boundary.encode() + b"--\r\n"


def post(node: WebNode, body: bytes, path: str = "/studies", headers: dict[str, str] | None = None,
         content_type: str = 'multipart/related; type="application/dicom"; boundary=xyz-boundary') -> requests.Response:
    h = dict(AUTH, **{"Content-Type": content_type})
    h.update(headers or {})
    return requests.post(node.root + path, data=body, headers=h, timeout=60)


def stored_path(node: WebNode, ds: Dataset) -> Path:
    return node.storage_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


@pytest.fixture
def cxr() -> Path:
    return need_data(CXR / "RG1_UNCR.dcm")


# -- STOW-RS ----------------------------------------------------------------------------------

def test_stow_stores_byte_identical_and_answers_referenced_sop(web_node: WebNode, cxr: Path) -> None:
    raw = cxr.read_bytes()
    rsp = post(web_node, multipart(raw))
    assert rsp.status_code == 200 and rsp.headers["content-type"] == "application/dicom+json"
    ds = Dataset.from_json(rsp.json())
    src = pydicom.dcmread(cxr, stop_before_pixels=True)
    (item,) = ds.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == src.SOPInstanceUID and item.ReferencedSOPClassUID == src.SOPClassUID
    assert item.RetrieveURL.endswith(f"/instances/{src.SOPInstanceUID}")
    assert "FailedSOPSequence" not in ds
    assert stored_path(web_node, src).read_bytes() == raw
    events = [e for e, *_ in web_node.audit()]
    assert events == ["instance.stored", "stow.received"]
    assert "via stow" in web_node.audit("instance.stored")[0][3]
    # The same instance again is an identical duplicate: still a success.
    assert client(web_node).store_instances([pydicom.dcmread(cxr)]).ReferencedSOPSequence


def test_bad_multipart_is_400_and_nothing_is_stored(web_node: WebNode, cxr: Path) -> None:
    body = multipart(cxr.read_bytes())[:-20]  # no closing boundary
    rsp = post(web_node, body)
    assert rsp.status_code == 400
    assert not web_node.audit("instance.stored")
    (row,) = web_node.audit("stow.refused")
    assert row[1] == "failure" and "HTTP 400" in row[3]
    assert post(web_node, b"", content_type='multipart/related; type="application/dicom"').status_code == 400


def test_non_dicom_part_is_409_with_failure_reason_c000(web_node: WebNode) -> None:
    rsp = post(web_node, multipart(b"this is not DICOM at all"))
    assert rsp.status_code == 409
    (item,) = Dataset.from_json(rsp.json()).FailedSOPSequence
    assert item.FailureReason == 0xC000
    (row,) = web_node.audit("instance.rejected")
    assert row[1] == "failure" and "STOW-RS 0xC000" in row[3]
    assert web_node.audit("stow.received")[0][1] == "failure"


def test_mixed_parts_are_202(web_node: WebNode, cxr: Path) -> None:
    rsp = post(web_node, multipart(cxr.read_bytes(), b"junk"))
    assert rsp.status_code == 202
    ds = Dataset.from_json(rsp.json())
    assert len(ds.ReferencedSOPSequence) == 1 and len(ds.FailedSOPSequence) == 1


def test_part_of_another_media_type_fails(web_node: WebNode, cxr: Path) -> None:
    rsp = post(web_node, multipart(cxr.read_bytes(), part_type="application/octet-stream"))
    assert rsp.status_code == 409
    assert Dataset.from_json(rsp.json()).FailedSOPSequence[0].FailureReason == 0xC000


def test_wrong_media_type_is_415(web_node: WebNode, cxr: Path) -> None:
    assert post(web_node, cxr.read_bytes(), content_type="application/dicom").status_code == 415
    assert post(web_node, b"{}", content_type='multipart/related; type="application/dicom+json"; '
                                            'boundary=xyz-boundary').status_code == 415
    assert len(web_node.audit("stow.refused")) == 2


def test_study_in_url_must_match(web_node: WebNode, cxr: Path) -> None:
    rsp = post(web_node, multipart(cxr.read_bytes()), path="/studies/1.2.3.4")
    assert rsp.status_code == 409
    assert Dataset.from_json(rsp.json()).FailedSOPSequence[0].FailureReason == 0xC409
    src = pydicom.dcmread(cxr, stop_before_pixels=True)
    rsp = post(web_node, multipart(cxr.read_bytes()), path=f"/studies/{src.StudyInstanceUID}")
    assert rsp.status_code == 200
    assert post(web_node, multipart(cxr.read_bytes()), path="/studies/..%2Fetc").status_code in (400, 404)


def test_sop_class_differing_from_file_meta_is_a900(web_node: WebNode, cxr: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(cxr)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    out = tmp_path / "x.dcm"
    ds.save_as(out)
    rsp = post(web_node, multipart(out.read_bytes()))
    assert rsp.status_code == 409
    assert Dataset.from_json(rsp.json()).FailedSOPSequence[0].FailureReason == 0xA900


def test_body_over_the_limit_is_413_with_or_without_content_length(tmp_path: Path, cxr: Path) -> None:
    node = serve_in_process(tmp_path, max_body_bytes=100_000)
    try:
        body = multipart(cxr.read_bytes())
        assert post(node, body).status_code == 413

        def chunked():  # no Content-Length: the limit is enforced on the bytes received
            for i in range(0, len(body), 65536):
                yield body[i:i + 65536]

        assert post(node, chunked()).status_code == 413  # type: ignore[arg-type]
        assert len(node.audit("stow.refused")) == 2 and not node.audit("instance.stored")
        assert post(node, multipart(b"small but not DICOM")).status_code == 409
    finally:
        node.server.stop()


# -- tokens -----------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_every_route_needs_a_valid_bearer_token(web_node: WebNode, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/studies"), ("GET", "/series"), ("GET", "/studies/1.2/metadata"),
                         ("POST", "/studies"), ("GET", "/studies/1.2/series/1.3/instances/1.4")]:
        rsp = requests.request(method, web_node.root + path, headers=headers, timeout=30)
        assert rsp.status_code == 401, (method, path)
        assert rsp.headers["www-authenticate"].startswith("Bearer")
    rows = web_node.audit("web.unauthorized")
    assert len(rows) == 5 and all(r[1] == "failure" and r[2] == "127.0.0.1" for r in rows)
    assert not any(TOKEN in r[3] or "wrong-token" in r[3] for r in rows)
    assert requests.get(web_node.root + "/studies", headers=AUTH, timeout=30).status_code == 200


# -- QIDO-RS ----------------------------------------------------------------------------------

def test_qido_matching_paging_and_includefield(web_node: WebNode, cxr: Path) -> None:
    ct_files = data_files(CT_DIR, at_least=5)[:5]
    c = client(web_node)
    c.store_instances([pydicom.dcmread(cxr)] + [pydicom.dcmread(f) for f in ct_files])
    src = pydicom.dcmread(cxr, stop_before_pixels=True)
    ct = pydicom.dcmread(ct_files[0], stop_before_pixels=True)

    def studies(**filters: object) -> list[str]:
        return [Dataset.from_json(r).StudyInstanceUID for r in c.search_for_studies(search_filters=filters)]

    assert sorted(studies()) == sorted([src.StudyInstanceUID, ct.StudyInstanceUID])
    assert studies(PatientID=src.PatientID) == [src.StudyInstanceUID]
    assert studies(PatientID=str(src.PatientID)[:2] + "*") == [src.StudyInstanceUID]
    name = str(src.PatientName)
    assert studies(PatientName=name.upper()[:3] + "*") == [src.StudyInstanceUID]  # names: case-insensitive
    assert studies(StudyDate=f"{src.StudyDate}-{src.StudyDate}") == [src.StudyInstanceUID]
    assert studies(StudyDate="-19000101") == []
    assert studies(ModalitiesInStudy="CT") == [ct.StudyInstanceUID]
    assert sorted(studies(StudyInstanceUID=f"{src.StudyInstanceUID},{ct.StudyInstanceUID}")) == \
        sorted([src.StudyInstanceUID, ct.StudyInstanceUID])
    assert studies(**{"0020000D": ct.StudyInstanceUID}) == [ct.StudyInstanceUID]
    (study,) = c.search_for_studies(search_filters={"StudyInstanceUID": ct.StudyInstanceUID})
    assert Dataset.from_json(study).NumberOfStudyRelatedInstances == 5
    # series: all, within a study, by modality
    assert {Dataset.from_json(s).Modality for s in c.search_for_series()} == {"CR", "CT"}
    (se,) = c.search_for_series(study_instance_uid=ct.StudyInstanceUID)
    assert Dataset.from_json(se).NumberOfSeriesRelatedInstances == 5
    assert c.search_for_series(search_filters={"Modality": "MR"}) == []
    # instances: paging is stable and complete
    scope = dict(study_instance_uid=ct.StudyInstanceUID, series_instance_uid=ct.SeriesInstanceUID)
    every = [Dataset.from_json(i).SOPInstanceUID for i in c.search_for_instances(**scope)]
    assert sorted(every) == sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in ct_files)
    pages = [Dataset.from_json(i).SOPInstanceUID for off in (0, 2, 4)
             for i in c.search_for_instances(**scope, limit=2, offset=off)]
    assert pages == every
    # includefield: attributes the index does not hold come from the file header
    (inst,) = c.search_for_instances(search_filters={"SOPInstanceUID": src.SOPInstanceUID},
                                     fields=["StudyTime", "00280010"])
    got = Dataset.from_json(inst)
    assert got.StudyTime == src.StudyTime and got.Rows == src.Rows and "PixelData" not in got
    # a key we cannot match is reported, not silently ignored
    rsp = requests.get(web_node.root + "/studies?StudyTime=1200", headers=AUTH, timeout=30)
    assert rsp.status_code == 200 and "matching not supported" in rsp.headers["warning"]
    assert requests.get(web_node.root + "/studies?limit=x", headers=AUTH, timeout=30).status_code == 400
    assert requests.get(web_node.root + "/studies?NoSuchKeyword=1", headers=AUTH, timeout=30).status_code == 400


# -- WADO-RS ----------------------------------------------------------------------------------

def test_wado_returns_the_stored_bytes(web_node: WebNode, cxr: Path) -> None:
    raw = cxr.read_bytes()
    c = client(web_node)
    c.store_instances([pydicom.dcmread(cxr)])
    src = pydicom.dcmread(cxr, stop_before_pixels=True)
    uids = (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
    url = web_node.root + "/studies/{}/series/{}/instances/{}".format(*uids)
    single = requests.get(url, headers=dict(AUTH, Accept="application/dicom; transfer-syntax=*"), timeout=60)
    assert single.status_code == 200 and single.content == raw
    multi = requests.get(url, headers=dict(AUTH, Accept='multipart/related; type="application/dicom"'), timeout=60)
    assert multi.status_code == 200 and raw in multi.content
    assert pydicom.dcmread(io.BytesIO(raw)).SOPInstanceUID == src.SOPInstanceUID
    (ds,) = c.retrieve_series(*uids[:2], media_types=ANY_TS)
    assert ds.SOPInstanceUID == src.SOPInstanceUID
    assert c.retrieve_instance(*uids, media_types=ANY_TS).SOPInstanceUID == src.SOPInstanceUID
    meta = c.retrieve_instance_metadata(*uids)
    assert meta["00080018"]["Value"] == [src.SOPInstanceUID]
    # The pixels by reference (dicomweb-client sends Host without the port: the URL has none either).
    assert meta["7FE00010"]["vr"] == "OW" and meta["7FE00010"]["BulkDataURI"].endswith(
        url.split("/dicom-web", 1)[1] + "/bulkdata/7FE00010")
    assert len(c.retrieve_study_metadata(src.StudyInstanceUID)) == 1
    # No transcoding: another transfer syntax is 406, an unknown instance 404.
    other = "1.2.840.10008.1.2.4.50" if src.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.4.50" else "1.2.840.10008.1.2"
    rsp = requests.get(url, headers=dict(AUTH, Accept=f'multipart/related; type="application/dicom"; '
                                                      f'transfer-syntax={other}'), timeout=60)
    assert rsp.status_code == 406
    assert requests.get(web_node.root + "/studies/1.2.3", headers=AUTH, timeout=30).status_code == 404


# -- TLS and the STOW-RS exporter ----------------------------------------------------------------

def test_tls_and_export_by_stow_with_a_token(tmp_path: Path, cxr: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    node = serve_in_process(tmp_path / "n", tls=(str(cert), str(key)))
    try:
        assert node.url.startswith("https://")
        rsp = requests.get(node.root + "/studies", headers=AUTH, verify=str(cert), timeout=30)
        assert rsp.status_code == 200 and rsp.json() == []
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(node.root + "/studies", headers=AUTH, timeout=30)  # untrusted cert refused
    finally:
        node.server.stop()
    plain = serve_in_process(tmp_path / "p")
    try:
        dest = Destination("web", "", "127.0.0.1", 0, kind="dicomweb", url=plain.root, token=TOKEN)
        assert send_stow(dest, cxr, timeout=30) == 200
        assert plain.audit("instance.stored")
        with pytest.raises(ExportError, match="HTTP 401") as exc:
            send_stow(Destination("web", "", "127.0.0.1", 0, kind="dicomweb", url=plain.root, token="nope"), cxr)
        assert "nope" not in str(exc.value) and "nope" not in repr(dest)
        with pytest.raises(ExportError, match="cannot reach"):
            send_stow(Destination("gone", "", "127.0.0.1", 9, kind="dicomweb", url="http://127.0.0.1:9/dw"), cxr,
                      timeout=5)
    finally:
        plain.server.stop()


# -- the node's own SRs -------------------------------------------------------------------------

def test_the_nodes_sr_is_found_by_qido_and_served_byte_identical(web_node: WebNode, cxr: Path,
                                                                 tmp_path: Path) -> None:
    """A row in ``reports`` (as the analysis queue writes it) is visible like a received instance."""
    from scp_node.store.db import Database
    from scp_node.store.models import AnalysisJob, Report, Series

    c = client(web_node)
    c.store_instances([pydicom.dcmread(cxr)])
    src = pydicom.dcmread(cxr, stop_before_pixels=True)
    sr = Dataset()
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID = pydicom.uid.generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID = src.StudyInstanceUID, pydicom.uid.generate_uid()
    sr.Modality, sr.SeriesNumber, sr.InstanceNumber, sr.PatientID = "SR", 9901, 1, src.PatientID
    rel = Path(sr.StudyInstanceUID, sr.SeriesInstanceUID, f"{sr.SOPInstanceUID}.dcm")
    (web_node.storage_dir / rel).parent.mkdir(parents=True)
    sr.save_as(web_node.storage_dir / rel, enforce_file_format=True)
    db = Database(f"sqlite:///{web_node.db_path}")
    try:
        with db.session() as s:
            series = s.query(Series).one()
            job = AnalysisJob(series=series, series_version=1)
            s.add(Report(job=job, sop_instance_uid=sr.SOPInstanceUID, series_instance_uid=sr.SeriesInstanceUID,
                         study_instance_uid=sr.StudyInstanceUID, path=rel.as_posix(), model_name="t"))
    finally:
        db.dispose()
    (study,) = c.search_for_studies()
    st = Dataset.from_json(study)
    assert st.ModalitiesInStudy == ["CR", "SR"] and st.NumberOfStudyRelatedInstances == 2
    (se,) = c.search_for_series(search_filters={"Modality": "SR"})
    assert Dataset.from_json(se).SeriesNumber == 9901
    (inst,) = c.search_for_instances(src.StudyInstanceUID, sr.SeriesInstanceUID)
    assert Dataset.from_json(inst).SOPClassUID == sr.SOPClassUID
    url = f"{web_node.root}/studies/{sr.StudyInstanceUID}/series/{sr.SeriesInstanceUID}/instances/{sr.SOPInstanceUID}"
    got = requests.get(url, headers=dict(AUTH, Accept="application/dicom"), timeout=30)
    assert got.content == (web_node.storage_dir / rel).read_bytes()
    assert len(c.retrieve_study(src.StudyInstanceUID, media_types=ANY_TS)) == 2
    assert Dataset.from_json(c.retrieve_series_metadata(src.StudyInstanceUID, sr.SeriesInstanceUID)[0]).Modality == "SR"
