"""The tiny random model loads through the real Auto* classes and generates like MedGemma would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from scp_node.engine.modeldir import check_model_dir, is_test_model, weights_sha256
from scp_node.engine.testmodel import SPECIAL_TOKENS, TEST_MODEL_MARKER, THINKING_TOKENS, make_test_model


def test_directory_is_small_and_marked(model_dir: Path) -> None:
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    assert size < 3_000_000
    marker = json.loads((model_dir / TEST_MODEL_MARKER).read_text())
    assert marker == {"test_model": True, "created_by": "scp_node make-test-model", "seed": 0}
    assert is_test_model(model_dir)
    check_model_dir(model_dir)


def test_loads_with_auto_classes_and_has_medgemma_architecture(model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    assert type(processor).__name__ == "Gemma3Processor"
    assert type(processor.tokenizer).__name__ == "GemmaTokenizer"
    assert type(processor.image_processor).__name__.startswith("Gemma3ImageProcessor")
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size, model.config.mm_tokens_per_image) == (896, 14, 256)
    assert model.config.text_config.hidden_size == 64
    tokenizer = processor.tokenizer
    for token in (*SPECIAL_TOKENS, *THINKING_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id or token == "<unk>"
    assert (tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token) == (
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    )
    assert model.config.image_token_id == tokenizer.image_token_id
    assert tokenizer.decode(tokenizer("No acute cardiopulmonary process.").input_ids, skip_special_tokens=True) == (
        "No acute cardiopulmonary process."
    )


def test_generates_from_chat_template_with_an_image(model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "You are an expert radiologist."},
                {"type": "image", "image": image},
                {"type": "text", "text": "Describe this X-ray."},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.image_token_id) == 256
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 896, 896)
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<bos><start_of_turn>user\nYou are an expert radiologist.")
    assert text.endswith("Describe this X-ray.<end_of_turn>\n<start_of_turn>model\n")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False, top_k=50, top_p=1.0)
    assert 1 <= out.shape[1] - len(ids) <= 32


def test_same_seed_same_weights_other_seed_other_weights(model_dir: Path, tmp_path: Path) -> None:
    again = make_test_model(tmp_path / "again", seed=0)
    other = make_test_model(tmp_path / "other", seed=1)
    assert weights_sha256(again) == weights_sha256(model_dir)
    assert weights_sha256(other) != weights_sha256(model_dir)
    assert json.loads((other / TEST_MODEL_MARKER).read_text())["seed"] == 1
    assert (again / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors"])
def test_expected_files_written(model_dir: Path, name: str) -> None:
    assert (model_dir / name).is_file()


def test_refuses_to_overwrite_a_real_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_test_model(tmp_path)
