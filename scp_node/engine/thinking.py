"""Remove MedGemma 1.5's thinking trace from generated output.

MedGemma 1.5 may emit its reasoning between ``<unused94>`` and ``<unused95>`` before the answer, even
when not asked to think. The trace is not part of the finding and must not reach the SR. We cut it at
token level (robust whether or not the tokenizer treats the markers as special tokens) and again at
text level (in case a marker was produced as plain text).
"""

from __future__ import annotations

import re
from typing import Sequence

THINKING_START = "<unused94>"
THINKING_END = "<unused95>"
_TRACE = re.compile(re.escape(THINKING_START) + r".*?" + re.escape(THINKING_END), re.DOTALL)


def drop_thinking_ids(ids: Sequence[int], start_id: int | None, end_id: int | None) -> list[int]:
    """Token ids without any ``start ... end`` spans; an unclosed trace drops everything after start."""
    if start_id is None:
        return list(ids)
    out: list[int] = []
    inside = False
    for token in ids:
        if not inside and token == start_id:
            inside = True
        elif inside and token == end_id:
            inside = False
        elif not inside and token != end_id:
            out.append(token)
    return out


def strip_thinking_trace(text: str) -> str:
    """Text without thinking traces; an unclosed trace (generation cut off) removes the rest."""
    text = _TRACE.sub("", text)
    start = text.find(THINKING_START)
    if start >= 0:
        text = text[:start]
    return text.replace(THINKING_END, "").strip()
