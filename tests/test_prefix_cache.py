"""Prefix caching: cached pages are found, shared safely, evicted LRU, and never change an output."""
import numpy as np
import pytest

from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.engine.prefix_cache import PrefixCache
from qwenjax.kv_cache import PageAllocator
from qwenjax.loading import load_model
from qwenjax.sampling import SamplingParams
from tiny import tiny_config, write_hf_checkpoint

PS = 4


def _fill(cache: PrefixCache, tokens, pages=None):
    """Index ``tokens``' full pages as one request would, holding fresh pages; returns them."""
    n = len(tokens) // PS
    pages = pages or cache.allocator.alloc(n)
    parent = None
    for i in range(n):
        parent = cache.insert(parent, tokens[i * PS:(i + 1) * PS], pages[i])
    return pages


def test_match_finds_the_longest_cached_run_of_full_pages():
    cache = PrefixCache(PageAllocator(16), PS)
    pages = _fill(cache, list(range(12)))
    assert [e.page for e in cache.match(list(range(12)), 3)] == pages
    assert [e.page for e in cache.match(list(range(10)) + [99, 98], 3)] == pages[:2]
    assert [e.page for e in cache.match(list(range(12)), 1)] == pages[:1]  # max_pages caps it
    assert cache.match([1, 0, 2, 3] + list(range(4, 12)), 3) == []
    assert cache.match(list(range(3)), 3) == []  # no full page


@pytest.mark.parametrize("hash_fn", [None, lambda parent, tokens: 0], ids=["default", "colliding"])
def test_pages_are_only_reused_for_the_same_tokens_after_the_same_prefix(hash_fn):
    """With every key colliding, a hit still needs equal tokens and the very same parent entry."""
    kwargs = {"hash_fn": hash_fn} if hash_fn else {}
    cache = PrefixCache(PageAllocator(32), PS, **kwargs)
    a = _fill(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    b = _fill(cache, [9, 9, 9, 9, 5, 6, 7, 8])  # same second page after another first page
    c = _fill(cache, [1, 2, 3, 4, 5, 6, 7, 9])
    assert [e.page for e in cache.match([1, 2, 3, 4, 5, 6, 7, 8], 2)] == a
    assert [e.page for e in cache.match([9, 9, 9, 9, 5, 6, 7, 8], 2)] == b
    assert [e.page for e in cache.match([1, 2, 3, 4, 5, 6, 7, 9], 2)] == [a[0], c[1]]
    assert cache.match([5, 6, 7, 8], 1) == []  # page 2's tokens alone are not a prefix
    assert cache.match([2, 1, 3, 4], 1) == []
    cache.check()


def test_freed_cached_pages_are_evicted_lru_tail_first_and_reuse_takes_them_back():
    allocator = PageAllocator(6)
    cache = PrefixCache(allocator, PS)
    first = _fill(cache, list(range(8)))           # 2 pages
    second = _fill(cache, list(range(100, 108)))   # 2 pages
    allocator.free(reversed(first))
    allocator.free(reversed(second))
    assert allocator.num_free == 6 and allocator.num_evictable == 4 and len(cache) == 4
    # A hit holds a cached page again: it leaves the LRU.
    hit = cache.match(list(range(100, 108)), 2)
    allocator.reuse(hit[0].page)
    assert allocator.num_free == 5
    # Two never-cached pages go first, then the LRU's oldest: the tail of `first`, then its head.
    got = allocator.alloc(3)
    assert got[2] == first[1] and len(cache) == 3
    assert [e.page for e in cache.match(list(range(8)), 2)] == [first[0]]
    allocator.alloc(1)
    assert cache.match(list(range(8)), 2) == []
    # Evicting a page takes the entries chained below it out too: nothing could reach them.
    assert [e.page for e in cache.match(list(range(100, 108)), 2)] == second
    allocator.free([hit[0].page])
    allocator.alloc(1)   # evicts second[1] (older in the LRU than second[0])
    allocator.alloc(1)   # evicts second[0]
    assert len(cache) == 0
    allocator.check()
    cache.check()


def test_evicting_a_parent_drops_its_children():
    allocator = PageAllocator(4)
    cache = PrefixCache(allocator, PS)
    pages = _fill(cache, list(range(12)))
    allocator.free(pages)  # head first: the head is the oldest in the LRU
    allocator.alloc(2)     # the plain free page, then the head's page
    assert len(cache) == 0
    assert allocator.num_evictable == 0 and allocator.num_free == 2
    allocator.check()
    cache.check()


def test_a_salt_shares_pages_only_with_its_own_requests():
    allocator = PageAllocator(16)
    cache = PrefixCache(allocator, PS)
    tokens = list(range(8))
    plain = _fill(cache, tokens)
    salted = allocator.alloc(2)
    parent = None
    for i in range(2):
        parent = cache.insert(parent, tokens[i * PS:(i + 1) * PS], salted[i], salt="tenant-a")
    assert [e.page for e in cache.match(tokens, 2)] == plain
    assert [e.page for e in cache.match(tokens, 2, salt="tenant-a")] == salted
    assert cache.match(tokens, 2, salt="tenant-b") == []
    cache.check()
    # Once its pages are evicted, the salt's root goes too (salts do not pile up).
    allocator.free(salted)
    allocator.free(plain)
    allocator.alloc(16)
    assert len(cache) == 0 and cache._salts == {}
    cache.check()


# ---- the engine ---------------------------------------------------------------------------
VOCAB = 250
SMALL = dict(max_num_seqs=4, max_num_batched_tokens=64, prefill_chunk=32, max_prefill_seqs=2,
             page_size=PS, max_model_len=160)
ONE_SHAPE = dict(decode_buckets=(4,), prefill_buckets=(64,))  # 3 step programs, not 14


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-prefix")
    write_hf_checkpoint(tiny_config(vocab_size=VOCAB, max_position_embeddings=512), directory)
    return load_model(directory, tp=2, dtype="float32")


def _drive(engine, plan):
    """Run ``plan``: (arrival step, prompt, max_tokens, abort step or None) per request.
    Returns {index: finished output} of the requests not aborted, and the preemption count."""
    ids, live, outputs, requests, step = {}, {}, {}, [], 0
    while len(outputs) + sum(a is not None for _, _, _, a in plan) < len(plan) or engine.has_unfinished():
        for i, (at, prompt, max_tokens, abort_at) in enumerate(plan):
            if at == step:
                rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                ignore_eos=True))
                ids[rid], live[i] = i, rid
                requests.append(engine.scheduler.waiting[-1])
            if abort_at is not None and abort_at == step and i in live:
                engine.abort(live[i])
        for out in engine.step():
            if out.finished and out.finish_reason != "abort":
                outputs[ids[out.request_id]] = out
        engine.check()
        step += 1
        assert step < 5_000
    return outputs, sum(r.num_preemptions for r in requests)


def test_random_stress_matches_the_uncached_run(tiny_lm):
    """Shared and distinct prefixes, aborts, a pool small enough to evict and preempt: every
    output equals the run without caching, and the allocator's books balance at every step."""
    rng = np.random.default_rng(1)
    stems = [rng.integers(0, VOCAB, n).tolist() for n in (37, 64, 20)]
    plan = []
    for i in range(24):
        prefix = stems[i % 3] if i % 4 else []
        prompt = prefix + rng.integers(0, VOCAB, rng.integers(1, 40)).tolist()
        abort_at = int(rng.integers(1, 60)) if i % 7 == 3 else None
        plan.append((int(rng.integers(0, 60)), prompt, int(rng.integers(1, 12)), abort_at))
    cached = Engine(tiny_lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=48), warm_up=False)
    plain = Engine(tiny_lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=48, enable_prefix_caching=False),
                   warm_up=False)
    (with_cache, preempted), (without, _) = _drive(cached, plan), _drive(plain, plan)
    done = [i for i in with_cache if i in without]
    assert len(done) >= 18
    for i in done:
        assert with_cache[i].token_ids == without[i].token_ids, f"request {i}"
    stats = cached.prefix_cache.stats
    assert stats.hits > 0 and sum(o.num_cached_tokens for o in with_cache.values()) > 0
    assert stats.evictions > 0 and preempted > 0, (stats, preempted)
    assert cached.allocator.num_free == 48 and plain.allocator.num_free == 48
    assert cached.allocator.num_evictable > 0  # pages kept their contents for later requests
    assert all(o.num_cached_tokens == 0 for o in without.values())


def test_a_failed_step_forgets_the_cache_and_errors_never_leave_pages_behind(tiny_lm, monkeypatch):
    engine = Engine(tiny_lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=64), warm_up=False)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompt = list(range(1, 30))
    engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    assert len(engine.prefix_cache) == 7  # 31 tokens computed → 7 full pages of 4
    engine.add_request(prompt, params)
    real = engine.runner.dispatch

    def broken(out):
        raise RuntimeError("injected")
    monkeypatch.setattr(engine.runner, "dispatch", broken)
    (failed,) = engine.step()
    assert failed.finish_reason == "error"
    assert len(engine.prefix_cache) == 0 and engine.allocator.num_evictable == 0
    monkeypatch.setattr(engine.runner, "dispatch", real)
    rid = engine.add_request(prompt, params)
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == rid and o.finished]
    assert outputs[0].num_cached_tokens == 0
    engine.check()


def test_prefix_caching_off_shares_nothing(tiny_lm):
    engine = Engine(tiny_lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=64, enable_prefix_caching=False),
                    warm_up=False)
    assert engine.prefix_cache is None
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for _ in range(2):
        engine.add_request(list(range(1, 30)), params)
        while engine.has_unfinished():
            outs = engine.step()
        assert outs[-1].num_cached_tokens == 0
    assert engine.allocator.num_evictable == 0


def test_cache_salt_isolates_requests_in_the_engine(tiny_lm):
    """The same prompt under another salt computes every token; under the same salt it hits;
    outputs are the same either way."""
    engine = Engine(tiny_lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=64), warm_up=False)
    prompt = list(range(1, 30))

    def run(salt):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                                  cache_salt=salt))
        while engine.has_unfinished():
            outs = engine.step()
        return outs[-1]

    first = run("a")
    assert first.num_cached_tokens == 0
    assert run("b").num_cached_tokens == 0 and run(None).num_cached_tokens == 0
    again = run("a")
    assert again.num_cached_tokens == 28 and again.token_ids == first.token_ids
    engine.check()
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")
