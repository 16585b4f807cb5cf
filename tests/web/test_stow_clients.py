"""STOW-RS bodies as real clients send them, against the real app served in-process.

Orthanc's DICOMweb plugin (1.7 on Orthanc 1.10) sends ``Transfer-Encoding: chunked``, a
73-character boundary (two UUIDs joined by ``-``) and a Content-Length in every part; other
clients leave out the ``type`` parameter or the part's Content-Length.  All of these are stored;
what is really broken still gets its 400/413 and an audit row.
"""

from __future__ import annotations

import http.client
import io
import json
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset

from scp_node.web.multipart import MAX_BOUNDARY
from tests.support.paths import CT_DIR, CXR, data_files, need_data
from tests.web.conftest import TOKEN, WebNode, serve_in_process

ORTHANC_BOUNDARY = f"{uuid.uuid4()}-{uuid.uuid4()}"  # 73 characters, as Orthanc writes it


def orthanc_body(files: list[bytes], boundary: str = ORTHANC_BOUNDARY, lengths: bool = True) -> bytes:
    out = b""
    for data in files:
        out += b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n"
        if lengths:
            out += f"Content-Length: {len(data)}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


def send(node: WebNode, body: bytes, content_type: str, *, chunked: bool = True, chunk: int = 0xFFF4,
         path: str = "/studies") -> tuple[int, bytes]:
    """POST as Orthanc does: chunked (no Content-Length) in chunks of 0xFFF4 bytes by default."""
    url = urlsplit(node.root + path)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type, "Accept": "application/dicom+json"}
    try:
        if chunked:
            pieces: Iterator[bytes] = (body[i:i + chunk] for i in range(0, len(body), chunk))
            conn.request("POST", url.path, body=pieces, headers=headers, encode_chunked=True)
        else:
            conn.request("POST", url.path, body=body, headers=headers)
        rsp = conn.getresponse()
        return rsp.status, rsp.read()
    finally:
        conn.close()


def ctype(boundary: str = ORTHANC_BOUNDARY, type_param: str | None = '"application/dicom"') -> str:
    return "multipart/related; " + (f"type={type_param}; " if type_param else "") + f"boundary={boundary}"


@pytest.fixture
def cxr() -> bytes:
    return need_data(CXR / "CR-MONO1-10-chest_barre.dcm").read_bytes()


def _stored(node: WebNode, raw: bytes) -> Path:
    ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    return node.storage_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def test_orthanc_style_upload_is_stored(web_node: WebNode, cxr: bytes) -> None:
    ct = [p.read_bytes() for p in data_files(CT_DIR, at_least=3)[:3]]
    status, body = send(web_node, orthanc_body([cxr, *ct]), ctype())
    assert status == 200, body[:500]
    rsp = Dataset.from_json(json.loads(body))
    assert len(rsp.ReferencedSOPSequence) == 4 and "FailedSOPSequence" not in rsp
    for raw in (cxr, *ct):
        assert _stored(web_node, raw).read_bytes() == raw
    assert [e for e, *_ in web_node.audit("stow.received")] == ["stow.received"]
    assert not web_node.audit("stow.refused")


@pytest.mark.parametrize("variant", ["no type parameter", "type unquoted", "no part Content-Length",
                                     "Content-Length, not chunked", "longest boundary", "tiny chunks"])
def test_liberal_variants_are_stored(web_node: WebNode, cxr: bytes, variant: str) -> None:
    boundary, type_param, lengths, chunked, chunk = ORTHANC_BOUNDARY, '"application/dicom"', True, True, 0xFFF4
    if variant == "no type parameter":
        type_param = None
    elif variant == "type unquoted":
        type_param = "application/dicom"
    elif variant == "no part Content-Length":
        lengths = False
    elif variant == "Content-Length, not chunked":
        chunked = False
    elif variant == "longest boundary":
        boundary = "b" * MAX_BOUNDARY
    elif variant == "tiny chunks":
        chunk = 997
    status, body = send(web_node, orthanc_body([cxr], boundary, lengths), ctype(boundary, type_param),
                        chunked=chunked, chunk=chunk)
    assert status == 200, body[:500]
    assert _stored(web_node, cxr).read_bytes() == cxr


@pytest.mark.parametrize("case, status", [
    ("boundary over the bound", 400),
    ("boundary with a control character", 400),
    ("no boundary", 400),
    ("part Content-Length wrong", 400),
    ("cut short (chunked)", 400),
    ("not DICOM", 409),
    ("type is not application/dicom", 415),
])
def test_real_errors_keep_their_status_and_audit_row(web_node: WebNode, cxr: bytes, case: str, status: int) -> None:
    body, content_type = orthanc_body([cxr]), ctype()
    if case == "boundary over the bound":
        b = "b" * (MAX_BOUNDARY + 1)
        body, content_type = orthanc_body([cxr], b), ctype(b)
    elif case == "boundary with a control character":
        content_type = ctype('"caf\xe9"')  # (h11 refuses a DEL itself)
    elif case == "no boundary":
        content_type = 'multipart/related; type="application/dicom"'
    elif case == "part Content-Length wrong":
        body = body.replace(f"Content-Length: {len(cxr)}".encode(), f"Content-Length: {len(cxr) + 1}".encode())
    elif case == "cut short (chunked)":
        body = body[:-60]
    elif case == "not DICOM":
        body = orthanc_body([b"not a DICOM file"])
    elif case == "type is not application/dicom":
        content_type = ctype(type_param='"application/dicom+xml"')
    got, rsp = send(web_node, body, content_type)
    assert got == status, rsp[:500]
    assert not _stored(web_node, cxr).exists()
    if status == 409:
        (row,) = web_node.audit("instance.rejected")
        assert "0xC000" in row[3]
        assert web_node.audit("stow.received")
    else:
        (row,) = web_node.audit("stow.refused")
        assert f"HTTP {status}" in row[3]


def test_body_limit_still_applies_to_a_chunked_upload(tmp_path: Path, cxr: bytes) -> None:
    node = serve_in_process(tmp_path, max_body_bytes=len(cxr) // 2)
    try:
        body = orthanc_body([cxr])

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as the bytes arrive
            for i in range(0, len(body), 0xFFF4):
                yield body[i:i + 0xFFF4]

        rsp = requests.post(node.root + "/studies", data=chunks(), timeout=60,
                            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype()})
        assert rsp.status_code == 413, rsp.text[:300]
        (row,) = node.audit("stow.refused")
        assert "HTTP 413" in row[3]
    finally:
        node.server.stop()
