"""Grammar-constrained answers on the tiny random model: always schema-valid JSON, batched, OOM-safe."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from scp_node.engine.answer import render_text
from scp_node.engine.medgemma import EngineError, MedGemmaEngine
from scp_node.engine.preprocess import SeriesSkipped
from scp_node.engine.result import AnalysisResult
from scp_node.engine.schema import SchemaBounds, findings_schema, max_answer_tokens, schema_json, text_pattern

from .conftest import DATA, SMALL_BOUNDS, XRAY_DIR, need

CJK_OK = set(range(0x3000, 0x3040)) | set(range(0x4E00, 0xA000)) | set(range(0xFF01, 0xFF5F))


def _chat(words: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe the chest " * words}]}]


@pytest.mark.parametrize("language", ["en", "zh"])
def test_constrained_batch_is_always_schema_valid(structured_engine, language: str) -> None:
    """Rows of different prompt lengths (left padding) finish at different steps; all parse."""
    bounds = SchemaBounds(**SMALL_BOUNDS)
    schema = findings_schema(bounds, language, n_images=3)
    limit = max_answer_tokens(bounds, language, 3)
    outputs = structured_engine.generate_batch([_chat(n) for n in (1, 4, 9, 2)], [schema_json(schema)] * 4, limit)
    for output in outputs:
        answer = json.loads(output.text)
        jsonschema.validate(answer, schema)
        assert output.generated_tokens <= limit
        text = json.dumps(answer, ensure_ascii=False)
        assert "\ufffd" not in text and "<" not in "".join(answer["impression"])  # no special tokens as text
        for ch in text:
            assert 0x20 <= ord(ch) < 0x7F or (language == "zh" and ord(ch) in CJK_OK), repr(ch)


def test_text_pattern_bounds_and_excludes_quotes_and_controls() -> None:
    import re

    pattern = re.compile(text_pattern(5, "zh"))
    assert pattern.match("肺部清晰") and pattern.match("a b!~")
    assert not pattern.match("abcdef") and not pattern.match('a"b') and not pattern.match("a\\b")
    assert not pattern.match("a\nb") and not pattern.match("\x7f")
    assert not re.match(text_pattern(5, "en"), "肺")
    with pytest.raises(ValueError):
        text_pattern(5, "fr")


def test_token_bound_covers_the_longest_answer(structured_engine) -> None:
    """The most expensive answer the schema admits, one byte per token, fits into the bound."""
    bounds = SchemaBounds(**SMALL_BOUNDS)
    for language, char in (("en", "x"), ("zh", "肺")):
        finding = {"finding_type": "pulmonary_edema", "location": char * bounds.location_chars,
                   "description": char * bounds.description_chars, "size_mm": 998.999999,
                   "box_2d": [1000, 1000, 1000, 1000], "image_index": 85}
        answer = {"findings": [finding] * bounds.max_findings, "impression": char * bounds.impression_chars,
                  "recommendation": char * bounds.recommendation_chars, "image_quality": "adequate",
                  "triage": "abnormal"}
        jsonschema.validate(answer, findings_schema(bounds, language, 85))
        n_bytes = len(json.dumps(answer, separators=(", ", ": "), ensure_ascii=False).encode("utf-8"))
        assert n_bytes + 1 <= max_answer_tokens(bounds, language, 85)


def test_structured_analysis_of_chest_xrays_in_one_batch(structured_engine) -> None:
    paths = [need(XRAY_DIR / n) for n in ("CR-MONO1-10-chest_barre.dcm", "DX_chest_canon_966_fixed_J2KR.dcm")]
    sr = need(DATA / "sr_examples" / "dcmqi" / "sr.dcm")
    results = structured_engine.analyse_batch([[paths[0]], [sr], [paths[1]]])
    assert isinstance(results[1], SeriesSkipped) and "Structured Report" in results[1].reason
    for result, path in ((results[0], paths[0]), (results[2], paths[1])):
        assert isinstance(result, AnalysisResult)
        assert result.structured is not None and result.parse_error == "" and result.language == "en"
        assert result.findings_text == render_text(result.structured, "en")
        assert result.sources[0].sop_instance_uid == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        for finding in result.structured.findings:
            if finding.region is not None:
                assert 0 <= finding.region.row0 <= finding.region.row1 and finding.region.source_index == 0


def test_oom_halves_the_batch_and_loses_no_job(model_dir: Path) -> None:
    xray = need(XRAY_DIR / "CR-MONO1-10-chest_barre.dcm")
    engine = MedGemmaEngine(model_dir, device="cpu", structured=False, max_new_tokens=4, max_batch=4, _oom_above=1)
    results = engine.analyse_batch([[xray]] * 4)
    assert all(isinstance(r, AnalysisResult) for r in results)
    assert engine.oom_backoffs == 3  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1

    engine._oom_above = 0  # out of memory even alone: each job gets its own error, none is lost
    results = engine.analyse_batch([[xray]] * 2)
    assert [type(r) for r in results] == [EngineError, EngineError]
    assert "out of memory" in str(results[0])
    with pytest.raises(EngineError):
        engine.analyse_series([xray])


def test_undecodable_pixel_data_is_skipped_with_a_reason(tmp_path: Path, structured_engine) -> None:
    ds = pydicom.dcmread(need(XRAY_DIR / "RG1_UNCR.dcm"))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\x00not a jpeg 2000 codestream\x00"])
    ds["PixelData"].VR = "OB"
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    with pytest.raises(SeriesSkipped, match="cannot be decoded"):
        structured_engine.analyse_series([broken])


@pytest.mark.parametrize("language", ["en", "zh"])
def test_default_bounds_compile(structured_engine, language: str) -> None:
    """xgrammar 0.2.8 rejects repetition bounds above ~100; long strings are chained pieces."""
    import re

    structured_engine._grammar_factory().compile(schema_json(findings_schema(SchemaBounds(), language, 85)))
    pattern = re.compile(text_pattern(300, language))
    assert pattern.match("a" * 300) and not pattern.match("a" * 301) and pattern.match("")
