"""The prefix cache's host tier (qwenjax/engine/host_cache.py, kv_offloading_size): pages the
device pool evicts come back from host memory, and outputs are those of a run without any
caching, through waves of requests that evict each other's prefixes."""
import numpy as np
import pytest

from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.loading import load_model
from qwenjax.sampling import SamplingParams
from test_weight_updates import _lively

VOCAB = 250
CONFIG = dict(max_num_seqs=4, max_num_batched_tokens=64, prefill_chunk=32, max_prefill_seqs=2,
              page_size=8, max_model_len=96, num_pages=24, decode_buckets=(4,), prefill_buckets=(64,))
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(_lively(tmp_path_factory.mktemp("host-cache"), 0), tp=2, dtype="float32")


def _run(engine, prompts, waves):
    """Each wave's prompts run together to the end; {index: output}."""
    outputs = {}
    for wave in waves:
        ids = {engine.add_request(prompts[i], GREEDY): i for i in wave}
        while engine.has_unfinished():
            outputs.update((ids[o.request_id], o) for o in engine.step() if o.finished)
        engine.check()
    return outputs


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_evicted_prefixes_come_back_from_host_memory(lm, kv_cache_dtype):
    """(fp8 pages: values and scales both travel.)"""
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, VOCAB, 40).tolist() for _ in range(3)]
    prompts = [prefixes[i % 3] + rng.integers(0, VOCAB, int(rng.integers(1, 20))).tolist()
               for i in range(12)]
    waves = [[0], [1, 2], [3], [4, 5, 6], [7], [8, 9], [10, 11], [0]]
    config = dict(CONFIG, kv_cache_dtype=kv_cache_dtype)
    plain = _run(Engine(lm, EngineConfig(**config, enable_prefix_caching=False), warm_up=False),
                 prompts, waves)
    device_only = Engine(lm, EngineConfig(**config), warm_up=False)
    engine = Engine(lm, EngineConfig(**config, kv_offloading_size=0.01), warm_up=False)
    cached = {}
    for name, e in (("device", device_only), ("host", engine)):
        outputs = _run(e, prompts, waves)
        for i in plain:
            assert outputs[i].token_ids == plain[i].token_ids, (name, i)
        cached[name] = sum(o.num_cached_tokens for o in outputs.values())
    stats = engine.scheduler.host_cache.stats
    assert stats.stored > 0 and stats.restored > 0
    assert cached["host"] > cached["device"]
    # A prompt of the first prefix again, after the other prefixes evicted (some of) it: the
    # device's pages and the host's together give the whole prefix back.
    _run(engine, prompts, [[1], [2], [4, 5]])
    before = stats.restored
    again = _run(engine, prompts, [[3]])[3]
    assert stats.restored > before and again.num_cached_tokens >= 40
    assert again.token_ids == plain[3].token_ids
    from server.metrics import ServerMetrics  # the server's counters read the same tallies

    registry = ServerMetrics(lambda: [engine]).registry
    assert registry.get_sample_value("qwenjax:kv_offload_pages_restored_total") == stats.restored
    assert registry.get_sample_value("qwenjax:kv_offload_pages_stored_total") == stats.stored


def test_offloading_needs_prefix_caching_and_a_page_of_room(lm):
    with pytest.raises(ValueError, match="needs prefix caching"):
        Engine(lm, EngineConfig(**CONFIG, enable_prefix_caching=False, kv_offloading_size=1.0),
               warm_up=False)
    with pytest.raises(ValueError, match="holds no page"):
        Engine(lm, EngineConfig(**CONFIG, kv_offloading_size=1e-9), warm_up=False)
