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
