"""Prompt layout follows MedGemma 1.5: instruction, images (+ SLICE labels), question last."""

from __future__ import annotations

import pytest
from PIL import Image

from scp_node.engine.preprocess import PadTransform, PreparedSeries
from scp_node.engine.prompts import (
    DEFAULT_PROMPT_PROFILES,
    PromptProfile,
    build_messages,
    profile_for_modality,
)
from scp_node.engine.result import SourceImageRef


def _prepared(modality: str, n: int, body_part: str = "") -> PreparedSeries:
    images = [Image.new("RGB", (8, 8), (k, k, k)) for k in range(n)]
    label = "SLICE" if modality in ("CT", "MR") else "IMAGE"
    return PreparedSeries(
        modality=modality,
        body_part=body_part,
        images=images,
        labels=[f"{label} {k}" for k in range(1, n + 1)],
        sources=[SourceImageRef("1.2", f"1.2.{k}") for k in range(n)],
        transforms=[PadTransform.for_shape(8, 8)] * n,
    )


def test_ct_layout_instruction_images_with_labels_question_last() -> None:
    prepared = _prepared("CT", 3, body_part="CHEST")
    profile = profile_for_modality("CT")
    [message] = build_messages(prepared, profile)
    content = message["content"]
    assert message["role"] == "user"
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text", "image", "text", "text"]
    assert [c["text"] for c in content[2:7:2]] == ["SLICE 1", "SLICE 2", "SLICE 3"]
    assert content[1]["image"] is prepared.images[0] and content[5]["image"] is prepared.images[2]
    assert "CT scan of the chest" in content[0]["text"] and "3 axial slices" in content[0]["text"]
    assert content[-1]["text"].startswith("Based on the visual evidence in the slices provided above")
    assert profile.name == "ct-volume"


def test_cxr_layout_has_no_labels_and_defaults_to_chest() -> None:
    profile = profile_for_modality("DX")
    [message] = build_messages(_prepared("DX", 1), profile)
    assert [c["type"] for c in message["content"]] == ["text", "image", "text"]
    assert message["content"][-1]["text"].startswith("Describe this chest X-ray.")
    assert profile.name == "cxr-report"


def test_single_mr_slice_gets_no_label_and_unknown_body_part_is_left_out() -> None:
    [message] = build_messages(_prepared("MR", 1), profile_for_modality("MR"))
    assert [c["type"] for c in message["content"]] == ["text", "image", "text"]
    assert "MRI series." in message["content"][0]["text"]


def test_profiles_are_plain_data_and_validated() -> None:
    custom = {"mine": {"modalities": ["ct"], "instruction": "Look at the {modality} {unknown}.", "question": "Q?"}}
    profile = profile_for_modality("CT", custom)
    [message] = build_messages(_prepared("CT", 2), profile)
    assert message["content"][0]["text"] == "Look at the CT {unknown}."
    assert message["content"][-1]["text"] == "Q?"
    with pytest.raises(KeyError):
        profile_for_modality("US")
    with pytest.raises(ValueError, match="question"):
        PromptProfile.from_mapping("bad", {"instruction": "x"})
    assert set(DEFAULT_PROMPT_PROFILES) == {"cxr-report", "ct-volume", "mr-volume"}


def test_chat_template_renders_in_order(engine) -> None:
    prepared = _prepared("CT", 2, body_part="CHEST")
    messages = build_messages(prepared, profile_for_modality("CT"))
    text = engine._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    first_image = text.index("<start_of_image>")
    assert text.index("You are an expert radiologist") < first_image
    assert text.index("SLICE 1") > first_image and text.index("SLICE 2") > text.rindex("<start_of_image>")
    assert text.index("Based on the visual evidence") > text.index("SLICE 2")
    assert text.endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_configured_profiles_come_first_and_body_part_wins() -> None:
    from scp_node.engine.prompts import merged_profiles

    configured = {
        "ct-head": {"modalities": ["CT"], "body_parts": ["HEAD"], "instruction": "Head CT.", "question": "Bleed?",
                    "language": "zh"},
        "cxr-report": {"modalities": ["CR", "DX"], "instruction": "Site CXR.", "question": "Q?"},
    }
    profiles = merged_profiles(configured)
    assert list(profiles)[:2] == ["ct-head", "cxr-report"] and "mr-volume" in profiles
    head = profile_for_modality("CT", profiles, body_part="head")
    assert head.name == "ct-head" and head.language == "zh"
    assert profile_for_modality("CT", profiles, body_part="CHEST").name == "ct-volume"
    assert profile_for_modality("CT", profiles).name == "ct-volume"
    assert profile_for_modality("DX", profiles).instruction == "Site CXR."


@pytest.mark.parametrize("bad,message", [
    ({"modalities": ["CT"], "instruction": "x"}, "'question'"),
    ({"modalities": ["CT"], "instruction": "x", "question": "y", "language": "fr"}, "language"),
    ({"modalities": "CT", "instruction": "x", "question": "y"}, "list of strings"),
    ({"modalities": ["CT"], "instruction": "x", "question": "y", "colour": 1}, "unknown key"),
])
def test_bad_profiles_are_rejected(bad: dict, message: str) -> None:
    from scp_node.engine.prompts import validate_profiles

    with pytest.raises(ValueError, match=message):
        validate_profiles({"p": bad})


def test_structured_prompt_asks_for_json_in_the_language() -> None:
    prepared = _prepared("CT", 3)
    [message] = build_messages(prepared, profile_for_modality("CT"), structured=True, language="zh")
    question = message["content"][-1]["text"]
    assert '"findings"' in question and '"box_2d"' in question and "1 to 3" in question
    assert "pleural_effusion" in question and "Simplified Chinese" in question
    [message] = build_messages(_prepared("DX", 1), profile_for_modality("DX"))
    assert "JSON" not in message["content"][-1]["text"]


def test_engine_config_reads_prompt_tables(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from scp_node.config import ConfigError, load

    path = tmp_path / "c.toml"
    path.write_text('[engine]\nlanguage = "zh"\nmax_batch = 8\n[engine.prompts.ct-head]\nmodalities = ["CT"]\n'
                    'body_parts = ["HEAD"]\ninstruction = "Head CT."\nquestion = "Bleed?"\n')
    engine = load(path, environ={}).engine
    assert (engine.language, engine.max_batch, engine.structured, engine.compile) == ("zh", 8, True, False)
    assert engine.prompts["ct-head"]["body_parts"] == ["HEAD"]
    path.write_text('[engine.prompts.ct-head]\nmodalities = ["CT"]\n')
    with pytest.raises(ConfigError, match="instruction"):
        load(path, environ={})
