"""Warm-up at start: the first generation with ``engine.compile = true`` pays for compilation.

With a static KV cache transformers compiles the decoding step (``torch.compile``, on CUDA) the
first time it runs at a given batch size; that takes from seconds to minutes.  Paid at start, it
delays the node's readiness instead of the first patient's report.  The warm-up runs the real
generation path — processor, grammar-constrained decoding when ``structured`` — on a blank image at
batch 1 and at ``max_batch``, the two sizes the scheduler uses most.  A series whose prompt is much
longer than the warm-up's (a CT) can still make transformers size a larger cache once, later.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .schema import findings_schema, schema_json

log = logging.getLogger(__name__)

#: New tokens per warm-up generation: enough for several decoding steps of the compiled graph.
WARM_UP_TOKENS = 8


def warm_up(engine: Any) -> float:
    """Run a blank-image generation at batch 1 and at ``engine.max_batch``; return the seconds taken."""
    from PIL import Image

    engine.load()
    start = time.perf_counter()
    image = Image.new("RGB", (engine.image_size, engine.image_size))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe this image."}]}]
    schema = schema_json(findings_schema(engine.schema_bounds, engine.language, 1)) if engine.structured else None
    # "report" mode runs a free-text turn and a grammar-constrained one: warm both up.
    schemas = [None, schema] if getattr(engine, "answer_mode", "") == "report" else [schema]
    for size in sorted({1, engine.max_batch}):
        for one in schemas:
            engine.generate_batch([messages] * size, [one] * size, max_new_tokens=WARM_UP_TOKENS)
    seconds = time.perf_counter() - start
    log.info("engine warm-up (batch sizes 1 and %d) took %.1f s", engine.max_batch, seconds)
    return seconds
