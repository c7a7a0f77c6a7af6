"""Speculative decoding with n-gram drafts (prompt lookup), as vLLM's ``method: "ngram"``,
or with a draft model's (``method: "draft_model"``, qwenjax/engine/draft_model.py).

A decoding request's next tokens often repeat a stretch of its own context (code being
edited, a quoted document, a JSON key list). The drafter looks for the latest earlier
occurrence of the context's last ``n`` tokens (longest ``n`` first) and proposes the
tokens that followed it. The engine then computes the last token and the drafts in one
step, like a short prefill chunk, and samples every position: draft ``i`` is kept while the
token sampled at its position equals it. The first sampled token that differs, or the one
after the last draft, is kept too, so a step yields 1 to k + 1 tokens.

Sampling each position as usual and comparing with the draft is exact rejection sampling
for a draft that puts all its mass on one token (accept with probability p(draft), else a
token from p without it), and it keeps the sampling key of each output index: greedy and
seeded requests produce the same tokens with or without speculation.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np


METHODS = ("ngram", "draft_model")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config``: n-gram drafts, or a draft model's (``model``: a smaller
    model with the same tokenizer, e.g. Qwen2.5-0.5B-Instruct for Qwen2.5-72B-Instruct)."""

    num_speculative_tokens: int
    method: str | None = None  # None: "draft_model" when a model is given, else "ngram"
    model: str | None = None   # the draft model: an HF checkpoint directory or a preset name
    prompt_lookup_max: int = 4  # longest n-gram matched
    prompt_lookup_min: int = 2  # shortest n-gram matched
    # No drafts while more requests than this are running (None: always draft). Checking k
    # drafts computes 1 + k tokens per request: nearly free while a step is bound by reading
    # the weights (small batches on a GPU), not once it is bound by compute.
    disable_by_batch_size: int | None = None

    def __post_init__(self):
        if self.method is None:
            object.__setattr__(self, "method", "ngram" if self.model is None else "draft_model")
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(METHODS)}, got "
                             f"{self.method!r}")
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ValueError(f"speculative_config.model must be a path or preset name, got {self.model!r}")
        if self.method == "draft_model" and self.model is None:
            raise ValueError("speculative_config.method 'draft_model' needs speculative_config.model "
                             "(the draft model's directory)")
        if self.method == "ngram" and self.model is not None:
            raise ValueError(f"speculative_config.model is set ({self.model!r}) but method is "
                             "'ngram', which drafts from the context; use method 'draft_model'")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config.{name} must be a positive int, got {value!r}")
        if self.disable_by_batch_size is not None and (
                not isinstance(self.disable_by_batch_size, int) or self.disable_by_batch_size < 1):
            raise ValueError(f"speculative_config.disable_by_batch_size must be a positive int or "
                             f"null, got {self.disable_by_batch_size!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) "
                             f"exceeds prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | Mapping[str, Any] | None") -> "SpeculativeConfig | None":
        """From a dict such as ``{"method": "ngram", "num_speculative_tokens": 4}`` (None: off)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        return cls(**value)


class NgramIndex:
    """``propose_ngram`` for a sequence that only grows, at a cost per step that follows the new
    tokens, not the context: the latest start of every n-gram (min_n ≤ n ≤ max_n) that ends
    before the last token is kept in a dict, and each step adds those the new tokens end.
    (A search over the whole context took ~2 ms per request per step at 32k tokens.)"""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._latest: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams with an exclusive end ≤ this are in _latest

    def update(self) -> None:
        """Index the n-grams the tokens added since have completed (~3 µs a token); the
        scheduler calls it as a prompt's chunks are computed, so the first draft does not
        index a long prompt at once (32k tokens: ~90 ms)."""
        tokens = self.tokens
        for end in range(self._indexed + 1, len(tokens)):  # never those ending at the last token
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._latest[tuple(tokens[end - n: end])] = end - n
        self._indexed = max(self._indexed, len(tokens) - 1)

    def propose(self, k: int) -> list[int]:
        self.update()
        tokens, total = self.tokens, len(self.tokens)
        if k < 1:
            return []
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            start = self._latest.get(tuple(tokens[total - n:]))
            if start is not None:
                return tokens[start + n: start + n + k]
        return []


def propose_ngram(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the context's last
    ``n`` tokens, for the largest ``n`` in [min_n, max_n] that occurs; [] when none does.
    (A search of the whole context: the reference ``NgramIndex`` is tested against.)"""
    if k < 1 or len(tokens) <= min_n:
        return []
    context = np.asarray(tokens, np.int64)
    total = len(context)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = context[total - n:]
        # Windows starting at 0 .. total - n - 1: every occurrence that ends before the suffix's end.
        windows = np.lib.stride_tricks.sliding_window_view(context[: total - 1], n)
        starts = np.flatnonzero((windows == suffix).all(axis=1))
        if starts.size:
            follow = int(starts[-1]) + n
            return context[follow: follow + k].tolist()
    return []
