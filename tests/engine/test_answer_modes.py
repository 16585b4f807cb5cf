"""Answer modes on the tiny random model: "report" (free-text report, then a grammar-constrained
extraction turn of the same conversation), "structured" (one JSON answer) and "free"."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from scp_node.engine.medgemma import MedGemmaEngine
from scp_node.engine.prompts import EXTRACTION_QUESTION, build_messages, extraction_messages, profile_for_modality
from scp_node.engine.schema import SchemaBounds, findings_schema

from .conftest import SMALL_BOUNDS, XRAY_DIR, need
from .test_prompts import _collapse_images, _prepared, _render


@pytest.fixture(scope="module")
def report_engine(model_dir: Path) -> MedGemmaEngine:
    eng = MedGemmaEngine(model_dir, device="cpu", max_new_tokens=12, schema_bounds=SchemaBounds(**SMALL_BOUNDS),
                         max_batch=4)
    eng.load()
    return eng


def test_extraction_is_a_second_turn_of_the_same_conversation() -> None:
    prepared = _prepared("CT", 6, "CHEST")
    report_messages = build_messages(prepared, profile_for_modality("CT", n_images=6))
    messages = extraction_messages(report_messages, "  Nodule on SLICE 3.\n", "zh", localisation="slice")
    assert messages[:-2] == report_messages and messages[0] is not report_messages[0]  # copies, same content
    assert messages[-2] == {"role": "assistant", "content": [{"type": "text", "text": "Nodule on SLICE 3."}]}
    question = messages[-1]["content"][0]["text"]
    assert messages[-1]["role"] == "user" and question.startswith(EXTRACTION_QUESTION)
    assert '"slice"' in question and "1 to 6" in question and "box_2d" not in question
    assert "Simplified Chinese" in question
    cxr = extraction_messages(build_messages(_prepared("DX", 1), profile_for_modality("DX")), "Normal.", "en")
    assert [m["role"] for m in cxr] == ["system", "user", "assistant", "user"]
    assert '"box_2d"' in cxr[-1]["content"][0]["text"]


def test_extraction_renders_as_a_gemma_conversation(engine) -> None:  # type: ignore[no-untyped-def]
    report_messages = build_messages(_prepared("CR", 1), profile_for_modality("CR"))
    layout = _collapse_images(_render(engine, extraction_messages(report_messages, "No acute finding.", "en")))
    assert layout.startswith("<bos><start_of_turn>user\nYou are an expert radiologist.\n\n\n\n<IMG>\n\n"
                             "Describe this X-ray<end_of_turn>\n<start_of_turn>model\nNo acute finding.<end_of_turn>\n"
                             "<start_of_turn>user\nNow give the findings of your report above as structured data.")
    assert layout.endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_report_mode_keeps_the_models_report_and_extracts_valid_json(report_engine) -> None:  # type: ignore[no-untyped-def]
    files = [need(XRAY_DIR / "CR-MONO1-10-chest_barre.dcm"), need(XRAY_DIR / "NIH_chestxray_DX_SC.dcm")]
    [cr, dx] = report_engine.analyse_batch([[files[0]], [files[1]]])
    for result in (cr, dx):
        assert result.answer_mode == "report"
        assert [t.name for t in result.turns] == ["report", "extraction"]
        report, extraction = result.turns
        assert 1 <= report.new_tokens <= 12 and report.seconds > 0
        assert extraction.input_tokens > report.input_tokens  # the report and the question come on top
        assert result.generated_tokens == report.new_tokens + extraction.new_tokens
        assert result.structured is not None and result.parse_error == ""
        assert result.seconds >= result.prepare_seconds + report.seconds
    # the SR's text is the model's own report (the same greedy text as a plain first turn), not a rendering
    prepared = report_engine.prepare([files[0]])
    first = report_engine.generate(build_messages(prepared, profile_for_modality("CR")), max_new_tokens=12)
    assert cr.findings_text == first.text or (not first.text.strip() and cr.findings_text.startswith("FINDINGS"))


def test_report_mode_extraction_follows_the_schema(report_engine) -> None:  # type: ignore[no-untyped-def]
    prepared = report_engine.prepare([need(XRAY_DIR / "CR-MONO1-10-chest_barre.dcm")])
    messages = extraction_messages(build_messages(prepared, profile_for_modality("CR")), "A small effusion.", "en")
    schema = findings_schema(report_engine.schema_bounds, "en", 1)
    [output] = report_engine.generate_batch([messages], [json.dumps(schema)], 700)
    jsonschema.validate(json.loads(output.text), schema)


def test_report_budget_is_the_profiles_below_max_new_tokens(model_dir: Path) -> None:
    eng = MedGemmaEngine(model_dir, device="cpu")
    assert eng.answer_mode == "report" and eng.max_new_tokens == 2000
    assert eng.report_budget(profile_for_modality("CT", n_images=85)) == 2000
    assert eng.report_budget(profile_for_modality("DX")) == 500
    thinking = MedGemmaEngine(model_dir, device="cpu", thinking=True, max_new_tokens=3000)
    assert thinking.report_budget(profile_for_modality("DX")) == 1500
    assert MedGemmaEngine(model_dir, device="cpu", max_new_tokens=64).report_budget(profile_for_modality("CT")) == 64
    assert MedGemmaEngine(model_dir, device="cpu", structured=True).answer_mode == "structured"
    assert MedGemmaEngine(model_dir, device="cpu", structured=False).answer_mode == "free"
    with pytest.raises(ValueError, match="answer_mode"):
        MedGemmaEngine(model_dir, device="cpu", answer_mode="both")


def test_other_modes_have_one_turn(engine, structured_engine) -> None:  # type: ignore[no-untyped-def]
    path = need(XRAY_DIR / "CR-MONO1-10-chest_barre.dcm")
    free = engine.analyse_series([path])
    assert free.answer_mode == "free" and [t.name for t in free.turns] == ["answer"]
    structured = structured_engine.analyse_series([path])
    assert structured.answer_mode == "structured" and structured.structured is not None
    assert [t.name for t in structured.turns] == ["answer"]
    assert structured.turns[0].new_tokens == structured.generated_tokens


def test_extraction_continues_from_the_report_turns_kv_cache(model_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One series: the extraction turn prefills only its new tokens (not the image and the report
    again) and answers exactly as the re-rendered conversation does."""
    path = need(XRAY_DIR / "CR-MONO1-10-chest_barre.dcm")
    results, used = {}, []
    for reuse in (True, False):
        eng = MedGemmaEngine(model_dir, device="cpu", max_new_tokens=12, schema_bounds=SchemaBounds(**SMALL_BOUNDS))
        eng.reuse_cache = reuse
        real = eng.continue_turn

        def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = real(*args, **kwargs)
            used.append(out is not None)
            return out

        monkeypatch.setattr(eng, "continue_turn", spy)
        results[reuse] = eng.analyse_series([path])
    assert used == [True]  # the cache was used once (reuse on), never with reuse off
    cached, rendered = results[True], results[False]
    assert cached.findings_text == rendered.findings_text and cached.structured == rendered.structured
    assert [(t.name, t.input_tokens, t.new_tokens) for t in cached.turns] == \
        [(t.name, t.input_tokens, t.new_tokens) for t in rendered.turns]


def test_continue_turn_refuses_what_it_cannot_reproduce(report_engine) -> None:  # type: ignore[no-untyped-def]
    from scp_node.engine.medgemma import GenerationOutput

    messages = build_messages(_prepared("CR", 1), profile_for_modality("CR"))
    conversation = extraction_messages(messages, "No acute finding.", "en")
    no_cache = GenerationOutput("No acute finding.", 4, 300, 0.1)
    assert report_engine.continue_turn(no_cache, conversation, None, 8) is None
    [first] = report_engine.generate_batch([messages], [None], 6, keep_cache=True)
    start, end = report_engine._token_id("<unused94>"), report_engine._token_id("<unused95>")
    trace = GenerationOutput(first.text, 6, first.input_tokens, 0.1, cache=first.cache,
                             prompt_ids=first.prompt_ids, new_ids=(start, 5, end) + first.new_ids)  # a thinking trace
    assert report_engine.continue_turn(trace, conversation, None, 8) is None
