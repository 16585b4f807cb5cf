"""Engine throughput vs a plain ``model.generate`` baseline, measured in the same run.

    python benchmarks/engine_bench.py                 # tiny random test model on CPU (< 2 min)
    python benchmarks/engine_bench.py --full          # MedGemma 1.5 4B architecture, random bf16, GPU

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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
