"""engine.compile = true: the static-cache path runs at start (warm-up) and then analyses as before."""

from __future__ import annotations

from pathlib import Path

from scp_node.engine.medgemma import MedGemmaEngine
from scp_node.engine.warmup import warm_up


def test_warm_up_runs_batch_1_and_max_batch_then_the_static_cache_engine_answers(model_dir: Path,
                                                                                  monkeypatch) -> None:
    engine = MedGemmaEngine(model_dir, device="cpu", max_new_tokens=16, compile=True, max_batch=3)
    sizes: list[tuple[int, bool]] = []
    real = engine.generate_batch

    def counting(conversations, schemas, max_new_tokens=None):  # type: ignore[no-untyped-def]
        sizes.append((len(conversations), schemas[0] is not None))
        return real(conversations, schemas, max_new_tokens)

    monkeypatch.setattr(engine, "generate_batch", counting)
    assert warm_up(engine) > 0
    # report mode: the free-text report turn and the grammar-constrained extraction turn, at both sizes
    assert sizes == [(1, False), (1, True), (3, False), (3, True)]
    assert engine._generation_config(4).cache_implementation == "static"
    # After the warm-up the same engine generates as usual.
    [out] = real([[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]], [None], 4)
    assert out.generated_tokens >= 1
