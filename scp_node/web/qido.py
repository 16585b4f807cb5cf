"""QIDO-RS: search for studies, series and instances (PS3.18 10.6), the node's SRs included.

Results are the indexed attributes of each match, the attributes PS3.18 returns by default and
those asked for by ``includefield`` (read from a representative file's header when the index
does not hold them), InstanceAvailability and a RetrieveURL
pointing at our WADO-RS, so a viewer can go straight from a search to the SR.
"""

from __future__ import annotations

import logging
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from starlette.requests import Request
from starlette.responses import Response

from ..store.files import UnsafeUID, check_uid
from .catalog import Record, Scope
from .context import WebContext
from .media import DicomJSONResponse
from .query import Query, QueryError, parse_query

log = logging.getLogger(__name__)

_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}


def path_uid(request: Request, name: str) -> str | None:
    """A UID from the URL path, checked (raises UnsafeUID)."""
    value = request.path_params.get(name)
    return None if value is None else check_uid(value, name)


def dicomweb_root(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicom-web"


def retrieve_url(root: str, attrs: dict[str, Any], level: str) -> str:
    url = f"{root}/studies/{attrs['StudyInstanceUID']}"
    if level in ("series", "instance"):
        url += f"/series/{attrs['SeriesInstanceUID']}"
    if level == "instance":
        url += f"/instances/{attrs['SOPInstanceUID']}"
    return url


#: Attributes PS3.18 returns by default (Tables 6.7.1-2, -2a, -2b) that the index does not hold:
#: read from the record's representative file when it has them (viewers such as OHIF show them).
HEADER_DEFAULTS: dict[str, frozenset[str]] = {
    "study": frozenset({"StudyTime", "StudyID", "ReferringPhysicianName", "PatientBirthDate", "PatientSex",
                        "TimezoneOffsetFromUTC"}),
    "series": frozenset({"SeriesDate", "SeriesTime", "PerformedProcedureStepStartDate",
                         "PerformedProcedureStepStartTime", "TimezoneOffsetFromUTC"}),
    "instance": frozenset({"Rows", "Columns", "BitsAllocated", "NumberOfFrames", "TimezoneOffsetFromUTC"}),
}


def _header(record: Record) -> Dataset | None:
    try:
        return pydicom.dcmread(record.path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - a missing/odd file only costs the extra attributes
        log.warning("includefield: cannot read a header from the store")
        return None


def to_json(record: Record, query: Query, level: str, root: str) -> dict[str, Any]:
    """One result: a DICOM JSON object (PS3.18 F.2)."""
    ds = Dataset()
    for kw, value in record.attrs.items():
        setattr(ds, kw, "" if value is None else value)
    ds.RetrieveURL = retrieve_url(root, record.attrs, level)
    ds.InstanceAvailability = "ONLINE"
    extra = (query.include | HEADER_DEFAULTS[level]) - set(record.attrs)
    if extra or query.include_all:
        hdr = _header(record)
        if hdr is not None:
            for elem in hdr:
                if elem.keyword in ds:
                    continue
                if (query.include_all and elem.VR not in _BINARY_VRS) or elem.keyword in extra:
                    ds.add(elem)
    return ds.to_json_dict(suppress_invalid_tags=True)


def _search(request: Request, level: str) -> Response:
    ctx: WebContext = request.app.state.ctx
    try:
        study, series = path_uid(request, "study"), path_uid(request, "series")
        query = parse_query(list(request.query_params.multi_items()), level)
    except (QueryError, UnsafeUID) as exc:
        return DicomJSONResponse({"error": str(exc)}, status_code=400)
    def narrowed(path_value: str | None, keyword: str) -> frozenset[str] | None:
        wanted = query.exact.get(keyword)
        if path_value is not None:
            return frozenset({path_value} & wanted if wanted is not None else {path_value})
        return frozenset(wanted) if wanted is not None else None

    pid = query.exact.get("PatientID")
    scope = Scope(study=narrowed(study, "StudyInstanceUID"), series=narrowed(series, "SeriesInstanceUID"),
                  sop=narrowed(None, "SOPInstanceUID"), patient_id=next(iter(pid)) if pid else None)
    fetch = {"study": ctx.catalog.studies, "series": ctx.catalog.series, "instance": ctx.catalog.instances}[level]
    matches = [r for r in fetch(scope) if query.accepts(r.attrs)]
    matches.sort(key=lambda r: r.sort_key)
    page = matches[query.offset:query.offset + query.limit]
    root = dicomweb_root(request)
    headers: dict[str, str] = {}
    warnings = []
    if query.unsupported:
        names = ", ".join(sorted(set(query.unsupported)))
        warnings.append(f'299 scp_node "matching not supported for: {names}"')
    if len(matches) > query.offset + query.limit:
        warnings.append('299 scp_node "There are additional results that can be requested"')
    if warnings:
        headers["Warning"] = ", ".join(warnings)
    return DicomJSONResponse([to_json(r, query, level, root) for r in page], headers=headers)


def search_studies(request: Request) -> Response:
    return _search(request, "study")


def search_series(request: Request) -> Response:
    return _search(request, "series")


def search_instances(request: Request) -> Response:
    return _search(request, "instance")
