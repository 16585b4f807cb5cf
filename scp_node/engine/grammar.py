"""Grammar-constrained decoding with xgrammar, as a transformers LogitsProcessor that batches.

Why our own processor: ``xgrammar.contrib.hf.LogitsProcessor`` asserts once one row of a batch has
finished and its pad tokens arrive. Here each row has its own matcher; a row whose matcher has
terminated (it accepted a stop token) is left alone, so finished rows pad while the others go on.
The same processor also forbids special tokens (``<pad>``, ``<image_soft_token>``, the thinking
markers, ...) other than the stop tokens: xgrammar would otherwise accept them as text in strings.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch
import xgrammar as xgr
from transformers import LogitsProcessor


class GrammarFactory:
    """Compiles JSON schemas for one tokenizer / model vocabulary; compiled grammars are cached."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 suppress_token_ids: Sequence[int] = ()) -> None:
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = sorted({int(i) for i in stop_token_ids})
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                       stop_token_ids=self.stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        stop = set(self.stop_token_ids)
        self.suppress_token_ids = sorted({int(i) for i in suppress_token_ids if int(i) not in stop
                                          and 0 <= int(i) < self.vocab_size})
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def compile(self, schema_text: str) -> Any:
        """The compiled grammar for a JSON schema text (compact JSON: no free whitespace)."""
        with self._lock:
            grammar = self._cache.get(schema_text)
            if grammar is None:
                grammar = self.compiler.compile_json_schema(schema_text, any_whitespace=False)
                self._cache[schema_text] = grammar
            return grammar

    def processor(self, schema_texts: Sequence[str]) -> "BatchGrammarProcessor":
        """A fresh processor for one ``generate`` call: one grammar per batch row."""
        return BatchGrammarProcessor([self.compile(s) for s in schema_texts], self.vocab_size,
                                     self.suppress_token_ids)


class BatchGrammarProcessor(LogitsProcessor):
    """Masks each row's logits to the tokens its grammar allows next; finished rows are left alone."""

    def __init__(self, grammars: Sequence[Any], vocab_size: int, suppress_token_ids: Sequence[int] = ()) -> None:
        self.matchers = [xgr.GrammarMatcher(g) for g in grammars]
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(len(self.matchers), vocab_size)
        self.suppress = torch.tensor(list(suppress_token_ids), dtype=torch.long)
        self._prompt_length: int | None = None
        self.rejected = [False] * len(self.matchers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.matchers):
            raise ValueError(f"grammar processor built for {len(self.matchers)} rows, got {input_ids.shape[0]}")
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        else:
            last = input_ids[:, -1].tolist()
            for row, matcher in enumerate(self.matchers):
                if not matcher.is_terminated() and not self.rejected[row]:
                    # A token the mask allowed is always accepted; False means a bug upstream.
                    self.rejected[row] = not matcher.accept_token(int(last[row]))
        active = [row for row, m in enumerate(self.matchers) if not m.is_terminated() and not self.rejected[row]]
        if not active:
            return scores
        for row in active:
            self.matchers[row].fill_next_token_bitmask(self.bitmask, row)
        if self.suppress.numel():
            scores[:, self.suppress.to(scores.device)] = -float("inf")
        width = min(scores.shape[-1], self.vocab_size)
        view = scores[:, :width]
        bitmask = self.bitmask.to(scores.device, non_blocking=True)
        if scores.device.type == "cpu" or len(active) < len(self.matchers):
            xgr.apply_token_bitmask_inplace(view, bitmask, vocab_size=width, indices=active)
        else:
            xgr.apply_token_bitmask_inplace(view, bitmask, vocab_size=width)
        if scores.shape[-1] > width:  # padded vocabulary rows beyond the tokenizer: never valid
            scores[active, width:] = -float("inf")
        return scores

    @property
    def finished(self) -> list[bool]:
        """Per row: the grammar accepted a complete answer and a stop token."""
        return [m.is_terminated() for m in self.matchers]
