"""Embeddings (qwenjax/pooling.py, Engine.add_pooling_request, LLM.embed/encode): the
final-normed hidden state of each prompt's last token, batched with generating requests, through
chunked prefill and the prefix cache; MEAN and CLS pooling, every token's or each step tag's
(token_embed), through preemption; /v1/embeddings is tested in test_server_openai.py."""
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


def _hidden(lm, prompt: list[int]) -> np.ndarray:
    """The oracle: the model's hidden states over the prompt alone, on a fresh cache."""
    n = len(prompt)
    cache = KVCache.create(num_layers=lm.config.num_layers, kv_heads=lm.layout.heads.kv_heads,
                           head_dim=lm.config.head_dim, num_pages=16, page_size=16,
                           dtype=jnp.float32, mesh=lm.mesh)
    batch = StepBatch(jnp.asarray([prompt], jnp.int32), jnp.arange(n, dtype=jnp.int32)[None],
                      jnp.asarray([n], jnp.int32), jnp.arange(16, dtype=jnp.int32)[None])
    (hidden,), _ = lm.model.hidden_states(lm.weights, cache, batch)
    return np.asarray(hidden[0], np.float32)


def _last_hidden(lm, prompt: list[int]) -> np.ndarray:
    return _hidden(lm, prompt)[-1]


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
    again = sync.embed(prompts + [third], use_tqdm=False)
    # vLLM's PoolingRequestOutput fields: finished, and the prompt tokens the prefix cache gave
    # (the 20-token prompt's first page of 16, the second time).
    assert [o.num_cached_tokens for o in outputs] == [0, 0] and all(o.finished for o in outputs)
    assert [o.num_cached_tokens for o in again] == [0, 16, 0] and all(o.finished for o in again)
    vectors = [np.asarray(o.outputs.embedding) for o in again]
    one_to_n = sync.score(prompts[0], [prompts[1], third], use_tqdm=False)
    np.testing.assert_allclose([s.outputs.score for s in one_to_n],
                               [vectors[0] @ vectors[1], vectors[0] @ vectors[2]], atol=1e-5)
    assert one_to_n[1].prompt_token_ids == prompts[0] + third
    assert all(s.finished for s in one_to_n) and one_to_n[0].num_cached_tokens == 16
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


def _run(engine) -> dict:
    outputs = {}
    while engine.has_unfinished():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    return outputs


@pytest.mark.parametrize("pooling_type", ["MEAN", "CLS"])
def test_pooling_types_and_token_embeddings(lm, pooling_type):
    """The model's pooling type (--pooler-config) for embed, and token_embed's rows (every
    prompt token, or those equal to a step tag), chunked beside a generating request; the
    prompt is computed again for them rather than found in the prefix cache."""
    engine = Engine(lm, EngineConfig(max_num_seqs=6, max_num_batched_tokens=32, prefill_chunk=16,
                                     max_prefill_seqs=2, page_size=8, max_model_len=200,
                                     num_pages=64, pooler_config={"pooling_type": pooling_type}),
                    warm_up=False)
    assert engine.pooler.seq_pooling_type == pooling_type
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (1, 37, 70)]
    tag = prompts[2][5]
    engine.add_request(prompts[2], SamplingParams(temperature=0.0, max_tokens=8))
    _run(engine)  # prompts[2]'s pages are now cached
    generating = engine.add_request(prompts[1], SamplingParams(temperature=0.0, max_tokens=10))
    ids = [engine.add_pooling_request(p, PoolingParams(normalize=False)) for p in prompts]
    every = engine.add_pooling_request(prompts[2], PoolingParams(task="token_embed", normalize=False))
    steps = engine.add_pooling_request(prompts[2], PoolingParams(task="token_embed", step_tag_id=tag,
                                                                 dimensions=8))
    none = engine.add_pooling_request(prompts[1][:5], PoolingParams(task="token_embed",
                                                                    step_tag_id=VOCAB + 1))
    last = engine.add_pooling_request(prompts[2], PoolingParams(task="embed", normalize=False))
    outputs = _run(engine)
    for rid, prompt in zip(ids, prompts):
        hidden = _hidden(lm, prompt)
        want = hidden.mean(axis=0) if pooling_type == "MEAN" else hidden[0]
        np.testing.assert_allclose(outputs[rid].embedding, want, atol=2e-5)
        assert outputs[rid].num_cached_tokens == 0
    hidden = _hidden(lm, prompts[2])
    np.testing.assert_allclose(outputs[every].embedding, hidden, atol=2e-5)
    assert outputs[every].num_cached_tokens == 0
    tagged = hidden[np.asarray(prompts[2]) == tag][:, :8]
    assert len(tagged) >= 1
    np.testing.assert_allclose(outputs[steps].embedding,
                               tagged / np.linalg.norm(tagged, axis=1, keepdims=True), atol=2e-5)
    assert outputs[none].embedding == []
    # The model's pooling type applies to sequence tasks only: the same type again.
    np.testing.assert_allclose(outputs[last].embedding, outputs[ids[2]].embedding, atol=2e-5)
    assert outputs[generating].token_ids == GreedyGenerator(lm).generate([prompts[1]], 10)[0]
    engine.check()


def test_token_pooling_survives_preemption(lm):
    """A MEAN request and a token_embed request preempted mid-prompt compute it again from the
    start: each position is pooled once."""
    engine = Engine(lm, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, prefill_chunk=8,
                                     max_prefill_seqs=2, page_size=8, max_model_len=96,
                                     num_pages=12, async_scheduling=False,
                                     pooler_config={"pooling_type": "MEAN"}), warm_up=False)
    rng = np.random.default_rng(2)
    long, mean_prompt, token_prompt = (rng.integers(3, VOCAB, n).tolist() for n in (30, 60, 30))
    generating = engine.add_request(long, SamplingParams(temperature=0.0, max_tokens=65,
                                                         ignore_eos=True))
    mean = engine.add_pooling_request(mean_prompt, PoolingParams(normalize=False))
    tokens = engine.add_pooling_request(token_prompt, PoolingParams(task="token_embed",
                                                                    normalize=False))
    pooling = [engine._requests[mean], engine._requests[tokens]]
    outputs = _run(engine)
    assert sum(r.num_preemptions for r in pooling) >= 1  # (the generating one is the oldest)
    np.testing.assert_allclose(outputs[mean].embedding, _hidden(lm, mean_prompt).mean(axis=0),
                               atol=2e-5)
    np.testing.assert_allclose(outputs[tokens].embedding, _hidden(lm, token_prompt), atol=2e-5)
    assert len(outputs[generating].token_ids) == 65
    engine.check()


def test_pooler_config():
    from qwenjax.pooling import PRM_STEP_TAG_ID, PoolerConfig, PoolState

    assert PoolerConfig().override('{"pooling_type": "mean"}').seq_pooling_type == "MEAN"
    config = PoolerConfig().override({"pooling_type": "STEP", "step_tag_id": 9, "normalize": False})
    assert (config.tok_pooling_type, config.step_tag_id, config.normalize) == ("STEP", 9, False)
    assert PoolingParams(task="token_embed").rows(config, None) == ("STEP", 9)
    assert PoolingParams(task="token_embed", step_tag_id=4).rows(PoolerConfig(), None) == ("STEP", 4)
    assert PoolingParams(task="reward").rows(PoolerConfig.for_checkpoint(None, "process_reward"),
                                             "process_reward") == ("STEP", PRM_STEP_TAG_ID)
    for bad, message in (({"pooling_type": "MAX"}, "pooling_type must be one of LAST, MEAN, CLS"),
                         ({"pooling_type": "STEP"}, "STEP needs step_tag_id"),
                         ({"softmax": True}, "unknown field.* softmax"),
                         ("{", "not JSON"), ({"step_tag_id": -1}, "step_tag_id must be a token id")):
        with pytest.raises(ValueError, match=message):
            PoolerConfig().override(bad)
    with pytest.raises(ValueError, match="MEAN pooling gives embeddings"):
        PoolingParams(task="classify").check(64, "classify", PoolerConfig(seq_pooling_type="MEAN"))
    with pytest.raises(ValueError, match="task 'token_classify' needs a checkpoint"):
        PoolingParams(task="token_classify").check(64, None)
    # A position is pooled once, however often its chunk is computed (preemption).
    state = PoolState("ALL", None, list(range(20)))
    assert state.take(0, 8) == list(range(8)) and state.take(0, 8) == [] and state.take(8, 12) == [8, 9, 10, 11]
    assert state.cacheable == 12
    state = PoolState("CLS", None, [5] * 20)
    assert state.cacheable == 0 and state.take(0, 8) == [0] and state.cacheable == 20
    state = PoolState("STEP", 7, [1, 7, 2, 7, 7])
    assert state.take(0, 3) == [1] and state.take(3, 5) == [3, 4]


def test_sentence_transformers_pooling_mode_is_read(tmp_path):
    import json

    from qwenjax.pooling import PoolerConfig

    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_lasttoken": False}))
    assert PoolerConfig.for_checkpoint(tmp_path, None).seq_pooling_type == "MEAN"
    assert PoolerConfig.for_checkpoint(tmp_path / "nothing", None) == PoolerConfig()


def test_llm_encode(lm):
    from qwenjax import LLM

    llm = LLM(lm, max_model_len=128, max_num_seqs=4, warm_up=False, progress=False,
              pooler_config={"pooling_type": "MEAN"})
    prompt = [5, 6, 7, 5, 9]
    every, = llm.encode([prompt], pooling_task="token_embed", use_tqdm=False)
    hidden = _hidden(lm, prompt)
    np.testing.assert_allclose(every.outputs.data,
                               hidden / np.linalg.norm(hidden, axis=1, keepdims=True), atol=2e-5)
    mean, = llm.encode(prompt, use_tqdm=False)  # the model's own task: embed, MEAN pooled
    want = hidden.mean(axis=0)
    np.testing.assert_allclose(mean.outputs.data, want / np.linalg.norm(want), atol=2e-5)
    with pytest.raises(ValueError, match="task must be one of"):
        llm.encode(prompt, pooling_task="mean", use_tqdm=False)
    # truncate_prompt_tokens (vLLM's): the prompt's last k tokens, -1 the max context.
    long = [5, 6, 7] * 60  # 180 tokens: over max_model_len 128
    last, = llm.embed([long], truncate_prompt_tokens=4, use_tqdm=False)
    assert last.prompt_token_ids == long[-4:]
    want = _hidden(lm, long[-4:]).mean(axis=0)
    np.testing.assert_allclose(last.outputs.embedding, want / np.linalg.norm(want), atol=2e-5)
    assert len(llm.embed([long], PoolingParams(truncate_prompt_tokens=-1), use_tqdm=False)[0]
               .prompt_token_ids) == 128
    with pytest.raises(ValueError, match="prompt has 180 tokens; max context is 128"):
        llm.embed([long], use_tqdm=False)
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be None, -1"):
        PoolingParams(truncate_prompt_tokens=0)
    # LLM.score takes it too (vLLM's): each text's last k tokens are embedded.
    other = [7, 8] * 70  # 140 tokens
    with pytest.raises(ValueError, match="prompt has 180 tokens; max context is 128"):
        llm.score(long, other, use_tqdm=False)
    pair, = llm.score(long, other, truncate_prompt_tokens=4, use_tqdm=False)
    assert pair.prompt_token_ids == long[-4:] + other[-4:]
    a, b = (np.asarray(llm.embed([p[-4:]], use_tqdm=False)[0].outputs.embedding) for p in (long, other))
    assert pair.outputs.score == pytest.approx(float(a @ b), abs=1e-5) and pair.finished
