"""Parsing the model's answer: fenced, bare, thinking trace, broken, Chinese; boxes; quality gate."""

from __future__ import annotations

import json

import pytest

from scp_node.engine.answer import (QUALITY_LIMITED_TEXT, AnswerParseError, extract_json, parse_answer,
                                    region_for, render_text, to_structured)
from scp_node.engine.preprocess import PadTransform
from scp_node.engine.result import Finding, StructuredFindings

ANSWER = {
    "findings": [{"finding_type": "pleural_effusion", "location": "left base", "description": "small effusion",
                  "size_mm": 12.5, "box_2d": [600, 500, 800, 700], "image_index": None}],
    "impression": "Small left pleural effusion.",
    "recommendation": "Clinical correlation.",
    "image_quality": "adequate",
    "triage": "abnormal",
}


@pytest.mark.parametrize("wrap", [
    lambda t: t,
    lambda t: f"```json\n{t}\n```",
    lambda t: f"Here is the report:\n```\n{t}\n```\nDone.",
    lambda t: f"Sure. {t} Anything else?",
    lambda t: f"<unused94>thought: the {{effusion}} is left<unused95>```json\n{t}\n```",
    lambda t: f"<unused94>thinking that was cut off {{ never closed",  # no answer at all: handled below
])
def test_json_is_found_fenced_bare_or_after_a_thinking_trace(wrap) -> None:  # type: ignore[no-untyped-def]
    text = wrap(json.dumps(ANSWER))
    if "never closed" in text:
        with pytest.raises(AnswerParseError):
            extract_json(text)
        return
    assert extract_json(text) == ANSWER


def test_broken_json_keeps_no_structure_and_says_why() -> None:
    structured, error = parse_answer('{"findings": [{"finding_type": "nodule", "location": ')
    assert structured is None and error.startswith("invalid JSON")
    structured, error = parse_answer("The lungs are clear. No acute findings.")
    assert structured is None and error == "the answer holds no JSON object"


def test_chinese_text_stays_intact() -> None:
    answer = dict(ANSWER, impression="左侧少量胸腔积液。", findings=[])
    structured, error = parse_answer("```json\n" + json.dumps(answer, ensure_ascii=False) + "\n```", language="zh")
    assert error == "" and structured is not None
    assert structured.impression == "左侧少量胸腔积液。"
    text = render_text(structured, "zh")
    assert "印象: 左侧少量胸腔积液。" in text and "未列出所见" in text


def test_structured_values_are_validated_leniently() -> None:
    data = {"findings": [{"finding_type": "granuloma", "size_mm": -3, "box_2d": [1, 2, 3]}, "junk"],
            "triage": "panic", "image_quality": "great"}
    s = to_structured(data)
    assert s.image_quality == "adequate" and s.triage == "abnormal"
    assert s.findings == (Finding(finding_type="other", description="granuloma"),)


def test_box_maps_back_to_source_pixels_through_the_padding() -> None:
    # A 1000 x 500 (rows x cols) image sits in a 1000-pixel square with 250 columns of padding left.
    transform = PadTransform.for_shape(1000, 500)
    region = region_for([800, 300, 600, 100], None, [transform])  # y1 < y0 and x1 < x0: put in order
    assert region is not None
    assert region.box_2d == (600, 100, 800, 300) and region.source_index == 0
    assert (region.row0, region.col0, region.row1, region.col1) == (600.0, 0.0, 800.0, 50.0)  # clipped at col 0
    assert region_for([0, 0, 1000, 200], None, [transform]) is None  # wholly in the padding
    assert region_for([0, 0, 1200, 1200], 2, [transform]) is None  # no image 2
    volume = [PadTransform.for_shape(512, 512)] * 3
    region = region_for([0, 0, 500, 1000], 3, volume)
    assert region is not None and region.source_index == 2 and (region.row1, region.col1) == (256.0, 512.0)
    assert region_for([0, 0, 500, 1000], None, volume) is None  # a volume box needs its slice


def test_parsed_answer_carries_regions_and_renders_as_text() -> None:
    structured, error = parse_answer(json.dumps(ANSWER), [PadTransform.for_shape(1000, 1000)])
    assert error == "" and structured is not None
    [finding] = structured.findings
    assert finding.region is not None and finding.region.row0 == 600.0 and finding.size_mm == 12.5
    text = render_text(structured)
    assert text.splitlines()[:2] == ["FINDINGS:", "- pleural effusion, left base: small effusion (12.5 mm)"]
    assert "IMPRESSION: Small left pleural effusion." in text and text.endswith("TRIAGE: abnormal")


@pytest.mark.parametrize("language", ["en", "zh"])
def test_quality_gate_replaces_findings(language: str) -> None:
    structured = to_structured(dict(ANSWER, image_quality="limited"), language=language)
    assert structured.image_quality == "limited" and structured.findings == ()
    assert render_text(structured, language) == QUALITY_LIMITED_TEXT[language]
    assert "consider repeating" in QUALITY_LIMITED_TEXT["en"]


def test_empty_structure_renders() -> None:
    assert render_text(StructuredFindings()) == "FINDINGS:\nNo findings listed.\nTRIAGE: normal"
