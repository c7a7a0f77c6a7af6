"""Attention over the paged KV cache.

``paged_attention`` is the pure-XLA path (CPU, prefill and mixed chunks): each
query attends to its sequence's cached tokens at positions ≤ its own. It walks
the block table a block of pages at a time with an online softmax and stops at
the longest sequence in the step, so its cost follows the real lengths, not
``max_model_len`` (the block table is always that wide). A decode-only step can
use a Pallas kernel instead (``decode_kernel``). ``paged_attention_reference``
gathers everything and is the test oracle.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from qwenjax.kv_cache import QuantizedPages, gather_pages


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    positions: jax.Array, seq_lens: jax.Array, block_tables: jax.Array,
                    *, decode_kernel: Callable | None = None) -> jax.Array:
    """Causal attention of a chunk of queries over paged K/V.

    q: [batch, chunk, kv_heads, q_per_kv, head_dim] (rotated)
    k_pages, v_pages: [kv_heads, num_pages, page_size, head_dim] (this step's K/V already written),
        or QuantizedPages (fp8 values and per-token scales)
    positions: [batch, chunk] int32, -1 for padding
    seq_lens: [batch] int32
    block_tables: [batch, pages_per_seq] int32
    Returns [batch, chunk, kv_heads, q_per_kv, head_dim] in q's dtype; padding rows are zero.
    """
    batch, chunk, kv_heads, q_per_kv, head_dim = q.shape
    if (decode_kernel is not None and chunk == 1
            and (not isinstance(k_pages, QuantizedPages) or fp8_kernel_supported())):
        out = decode_kernel(q.reshape(batch, kv_heads * q_per_kv, head_dim), k_pages, v_pages,
                            seq_lens, block_tables)
        return out.reshape(q.shape)
    return paged_attention_blockwise(q, k_pages, v_pages, positions, seq_lens, block_tables)


def paged_attention_blockwise(q, k_pages, v_pages, positions, seq_lens, block_tables,
                              pages_per_block: int = 16):
    batch, chunk, kv_heads, q_per_kv, head_dim = q.shape
    page_size = k_pages.shape[2]
    pages_per_seq = block_tables.shape[1]
    pages_per_block = min(pages_per_block, pages_per_seq)
    num_blocks = -(-pages_per_seq // pages_per_block)
    tables = jnp.pad(block_tables, ((0, 0), (0, num_blocks * pages_per_block - pages_per_seq)))
    block_tokens = pages_per_block * page_size
    # Blocks past the longest sequence hold nothing anyone can see: skip them.
    live_blocks = (jnp.max(seq_lens) + block_tokens - 1) // block_tokens
    scale = head_dim ** -0.5
    qf = q.astype(jnp.float32) * scale

    def body(i, carry):
        running_max, denom, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(tables, i * pages_per_block, pages_per_block, axis=1)
        k = gather_pages(k_pages, pages, jnp.float32)  # [g, b, block_tokens, d]
        t = i * block_tokens + jnp.arange(block_tokens)
        # Slots past a sequence's length hold whatever an earlier owner (or nobody) left there.
        # Masked scores drop their K, but 0 * NaN is NaN in probs @ V: zero those V rows.
        in_seq = (t[None, :] < seq_lens[:, None])[None, :, :, None]  # [1, b, block_tokens, 1]
        v = jnp.where(in_seq, gather_pages(v_pages, pages, jnp.float32), 0.0)
        scores = jnp.einsum("bsgjd,gbtd->bgjst", qf, k)
        visible = ((t[None, None, :] <= positions[:, :, None])
                   & (t[None, None, :] < seq_lens[:, None, None]))[:, None, None]
        scores = jnp.where(visible, scores, -jnp.inf)
        new_max = jnp.maximum(running_max, scores.max(-1))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # rows that saw nothing yet
        probs = jnp.where(visible, jnp.exp(scores - safe_max[..., None]), 0.0)
        rescale = jnp.where(jnp.isfinite(running_max), jnp.exp(running_max - safe_max), 0.0)
        denom = denom * rescale + probs.sum(-1)
        acc = acc * rescale[..., None] + jnp.einsum("bgjst,gbtd->bgjsd", probs, v)
        return new_max, denom, acc

    shape = (batch, kv_heads, q_per_kv, chunk)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, live_blocks, body, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # padding queries: zeros
    return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)


def paged_attention_reference(q, k_pages, v_pages, positions, seq_lens, block_tables):
    head_dim = q.shape[-1]
    k = gather_pages(k_pages, block_tables)
    v = gather_pages(v_pages, block_tables)
    in_seq = (jnp.arange(v.shape[2])[None, :] < seq_lens[:, None])[None, :, :, None]
    v = jnp.where(in_seq, v, jnp.zeros((), v.dtype))  # stale slots may hold NaN: 0 * NaN = NaN
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


def fp8_kernel_supported(device=None) -> bool:
    """Whether the Pallas decode kernel can read fp8 pages here: Triton converts e4m3
    (``float8e4nv``) only on NVIDIA compute capability ≥ 8.9 (H100, L40S; not A100), and
    ROCm's MI300X natively has the fnuz variant only. Elsewhere fp8 KV decode takes the XLA
    path (correct, slower). CPU (interpret mode in tests): supported."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return True
    capability = getattr(device, "compute_capability", None)
    if device.platform in ("gpu", "cuda") and capability is not None:
        major, minor = (int(x) for x in str(capability).split(".")[:2])
        return (major, minor) >= (8, 9)
    return False


def decode_kernel_for(mesh, rules, impl: str = "auto", *, interpret: bool = False) -> Callable | None:
    """The decode attention for this mesh: the Pallas kernel on GPUs, else None (XLA path).

    ``impl``: "auto" (Pallas on GPU backends, XLA elsewhere), "pallas" or "xla". A
    ``pallas_call`` is opaque to XLA's partitioner, so it runs under ``shard_map``
    with the KV-head axis split over ``tp`` exactly like the pools: each device
    attends over its own heads and pages, no collective needed.
    """
    if impl not in ("auto", "pallas", "xla"):
        raise ValueError(f"attention implementation must be auto, pallas or xla; got {impl!r}")
    if impl == "xla" or (impl == "auto" and jax.default_backend() not in ("gpu", "cuda", "rocm")):
        return None
    from jax.sharding import PartitionSpec

    from pallas_kernels.paged_attention import paged_decode_attention
    from qwenjax.kv_cache import POOL_AXES

    q_spec = rules.spec(("batch", "q_heads", "head_dim"))
    pool_spec = rules.spec(POOL_AXES)
    scale_spec = rules.spec(POOL_AXES[:-1])
    replicated = PartitionSpec()

    def dense(q, k_pages, v_pages, seq_lens, block_tables):
        return paged_decode_attention(q, k_pages, v_pages, seq_lens, block_tables, interpret=interpret)

    def quantized(q, k_values, v_values, k_scales, v_scales, seq_lens, block_tables):
        return paged_decode_attention(q, k_values, v_values, seq_lens, block_tables,
                                      k_scales=k_scales, v_scales=v_scales, interpret=interpret)

    in_stage = mesh.shape.get("pp", 1) > 1

    def call(q, k_pages, v_pages, seq_lens, block_tables):
        # Inside the pipeline's shard_map (manual over pp) this one nests in it, manual over tp
        # too, on the context's mesh (where pp is already manual).
        where = (dict(mesh=jax.sharding.get_abstract_mesh(), axis_names={"tp"}) if in_stage
                 else dict(mesh=mesh))
        if isinstance(k_pages, QuantizedPages):
            return jax.shard_map(
                quantized, in_specs=(q_spec, pool_spec, pool_spec, scale_spec, scale_spec,
                                     replicated, replicated),
                out_specs=q_spec, check_vma=False, **where)(
                q, k_pages.values, v_pages.values, k_pages.scales, v_pages.scales, seq_lens,
                block_tables)
        return jax.shard_map(dense, in_specs=(q_spec, pool_spec, pool_spec, replicated, replicated),
                             out_specs=q_spec, check_vma=False, **where)(
            q, k_pages, v_pages, seq_lens, block_tables)

    return call
