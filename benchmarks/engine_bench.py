"""Engine throughput vs a plain ``model.generate`` baseline, measured in the same run; and the answer
modes through both backends: the embedded engine and an OpenAI-compatible server (vLLM).

    python benchmarks/engine_bench.py                 # tiny random test model on CPU (< 2 min)
    python benchmarks/engine_bench.py --full          # MedGemma 1.5 4B architecture, random bf16, GPU
    python benchmarks/engine_bench.py --backend both  # + the same tiny model behind `transformers serve` (CPU)
    python benchmarks/engine_bench.py --backend openai --base-url http://127.0.0.1:8000/v1 \
        --model medgemma-1.5-4b-it --concurrency 16 --ct-slices 85 --new-tokens 256   # a vLLM server

Answer modes ("report": report turn then the extraction turn under the findings schema;
"structured": one answer under the schema) are measured the same way for each backend: tokens/s
and reports/min for 1 series and for N series at once (the embedded engine batches them, the
server gets N concurrent requests), and the time of one CT request (``--ct-slices`` images, one
new token: upload, image processing and prefill).

Why random weights: the figures depend on the architecture and the shapes, not on the weights, so
the full-size run needs no gated download. ``Gemma3Config()`` defaults are NOT MedGemma 1.5 4B; the
shapes are spelled out in :func:`full_config` (4.30 B parameters).

Printed: tokens/s and reports/min at batch 1 and batched for the baseline, our engine without and
with the grammar, the ratios, peak GPU memory, and the prefill time of a CT prompt (85 slices with
``--full``). One synthetic 896 px image per report.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def full_config() -> Any:
    """MedGemma 1.5 4B: Gemma 3 4B text (2560 / 34 layers / 8 heads, 4 KV / head 256 / 10240 / vocab 262208)
    + SigLIP So400m at 896 px, patch 14, 256 tokens per image."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=1024, max_position_embeddings=131_072, rope_theta=1_000_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=10_000.0,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                        boi_token_index=7, eoi_token_index=8, image_token_index=9)


def build_engine(full: bool, workdir: Path, max_batch: int, compile_: bool) -> Any:
    """Our engine around either model; the tiny test model's processor serves both (same image
    pipeline, 256 image tokens; its ids are valid in the full vocabulary)."""
    from scp_node.engine.medgemma import MedGemmaEngine
    from scp_node.engine.schema import SchemaBounds
    from scp_node.engine.testmodel import make_test_model

    model_dir = make_test_model(workdir / "tiny")
    engine = MedGemmaEngine(model_dir, device="cuda" if full else "cpu", max_batch=max_batch, compile=compile_,
                            schema_bounds=SchemaBounds(max_findings=3, description_chars=120))
    engine.load()
    if full:
        from transformers import Gemma3ForConditionalGeneration

        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Gemma3ForConditionalGeneration(full_config()).to(torch.bfloat16).eval()
        model.generation_config = engine._model.generation_config
        engine._model, engine._dtype = model, torch.bfloat16
        engine._grammar = None
        n = sum(p.numel() for p in model.parameters())
        print(f"full MedGemma 1.5 4B architecture, random bf16 weights: {n / 1e9:.2f} B parameters")
    else:
        print("tiny random test model on CPU (MedGemma architecture, ~1 MB); no GPU used")
    return engine


def chat(image: Image.Image, n_images: int = 1) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "You are an expert radiologist."}]
    for k in range(n_images):
        content += [{"type": "image", "image": image}] + ([{"type": "text", "text": f"SLICE {k + 1}"}] if n_images > 1 else [])
    content.append({"type": "text", "text": "Describe this chest X-ray."})
    return [{"role": "user", "content": content}]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def baseline(engine: Any, convs: list, new_tokens: int) -> tuple[float, int]:
    """Plain HF: processor + ``model.generate`` with its defaults (dynamic cache), greedy, fixed length."""
    processor, model = engine._processor, engine._model
    inputs = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True})
    inputs = inputs.to(engine._device)
    inputs["pixel_values"] = inputs["pixel_values"].to(engine._dtype)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sync()
    return time.perf_counter() - start, int(out.shape[0]) * (out.shape[1] - inputs["input_ids"].shape[1])


def ours(engine: Any, convs: list, new_tokens: int, constrained: bool) -> tuple[float, int]:
    from scp_node.engine.schema import findings_schema, max_answer_tokens, schema_json

    schema = schema_json(findings_schema(engine.schema_bounds, "en", 1)) if constrained else None
    limit = max_answer_tokens(engine.schema_bounds, "en", 1) if constrained else new_tokens
    sync()
    start = time.perf_counter()
    outputs = engine.generate_batch(convs, [schema] * len(convs), limit)
    sync()
    return time.perf_counter() - start, sum(o.generated_tokens for o in outputs)


def ct_prefill(engine: Any, image: Image.Image, slices: int) -> tuple[float, int]:
    """One forward pass over a CT prompt (prefill + first token) through our engine."""
    sync()
    start = time.perf_counter()
    [out] = engine.generate_batch([chat(image, slices)], [None], 1)
    sync()
    return time.perf_counter() - start, out.input_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full 4B architecture on a GPU")
    parser.add_argument("--batch", type=int, default=None, help="batched size (default 16 full, 4 CPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 full, 32 CPU")
    parser.add_argument("--ct-slices", type=int, default=None, help="default 85 full, 8 CPU")
    parser.add_argument("--compile", action="store_true", help="engine with static KV cache (+ compile on CUDA)")
    parser.add_argument("--backend", choices=("transformers", "openai", "both"), default="transformers",
                        help="embedded engine (default), an OpenAI-compatible server, or both")
    parser.add_argument("--base-url", default="", help="openai backend: the server (default: start transformers "
                        "serve on the tiny test model, CPU)")
    parser.add_argument("--model", default="", help="openai backend: the served model's name")
    parser.add_argument("--concurrency", type=int, default=None, help="N series at once (default: --batch)")
    parser.add_argument("--modes", default="report,structured", help="answer modes to measure (comma-separated)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.backend == "openai":
        if args.full:
            sys.exit("--full builds the model in this process; with --backend openai the server has the model")
        return served_only(args, modes)
    if args.full and not torch.cuda.is_available():
        sys.exit("--full needs a CUDA GPU; none is available here (run without --full for the CPU check)")
    batch = args.batch or (16 if args.full else 4)
    new_tokens = args.new_tokens or (256 if args.full else 32)
    slices = args.ct_slices or (85 if args.full else 8)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (896, 896, 3), dtype=np.uint8))

    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(args.full, Path(tmp), batch, args.compile)
        print(f"device {engine._device}, dtype {engine._dtype}, new tokens {new_tokens}, batch 1 and {batch}")
        if args.compile:
            from scp_node.engine.warmup import warm_up

            print(f"warm-up (as serve does with engine.compile): {warm_up(engine):.1f} s")
        baseline(engine, [chat(image)], 4)  # warm-up (allocator, kernels, compile)
        ours(engine, [chat(image)], 4, constrained=False)
        ours(engine, [chat(image)], 4, constrained=True)
        rows = []
        for size in (1, batch):
            convs = [chat(image)] * size
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            for name, run in (("baseline generate", lambda: baseline(engine, convs, new_tokens)),
                              ("engine, free text", lambda: ours(engine, convs, new_tokens, False)),
                              ("engine, JSON grammar", lambda: ours(engine, convs, new_tokens, True))):
                seconds, tokens = run()
                rows.append((name, size, seconds, tokens))
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        ct_seconds, ct_tokens = ct_prefill(engine, image, slices)
        ct_peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        concurrency = args.concurrency or batch
        engine.max_batch = max(engine.max_batch, concurrency)
        mode_rows = measure_modes("embedded", EmbeddedRunner(engine), image, modes, concurrency, new_tokens, slices)
        if args.backend == "both":
            with served_runner(args, Path(tmp)) as runner:
                mode_rows += measure_modes("openai", runner, image, modes, concurrency, new_tokens, slices)

    print(f"\n{'run':<22} {'batch':>5} {'seconds':>8} {'tokens':>7} {'tok/s':>9} {'reports/min':>12}")
    rate = {}
    for name, size, seconds, tokens in rows:
        rate[(name, size)] = tokens / seconds
        print(f"{name:<22} {size:>5} {seconds:>8.2f} {tokens:>7} {tokens / seconds:>9.1f} {size / seconds * 60:>12.1f}")
    for size in (1, batch):
        base = rate[("baseline generate", size)]
        print(f"ratio vs baseline at batch {size}: free text {rate[('engine, free text', size)] / base:.2f}x, "
              f"JSON grammar {rate[('engine, JSON grammar', size)] / base:.2f}x")
    print(f"batched / batch-1 baseline: {rate[('engine, free text', batch)] / rate[('baseline generate', 1)]:.2f}x")
    print(f"peak GPU memory (generation): {peak:.1f} GiB" if peak == peak else "peak GPU memory: n/a (CPU)")
    print(f"CT prefill, {slices} slices, {ct_tokens} tokens: {ct_seconds:.2f} s"
          + (f", peak {ct_peak:.1f} GiB" if ct_peak == ct_peak else ""))
    print_modes(mode_rows)


# -- answer modes through both backends -------------------------------------------------------------


def conversation(image: Image.Image, n_images: int, structured: bool) -> list[dict[str, Any]]:
    """The bench chat, with the JSON answer format after the question for a one-pass structured answer."""
    from scp_node.engine.prompts import answer_format

    messages = chat(image, n_images)
    if structured:
        messages[0]["content"][-1]["text"] += answer_format(n_images, True, "en", "box")
    return messages


def mode_plan(bounds: Any, mode: str, n_images: int, new_tokens: int) -> tuple[bool, int, str, int]:
    """(structured prompt, first turn's token limit, schema text, extraction limit) of a mode."""
    from scp_node.engine.schema import findings_schema, max_answer_tokens, schema_json

    schema = schema_json(findings_schema(bounds, "en", n_images, "box"))
    limit = max_answer_tokens(bounds, "en", n_images, "box")
    if mode == "report":
        return False, new_tokens, schema, limit
    if mode == "structured":
        return True, limit, schema, 0
    raise SystemExit(f"unknown answer mode {mode!r} (report, structured)")


class EmbeddedRunner:
    """Answer modes on the embedded engine: one batched generate per turn (as MedGemmaEngine does)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def run(self, mode: str, image: Image.Image, n: int, new_tokens: int) -> tuple[float, int]:
        from scp_node.engine.prompts import extraction_messages

        structured, limit, schema, extraction_limit = mode_plan(self.engine.schema_bounds, mode, 1, new_tokens)
        convs = [conversation(image, 1, structured) for _ in range(n)]
        sync()
        start = time.perf_counter()
        first = self.engine.generate_batch(convs, [None if mode == "report" else schema] * n, limit)
        tokens = sum(o.generated_tokens for o in first)
        if mode == "report":
            second = self.engine.generate_batch(
                [extraction_messages(c, o.text, "en", localisation="box", n_images=1) for c, o in zip(convs, first)],
                [schema] * n, extraction_limit)
            tokens += sum(o.generated_tokens for o in second)
        sync()
        return time.perf_counter() - start, tokens

    def ct_request(self, image: Image.Image, slices: int) -> tuple[float, int]:
        return ct_prefill(self.engine, image, slices)


class ServedRunner:
    """Answer modes through an OpenAI-compatible server: N series are N concurrent requests."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def _series(self, mode: str, image: Image.Image, new_tokens: int) -> int:
        import json as json_

        from scp_node.engine.openai_backend import _Images
        from scp_node.engine.prompts import extraction_messages

        structured, limit, schema, extraction_limit = mode_plan(self.backend.schema_bounds, mode, 1, new_tokens)
        schema_dict = json_.loads(schema)
        images = _Images(self.backend.image_format)
        conv = conversation(image, 1, structured)
        first = self.backend.complete(conv, limit, None if mode == "report" else schema_dict, images=images)
        tokens = first.completion_tokens
        if mode == "report":
            second = self.backend.complete(extraction_messages(conv, first.text, "en", localisation="box", n_images=1),
                                           extraction_limit, schema_dict, images=images)
            tokens += second.completion_tokens
        return tokens

    def run(self, mode: str, image: Image.Image, n: int, new_tokens: int) -> tuple[float, int]:
        from concurrent.futures import ThreadPoolExecutor

        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            tokens = sum(pool.map(lambda _: self._series(mode, image, new_tokens), range(n)))
        return time.perf_counter() - start, tokens

    def ct_request(self, image: Image.Image, slices: int) -> tuple[float, int]:
        start = time.perf_counter()
        out = self.backend.complete(chat(image, slices), 1)
        return time.perf_counter() - start, out.prompt_tokens


def measure_modes(name: str, runner: Any, image: Image.Image, modes: list[str], n: int, new_tokens: int,
                  slices: int) -> list[tuple[str, str, int, float, int]]:
    """(backend, mode, series at once, seconds, new tokens) rows, plus the CT request; warmed up first."""
    runner.run(modes[0], image, 1, 2)  # warm-up
    rows = []
    for mode in modes:
        for size in (1, n):
            seconds, tokens = runner.run(mode, image, size, new_tokens)
            rows.append((name, mode, size, seconds, tokens))
    seconds, prompt_tokens = runner.ct_request(image, slices)
    rows.append((name, f"CT request, {slices} slices", 1, seconds, prompt_tokens))
    return rows


def print_modes(rows: list[tuple[str, str, int, float, int]]) -> None:
    print(f"\n{'backend':<9} {'answer mode':<24} {'series':>6} {'seconds':>8} {'tokens':>7} {'tok/s':>8} "
          f"{'reports/min':>12}")
    for backend, mode, size, seconds, tokens in rows:
        if mode.startswith("CT request"):
            print(f"{backend:<9} {mode:<24} {size:>6} {seconds:>8.2f} {tokens:>7}  (prompt tokens; upload, "
                  "image processing, prefill, 1 new token)")
            continue
        print(f"{backend:<9} {mode:<24} {size:>6} {seconds:>8.2f} {tokens:>7} {tokens / seconds:>8.1f} "
              f"{size / seconds * 60:>12.1f}")


class served_runner:  # noqa: N801 - a context manager used like a function
    """A ServedRunner on ``--base-url``, or on ``transformers serve`` started here on the tiny model (CPU)."""

    def __init__(self, args: Any, workdir: Path) -> None:
        self.args, self.workdir, self.proc = args, workdir, None

    def __enter__(self) -> ServedRunner:
        from scp_node.engine.modeldir import weights_sha256
        from scp_node.engine.openai_backend import OpenAIBackend
        from scp_node.engine.schema import SchemaBounds

        base_url, model = self.args.base_url, self.args.model
        sha = "0" * 64  # the bench writes no SR
        if not base_url:
            from scp_node.engine.testmodel import make_test_model

            folder = make_test_model(self.workdir / "served-tiny")
            base_url, model = self._serve(folder), str(folder)
            sha = weights_sha256(folder)
        if not model:
            sys.exit("--backend openai with --base-url needs --model (the served model's name)")
        concurrency = self.args.concurrency or self.args.batch or (16 if self.args.full else 4)
        backend = OpenAIBackend(base_url, model, weights_sha256=sha, max_concurrent=concurrency,
                                schema_bounds=SchemaBounds(max_findings=3, description_chars=120),
                                request_timeout=1800.0)
        backend.load()
        print(f"openai backend: {base_url}, model {model}, {concurrency} requests at once, "
              f"{backend.image_format} images")
        return ServedRunner(backend)

    def _serve(self, folder: Path) -> str:
        import json as json_
        import socket
        import subprocess
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = open(self.workdir / "serve.log", "wb")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
                                      "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
                                      "--log-level", "warning"], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"transformers serve exited ({self.proc.returncode}); see {self.workdir / 'serve.log'}")
            try:
                with opener.open(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    if str(folder) in [m["id"] for m in json_.loads(r.read())["data"]]:
                        print(f"transformers serve (CPU) on the tiny test model, port {port}")
                        return f"http://127.0.0.1:{port}/v1"
            except OSError:
                pass
            time.sleep(0.5)
        sys.exit("transformers serve did not start within 180 s")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            import signal

            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()


def served_only(args: Any, modes: list[str]) -> None:
    """``--backend openai``: only the server, measured as the embedded engine is in the default run."""
    new_tokens = args.new_tokens or 32
    slices = args.ct_slices or 8
    n = args.concurrency or args.batch or 4
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (896, 896, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as tmp, served_runner(args, Path(tmp)) as runner:
        rows = measure_modes("openai", runner, image, modes, n, new_tokens, slices)
    print_modes(rows)


if __name__ == "__main__":
    main()
