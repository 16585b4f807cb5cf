"""Checks and fingerprints for a model directory (a Hugging Face checkpoint on local disk).

Why a separate module: the CLI and the service start-up must be able to say *before* loading torch
what is wrong with a configured model directory (missing, half downloaded, Git LFS pointers instead of
weights, a text-only checkpoint). And every SR needs the SHA-256 of the weights that produced it, which
must not depend on how transformers loads them. Only the standard library is imported here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: Weight file patterns that are hashed and count as "has weights".
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.bin")
#: Files that show a tokenizer is present (any one is enough).
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
#: Files that show an image processor is present (any one is enough).
PROCESSOR_FILES: tuple[str, ...] = ("preprocessor_config.json", "processor_config.json")
#: Model types this engine can drive (MedGemma 4B multimodal = Gemma 3 image-text-to-text).
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset({"gemma3"})

_TEST_MODEL_MARKER = "scp_node_test_model.json"  # same name as testmodel.TEST_MODEL_MARKER (kept torch-free)
_HASH_CHUNK = 1024 * 1024
_GET_IT = (
    "Put a MedGemma 1.5 4B checkpoint there (the files of google/medgemma-1.5-4b-it: config.json, "
    "*.safetensors, tokenizer and processor files), or create the tiny test model with "
    "`scp-node make-test-model <dir>`."
)


class ModelDirError(Exception):
    """The configured model directory cannot be used; ``message`` says what to do about it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def weight_files(path: Path) -> list[Path]:
    """Weight files directly in ``path``, sorted by file name (the order :func:`weights_sha256` uses)."""
    path = Path(path)
    found = {p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def weights_sha256(path: Path) -> str:
    """SHA-256 over the contents of all weight files, concatenated in sorted file-name order.

    Streams in 1 MiB chunks so an 8 GB checkpoint needs no memory. File names are not hashed: the
    digest identifies the numbers, not how they were sharded or named on disk.
    """
    files = weight_files(Path(path))
    if not files:
        raise ModelDirError(f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in {path}. {_GET_IT}")
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def is_test_model(path: Path) -> bool:
    """True when ``path`` holds the tiny random test model (it carries the scp_node marker file).

    An unreadable marker still counts as a test model: mislabelling random weights as a real model is
    the worse mistake.
    """
    marker = Path(path) / _TEST_MODEL_MARKER
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not (isinstance(data, dict) and data.get("test_model") is False)


def _is_lfs_pointer(file: Path) -> bool:
    """A Git LFS pointer is a ~130 byte text file where the weights should be (clone without `git lfs`)."""
    try:
        if file.stat().st_size > 1024:
            return False
        return file.read_bytes().startswith(b"version https://git-lfs")
    except OSError:
        return False


def check_model_dir(path: Path) -> None:
    """Raise :class:`ModelDirError` unless ``path`` looks like a loadable MedGemma-style checkpoint.

    Checks only files, so it is fast and runs before torch is imported.
    """
    path = Path(path)
    if not path.exists():
        raise ModelDirError(f"model directory {path} does not exist. {_GET_IT}")
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} is not a directory. {_GET_IT}")

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{path} is not a model directory: it has no config.json. {_GET_IT}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{config_file} is not readable JSON ({exc}); download the checkpoint again.") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelDirError(
            f"{path} holds a model of type {model_type!r}, but this node needs a MedGemma 4B multimodal "
            f"checkpoint (model_type 'gemma3', e.g. google/medgemma-1.5-4b-it). {_GET_IT}"
        )

    files = weight_files(path)
    if not files:
        raise ModelDirError(f"{path} has no weight files ({', '.join(WEIGHT_PATTERNS)}). {_GET_IT}")
    pointers = [f.name for f in files if _is_lfs_pointer(f)]
    if pointers:
        raise ModelDirError(
            f"{path}: {', '.join(pointers)} are Git LFS pointer files, not weights; "
            "run `git lfs install && git lfs pull` in that directory, or download with `hf download`."
        )
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            shards = set(json.loads(index_file.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelDirError(f"{index_file} is not readable JSON ({exc}); download the checkpoint again.") from exc
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelDirError(
                f"{path} is an incomplete download: weight shards {', '.join(missing)} are missing. {_GET_IT}"
            )

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(
            f"{path} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); copy the tokenizer files of the "
            f"checkpoint into it. {_GET_IT}"
        )
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        raise ModelDirError(
            f"{path} has no image processor configuration ({' / '.join(PROCESSOR_FILES)}); copy "
            f"preprocessor_config.json of the checkpoint into it. {_GET_IT}"
        )
