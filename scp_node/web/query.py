"""QIDO-RS query parameters: which attributes match how, paging and includefield (PS3.18 8.3.4).

Matching is done here, in Python, on the records the catalog returns; the catalog's SQL only
narrows the rows by UIDs and PatientID, so the matching rules live in one place whatever the
database.  Supported rules: single value, UID lists (``,`` or ``\\``), ``*``/``?`` wildcards on
text attributes (case-insensitive for person names), date ranges, universal matching (an empty
value).  Attributes the index does not hold cannot be matched; they are reported back in a
``Warning`` header rather than silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}
MAX_LIMIT = 10000
DEFAULT_LIMIT = 1000

#: Matching kind of each attribute the index holds.
KINDS: dict[str, str] = {
    "StudyInstanceUID": "uid", "SeriesInstanceUID": "uid", "SOPInstanceUID": "uid", "SOPClassUID": "uid",
    "Modality": "list", "ModalitiesInStudy": "list",
    "StudyDate": "date",
    "SeriesNumber": "int", "InstanceNumber": "int",
    "PatientID": "text", "IssuerOfPatientID": "text", "AccessionNumber": "text", "StudyDescription": "text",
    "SeriesDescription": "text", "BodyPartExamined": "text", "PatientName": "pn",
}
LEVEL_KEYS: dict[str, set[str]] = {
    "study": {"StudyInstanceUID", "StudyDate", "AccessionNumber", "StudyDescription", "PatientID",
              "IssuerOfPatientID", "PatientName", "ModalitiesInStudy"},
}
LEVEL_KEYS["series"] = LEVEL_KEYS["study"] - {"ModalitiesInStudy"} | {
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined"}
LEVEL_KEYS["instance"] = LEVEL_KEYS["series"] | {"SOPInstanceUID", "SOPClassUID", "InstanceNumber"}


class QueryError(ValueError):
    """A query parameter cannot be understood (400)."""


def keyword_of(name: str) -> str:
    """``PatientID`` or ``00100020`` -> ``PatientID``; raise QueryError for anything else."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        kw = keyword_for_tag(int(name, 16))
        if kw:
            return str(kw)
    elif tag_for_keyword(name) is not None:
        return name
    raise QueryError(f"unknown attribute {name!r}")


def _values(raw: str) -> set[str]:
    return {v.strip() for v in re.split(r"[,\\]", raw) if v.strip()}


#: Longest wildcard pattern accepted (after runs of ``*`` are collapsed): longer than any value
#: the index holds (PN is at most 324 characters), so nothing legitimate is refused.
MAX_PATTERN = 1024


def _segment_regex(segment: str) -> re.Pattern[str]:
    """A ``*``-free piece of a pattern: literal characters and ``?`` (any one character).

    Without quantifiers the regex has a fixed length, so a search costs at most
    len(value) x len(segment) steps: there is nothing to backtrack into.
    """
    return re.compile("".join("." if c == "?" else re.escape(c) for c in segment), re.DOTALL)


def _wildcard(pattern: str, fold: bool) -> Callable[[Any], bool]:
    """DICOM wildcard matching (PS3.4 C.2.2.2.4: ``*`` any run, ``?`` one character) in linear time.

    Why not one regex with ``.*`` per star: Python's ``re`` backtracks, and a query like
    ``PatientName=************x`` cost seconds per record, tripling with every star, while
    holding the interpreter lock (the DIMSE port and the scheduler stalled with it).  Here the
    pattern is split at its stars; the first piece must match at the start, the last at the end,
    and each piece between is found leftmost after the previous one.  Greedy leftmost placement
    is exact for ``*`` patterns (a later placement never leaves more room), so each piece is
    searched once: the cost is bounded by len(pattern) x len(value), never exponential.
    """
    if len(pattern) > MAX_PATTERN * 4:
        raise QueryError(f"matching value longer than {MAX_PATTERN * 4} characters")
    pattern = re.sub(r"\*{2,}", "*", pattern)
    if len(pattern) > MAX_PATTERN:
        raise QueryError(f"matching value longer than {MAX_PATTERN} characters")
    norm: Callable[[str], str] = (lambda t: t.casefold()) if fold else (lambda t: t)
    pattern = norm(pattern)
    if "*" not in pattern and "?" not in pattern:
        return lambda v: norm(str(v or "")) == pattern
    pieces = [_segment_regex(p) for p in pattern.split("*")]
    if len(pieces) == 1:  # only '?': a fixed-length match of the whole value
        only = pieces[0]
        return lambda v: only.fullmatch(norm(str(v or ""))) is not None
    head, middle, tail = pieces[0], pieces[1:-1], pieces[-1]
    tail_len = len(pattern) - pattern.rfind("*") - 1

    def match(v: Any) -> bool:
        text = norm(str(v or ""))
        m = head.match(text)
        if m is None:
            return False
        pos, end = m.end(), len(text) - tail_len
        if end < pos or tail.fullmatch(text, end) is None:
            return False
        for piece in middle:
            m = piece.search(text, pos, end)
            if m is None:
                return False
            pos = m.end()
        return True

    return match


def _date_range(raw: str) -> Callable[[Any], bool]:
    if not re.fullmatch(r"\d{8}|\d{8}-|-\d{8}|\d{8}-\d{8}", raw):
        raise QueryError("StudyDate must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD (either end may be open)")
    lo, sep, hi = raw.partition("-")
    if not sep:
        return lambda v: str(v or "") == lo
    return lambda v: bool(v) and (not lo or str(v) >= lo) and (not hi or str(v) <= hi)


def matcher(keyword: str, raw: str) -> Callable[[Any], bool]:
    """A predicate on the record's value for ``keyword``."""
    kind = KINDS[keyword]
    if kind in ("uid", "list"):
        wanted = _values(raw)
        return lambda v: bool(wanted & set(v)) if isinstance(v, (list, tuple, set)) else str(v or "") in wanted
    if kind == "date":
        return _date_range(raw)
    if kind == "int":
        try:
            n = int(raw)
        except ValueError:
            raise QueryError(f"{keyword} must be an integer") from None
        return lambda v: v == n
    return _wildcard(raw, fold=(kind == "pn"))


@dataclass
class Query:
    """A parsed QIDO-RS request."""

    matches: list[tuple[str, Callable[[Any], bool]]] = field(default_factory=list)
    #: Exact values usable to narrow the SQL (UID lists, PatientID without wildcards).
    exact: dict[str, set[str]] = field(default_factory=dict)
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    include_all: bool = False
    include: set[str] = field(default_factory=set)
    #: Attributes asked for matching that the index cannot match (Warning header).
    unsupported: list[str] = field(default_factory=list)

    def accepts(self, attrs: dict[str, Any]) -> bool:
        return all(pred(attrs.get(kw)) for kw, pred in self.matches)


def _int_param(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer") from None
    if not lo <= n <= hi:
        raise QueryError(f"{name} must be between {lo} and {hi}")
    return n


def parse_query(items: list[tuple[str, str]], level: str) -> Query:
    """Parse the query string items (repeated keys allowed) for a study/series/instance search."""
    q = Query()
    for name, raw in items:
        if name == "limit":
            q.limit = _int_param("limit", raw, 0, MAX_LIMIT)
        elif name == "offset":
            q.offset = _int_param("offset", raw, 0, 2**31)
        elif name == "fuzzymatching":
            continue  # not supported; allowed by PS3.18 to be ignored
        elif name == "includefield":
            for item in _values(raw):
                if item == "all":
                    q.include_all = True
                else:
                    q.include.add(keyword_of(item))
        else:
            if "." in name:  # sequence matching (a.b) is not supported
                # Named back in a Warning header: only when it is attribute names (keywords or
                # tags) and dots, so no query can put its own text into a response header.
                q.unsupported.append(name if re.fullmatch(r"[A-Za-z0-9]{1,64}(\.[A-Za-z0-9]{1,64}){1,8}", name)
                                     else "(a sequence attribute)")
                continue
            kw = keyword_of(name)
            if kw not in KINDS or kw not in LEVEL_KEYS[level]:
                q.unsupported.append(kw)
                continue
            q.include.add(kw)
            if raw == "":
                continue  # universal matching: return the attribute, match everything
            q.matches.append((kw, matcher(kw, raw)))
            kind = KINDS[kw]
            if kind == "uid":
                q.exact[kw] = _values(raw)
            elif kw == "PatientID" and "*" not in raw and "?" not in raw:
                q.exact[kw] = {raw}
    return q


def vr_of(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return str(dictionary_VR(tag)) if tag is not None else "UN"
