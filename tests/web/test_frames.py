"""What OHIF's DICOMweb data source needs from the node: frames, bulk data, metadata, QIDO, CORS.

Frames are checked against pydicom on the same files, for every transfer syntax of the
cornerstone CT matrix (one image in 16 syntaxes) and multi-frame images: a compressed frame is
the stored bytes of that frame, an uncompressed one the little-endian pixel bytes, a decoded one
the pixel values pydicom decodes; what cannot be given in an accepted syntax is 406.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
import pytest
import requests
from pydicom.encaps import get_frame
from pydicom.uid import generate_uid

from scp_node.config import load
from scp_node.web import WebStartError, create_app
from scp_node.web.frames import Offer, negotiate
from scp_node.web.media import parse_accept
from tests.support.paths import CT_DIR, DATA, data_files, need_data
from tests.web.conftest import TOKEN, WebNode, serve_in_process
from tests.web.test_web_protocol import multipart, post

AUTH = {"Authorization": f"Bearer {TOKEN}"}
OHIF = "multipart/related; type=application/octet-stream; transfer-syntax=*"  # OHIF 3.13's frame request
ONLY_NATIVE = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'
MATRIX = DATA / "ts_matrix" / "cornerstone_ct"
MULTIFRAME = DATA / "multiframe" / "pydicom_data"
LE, ILE, BE, JLS, J2K, JPEG = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
                               "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50")
LOSSLESS = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.5"}
NO_DECODER = {"1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"}  # retired JPEG processes


# -- negotiation --------------------------------------------------------------------------------

@pytest.mark.parametrize("accept, stored, decodable, single, expected", [
    (OHIF, J2K, True, False, Offer(J2K, "application/octet-stream", False, True)),
    (OHIF, LE, True, False, Offer(LE, "application/octet-stream", False, True)),
    (OHIF, BE, True, False, Offer(LE, "application/octet-stream", False, True)),  # swapped to little endian
    (OHIF, ILE, True, False, Offer(LE, "application/octet-stream", False, True)),
    (ONLY_NATIVE, J2K, True, False, Offer(LE, "application/octet-stream", True, True)),  # decoded
    (ONLY_NATIVE, J2K, False, False, None),  # a YBR colour frame is not decoded: 406
    ("multipart/related; type=application/octet-stream", JLS, True, False,
     Offer(LE, "application/octet-stream", True, True)),  # no transfer-syntax: Explicit VR LE
    ("multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2", J2K, True, False,
     Offer(ILE, "application/octet-stream", True, True)),
    ('multipart/related; type="image/jls"', JLS, True, False, Offer(JLS, "image/jls", False, True)),
    ('multipart/related; type="image/jls"; transfer-syntax=*', JLS, True, False, Offer(JLS, "image/jls", False, True)),
    ('multipart/related; type="image/jpeg"', JLS, True, False, None),  # never relabelled
    ('multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50', JPEG, False, False,
     Offer(JPEG, "image/jpeg", False, True)),
    (f'multipart/related; type="application/octet-stream"; transfer-syntax={J2K}', JLS, True, False, None),
    (f'multipart/related; type="application/octet-stream"; transfer-syntax={J2K}', J2K, True, False,
     Offer(J2K, "application/octet-stream", False, True)),
    ("*/*", J2K, True, False, Offer(J2K, "image/jp2", False, True)),
    ("", LE, True, False, Offer(LE, "application/octet-stream", False, True)),
    ("application/octet-stream", LE, True, True, Offer(LE, "application/octet-stream", False, False)),
    ("application/octet-stream", LE, True, False, None),  # single part: one frame only
    ('multipart/related; type="application/dicom"', LE, True, False, None),
    (f"{ONLY_NATIVE}; q=0.5, multipart/related; type=image/jls", JLS, True, False,
     Offer(JLS, "image/jls", False, True)),  # q order
])
def test_negotiation(accept: str, stored: str, decodable: bool, single: bool, expected: Offer | None) -> None:
    assert negotiate(parse_accept(accept), stored, decodable, single) == expected


# -- frames over HTTP ---------------------------------------------------------------------------

def _parts(rsp: requests.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related response, framing checked."""
    ctype = rsp.headers["content-type"]
    assert ctype.startswith("multipart/related"), ctype
    boundary = ctype.split("boundary=")[1].split(";")[0].strip('"').encode()
    body = rsp.content
    assert body.startswith(b"--" + boundary + b"\r\n") and body.endswith(b"\r\n--" + boundary + b"--\r\n")
    out = []
    for chunk in body[len(boundary) + 4:-(len(boundary) + 8)].split(b"\r\n--" + boundary + b"\r\n"):
        head, _, data = chunk.partition(b"\r\n\r\n")
        (line,) = head.decode().split("\r\n")
        name, _, value = line.partition(": ")
        assert name.lower() == "content-type"
        out.append((value, data))
    return out


def _stow_copies(node: WebNode, files: list[Path], tmp: Path) -> dict[str, tuple[Path, str]]:
    """STOW each file as its own instance (the matrix shares SOP Instance UIDs): ts -> (file, url)."""
    out, bodies = {}, []
    for f in files:
        ds = pydicom.dcmread(f)
        ts = str(ds.file_meta.TransferSyntaxUID)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copy = tmp / f"{ts}.dcm"
        ds.save_as(copy)
        bodies.append(copy.read_bytes())
        out[ts] = (copy, f"{node.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                         f"/instances/{ds.SOPInstanceUID}")
    rsp = post(node, multipart(*bodies))
    assert rsp.status_code == 200, rsp.text[:500]
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebNode, dict[str, tuple[Path, str]]]]:
    files = [f for f in sorted(need_data(MATRIX).glob("*.dcm")) if f.name != "CTImage.dcm"]
    tmp = tmp_path_factory.mktemp("matrix")
    node = serve_in_process(tmp / "node")
    try:
        yield node, _stow_copies(node, files, tmp)
    finally:
        node.server.stop()


def _reference() -> np.ndarray:
    return pydicom.dcmread(need_data(MATRIX) / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
                           ).pixel_array


def test_ohifs_request_gets_each_stored_frame_unchanged(matrix) -> None:  # type: ignore[no-untyped-def]
    node, copies = matrix
    assert len(copies) == 15
    reference = _reference().astype("<i2").tobytes()
    for ts, (path, url) in copies.items():
        rsp = requests.get(url + "/frames/1", headers=dict(AUTH, Accept=OHIF), timeout=60)
        assert rsp.status_code == 200, (ts, rsp.text[:300])
        ((ctype, body),) = _parts(rsp)
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            assert ctype == f"application/octet-stream; transfer-syntax={ts}", ts
            assert body == get_frame(ds.PixelData, 0, number_of_frames=1), ts  # the stored bytes
        else:  # implicit, explicit, deflated little endian and big endian: little-endian pixel bytes
            assert ctype == f"application/octet-stream; transfer-syntax={LE}", ts
            assert body == reference, ts


def test_a_client_that_takes_only_uncompressed_gets_decoded_pixels(matrix) -> None:  # type: ignore[no-untyped-def]
    node, copies = matrix
    reference = _reference()
    for ts, (path, url) in copies.items():
        rsp = requests.get(url + "/frames/1", headers=dict(AUTH, Accept=ONLY_NATIVE), timeout=60)
        if ts in NO_DECODER:
            assert rsp.status_code == 406, ts  # never bytes in another syntax than the label
            continue
        assert rsp.status_code == 200, (ts, rsp.text[:300])
        ((ctype, body),) = _parts(rsp)
        assert ctype == f"application/octet-stream; transfer-syntax={LE}", ts
        expected = pydicom.dcmread(path).pixel_array
        got = np.frombuffer(body, expected.dtype.newbyteorder("<")).reshape(expected.shape)
        assert np.array_equal(got, expected), ts
        if ts in LOSSLESS:
            assert np.array_equal(got, reference), ts


def test_media_types_of_compressed_frames(matrix) -> None:  # type: ignore[no-untyped-def]
    node, copies = matrix
    jls_path, jls_url = copies[JLS]
    rsp = requests.get(jls_url + "/frames/1", headers=dict(AUTH, Accept='multipart/related; type="image/jls"'),
                       timeout=60)
    ((ctype, body),) = _parts(rsp)
    assert ctype == f"image/jls; transfer-syntax={JLS}"
    assert body == get_frame(pydicom.dcmread(jls_path).PixelData, 0, number_of_frames=1)
    rsp = requests.get(jls_url + "/frames/1", headers=dict(AUTH, Accept='multipart/related; type="image/jpeg"'),
                       timeout=60)
    assert rsp.status_code == 406
    # a single part for one frame when the client asks for one
    rsp = requests.get(copies[LE][1] + "/frames/1", headers=dict(AUTH, Accept="application/octet-stream"),
                       timeout=60)
    assert rsp.status_code == 200 and rsp.headers["content-type"] == f"application/octet-stream; transfer-syntax={LE}"
    assert rsp.content == _reference().astype("<i2").tobytes()


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
                                  "emri_small_jpeg_ls_lossless.dcm"])
def test_frames_of_a_multiframe_image(web_node: WebNode, name: str) -> None:
    path = need_data(MULTIFRAME / name)
    assert post(web_node, multipart(path.read_bytes())).status_code == 200
    ds = pydicom.dcmread(path)
    url = f"{web_node.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    everything = pydicom.dcmread(need_data(MULTIFRAME / "emri_small.dcm")).pixel_array  # (10, 64, 64)
    for accept in (OHIF, ONLY_NATIVE):
        rsp = requests.get(url + "/frames/2,10,5", headers=dict(AUTH, Accept=accept), timeout=60)
        assert rsp.status_code == 200, rsp.text[:300]
        parts = _parts(rsp)
        assert len(parts) == 3
        for (ctype, body), n in zip(parts, (2, 10, 5)):
            ts = ctype.split("transfer-syntax=")[1]
            if ts == LE:
                assert np.array_equal(np.frombuffer(body, "<u2").reshape(64, 64), everything[n - 1])
            else:
                assert ts == ds.file_meta.TransferSyntaxUID and accept == OHIF
                assert body == get_frame(ds.PixelData, n - 1, number_of_frames=10)
    repeated = requests.get(url + "/frames/" + ",".join(["3"] * 10), headers=dict(AUTH, Accept=OHIF), timeout=60)
    assert repeated.status_code == 200 and len(_parts(repeated)) == 10
    for bad, status in (("11", 404), ("0", 400), ("1,x", 400), ("1;2", 400), ("-1", 400),
                        (",".join(["3"] * 11), 400)):  # never more than the instance holds
        assert requests.get(f"{url}/frames/{bad}", headers=AUTH, timeout=30).status_code == status, bad


def test_a_ybr_colour_frame_is_served_as_stored_but_not_decoded(web_node: WebNode) -> None:
    path = need_data(DATA / "multiframe" / "pydicom" / "examples_ybr_color.dcm")
    assert post(web_node, multipart(path.read_bytes())).status_code == 200
    ds = pydicom.dcmread(path)
    url = f"{web_node.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    ((ctype, body),) = _parts(requests.get(url + "/frames/30", headers=dict(AUTH, Accept=OHIF), timeout=60))
    assert ctype.endswith(f"transfer-syntax={JPEG}") and body == get_frame(ds.PixelData, 29, number_of_frames=30)
    assert requests.get(url + "/frames/1", headers=dict(AUTH, Accept=ONLY_NATIVE), timeout=60).status_code == 406


def test_frames_of_an_instance_without_pixels_is_404(web_node: WebNode) -> None:
    sr = next(iter(sorted(need_data(DATA / "sr_examples").rglob("*.dcm"))))
    assert post(web_node, multipart(sr.read_bytes())).status_code == 200
    ds = pydicom.dcmread(sr, stop_before_pixels=True)
    url = f"{web_node.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    assert requests.get(url + "/frames/1", headers=dict(AUTH, Accept=OHIF), timeout=30).status_code == 404
    assert requests.get(url + "/bulkdata/7FE00010", headers=AUTH, timeout=30).status_code == 404


# -- metadata, bulk data, QIDO ------------------------------------------------------------------

def test_metadata_names_pixels_and_large_values_by_bulk_data_uri(web_node: WebNode) -> None:
    ct = data_files(CT_DIR)[0]
    assert post(web_node, multipart(ct.read_bytes())).status_code == 200
    ds = pydicom.dcmread(ct)
    series = f"{web_node.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    url = f"{series}/instances/{ds.SOPInstanceUID}"
    (meta,) = requests.get(series + "/metadata", headers=AUTH, timeout=30).json()
    assert meta["7FE00010"] == {"vr": "OW", "BulkDataURI": url + "/bulkdata/7FE00010"}
    assert meta["00280010"] == {"vr": "US", "Value": [int(ds.Rows)]}
    assert meta["00080018"]["Value"] == [ds.SOPInstanceUID]
    whole = requests.get(meta["7FE00010"]["BulkDataURI"], headers=dict(AUTH, Accept="application/octet-stream"),
                         timeout=30)
    assert whole.status_code == 200 and whole.content == ds.PixelData
    ((ctype, body),) = _parts(requests.get(meta["7FE00010"]["BulkDataURI"], headers=AUTH, timeout=30))
    assert body == ds.PixelData and ctype == f"application/octet-stream; transfer-syntax={LE}"
    assert requests.get(url + "/bulkdata/00100010", headers=AUTH, timeout=30).status_code == 404  # not binary
    assert requests.get(url + "/bulkdata/../x", headers=AUTH, timeout=30).status_code in (400, 404)


def test_qido_returns_what_ohif_shows(web_node: WebNode) -> None:
    ct = data_files(CT_DIR, at_least=2)[:2]
    assert post(web_node, multipart(*(f.read_bytes() for f in ct))).status_code == 200
    ds = pydicom.dcmread(ct[0], stop_before_pixels=True)
    (study,) = requests.get(web_node.root + "/studies", headers=AUTH, timeout=30).json()
    for tag, kw in (("00080030", "StudyTime"), ("00100040", "PatientSex"), ("00200010", "StudyID")):
        if kw in ds and ds.get(kw):
            assert study[tag]["Value"] == [str(ds.get(kw))], kw
    assert study["00201208"]["Value"] == [2] and study["00080061"]["Value"] == ["CT"]
    assert study["00080056"]["Value"] == ["ONLINE"]
    (series,) = requests.get(f"{web_node.root}/studies/{ds.StudyInstanceUID}/series", headers=AUTH, timeout=30).json()
    assert series["00201209"]["Value"] == [2] and series["00080060"]["Value"] == ["CT"]
    instances = requests.get(f"{web_node.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances",
                             headers=AUTH, timeout=30).json()
    assert [i["00280010"]["Value"] for i in instances] == [[int(ds.Rows)]] * 2
    assert all(i["00280100"]["Value"] == [16] for i in instances)


# -- CORS ----------------------------------------------------------------------------------------

VIEWER = "http://viewer.example:3000"


def test_cors_for_the_configured_origin_only(tmp_path: Path) -> None:
    node = serve_in_process(tmp_path, cors_origins=(VIEWER,))
    try:
        studies = node.root + "/studies"
        pre = requests.options(studies, timeout=30, headers={
            "Origin": VIEWER, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, accept"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == VIEWER
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        got = requests.get(studies, headers=dict(AUTH, Origin=VIEWER), timeout=30)
        assert got.status_code == 200 and got.headers["access-control-allow-origin"] == VIEWER
        assert "warning" in got.headers["access-control-expose-headers"].lower()
        # still a token for everything but the preflight, and its refusal is readable by the viewer
        no_token = requests.get(studies, headers={"Origin": VIEWER}, timeout=30)
        assert no_token.status_code == 401 and no_token.headers["access-control-allow-origin"] == VIEWER
        assert node.audit("web.unauthorized")
        other = "http://evil.example"
        assert requests.options(studies, timeout=30, headers={
            "Origin": other, "Access-Control-Request-Method": "GET"}).status_code == 400
        assert "access-control-allow-origin" not in requests.get(studies, headers=dict(AUTH, Origin=other),
                                                                 timeout=30).headers
    finally:
        node.server.stop()


def test_no_cors_without_configured_origins(web_node: WebNode) -> None:
    pre = requests.options(web_node.root + "/studies", timeout=30, headers={
        "Origin": VIEWER, "Access-Control-Request-Method": "GET"})
    assert pre.status_code == 401 and "access-control-allow-origin" not in pre.headers
    got = requests.get(web_node.root + "/studies", headers=dict(AUTH, Origin=VIEWER), timeout=30)
    assert got.status_code == 200 and "access-control-allow-origin" not in got.headers


@pytest.mark.parametrize("origin", ["*", "http://viewer.example/", "viewer.example", "http://a/b", "ftp://x"])
def test_bad_cors_origin_stops_the_start(tmp_path: Path, origin: str) -> None:
    c = load(_config(tmp_path, f'cors_origins = ["{origin}"]'), environ={})
    assert c.web is not None and c.web.cors_origins == (origin,)
    with pytest.raises(WebStartError, match="cors_origins"):
        create_app(c.web, None, None, None, tmp_path)  # type: ignore[arg-type]


def test_cors_origins_key(tmp_path: Path) -> None:
    c = load(_config(tmp_path, 'cors_origins = ["http://127.0.0.1:3000", "https://ohif.example.org"]'), environ={})
    assert c.web is not None and c.web.cors_origins == ("http://127.0.0.1:3000", "https://ohif.example.org")
    assert load(_config(tmp_path, ""), environ={}).web.cors_origins == ()  # type: ignore[union-attr]


def _config(tmp_path: Path, line: str) -> Path:
    from scp_node.web import token_sha256

    path = tmp_path / "c.toml"
    path.write_text(f'[web]\ntoken_sha256 = ["{token_sha256("t")}"]\n{line}\n')
    return path
