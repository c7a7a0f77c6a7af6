import random

import jax
import jax.numpy as jnp
import pytest

from qwenjax.kv_cache import OutOfPages, PageAllocator, page_bytes_per_device, pages_for_memory


def test_alloc_free_round_trip():
    a = PageAllocator(8)
    pages = a.alloc(5)
    assert len(set(pages)) == 5 and a.num_free == 3
    with pytest.raises(OutOfPages, match="asked for 4 pages, 3 of 8 free"):
        a.alloc(4)
    a.free(pages)
    assert a.num_free == 8
    with pytest.raises(ValueError, match="freed twice"):
        a.free(pages[:1])
    a.check({})


@pytest.mark.parametrize("seed", range(5))
def test_random_alloc_share_free_keeps_invariants(seed):
    """Random sequences of alloc / share / free over many owners; counts always match holders."""
    rng = random.Random(seed)
    a = PageAllocator(64)
    owners: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.4:
            n = rng.randint(1, 12)
            if a.can_alloc(n):
                owners[next_id] = a.alloc(n)
                next_id += 1
            else:
                with pytest.raises(OutOfPages):
                    a.alloc(n)
        elif op < 0.6 and owners:
            # A new owner shares a prefix of an existing owner's pages (prefix caching).
            src = owners[rng.choice(list(owners))]
            prefix = src[: rng.randint(1, len(src))]
            a.share(prefix)
            owners[next_id] = list(prefix)
            next_id += 1
        elif owners:
            a.free(owners.pop(rng.choice(list(owners))))
        a.check(owners)
    for pages in owners.values():
        a.free(pages)
    a.check({})
    assert a.num_free == 64


def test_share_of_a_free_page_is_refused():
    a = PageAllocator(2)
    with pytest.raises(ValueError, match="page 0 is free"):
        a.share([0])


def test_page_bytes_and_cpu_needs_explicit_pages():
    # 72B at TP8: 80 layers × K,V × 1 KV head × 16 tokens × 128 × 2 B = 640 KiB per page.
    assert page_bytes_per_device(num_layers=80, kv_heads_per_device=1, head_dim=128, page_size=16,
                                 dtype="bfloat16") == 640 * 1024
    with pytest.raises(ValueError, match="kv_cache_fraction must be in"):
        pages_for_memory(memory_fraction=1.5, page_bytes=1, devices=jax.devices()[:1])
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        with pytest.raises(ValueError, match="explicit page count"):
            pages_for_memory(memory_fraction=0.5, page_bytes=1024, devices=jax.devices()[:1])


def test_fp8_pages_keep_each_token_to_its_own_scale():
    """write_kv into fp8 pools: one scale per token and head (its max |value| / 448), values
    within e4m3's rounding of the originals however different the tokens' magnitudes; padding
    writes nothing; the page bytes count values plus scales."""
    import numpy as np

    from qwenjax.kv_cache import (KVCache, QuantizedPages, gather_pages, kv_bytes_per_vector,
                                  page_bytes_per_device, write_kv)
    from qwenjax.parallel import make_mesh

    cache = KVCache.create(num_layers=1, kv_heads=2, head_dim=8, num_pages=4, page_size=4,
                           dtype=jnp.float32, mesh=make_mesh(2), kv_cache_dtype="fp8")
    k_pages, v_pages = cache.k[0], cache.v[0]
    assert isinstance(k_pages, QuantizedPages) and k_pages.values.dtype == jnp.uint8  # e4m3 bits
    assert k_pages.scales.shape == (2, 4, 4) and cache.num_pages == 4 and cache.page_size == 4
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 3, 2, 8)).astype(np.float32) * np.array([0.01, 1, 300])[None, :, None, None]
    v = rng.standard_normal((2, 3, 2, 8)).astype(np.float32)
    positions = jnp.asarray([[0, 1, 2], [4, 5, -1]], jnp.int32)
    tables = jnp.asarray([[2, 0], [1, 3]], jnp.int32)
    k_pages, v_pages = jax.jit(write_kv)(k_pages, v_pages, jnp.asarray(k), jnp.asarray(v), positions, tables)
    got = np.asarray(gather_pages(k_pages, tables))  # [heads, batch, 8 tokens, d]
    for b, row in enumerate(np.asarray(positions)):
        for c, pos in enumerate(row):
            if pos < 0:
                continue
            want = k[b, c].astype(np.float32)  # [heads, d]
            np.testing.assert_allclose(got[:, b, pos], want, rtol=2 ** -4,
                                       atol=np.abs(want).max() * 2.0 ** -9)
            scales = np.asarray(k_pages.scales)[:, tables[b, pos // 4], pos % 4]
            np.testing.assert_allclose(scales, np.abs(want).max(-1) / 448, rtol=1e-6)
    assert float(np.asarray(k_pages.scales)[0, 3, 2]) == 1.0  # the padding token wrote nothing
    assert kv_bytes_per_vector(128, jnp.bfloat16, "fp8") == 132
    assert page_bytes_per_device(num_layers=2, kv_heads_per_device=1, head_dim=128, page_size=16,
                                 dtype=jnp.bfloat16, kv_cache_dtype="fp8") == 2 * 2 * 16 * 132
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        kv_bytes_per_vector(128, jnp.bfloat16, "fp16")
