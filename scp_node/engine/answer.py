"""From the model's text to :class:`StructuredFindings` and back to readable report text.

Why lenient here, strict in the grammar: with constrained decoding the text always matches the
schema, but in unconstrained mode (or with a model that ignores the instruction) it may come fenced
in ```json, after a thinking trace, with extra keys, unknown finding types or a bad box. We keep
what is usable and say why when nothing is, so the free text still becomes the report.
Pure Python: no torch.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, Sequence

from .result import CHANGE_VALUES, FINDING_TYPES, TRIAGE_VALUES, Finding, ImageRegion, StructuredFindings
from .thinking import strip_thinking_trace

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_decoder = json.JSONDecoder()

QUALITY_LIMITED_TEXT = {
    "en": "Image quality limited, consider repeating the examination.",
    "zh": "图像质量受限，建议重新检查。",
}
_HEADINGS = {
    "en": ("FINDINGS", "IMPRESSION", "RECOMMENDATION", "TRIAGE", "No findings listed."),
    "zh": ("所见", "印象", "建议", "分诊", "未列出所见。"),
}
_COMPARISON_HEADING = {"en": "COMPARISON", "zh": "对比"}
#: Words a model answering without the grammar ("free" mode) uses for a change: mapped to CHANGE_VALUES.
_CHANGE_WORDS = {
    "unchanged": "stable", "no change": "stable", "stable": "stable", "same": "stable",
    "improving": "improved", "improvement": "improved", "better": "improved", "decreased": "improved",
    "worse": "worsened", "worsening": "worsened", "progressed": "worsened", "increased": "worsened",
    "new": "new", "resolved": "resolved", "gone": "resolved",
}


class AnswerParseError(ValueError):
    """The text holds no usable JSON answer; the message says why (no patient data in it)."""


def extract_json(text: str) -> dict[str, Any]:
    """The answer object in ``text``: fenced ```json first, else the first bare ``{...}`` that parses.

    A thinking trace (``<unused94>…<unused95>``) is removed first. Raises AnswerParseError.
    """
    cleaned = strip_thinking_trace(text)
    candidates = [m.group(1) for m in _FENCE.finditer(cleaned)] + [cleaned]
    first_error = ""
    for candidate in candidates:
        for start in [i for i, ch in enumerate(candidate) if ch == "{"]:
            try:
                value, _ = _decoder.raw_decode(candidate, start)
            except json.JSONDecodeError as exc:
                first_error = first_error or f"invalid JSON: {exc.msg} at character {exc.pos}"
                continue
            if isinstance(value, dict):
                return value
    if "{" not in cleaned:
        raise AnswerParseError("the answer holds no JSON object")
    raise AnswerParseError(first_error or "the answer holds no JSON object")


def _text(value: Any, limit: int = 2000) -> str:
    return value.strip()[:limit] if isinstance(value, str) else ""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _box(value: Any) -> tuple[int, int, int, int] | None:
    """[y0, x0, y1, x1] on 0..1000, clipped, corners ordered; None when not four numbers or empty."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        return None
    y0, x0, y1, x1 = (int(round(min(max(float(v), 0.0), 1000.0))) for v in value)
    box = (min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1))
    return box if box[2] > box[0] and box[3] > box[1] else None


def region_for(box_value: Any, image_index: Any, transforms: Sequence[Any]) -> ImageRegion | None:
    """Map a model box to source pixels through the image's PadTransform.

    ``image_index`` is 1-based; a single-image series needs none. Boxes that are malformed, name a
    missing image, or lie wholly in the zero padding give None.
    """
    box = _box(box_value)
    if box is None or not transforms:
        return None
    if isinstance(image_index, int) and not isinstance(image_index, bool) and 1 <= image_index <= len(transforms):
        index = image_index - 1
    elif len(transforms) == 1 and image_index is None:
        index = 0
    else:
        return None
    row0, col0, row1, col1 = transforms[index].grid_box_to_source(box)
    if row1 <= row0 or col1 <= col0:
        return None
    return ImageRegion(source_index=index, box_2d=box, row0=row0, col0=col0, row1=row1, col1=col1)


def slice_index(value: Any, n_images: int) -> int | None:
    """The 0-based source index of a 1-based "slice" (SLICE k) answer; None when missing or out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if int(value) != value or not 1 <= int(value) <= n_images:
        return None
    return int(value) - 1


def change_value(value: Any) -> str:
    """One of CHANGE_VALUES for a model's "change" ("" when it is none of them nor a known synonym)."""
    if not isinstance(value, str):
        return ""
    word = value.strip().lower()
    return word if word in CHANGE_VALUES else _CHANGE_WORDS.get(word, "")


def to_structured(data: Mapping[str, Any], transforms: Sequence[Any] = (), language: str = "en",
                  compared: bool = False) -> StructuredFindings:
    """Validate a parsed answer; unknown finding types become "other", bad values their defaults.

    The quality gate: ``image_quality == "limited"`` drops the findings and makes the impression
    say "quality limited, consider repeating" (the flag stays for the report).
    ``compared`` (a prior was in the input): each finding's "change" and the "comparison" sentence
    are kept. A "resolved" finding is on the prior only: it keeps no box or slice, since those
    index the current series' images.
    """
    quality = data.get("image_quality")
    quality = quality if quality in ("adequate", "limited") else "adequate"
    triage = data.get("triage")
    triage = triage if triage in TRIAGE_VALUES else "abnormal" if data.get("findings") else "normal"
    if quality == "limited":
        gate = QUALITY_LIMITED_TEXT.get(language, QUALITY_LIMITED_TEXT["en"])
        return StructuredFindings(findings=(), impression=gate, recommendation=gate,
                                  image_quality="limited", triage=triage)
    findings: list[Finding] = []
    raw = data.get("findings")
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, Mapping):
            continue
        kind = item.get("finding_type", item.get("finding"))
        change = change_value(item.get("change")) if compared else ""
        here = change != "resolved"
        findings.append(Finding(
            finding_type=kind if kind in FINDING_TYPES else "other",
            description=_text(item.get("description")) or (_text(kind) if kind not in FINDING_TYPES else ""),
            location=_text(item.get("location"), 200),
            size_mm=_number(item.get("size_mm")),
            region=region_for(item.get("box_2d"), item.get("image_index"), transforms) if here else None,
            source_index=slice_index(item.get("slice"), len(transforms)) if here else None,
            change=change,
        ))
    return StructuredFindings(findings=tuple(findings), impression=_text(data.get("impression")),
                              recommendation=_text(data.get("recommendation")), image_quality=quality,
                              triage=triage, comparison=_text(data.get("comparison")) if compared else "")


def parse_answer(text: str, transforms: Sequence[Any] = (), language: str = "en",
                 compared: bool = False) -> tuple[StructuredFindings | None, str]:
    """``(structured, "")`` or ``(None, reason)`` for the model's text (``compared``: see to_structured)."""
    try:
        data = extract_json(text)
    except AnswerParseError as exc:
        return None, str(exc)
    return to_structured(data, transforms, language, compared), ""


def _size(size_mm: float) -> str:
    return f"{size_mm:g} mm"


def render_text(structured: StructuredFindings, language: str = "en") -> str:
    """The structured answer as a short plain-text report (what the SR's text item shows)."""
    findings_h, impression_h, recommendation_h, triage_h, none_text = _HEADINGS.get(language, _HEADINGS["en"])
    if structured.image_quality == "limited":
        return structured.impression
    lines = [f"{findings_h}:"]
    for finding in structured.findings:
        parts = [finding.finding_type.replace("_", " ")]
        if finding.location:
            parts.append(finding.location)
        text = ", ".join(parts)
        if finding.description:
            text += f": {finding.description}"
        if finding.size_mm is not None:
            text += f" ({_size(finding.size_mm)})"
        if finding.change:
            text += f" [{finding.change}]"
        lines.append(f"- {text}")
    if not structured.findings:
        lines.append(none_text)
    if structured.comparison:
        lines += ["", f"{_COMPARISON_HEADING.get(language, 'COMPARISON')}: {structured.comparison}"]
    if structured.impression:
        lines += ["", f"{impression_h}: {structured.impression}"]
    if structured.recommendation:
        lines += [f"{recommendation_h}: {structured.recommendation}"]
    lines += [f"{triage_h}: {structured.triage}"]
    return "\n".join(lines)
