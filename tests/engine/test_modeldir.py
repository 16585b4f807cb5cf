"""Model directory checks fail with actionable messages; the weights hash is stable and defined."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from scp_node.engine.modeldir import ModelDirError, check_model_dir, is_test_model, weights_sha256


def _copy(model_dir: Path, dest: Path, leave_out: tuple[str, ...] = ()) -> Path:
    dest.mkdir()
    for file in model_dir.iterdir():
        if file.name not in leave_out:
            shutil.copy2(file, dest / file.name)
    return dest


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError) as info:
        check_model_dir(tmp_path / "nowhere")
    assert "does not exist" in info.value.message
    assert "make-test-model" in info.value.message


def test_directory_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelDirError, match="no config.json"):
        check_model_dir(tmp_path)


def test_file_instead_of_directory(tmp_path: Path) -> None:
    (tmp_path / "model").write_text("x")
    with pytest.raises(ModelDirError, match="not a directory"):
        check_model_dir(tmp_path / "model")


def test_no_weights(model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(model_dir, tmp_path / "m", leave_out=("model.safetensors",))
    with pytest.raises(ModelDirError, match="no weight files"):
        check_model_dir(broken)


def test_no_tokenizer(model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(model_dir, tmp_path / "m", leave_out=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(ModelDirError, match="no tokenizer"):
        check_model_dir(broken)


def test_no_processor(model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(model_dir, tmp_path / "m", leave_out=("processor_config.json", "preprocessor_config.json"))
    with pytest.raises(ModelDirError, match="image processor"):
        check_model_dir(broken)


def test_git_lfs_pointer_instead_of_weights(model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(model_dir, tmp_path / "m")
    (broken / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    )
    with pytest.raises(ModelDirError, match="git lfs pull"):
        check_model_dir(broken)


def test_missing_shard(model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(model_dir, tmp_path / "m")
    index = {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelDirError, match="model-00002-of-00002.safetensors"):
        check_model_dir(broken)


def test_text_only_model_type(model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(model_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="gemma3"):
        check_model_dir(broken)


def test_weights_hash_is_stable_and_equals_sha256_of_the_file(model_dir: Path) -> None:
    digest = weights_sha256(model_dir)
    assert digest == weights_sha256(model_dir)
    assert digest == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def test_weights_hash_concatenates_files_in_sorted_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.safetensors").write_bytes(b"second" * 300_000)  # > 1 MiB: more than one chunk
    (tmp_path / "a.bin").write_bytes(b"first")
    (tmp_path / "config.json").write_text("{}")
    expected = hashlib.sha256(b"first" + b"second" * 300_000).hexdigest()
    assert weights_sha256(tmp_path) == expected


def test_is_test_model(model_dir: Path, tmp_path: Path) -> None:
    assert is_test_model(model_dir)
    assert not is_test_model(tmp_path)
    (tmp_path / "scp_node_test_model.json").write_text("not json")
    assert is_test_model(tmp_path)  # unreadable marker: still labelled as test model
