"""WADO-RS: instances exactly as stored, their metadata as DICOM JSON, frames and bulk data (PS3.18 10.4).

Instances are streamed from the files byte for byte (the same bytes the sender gave us, or the
SR as the node wrote it): no decoding, no transcoding.  A request for a transfer syntax other
than the stored one is answered 406, never with silently different bytes.  Metadata names the
Pixel Data and large binary values by BulkDataURI; frames and bulk data are served by
:mod:`.frames` (stored bytes, or decoded to uncompressed for a client that asks only for that).
"""

from __future__ import annotations

import logging
import uuid
from typing import Iterator

import pydicom
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..store.files import UnsafeUID, check_uid
from . import frames as _frames
from .catalog import Record, Scope
from .context import WebContext
from .media import DICOM, DICOM_JSON, MULTIPART_RELATED, DicomJSONResponse, MediaType, parse_accept
from .qido import dicomweb_root, path_uid, retrieve_url

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


def _records(request: Request) -> list[Record] | Response:
    ctx: WebContext = request.app.state.ctx
    try:
        study, series, sop = (path_uid(request, n) for n in ("study", "series", "instance"))
    except UnsafeUID as exc:
        return DicomJSONResponse({"error": str(exc)}, status_code=400)
    scope = Scope(study=frozenset({study}) if study else None, series=frozenset({series}) if series else None,
                  sop=frozenset({sop}) if sop else None)
    records = sorted(ctx.catalog.instances(scope), key=lambda r: r.sort_key)
    if not records:
        return DicomJSONResponse({"error": "no such resource"}, status_code=404)
    return records


def _servable(record: Record) -> bool:
    """Whether the stored transfer syntax may go into a Content-Type header.

    Ingest refuses a file meta whose Transfer Syntax UID is not a UID; an index row written
    before that check (a value with CR/LF would forge a header, a non-ASCII one broke the
    response) is not served at all rather than served with a header built from it.
    """
    try:
        return check_uid(record.transfer_syntax, "TransferSyntaxUID") == record.transfer_syntax
    except UnsafeUID:
        return False


def _ts_ok(media: MediaType, records: list[Record]) -> bool:
    ts = media.params.get("transfer-syntax", "*")
    return ts == "*" or all(r.transfer_syntax == ts for r in records)


def _choose(accept: list[MediaType], records: list[Record], single: bool) -> str | None:
    """'multipart' or 'single' (application/dicom, one instance only), or None: 406."""
    for m in accept:
        if m.type in ("*/*", "multipart/*"):
            return "multipart"
        if m.type == MULTIPART_RELATED and m.params.get("type", DICOM).lower() in (DICOM, "application/*", "*/*") \
                and _ts_ok(m, records):
            return "multipart"
        if m.type == DICOM and single and _ts_ok(m, records):
            return "single"
    return None


def _file_chunks(record: Record) -> Iterator[bytes]:
    with open(record.path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def _multipart(records: list[Record], boundary: str) -> Iterator[bytes]:
    b = boundary.encode("ascii")
    for r in records:
        yield (b"--" + b + b"\r\nContent-Type: application/dicom; transfer-syntax="
               + r.transfer_syntax.encode("ascii") + b"\r\n\r\n")
        yield from _file_chunks(r)
        yield b"\r\n"
    yield b"--" + b + b"--\r\n"


def retrieve(request: Request) -> Response:
    """Study, series or instance as ``multipart/related; type="application/dicom"`` (or one file)."""
    found = _records(request)
    if isinstance(found, Response):
        return found
    missing = [r for r in found if not r.path.is_file()]
    if missing:
        log.error("WADO-RS: %d indexed files are missing from the store", len(missing))
        return DicomJSONResponse({"error": "stored file missing"}, status_code=500)
    headers: dict[str, str] = {}
    unservable = [r for r in found if not _servable(r)]
    if unservable:
        log.error("WADO-RS: %d indexed instances have an invalid stored transfer syntax; not served",
                  len(unservable))
        found = [r for r in found if _servable(r)]
        if not found:
            return DicomJSONResponse({"error": "stored transfer syntax is not a valid UID"}, status_code=500)
        headers["Warning"] = (f'299 scp_node "{len(unservable)} instances not served: '
                              'invalid stored transfer syntax"')
    single = "instance" in request.path_params and len(found) == 1
    how = _choose(parse_accept(request.headers.get("accept")), found, single)
    if how is None:
        return DicomJSONResponse({"error": "not acceptable: instances are served in their stored transfer "
                                           "syntax as application/dicom"}, status_code=406)
    if how == "single":
        r = found[0]
        return StreamingResponse(_file_chunks(r), media_type=f"{DICOM}; transfer-syntax={r.transfer_syntax}",
                                 headers={"Content-Length": str(r.path.stat().st_size), **headers})
    boundary = uuid.uuid4().hex
    return StreamingResponse(_multipart(found, boundary), headers=headers,
                             media_type=f'{MULTIPART_RELATED}; type="{DICOM}"; boundary={boundary}')


def metadata(request: Request) -> Response:
    """DICOM JSON of each instance's header; Pixel Data and binary values over 1 KiB by BulkDataURI."""
    found = _records(request)
    if isinstance(found, Response):
        return found
    accept = parse_accept(request.headers.get("accept"))
    if not any(m.type in (DICOM_JSON, "application/json", "application/*", "*/*") for m in accept):
        return DicomJSONResponse({"error": "metadata is served as application/dicom+json"}, status_code=406)
    out = []
    root = dicomweb_root(request)
    for r in found:
        try:
            ds = pydicom.dcmread(r.path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - say which failed without its content
            log.exception("WADO-RS metadata: cannot read a stored file")
            return DicomJSONResponse({"error": "cannot read a stored instance"}, status_code=500)
        url = retrieve_url(root, r.attrs, "instance")
        out.append(_frames.metadata_json(ds, url, r.transfer_syntax))
    return DicomJSONResponse(out)


def _instance(request: Request) -> Record | Response:
    found = _records(request)
    if isinstance(found, Response):
        return found
    record = found[0]
    if not record.path.is_file():
        log.error("WADO-RS: an indexed file is missing from the store")
        return DicomJSONResponse({"error": "stored file missing"}, status_code=500)
    if not _servable(record):
        log.error("WADO-RS: an indexed instance has an invalid stored transfer syntax; not served")
        return DicomJSONResponse({"error": "stored transfer syntax is not a valid UID"}, status_code=500)
    return record


def frames(request: Request) -> Response:
    """``.../instances/{i}/frames/{n[,m...]}``: pixel data frames (see :mod:`.frames`)."""
    record = _instance(request)
    return record if isinstance(record, Response) else _frames.frames_response(request, record)


def bulkdata(request: Request) -> Response:
    """``.../instances/{i}/bulkdata/{path}``: the value a metadata BulkDataURI names."""
    record = _instance(request)
    return record if isinstance(record, Response) else _frames.bulk_response(request, record)
