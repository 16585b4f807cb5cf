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
import dataclasses
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
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
    SeriesNotAnalysed,
    SeriesSkipped,
    prepare_series,
)
from .answer import parse_answer, render_text
from .batching import _groups, _Job
from .prompts import (THINKING_EXTRA_TOKENS, PromptProfile, build_messages, extraction_messages, localisation_for,
                      merged_profiles, profile_for_modality, validate_profiles)
from .result import AnalysisResult, ModelIdentity, TurnStats
from .schema import LANGUAGES, SchemaBounds, findings_schema, max_answer_tokens, schema_json
from .thinking import THINKING_END, THINKING_START, drop_thinking_ids, strip_thinking_trace

log = logging.getLogger(__name__)

#: AlgorithmName for the tiny random model: must make clear that its output means nothing (LO, <= 64 chars).
TEST_MODEL_NAME = "scp_node TEST MODEL: tiny random weights, MedGemma architecture"
_MEDGEMMA_NAME = re.compile(r"medgemma[-_ ]?(?:(?P<version>\d+(?:\.\d+)*)[-_ ])?(?P<size>\d+)b", re.IGNORECASE)


#: How the model answers (see :class:`MedGemmaEngine`).
ANSWER_MODES: tuple[str, ...] = ("report", "structured", "free")


class EngineError(RuntimeError):
    """The engine could not run (device unavailable, out of memory); the message says what to change."""


@dataclass(frozen=True)
class GenerationOutput:
    """Decoded answer of one generate call."""

    text: str  #: new tokens only, special tokens and thinking trace removed
    generated_tokens: int  #: new tokens produced (including a final end-of-turn token)
    input_tokens: int  #: prompt length incl. image tokens
    seconds: float
    #: ``keep_cache`` (one conversation): its KV cache, prompt ids and new ids, for a next turn.
    cache: Any = field(default=None, repr=False, compare=False)
    prompt_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)
    new_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)


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
        max_new_tokens: int = 2000,
        ct_max_slices: int = DEFAULT_CT_MAX_SLICES,
        *,
        mr_max_slices: int | None = None,
        prompt_profiles: Mapping[str, Mapping[str, Any]] | None = None,
        attn_implementation: str = "sdpa",
        structured: bool | None = None,
        answer_mode: str | None = None,
        thinking: bool = False,
        language: str = "en",
        max_batch: int = 4,
        compile: bool = False,
        schema_bounds: SchemaBounds = SchemaBounds(),
        _oom_above: int | None = None,
    ) -> None:
        """``prompt_profiles`` come first, the defaults they do not replace by name after them.

        ``answer_mode`` (:data:`ANSWER_MODES`): "report" (default) - the model writes its free-text
        report with Google's prompt and budget, then a second, grammar-constrained turn of the same
        conversation extracts the findings JSON from that report; "structured" - one grammar-constrained
        JSON answer; "free" - the JSON prompt without a grammar, parsed leniently (free text kept when it
        does not parse). Without ``answer_mode`` the old ``structured`` flag decides (True: "structured",
        False: "free", None: "report"). ``max_new_tokens`` caps every free-text answer (each profile's
        own budget applies below it). ``thinking``: Google's thinking system instruction (the trace is
        cut at <unused95>). ``compile``: static KV cache (compiled by transformers on CUDA).
        ``_oom_above``: test hook, a batch larger than this raises a simulated CUDA OOM.
        """
        if answer_mode is None:
            answer_mode = "report" if structured is None else "structured" if structured else "free"
        if answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode must be one of {ANSWER_MODES}, not {answer_mode!r}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {LANGUAGES}, not {language!r}")
        if prompt_profiles:
            validate_profiles(prompt_profiles)
        if ct_max_slices < 1:
            raise ValueError("ct_max_slices must be at least 1")
        self.model_dir = Path(model_dir)
        self.device_setting = device
        self.max_new_tokens = max_new_tokens
        self.ct_max_slices = ct_max_slices
        self.mr_max_slices = mr_max_slices if mr_max_slices is not None else ct_max_slices
        self.prompt_profiles = merged_profiles(prompt_profiles)
        self.attn_implementation = attn_implementation
        self.answer_mode = answer_mode
        self.structured = answer_mode != "free"  #: whether answers go through the findings grammar
        self.thinking = thinking
        #: "report" mode, one series at a time: the extraction turn continues from the report turn's
        #: KV cache (see :meth:`continue_turn`) instead of encoding the images and the report again.
        self.reuse_cache = True
        self.language = language
        self.max_batch = max_batch
        self.compile = compile
        self.schema_bounds = schema_bounds
        self._oom_above = _oom_above
        self.oom_backoffs = 0  #: how often a batch was halved after CUDA OOM
        self._grammar: Any = None
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
                model = AutoModelForImageTextToText.from_pretrained(  # local_files_only: never a hub
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
            processor.tokenizer.padding_side = "left"  # batched generation appends on the right
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

    def profile_for(self, modality: str, body_part: str = "", n_images: int = 0) -> PromptProfile:
        """Prompt profile for a modality, body part and image count (SeriesSkipped when none is configured)."""
        try:
            return profile_for_modality(modality, self.prompt_profiles, body_part, n_images)
        except KeyError as exc:
            raise SeriesNotAnalysed(f"no prompt profile is configured for modality {modality}") from exc

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
        if self.compile:
            # Static KV cache: fixed shapes, which transformers compiles (torch.compile) on CUDA.
            config.cache_implementation = "static"
        return config

    def generate(self, messages: list[dict[str, Any]], max_new_tokens: int | None = None,
                 schema: str | None = None) -> GenerationOutput:
        """Greedy generation for one chat; ``schema`` (JSON schema text) constrains the answer."""
        try:
            [output] = self.generate_batch([messages], [schema], max_new_tokens)
        except torch.OutOfMemoryError as exc:
            raise EngineError(f"out of memory on {self._device}; lower ct_max_slices or use a larger GPU") from exc
        return output

    def generate_batch(self, conversations: Sequence[list[dict[str, Any]]], schemas: Sequence[str | None],
                       max_new_tokens: int | None = None, keep_cache: bool = False) -> list[GenerationOutput]:
        """Greedy generation for several chats at once (left padding); one answer per chat.

        Rows with a schema are grammar-constrained (:mod:`.grammar`); rows without one are not. Raises
        SeriesNotAnalysed when a prompt exceeds the model's context, torch.OutOfMemoryError on CUDA OOM
        (the caller halves the batch). ``keep_cache`` (one conversation, dynamic cache): the output
        keeps its KV cache and token ids, so that a next turn can continue from them.
        """
        self.load()
        if len(conversations) != len(schemas) or not conversations:
            raise ValueError("generate_batch needs one schema (or None) per conversation")
        if self._oom_above is not None and len(conversations) > self._oom_above:
            raise torch.OutOfMemoryError(f"simulated CUDA out of memory for a batch of {len(conversations)}")
        start = time.perf_counter()
        processor, model = self._processor, self._model
        inputs = processor.apply_chat_template(
            list(conversations), add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True, "padding_side": "left"},
        )
        lengths = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        limit = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 0)
        if limit and max(lengths) >= limit:
            raise SeriesNotAnalysed(
                f"model input of {max(lengths)} tokens exceeds the model's context of {limit} tokens; "
                "lower ct_max_slices"
            )
        padded = int(inputs["input_ids"].shape[-1])
        inputs = inputs.to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
        config = self._generation_config(max_new_tokens or self.max_new_tokens)
        processors = []
        if any(s is not None for s in schemas):
            if any(s is None for s in schemas):
                raise ValueError("a batch is either grammar-constrained in every row or in none")
            processors.append(self._grammar_factory().processor(list(schemas)))
        keep = keep_cache and len(conversations) == 1 and not self.compile
        config.return_dict_in_generate = keep
        with torch.inference_mode():
            output = model.generate(**inputs, generation_config=config, logits_processor=processors)
        cache = None
        if keep:
            cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
            output = output.sequences
        seconds = time.perf_counter() - start
        pad = processor.tokenizer.pad_token_id
        start_id, end_id = self._token_id(THINKING_START), self._token_id(THINKING_END)
        results = []
        for row, length in enumerate(lengths):
            new_ids = [int(t) for t in output[row, padded:].tolist()]
            generated = len([t for t in new_ids if t != pad])
            kept = drop_thinking_ids(new_ids, start_id, end_id)
            text = strip_thinking_trace(processor.tokenizer.decode(kept, skip_special_tokens=True))
            kept_ids: dict[str, Any] = {}
            if cache is not None:
                kept_ids = dict(cache=cache, prompt_ids=tuple(int(t) for t in output[row, :padded].tolist()),
                                new_ids=tuple(new_ids))
            results.append(GenerationOutput(text=text, generated_tokens=generated, input_tokens=length,
                                            seconds=seconds, **kept_ids))
        del inputs, output
        return results

    def continue_turn(self, first: GenerationOutput, conversation: list[dict[str, Any]], schema: str | None,
                      max_new_tokens: int) -> GenerationOutput | None:
        """The next turn of ``first``'s conversation from its KV cache: only the new tokens are
        prefilled (the images and the report are not encoded again). ``conversation`` is the whole
        next-turn conversation (:func:`.prompts.extraction_messages`); the cached tokens are used only
        when they are exactly the tokens that conversation renders to, else None (the caller then
        generates from the rendered conversation). Not for thinking traces (the conversation holds
        the report without its trace) nor for an answer cut off before its end-of-turn token.
        """
        tokenizer = self._processor.tokenizer
        eot = self._token_id("<end_of_turn>")
        thinking = {self._token_id(THINKING_START), self._token_id(THINKING_END)} - {None}
        new_ids = list(first.new_ids)
        if first.cache is None or not new_ids or eot is None or thinking & set(new_ids):
            return None
        stops = set(self._generation_config(1).eos_token_id)
        # The cache holds the prompt and every new token but the last; a report cut off by its budget
        # gets its end-of-turn token here, as the chat template writes one after the report.
        report_ids = new_ids[:-1] if new_ids[-1] in stops else new_ids
        report = first.text.strip()
        text = self._processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        marker = report + "<end_of_turn>"
        at = text.rfind(marker)
        if not report or at < 0:
            return None
        # The chat template renders "<start_of_turn>model\n" + report + "<end_of_turn>": the report's
        # text must tokenize to exactly the generated ids (text between special tokens is tokenized
        # on its own, so "model\n" + report is checked as one piece).
        def ids(piece: str) -> list[int]:
            return list(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if ids("model\n" + report) != ids("model\n") + report_ids:
            return None
        suffix = ids(text[at + len(marker):])
        start = time.perf_counter()
        sequence = list(first.prompt_ids) + report_ids + [eot] + suffix
        input_ids = torch.tensor([sequence], device=self._device)
        config = self._generation_config(max_new_tokens)
        processors = [self._grammar_factory().processor([schema])] if schema is not None else []
        with torch.inference_mode():
            output = self._model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          cache=first.cache, generation_config=config,
                                          logits_processor=processors)
        new = [int(t) for t in output[0, len(sequence):].tolist()]
        pad = tokenizer.pad_token_id
        kept = drop_thinking_ids(new, self._token_id(THINKING_START), self._token_id(THINKING_END))
        text_out = strip_thinking_trace(tokenizer.decode(kept, skip_special_tokens=True))
        return GenerationOutput(text=text_out, generated_tokens=len([t for t in new if t != pad]),
                                input_tokens=len(sequence), seconds=time.perf_counter() - start)

    def _grammar_factory(self) -> Any:
        """xgrammar for this tokenizer, built on first structured use (so ``structured = false`` runs
        without xgrammar installed)."""
        if self._grammar is None:
            from .grammar import GrammarFactory

            tokenizer = self._processor.tokenizer
            config = self._generation_config(1)
            vocab = int(self._model.config.get_text_config().vocab_size)
            special = [int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})]
            special += [i for i in (self._token_id(THINKING_START), self._token_id(THINKING_END)) if i is not None]
            self._grammar = GrammarFactory(tokenizer, vocab, config.eos_token_id, special)
        return self._grammar

    # ---------------------------------------------------------------------------------------------
    # The job
    # ---------------------------------------------------------------------------------------------

    def analyse_series(self, paths: list[Path], prior: Any = None) -> AnalysisResult:  # TEMP: prior ignored
        """Analyse one series. Raises :class:`SeriesSkipped` when the series cannot be analysed.

        ``seconds`` in the result covers preprocessing and generation, not the one-off model load.
        """
        [result] = self.analyse_batch([paths])
        if isinstance(result, BaseException):
            raise result
        return result

    def analyse_batch(self, jobs: Sequence[Sequence[Path]],
                      priors: Any = None) -> list[AnalysisResult | BaseException]:  # TEMP: priors ignored
        """Analyse several series with batched generation; one entry per job, in order.

        An entry is the result, or the exception for that job alone: :class:`SeriesSkipped` (cannot
        be analysed), :class:`EngineError` (out of memory even alone) or another error. Nothing is
        raised for a single job, so no job of the batch is lost. CUDA OOM halves the batch and retries.
        """
        self.load()
        out: list[AnalysisResult | BaseException | None] = [None] * len(jobs)
        pending: list[_Job] = []
        for index, paths in enumerate(jobs):
            started = time.perf_counter()
            try:
                prepared = self.prepare(list(paths))
                pending.append(self._job(index, prepared, time.perf_counter() - started))
            except Exception as exc:  # noqa: BLE001 - recorded for this job; the others go on
                if not isinstance(exc, SeriesSkipped):
                    log.warning("series %d of the batch failed in preprocessing: %s", index + 1, type(exc).__name__)
                out[index] = exc
        for group in _groups(pending, self.max_batch):
            self._run_group(group, out)
        assert all(r is not None for r in out)
        return out  # type: ignore[return-value]

    def _run_group(self, group: list["_Job"], out: list[Any]) -> None:
        """Generate for a group; on CUDA OOM (or any error) split it in halves until single jobs."""
        try:
            outputs = self._generate_jobs(group)
        except torch.OutOfMemoryError as exc:
            if self._device is not None and self._device.type == "cuda":
                torch.cuda.empty_cache()
            if len(group) == 1:
                out[group[0].index] = EngineError(
                    f"out of memory generating for one {group[0].prepared.modality} series of "
                    f"{len(group[0].prepared.images)} image(s) on {self._device}; lower ct_max_slices "
                    "or use a larger GPU")
                out[group[0].index].__cause__ = exc
                return
            log.warning("out of memory with a batch of %d; retrying as two batches", len(group))
            self.oom_backoffs += 1
            half = len(group) // 2
            self._run_group(group[:half], out)
            self._run_group(group[half:], out)
            return
        except Exception as exc:  # noqa: BLE001 - isolate the job that causes it
            if len(group) == 1:
                out[group[0].index] = exc
                return
            half = len(group) // 2
            self._run_group(group[:half], out)
            self._run_group(group[half:], out)
            return
        for job, output in zip(group, outputs):
            out[job.index] = self._result(job, output)

    def report_budget(self, profile: PromptProfile) -> int:
        """New tokens for a free-text answer: the profile's budget (+1000 for a thinking trace, as the
        quick start notebook allows), never more than ``max_new_tokens``."""
        budget = profile.max_new_tokens or self.max_new_tokens
        if self.thinking:
            budget += THINKING_EXTRA_TOKENS
        return max(1, min(budget, self.max_new_tokens))

    def _job(self, index: int, prepared: PreparedSeries, prepare_seconds: float) -> "_Job":
        """The conversation, schema and budget of one series in this engine's answer mode."""
        n = len(prepared.images)
        profile = self.profile_for(prepared.modality, prepared.body_part, n)
        language = profile.language or self.language
        localisation = localisation_for(prepared.modality)
        schema = schema_json(findings_schema(self.schema_bounds, language, n, localisation))
        answer_limit = max_answer_tokens(self.schema_bounds, language, n, localisation)
        if self.answer_mode == "report":
            messages = build_messages(prepared, profile, language=language, thinking=self.thinking)
            return _Job(index, prepared, profile, language, messages, None, prepare_seconds,
                        limit=self.report_budget(profile), localisation=localisation,
                        extraction_schema=schema, extraction_limit=answer_limit)
        messages = build_messages(prepared, profile, structured=True, language=language,
                                  thinking=self.thinking and self.answer_mode == "free")
        if self.answer_mode == "structured":
            return _Job(index, prepared, profile, language, messages, schema, prepare_seconds,
                        limit=answer_limit, localisation=localisation)
        return _Job(index, prepared, profile, language, messages, None, prepare_seconds,
                    limit=self.report_budget(profile), localisation=localisation)

    def _generate_jobs(self, group: list["_Job"]) -> list[GenerationOutput]:
        """One generate call for the group (the answer, or the report turn); in "report" mode then a
        second, grammar-constrained call for the extraction turn. A report already written (the group
        was split after an out-of-memory in the second turn) is not written again."""
        todo = [j for j in group if j.first is None]
        reuse = self.answer_mode == "report" and self.reuse_cache and len(group) == 1
        if todo:
            limit = max(j.limit for j in todo)
            for job, output in zip(todo, self.generate_batch([j.messages for j in todo], [j.schema for j in todo],
                                                             limit, keep_cache=reuse)):
                job.first = output
        if self.answer_mode != "report":
            return [j.first for j in group]  # type: ignore[misc]
        conversations = [extraction_messages(j.messages, j.first.text, j.language,  # type: ignore[union-attr]
                                             localisation=j.localisation, n_images=len(j.prepared.images))
                         for j in group]
        if reuse:
            [job] = group
            try:
                continued = self.continue_turn(job.first, conversations[0], job.extraction_schema,  # type: ignore[arg-type]
                                               job.extraction_limit)
            finally:
                job.first = dataclasses.replace(job.first, cache=None)  # type: ignore[arg-type]  # free it
            if continued is not None:
                return [continued]
        limit = max(j.extraction_limit for j in group)
        return self.generate_batch(conversations, [j.extraction_schema for j in group], limit)

    def _result(self, job: "_Job", output: GenerationOutput) -> AnalysisResult:
        """The result of one series: in "report" mode ``output`` is the extraction turn and the
        report text is the model's own report; otherwise ``output`` is the one answer."""
        prepared = job.prepared
        first = job.first if job.first is not None else output
        structured, error = parse_answer(output.text, prepared.transforms, job.language)
        if self.answer_mode == "report":
            turns = [TurnStats("report", first.input_tokens, first.generated_tokens, first.seconds),
                     TurnStats("extraction", output.input_tokens, output.generated_tokens, output.seconds)]
            text = first.text
            if not text.strip():
                text = render_text(structured, job.language) if structured is not None else ""
            if structured is None:
                log.warning("%s series: the findings could not be extracted from the report (%s)",
                            prepared.modality, error)
        else:
            turns = [TurnStats("answer", output.input_tokens, output.generated_tokens, output.seconds)]
            if structured is not None:
                text = render_text(structured, job.language)
            else:
                text = output.text
                log.warning("%s series: the answer is not structured (%s); the free text is the report",
                            prepared.modality, error)
        seconds = job.prepare_seconds + sum(t.seconds for t in turns)
        log.info(
            "analysed %s series (%s mode): %d image(s); %s; preprocess %.2f s",
            prepared.modality, self.answer_mode, len(prepared.images),
            "; ".join(f"{t.name} {t.input_tokens} input + {t.new_tokens} new tokens in {t.seconds:.2f} s"
                      for t in turns),
            job.prepare_seconds,
        )
        return AnalysisResult(
            modality=prepared.modality,
            findings_text=text,
            model=self.identity,
            sources=list(prepared.sources),
            prompt_profile=job.profile.name,
            generated_tokens=sum(t.new_tokens for t in turns),
            seconds=seconds,
            structured=structured,
            parse_error=error,
            language=job.language,
            answer_mode=self.answer_mode,
            turns=turns,
            prepare_seconds=job.prepare_seconds,
        )


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
