"""Comparison with a prior study (scp_node.engine.longitudinal): the input layout of Google's
longitudinal CXR notebook (prior first, current second, question last), the slice budget of two
volumes, the schema's "change" and "comparison", their parsing, and the tiny model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pydicom
import pytest

from scp_node.engine.answer import change_value, parse_answer, render_text, to_structured
from scp_node.engine.longitudinal import (PriorInput, conversation, frontal_paths, longitudinal_messages,
                                          prepare_with_prior, readable_date)
from scp_node.engine.medgemma import MedGemmaEngine
from scp_node.engine.preprocess import DEFAULT_CT_MAX_SLICES, SeriesSkipped
from scp_node.engine.prompts import answer_format, extraction_messages, profile_for_modality
from scp_node.engine.result import CHANGE_VALUES, AnalysisResult, PriorStudy
from scp_node.engine.schema import SchemaBounds, findings_schema, max_answer_tokens

from .conftest import DATA, SMALL_BOUNDS, XRAY_DIR, need

PRIOR_CXR = "CR-MONO1-10-chest_barre.dcm"  # CR, PA, MONOCHROME1, no StudyDate
CURRENT_CXR = "RG1_UNCR.dcm"  # CR, PA, MONOCHROME1, StudyDate 20040826


def _prior(paths: list[Path], date: str = "20030301", interval: int | None = None) -> PriorStudy:
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return PriorStudy(study_instance_uid=str(first.StudyInstanceUID), series_instance_uid=str(first.SeriesInstanceUID),
                      study_date=date, paths=tuple(str(p) for p in paths), source="local", interval_days=interval)


def _cxr_pair() -> tuple[list[Path], PriorStudy]:
    return [need(XRAY_DIR / CURRENT_CXR)], _prior([need(XRAY_DIR / PRIOR_CXR)])


def _prepare(paths: list[Path], prior: PriorStudy | None, max_slices: int = DEFAULT_CT_MAX_SLICES):
    return prepare_with_prior(paths, prior, image_size=896, ct_max_slices=max_slices, mr_max_slices=max_slices)


def _items(message: dict) -> list[tuple[str, str | None]]:
    return [(item["type"], item.get("text")) for item in message["content"]]


# -- the input layout ---------------------------------------------------------------------------


def test_cxr_prior_first_current_second_each_dated_question_last() -> None:
    paths, prior = _cxr_pair()
    current, pair, comparison = _prepare(paths, prior)
    assert comparison is None and pair is not None
    assert len(current.images) == 1 and len(pair.prepared.images) == 1  # one frontal image each, as the notebook
    assert pair.current_date == "20040826" and pair.interval_days == 544  # from the headers when not given
    profile = profile_for_modality(current.modality)
    system, user = longitudinal_messages(current, pair, profile, structured=False)
    assert _items(system) == [("text", "You are an expert radiologist.")]
    items = _items(user)
    assert [t for t, _ in items] == ["text", "image", "text", "image", "text"]
    assert items[0][1] == "PRIOR STUDY (2003-03-01):" and items[2][1] == "CURRENT STUDY (2004-08-26):"
    assert user["content"][1]["image"] is pair.prepared.images[0] and user["content"][3]["image"] is current.images[0]
    question = items[4][1]
    assert question.startswith("Describe this X-ray. Compare the CURRENT study with the PRIOR study above, 544 days earlier")
    assert "resolved" in question and "JSON" not in question  # the report turn asks for prose


def test_cxr_rendered_prompt_has_the_blank_line_before_the_question(engine) -> None:  # type: ignore[no-untyped-def]
    paths, prior = _cxr_pair()
    current, pair, _ = _prepare(paths, prior)
    messages = longitudinal_messages(current, pair, profile_for_modality("CR"))
    processor = engine._processor
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    boi = processor.boi_token
    assert text.index("PRIOR STUDY (2003-03-01):") < text.index(boi) < text.index("CURRENT STUDY (2004-08-26):")
    assert text.rindex(boi) < text.index("Describe this X-ray.")
    # the processor expands each image to "\n\n<start_of_image>...<end_of_image>\n\n": a blank line follows it
    assert processor.full_image_sequence.endswith("\n\n")
    assert text.count(boi) == 2


def test_ct_prior_and_current_share_the_slice_budget_and_keep_slice_k_for_the_current(ct_files) -> None:  # type: ignore[no-untyped-def]
    prior = _prior(ct_files, "19991202", interval=30)
    current, pair, comparison = _prepare(ct_files, prior)
    assert comparison is None and pair is not None
    n_prior, n_current = len(pair.prepared.images), len(current.images)
    assert n_prior == DEFAULT_CT_MAX_SLICES // 2 and n_prior + n_current == DEFAULT_CT_MAX_SLICES  # 42 + 43
    profile = profile_for_modality("CT", body_part=current.body_part, n_images=n_current)
    [user] = longitudinal_messages(current, pair, profile, structured=True)
    items = _items(user)
    images = [k for k, (t, _) in enumerate(items) if t == "image"]
    assert len(images) == n_prior + n_current <= DEFAULT_CT_MAX_SLICES
    assert items[0][1].startswith("You are an instructor") and items[0][1].endswith("carefully.\n\nPRIOR STUDY (1999-12-02):")
    prior_labels = [items[k + 1][1] for k in images[:n_prior]]
    assert prior_labels[:-1] == [f"PRIOR SLICE {k}" for k in range(1, n_prior)]
    assert prior_labels[-1] == f"PRIOR SLICE {n_prior}\n\nCURRENT STUDY (2000-01-01):"
    current_labels = [items[k + 1][1].split("\n\n")[0] for k in images[n_prior:]]
    assert current_labels == [f"SLICE {k}" for k in range(1, n_current + 1)]
    last = items[-1][1]
    assert last.startswith(f"SLICE {n_current}\n\nBased on the visual evidence")
    assert "30 days earlier" in last and "are those of the CURRENT study" in last and '"change"' in last
    assert f"1 to {n_current}" in last  # slice numbers range over the current series
    # the sources stay apart: the current's for findings, the prior's for the comparison
    assert len(current.sources) == n_current and len(pair.comparison().prior_sources) == n_prior


def test_a_small_budget_still_gives_the_current_series_the_larger_share(ct_files) -> None:  # type: ignore[no-untyped-def]
    current, pair, _ = _prepare(ct_files, _prior(ct_files, "20000101"), max_slices=11)
    assert pair is not None and (len(pair.prepared.images), len(current.images)) == (5, 6)


def test_an_unreadable_prior_is_not_comparable_and_the_series_is_analysed_alone(tmp_path: Path) -> None:
    paths, prior = _cxr_pair()
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 10)
    broken = PriorStudy("1.2.9", "1.2.9.1", "20030301", (str(junk),))
    current, pair, comparison = _prepare(paths, broken)
    assert pair is None and comparison is not None and comparison.status == "not_comparable"
    assert comparison.reason.startswith("prior images could not be read: ") and comparison.prior_series_instance_uid == "1.2.9.1"
    assert len(current.images) == 1
    sr = PriorStudy("1.2.9", "1.2.9.1", "20030301", (str(need(DATA / "sr_examples" / "dcmqi" / "sr.dcm")),))
    assert "Structured Report" in _prepare(paths, sr)[2].reason
    empty = PriorStudy("1.2.9", "1.2.9.1", "20030301", ())
    assert _prepare(paths, empty)[2].status == "not_comparable"


def test_a_prior_of_another_modality_is_not_comparable(ct_files) -> None:  # type: ignore[no-untyped-def]
    paths, _ = _cxr_pair()
    current, pair, comparison = _prepare(paths, _prior(ct_files[:6]))
    assert pair is None and comparison.status == "not_comparable" and "CT" in comparison.reason
    assert current.modality == "CR"


def test_frontal_views_are_preferred_and_dates_are_readable() -> None:
    paths = [need(XRAY_DIR / "NIH_chestxray_DX_SC.dcm"), need(XRAY_DIR / CURRENT_CXR)]  # no ViewPosition, PA
    assert frontal_paths(paths) == [paths[1]]
    assert frontal_paths(paths[:1]) == paths[:1]
    assert readable_date("20260304") == "2026-03-04" and readable_date("") == "date unknown"
    # a current series without StudyDate: its date is the prior's plus the interval
    undated = need(XRAY_DIR / PRIOR_CXR)
    _, pair, _ = _prepare([undated], _prior([need(XRAY_DIR / CURRENT_CXR)], "20040826", interval=10))
    assert pair.current_date == "20040905" and pair.interval_days == 10


# -- the answer: schema, prompt text, parsing ----------------------------------------------------


def test_schema_has_change_and_comparison_only_with_a_prior() -> None:
    bounds = SchemaBounds(**SMALL_BOUNDS)
    for localisation in ("box", "slice"):
        plain = findings_schema(bounds, "en", 3, localisation)
        assert plain == findings_schema(bounds, "en", 3, localisation, compared=False)
        assert "comparison" not in plain["properties"]
        assert "change" not in plain["properties"]["findings"]["items"]["properties"]
        schema = findings_schema(bounds, "en", 3, localisation, compared=True)
        finding = schema["properties"]["findings"]["items"]
        assert finding["properties"]["change"] == {"enum": list(CHANGE_VALUES)} and "change" in finding["required"]
        assert list(finding["properties"]).index("change") == list(finding["properties"]).index("description") + 1
        assert "comparison" in schema["required"] and list(schema["properties"])[:2] == ["findings", "comparison"]
    assert "change" not in answer_format(3, True) and '"change"' in answer_format(3, True, compared=True)
    assert '"comparison"' in answer_format(1, True, "en", "slice", compared=True)


def test_token_bound_covers_the_longest_compared_answer() -> None:
    bounds = SchemaBounds(**SMALL_BOUNDS)
    for language, char in (("en", "x"), ("zh", "肺")):
        finding = {"finding_type": "pulmonary_edema", "location": char * bounds.location_chars,
                   "description": char * bounds.description_chars, "change": "worsened", "size_mm": 998.999999,
                   "slice": 85}
        answer = {"findings": [finding] * bounds.max_findings, "comparison": char * bounds.comparison_chars,
                  "impression": char * bounds.impression_chars, "recommendation": char * bounds.recommendation_chars,
                  "image_quality": "adequate", "triage": "abnormal"}
        jsonschema.validate(answer, findings_schema(bounds, language, 85, "slice", compared=True))
        n_bytes = len(json.dumps(answer, separators=(", ", ": "), ensure_ascii=False).encode("utf-8"))
        assert n_bytes + 1 <= max_answer_tokens(bounds, language, 85, "slice", compared=True)
        assert max_answer_tokens(bounds, language, 85, "slice", compared=True) > max_answer_tokens(bounds, language, 85, "slice")


def test_change_values_are_parsed_and_a_resolved_finding_has_no_place_on_the_current_images() -> None:
    data = {"findings": [
        {"finding_type": "consolidation", "description": "RLL", "change": "worsened", "slice": 2},
        {"finding_type": "pleural_effusion", "description": "left", "change": "Unchanged", "slice": 1},
        {"finding_type": "nodule", "description": "gone", "change": "resolved", "slice": 3},
        {"finding_type": "mass", "description": "?", "change": "bigger-ish", "slice": 1},
    ], "comparison": "Consolidation worse since the prior.", "impression": "x", "recommendation": "",
        "image_quality": "adequate", "triage": "abnormal"}
    three = [object()] * 3
    structured = to_structured(data, three, compared=True)
    assert [f.change for f in structured.findings] == ["worsened", "stable", "resolved", ""]
    assert [f.source_index for f in structured.findings] == [1, 0, None, 0]
    assert structured.comparison == "Consolidation worse since the prior."
    assert "COMPARISON: Consolidation worse" in render_text(structured) and "[worsened]" in render_text(structured)
    plain = to_structured(data, three)  # no prior compared: the fields stay empty, the report as before
    assert {f.change for f in plain.findings} == {""} and plain.comparison == ""
    assert "COMPARISON" not in render_text(plain)
    assert all(change_value(v) == v for v in CHANGE_VALUES) and change_value(None) == ""
    free, error = parse_answer("Here:\n```json\n" + json.dumps(data) + "\n```", three, compared=True)  # "free" mode
    assert error == "" and free.findings[0].change == "worsened" and free.comparison


def test_extraction_turn_asks_for_the_change_only_after_a_compared_report() -> None:
    report = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert '"change"' in extraction_messages(report, "r", n_images=1, compared=True)[-1]["content"][0]["text"]
    assert '"change"' not in extraction_messages(report, "r", n_images=1)[-1]["content"][0]["text"]


# -- the tiny model end to end -------------------------------------------------------------------


def _check_compared(result: AnalysisResult, prior: PriorStudy, current: Path) -> None:
    assert isinstance(result, AnalysisResult), result
    assert result.comparison is not None and result.comparison.status == "compared", result.comparison
    assert result.comparison.prior_series_instance_uid == prior.series_instance_uid
    assert result.comparison.interval_days == 544 and result.comparison.prior_study_date == "20030301"
    prior_uid = pydicom.dcmread(prior.paths[0], stop_before_pixels=True).SOPInstanceUID
    assert [s.sop_instance_uid for s in result.comparison.prior_sources] == [prior_uid]
    assert [s.sop_instance_uid for s in result.sources] == [pydicom.dcmread(current, stop_before_pixels=True).SOPInstanceUID]
    assert result.structured is not None and result.parse_error == "", result.parse_error
    for finding in result.structured.findings:
        assert finding.change in CHANGE_VALUES  # the grammar makes it required
        if finding.region is not None:
            assert finding.region.source_index == 0


def test_structured_mode_with_a_prior_and_without_in_one_batch(structured_engine) -> None:  # type: ignore[no-untyped-def]
    paths, prior = _cxr_pair()
    other = need(XRAY_DIR / "DX_chest_canon_966_fixed_J2KR.dcm")
    with_prior, without = structured_engine.analyse_batch([paths, [other]], priors=[prior, None])
    _check_compared(with_prior, prior, paths[0])
    assert isinstance(without, AnalysisResult) and without.comparison is None
    assert without.structured is not None and {f.change for f in without.structured.findings} <= {""}
    assert without.structured.comparison == ""


def test_report_mode_with_a_prior(model_dir: Path) -> None:
    engine = MedGemmaEngine(model_dir, device="cpu", answer_mode="report", max_new_tokens=12,
                            schema_bounds=SchemaBounds(**SMALL_BOUNDS))
    paths, prior = _cxr_pair()
    result = engine.analyse_series(paths, prior=prior)
    _check_compared(result, prior, paths[0])
    assert [t.name for t in result.turns] == ["report", "extraction"]
    assert result.turns[0].input_tokens > 2 * 256  # both images went in


def test_an_unreadable_prior_costs_the_comparison_not_the_analysis(structured_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = _cxr_pair()
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 300)
    result = structured_engine.analyse_series(paths, prior=PriorStudy("1.2.9", "1.2.9.1", "20030301", (str(junk),)))
    assert result.comparison.status == "not_comparable" and "prior images could not be read" in result.comparison.reason
    assert result.structured is not None and {f.change for f in result.structured.findings} <= {""}


def test_a_current_series_that_cannot_be_analysed_still_fails_with_a_prior(structured_engine) -> None:  # type: ignore[no-untyped-def]
    _, prior = _cxr_pair()
    sr = need(DATA / "sr_examples" / "dcmqi" / "sr.dcm")
    [result] = structured_engine.analyse_batch([[sr]], priors=[prior])
    assert isinstance(result, SeriesSkipped)
    with pytest.raises(ValueError):
        structured_engine.analyse_batch([[sr]], priors=[])


def test_both_backends_build_the_same_conversation() -> None:
    paths, prior = _cxr_pair()
    current, pair, _ = _prepare(paths, prior)
    assert isinstance(pair, PriorInput)
    profile = profile_for_modality("CR")
    bounds = SchemaBounds(**SMALL_BOUNDS)
    for mode in ("report", "structured", "free"):
        talk = conversation(current, profile, pair, answer_mode=mode, language="en", thinking=True, bounds=bounds)
        assert talk.compared and "change" in talk.schema["properties"]["findings"]["items"]["properties"]
        system = talk.messages[0]["content"][0]["text"]
        assert system.startswith("SYSTEM INSTRUCTION: think silently") == (mode != "structured")


def test_the_grammar_requires_a_change_for_every_finding(structured_engine) -> None:  # type: ignore[no-untyped-def]
    """What the constrained answer of the tiny model cannot show (its findings list comes out empty):
    the compiled grammar takes a finding with its change and refuses one without."""
    import xgrammar as xgr

    from scp_node.engine.schema import schema_json

    schema = schema_json(findings_schema(SchemaBounds(**SMALL_BOUNDS), "en", 1, "box", compared=True))
    grammar = structured_engine._grammar_factory().compile(schema)
    finding = {"finding_type": "consolidation", "location": "right lower", "description": "denser",
               "change": "worsened", "size_mm": None, "box_2d": [100, 100, 300, 300], "image_index": None}
    answer = {"findings": [finding], "comparison": "Worse.", "impression": "Worse.", "recommendation": "",
              "image_quality": "adequate", "triage": "abnormal"}

    def accepts(value: dict) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        return matcher.accept_string(json.dumps(value, separators=(", ", ": "))) and matcher.is_completed()

    assert accepts(answer)
    assert not accepts({**answer, "findings": [{k: v for k, v in finding.items() if k != "change"}]})
    assert not accepts({**answer, "findings": [{**finding, "change": "unchanged"}]})
    assert not accepts({k: v for k, v in answer.items() if k != "comparison"})
