"""Media types of PS3.18: parsing Content-Type / Accept and the DICOM JSON response class.

Kept apart from the routes so STOW, QIDO and WADO agree on one reading of a header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
MULTIPART_RELATED = "multipart/related"


@dataclass(frozen=True)
class MediaType:
    """One media type with its parameters (names lower-cased, quotes removed)."""

    type: str
    params: dict[str, str] = field(default_factory=dict)
    #: Accept quality; 0 means "not acceptable".
    q: float = 1.0


def _split_params(text: str) -> list[str]:
    """Split on ';' outside double quotes (a quoted boundary may contain ';')."""
    out, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_media_type(value: str) -> MediaType:
    """Parse one ``type/subtype; name=value; ...`` (as in Content-Type)."""
    head, *rest = _split_params(value)
    params: dict[str, str] = {}
    q = 1.0
    for item in rest:
        name, sep, val = item.partition("=")
        if not sep:
            continue
        name, val = name.strip().lower(), val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        if name == "q":
            try:
                q = float(val)
            except ValueError:
                q = 0.0
        else:
            params[name] = val
    return MediaType(head.strip().lower(), params, q)


def _split_accept(value: str) -> list[str]:
    """Split an Accept header on ',' outside double quotes."""
    out, cur, quoted = [], [], False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s for s in (x.strip() for x in out) if s]


def parse_accept(value: str | None) -> list[MediaType]:
    """The acceptable media types, best first; ``*/*`` when the header is missing or empty."""
    items = [parse_media_type(v) for v in _split_accept(value or "")]
    items = [m for m in items if m.q > 0]
    return sorted(items, key=lambda m: -m.q) or [MediaType("*/*")]


class DicomJSONResponse(Response):
    """``application/dicom+json`` exactly (dicomweb-client compares the header verbatim)."""

    media_type = DICOM_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
