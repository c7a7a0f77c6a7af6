"""Embeddings (qwenjax/pooling.py, Engine.add_pooling_request, LLM.embed): the final-normed
hidden state of each prompt's last token, batched with generating requests, through chunked
prefill and the prefix cache; /v1/embeddings is tested in test_server_openai.py."""
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.greedy import GreedyGenerator
from qwenjax.kv_cache import KVCache
from qwenjax.loading import load_model
from qwenjax.model import StepBatch
from qwenjax.pooling import PoolingParams
from qwenjax.sampling import SamplingParams
from tiny import tiny_config, write_hf_checkpoint

VOCAB = 250


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pooling")
    write_hf_checkpoint(tiny_config(vocab_size=VOCAB), directory)
    return load_model(directory, tp=2, dtype="float32")


def _last_hidden(lm, prompt: list[int]) -> np.ndarray:
    """The oracle: the model's hidden states over the prompt alone, on a fresh cache."""
    n = len(prompt)
    cache = KVCache.create(num_layers=lm.config.num_layers, kv_heads=lm.layout.heads.kv_heads,
                           head_dim=lm.config.head_dim, num_pages=16, page_size=16,
                           dtype=jnp.float32, mesh=lm.mesh)
    batch = StepBatch(jnp.asarray([prompt], jnp.int32), jnp.arange(n, dtype=jnp.int32)[None],
                      jnp.asarray([n], jnp.int32), jnp.arange(16, dtype=jnp.int32)[None])
    (hidden,), _ = lm.model.hidden_states(lm.weights, cache, batch)
    return np.asarray(hidden[0, -1], np.float32)


def test_embeddings_equal_the_last_hidden_state_whatever_else_runs(lm):
    engine = Engine(lm, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, prefill_chunk=32,
                                     max_prefill_seqs=2, page_size=8, max_model_len=200, num_pages=64),
                    warm_up=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (1, 5, 70, 33)]
    generating = engine.add_request(prompts[2], SamplingParams(temperature=0.0, max_tokens=12))
    ids = [engine.add_pooling_request(p) for p in prompts]  # chunked, beside a decoding row
    ids.append(engine.add_request(prompts[2], PoolingParams(normalize=False, dimensions=6)))
    outputs = {}
    while engine.has_unfinished():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    for rid, prompt in zip(ids, prompts):
        want = _last_hidden(lm, prompt)
        got = outputs[rid]
        np.testing.assert_allclose(got.embedding, want / np.linalg.norm(want), atol=1e-5)
        assert got.token_ids == [] and got.text == "" and got.finish_reason == "stop"
    np.testing.assert_allclose(outputs[ids[-1]].embedding, _last_hidden(lm, prompts[2])[:6], atol=1e-5)
    assert outputs[ids[-1]].num_cached_tokens > 0  # found the prompt's pages cached, same result
    assert outputs[generating].token_ids == GreedyGenerator(lm).generate([prompts[2]], 12)[0]
    with pytest.raises(ValueError, match="dimensions is 65; the model's embeddings have 64"):
        engine.add_pooling_request([1, 2], PoolingParams(dimensions=65))
    with pytest.raises(ValueError, match="dimensions must be a positive int"):
        PoolingParams(dimensions=0)
    import qwenjax

    assert all(getattr(qwenjax, name) is not None for name in qwenjax.__all__)
    assert qwenjax.PoolingParams is PoolingParams
    engine.check()


def test_llm_and_async_llm_embed(lm):
    import asyncio

    from qwenjax import LLM, AsyncLLM

    prompts = [[5, 6, 7], [9] * 20]
    options = dict(max_model_len=128, max_num_seqs=4, warm_up=False, progress=False)
    sync = LLM(lm, **options)
    outputs = sync.embed(prompts, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for o, prompt in zip(outputs, prompts):
        want = _last_hidden(lm, prompt)
        np.testing.assert_allclose(o.outputs.embedding, want / np.linalg.norm(want), atol=1e-5)
    # LLM.score: cosine similarities, one against each, or pairwise.
    third = [4, 4, 8, 1]
    vectors = [np.asarray(o.outputs.embedding) for o in sync.embed(prompts + [third], use_tqdm=False)]
    one_to_n = sync.score(prompts[0], [prompts[1], third], use_tqdm=False)
    np.testing.assert_allclose([s.outputs.score for s in one_to_n],
                               [vectors[0] @ vectors[1], vectors[0] @ vectors[2]], atol=1e-5)
    assert one_to_n[1].prompt_token_ids == prompts[0] + third
    pairwise = sync.score(prompts, [third, prompts[0]], use_tqdm=False)
    np.testing.assert_allclose([s.outputs.score for s in pairwise],
                               [vectors[0] @ vectors[2], vectors[1] @ vectors[0]], atol=1e-5)
    with pytest.raises(ValueError, match="pairwise"):
        sync.score(prompts, [third] * 3, use_tqdm=False)
    llm = AsyncLLM(lm, **options)

    async def both():
        return await asyncio.gather(*(llm.embed(p) for p in prompts))

    try:
        together = asyncio.run(both())
    finally:
        llm.shutdown()
    for a, b in zip(together, outputs):
        np.testing.assert_allclose(a.outputs.embedding, b.outputs.embedding, atol=1e-6)
