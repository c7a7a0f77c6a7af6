"""Pure-XLA paged decode attention: the oracle for the Pallas kernel and the CPU path.

It gathers every page of the block table into contiguous K/V and runs a masked
softmax in float32. That reads the whole block table's worth of pages, so it is
not fast; it is meant to be obviously right.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def paged_decode_attention_reference(
    q: jax.Array,  # [batch, num_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, total_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, total_pages, page_size, head_dim]
    lengths: jax.Array,  # [batch] int32, valid cached tokens incl. the current one
    block_tables: jax.Array,  # [batch, pages_per_seq] int32 page ids
    *,
    scale: float | None = None,
    k_scales: jax.Array | None = None,  # [num_kv_heads, total_pages, page_size] float32
    v_scales: jax.Array | None = None,  # [num_kv_heads, total_pages, page_size] float32
) -> jax.Array:  # [batch, num_heads, head_dim], q.dtype
    """One query token per sequence attending over its paged KV cache.

    Query head h reads KV head h // (num_heads // num_kv_heads). Positions at or
    past a sequence's length are masked; a length-0 sequence returns zeros.
    Quantized pages (float8_e4m3fn, or uint8 holding e4m3 bits) come with one scale
    per token and KV head: the cached vector is ``pages[h, p, t] * scales[h, p, t]``.
    """
    validate_decode_args(q, k_pages, v_pages, lengths, block_tables, k_scales, v_scales)
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    group = num_heads // num_kv_heads
    max_tokens = pages_per_seq * page_size

    def gather(pages, scales):
        # [kv, batch, pages_per_seq, page_size, dim] -> [batch, kv, tokens, dim]
        seq = pages[:, block_tables].reshape(num_kv_heads, batch, max_tokens, head_dim)
        if seq.dtype == jnp.uint8:  # quantized pages stored as e4m3 bits
            seq = jax.lax.bitcast_convert_type(seq, jnp.float8_e4m3fn)
        seq = seq.astype(jnp.float32)
        if scales is not None:
            seq = seq * scales[:, block_tables].reshape(num_kv_heads, batch, max_tokens, 1)
        return jnp.swapaxes(seq, 0, 1)

    valid = jnp.arange(max_tokens)[None, :] < lengths[:, None]  # [batch, tokens]
    # Slots past a length may hold anything (freed pages, uninitialized pools); zero
    # them so that 0 * NaN cannot reach the output through probs @ v.
    kv_valid = valid[:, None, :, None]
    k = jnp.where(kv_valid, gather(k_pages, k_scales), 0.0)
    v = jnp.where(kv_valid, gather(v_pages, v_scales), 0.0)
    q_grouped = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
    # HIGHEST: on GPUs the default float32 matmul is TF32 (10 mantissa bits), too
    # coarse for an oracle. Decode attention is memory-bound, so it costs little.
    exact = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bkgd,bktd->bkgt", q_grouped, k, precision=exact) * scale

    valid = valid[:, None, None, :]
    row_max = jnp.max(jnp.where(valid, logits, -jnp.inf), axis=-1, keepdims=True)
    # A length-0 row has max -inf; shifting by 0 instead keeps exp() finite.
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(valid, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("bkgt,bktd->bkgd", probs, v, precision=exact)
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


def validate_decode_args(q, k_pages, v_pages, lengths, block_tables, k_scales=None,
                         v_scales=None) -> None:
    """Shared argument checks; errors name the argument and the expected shape."""
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales come together (quantized pages) or not at all")
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if scales is not None and scales.shape != k_pages.shape[:-1]:
            raise ValueError(f"{name} must be [num_kv_heads, total_pages, page_size] = "
                             f"{k_pages.shape[:-1]}; got {scales.shape}")
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim]; got shape {q.shape}")
    batch, num_heads, head_dim = q.shape
    if k_pages.ndim != 4 or k_pages.shape[-1] != head_dim:
        raise ValueError(
            "k_pages must be [num_kv_heads, total_pages, page_size, head_dim="
            f"{head_dim}]; got shape {k_pages.shape}"
        )
    if v_pages.shape != k_pages.shape:
        raise ValueError(
            f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}"
        )
    num_kv_heads = k_pages.shape[0]
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
        )
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},); got {lengths.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"block_tables must be [batch={batch}, pages_per_seq]; got {block_tables.shape}"
        )
    for name, arr in (("lengths", lengths), ("block_tables", block_tables)):
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32; got {arr.dtype}")
