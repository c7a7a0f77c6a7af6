import random

import jax
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
