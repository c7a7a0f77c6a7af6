"""Speculative decoding with a draft model (qwenjax/engine/draft_model.py): the served model's
outputs whatever the draft, every draft accepted when the draft is the model itself."""
import numpy as np
import pytest

from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.engine.speculative import SpeculativeConfig
from qwenjax.loading import load_model
from qwenjax.sampling import SamplingParams
from test_engine import ONE_SHAPE, SMALL, VOCAB
from tiny import tiny_config, write_hf_checkpoint


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("draft-target")
    write_hf_checkpoint(tiny_config(vocab_size=VOCAB, max_position_embeddings=1024), directory)
    return directory


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory):
    """A tiny model whose greedy tokens follow the context: its matrices scaled ×4 (at the
    init's scale, every greedy continuation is one token repeated, whatever a cache holds)."""
    from safetensors.numpy import load_file, save_file

    directory = tmp_path_factory.mktemp("draft-lively")
    write_hf_checkpoint(tiny_config(vocab_size=VOCAB, max_position_embeddings=1024), directory)
    path = directory / "model.safetensors"
    weights = {k: v * 4 if v.ndim == 2 else v for k, v in load_file(path).items()}
    save_file(weights, path, metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def other_draft_dir(tmp_path_factory):
    """A smaller model of another shape and seed, over the same vocabulary."""
    directory = tmp_path_factory.mktemp("draft-other")
    write_hf_checkpoint(tiny_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=1,
                                    num_heads=4, num_kv_heads=1, head_dim=8,
                                    max_position_embeddings=1024, tie_word_embeddings=True),
                        directory, seed=7)
    return directory


def _generate(engine, prompts, params, arrivals):
    """{index: output} and the steps taken; ``engine.preemptions``: how many there were."""
    ids, outputs, requests, step = {}, {}, [], 0
    while len(outputs) < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                ids[engine.add_request(prompts[i], params[i])] = i
                requests.append(engine.scheduler.waiting[-1])
        for out in engine.step():
            if out.finished:
                outputs[ids[out.request_id]] = out
        engine.check()
        step += 1
        assert step < 5_000
    engine.preemptions = sum(r.num_preemptions for r in requests)
    return outputs, step


def test_config_picks_the_method_and_names_the_bad_field():
    assert SpeculativeConfig.parse({"model": "d", "num_speculative_tokens": 3}).method == "draft_model"
    assert SpeculativeConfig.parse({"num_speculative_tokens": 3}).method == "ngram"
    for bad, field in (({"method": "draft_model", "num_speculative_tokens": 2}, "needs speculative_config.model"),
                       ({"method": "ngram", "model": "d", "num_speculative_tokens": 2}, "use method 'draft_model'"),
                       ({"model": 3, "num_speculative_tokens": 2}, "speculative_config.model")):
        with pytest.raises(ValueError, match=field):
            SpeculativeConfig.parse(bad)


def test_the_model_as_its_own_draft_has_every_greedy_draft_accepted(lively_dir):
    """The draft cache follows each request through its prompt (caught up with its prefill
    chunks) and its drafts: drafting with the served model itself, greedy
    drafts are all accepted (up to float ties), and the tokens are the plain ones."""
    lm = load_model(lively_dir, tp=1, dtype="float32")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 40, 300, 17)]
    params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)] * 4
    results = {}
    catch_ups_in_proposals = []
    for spec in (None, {"model": str(lively_dir), "num_speculative_tokens": 4}):
        engine = Engine(lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=256, speculative_config=spec), warm_up=False)
        if engine.drafter is not None:  # count the catch-up calls a proposal had to make
            propose = engine.scheduler.drafter

            def counted(batch, propose=propose, drafter=engine.drafter):
                before = drafter.catchup_calls
                proposals = propose(batch)
                catch_ups_in_proposals.append(drafter.catchup_calls - before)
                return proposals

            engine.scheduler.drafter = counted
        results[spec is not None] = (*_generate(engine, prompts, params, [0, 0, 1, 2]), engine)
    (plain, plain_steps, _), (spec, spec_steps, engine) = results.values()
    # The prompts were caught up alongside their prefill chunks, none at a first draft.
    assert engine.drafter.catchup_calls >= 300 // 64 and not any(catch_ups_in_proposals)
    for i in plain:
        assert spec[i].token_ids == plain[i].token_ids, i
    stats = engine.spec_stats
    assert stats.num_accepted_tokens >= 0.95 * stats.num_draft_tokens, stats
    assert spec_steps < plain_steps * 0.6, (spec_steps, plain_steps)
    assert engine.allocator.num_free == 256


def test_sampled_drafts_share_the_samplers_noise(lively_dir, monkeypatch):
    """Sampled requests (temperature, top-k/top-p/min-p, seeded) drafting with the served model
    itself: drawn with the noise the sampler adds at each step, nearly every draft is accepted,
    where greedy drafts of the same requests are mostly refused; the tokens are the plain ones."""
    from qwenjax.engine import draft_model

    lm = load_model(lively_dir, tp=1, dtype="float32")
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (6, 30, 80, 12)]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, seed=i, max_tokens=24,
                             ignore_eos=True)
              for i, (t, k, p, m) in enumerate([(1.0, -1, 1.0, 0.0), (0.8, 40, 1.0, 0.0),
                                                (1.2, -1, 0.9, 0.0), (1.0, -1, 1.0, 0.05)])]
    spec = {"model": str(lively_dir), "num_speculative_tokens": 3}
    runs = {}
    for name in ("plain", "coupled", "greedy drafts"):
        if name == "greedy drafts":  # what drafting was before: the draft's argmax
            monkeypatch.setattr(draft_model, "truncation_settings", lambda p: (0.0, 0, 1.0, 0.0))
        engine = Engine(lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=256,
                                         speculative_config=None if name == "plain" else spec),
                        warm_up=False)
        outputs, _ = _generate(engine, prompts, params, [0, 0, 1, 2])
        runs[name] = outputs, engine.spec_stats
    plain = runs["plain"][0]
    for name in ("coupled", "greedy drafts"):
        for i in plain:
            assert runs[name][0][i].token_ids == plain[i].token_ids, (name, i)
    coupled, greedy = runs["coupled"][1], runs["greedy drafts"][1]
    assert coupled.num_accepted_tokens >= 0.9 * coupled.num_draft_tokens, coupled
    rate = lambda stats: stats.num_accepted_tokens / stats.num_draft_tokens  # noqa: E731
    assert rate(greedy) < rate(coupled) - 0.3, (greedy, coupled)


@pytest.mark.parametrize("tp,draft", [(1, "itself"), (4, "other")])
def test_outputs_do_not_depend_on_the_draft(lively_dir, other_draft_dir, tp, draft):
    """The model itself (its drafts mostly accepted) or another, smaller model drafting: the same tokens, stops and logprobs as plain decoding
    (greedy and seeded sampling, penalties, stop tokens, max_tokens 1–3), through preemption
    (the draft state goes with the pages) and prefix caching."""
    lm = load_model(lively_dir, tp=tp, dtype="float32")
    draft_dir = lively_dir if draft == "itself" else other_draft_dir
    rng = np.random.default_rng(11)
    loop = rng.integers(0, VOCAB, 12).tolist()
    prompts = [loop * 6 + loop[:5]] + [
        (loop * 3 if i % 2 else []) + rng.integers(0, VOCAB, rng.integers(1, 60)).tolist()
        for i in range(7)]
    stops = (7, 70, 140, 214)
    params = [SamplingParams(temperature=0.0 if i % 3 != 1 else 1.0, top_k=30, seed=i,
                             max_tokens=(1, 2, 3)[i - 5] if i >= 5 else 30, stop_token_ids=stops,
                             logprobs=2 if i % 4 == 0 else None,
                             repetition_penalty=1.5 if i == 6 else 1.0)
              for i in range(len(prompts))]
    arrivals = [0] * len(prompts)
    results = {}
    for spec in (None, {"model": str(draft_dir), "num_speculative_tokens": 3}):
        engine = Engine(lm, EngineConfig(**{**SMALL, **ONE_SHAPE, "max_model_len": 128}, num_pages=16,
                                         speculative_config=spec), warm_up=False)
        if engine.drafter is not None:
            engine.drafter.warm_up()  # every draft shape compiles (padding rows write nothing)
        outputs, _ = _generate(engine, prompts, params, arrivals)
        results[spec is not None] = outputs, engine
    (plain, _), (spec, engine) = results.values()
    assert engine.spec_stats.num_drafts > 0 and engine.preemptions > 0
    for i in plain:
        assert spec[i].token_ids == plain[i].token_ids, i
        assert (spec[i].finish_reason, spec[i].matched_stop) == (plain[i].finish_reason, plain[i].matched_stop)
        if params[i].logprobs:
            for got, want in zip(spec[i].logprobs, plain[i].logprobs, strict=True):
                np.testing.assert_allclose(got.logprob, want.logprob, atol=1e-4)
    assert engine.allocator.num_free == 16


def test_a_draft_model_is_refused_with_pipeline_stages(target_dir):
    lm = load_model(target_dir, tp=1, pp=2, dtype="float32")
    with pytest.raises(ValueError, match="needs pp = 1"):
        Engine(lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=64,
                                speculative_config={"model": str(target_dir), "num_speculative_tokens": 2}),
               warm_up=False)
