"""The blockwise XLA attention (runtime path) against the full-gather reference (oracle)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.attention import paged_attention_blockwise, paged_attention_reference


@pytest.mark.parametrize("chunk, lengths, pages_per_block", [
    (1, [1, 16, 17, 200, 0], 4),       # decode rows, incl. a padding row (length 0)
    (24, [24, 40, 300, 5], 3),         # prefill chunks ending at different lengths
    (8, [8, 513, 64, 100], 16),        # one long row drives the block count
])
def test_blockwise_matches_reference(chunk, lengths, pages_per_block):
    rng = np.random.default_rng(len(lengths) + chunk)
    kv_heads, q_per_kv, head_dim, page_size, pages_per_seq = 2, 7, 16, 16, 40
    batch = len(lengths)
    num_pages = batch * pages_per_seq
    q = jnp.asarray(rng.standard_normal((batch, chunk, kv_heads, q_per_kv, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, head_dim)), jnp.float32)
    tables = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_seq), jnp.int32)
    positions = np.full((batch, chunk), -1)
    for b, n in enumerate(lengths):
        valid = min(chunk, n)
        positions[b, :valid] = np.arange(n - valid, n)
    args = (q, k, v, jnp.asarray(positions, jnp.int32), jnp.asarray(lengths, jnp.int32), tables)
    want = paged_attention_reference(*args)
    got = jax.jit(paged_attention_blockwise, static_argnames="pages_per_block")(
        *args, pages_per_block=pages_per_block)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    assert np.all(np.asarray(got)[positions < 0] == 0)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_model_decode_through_the_pallas_kernel_under_shard_map(kv_cache_dtype):
    """Decode steps dispatched to the Pallas kernel (interpret mode, sharded over tp=2) give the
    same logits as the XLA path; prefill keeps using XLA. With fp8 pages both read the same
    quantized cache."""
    from qwenjax.attention import decode_kernel_for
    from qwenjax.kv_cache import KVCache
    from qwenjax.model import Layout, Model, StepBatch, random_weights
    from qwenjax.parallel import DEFAULT_RULES, make_mesh
    from tiny import tiny_config

    config = tiny_config(num_layers=2)
    layout, mesh = Layout.create(config, 2), make_mesh(2)
    weights = random_weights(layout, mesh, jnp.float32, seed=3)
    kernel = decode_kernel_for(mesh, DEFAULT_RULES, "pallas", interpret=True)
    assert decode_kernel_for(mesh, DEFAULT_RULES, "auto") is None  # CPU: XLA path
    with pytest.raises(ValueError, match="auto, pallas or xla"):
        decode_kernel_for(mesh, DEFAULT_RULES, "triton")
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (2, 21))
    tables = jnp.asarray([[3, 0, 5], [1, 4, 2]], jnp.int32)

    def run(model):
        cache = KVCache.create(num_layers=2, kv_heads=layout.heads.kv_heads, head_dim=config.head_dim,
                               num_pages=6, page_size=8, dtype=jnp.float32, mesh=mesh,
                               kv_cache_dtype=kv_cache_dtype)
        prefill = StepBatch(jnp.asarray(tokens[:, :18], jnp.int32),
                            jnp.tile(jnp.arange(18, dtype=jnp.int32), (2, 1)), jnp.full((2,), 18, jnp.int32), tables)
        _, cache = model.forward(weights, cache, prefill)
        step = jax.jit(model.forward)
        out = []
        for t in range(18, 21):  # decode in the third page (positions 16-23)
            batch = StepBatch(jnp.asarray(tokens[:, t:t + 1], jnp.int32), jnp.full((2, 1), t, jnp.int32),
                              jnp.full((2,), t + 1, jnp.int32), tables)
            logits, cache = step(weights, cache, batch)
            out.append(np.asarray(logits))
        return np.concatenate(out, axis=1)

    want = run(Model(layout, mesh))
    got = run(Model(layout, mesh, decode_attention=kernel))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_fp8_pages_take_the_kernel_only_where_triton_converts_e4m3():
    from types import SimpleNamespace

    from qwenjax.attention import fp8_kernel_supported

    gpu = lambda cc: SimpleNamespace(platform="gpu", compute_capability=cc)  # noqa: E731
    assert fp8_kernel_supported(gpu("9.0")) and fp8_kernel_supported(gpu("8.9"))
    assert not fp8_kernel_supported(gpu("8.0"))  # A100: XLA path
    assert not fp8_kernel_supported(SimpleNamespace(platform="rocm"))
    assert fp8_kernel_supported(SimpleNamespace(platform="cpu"))
