"""The device side of the engine: packs a scheduled step into fixed shapes and runs it.

Stages across the host/device boundary:
  SchedulerOutput (host, Python objects)
    → numpy arrays padded to a shape bucket (``_pack``)
    → the jitted step over the device mesh, KV pools donated (``_programs``)
    → the jitted sampler over the last-token logits (``sampling.sample``, as two programs:
      the rows' tables ``adjusted_logits`` only when a row has one, then ``choose``)
    → token ids, logprobs (the only arrays copied back).
Prompt logprobs (scoring) take the step's final hidden states of the prompt positions
asked for and run the LM head over those alone (``_score``), outside the step program.

A step is ``dispatch`` (no waiting) then ``collect`` (the read-back). ``dispatch``
is split in two: ``plan`` (host: the numpy arrays of the step and its sampling
batch, a ``StepPlan``) and ``run`` (device: the compiled step and sampler).
Multi-host serving (qwenjax/multihost.py) sends each plan from process 0 to the
other processes, which ``run`` it too, so all call the same programs in order.

Async scheduling (the engine dispatches step N+1 before reading step N back): a
decode row whose input token is still on the device names, in the plan's
``src``, its row in the previous sampler's output; the step program takes those
ids (``prev_ids``, always ``max_sampled_rows`` wide) and picks them on device.

Speculative decoding (``SchedulerConfig.num_speculative_tokens`` = k > 0): a
decoding request with n-gram drafts is packed as a prefill chunk (its last token,
then the drafts). The step program then also returns the logits of each drafted
position, gathered by ``drafted`` (``max_prefill_seqs × k`` indices into the
packed tokens), placed after the prefill rows; the sampler samples them as rows
of their own, and ``collect`` keeps each draft while the token sampled before it
matches (qwenjax/engine/speculative.py).

Shape buckets: decode rows ∈ {0, 1, 2, 4, …, max_num_seqs}; prefill chunks are
packed back to back on one token axis of T ∈ {0, 16, 32, …} tokens (up to
``max_num_batched_tokens``), so the projections and MLP only see real tokens —
padding every prompt to a fixed chunk cost 3× the prefill compute for short
chat prompts (measured on CPU). Attention alone views the chunks as
``max_prefill_seqs`` rows of min(``prefill_chunk``, T) slots. Block tables are always
``max_model_len / page_size`` wide. Every (decode rows, T) is compiled ahead of
time (``warm_up``), so serving never compiles.

The sampler is its own small program: penalties add per-row arrays whose width
varies, and keeping them out of the model step keeps the step's compiled set
fixed (one extra dispatch per step, ~0.1 ms).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwenjax.engine.compilation import compile_workers, remember_compiled
from qwenjax.engine.request import Request, TokenLogprob
from qwenjax.engine.scheduler import ScheduledChunk, SchedulerConfig, SchedulerOutput
from qwenjax.engine.step_plan import (NOT_FED, StepPlan, attention_slots, pack_decode,
                                       pack_prefill)
from qwenjax.kv_cache import KVCache
from qwenjax.loading import LoadedModel
from qwenjax.model import PackedChunks, StepBatch
from qwenjax.sampling import (SamplingParams, SamplingRow, adjusted_logits, build_sampling_batch,
                              choose, count_output_token, has_tables, raw_logprobs, without_tables)

log = logging.getLogger(__name__)

# Alternatives returned per token when a request asks for logprobs (its own count ≤ this).
MAX_TOP_LOGPROBS = 20
# Prompt positions scored per call: bounds the float32 [positions, vocab] logits it makes.
SCORE_BLOCK = 512
_PAD_ROW = SamplingRow(params=SamplingParams(temperature=0.0), seed=0, step=0)


def _in_flight_tokens(prev_ids: jax.Array, src: jax.Array) -> jax.Array:
    """The token each row takes from the previous sampler's ids (``src``), -1 where NOT_FED."""
    return jnp.where(src == NOT_FED, -1, jnp.take(prev_ids, jnp.maximum(src, 0), axis=0))


def row_buckets(limit: int) -> list[int]:
    """0, then powers of two up to ``limit`` (``limit`` itself included)."""
    sizes = [0]
    n = 1
    while n < limit:
        sizes.append(n)
        n *= 2
    sizes.append(limit)
    return sizes


def chosen_buckets(sizes: Sequence[int], limit: int) -> list[int]:
    """0, the ``sizes`` a config chose, and ``limit`` (what a step can hold); [] if none chosen."""
    return [0, *sorted({*sizes, limit})] if sizes else []


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


@dataclasses.dataclass
class InFlight:
    """A dispatched step: its device outputs are (or will be) there; nothing was read back."""

    out: SchedulerOutput
    plan: StepPlan
    placed: list[tuple[int, ScheduledChunk]]  # (sampled row, chunk) of each chunk that samples
    sampled: object | None                    # SampleOutput of device arrays; None: none sampled
    # Prompt logprobs: the (request, position) of each scored row, and the blocks of device
    # outputs (sampling.raw_logprobs) holding them in that order.
    scored: list[tuple[Request, int]] = dataclasses.field(default_factory=list)
    scores: list = dataclasses.field(default_factory=list)
    # Pooling: (request, rows) of each pooling request's rows gathered this step, in order,
    # then the requests whose rows (MEAN) were summed, one sum each; their device outputs.
    pool_rows: list[tuple[Request, int]] = dataclasses.field(default_factory=list)
    pool_sums: list[Request] = dataclasses.field(default_factory=list)
    pooled: object | None = None
    pooled_sums: object | None = None
    # Speculative decoding: a drafting chunk's sampled row → the sampler rows of its drafts.
    draft_rows: dict[int, list[int]] = dataclasses.field(default_factory=dict)


def _flat_starts(out: SchedulerOutput, decode_rows: int) -> list[int]:
    """Where each chunk of ``out.chunks`` starts in the step's flattened hidden states: the
    decode rows first, then the packed prefill tokens."""
    starts = list(range(len(out.decode)))
    offset = decode_rows
    for c in out.prefill:
        starts.append(offset)
        offset += c.num_tokens
    return starts


class ModelRunner:
    def __init__(self, lm: LoadedModel, config: SchedulerConfig, num_pages: int,
                 eos_token_ids: Sequence[int] = (), mirror=None, kv_cache_dtype: str = "auto"):
        """``mirror``: multi-host process 0's plan channel (``multihost.Leader``); the other
        processes build the same runner and run every plan, warm-up and cache reset it sends.
        ``kv_cache_dtype``: "auto" (pools in the model's dtype) or "fp8" (kv_cache.py)."""
        self.lm = lm
        self.kv_cache_dtype = kv_cache_dtype
        self.mirror = mirror
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.pages_per_seq = config.pages_for(config.max_model_len)
        self.decode_buckets = chosen_buckets(config.decode_buckets, config.max_num_seqs) or \
            row_buckets(config.max_num_seqs)
        # Rows of the largest sampler batch: decode rows, one per prefill row, then the drafted
        # positions (speculative decoding).
        self.spec_tokens = config.num_speculative_tokens
        # Sampler rows of the drafted positions (k per prefill row) in steps with a prefill part.
        self.drafted_rows = config.max_prefill_seqs * self.spec_tokens
        self.max_sampled_rows = config.max_num_seqs + config.max_prefill_seqs + self.drafted_rows
        max_prefill_tokens = config.max_prefill_tokens
        # Default: powers of two from 16 (smaller chunks are cheaper to pad than to compile for).
        self.token_buckets = chosen_buckets(config.prefill_buckets, max_prefill_tokens) or \
            [0] + sorted({min(max_prefill_tokens, max(16, t)) for t in row_buckets(max_prefill_tokens)[1:]})
        self.num_pages = num_pages
        if mirror is not None:
            mirror.send("setup", {"scheduler": dataclasses.asdict(config), "num_pages": num_pages,
                                  "eos_token_ids": list(self.eos_token_ids),
                                  "kv_cache_dtype": kv_cache_dtype})
        self.cache = self._new_cache()
        self._replicated = NamedSharding(lm.mesh, PartitionSpec())
        model = lm.model

        def step(weights, cache, decode, feed, prefill, drafted):
            if decode is not None:  # input tokens still on the device: the previous step's samples
                fed = _in_flight_tokens(*feed)[:, None]
                decode = dataclasses.replace(decode, tokens=jnp.where(fed < 0, decode.tokens, fed))
            parts = tuple(p for p in (decode, prefill) if p is not None)
            hidden, cache = model.hidden_states(weights, cache, parts)
            flat = jnp.concatenate([h.reshape(-1, h.shape[-1]) for h in hidden])
            rows = model.last_hidden(parts, hidden)
            if drafted is not None:  # speculative decoding: the drafted positions of the packed tokens
                rows = jnp.concatenate([rows, jnp.take(hidden[-1], drafted, axis=0)])
            return model.logits(weights, rows), flat, cache

        # The KV pools are donated: the step writes the new K/V into the same buffers
        # instead of copying every pool (GBs on a large model) once per step.
        self._step = jax.jit(step, donate_argnums=(1,))
        width = self.max_sampled_rows

        # The sampler is two programs: the rows' tables (grammar masks, logit bias, penalties,
        # banned ids) applied to the logits, only in a step where some row has one, then the
        # choice of each row's token. A table's width is part of a program's shape; apart,
        # a new width compiles the small first program, not the whole sampler (~0.2 s instead
        # of ~1 s on CPU, a stall for every request in the batch when it happens while serving).
        def adjust_step(logits, batch, prev_ids, src):
            # Penalty tables lack the input tokens still on the device: count them here.
            return adjusted_logits(logits, count_output_token(batch, _in_flight_tokens(prev_ids, src)))

        self._adjust_step = adjust_step

        def sample_step(logits, adjusted, batch, num_top):
            sampled = choose(logits, adjusted, batch, num_top=num_top)
            ids = jnp.zeros((width,), jnp.int32).at[: sampled.token_ids.shape[0]].set(sampled.token_ids)
            return sampled, ids

        # Replicated outputs: every process holds them, so process 0 can read them back.
        self._sample = jax.jit(sample_step, static_argnames=("num_top",), out_shardings=self._replicated)

        def score(weights, hidden, index, targets, num_top):
            logits = model.logits(weights, jnp.take(hidden, index, axis=0))
            return raw_logprobs(logits, targets, num_top)

        # Compiled on first use for each (hidden rows, block, top) shape: scoring is rare.
        self._score = jax.jit(score, static_argnames=("num_top",), out_shardings=self._replicated)
        # Whole pages out of and into every layer's pools (the prefix cache's host tier).
        self._read_pages = jax.jit(lambda cache, index: jax.tree.map(
            lambda pool: jnp.take(pool, index, axis=1), (cache.k, cache.v)))
        self._write_pages = jax.jit(lambda cache, index, payload: KVCache(*jax.tree.map(
            lambda pool, new: pool.at[:, index].set(new.astype(pool.dtype), mode="drop"),
            (cache.k, cache.v), payload)), donate_argnums=(0,))
        # Pooling: the final-normed hidden states of pooling requests' rows, followed by the
        # score head's outputs on them (classification and reward checkpoints); and MEAN
        # pooling's per-request sums of a step's rows (segment ``num_segments`` is dropped).
        def pool(hidden, index, head):
            rows = jnp.take(hidden, index, axis=0).astype(jnp.float32)
            return rows if head is None else jnp.concatenate([rows, head(rows)], axis=1)

        def pool_sums(hidden, segments, num_segments):
            return jax.ops.segment_sum(hidden.astype(jnp.float32), segments,
                                       num_segments=num_segments + 1)[:num_segments]

        self._pool = jax.jit(pool, out_shardings=self._replicated)
        self._pool_sums = jax.jit(pool_sums, static_argnames=("num_segments",),
                                  out_shardings=self._replicated)
        # The last sampler's token ids, max_sampled_rows wide: the next step's fed inputs.
        self._prev_ids = self._put(np.zeros((width,), np.int32))
        self._programs: dict[tuple[int, int], object] = {}
        self._samplers: dict[tuple, object] = {}
        self._adjusters: dict[tuple, object] = {}
        self._logits_sharding = None
        self.compile_seconds = 0.0

    def _new_cache(self) -> KVCache:
        lm = self.lm
        return KVCache.create(
            num_layers=lm.config.num_layers, kv_heads=lm.layout.heads.kv_heads,
            head_dim=lm.config.head_dim, num_pages=self.num_pages, page_size=self.config.page_size,
            dtype=lm.weights.final_norm.dtype, mesh=lm.mesh, kv_cache_dtype=self.kv_cache_dtype)

    # ---- whole pages in and out (the host tier of the prefix cache) ---------------------------
    def read_pages(self, pages: list[int]):
        """Those pages of every layer's pools (page axis 1 of each leaf), as device arrays
        computed now, before any later step writes them."""
        index = np.zeros((1 << max(len(pages) - 1, 0).bit_length(),), np.int32)
        index[: len(pages)] = pages
        return self._read_pages(self.cache, index)  # (padding rows past len(pages))

    def write_pages(self, pages: list[int], payload) -> None:
        """Write ``payload`` (``read_pages``' shape, numpy) into those pages, the pools donated."""
        size = 1 << max(len(pages) - 1, 0).bit_length()
        index = np.full((size,), self.num_pages, np.int32)  # past the pool: dropped
        index[: len(pages)] = pages
        payload = jax.tree.map(lambda a: np.concatenate(
            [a, np.zeros((a.shape[0], size - a.shape[1], *a.shape[2:]), a.dtype)], axis=1), payload)
        self.cache = self._write_pages(self.cache, index, payload)

    def reset_cache(self) -> None:
        """Fresh pools (after a failed step whose donated pools may be invalid)."""
        if self.mirror is not None:
            self.mirror.send("reset")
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
        return StepBatch(spec(rows, 1), spec(rows, 1), spec(rows), spec(rows, self.pages_per_seq),
                         spec(rows))

    def _abstract_prefill(self, tokens: int) -> PackedChunks | None:
        if tokens == 0:
            return None
        spec, rows, chunk = self._spec, self.prefill_rows, attention_slots(tokens, self.config.prefill_chunk)
        return PackedChunks(spec(tokens), spec(tokens), spec(tokens), spec(tokens), spec(rows, chunk),
                            spec(rows, chunk), spec(rows), spec(rows, self.pages_per_seq), spec(rows),
                            spec(tokens))

    def _abstract_feed(self, rows: int) -> tuple | None:
        return None if rows == 0 else (self._spec(self.max_sampled_rows), self._spec(rows))

    def _has_drafted(self, prefill_tokens: int) -> bool:
        return bool(self.drafted_rows and prefill_tokens)

    def _lower(self, decode_rows: int, prefill_tokens: int):
        drafted = self._spec(self.drafted_rows) if self._has_drafted(prefill_tokens) else None
        return self._step.lower(self.lm.weights, self.cache, self._abstract_decode(decode_rows),
                                self._abstract_feed(decode_rows), self._abstract_prefill(prefill_tokens),
                                drafted)

    def _add_program(self, key: tuple[int, int], compiled) -> None:
        self._programs[key] = compiled
        self._logits_sharding = compiled.output_shardings[0]

    def _sampler_rows(self, decode_rows: int, prefill_tokens: int) -> int:
        return decode_rows + (self.prefill_rows + self.drafted_rows if prefill_tokens else 0)

    def _program(self, decode_rows: int, prefill_tokens: int):
        key = (decode_rows, prefill_tokens)
        if key not in self._programs:
            start = time.perf_counter()
            self._add_program(key, self._lower(*key).compile())
            self.compile_seconds += time.perf_counter() - start
            # The sampler for this row count, with no penalties and no logprobs (the common case).
            self._sampler(build_sampling_batch([_PAD_ROW], self._sampler_rows(*key)), num_top=0)
        return self._programs[key]

    def _sampler_key(self, batch, num_top: int) -> tuple:
        return batch.temperature.shape[0], num_top

    def _logits_spec(self, rows: int):
        return jax.ShapeDtypeStruct((rows, self.lm.config.vocab_size), jnp.float32,
                                    sharding=self._logits_sharding)

    def _batch_spec(self, batch):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._replicated),
                            batch)

    def _lower_sampler(self, batch, num_top: int):
        logits = self._logits_spec(batch.temperature.shape[0])
        return self._sample.lower(logits, logits, self._batch_spec(without_tables(batch)),
                                  num_top=num_top)

    def _sampler(self, batch, num_top: int):
        """The compiled choice of tokens for this row count (logprobs compile their variant on
        first use)."""
        key = self._sampler_key(batch, num_top)
        if key not in self._samplers:
            start = time.perf_counter()
            self._samplers[key] = self._lower_sampler(batch, num_top).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._samplers[key]

    def _adjuster(self, batch):
        """The compiled ``adjusted_logits`` for these rows and table widths (each new width
        compiles on first use: a small program)."""
        rows = batch.temperature.shape[0]
        key = (rows, batch.penalty_ids.shape[1], batch.suppress_ids.shape[1],
               batch.bias_ids.shape[1], batch.token_mask.shape[1])
        if key not in self._adjusters:
            start = time.perf_counter()
            # Its logits go to the sampler, compiled for the step's logits sharding.
            program = jax.jit(self._adjust_step, out_shardings=self._logits_sharding)
            self._adjusters[key] = program.lower(
                self._logits_spec(rows), self._batch_spec(batch), self._spec(self.max_sampled_rows),
                self._spec(rows)).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._adjusters[key]

    def warm_up(self, progress: bool = True, workers: int | None = None) -> float:
        """Compile every shape bucket now (with the persistent cache, a warm start reloads them).

        Tracing and lowering run here, one shape after another (Python; ~0.1 s a shape since
        each layer is lowered once). XLA's compile — or its load from the persistent cache —
        releases the GIL, so ``workers`` threads (``compile_workers``) do several at once."""
        if self.mirror is not None:  # the followers use the same thread count, if one was set
            self.mirror.send("warm_up", {"workers": workers})
        start = time.perf_counter()
        todo = [shape for shape in self.shapes() if shape not in self._programs]
        lowered = [self._lower(*shape) for shape in todo]
        workers = workers or compile_workers(lowered)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"compiling step shapes ({workers} threads)", unit="shape")
        log.info("compiling %d step shapes on %d threads (lowered in %.1fs)", len(todo), workers,
                 time.perf_counter() - start)
        last_log = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            jobs = {pool.submit(program.compile): shape for shape, program in zip(todo, lowered)}
            for done, job in enumerate(concurrent.futures.as_completed(jobs), 1):
                self._add_program(jobs[job], job.result())
                if bar is not None:
                    bar.update()
                # Progress in the log too (a server's stderr is rarely a terminal), every 10 s.
                if time.perf_counter() - last_log >= 10 or done == len(jobs):
                    last_log = time.perf_counter()
                    log.info("compiled %d/%d step shapes (%.0fs)", done, len(jobs),
                             last_log - start)
            # The samplers (one per row count, no penalties, no logprobs), likewise.
            batches = {}
            for shape in todo:
                batch = build_sampling_batch([_PAD_ROW], self._sampler_rows(*shape))
                batches.setdefault(self._sampler_key(batch, 0), batch)
            jobs = {pool.submit(self._lower_sampler(batch, 0).compile): key
                    for key, batch in batches.items() if key not in self._samplers}
            for job in concurrent.futures.as_completed(jobs):
                self._samplers[jobs[job]] = job.result()
        if bar is not None:
            bar.close()
        remember_compiled(lowered)
        if self.mirror is not None:
            self.mirror.wait_warm()  # serving starts when every process can run every shape
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        return seconds

    # ---- one step ---------------------------------------------------------------------------
    def _put(self, tree):
        """Numpy arrays (a pytree of them) as inputs of a compiled program. One process: as they
        are (the compiled call copies them to the devices faster than ``device_put``). Multi-host:
        ``device_put`` would first check with a collective that every process passed equal values,
        so each process fills its own devices from its copy instead."""
        if self._replicated.is_fully_addressable:
            return tree
        return jax.tree.map(lambda a: jax.make_array_from_callback(
            a.shape, self._replicated, lambda index: a[index]), tree)

    def _sampling_row(self, chunk: ScheduledChunk, token_mask: np.ndarray | None = None,
                      drafted: Sequence[int] = ()) -> SamplingRow:
        """The request's next token's sampling row; with ``drafted``, the row of the token after
        those drafts (speculative decoding: its own step index, penalties and bans)."""
        request = chunk.request
        params = request.params
        step = request.num_output_tokens + len(drafted)
        suppress: tuple[int, ...] = ()
        if step < params.min_tokens:
            suppress = tuple(params.stop_token_ids) + (() if params.ignore_eos else self.eos_token_ids)
        if request.bad_words_ids:
            suppress += request.banned_ids(drafted)
        penalties = params.uses_penalties  # a token in flight is counted on the device
        outputs = request.output_ids + list(drafted) if drafted else request.output_ids
        return SamplingRow(params=params, seed=request.seed, step=step,
                           prompt_ids=request.prompt_ids if penalties else (),
                           output_ids=outputs if penalties else (),
                           suppress_ids=suppress, token_mask=token_mask)

    @staticmethod
    def _score_positions(chunk: ScheduledChunk, flat_start: int, index: list, target: list,
                         scored: list) -> None:
        """The chunk's prompt positions whose logprobs are asked for and not yet in hand:
        position p scores prompt token p + 1 (so the last prompt position scores nothing)."""
        request = chunk.request
        if request.prompt_logprobs is None:
            return
        prompt = request.prompt_ids
        first = max(chunk.start, len(request.prompt_logprobs) - 1)
        for p in range(first, min(chunk.start + chunk.num_tokens, len(prompt) - 1)):
            index.append(flat_start + p - chunk.start)
            target.append(prompt[p + 1])
            scored.append((request, p))

    def plan(self, out: SchedulerOutput) -> tuple[StepPlan, list[tuple[int, ScheduledChunk]]]:
        """The host half of a step: its arrays, and which sampled row belongs to which chunk."""
        plan, placed, *_ = self._plan(out)
        return plan, placed

    def _plan(self, out: SchedulerOutput):
        decode_rows = bucket_for(len(out.decode), self.decode_buckets)
        prefill_tokens = bucket_for(sum(c.num_tokens for c in out.prefill), self.token_buckets)
        prefill_rows = self.prefill_rows if prefill_tokens else 0
        decode, src = (pack_decode(out.decode, decode_rows, self.pages_per_seq) if decode_rows
                       else (None, None))
        prefill = pack_prefill(out.prefill, prefill_tokens, self.prefill_rows,
                               attention_slots(prefill_tokens, self.config.prefill_chunk),
                               self.pages_per_seq)

        rows = [_PAD_ROW] * self._sampler_rows(decode_rows, prefill_tokens)
        placed: list[tuple[int, ScheduledChunk]] = []
        for i, c in itertools.chain(enumerate(out.decode),
                                    ((decode_rows + j, c) for j, c in enumerate(out.prefill))):
            if c.completes:
                placed.append((i, c))
        # Structured outputs: the grammar masks of the constrained rows, computed side by side;
        # a drafting row's masks at each of its positions, after the drafts before it.
        constrained = [(i, c.request.matcher) for i, c in placed
                       if c.request.matcher is not None and not c.draft]
        masks = {}
        if constrained:
            from qwenjax.structured import Matcher

            masks = dict(zip((i for i, _ in constrained), Matcher.bitmasks([m for _, m in constrained])))
        draft_masks = {i: list(c.request.matcher.draft_bitmasks(c.draft)) for i, c in placed
                       if c.request.matcher is not None and c.draft}
        for i, position_masks in draft_masks.items():
            masks[i] = position_masks.pop()  # after every draft: the chunk's own sampled row
        # A thinking budget spent: the closing tag's next token is the only one allowed.
        for i, c in placed:
            budget = c.request.thinking_budget
            if budget is not None and budget.forced is not None:
                from qwenjax.structured import only_token_mask

                masks[i] = only_token_mask(budget.forced, self.lm.config.vocab_size)
        # Speculative decoding: the sampler rows of each chunk's drafted positions (by its row).
        drafted, draft_rows = None, {}
        if self._has_drafted(prefill_tokens):
            drafted = np.zeros((self.drafted_rows,), np.int32)
            offset = 0
            for j, c in enumerate(out.prefill):
                if c.draft:
                    first = j * self.spec_tokens  # the position after the chunk's last real token
                    drafted[first: first + len(c.draft)] = offset + c.num_real - 1 + np.arange(len(c.draft))
                    base = decode_rows + prefill_rows + first
                    draft_rows[decode_rows + j] = list(range(base, base + len(c.draft)))
                    position_masks = draft_masks.get(decode_rows + j)
                    for d, row in enumerate(draft_rows[decode_rows + j]):
                        rows[row] = self._sampling_row(c, position_masks[d] if position_masks else None,
                                                       drafted=c.draft[:d])
                offset += c.num_tokens
        for i, c in placed:
            rows[i] = self._sampling_row(c, masks.get(i), c.draft)
        batch, num_top = None, 0
        if placed:
            num_top = MAX_TOP_LOGPROBS if any(c.request.params.logprobs for _, c in placed) else 0
            batch = build_sampling_batch(rows, len(rows))
        plan = StepPlan(decode_rows, prefill_tokens, decode, prefill, batch, num_top, src,
                        drafted=drafted)

        index, target, scored = [], [], []
        flat_starts = _flat_starts(out, decode_rows)
        for flat, c in zip(flat_starts, out.chunks):
            self._score_positions(c, flat, index, target, scored)
        if scored:
            plan.score_index = np.asarray(index, np.int32)
            plan.score_target = np.asarray(target, np.int32)
            plan.score_top = (MAX_TOP_LOGPROBS if any(r.params.prompt_logprobs for r, _ in scored)
                              else 0)
        pooled = self._plan_pooling(out, plan, flat_starts)
        return plan, placed, scored, draft_rows, pooled

    @staticmethod
    def _plan_pooling(out: SchedulerOutput, plan: StepPlan, flat_starts: list[int]) -> tuple[list, list]:
        """The rows pooling requests take from this step (``PoolState.take``): indices into the
        flattened hidden states (decode rows first, then the packed prefill tokens) gathered
        in ``plan.pool_index``, and MEAN requests' rows as segments of ``plan.pool_segments``,
        summed. Returns ((request, rows) gathered, requests summed) in plan order."""
        if not any(c.request.pool is not None for c in out.chunks):
            return [], []
        index, gathered, summed, segments = [], [], [], []
        for flat, c in zip(flat_starts, out.chunks):
            state = c.request.pool
            positions = state.take(c.start, c.start + c.num_real) if state is not None else ()
            if not positions:
                continue
            rows = [flat + p - c.start for p in positions]
            if state.mean:  # a sum per MEAN request; every other row to a dropped segment
                segments.append(rows)
                summed.append(c.request)
            else:
                index += rows
                gathered.append((c.request, len(rows)))
        if index:
            plan.pool_index = np.zeros((1 << (len(index) - 1).bit_length(),), np.int32)
            plan.pool_index[: len(index)] = index
        if segments:
            num_segments = 1 << (len(segments) - 1).bit_length()
            plan.pool_segments = np.full((plan.decode_rows + plan.prefill_tokens,), num_segments,
                                         np.int32)
            for j, rows in enumerate(segments):
                plan.pool_segments[rows] = j
            plan.pool_num_segments = num_segments
        return gathered, summed

    def run(self, plan: StepPlan) -> tuple:
        """The device half: the step program, then the sampler and the prompt scoring.
        Returns at once (sampled, scores): the sampler's outputs (None when nothing is sampled)
        and a (logprobs, top ids, top logprobs) per block of scored positions, device arrays
        still being computed."""
        program = self._program(plan.decode_rows, plan.prefill_tokens)
        prev_ids = self._prev_ids
        decode = feed = prefill = None
        if plan.decode is not None:
            decode = StepBatch(*self._put(plan.decode))
            feed = (prev_ids, self._put(plan.src))
        if plan.prefill is not None:
            prefill = PackedChunks(*self._put(plan.prefill))
        drafted = None if plan.drafted is None else self._put(plan.drafted)
        logits, hidden, self.cache = program(self.lm.weights, self.cache, decode, feed, prefill, drafted)
        scores = self._run_scoring(plan, hidden)
        if plan.pool_segments is not None:  # last: the pooled rows' sums, then the rows
            scores.append(self._pool_sums(hidden, self._put(plan.pool_segments),
                                          num_segments=plan.pool_num_segments))
        if plan.pool_index is not None:
            scores.append(self._pool(hidden, self._put(plan.pool_index), self.lm.score_head))
        if plan.sampling is None:
            return None, scores
        batch, adjusted = plan.sampling, logits
        if has_tables(batch):
            # The tables count the tokens still in flight (penalties): sampler rows are the
            # decode rows (same src), then prefill rows (never fed).
            src = np.full((batch.temperature.shape[0],), NOT_FED, np.int32)
            if plan.src is not None:
                src[: len(plan.src)] = plan.src
            adjusted = self._adjuster(batch)(logits, self._put(batch), prev_ids, self._put(src))
            batch = without_tables(batch)
        sampled, self._prev_ids = self._sampler(batch, plan.num_top)(logits, adjusted, self._put(batch))
        return sampled, scores

    def _run_scoring(self, plan: StepPlan, hidden: jax.Array) -> list:
        """Prompt logprobs of the plan's scored positions, SCORE_BLOCK at a time, each block
        padded to a power of two (≥ 16) so that few shapes compile."""
        if plan.score_index is None:
            return []
        scores = []
        for start in range(0, len(plan.score_index), SCORE_BLOCK):
            index = plan.score_index[start: start + SCORE_BLOCK]
            size = max(16, 1 << (len(index) - 1).bit_length())
            padded_index, padded_target = np.zeros((2, size), np.int32)
            padded_index[: len(index)] = index
            padded_target[: len(index)] = plan.score_target[start: start + SCORE_BLOCK]
            scores.append(self._score(self.lm.weights, hidden, self._put(padded_index),
                                      self._put(padded_target), num_top=plan.score_top))
        return scores

    def dispatch(self, out: SchedulerOutput) -> InFlight:
        """Start one scheduled step on the device; nothing waits for it (see ``collect``)."""
        plan, placed, scored, draft_rows, (pool_rows, pool_sums) = self._plan(out)
        if self.mirror is not None:
            self.mirror.send("step", *plan.to_message())
        sampled, scores = self.run(plan)
        pooled = scores.pop() if plan.pool_index is not None else None
        pooled_sums = scores.pop() if plan.pool_segments is not None else None
        for array in (pooled, pooled_sums):
            if array is not None:
                array.copy_to_host_async()
        if sampled is not None:  # start the copy back now; collect() then finds it done
            for name in ("token_ids", "logprobs", "finite") + (("top_ids", "top_logprobs")
                                                              if plan.num_top else ()):
                getattr(sampled, name).copy_to_host_async()
        for array in itertools.chain.from_iterable(scores):
            array.copy_to_host_async()
        return InFlight(out, plan, placed, sampled, scored, scores, draft_rows=draft_rows,
                        pool_rows=pool_rows, pool_sums=pool_sums, pooled=pooled,
                        pooled_sums=pooled_sums)

    def collect(self, step: InFlight) -> tuple[list[SampledToken], list[tuple[Request, int, TokenLogprob]]]:
        """Wait for a dispatched step: the token sampled for each chunk that completes, and the
        (request, position, logprob of the next prompt token) of each scored prompt position."""
        self._collect_pooled(step)
        return self._collect_sampled(step), self._collect_scores(step)

    @staticmethod
    def _collect_pooled(step: InFlight) -> None:
        """Pooled rows onto their requests; a request whose prompt this step completes gets
        them all (``Request.embedding``), as it finishes with this step's token."""
        if step.pool_rows:
            rows, start = np.asarray(step.pooled), 0
            for request, n in step.pool_rows:
                request.pool.add_rows(rows[start: start + n])
                start += n
        if step.pool_sums:
            for request, total in zip(step.pool_sums, np.asarray(step.pooled_sums)):
                request.pool.add_sum(total)
        for _, c in step.placed:
            if c.request.pooling is not None:
                c.request.embedding = c.request.pool.result()

    @staticmethod
    def _collect_scores(step: InFlight) -> list[tuple[Request, int, TokenLogprob]]:
        if not step.scored:
            return []
        chosen, top_ids, top_lps = (np.concatenate([np.asarray(block[i]) for block in step.scores])
                                    for i in range(3))
        results = []
        for j, (request, position) in enumerate(step.scored):
            k = request.params.prompt_logprobs
            top = [(int(t), float(lp)) for t, lp in zip(top_ids[j, :k], top_lps[j, :k])]
            results.append((request, position,
                            TokenLogprob(request.prompt_ids[position + 1], float(chosen[j]), top)))
        return results

    def _collect_sampled(self, step: InFlight) -> list[SampledToken]:
        sampled, placed = step.sampled, step.placed
        if sampled is None:
            return []
        num_top = step.plan.num_top
        token_ids, logprobs = np.asarray(sampled.token_ids), np.asarray(sampled.logprobs)
        top_ids = np.asarray(sampled.top_ids) if num_top else None
        top_lps = np.asarray(sampled.top_logprobs) if num_top else None
        finite = np.asarray(sampled.finite)
        results = []
        for i, c in placed:
            k = c.request.params.logprobs or 0
            # A drafting chunk: the token sampled after each draft prefix, kept up to and with
            # the first that differs from the draft (qwenjax/engine/speculative.py).
            for d, row in enumerate(step.draft_rows.get(i, []) + [i]):
                top = ([(int(t), float(lp)) for t, lp in zip(top_ids[row, :k], top_lps[row, :k])]
                       if k and top_ids is not None else [])
                results.append(SampledToken(c, int(token_ids[row]), float(logprobs[row]), top,
                                            bool(finite[row])))
                if d == len(c.draft) or token_ids[row] != c.draft[d] or not finite[row]:
                    break
        return results
