"""The JSON schema the model must answer with, and how many tokens such an answer can take.

Why bounded: grammar-constrained decoding guarantees a *parseable* answer only if the answer also
fits into ``max_new_tokens``. Every string is therefore a ``pattern`` with its length bound inside
(xgrammar ignores ``maxLength`` next to a pattern, and a bare ``maxLength`` string lets raw control
characters through), every list has ``maxItems`` and every number a range, so that
:func:`max_answer_tokens` is a true upper bound. Pure data: no torch, no xgrammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .result import CHANGE_VALUES, FINDING_TYPES, TRIAGE_VALUES

LANGUAGES: tuple[str, ...] = ("en", "zh")
IMAGE_QUALITY_VALUES: tuple[str, ...] = ("adequate", "limited")

#: Printable ASCII without '"' and '\\': no escapes, no control characters, one char >= 1 byte.
_ASCII_CLASS = r" !#-\[\]-~"
#: Plus CJK unified ideographs, CJK punctuation and full-width forms (Chinese reports). Each is
#: a 3-byte UTF-8 sequence; xgrammar matches whole code points, so no broken byte sequence passes.
_CJK_CLASS = _ASCII_CLASS + r"\u3000-\u303f\u4e00-\u9fff\uff01-\uff5e"
_MAX_REPEAT = 100


@dataclass(frozen=True)
class SchemaBounds:
    """Size limits of one answer; they fix the worst-case answer length in tokens."""

    max_findings: int = 6
    location_chars: int = 60
    description_chars: int = 200
    impression_chars: int = 300
    recommendation_chars: int = 200
    comparison_chars: int = 200  #: the one sentence on the prior (only when a prior is compared)

    def __post_init__(self) -> None:
        for name in ("max_findings", "location_chars", "description_chars", "impression_chars",
                     "recommendation_chars", "comparison_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchemaBounds.{name} must be at least 1")


def text_pattern(max_chars: int, language: str = "en") -> str:
    """Regex for a JSON string body of 0..max_chars allowed characters."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, not {language!r}")
    cls = _CJK_CLASS if language == "zh" else _ASCII_CLASS
    # xgrammar 0.2.8 fails to compile a repetition bound above ~100 ("per_rule_fsm_hashes" check):
    # chain pieces of at most 100; the language (0..max_chars characters) is the same.
    pieces, left = [], int(max_chars)
    while left > 0 or not pieces:
        pieces.append(f"[{cls}]{{0,{min(left, _MAX_REPEAT)}}}")
        left -= _MAX_REPEAT
    return "^" + "".join(pieces) + "$"


def _text(max_chars: int, language: str) -> dict[str, Any]:
    return {"type": "string", "pattern": text_pattern(max_chars, language)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def findings_schema(bounds: SchemaBounds = SchemaBounds(), language: str = "en", n_images: int = 1,
                    localisation: str = "box", compared: bool = False) -> dict[str, Any]:
    """JSON schema of the answer.

    ``localisation`` "box" (CR/DX): each finding has ``box_2d`` and ``image_index`` (1-based image);
    "slice" (CT/MR): each finding has ``slice``, the 1-based SLICE k of the prompt, and no box.
    ``n_images`` counts the CURRENT series' images only: a box or slice always refers to them.
    ``compared`` (a prior study went into the input, :mod:`.longitudinal`): each finding also has a
    required ``change`` (one of CHANGE_VALUES, after its description: the model describes first, then
    judges), and the answer a ``comparison`` sentence after the findings, and at least one finding
    (``no_acute_finding`` is one): a comparison that names no finding would say no change at all.
    Without it the schema is exactly the one without priors.
    """
    index = _nullable({"type": "integer", "minimum": 1, "maximum": max(int(n_images), 1)})
    properties: dict[str, Any] = {
        "finding_type": {"enum": list(FINDING_TYPES)},
        "location": _text(bounds.location_chars, language),
        "description": _text(bounds.description_chars, language),
        "size_mm": _nullable({"type": "number", "minimum": 0, "maximum": 999}),
    }
    if compared:
        properties = _after(properties, "description", "change", {"enum": list(CHANGE_VALUES)})
    if localisation == "slice":
        properties["slice"] = index
    elif localisation == "box":
        properties["box_2d"] = _nullable({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                                          "minItems": 4, "maxItems": 4})
        properties["image_index"] = index
    else:
        raise ValueError(f"localisation must be 'box' or 'slice', not {localisation!r}")
    finding = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    answer: dict[str, Any] = {
        "findings": {"type": "array", "items": finding, "maxItems": bounds.max_findings},
        "impression": _text(bounds.impression_chars, language),
        "recommendation": _text(bounds.recommendation_chars, language),
        "image_quality": {"enum": list(IMAGE_QUALITY_VALUES)},
        "triage": {"enum": list(TRIAGE_VALUES)},
    }
    if compared:
        answer["findings"]["minItems"] = 1
        answer = _after(answer, "findings", "comparison", _text(bounds.comparison_chars, language))
    return {
        "type": "object",
        "properties": answer,
        "required": list(answer),
        "additionalProperties": False,
    }


def _after(properties: dict[str, Any], key: str, new_key: str, value: Any) -> dict[str, Any]:
    """``properties`` with ``new_key`` inserted right after ``key`` (the grammar keeps this order)."""
    out: dict[str, Any] = {}
    for name, item in properties.items():
        out[name] = item
        if name == key:
            out[new_key] = value
    return out


def schema_json(schema: dict[str, Any]) -> str:
    """Text of a schema (the grammar cache key); property order is kept, the grammar follows it."""
    return json.dumps(schema, ensure_ascii=True)  # key order is the answer order: never sort


def max_answer_tokens(bounds: SchemaBounds = SchemaBounds(), language: str = "en", n_images: int = 1,
                      localisation: str = "box", compared: bool = False) -> int:
    """Upper bound on the tokens of any answer the schema admits (+1 for the stop token).

    Worst case is one token per byte: the fixed JSON text (keys, quotes, commas) counted from a
    filled-in example, plus every string at its bound (3 bytes per character for Chinese) and
    every number at its longest. Byte-fallback tokenizers never need more than one token a byte.
    """
    per_char = 3 if language == "zh" else 1
    index_digits = len(str(max(int(n_images), 1)))
    longest_type = max(len(t) for t in FINDING_TYPES)
    one_finding = {
        "finding_type": "x" * longest_type,
        "location": "",
        "description": "",
        "size_mm": 998.999999,  # the longest number the grammar allows (six decimals)
        **({"slice": int("9" * index_digits)} if localisation == "slice"
           else {"box_2d": [1000, 1000, 1000, 1000], "image_index": int("9" * index_digits)}),
        **({"change": max(CHANGE_VALUES, key=len)} if compared else {}),
    }
    skeleton = {
        "findings": [one_finding] * bounds.max_findings,
        "impression": "",
        "recommendation": "",
        "image_quality": "adequate",
        "triage": max(TRIAGE_VALUES, key=len),
        **({"comparison": ""} if compared else {}),
    }
    fixed = len(json.dumps(skeleton, separators=(", ", ": ")).encode("utf-8")) + 4  # slack for "-0.x" forms
    strings = (bounds.max_findings * (bounds.location_chars + bounds.description_chars)
               + bounds.impression_chars + bounds.recommendation_chars
               + (bounds.comparison_chars if compared else 0))
    return fixed + per_char * strings + 1


def engine_bounds(engine_config: object) -> SchemaBounds:
    """SchemaBounds from ``[engine] max_findings`` and ``max_text_chars`` (locations stay short)."""
    chars = int(getattr(engine_config, "max_text_chars", 300))
    return SchemaBounds(max_findings=int(getattr(engine_config, "max_findings", 6)),
                        location_chars=min(60, chars), description_chars=chars, impression_chars=chars,
                        recommendation_chars=chars, comparison_chars=chars)
