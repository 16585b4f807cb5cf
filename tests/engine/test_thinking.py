"""MedGemma 1.5's thinking trace never reaches the findings text."""

from __future__ import annotations

from scp_node.engine.thinking import drop_thinking_ids, strip_thinking_trace


def test_strip_closed_trace() -> None:
    assert strip_thinking_trace("<unused94>thought\nlet me look<unused95>No effusion.") == "No effusion."


def test_strip_unclosed_trace_removes_the_rest() -> None:
    assert strip_thinking_trace("Answer first. <unused94>thought that was cut off") == "Answer first."


def test_text_without_trace_is_kept() -> None:
    assert strip_thinking_trace("  Normal chest.\n") == "Normal chest."


def test_drop_ids() -> None:
    assert drop_thinking_ids([1, 94, 5, 6, 95, 7, 8], 94, 95) == [1, 7, 8]
    assert drop_thinking_ids([94, 5, 6], 94, 95) == []
    assert drop_thinking_ids([5, 6], None, None) == [5, 6]


def test_drop_ids_with_the_real_tokenizer(engine) -> None:
    tokenizer = engine._processor.tokenizer
    ids = tokenizer("<unused94>thought: the lungs<unused95>No acute findings.", add_special_tokens=False).input_ids
    start, end = tokenizer.convert_tokens_to_ids("<unused94>"), tokenizer.convert_tokens_to_ids("<unused95>")
    assert start in ids and end in ids
    kept = drop_thinking_ids(ids, start, end)
    assert tokenizer.decode(kept, skip_special_tokens=True) == "No acute findings."
