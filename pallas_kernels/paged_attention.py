"""Paged decode attention as a Pallas kernel on the Triton lowering.

One query token per sequence attends over its KV cache, which lives in fixed-size
pages addressed through a per-sequence block table. Triton is the only Pallas
lowering that reaches ROCm as well as CUDA, so the kernel sticks to what that
lowering supports: power-of-2 tiles, pointer gathers through `plgpu.load`, and
`lax.dot_general` with tiles of at least 16 on every side.

Why this shape: on H100 (DESIGN.md) jax's bundled Pallas-Triton paged kernel
reached only 0.8-1.9 of 2.87 TB/s. Its fixed 16-way split leaves few long
sequences with fewer programs than SMs and gives short ones a single 128-token
iteration per program (nothing to pipeline), and its combine is several XLA ops
over bf16 partials. Here:

* grid = (batch, num_kv_heads, num_splits). One program owns every query head of
  one KV head, so each page is read from HBM once per GQA group. The group (7 or 8
  heads for Qwen2.5) is padded to the 16-row minimum of a Triton dot; the padded
  rows load nothing (masked) and store nothing.
* Each loop iteration takes `pages_per_block` pages (default 128 tokens) with a
  token-granular mask, so pages past a sequence's length are never read (masked
  lanes issue no memory access) and garbage in a partly filled last page cannot
  leak NaN through `p @ v`.
* Split-K: split s owns a contiguous range of page blocks and writes its
  normalized fp32 partial output plus log2-sum-exp; a second small Pallas kernel
  (one program per sequence and head) merges the splits in one launch. With one
  split the kernel writes the final output directly.

Status: numerics are tested on CPU in interpret mode; the Triton IR that jax emits
for both kernels compiles with Triton 3.9 for sm_90 and gfx942 (no spills), but
nothing here has run on a GPU yet. Defaults (pages_per_block, num_splits,
num_warps, num_stages) are first guesses for scripts/bench_attention.py to tune.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import validate_decode_args

# Smallest M/N/K of a Triton `tt.dot` tile (MMA on NVIDIA, MFMA on AMD).
_MIN_DOT_TILE = 16
# Bytes per head_dim element pair that one loop iteration covers by default: 128
# bf16 tokens. At head_dim 128 that is 64 KiB of K and V tiles, which Triton
# stages in shared memory; compiled by Triton 3.9 that is 72 KiB with
# num_stages=2 on sm_90 (3 programs per SM, 124 registers, no spills) and exactly
# the 64 KiB LDS of an MI300X CU (gfx942), which a bigger block would exceed.
_DEFAULT_BLOCK_TOKEN_BYTES = 128 * 2
# Programs to aim for when picking num_splits: a few resident programs per SM
# (H100 has 132 SMs, MI300X 304 CUs) so HBM latency is hidden.
_TARGET_PROGRAMS = 512
# A split shorter than this spends more on its partial write and the combine than
# it gains in parallelism.
_MIN_TOKENS_PER_SPLIT = 256
_LOG2_E = math.log2(math.e)


def _triton_compiler_params(num_warps: int, num_stages: int):
    """Triton launch parameters; the class name has moved between jax releases.

    jax 0.10.2 and 0.11.x both export `jax.experimental.pallas.triton.CompilerParams`
    (fields num_warps, num_stages); releases before ~0.6 called it
    `TritonCompilerParams`.
    """
    params_cls = getattr(plgpu, "CompilerParams", None) or getattr(
        plgpu, "TritonCompilerParams", None
    )
    if params_cls is None:
        return None
    return params_cls(num_warps=num_warps, num_stages=num_stages)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def default_pages_per_block(page_size: int, pages_per_seq: int, itemsize: int = 2) -> int:
    """Pages per loop iteration: 128 tokens for 2-byte dtypes (64 for float32, to
    stay within the same shared memory), no more than the table holds, and at
    least a 16-token tile for the dot."""
    pages = max(1, _DEFAULT_BLOCK_TOKEN_BYTES // itemsize // page_size)
    pages = min(pages, _next_power_of_2(pages_per_seq))
    return max(pages, _next_power_of_2(-(-_MIN_DOT_TILE // page_size)))


def default_num_splits(
    batch: int, num_kv_heads: int, max_tokens: int, tokens_per_block: int
) -> int:
    """Split-K factor from static shapes only (lengths are traced values).

    1 when batch x kv heads already fills the GPU or the context is short;
    otherwise enough splits to reach ~_TARGET_PROGRAMS programs, each covering at
    least _MIN_TOKENS_PER_SPLIT tokens and at least one page block.
    """
    programs = batch * num_kv_heads
    wanted = -(-_TARGET_PROGRAMS // programs)
    max_blocks = -(-max_tokens // tokens_per_block)
    longest = max(1, min(max_tokens // _MIN_TOKENS_PER_SPLIT, max_blocks))
    return max(1, min(wanted, longest))


def plan_launch(
    *, batch: int, num_kv_heads: int, page_size: int, pages_per_seq: int, itemsize: int,
    pages_per_block: int | None = None, num_splits: int | None = None,
) -> tuple[int, int, int]:
    """(pages_per_block, num_splits, blocks_per_split) the kernel will use; None
    picks the default. Explicit values are validated and kept as given (an
    explicit num_splits may leave splits without pages; that is allowed)."""
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size, pages_per_seq, itemsize)
    block_tokens = pages_per_block * page_size
    if not _is_power_of_2(pages_per_block) or block_tokens < _MIN_DOT_TILE:
        raise ValueError(
            f"pages_per_block={pages_per_block} must be a power of 2 with "
            f"pages_per_block * page_size >= {_MIN_DOT_TILE}"
        )
    num_blocks = -(-pages_per_seq // pages_per_block)
    if num_splits is None:
        num_splits = default_num_splits(
            batch, num_kv_heads, pages_per_seq * page_size, block_tokens)
        # Drop the splits that rounding leaves without any block of the table.
        num_splits = -(-num_blocks // -(-num_blocks // num_splits))
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")
    return pages_per_block, num_splits, -(-num_blocks // num_splits)


def _fp8_tile(tile, dtype):
    """An e4m3 tile (fp8, or uint8 holding its bits, as qwenjax's pools store it) in ``dtype``."""
    if tile.dtype == jnp.uint8:
        tile = lax.bitcast_convert_type(tile, jnp.float8_e4m3fn)
    return tile.astype(dtype)


def _decode_kernel(
    lengths_ref,  # [batch] int32 (whole array)
    block_table_ref,  # [pages_per_seq] int32, this sequence's row
    q_ref,  # [num_heads, head_dim], this sequence's query
    k_ref,  # [total_pages, page_size, head_dim], this program's KV head
    v_ref,  # [total_pages, page_size, head_dim]
    *refs,  # quantized: k_scale, v_scale [total_pages, page_size]; then o [num_heads, head_dim]
            # (+ lse [num_heads] when split)
    quantized: bool,
    group: int,
    group_pad: int,
    page_size: int,
    pages_per_block: int,
    blocks_per_split: int,
    scale_log2: float,
    split_output: bool,
):
    scale_refs, out_refs = (refs[:2], refs[2:]) if quantized else ((), refs)
    seq = pl.program_id(0)
    kv_head = pl.program_id(1)
    split = pl.program_id(2)
    head_dim = q_ref.shape[-1]
    pages_per_seq = block_table_ref.shape[0]
    block_tokens = pages_per_block * page_size

    # Clamping here is free and keeps a bad length from reading past the table.
    length = jnp.clip(lengths_ref[seq], 0, pages_per_seq * page_size)

    rows = jnp.arange(group_pad, dtype=jnp.int32)
    row_valid = rows < group
    row_mask = jnp.broadcast_to(row_valid[:, None], (group_pad, head_dim))
    head_rows = pl.ds(kv_head * group, group_pad)
    q = plgpu.load(q_ref.at[head_rows, :], mask=row_mask, other=0)

    # Masked lanes' fill, in a type Triton's lowering can cast to the tile's dtype (an int 0
    # cannot become fp8; a float one cannot become uint8 in interpret mode).
    fill = 0 if jnp.issubdtype(k_ref.dtype, jnp.integer) else 0.0

    first_block = split * blocks_per_split
    last_block = jnp.minimum(first_block + blocks_per_split, pl.cdiv(length, block_tokens))
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]

    def attend_block(block, carry):
        acc, row_max, row_sum = carry
        tokens = block * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
        token_valid = tokens < length
        # Page id per token: a gather from the block table (a few hundred bytes
        # from L1/L2) that keeps every K/V access a flat [tokens, head_dim] tile.
        page_ids = plgpu.load(
            block_table_ref.at[lax.div(tokens, page_size)], mask=token_valid, other=0
        )
        kv_index = (page_ids[:, None], lax.rem(tokens, page_size)[:, None], dims)
        kv_mask = jnp.broadcast_to(token_valid[:, None], (block_tokens, head_dim))

        k = plgpu.load(k_ref.at[kv_index], mask=kv_mask, other=fill)
        if quantized:  # fp8 values × a scale per token: scale the scores, not the tile
            k = _fp8_tile(k, q.dtype)
            token_index = (page_ids, lax.rem(tokens, page_size))
            k_scale = plgpu.load(scale_refs[0].at[token_index], mask=token_valid, other=0)
        logits = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        if quantized:
            logits = logits * k_scale[None, :]
        logits = jnp.where(token_valid[None, :], logits * scale_log2, -jnp.inf)
        # Every block in the loop holds >= 1 valid token, so new_max is finite and
        # exp2(-inf - new_max) = 0 handles the -inf start without a special case.
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        correction = jnp.exp2(row_max - new_max)
        probs = jnp.exp2(logits - new_max[:, None])
        row_sum = row_sum * correction + jnp.sum(probs, axis=1)

        v = plgpu.load(v_ref.at[kv_index], mask=kv_mask, other=fill)
        weights = probs
        if quantized:  # Σ_t p_t (s_t v_t) = Σ_t (p_t s_t) v_t
            v = _fp8_tile(v, q.dtype)
            weights = probs * plgpu.load(scale_refs[1].at[token_index], mask=token_valid,
                                         other=0)[None, :]
        acc = acc * correction[:, None] + lax.dot_general(
            weights.astype(v.dtype), v, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return acc, new_max, row_sum

    init = (
        jnp.zeros((group_pad, head_dim), jnp.float32),
        jnp.full((group_pad,), -jnp.inf, jnp.float32),
        jnp.zeros((group_pad,), jnp.float32),
    )
    acc, row_max, row_sum = lax.fori_loop(first_block, last_block, attend_block, init)

    # A split (or a length-0 sequence) with no tokens has row_sum 0: output zeros.
    has_tokens = row_sum > 0
    out = acc / jnp.where(has_tokens, row_sum, 1.0)[:, None]
    o_ref = out_refs[0]
    plgpu.store(o_ref.at[head_rows, :], out.astype(o_ref.dtype), mask=row_mask)
    if split_output:
        lse_ref = out_refs[1]
        safe_sum = jnp.where(has_tokens, row_sum, 1.0)
        lse = jnp.where(has_tokens, row_max + jnp.log2(safe_sum), -jnp.inf)
        plgpu.store(lse_ref.at[head_rows], lse, mask=row_valid)


def _combine_kernel(lse_ref, partial_ref, o_ref, *, chunk: int):
    """Merge one (sequence, head)'s split results: o = sum_s w_s o_s with
    w_s = exp2(lse_s - lse) (lse over all splits). One launch for the whole batch,
    instead of the few reductions and elementwise kernels XLA makes of it."""
    # lse_ref [splits] f32, partial_ref [splits, head_dim] f32, o_ref [head_dim]
    num_splits, head_dim = partial_ref.shape
    num_chunks = pl.cdiv(num_splits, chunk)

    def load_lse(c):
        in_range = c * chunk + jnp.arange(chunk, dtype=jnp.int32) < num_splits
        lse = plgpu.load(lse_ref.at[pl.ds(c * chunk, chunk)], mask=in_range, other=-jnp.inf)
        return lse, in_range

    def max_and_total(c, carry):
        top, total = carry
        lse, _ = load_lse(c)
        new_top = jnp.maximum(top, jnp.max(lse))
        # -inf everywhere so far (empty splits, length-0 sequence): shift by 0.
        shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)
        return new_top, total * jnp.exp2(top - shift) + jnp.sum(jnp.exp2(lse - shift))

    top, total = lax.fori_loop(
        0, num_chunks, max_and_total, (jnp.float32(-jnp.inf), jnp.float32(0.0)))
    shift = jnp.where(top == -jnp.inf, 0.0, top)
    inv_total = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)

    def accumulate(c, acc):
        lse, in_range = load_lse(c)
        weights = jnp.exp2(lse - shift) * inv_total
        mask = jnp.broadcast_to(in_range[:, None], (chunk, head_dim))
        partial = plgpu.load(partial_ref.at[pl.ds(c * chunk, chunk), :], mask=mask, other=0)
        return acc + jnp.sum(weights[:, None] * partial, axis=0)

    out = lax.fori_loop(0, num_chunks, accumulate, jnp.zeros((head_dim,), jnp.float32))
    o_ref[...] = out.astype(o_ref.dtype)


def _combine_splits(partial_lse, partial_out, dtype, *, interpret):
    batch, num_heads, num_splits, head_dim = partial_out.shape
    return pl.pallas_call(
        functools.partial(_combine_kernel, chunk=min(32, _next_power_of_2(num_splits))),
        grid=(batch, num_heads),
        in_specs=[
            pl.BlockSpec((None, None, num_splits), lambda b, h: (b, h, 0)),
            pl.BlockSpec((None, None, num_splits, head_dim), lambda b, h: (b, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, head_dim), lambda b, h: (b, h, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, num_heads, head_dim), dtype),
        interpret=interpret,
        # A [32, head_dim] tile per step: 4 warps, nothing worth pipelining.
        compiler_params=_triton_compiler_params(4, 1),
        name=f"paged_decode_combine_s{num_splits}",
    )(partial_lse, partial_out)


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale", "interpret", "pages_per_block", "num_splits", "num_warps", "num_stages",
    ),
)
def paged_decode_attention(
    q: jax.Array,  # [batch, num_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, total_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, total_pages, page_size, head_dim]
    lengths: jax.Array,  # [batch] int32, valid cached tokens incl. the current one
    block_tables: jax.Array,  # [batch, pages_per_seq] int32 page ids
    *,
    k_scales: jax.Array | None = None,  # [num_kv_heads, total_pages, page_size] f32 (fp8 pages)
    v_scales: jax.Array | None = None,
    scale: float | None = None,
    interpret: bool = False,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:  # [batch, num_heads, head_dim], q.dtype
    """Decode attention over a paged KV cache; same contract as
    `paged_decode_attention_reference`.

    pages_per_block: pages per loop iteration (power of 2); default ~128 tokens.
    num_splits: split-K factor over each sequence's pages; default from
        `default_num_splits` (1 for short contexts or large batch x kv heads).
    num_warps, num_stages: Triton launch parameters (ignored when interpreting).
    k_scales, v_scales: with quantized pages (float8_e4m3fn, or uint8 holding e4m3 bits),
        one scale per token and KV head; the
        kernel converts the tiles to q's dtype and applies the scales to the scores and
        the probabilities, so each page is still read once, at one byte per element.
    Lengths above pages_per_seq * page_size are clamped to it.
    """
    validate_decode_args(q, k_pages, v_pages, lengths, block_tables, k_scales, v_scales)
    quantized = k_scales is not None
    batch, num_heads, head_dim = q.shape
    num_kv_heads, total_pages, page_size, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    group = num_heads // num_kv_heads
    group_pad = max(_MIN_DOT_TILE, _next_power_of_2(group))

    if not _is_power_of_2(page_size):
        raise ValueError(f"page_size={page_size} must be a power of 2 (Triton tile sizes)")
    if not _is_power_of_2(head_dim) or head_dim < _MIN_DOT_TILE:
        raise ValueError(f"head_dim={head_dim} must be a power of 2 >= {_MIN_DOT_TILE}")
    pages_per_block, num_splits, blocks_per_split = plan_launch(
        batch=batch, num_kv_heads=num_kv_heads, page_size=page_size,
        # Quantized tiles are converted to q's dtype in the kernel: size blocks for that.
        pages_per_seq=pages_per_seq,
        itemsize=jnp.dtype(q.dtype if quantized else k_pages.dtype).itemsize,
        pages_per_block=pages_per_block, num_splits=num_splits)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    split_output = num_splits > 1

    kernel = functools.partial(
        _decode_kernel,
        quantized=quantized,
        group=group,
        group_pad=group_pad,
        page_size=page_size,
        pages_per_block=pages_per_block,
        blocks_per_split=blocks_per_split,
        scale_log2=float(scale) * _LOG2_E,
        split_output=split_output,
    )
    in_specs = [
        pl.BlockSpec((batch,), lambda b, h, s: (0,)),
        pl.BlockSpec((None, pages_per_seq), lambda b, h, s: (b, 0)),
        pl.BlockSpec((None, num_heads, head_dim), lambda b, h, s: (b, 0, 0)),
        pl.BlockSpec((None, total_pages, page_size, head_dim), lambda b, h, s: (h, 0, 0, 0)),
        pl.BlockSpec((None, total_pages, page_size, head_dim), lambda b, h, s: (h, 0, 0, 0)),
    ]
    scale_args = ()
    if quantized:
        in_specs += [pl.BlockSpec((None, total_pages, page_size), lambda b, h, s: (h, 0, 0))] * 2
        scale_args = (k_scales, v_scales)
    if split_output:
        # [batch, heads, splits, ...] so the combine reads each head's splits
        # contiguously.
        out_shape = [
            jax.ShapeDtypeStruct((batch, num_heads, num_splits, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_heads, num_splits), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, num_heads, None, head_dim), lambda b, h, s: (b, 0, s, 0)),
            pl.BlockSpec((None, num_heads, None), lambda b, h, s: (b, 0, s)),
        ]
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, num_heads, head_dim), q.dtype)]
        out_specs = [pl.BlockSpec((None, num_heads, head_dim), lambda b, h, s: (b, 0, 0))]

    outs = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=_triton_compiler_params(num_warps, num_stages),
        name=f"paged_decode_g{group}_p{pages_per_block}_s{num_splits}{'_fp8' if quantized else ''}",
    )(lengths, block_tables, q, k_pages, v_pages, *scale_args)
    if not split_output:
        return outs[0]
    return _combine_splits(outs[1], outs[0], q.dtype, interpret=interpret)
