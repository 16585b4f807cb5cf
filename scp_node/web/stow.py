"""STOW-RS: ``POST /dicom-web/studies[/{study}]`` into the same ingest path as C-STORE.

Every part goes through :meth:`Ingestor.ingest` exactly like a C-STORE dataset (durable file,
index rows, completion window, analysis, SR, audit).  The response is the PS3.18 Store
Instances Response Module as ``application/dicom+json``: ReferencedSOPSequence for kept
instances, FailedSOPSequence with a FailureReason for the others, and the HTTP status says
"all" (200), "some" (202) or "none" (409).  Failure reasons are the C-STORE ones (0xA700 out of
resources, 0xA900 SOP class mismatch, 0xC000 cannot understand, 0x0110 processing failure) plus
0xC409 (dcm4chee-arc's "different Study Instance UID") for a part that does not belong to the
study named in the URL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..audit import Event
from ..dimse.status_codes import StoreStatus
from ..store.files import UnsafeUID, check_uid
from ..store.ingest import InvalidInstance, Origin, StorageFailure, parse_header
from .context import WebContext
from .media import DICOM, MULTIPART_RELATED, DicomJSONResponse, parse_media_type
from .multipart import BodyTooLarge, MultipartError, Part, read_parts
from .qido import dicomweb_root, path_uid

log = logging.getLogger(__name__)

STUDY_MISMATCH = 0xC409


@dataclass
class PartResult:
    """What happened to one part; sop_class/sop_uid are empty when the part could not be read."""

    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    failure: int | None = None
    reason: str = ""


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def _uid(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    try:
        return check_uid(ds.get(keyword), keyword)
    except UnsafeUID:
        return ""


def store_part(ctx: WebContext, part: Part, origin: Origin, study: str | None) -> PartResult:
    """Ingest one part (runs in a worker thread: file and database I/O block)."""
    ds: Dataset | None = None
    try:
        media = parse_media_type(part.content_type) if part.content_type else None
        if media is not None and media.type != DICOM:
            raise InvalidInstance(f"part media type {media.type!r} is not {DICOM}")
        data = part.read()
        ds = parse_header(data)
        result = PartResult(_uid(ds, "SOPClassUID"), _uid(ds, "SOPInstanceUID"), _uid(ds, "StudyInstanceUID"),
                            _uid(ds, "SeriesInstanceUID"))
        if study is not None and result.study_uid != study:
            result.failure, result.reason = STUDY_MISMATCH, "StudyInstanceUID differs from the study in the URL"
            return result
        # STOW has no presentation context; the file meta's SOP class plays its part.
        meta_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "") if ds.file_meta else ""
        ctx.ingestor.ingest(data, origin, expected_sop_class=meta_class or None)
        return result
    except InvalidInstance as exc:  # its status: 0xA900 (SOP class or identity conflict), else 0xC000
        return _failed(ds, int(exc.status), str(exc))
    except StorageFailure as exc:
        return _failed(ds, int(StoreStatus.OUT_OF_RESOURCES), str(exc))
    except Exception as exc:  # noqa: BLE001 - never report success for an unexpected failure
        log.exception("STOW-RS part processing failed")
        return _failed(ds, int(StoreStatus.PROCESSING_FAILURE), type(exc).__name__)


def _failed(ds: Dataset | None, code: int, reason: str) -> PartResult:
    return PartResult(_uid(ds, "SOPClassUID"), _uid(ds, "SOPInstanceUID"), _uid(ds, "StudyInstanceUID"),
                      _uid(ds, "SeriesInstanceUID"), code, reason)


def response_dataset(results: list[PartResult], root: str, study: str | None) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1)."""
    rsp = Dataset()
    if study is not None:
        rsp.RetrieveURL = f"{root}/studies/{study}"
    ok, failed = [], []
    for r in results:
        item = Dataset()
        item.ReferencedSOPClassUID = r.sop_class
        item.ReferencedSOPInstanceUID = r.sop_uid
        if r.failure is None:
            item.RetrieveURL = f"{root}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"
            ok.append(item)
        else:
            item.FailureReason = r.failure
            failed.append(item)
    if ok:
        rsp.ReferencedSOPSequence = ok
    if failed:
        rsp.FailedSOPSequence = failed
    return rsp


async def _refuse(ctx: WebContext, request: Request, status: int, reason: str) -> Response:
    log.warning("STOW-RS refused (%d): %s", status, reason)
    await run_in_threadpool(ctx.audit.record, Event.STOW_REFUSED, outcome="failure",
                            peer=client_address(request), detail=f"HTTP {status}: {reason}")
    return DicomJSONResponse({"error": reason}, status_code=status)


async def store_instances(request: Request) -> Response:
    ctx: WebContext = request.app.state.ctx
    try:
        study = path_uid(request, "study")
    except UnsafeUID as exc:
        return await _refuse(ctx, request, 400, str(exc))
    media = parse_media_type(request.headers.get("content-type", ""))
    if media.type != MULTIPART_RELATED or media.params.get("type", DICOM).lower() != DICOM:
        return await _refuse(ctx, request, 415, f'only {MULTIPART_RELATED}; type="{DICOM}" is accepted')
    limit = ctx.web.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return await _refuse(ctx, request, 413, f"request body larger than {limit} bytes")
    ctx.spool_dir.mkdir(parents=True, exist_ok=True)
    try:
        parts = await read_parts(request.stream(), media.params.get("boundary"), limit, ctx.spool_dir,
                                 max_parts=ctx.web.max_parts)
    except BodyTooLarge as exc:  # (TooManyParts included: 413, one audit row for the request)
        return await _refuse(ctx, request, 413, str(exc))
    except MultipartError as exc:
        return await _refuse(ctx, request, 400, f"bad multipart body: {exc}")
    try:
        if not parts.items:
            return await _refuse(ctx, request, 400, "bad multipart body: no parts")
        origin = Origin(ae_title="", address=client_address(request), via="stow")
        results = []
        for part in parts.items:
            results.append(await run_in_threadpool(store_part, ctx, part, origin, study))
    finally:
        parts.close()
    return await _answer(ctx, request, results, study)


#: Refused parts audited and logged one by one; beyond these a request's refusals are counted in
#: its summary row only, so a body of many bad parts cannot flood the audit table or the log.
MAX_PART_AUDIT_ROWS = 100
MAX_PART_LOG_LINES = 10


async def _answer(ctx: WebContext, request: Request, results: list[PartResult], study: str | None) -> Response:
    failed = [r for r in results if r.failure is not None]
    peer = client_address(request)

    def audit() -> None:
        for r in failed[:MAX_PART_AUDIT_ROWS]:
            ctx.audit.record(Event.INSTANCE_REJECTED, outcome="failure", peer=peer, sop_uid=r.sop_uid,
                             study_uid=r.study_uid, series_uid=r.series_uid,
                             detail=f"STOW-RS 0x{r.failure:04X} {r.reason}")
        unlisted = len(failed) - MAX_PART_AUDIT_ROWS
        ctx.audit.record(Event.STOW_RECEIVED, outcome="success" if not failed else
                         "failure" if len(failed) == len(results) else "warning", peer=peer,
                         study_uid=study or "",
                         detail=f"{len(results) - len(failed)} stored, {len(failed)} failed"
                         + (f" ({unlisted} failures without a row of their own)" if unlisted > 0 else ""))

    await run_in_threadpool(audit)
    for r in failed[:MAX_PART_LOG_LINES]:
        log.warning("STOW-RS part refused (0x%04X): %s", r.failure, r.reason)
    if len(failed) > MAX_PART_LOG_LINES:
        log.warning("STOW-RS: %d more parts refused", len(failed) - MAX_PART_LOG_LINES)
    status = 200 if not failed else 409 if len(failed) == len(results) else 202
    rsp = response_dataset(results, dicomweb_root(request), study)
    return DicomJSONResponse(rsp.to_json_dict(), status_code=status)
