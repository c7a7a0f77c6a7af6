"""Attention over the paged KV cache.

``paged_attention`` is the pure-XLA path (CPU, tests, prefill and mixed chunks):
each query attends to its sequence's cached tokens at positions ≤ its own. A
decode-only step can use a Pallas kernel instead (``decode_kernel``).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    positions: jax.Array, seq_lens: jax.Array, block_tables: jax.Array,
                    *, decode_kernel: Callable | None = None) -> jax.Array:
    """Causal attention of a chunk of queries over paged K/V.

    q: [batch, chunk, kv_heads, q_per_kv, head_dim] (rotated)
    k_pages, v_pages: [kv_heads, num_pages, page_size, head_dim] (this step's K/V already written)
    positions: [batch, chunk] int32, -1 for padding
    seq_lens: [batch] int32
    block_tables: [batch, pages_per_seq] int32
    Returns [batch, chunk, kv_heads, q_per_kv, head_dim] in q's dtype; padding rows are zero.
    """
    batch, chunk, kv_heads, q_per_kv, head_dim = q.shape
    if decode_kernel is not None and chunk == 1:
        out = decode_kernel(q.reshape(batch, kv_heads * q_per_kv, head_dim), k_pages, v_pages,
                            seq_lens, block_tables)
        return out.reshape(q.shape)
    return paged_attention_reference(q, k_pages, v_pages, positions, seq_lens, block_tables)


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[kv_heads, num_pages, page_size, d] → [kv_heads, batch, pages_per_seq * page_size, d]."""
    kv_heads, _, page_size, head_dim = pages.shape
    batch, pages_per_seq = block_tables.shape
    gathered = pages[:, block_tables]  # [kv_heads, batch, pages_per_seq, page_size, d]
    return gathered.reshape(kv_heads, batch, pages_per_seq * page_size, head_dim)


def paged_attention_reference(q, k_pages, v_pages, positions, seq_lens, block_tables):
    head_dim = q.shape[-1]
    k = gather_pages(k_pages, block_tables)
    v = gather_pages(v_pages, block_tables)
    scores = jnp.einsum("bsgjd,gbtd->bgjst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    t = jnp.arange(k.shape[2])
    visible = (t[None, None, :] <= positions[:, :, None]) & (t[None, None, :] < seq_lens[:, None, None])
    visible = visible[:, None, None]  # [batch, 1, 1, chunk, tokens]
    scores = jnp.where(visible, scores, -jnp.inf)
    # Padding queries see nothing; give them zeros instead of NaN.
    probs = jax.nn.softmax(jnp.where(visible.any(-1, keepdims=True), scores, 0.0), axis=-1)
    probs = jnp.where(visible, probs, 0.0)
    out = jnp.einsum("bgjst,gbtd->bsgjd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
