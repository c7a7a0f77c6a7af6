"""Speculative decoding with a draft model (vLLM's ``speculative_config={"model": DIR, ...}``).

A smaller model with the same tokenizer (Qwen2.5-0.5B-Instruct for 7B…72B) proposes the
next k tokens; the engine checks them in one step of the target model exactly as it checks
n-gram drafts (qwenjax/engine/speculative.py), so outputs do not depend on the draft: it only
decides how many tokens a step yields.

Greedy requests get the draft's greedy tokens. A sampled request's draft for output index
``s`` is drawn the way the served model's sampler will draw that token: the request's
temperature, top-k, top-p and min-p applied to the draft's logits, plus the very Gumbel noise
the sampler adds at step ``s`` (``fold_in(key(seed), s)``). The target keeps a draft when its
own sample equals it, and with shared noise the two argmaxes agree whenever the two models'
truncated distributions are close: a coupled draw, not a guess at the most likely token. The
target's samples are unchanged, so seeded requests keep their tokens with or without drafts.

The draft model runs on the target's mesh with a KV cache of its own over the *same page
ids*: a request's pages (allocated by the scheduler for its tokens and its drafts) index both
caches, so the draft needs no allocator and is freed with the request. What the draft cache
holds is tracked per request (``DraftState``): ``computed`` positions hold the draft's K/V
of the request's tokens, and ``fed`` the drafts written after them, which count once the
target accepts them. A prompt is caught up alongside its prefill: each step, the draft
computes the prompt chunks the served model computes (``catch_up``, in calls of up to
``CATCHUP_CHUNK`` tokens a row), so a request's first draft does not hold up the decoding
requests of its step. Before proposing, the draft catches up on anything else it has not
seen (tokens decoded while drafting was paused, a cache rebuilt after a failure), then one
program computes the last ``WINDOW`` tokens (the one or two the last check added) and k - 1
decode steps on device: one dispatch and one read-back per step.

A wrong or stale draft cache only makes drafts worse, never outputs wrong; after a failed
draft call the cache is rebuilt and every request starts over (``epoch``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwenjax.engine.request import Request
from qwenjax.engine.runner import bucket_for, row_buckets
from qwenjax.kv_cache import KVCache, page_bytes_per_device
from qwenjax.loading import LoadedModel
from qwenjax.model import StepBatch
from qwenjax.sampling import GREEDY_TEMPERATURE_EPS, row_noise, truncated_logits, truncation_settings

log = logging.getLogger(__name__)

CATCHUP_CHUNK = 256  # tokens of one request the draft catches up on per call
WINDOW = 2           # tokens the proposing call computes before its decode steps (1 or 2 new)


@dataclasses.dataclass
class DraftState:
    """What the draft cache holds for one request (``Request.draft_state``)."""

    epoch: int
    computed: int = 0              # positions 0 .. computed - 1 hold the draft K/V of its tokens
    fed: tuple[int, ...] = ()      # drafts whose K/V follow them (right if the target took them)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftSampling:
    """How each row of a proposing call draws its drafts: the request's temperature and
    truncation, its seed, and the output index of its first draft (the sampler's ``step``)."""

    temperature: np.ndarray  # [R] float32, 0 = greedy (padding rows too)
    top_k: np.ndarray        # [R] int32, 0 = off
    top_p: np.ndarray        # [R] float32
    min_p: np.ndarray        # [R] float32
    seeds: np.ndarray        # [R] uint32
    steps: np.ndarray        # [R] int32

    @classmethod
    def empty(cls, rows: int) -> "DraftSampling":
        return cls(np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32),
                   np.zeros(rows, np.float32), np.zeros(rows, np.uint32), np.zeros(rows, np.int32))

    def set_row(self, i: int, request: Request) -> None:
        (self.temperature[i], self.top_k[i], self.top_p[i],
         self.min_p[i]) = truncation_settings(request.params)
        self.seeds[i] = request.seed % 2**32
        self.steps[i] = request.num_output_tokens


class DraftModel:
    """The draft model of one engine: its weights, its KV cache and its two programs."""

    def __init__(self, lm: LoadedModel, *, vocab_size: int, num_speculative_tokens: int,
                 num_pages: int, page_size: int, pages_per_seq: int, max_rows: int):
        """``vocab_size``: the served model's (its sampler's noise is drawn over all of it)."""
        if dict(lm.mesh.shape).get("pp", 1) > 1:
            raise ValueError("speculative decoding with a draft model needs pp = 1")
        self.lm = lm
        self.k = num_speculative_tokens
        self.num_pages, self.page_size, self.pages_per_seq = num_pages, page_size, pages_per_seq
        self.buckets = [size for size in row_buckets(max_rows) if size]
        self.vocab = min(vocab_size, lm.config.vocab_size)  # ids both models know
        self.epoch = 0
        self.catchup_calls = 0  # catch-up programs run (prompt chunks, or before a proposal)
        self._replicated = NamedSharding(lm.mesh, PartitionSpec())
        self.cache = self._new_cache()
        model, vocab, k = lm.model, self.vocab, self.k

        def choose(logits, sampling: DraftSampling, offset):
            """Each row's draft token: greedy, or the token the served model's sampler would
            draw from these logits with its noise for that step (the coupled draw)."""
            logits = logits[:, :vocab].astype(jnp.float32)
            greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            greedy = sampling.temperature < GREEDY_TEMPERATURE_EPS

            def coupled():
                masked = truncated_logits(logits, sampling.temperature, sampling.top_k,
                                          sampling.top_p, sampling.min_p)
                noise = row_noise(sampling.seeds, sampling.steps + offset, vocab_size)[:, :vocab]
                return jnp.where(greedy, greedy_ids,
                                 jnp.argmax(masked + noise, axis=-1).astype(jnp.int32))

            return jax.lax.cond(jnp.all(greedy), lambda: greedy_ids, coupled)

        def run(weights, cache, batch: StepBatch, limits, sampling: DraftSampling, steps: int):
            """Compute ``batch`` (then ``steps`` decode steps): the draft token after each row's
            last position and each step's, ``[rows, steps + 1]``. A decode step writes only at
            positions ≤ the row's ``limits`` (its pages end there)."""
            logits, cache = model.last_logits(weights, cache, batch)
            token = choose(logits, sampling, 0)
            last = jnp.max(batch.positions, axis=1)  # -1: a padding row
            drafts = jnp.zeros((token.shape[0], steps + 1), jnp.int32).at[:, 0].set(token)

            def body(i, carry):
                cache, token, drafts = carry
                position = last + 1 + i
                position = jnp.where((last >= 0) & (position <= limits), position, -1)
                step = StepBatch(token[:, None], position[:, None], jnp.maximum(position + 1, 0),
                                 batch.block_tables)
                logits, cache = model.last_logits(weights, cache, step)
                token = choose(logits, sampling, i + 1)
                return cache, token, drafts.at[:, i + 1].set(token)

            cache, _, drafts = jax.lax.fori_loop(0, steps, body, (cache, token, drafts))
            return drafts, cache

        # The draft cache is donated, as the target's: written in place.
        self._run = jax.jit(run, static_argnames=("steps",), donate_argnums=(1,))
        self._steps = {"catchup": (CATCHUP_CHUNK, 0), "propose": (WINDOW, k - 1)}

    # ---- memory ------------------------------------------------------------------------------
    @staticmethod
    def page_bytes(lm: LoadedModel, page_size: int) -> int:
        """Bytes of one page of the draft cache on each device."""
        layout = lm.layout
        return page_bytes_per_device(num_layers=lm.config.num_layers,
                                     kv_heads_per_device=layout.heads.kv_heads // layout.heads.tp,
                                     head_dim=lm.config.head_dim, page_size=page_size,
                                     dtype=lm.weights.final_norm.dtype)

    def _new_cache(self) -> KVCache:
        lm = self.lm
        return KVCache.create(num_layers=lm.config.num_layers, kv_heads=lm.layout.heads.kv_heads,
                              head_dim=lm.config.head_dim, num_pages=self.num_pages,
                              page_size=self.page_size, dtype=lm.weights.final_norm.dtype,
                              mesh=lm.mesh)

    # ---- compilation -------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Compile the catch-up and proposing programs for every row bucket (padding rows:
        nothing is written)."""
        for kind in self._steps:
            for rows in self.buckets:
                self._call(kind, [], rows)

    # ---- proposing ---------------------------------------------------------------------------
    def propose(self, batch: Sequence[tuple[Request, int]]) -> list[list[int]]:
        """Up to ``k`` draft tokens for each (request, k): requests whose known tokens are all
        there, with pages for their tokens and k drafts."""
        if not batch:
            return []
        try:
            return self._propose(batch)
        except Exception:  # a draft that fails costs speed only: the step goes on without it
            log.exception("the draft model failed; proposing nothing this step, rebuilding its cache")
            self.epoch += 1
            self.cache = self._new_cache()
            return [[] for _ in batch]

    def _state(self, request: Request) -> DraftState:
        """The request's draft state with the drafts the target has since accepted counted."""
        state = request.draft_state
        if state is None or state.epoch != self.epoch:
            state = request.draft_state = DraftState(self.epoch)
        if state.fed:
            # (Never past the last token: the proposing call computes it for its logits.)
            end = min(request.num_tokens - 1, state.computed + len(state.fed))
            known = request.tokens(state.computed, max(end, state.computed))
            taken = 0
            while taken < len(known) and known[taken] == state.fed[taken]:
                taken += 1
            state.computed += taken
            state.fed = ()
        return state

    def catch_up(self, batch: Sequence[tuple[Request, int]]) -> None:
        """Compute the draft K/V of each request's first ``upto`` tokens that the draft cache
        lacks: the engine calls it with the prompt chunks of a step, so that a prompt is
        caught up alongside its prefill rather than at its first draft, where the catch-up
        would hold up every decoding request of that step."""
        if not batch:
            return
        try:
            self._catch_up([(request, self._state(request), upto) for request, upto in batch])
        except Exception:  # as in propose: speed only
            log.exception("the draft model failed to catch up; rebuilding its cache")
            self.epoch += 1
            self.cache = self._new_cache()

    def _catch_up(self, rows: Sequence[tuple[Request, DraftState, int]]) -> None:
        """Catch-up calls until each (request, state, upto) has its first ``upto`` tokens."""
        while True:
            calls = []
            for request, state, upto in rows:
                if upto > state.computed:
                    n = min(CATCHUP_CHUNK, upto - state.computed)
                    calls.append((request, state.computed, n, 0))
                    state.computed += n
            if not calls:
                return
            for start in range(0, len(calls), self.buckets[-1]):
                part = calls[start: start + self.buckets[-1]]
                self.catchup_calls += 1
                self._call("catchup", part, self._bucket(len(part)))

    def _propose(self, batch: Sequence[tuple[Request, int]]) -> list[list[int]]:
        states = [self._state(request) for request, _ in batch]
        # Tokens the draft has not seen (a prompt it was not given, tokens decoded without
        # drafts) until ≤ WINDOW are new; the last token is left for the proposing call.
        self._catch_up([(request, state, request.num_tokens - WINDOW)
                        for (request, _), state in zip(batch, states)])
        rows = []
        for (request, k), state in zip(batch, states):
            rows.append((request, state.computed, request.num_tokens - state.computed, k))
        drafts = self._call("propose", rows, self._bucket(len(rows)))
        out = []
        for i, ((request, k), state) in enumerate(zip(batch, states)):
            proposal = drafts[i, :k].tolist()
            state.computed = request.num_tokens
            state.fed = tuple(proposal[: k - 1])  # the decode steps wrote these K/V
            out.append(proposal)
        return out

    def _bucket(self, rows: int) -> int:
        return bucket_for(rows, self.buckets)

    def _call(self, kind: str, rows: Sequence[tuple[Request, int, int, int]], size: int) -> np.ndarray:
        """One program call over ``rows`` of (request, first position, tokens, drafts wanted),
        padded to ``size`` rows."""
        width, steps = self._steps[kind]
        tokens = np.zeros((size, width), np.int32)
        positions = np.full((size, width), -1, np.int32)
        seq_lens = np.zeros((size,), np.int32)
        tables = np.zeros((size, self.pages_per_seq), np.int32)
        limits = np.full((size,), -1, np.int32)
        sampling = DraftSampling.empty(size)
        for i, (request, start, n, k) in enumerate(rows):
            tokens[i, :n] = request.tokens(start, start + n)
            positions[i, :n] = np.arange(start, start + n)
            seq_lens[i] = start + n
            tables[i, : len(request.pages)] = request.page_table()
            limits[i] = start + n + k - 2  # the last draft is proposed, never fed
            if kind == "propose":
                sampling.set_row(i, request)
        put = lambda a: jax.device_put(a, self._replicated)  # noqa: E731
        batch = StepBatch(put(tokens), put(positions), put(seq_lens), put(tables))
        drafts, self.cache = self._run(self.lm.weights, self.cache, batch, put(limits),
                                       jax.tree.map(put, sampling), steps=steps)
        return np.asarray(drafts) if kind == "propose" else None
