"""The device side of the engine: packs a scheduled step into fixed shapes and runs it.

Stages across the host/device boundary:
  SchedulerOutput (host, Python objects)
    → numpy arrays padded to a shape bucket (``_pack``)
    → the jitted step over the device mesh, KV pools donated (``_programs``)
    → the jitted sampler over the last-token logits (``sampling.sample``)
    → token ids, logprobs (the only arrays copied back).

Shape buckets: decode rows ∈ {0, 1, 2, 4, …, max_num_seqs}; prefill chunks are
packed back to back on one token axis of T ∈ {0, 16, 32, …} tokens (up to
``max_num_batched_tokens``), so the projections and MLP only see real tokens —
padding every prompt to a fixed chunk cost 3× the prefill compute for short
chat prompts (measured on CPU). Attention alone views the chunks as
``max_prefill_seqs`` rows of ``prefill_chunk`` slots. Block tables are always
``max_model_len / page_size`` wide. Every (decode rows, T) is compiled ahead of
time (``warm_up``), so serving never compiles.

The sampler is its own small program: penalties add per-row arrays whose width
varies, and keeping them out of the model step keeps the step's compiled set
fixed (one extra dispatch per step, ~0.1 ms).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwenjax.engine.scheduler import ScheduledChunk, SchedulerConfig, SchedulerOutput
from qwenjax.kv_cache import KVCache
from qwenjax.loading import LoadedModel
from qwenjax.model import PackedChunks, StepBatch
from qwenjax.sampling import SamplingParams, SamplingRow, build_sampling_batch, sample

# Alternatives returned per token when a request asks for logprobs (its own count ≤ this).
MAX_TOP_LOGPROBS = 20
_PAD_ROW = SamplingRow(params=SamplingParams(temperature=0.0), seed=0, step=0)


def row_buckets(limit: int) -> list[int]:
    """0, then powers of two up to ``limit`` (``limit`` itself included)."""
    sizes = [0]
    n = 1
    while n < limit:
        sizes.append(n)
        n *= 2
    sizes.append(limit)
    return sizes


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} rows exceed the largest bucket {sizes[-1]}")


@dataclasses.dataclass
class SampledToken:
    chunk: ScheduledChunk
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    finite: bool = True  # False: the row's logits held NaN/inf; the engine fails the request


class ModelRunner:
    def __init__(self, lm: LoadedModel, config: SchedulerConfig, num_pages: int,
                 eos_token_ids: Sequence[int] = ()):
        self.lm = lm
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.pages_per_seq = config.pages_for(config.max_model_len)
        self.decode_buckets = row_buckets(config.max_num_seqs)
        max_prefill_tokens = min(config.max_num_batched_tokens,
                                 config.max_prefill_seqs * config.prefill_chunk)
        # Powers of two from 16 (smaller chunks are cheaper to pad than to compile for).
        self.token_buckets = [0] + sorted({min(max_prefill_tokens, max(16, t))
                                           for t in row_buckets(max_prefill_tokens)[1:]})
        self.num_pages = num_pages
        self.cache = self._new_cache()
        self._replicated = NamedSharding(lm.mesh, PartitionSpec())
        model = lm.model

        def step(weights, cache, decode, prefill):
            parts = tuple(p for p in (decode, prefill) if p is not None)
            return model.last_logits(weights, cache, parts)

        # The KV pools are donated: the step writes the new K/V into the same buffers
        # instead of copying every pool (GBs on a large model) once per step.
        self._step = jax.jit(step, donate_argnums=(1,))
        self._sample = jax.jit(sample, static_argnames=("num_top",))
        self._programs: dict[tuple[int, int], object] = {}
        self._samplers: dict[tuple, object] = {}
        self._logits_sharding = None
        self.compile_seconds = 0.0

    def _new_cache(self) -> KVCache:
        lm = self.lm
        return KVCache.create(
            num_layers=lm.config.num_layers, kv_heads=lm.layout.heads.kv_heads,
            head_dim=lm.config.head_dim, num_pages=self.num_pages, page_size=self.config.page_size,
            dtype=lm.weights.final_norm.dtype, mesh=lm.mesh)

    def reset_cache(self) -> None:
        """Fresh pools (after a failed step whose donated pools may be invalid)."""
        self.cache = self._new_cache()

    # ---- compilation ----------------------------------------------------------------------
    def shapes(self) -> list[tuple[int, int]]:
        """(decode rows, packed prefill tokens) of every program serving can run."""
        return [(d, t) for d, t in itertools.product(self.decode_buckets, self.token_buckets) if d or t]

    @property
    def prefill_rows(self) -> int:
        return self.config.max_prefill_seqs

    def _spec(self, *shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self._replicated)

    def _abstract_decode(self, rows: int) -> StepBatch | None:
        if rows == 0:
            return None
        spec = self._spec
        return StepBatch(spec(rows, 1), spec(rows, 1), spec(rows), spec(rows, self.pages_per_seq))

    def _abstract_prefill(self, tokens: int) -> PackedChunks | None:
        if tokens == 0:
            return None
        spec, rows, chunk = self._spec, self.prefill_rows, self.config.prefill_chunk
        return PackedChunks(spec(tokens), spec(tokens), spec(tokens), spec(tokens), spec(rows, chunk),
                            spec(rows, chunk), spec(rows), spec(rows, self.pages_per_seq), spec(rows))

    def _program(self, decode_rows: int, prefill_tokens: int):
        key = (decode_rows, prefill_tokens)
        if key not in self._programs:
            start = time.perf_counter()
            lowered = self._step.lower(self.lm.weights, self.cache, self._abstract_decode(decode_rows),
                                       self._abstract_prefill(prefill_tokens))
            self._programs[key] = compiled = lowered.compile()
            self._logits_sharding = compiled.output_shardings[0]
            self.compile_seconds += time.perf_counter() - start
            # The sampler for this row count, with no penalties and no logprobs (the common case).
            rows = decode_rows + (self.prefill_rows if prefill_tokens else 0)
            self._sampler(build_sampling_batch([_PAD_ROW], rows), num_top=0)
        return self._programs[key]

    def _sampler(self, batch, num_top: int):
        """The compiled sampler for these row/penalty/suppression widths (penalties and logprobs
        compile their variant on first use)."""
        rows = batch.temperature.shape[0]
        key = (rows, num_top, batch.penalty_ids.shape[1], batch.suppress_ids.shape[1])
        if key not in self._samplers:
            start = time.perf_counter()
            logits = jax.ShapeDtypeStruct((rows, self.lm.config.vocab_size), jnp.float32,
                                          sharding=self._logits_sharding)
            self._samplers[key] = self._sample.lower(logits, batch, num_top=num_top).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._samplers[key]

    def warm_up(self, progress: bool = True) -> float:
        """Compile every shape bucket now (with the persistent cache, a warm start reloads them)."""
        shapes = self.shapes()
        start = time.perf_counter()
        iterator = shapes
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(shapes, desc="compiling step shapes", unit="shape")
        for shape in iterator:
            self._program(*shape)
        return time.perf_counter() - start

    # ---- one step ---------------------------------------------------------------------------
    def _put(self, array: np.ndarray) -> jax.Array:
        return jax.device_put(array, self._replicated)

    def _pack_decode(self, chunks: Sequence[ScheduledChunk], rows: int) -> StepBatch | None:
        if rows == 0:
            return None
        tokens = np.zeros((rows, 1), np.int32)
        positions = np.full((rows, 1), -1, np.int32)
        seq_lens = np.zeros((rows,), np.int32)
        tables = np.zeros((rows, self.pages_per_seq), np.int32)
        for i, c in enumerate(chunks):
            tokens[i, 0] = c.request.tokens(c.start, c.start + 1)[0]
            positions[i, 0] = c.start
            seq_lens[i] = c.start + 1
            tables[i, : len(c.request.pages)] = c.request.pages
        return StepBatch(*map(self._put, (tokens, positions, seq_lens, tables)))

    def _pack_prefill(self, chunks: Sequence[ScheduledChunk], total: int) -> PackedChunks | None:
        if total == 0:
            return None
        rows, chunk_len = self.prefill_rows, self.config.prefill_chunk
        tokens = np.zeros((total,), np.int32)
        positions = np.full((total,), -1, np.int32)
        token_rows = np.zeros((total,), np.int32)
        token_cols = np.zeros((total,), np.int32)
        row_tokens = np.full((rows, chunk_len), total, np.int32)  # index T = empty slot
        row_positions = np.full((rows, chunk_len), -1, np.int32)
        seq_lens = np.zeros((rows,), np.int32)
        tables = np.zeros((rows, self.pages_per_seq), np.int32)
        last_token = np.zeros((rows,), np.int32)
        offset = 0
        for r, c in enumerate(chunks):
            n, span = c.num_tokens, slice(offset, offset + c.num_tokens)
            tokens[span] = c.request.tokens(c.start, c.start + n)
            positions[span] = np.arange(c.start, c.start + n)
            token_rows[span] = r
            token_cols[span] = np.arange(n)
            row_tokens[r, :n] = np.arange(offset, offset + n)
            row_positions[r, :n] = positions[span]
            seq_lens[r] = c.start + n
            tables[r, : len(c.request.pages)] = c.request.pages
            last_token[r] = offset + n - 1
            offset += n
        return PackedChunks(*map(self._put, (tokens, positions, token_rows, token_cols, row_tokens,
                                             row_positions, seq_lens, tables, last_token)))

    def _sampling_row(self, chunk: ScheduledChunk) -> SamplingRow:
        request = chunk.request
        params = request.params
        suppress: tuple[int, ...] = ()
        if len(request.output_ids) < params.min_tokens:
            suppress = tuple(params.stop_token_ids) + (() if params.ignore_eos else self.eos_token_ids)
        penalties = params.uses_penalties
        return SamplingRow(params=params, seed=request.seed, step=len(request.output_ids),
                           prompt_ids=request.prompt_ids if penalties else (),
                           output_ids=request.output_ids if penalties else (),
                           suppress_ids=suppress)

    def execute(self, out: SchedulerOutput) -> list[SampledToken]:
        """Run one scheduled step; return the token sampled for each chunk that completes."""
        decode_rows = bucket_for(len(out.decode), self.decode_buckets)
        prefill_tokens = bucket_for(sum(c.num_tokens for c in out.prefill), self.token_buckets)
        prefill_rows = self.prefill_rows if prefill_tokens else 0
        program = self._program(decode_rows, prefill_tokens)
        decode = self._pack_decode(out.decode, decode_rows)
        prefill = self._pack_prefill(out.prefill, prefill_tokens)
        logits, self.cache = program(self.lm.weights, self.cache, decode, prefill)

        rows = [_PAD_ROW] * (decode_rows + prefill_rows)
        placed: list[tuple[int, ScheduledChunk]] = []
        for i, c in itertools.chain(enumerate(out.decode),
                                    ((decode_rows + j, c) for j, c in enumerate(out.prefill))):
            if c.completes:
                rows[i] = self._sampling_row(c)
                placed.append((i, c))
        if not placed:
            return []
        num_top = MAX_TOP_LOGPROBS if any(c.request.params.logprobs for _, c in placed) else 0
        batch = build_sampling_batch(rows, len(rows))
        sampled = self._sampler(batch, num_top)(logits, batch)
        token_ids, logprobs = np.asarray(sampled.token_ids), np.asarray(sampled.logprobs)
        top_ids = np.asarray(sampled.top_ids) if num_top else None
        top_lps = np.asarray(sampled.top_logprobs) if num_top else None
        finite = np.asarray(sampled.finite)
        results = []
        for i, c in placed:
            k = c.request.params.logprobs or 0
            top = ([(int(t), float(lp)) for t, lp in zip(top_ids[i, :k], top_lps[i, :k])]
                   if k and top_ids is not None else [])
            results.append(SampledToken(c, int(token_ids[i]), float(logprobs[i]), top,
                                        bool(finite[i])))
        return results
