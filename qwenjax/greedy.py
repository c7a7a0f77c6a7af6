"""A plain batched greedy loop over the model: prefill once, then one token per step.

This is the Foundation's generation path (CLI, parity tests); the engine with
continuous batching and sampling replaces it for serving.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.kv_cache import KVCache
from qwenjax.loading import LoadedModel
from qwenjax.model import StepBatch


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


class GreedyGenerator:
    def __init__(self, lm: LoadedModel, page_size: int = 16, kv_cache_dtype: str = "auto"):
        self.lm = lm
        self.page_size = page_size
        self.kv_cache_dtype = kv_cache_dtype
        model = lm.model

        def step(weights, cache, batch):
            logits, cache = model.last_logits(weights, cache, batch)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

        # The cache is donated: XLA writes the new K/V into the same buffers
        # instead of copying every page pool each step.
        self._step = jax.jit(step, donate_argnums=(1,))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        config, ps = self.lm.config, self.page_size
        lengths = np.array([len(p) for p in prompts], np.int32)
        if int(lengths.max()) + max_new_tokens > config.max_context:
            raise ValueError(f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the max context of {config.max_context}")
        batch_size = len(prompts)
        chunk = _bucket(int(lengths.max()))
        pages_per_seq = _bucket(-(-(int(lengths.max()) + max_new_tokens) // ps), minimum=1)
        cache = KVCache.create(
            num_layers=config.num_layers, kv_heads=self.lm.layout.heads.kv_heads,
            head_dim=config.head_dim, num_pages=batch_size * pages_per_seq, page_size=ps,
            dtype=self.lm.weights.final_norm.dtype, mesh=self.lm.mesh, kv_cache_dtype=self.kv_cache_dtype)
        block_tables = jnp.arange(batch_size * pages_per_seq, dtype=jnp.int32).reshape(
            batch_size, pages_per_seq)

        tokens = np.zeros((batch_size, chunk), np.int32)
        positions = np.full((batch_size, chunk), -1, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            positions[i, : len(p)] = np.arange(len(p))
        batch = StepBatch(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(lengths), block_tables)
        next_ids, cache = self._step(self.lm.weights, cache, batch)

        stops = set(stop_token_ids)
        outputs: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(batch_size, bool)
        seq_lens = lengths.copy()
        for _ in range(max_new_tokens):
            ids = np.asarray(next_ids)
            for i in np.flatnonzero(~done):
                outputs[i].append(int(ids[i]))
                if ids[i] in stops or len(outputs[i]) >= max_new_tokens:
                    done[i] = True
            if done.all():
                break
            batch = StepBatch(jnp.asarray(ids[:, None]), jnp.asarray(seq_lens[:, None]),
                              jnp.asarray(seq_lens + 1), block_tables)
            seq_lens = seq_lens + 1
            next_ids, cache = self._step(self.lm.weights, cache, batch)
        return outputs
