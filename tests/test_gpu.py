"""Checks that need a GPU (skipped elsewhere): the compiled Triton kernel and the model's GPU path.

Run on a lent machine by scripts/gpu_session.sh. The conftest's fake-CPU-device flags do
not apply there: run with JAX_PLATFORMS unset (the script does).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda", "rocm"),
                                reason="needs a GPU backend")


@pytest.mark.parametrize("batch, context, heads, kv_heads, dtype", [
    (32, 2048, 8, 1, jnp.bfloat16),    # 72B per-device at TP8
    (8, 32768, 8, 1, jnp.bfloat16),    # long context: split-K
    (16, 4096, 16, 2, jnp.bfloat16),   # 72B per-device at TP4
    (4, 1000, 14, 2, jnp.float32),     # the real 0.5B's grouping, ragged length
])
def test_triton_kernel_matches_reference(batch, context, heads, kv_heads, dtype):
    from pallas_kernels.paged_attention import paged_decode_attention
    from pallas_kernels.reference import paged_decode_attention_reference

    rng = np.random.default_rng(0)
    page_size, head_dim = 16, 128
    pages_per_seq = -(-context // page_size)
    total = batch * pages_per_seq + 1
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((kv_heads, total, page_size, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((kv_heads, total, page_size, head_dim)), dtype)
    tables = jnp.asarray(1 + rng.permutation(total - 1)[: batch * pages_per_seq].reshape(batch, -1), jnp.int32)
    lengths = rng.integers(1, context + 1, batch)
    lengths[0] = context
    lengths = jnp.asarray(lengths, jnp.int32)
    got = paged_decode_attention(q, k, v, lengths, tables)
    want = paged_decode_attention_reference(q, k, v, lengths, tables)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_model_decode_uses_the_kernel_and_matches_xla():
    from qwenjax.config import preset
    import dataclasses

    from qwenjax.kv_cache import KVCache
    from qwenjax.model import Layout, Model, StepBatch, random_weights
    from qwenjax.attention import decode_kernel_for
    from qwenjax.parallel import DEFAULT_RULES, make_mesh

    config = dataclasses.replace(preset("qwen2.5-0.5b"), num_layers=4)
    layout, mesh = Layout.create(config, 1), make_mesh(1)
    weights = random_weights(layout, mesh, jnp.float32, seed=1)
    kernel = decode_kernel_for(mesh, DEFAULT_RULES, "auto")
    assert kernel is not None

    def run(model):
        cache = KVCache.create(num_layers=4, kv_heads=2, head_dim=64, num_pages=40, page_size=16,
                               dtype=jnp.float32, mesh=mesh)
        tables = jnp.arange(40, dtype=jnp.int32).reshape(2, 20)
        tokens = jnp.asarray(np.random.default_rng(2).integers(0, 1000, (2, 300)), jnp.int32)
        prefill = StepBatch(tokens[:, :299], jnp.tile(jnp.arange(299, dtype=jnp.int32), (2, 1)),
                            jnp.full((2,), 299, jnp.int32), tables)
        _, cache = jax.jit(model.forward)(weights, cache, prefill)
        step = StepBatch(tokens[:, 299:], jnp.full((2, 1), 299, jnp.int32), jnp.full((2,), 300, jnp.int32), tables)
        logits, _ = jax.jit(model.forward)(weights, cache, step)
        return np.asarray(logits)

    np.testing.assert_allclose(run(Model(layout, mesh, decode_attention=kernel)), run(Model(layout, mesh)),
                               atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_quantized_weights_on_the_gpu_match_their_dequantized_model(scheme):
    """fp8 and int4 projections compile and run on the GPU (the e4m3 convert, or the int4
    dequantization, feeding the GEMM) and equal the dense model on the dequantized weights."""
    import dataclasses

    from qwenjax.config import preset
    from qwenjax.kv_cache import KVCache
    from qwenjax.model import Layout, Model, StepBatch, random_weights
    from qwenjax.parallel import make_mesh
    from qwenjax.quantization import dequantize_tree

    config = dataclasses.replace(preset("qwen2.5-0.5b"), num_layers=4)
    mesh = make_mesh(1)
    quantized = Layout.create(config, 1, quantization=scheme)
    weights = random_weights(quantized, mesh, jnp.float32, seed=1)

    def run(layout, weights):
        cache = KVCache.create(num_layers=4, kv_heads=2, head_dim=64, num_pages=8, page_size=16,
                               dtype=jnp.float32, mesh=mesh)
        tokens = jnp.asarray(np.random.default_rng(2).integers(0, 1000, (2, 64)), jnp.int32)
        batch = StepBatch(tokens, jnp.tile(jnp.arange(64, dtype=jnp.int32), (2, 1)),
                          jnp.full((2,), 64, jnp.int32), jnp.arange(8, dtype=jnp.int32).reshape(2, 4))
        return np.asarray(jax.jit(Model(layout, mesh).forward)(weights, cache, batch)[0])

    np.testing.assert_allclose(run(quantized, weights),
                               run(Layout.create(config, 1), dequantize_tree(weights)),
                               atol=2e-3, rtol=2e-3)


def test_int4_weights_take_half_a_byte_on_the_gpu():
    """XLA on GPU stores 4-bit integers two to a byte (what the planner and bench_decode count):
    device memory grows by about half the element count."""
    device = jax.devices()[0]
    stats = device.memory_stats()
    if not stats or "bytes_in_use" not in stats:
        pytest.skip(f"{device.device_kind}: no memory_stats")
    n = 1 << 28
    before = device.memory_stats()["bytes_in_use"]
    codes = jax.jit(lambda: jnp.ones((n,), jnp.uint4))()
    codes.block_until_ready()
    grown = device.memory_stats()["bytes_in_use"] - before
    assert 0.45 * n < grown < 0.6 * n, f"{n} int4 elements took {grown} bytes"


@pytest.mark.parametrize("batch, context, heads, kv_heads", [(32, 2048, 8, 1), (8, 32768, 8, 1)])
def test_triton_kernel_with_fp8_pages_matches_reference(batch, context, heads, kv_heads):
    """The compiled kernel on fp8 KV pages (uint8 e4m3 bits + a scale per token and head)."""
    from qwenjax.attention import fp8_kernel_supported

    if not fp8_kernel_supported():
        pytest.skip(f"{jax.devices()[0].device_kind}: fp8 KV decode takes the XLA path")
    from pallas_kernels.paged_attention import paged_decode_attention
    from pallas_kernels.reference import paged_decode_attention_reference
    from qwenjax.kv_cache import quantize_tokens

    rng = np.random.default_rng(0)
    page_size, head_dim = 16, 128
    pages_per_seq = -(-context // page_size)
    total = batch * pages_per_seq + 1
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), jnp.bfloat16)
    k, k_scales = quantize_tokens(jnp.asarray(rng.standard_normal((kv_heads, total, page_size, head_dim)) * 20))
    v, v_scales = quantize_tokens(jnp.asarray(rng.standard_normal((kv_heads, total, page_size, head_dim))))
    tables = jnp.asarray(1 + rng.permutation(total - 1)[: batch * pages_per_seq].reshape(batch, -1), jnp.int32)
    lengths = jnp.asarray(rng.integers(1, context + 1, batch), jnp.int32)
    scales = dict(k_scales=k_scales, v_scales=v_scales)
    got = paged_decode_attention(q, k, v, lengths, tables, **scales)
    want = paged_decode_attention_reference(q, k, v, lengths, tables, **scales)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)
