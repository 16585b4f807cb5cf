"""MedGemma 1.5 4B inference for one series: preprocess, prompt, greedy generation, clean answer.

Why this shape: the scheduler owns one engine per worker thread and calls :meth:`MedGemmaEngine.analyse_series`
for each complete series. The model is a lazily loaded singleton per engine (loading 8.6 GB takes
time and memory, so it happens once, on first use or on an explicit :meth:`load`). Everything runs
offline from a local directory. Precision is bfloat16 on CUDA (MedGemma's training precision) and
float32 on CPU; float16 is never used because Gemma 3 activations overflow in it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as hf_logging

from .modeldir import ModelDirError, check_model_dir, is_test_model, weights_sha256
from .preprocess import (
    DEFAULT_CT_MAX_SLICES,
    DEFAULT_IMAGE_SIZE,
    PreparedSeries,
    SeriesSkipped,
    prepare_series,
)
from .prompts import PromptProfile, build_messages, profile_for_modality
from .result import AnalysisResult, ModelIdentity
from .thinking import THINKING_END, THINKING_START, drop_thinking_ids, strip_thinking_trace

log = logging.getLogger(__name__)

#: AlgorithmName for the tiny random model: must make clear that its output means nothing (LO, <= 64 chars).
TEST_MODEL_NAME = "scp_node TEST MODEL: tiny random weights, MedGemma architecture"
_MEDGEMMA_NAME = re.compile(r"medgemma[-_ ]?(?:(?P<version>\d+(?:\.\d+)*)[-_ ])?(?P<size>\d+)b", re.IGNORECASE)


class EngineError(RuntimeError):
    """The engine could not run (device unavailable, out of memory); the message says what to change."""


@dataclass(frozen=True)
class GenerationOutput:
    """Decoded answer of one generate call."""

    text: str  #: new tokens only, special tokens and thinking trace removed
    generated_tokens: int  #: new tokens produced (including a final end-of-turn token)
    input_tokens: int  #: prompt length incl. image tokens
    seconds: float


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda:0 when available else cpu; 'cuda' -> cuda:0; explicit CUDA must be available."""
    name = device.strip().lower()
    if name == "auto":
        name = "cuda:0" if torch.cuda.is_available() else "cpu"
    elif name == "cuda":
        name = "cuda:0"
    resolved = torch.device(name)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
    if resolved.type not in ("cpu", "cuda"):
        raise EngineError(f"device {device!r} is not supported; use 'auto', 'cpu' or 'cuda[:N]'")
    return resolved


def dtype_for(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (float32 where the GPU lacks bf16), float32 on CPU; never float16."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def model_name_and_version(model_dir: Path, sha256: str, test_model: bool) -> tuple[str, str]:
    """Human name and version for Algorithm Identification, from the directory or config names.

    Hugging Face cache snapshots live in ``models--google--medgemma-1.5-4b-it/snapshots/<hash>``, so
    parent directory names are searched too.
    """
    short = sha256[:12]
    if test_model:
        return TEST_MODEL_NAME, f"test-{short}"
    candidates = [part for part in reversed(Path(model_dir).resolve().parts)]
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        candidates.insert(0, str(config.get("_name_or_path", "")))
    except (OSError, ValueError, AttributeError):
        pass
    for text in candidates:
        match = _MEDGEMMA_NAME.search(text)
        if match:
            version = match.group("version") or "1"
            return f"MedGemma {version} {match.group('size')}B", version
    return f"Gemma 3 image-text model ({Path(model_dir).name})"[:64], f"sha256-{short}"


class MedGemmaEngine:
    """Analyse DICOM series with MedGemma 1.5 4B (or the tiny test model) from a local directory."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        max_new_tokens: int = 256,
        ct_max_slices: int = DEFAULT_CT_MAX_SLICES,
        *,
        mr_max_slices: int | None = None,
        prompt_profiles: Mapping[str, Mapping[str, Any]] | None = None,
        attn_implementation: str = "sdpa",
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if ct_max_slices < 1:
            raise ValueError("ct_max_slices must be at least 1")
        self.model_dir = Path(model_dir)
        self.device_setting = device
        self.max_new_tokens = max_new_tokens
        self.ct_max_slices = ct_max_slices
        self.mr_max_slices = mr_max_slices if mr_max_slices is not None else ct_max_slices
        self.prompt_profiles = prompt_profiles
        self.attn_implementation = attn_implementation
        self._lock = threading.Lock()
        self._model: Any = None
        self._processor: Any = None
        self._identity: ModelIdentity | None = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self.load_seconds: float | None = None

    # ---------------------------------------------------------------------------------------------
    # Loading
    # ---------------------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load processor and model once (thread-safe); later calls return at once.

        Raises :class:`ModelDirError` for an unusable directory and :class:`EngineError` for an
        unusable device.
        """
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            check_model_dir(self.model_dir)
            device = resolve_device(self.device_setting)
            dtype = dtype_for(device)
            hf_logging.disable_progress_bar()
            start = time.perf_counter()
            try:
                processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
                # With accelerate installed, weights go straight to the GPU; without it they are
                # loaded into host RAM first (about 8.6 GB for MedGemma 4B in bf16) and then moved.
                placement = {"device_map": str(device)} if device.type == "cuda" and _has_accelerate() else {}
                model = AutoModelForImageTextToText.from_pretrained(
                    self.model_dir,
                    local_files_only=True,
                    dtype=dtype,
                    attn_implementation=self.attn_implementation,
                    **placement,
                )
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ModelDirError(
                    f"could not load the model in {self.model_dir}: {type(exc).__name__}: {exc}. "
                    "Check that the download is complete and matches transformers "
                    f"{_transformers_version()}."
                ) from exc
            model.to(device)
            model.eval()
            self.load_seconds = time.perf_counter() - start
            test_model = is_test_model(self.model_dir)
            digest = weights_sha256(self.model_dir)
            name, version = model_name_and_version(self.model_dir, digest, test_model)
            self._identity = ModelIdentity(
                name=name,
                version=version,
                weights_sha256=digest,
                is_test_model=test_model,
                device=str(device),
                dtype=str(dtype).removeprefix("torch."),
            )
            self._processor, self._device, self._dtype = processor, device, dtype
            self._model = model
            log.info(
                "loaded %s (%s) on %s as %s in %.2f s%s",
                name,
                version,
                device,
                self._identity.dtype,
                self.load_seconds,
                " - TEST MODEL, output is meaningless" if test_model else "",
            )

    @property
    def identity(self) -> ModelIdentity:
        """Who produces the results (loads the model on first use: device and dtype are as used)."""
        self.load()
        assert self._identity is not None
        return self._identity

    @property
    def image_size(self) -> int:
        """Square input side of the processor (896 for MedGemma)."""
        self.load()
        size = getattr(self._processor.image_processor, "size", None)
        height = getattr(size, "height", None) if size is not None else None
        if height is None and isinstance(size, Mapping):
            height = size.get("height")
        return int(height or DEFAULT_IMAGE_SIZE)

    # ---------------------------------------------------------------------------------------------
    # Pieces
    # ---------------------------------------------------------------------------------------------

    def prepare(self, paths: Sequence[Path]) -> PreparedSeries:
        """Preprocess a series with this engine's limits (raises SeriesSkipped)."""
        return prepare_series(
            paths,
            image_size=self.image_size,
            ct_max_slices=self.ct_max_slices,
            mr_max_slices=self.mr_max_slices,
        )

    def profile_for(self, modality: str) -> PromptProfile:
        """Prompt profile for a modality (SeriesSkipped when none is configured)."""
        try:
            return profile_for_modality(modality, self.prompt_profiles)
        except KeyError as exc:
            raise SeriesSkipped(f"no prompt profile is configured for modality {modality}") from exc

    def _token_id(self, token: str) -> int | None:
        tokenizer = self._processor.tokenizer
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            return None
        return int(token_id)

    def _generation_config(self, max_new_tokens: int) -> Any:
        """Greedy decoding, stopping at <eos> or <end_of_turn>, whatever the checkpoint's sampling defaults."""
        config = copy.deepcopy(self._model.generation_config)
        config.do_sample = False
        config.num_beams = 1
        # Neutral values, not None: transformers fills None from the checkpoint's sampling defaults
        # (MedGemma ships top_k=64, top_p=0.95) and then warns that greedy decoding ignores them.
        config.temperature = 1.0
        config.top_p = 1.0
        config.top_k = 50
        config.min_p = None
        config.typical_p = 1.0
        config.max_new_tokens = max_new_tokens
        config.max_length = None
        tokenizer = self._processor.tokenizer
        eos = config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        eos_ids.add(tokenizer.eos_token_id)
        end_of_turn = self._token_id("<end_of_turn>")
        if end_of_turn is not None:
            eos_ids.add(end_of_turn)
        config.eos_token_id = sorted(i for i in eos_ids if i is not None)
        config.pad_token_id = tokenizer.pad_token_id
        return config

    def generate(self, messages: list[dict[str, Any]], max_new_tokens: int | None = None) -> GenerationOutput:
        """Greedy generation for chat messages; returns the cleaned answer of the model turn."""
        self.load()
        start = time.perf_counter()
        processor, model = self._processor, self._model
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        input_tokens = int(inputs["input_ids"].shape[-1])
        limit = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 0)
        if limit and input_tokens >= limit:
            raise SeriesSkipped(
                f"model input of {input_tokens} tokens exceeds the model's context of {limit} tokens; "
                "lower ct_max_slices"
            )
        inputs = inputs.to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
        config = self._generation_config(max_new_tokens or self.max_new_tokens)
        try:
            with torch.inference_mode():
                output = model.generate(**inputs, generation_config=config)
        except torch.OutOfMemoryError as exc:
            raise EngineError(
                f"out of memory generating for {input_tokens} input tokens on {self._device}; "
                "lower ct_max_slices or use a larger GPU"
            ) from exc
        new_ids = [int(t) for t in output[0, input_tokens:].tolist()]
        pad = processor.tokenizer.pad_token_id
        generated = len([t for t in new_ids if t != pad])
        kept = drop_thinking_ids(new_ids, self._token_id(THINKING_START), self._token_id(THINKING_END))
        text = processor.tokenizer.decode(kept, skip_special_tokens=True)
        text = strip_thinking_trace(text)
        del inputs, output
        return GenerationOutput(
            text=text, generated_tokens=generated, input_tokens=input_tokens, seconds=time.perf_counter() - start
        )

    # ---------------------------------------------------------------------------------------------
    # The job
    # ---------------------------------------------------------------------------------------------

    def analyse_series(self, paths: list[Path]) -> AnalysisResult:
        """Analyse one series. Raises :class:`SeriesSkipped` when the series cannot be analysed.

        ``seconds`` in the result covers preprocessing and generation, not the one-off model load.
        """
        self.load()
        start = time.perf_counter()
        prepared = self.prepare(paths)
        prepared_at = time.perf_counter()
        profile = self.profile_for(prepared.modality)
        output = self.generate(build_messages(prepared, profile))
        seconds = time.perf_counter() - start
        log.info(
            "analysed %s series: %d image(s), %d input tokens, %d new tokens; preprocess %.2f s, model %.2f s",
            prepared.modality,
            len(prepared.images),
            output.input_tokens,
            output.generated_tokens,
            prepared_at - start,
            output.seconds,
        )
        return AnalysisResult(
            modality=prepared.modality,
            findings_text=output.text,
            model=self.identity,
            sources=list(prepared.sources),
            prompt_profile=profile.name,
            generated_tokens=output.generated_tokens,
            seconds=seconds,
        )


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
