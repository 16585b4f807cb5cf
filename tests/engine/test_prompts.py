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


def test_ct_layout_instruction_images_with_labels_blank_line_question_last() -> None:
    prepared = _prepared("CT", 6, body_part="CHEST")
    profile = profile_for_modality("CT", n_images=6)
    [message] = build_messages(prepared, profile)
    content = message["content"]
    assert message["role"] == "user" and profile.name == "ct-volume"
    assert [c["type"] for c in content] == ["text"] + ["image", "text"] * 6
    assert [c["text"] for c in content[2:11:2]] == [f"SLICE {k}" for k in range(1, 6)]
    assert content[1]["image"] is prepared.images[0] and content[11]["image"] is prepared.images[5]
    # Google's CT notebook instruction, and its query after a blank line, in the item that ends with
    # the last label (the chat template trims each item, a leading "\n\n" would be lost)
    assert content[0]["text"] == ("You are an instructor teaching medical students. You are analyzing a contiguous "
                                  "block of CT slices of the chest. Please review the slices provided below carefully.")
    assert content[-1]["text"].startswith("SLICE 6\n\nBased on the visual evidence in the slices provided above")
    assert profile.max_new_tokens == 2000


def test_cxr_layout_system_image_question_last() -> None:
    profile = profile_for_modality("DX", n_images=1)
    messages = build_messages(_prepared("DX", 1), profile)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"][0]["text"] == "You are an expert radiologist."
    assert [c["type"] for c in messages[1]["content"]] == ["image", "text"]
    assert messages[1]["content"][-1]["text"] == "Describe this X-ray"
    assert profile.name == "cxr-report" and profile.max_new_tokens == 500


def test_thinking_adds_googles_system_instruction() -> None:
    [system, _] = build_messages(_prepared("DX", 1), profile_for_modality("DX"), thinking=True)
    assert system["content"][0]["text"] == "SYSTEM INSTRUCTION: think silently if needed. You are an expert radiologist."
    [system, _] = build_messages(_prepared("CT", 6), profile_for_modality("CT", n_images=6), thinking=True)
    assert system["content"][0]["text"] == "SYSTEM INSTRUCTION: think silently if needed."


def test_few_ct_or_mr_images_are_read_as_2d_images() -> None:
    profile = profile_for_modality("MR", n_images=1)
    messages = build_messages(_prepared("MR", 1), profile)
    assert profile.name == "mr-images"
    assert [c["type"] for c in messages[-1]["content"]] == ["image", "text"]
    assert messages[-1]["content"][-1]["text"].startswith("Describe this image from an MRI.")
    profile = profile_for_modality("CT", n_images=3)
    content = build_messages(_prepared("CT", 3, "CHEST"), profile)[-1]["content"]
    assert profile.name == "ct-images"
    assert content[-1]["text"].startswith("SLICE 3\n\nDescribe these 3 images from a CT of the chest.")
    assert profile_for_modality("CT", n_images=5).name == "ct-volume"


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
    assert set(DEFAULT_PROMPT_PROFILES) == {"cxr-report", "ct-volume", "mr-volume", "ct-images", "mr-images"}


def _render(engine, messages) -> str:  # type: ignore[no-untyped-def]
    """The token sequence the model gets (images expanded by the processor), decoded back to text."""
    inputs = engine._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
    return engine._processor.tokenizer.decode(inputs["input_ids"][0].tolist())


def _collapse_images(text: str) -> str:
    import re

    return re.sub(r"<start_of_image>(?:<image_soft_token>)+<end_of_image>", "<IMG>", text)


def test_rendered_tokens_ct_follow_the_ct_notebook(engine) -> None:  # type: ignore[no-untyped-def]
    prepared = _prepared("CT", 3, body_part="CHEST")
    text = _render(engine, build_messages(prepared, profile_for_modality("CT", n_images=3)))
    assert text.count("<image_soft_token>") == 3 * 256
    layout = _collapse_images(text)
    assert layout.startswith("<bos><start_of_turn>user\nYou are an expert radiologist.\n\n\n\n<IMG>\n\nSLICE 1")
    assert "SLICE 1\n\n<IMG>\n\nSLICE 2\n\n<IMG>\n\nSLICE 3\n\nDescribe these 3 images" in layout
    assert layout.endswith("Give the slice number of each finding.<end_of_turn>\n<start_of_turn>model\n")
    volume = _prepared("CT", 6, body_part="CHEST")
    layout = _collapse_images(_render(engine, build_messages(volume, profile_for_modality("CT", n_images=6))))
    assert layout.startswith("<bos><start_of_turn>user\nYou are an instructor teaching medical students.")
    assert "carefully.\n\n<IMG>\n\nSLICE 1\n\n<IMG>" in layout
    assert "\n\n<IMG>\n\nSLICE 6\n\nBased on the visual evidence in the slices provided above, " in layout
    assert layout.index("SLICE 5") < layout.index("SLICE 6") < layout.index("Based on")
    assert layout.count("<IMG>") == 6


def test_rendered_tokens_mr_follow_the_ct_notebook(engine) -> None:  # type: ignore[no-untyped-def]
    volume = _prepared("MR", 5, body_part="HEAD")
    layout = _collapse_images(_render(engine, build_messages(volume, profile_for_modality("MR", n_images=5))))
    assert layout.startswith("<bos><start_of_turn>user\nYou are an instructor teaching medical students. "
                             "You are analyzing a contiguous block of MRI slices of the head.")
    assert "<IMG>\n\nSLICE 5\n\nBased on the visual evidence" in layout
    assert [layout.index(f"SLICE {k}") for k in range(1, 6)] == sorted(layout.index(f"SLICE {k}") for k in range(1, 6))


def test_rendered_tokens_cxr_follow_the_quick_start(engine) -> None:  # type: ignore[no-untyped-def]
    layout = _collapse_images(_render(engine, build_messages(_prepared("CR", 1), profile_for_modality("CR"))))
    assert layout == ("<bos><start_of_turn>user\nYou are an expert radiologist.\n\n\n\n<IMG>\n\n"
                      "Describe this X-ray<end_of_turn>\n<start_of_turn>model\n")


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
    assert profile_for_modality("CT", profiles, body_part="head", n_images=2).name == "ct-head"
    assert profile_for_modality("CT", profiles, body_part="CHEST").name == "ct-volume"
    assert profile_for_modality("CT", profiles).name == "ct-volume"
    assert profile_for_modality("DX", profiles).instruction == "Site CXR."


@pytest.mark.parametrize("bad,message", [
    ({"modalities": ["CT"], "instruction": "x"}, "'question'"),
    ({"modalities": ["CT"], "instruction": "x", "question": "y", "language": "fr"}, "language"),
    ({"modalities": "CT", "instruction": "x", "question": "y"}, "list of strings"),
    ({"modalities": ["CT"], "instruction": "x", "question": "y", "colour": 1}, "unknown key"),
    ({"modalities": ["CT"], "question": "y", "max_new_tokens": -1}, "max_new_tokens"),
    ({"modalities": ["CT"], "question": "y", "system": 3}, "system"),
])
def test_bad_profiles_are_rejected(bad: dict, message: str) -> None:
    from scp_node.engine.prompts import validate_profiles

    with pytest.raises(ValueError, match=message):
        validate_profiles({"p": bad})


def test_structured_prompt_asks_for_json_in_the_language() -> None:
    prepared = _prepared("CT", 3)
    [message] = build_messages(prepared, profile_for_modality("CT"), structured=True, language="zh")
    question = message["content"][-1]["text"]
    # CT/MR: a slice number per finding, no box (boxes are documented for chest X-ray only)
    assert '"findings"' in question and '"slice"' in question and "1 to 3" in question
    assert "box_2d" not in question
    assert "pleural_effusion" in question and "Simplified Chinese" in question
    question = build_messages(_prepared("DX", 2), profile_for_modality("DX"), structured=True)[-1]["content"][-1]["text"]
    assert '"box_2d"' in question and '"image_index"' in question and '"slice"' not in question
    messages = build_messages(_prepared("DX", 1), profile_for_modality("DX"))
    assert "JSON" not in messages[-1]["content"][-1]["text"]


def test_engine_config_reads_prompt_tables(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from scp_node.config import ConfigError, load

    path = tmp_path / "c.toml"
    path.write_text('[engine]\nlanguage = "zh"\nmax_batch = 8\n[engine.prompts.ct-head]\nmodalities = ["CT"]\n'
                    'body_parts = ["HEAD"]\ninstruction = "Head CT."\nquestion = "Bleed?"\n')
    engine = load(path, environ={}).engine
    assert (engine.language, engine.max_batch, engine.answer_mode, engine.compile) == ("zh", 8, "report", False)
    assert engine.prompts["ct-head"]["body_parts"] == ["HEAD"]
    path.write_text('[engine.prompts.ct-head]\nmodalities = ["CT"]\n')
    with pytest.raises(ConfigError, match="question"):
        load(path, environ={})
