"""The continuous-batching engine on a tiny float32 model: batching never changes a request's output."""
import contextlib
import os

import jax
import numpy as np
import pytest

from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.greedy import GreedyGenerator
from qwenjax.loading import load_model
from qwenjax.sampling import SamplingParams
from tiny import tiny_config, write_hf_checkpoint

VOCAB = 250
SMALL = dict(max_num_seqs=8, max_num_batched_tokens=128, prefill_chunk=64, max_prefill_seqs=2,
             page_size=8, max_model_len=768)
# For a test that is not about step shapes: one compiled size per part, the largest (3 step
# programs instead of SMALL's 24; compiling them is most of a tiny engine test's time).
ONE_SHAPE = dict(decode_buckets=(8,), prefill_buckets=(128,))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-engine")
    write_hf_checkpoint(tiny_config(vocab_size=VOCAB, max_position_embeddings=1024), directory)
    return directory


@pytest.fixture(scope="module", params=[1, 4])
def tiny_lm(request, tiny_dir):
    return load_model(tiny_dir, tp=request.param, dtype="float32")


def _run(engine, prompts, params, arrivals=None, check=True):
    """Feed prompts at their arrival steps; return {index: output} and the number of preemptions."""
    arrivals = arrivals if arrivals is not None else [0] * len(prompts)
    ids, outputs, requests, step = {}, {}, [], 0
    while len(outputs) < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                p = params[i] if isinstance(params, list) else params
                ids[engine.add_request(prompts[i], p)] = i
                requests.append(engine.scheduler.waiting[-1])
        for out in engine.step():
            if out.finished:
                outputs[ids[out.request_id]] = out
        if check:
            engine.check()
        step += 1
        assert step < 10_000
    return outputs, sum(r.num_preemptions for r in requests)


def test_batch_invariance_with_chunked_prefill_and_preemption(tiny_lm, buckets=None):
    """``buckets``: other step shapes than SMALL's (for test_pipeline.py)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, rng.integers(1, 601)).tolist() for _ in range(16)]
    # 100 pages of 8 tokens: far less than 16 requests × ~300 tokens, so requests get preempted.
    engine = Engine(tiny_lm, EngineConfig(**SMALL, **(buckets or {}), num_pages=100), warm_up=False)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs, preemptions = _run(engine, prompts, params, sorted(rng.integers(0, 40, 16)))
    assert preemptions > 0
    assert engine.allocator.num_free == 100  # every page is back
    reference = GreedyGenerator(tiny_lm)
    for i, prompt in enumerate(prompts):
        assert outputs[i].token_ids == reference.generate([prompt], 24)[0], f"request {i}"
        assert outputs[i].finish_reason == "length"


@contextlib.contextmanager
def count_compilations():
    events = []
    listener = lambda event, duration, **kw: events.append(event) if "compile" in event or "trace" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_no_compilation_after_warm_up(tiny_dir, caplog):
    lm = load_model(tiny_dir, tp=2, dtype="float32")
    with caplog.at_level("INFO", logger="qwenjax.engine.runner"):
        engine = Engine(lm, EngineConfig(**SMALL, decode_buckets=(2,), prefill_buckets=(32,), num_pages=400), warm_up=True, progress=False)
    assert engine.warm_up_seconds > 0
    shapes = len(engine.runner.shapes())
    # Compile progress reaches the log without a terminal (the last line at least).
    assert f"compiled {shapes}/{shapes} step shapes" in caplog.text
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, rng.integers(1, 200)).tolist() for _ in range(200)]
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), top_p=0.9, seed=i,
                             max_tokens=int(rng.integers(1, 12)), ignore_eos=True) for i in range(200)]
    with count_compilations() as events:
        outputs, _ = _run(engine, prompts, params, sorted(rng.integers(0, 300, 200)), check=False)
    assert len(outputs) == 200
    assert events == []


def test_warm_up_compiles_in_parallel_only_what_the_cache_holds_on_accelerators(tiny_dir, tmp_path):
    from qwenjax.engine.compilation import compile_workers, remember_compiled

    lm = load_model(tiny_dir, tp=1, dtype="float32")
    runner = Engine(lm, EngineConfig(**SMALL, num_pages=100), warm_up=False).runner
    lowered = [runner._lower(*shape) for shape in runner.shapes()[:3]]
    cores, cache = os.cpu_count(), str(tmp_path)
    assert compile_workers(lowered, platform="cpu", cache_dir=cache) == cores
    # On a GPU a cold compile autotunes on the device: one program at a time ...
    assert compile_workers(lowered, platform="gpu", cache_dir=cache) == 1
    remember_compiled(lowered[:2], platform="gpu", cache_dir=cache)
    assert compile_workers(lowered, platform="gpu", cache_dir=cache) == 1
    # ... and only a start that finds every program compiled before loads them side by side.
    remember_compiled(lowered, platform="gpu", cache_dir=cache)
    assert compile_workers(lowered, platform="gpu", cache_dir=cache) == cores
    other = load_model(tiny_dir, tp=2, dtype="float32")
    other_runner = Engine(other, EngineConfig(**SMALL, num_pages=100), warm_up=False).runner
    assert compile_workers([other_runner._lower(*runner.shapes()[0])], platform="gpu",
                           cache_dir=cache) == 1


def test_chosen_buckets_are_the_compiled_shapes_and_change_no_output(tiny_dir):
    """decode_buckets / prefill_buckets (vLLM's capture sizes, SGLang's --cuda-graph-bs): the
    step shapes are those sizes and the largest a step holds; outputs are the greedy ones."""
    lm = load_model(tiny_dir, tp=1, dtype="float32")
    engine = Engine(lm, EngineConfig(**SMALL, num_pages=200, decode_buckets=[2],
                                     prefill_buckets=(32, 16)), warm_up=False)
    assert engine.runner.shapes() == [(d, t) for d in (0, 2, 8) for t in (0, 16, 32, 128) if d or t]
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 20, 90, 150, 7)]
    outputs, _ = _run(engine, prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                      arrivals=[0, 0, 1, 4, 9])
    assert set(engine.runner._programs) <= set(engine.runner.shapes())
    reference = GreedyGenerator(lm)
    for i, prompt in enumerate(prompts):
        assert outputs[i].token_ids == reference.generate([prompt], 6)[0], i
    for bad, message in ((dict(decode_buckets=[9]), "decode_buckets: each size must be an int from 1 "
                                                    "to max_num_seqs = 8, got 9"),
                         (dict(prefill_buckets=[0]), "prefill_buckets: each size .* = 128, got 0"),
                         (dict(decode_buckets="8"), "decode_buckets must be a list of sizes")):
        with pytest.raises(ValueError, match=message):
            Engine(lm, EngineConfig(**SMALL, num_pages=200, **bad), warm_up=False)


def test_the_sampler_tables_run_apart_and_give_the_samplers_tokens(tiny_dir):
    """The engine samples in two programs when a row has a table (penalties, logit bias,
    banned ids): the tables' compiled per width, the choice per row count alone. Together:
    the tokens and logprobs of ``sampling.sample`` in one program, with logits vocab-sharded."""
    import dataclasses

    from qwenjax.engine.step_plan import NOT_FED
    from qwenjax.sampling import SamplingRow, build_sampling_batch, sample, without_tables

    engine = Engine(load_model(tiny_dir, tp=2, dtype="float32"),
                    EngineConfig(**SMALL, **ONE_SHAPE, num_pages=100), warm_up=False)
    penalised = SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.5,
                               logit_bias={3: 5.0}, min_tokens=3, ignore_eos=True)
    _run(engine, [[5, 6, 7], [8, 9]], [SamplingParams(temperature=0.0, max_tokens=5), penalised])
    runner = engine.runner
    assert runner._adjusters and all(len(key) == 2 for key in runner._samplers)  # (rows, top)
    rng = np.random.default_rng(6)
    rows = [SamplingRow(dataclasses.replace(penalised, temperature=t, top_p=0.9, seed=i), seed=i,
                        step=i, prompt_ids=rng.integers(0, VOCAB, 20).tolist(),
                        output_ids=rng.integers(0, VOCAB, 5).tolist(), suppress_ids=[2, 7])
            for i, t in enumerate((0.0, 1.0, 0.7))]
    batch = build_sampling_batch(rows + [SamplingRow(SamplingParams(), seed=9, step=0)], 8)
    logits = jax.device_put(rng.normal(size=(8, VOCAB)).astype(np.float32) * 3, runner._logits_sharding)
    unfed = np.full((8,), NOT_FED, np.int32)
    adjusted = runner._adjuster(batch)(logits, batch, runner._prev_ids, unfed)
    got, _ = runner._sampler(batch, 20)(logits, adjusted, without_tables(batch))
    want = jax.jit(sample, static_argnames="num_top")(logits, batch, num_top=20)
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, atol=1e-6)
    # The tables changed the tokens: the sampler without them chooses otherwise.
    plain = runner._sampler(batch, 20)(logits, logits, without_tables(batch))[0]
    assert not np.array_equal(plain.token_ids, got.token_ids)


def test_seeded_sampling_is_independent_of_the_batch(tiny_lm):
    engine = Engine(tiny_lm, EngineConfig(**SMALL, num_pages=400), warm_up=False)
    rng = np.random.default_rng(2)
    target = rng.integers(0, VOCAB, 50).tolist()
    params = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone, _ = _run(engine, [target], params)
    others = [rng.integers(0, VOCAB, rng.integers(5, 300)).tolist() for _ in range(6)]
    noise = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 6
    mixed, _ = _run(engine, others + [target], noise + [params], [0, 0, 1, 2, 3, 5, 2])
    assert mixed[6].token_ids == alone[0].token_ids
    # A different seed gives a different continuation (16 tokens from ~50 candidates each).
    other_seed, _ = _run(engine, [target], SamplingParams(temperature=1.0, top_k=50, seed=99,
                                                          max_tokens=16, ignore_eos=True))
    assert other_seed[0].token_ids != alone[0].token_ids


def test_parallel_sampling_gives_the_seeded_single_sequences(tiny_dir):
    """n = 3: three sequences of one request, each the single-request output of seed + i; abort
    ends all three; the sequence ids never collide with a client's."""
    import dataclasses

    from qwenjax import LLM

    llm = LLM(load_model(tiny_dir, tp=1, dtype="float32"), **SMALL, num_pages=200, warm_up=False,
              progress=False)
    prompt = list(range(3, 40))
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    grouped, other = llm.generate([prompt, [5, 6, 7]], [params, greedy], use_tqdm=False)
    assert [o.index for o in grouped.outputs] == [0, 1, 2] and other.outputs == [other]
    outs = [*grouped.outputs, other]  # (one result per prompt, its sequences as outputs)
    assert len({o.request_id for o in outs[:3]}) == 1 and outs[3].request_id != outs[0].request_id
    singles = llm.generate([prompt] * 3, [dataclasses.replace(params, n=1, seed=7 + i) for i in range(3)],
                           use_tqdm=False)
    assert [o.token_ids for o in outs[:3]] == [o.token_ids for o in singles]
    # Sequences 1 and 2 waited for sequence 0 to compute the prompt: its 4 full pages (37
    # tokens, pages of 8) are computed once, not three times.
    assert [o.num_cached_tokens for o in outs[:3]] == [0, 32, 32]
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3  # three different samples
    assert [(o.finish_reason, len(o.token_ids)) for o in outs] == [("length", 12)] * 3 + [("length", 5)]

    engine = llm.engine
    fresh = list(range(50, 87))  # not in the prefix cache
    rid = engine.add_request(fresh, dataclasses.replace(params, max_tokens=50))
    later = engine.add_request([5, 6, 7], greedy)
    engine.step()
    # Sequences 1 and 2 wait for sequence 0's prompt pages; the request behind them goes first.
    assert [r.request_id for r in engine.scheduler.waiting] == [f"{rid}#1", f"{rid}#2"]
    assert {r.request_id for r in engine.scheduler.running} == {f"{rid}#0", later}
    engine.abort(later)
    assert engine.abort(rid) and engine.allocator.num_used == 0
    ends = [o for o in engine.step() if o.request_id == rid]
    assert sorted(o.index for o in ends) == [0, 1, 2] and {o.finish_reason for o in ends} == {"abort"}
    assert [o.finished for o in ends] == [False, False, True]  # finished: the whole request
    assert not engine.abort(rid) and not engine.has_unfinished()
    engine.add_request([1, 2], greedy, request_id="x#1")
    with pytest.raises(ValueError, match="request_id 'x#1' is already in use"):
        engine.add_request([1, 2], params, request_id="x")
    engine.abort("x#1")
    engine.step()


def test_prompt_logprobs_match_hf_through_chunks_cache_and_batching(tiny_lm, tiny_dir):
    """Scoring (prompt_logprobs): every prompt token's logprob given the tokens before it, equal
    to HF's (float32), whether its position ran in a prefill chunk or as a 1-token chunk among
    the decode rows, and though an equal prompt sits in the prefix cache."""
    import dataclasses

    import transformers

    from tiny import hf_logits

    engine = Engine(tiny_lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=300), warm_up=False)
    rng = np.random.default_rng(7)
    # 64 + 63 tokens fill the step's 128-token budget but one: the third prompt's first chunk is
    # 1 token (a decode row); its other 149 positions come in chunks of 64 over later steps.
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (64, 63, 150)]
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)
    outputs, _ = _run(engine, prompts, scoring)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tiny_dir).float().eval()
    for i, prompt in enumerate(prompts):
        logits = hf_logits(hf, np.asarray([prompt]))[0].astype(np.float64)[:-1]
        top = logits.max(-1, keepdims=True)
        logprobs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        entries = outputs[i].prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None, i
        assert [e.token_id for e in entries[1:]] == prompt[1:]
        np.testing.assert_allclose([e.logprob for e in entries[1:]],
                                   logprobs[np.arange(len(prompt) - 1), prompt[1:]], atol=2e-4)
        assert [[t for t, _ in e.top] for e in entries[1:]] == np.argsort(-logprobs)[:, :3].tolist()
        np.testing.assert_allclose([[v for _, v in e.top] for e in entries[1:]],
                                   -np.sort(-logprobs)[:, :3], atol=2e-4)

    # The third prompt's pages are cached now. Scored again, it is computed again (every position
    # is asked for) and gives the same entries; a plain request still finds the cache.
    again, _ = _run(engine, [prompts[2], prompts[2]],
                    [scoring, SamplingParams(temperature=0.0, max_tokens=1)])
    assert again[0].num_cached_tokens == 0 and again[1].num_cached_tokens == 144
    values = lambda out: [e.logprob for e in out.prompt_logprobs[1:]]  # noqa: E731
    np.testing.assert_allclose(values(again[0]), values(outputs[2]), atol=1e-5)
    assert again[1].prompt_logprobs is None

    # n = 2: sequence 0 carries the prompt's logprobs; a 1-token prompt has only the None entry.
    engine.add_request(prompts[1], dataclasses.replace(scoring, n=2, max_tokens=2), request_id="n2")
    engine.add_request([5], scoring, request_id="one")
    ends = {}
    while engine.has_unfinished():
        ends.update({(o.request_id, o.index): o for o in engine.step() if o.finish_reason})
    np.testing.assert_allclose(values(ends["n2", 0]), values(outputs[1]), atol=1e-5)
    assert ends["n2", 1].prompt_logprobs is None
    assert ends["one", 0].prompt_logprobs == [None]
    engine.check()


def test_hidden_states_equal_hfs_through_chunks_preemption_and_the_prefix_cache(tiny_dir):
    """return_hidden_states: a sequence's last output holds the final-normed hidden state of
    every position fed (its prompt, then each generated token but the last), equal to HF's
    (float32), though prompts run in chunks, requests are preempted and recomputed, and a
    prompt's head sits in the prefix cache."""
    import torch
    import transformers

    lm = load_model(tiny_dir, dtype="float32")
    engine = Engine(lm, EngineConfig(**{**SMALL, **ONE_SHAPE, "max_model_len": 256}, num_pages=32),
                    warm_up=False)  # 256 tokens
    rng = np.random.default_rng(3)
    shared = rng.integers(0, VOCAB, 80).tolist()
    prompts = [shared + rng.integers(0, VOCAB, 70).tolist(), shared + [5],
               rng.integers(0, VOCAB, 150).tolist(), [7]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                             return_hidden_states=i != 3) for i, n in enumerate((20, 12, 20, 5))]
    outputs, preemptions = _run(engine, prompts, params, arrivals=[0, 3, 0, 1])
    assert preemptions > 0
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tiny_dir).float().eval()
    for i in range(3):
        fed = prompts[i] + outputs[i].token_ids[:-1]
        with torch.no_grad():
            hidden = hf.model(torch.tensor([fed])).last_hidden_state[0].numpy()
        assert outputs[i].hidden_states.shape == hidden.shape, i
        np.testing.assert_allclose(outputs[i].hidden_states, hidden, atol=1e-4, err_msg=str(i))
    assert outputs[3].hidden_states is None


def test_bad_word_ids_ban_the_token_that_would_complete_a_word():
    from qwenjax.engine.request import Request

    request = Request("r", [1, 2], SamplingParams(), 0, 0.0, bad_words_ids=((9,), (4, 5, 6), (5, 7)))
    assert request.needs_known_outputs
    assert request.banned_ids() == (9,)  # nothing generated yet: only the 1-token word
    request.output_ids = [3, 4]
    assert request.banned_ids() == (9,)
    request.output_ids = [3, 4, 5]
    assert request.banned_ids() == (9, 6, 7)  # "4 5" then 6, and "5" then 7
    request.output_ids = [5]
    assert request.banned_ids() == (9, 7)
    assert not Request("s", [1], SamplingParams(), 0, 0.0, bad_words_ids=((9,),)).needs_known_outputs


def test_truncate_prompt_tokens_keeps_the_prompts_tail(tiny_lm):
    engine = Engine(tiny_lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=300), warm_up=False)
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, VOCAB, 100).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    import dataclasses

    cut, _ = _run(engine, [prompt], dataclasses.replace(greedy, truncate_prompt_tokens=30))
    tail, _ = _run(engine, [prompt[-30:]], greedy)
    assert cut[0].prompt_token_ids == prompt[-30:] and cut[0].token_ids == tail[0].token_ids
    # -1: as much as the context holds. A prompt over it runs on its last max_model_len tokens
    # (one token left to sample) where it would be refused otherwise.
    long = rng.integers(0, VOCAB, SMALL["max_model_len"] + 50).tolist()
    with pytest.raises(ValueError, match="max context"):
        engine.add_request(long, dataclasses.replace(greedy, max_tokens=1))
    full, _ = _run(engine, [long], dataclasses.replace(greedy, max_tokens=1, truncate_prompt_tokens=-1))
    assert full[0].prompt_token_ids == long[-SMALL["max_model_len"]:] and len(full[0].token_ids) == 1
    # Unset max_tokens is capped to the room the truncated prompt leaves.
    assert engine.sampling_params({"truncate_prompt_tokens": 30}, len(long)).max_tokens == 256


def test_async_scheduling_gives_the_synchronous_outputs(tiny_dir):
    """Step N+1 dispatched before step N is read back: same tokens, stops, logprobs and pages as
    the synchronous engine, through stop tokens (rows thrown away), min_tokens, penalties (the
    token in flight counted on the device), preemption and prefix caching. (One device: every other
    engine test here runs async on 4 devices too.)"""
    tiny_lm = load_model(tiny_dir, tp=1, dtype="float32")
    rng = np.random.default_rng(5)
    shared = rng.integers(0, VOCAB, 40).tolist()
    prompts = [shared + rng.integers(0, VOCAB, rng.integers(1, 200)).tolist() for _ in range(10)]
    stops = (7, 70, 140, 210)  # some requests stop on a token
    # Penalised rows are greedy with strong penalties: leaving out the token in flight would
    # change their argmax within a few tokens.
    params = [SamplingParams(temperature=0.0 if i in (2, 5, 7) else 1.0, top_k=40, seed=i,
                             max_tokens=int(rng.integers(1, 40)),
                             stop_token_ids=stops, min_tokens=2 if i % 3 == 0 else 0,
                             logprobs=2 if i % 4 == 0 else None,
                             repetition_penalty=3.0 if i == 7 else 1.0,
                             frequency_penalty=2.0 if i in (2, 5) else 0.0,
                             presence_penalty=1.0 if i == 5 else 0.0)
              for i in range(len(prompts))]
    arrivals = sorted(rng.integers(0, 12, len(prompts)).tolist())
    results = {}
    for mode in (False, True):
        config = EngineConfig(**{**SMALL, **ONE_SHAPE, "max_model_len": 320}, num_pages=60, async_scheduling=mode)
        engine = Engine(tiny_lm, config, warm_up=False)
        overlapped = []  # per read-back: whether a later step was already dispatched
        collect = engine.runner.collect
        engine.runner.collect = lambda step, e=engine: (
            overlapped.append(e._inflight not in (None, step)), collect(step))[1]
        outputs, preemptions = _run(engine, prompts, params, arrivals)
        assert engine.allocator.num_free == 60 and not engine.has_unfinished()
        results[mode] = outputs, preemptions, sum(overlapped)
    (sync, sync_preempted, sync_overlapped), (fast, fast_preempted, fast_overlapped) = results.values()
    assert sync_overlapped == 0 and fast_overlapped > 10
    assert sync_preempted > 0 and fast_preempted > 0
    assert sum(o.finish_reason == "stop" for o in sync.values()) >= 3
    for i in sync:
        assert fast[i].token_ids == sync[i].token_ids, i
        assert (fast[i].finish_reason, fast[i].matched_stop) == (sync[i].finish_reason, sync[i].matched_stop)
        assert len(fast[i].token_ids) >= params[i].min_tokens
        if params[i].logprobs:  # the batches differ, so the float sums may round differently
            for got, want in zip(fast[i].logprobs, sync[i].logprobs, strict=True):
                assert [t for t, _ in got.top] == [t for t, _ in want.top]
                np.testing.assert_allclose([got.logprob] + [lp for _, lp in got.top],
                                           [want.logprob] + [lp for _, lp in want.top], atol=1e-4)


def test_bad_requests_are_refused_and_the_engine_keeps_serving(tiny_lm):
    engine = Engine(tiny_lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=200), warm_up=False)
    # The good request goes through the bias-table sampler: allowed ids only, one of them forced.
    good = engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                        allowed_token_ids=[5, 9, 11], logit_bias={9: 100}))
    with pytest.raises(ValueError, match="prompt has 800 tokens; max context is 768"):
        engine.add_request([1] * 800, SamplingParams())
    with pytest.raises(ValueError, match=r"prompt has 700 tokens and max_tokens is 100: 800 exceeds"):
        engine.add_request([1] * 700, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match=r"prompt token 1 is 250; token ids must be ints in \[0, 250\)"):
        engine.add_request([1, 250], SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="logit_bias has 250; token ids must be < 250"):
        engine.add_request([1], SamplingParams(logit_bias={3: 1.0, 250: -5.0}))
    with pytest.raises(ValueError, match="allowed_token_ids has 300; token ids must be < 250"):
        engine.add_request([1], SamplingParams(allowed_token_ids=[300]))
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([1], SamplingParams(temperature=-1.0))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], SamplingParams(), request_id=good)
    done = []
    while engine.has_unfinished():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == [good] and done[0].token_ids == [9] * 4


def test_abort_frees_pages_at_once(tiny_lm):
    engine = Engine(tiny_lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=200), warm_up=False)
    rid = engine.add_request(list(range(100)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.allocator.num_used > 0
    assert engine.abort(rid)
    assert engine.allocator.num_used == 0
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "abort"
    assert not engine.abort(rid)


def test_page_table_follows_the_pages_list():
    """Request.page_table: the int32 copy of ``pages`` a step packs, kept up to date as the
    scheduler appends pages, frees them all, or admits with a new list."""
    from qwenjax.engine.request import Request

    request = Request("r", [1], SamplingParams(), 0, 0.0)
    assert request.page_table().tolist() == []
    request.pages += [3, 4]
    assert request.page_table().tolist() == [3, 4]
    request.pages += list(range(40))  # past the copy's room: it grows
    assert request.page_table().tolist() == [3, 4, *range(40)]
    request.pages = [9]  # re-admitted: a new list
    assert request.page_table().tolist() == [9] and request.page_table().dtype == np.int32
    request.pages = []
    request.pages += [7]
    assert request.page_table().tolist() == [7]


def test_each_output_keeps_the_tokens_and_logprobs_it_was_made_with(tiny_dir):
    """Outputs hold O(1) views of the sequence's growing lists, copied when read: an output read
    after later steps still holds what it held when it was made (its deltas so far)."""
    engine = Engine(load_model(tiny_dir, dtype="float32"), EngineConfig(**SMALL, **ONE_SHAPE, num_pages=200),
                    warm_up=False)
    engine.add_request(list(range(20)), SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1))
    outputs = []
    while not (outputs and outputs[-1].finished):
        outputs.extend(engine.step())
    ids, logprobs = [], []
    for out in outputs:  # read only now, after the last step
        ids, logprobs = ids + out.delta_token_ids, logprobs + out.delta_logprobs
        assert out.token_ids == ids and out.logprobs == logprobs
    assert len(ids) == 12 and isinstance(outputs[0].token_ids, list)


def test_a_failing_step_fails_only_its_requests(tiny_lm, monkeypatch):
    engine = Engine(tiny_lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=200), warm_up=False)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = engine.add_request([5, 6, 7], params)
    engine.step()
    real_dispatch = engine.runner.dispatch

    def explode(out):
        monkeypatch.setattr(engine.runner, "dispatch", real_dispatch)
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.runner, "dispatch", explode)
    (failed,) = [o for o in engine.step() if o.finished]  # after the token of the step before
    assert failed.request_id == first and failed.finish_reason == "error"
    assert "injected fault" in failed.error
    assert engine.allocator.num_used == 0
    later = engine.add_request([5, 6, 7], params)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert outs[0].request_id == later and len(outs[0].token_ids) == 6


def test_engine_thread_refuses_a_live_request_id(tiny_dir):
    import asyncio

    from qwenjax.engine.async_engine import EngineThread

    lm = load_model(tiny_dir, tp=1, dtype="float32")
    thread = EngineThread(Engine(lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=200), warm_up=False))
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)

    async def consume(prompt):
        return [out async for out in thread.generate(prompt, params, "same-id")][-1]

    async def main():
        first = asyncio.create_task(consume([1, 2, 3]))
        await asyncio.sleep(0.05)
        with pytest.raises(ValueError, match="'same-id' is already in use"):
            await consume([4, 5, 6])
        return await asyncio.wait_for(first, 60)

    try:
        last = asyncio.run(main())
        assert last.finished and len(last.token_ids) == 30  # the first client still gets its answer
    finally:
        thread.shutdown()


def test_ngram_drafts_take_the_latest_longest_match():
    from qwenjax.engine.speculative import propose_ngram

    tokens = [5, 6, 7, 1, 5, 6, 7, 2, 3, 9, 5, 6, 7]
    assert propose_ngram(tokens, 3, 2, 4) == [2, 3, 9]   # "5 6 7" last seen before "2 3 9"
    assert propose_ngram(tokens, 1, 2, 4) == [2]
    assert propose_ngram([1, 2, 3, 4], 3, 1, 4) == []   # nothing repeats
    assert propose_ngram([4, 8, 4], 5, 1, 2) == [8, 4]  # a 1-gram, the draft runs to the end
    assert propose_ngram([4, 8, 4], 5, 2, 2) == []
    assert propose_ngram([7, 7, 7, 7], 3, 2, 3) == [7]  # the match may overlap the suffix


def test_ngram_index_proposes_what_a_search_of_the_whole_context_does():
    from qwenjax.engine.speculative import NgramIndex, propose_ngram

    rng = np.random.default_rng(2)
    for min_n, max_n in ((1, 3), (2, 4), (3, 3)):
        index, tokens = NgramIndex(min_n, max_n), []
        for _ in range(200):  # a sequence growing by 1-5 tokens a step, from a small alphabet
            tokens += rng.integers(0, 6, rng.integers(1, 6)).tolist()
            index.tokens = list(tokens)
            k = int(rng.integers(0, 6))
            assert index.propose(k) == propose_ngram(tokens, k, min_n, max_n), (len(tokens), k)


def test_speculative_config_names_the_bad_field():
    from qwenjax.engine.speculative import SpeculativeConfig

    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3}).prompt_lookup_max == 4
    for bad, field in (({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
                       ({"num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min"),
                       ({"num_speculative_tokens": 2, "draft_model": "x"}, "unknown keys"),
                       ({"method": "ngram"}, "num_speculative_tokens")):
        with pytest.raises(ValueError, match=field):
            SpeculativeConfig.parse(bad)


def test_speculative_decoding_gives_the_plain_outputs(tiny_dir):
    """N-gram drafts checked in one step: the same tokens, stops and logprobs as plain decoding
    (greedy, seeded sampling, penalties, min_tokens, stop tokens, max_tokens of 1–3), through
    preemption and prefix caching, with drafts accepted and fewer steps for a repetitive text.
    At tp = 1: the check at tp = 4 is test_draft_model.py's (the same verification step)."""
    tiny_lm = load_model(tiny_dir, tp=1, dtype="float32")
    rng = np.random.default_rng(11)
    loop = rng.integers(0, VOCAB, 12).tolist()
    prompts = [loop * 6 + loop[:5]] + [
        (loop * 3 if i % 2 else []) + rng.integers(0, VOCAB, rng.integers(1, 90)).tolist()
        for i in range(9)]
    stops = (7, 70, 140, 214)
    params = [SamplingParams(temperature=0.0 if i % 3 != 1 else 1.0, top_k=30, seed=i,
                             max_tokens=(1, 2, 3)[i] if i < 3 else 30, stop_token_ids=stops,
                             min_tokens=3 if i == 5 else 0, logprobs=2 if i % 4 == 0 else None,
                             repetition_penalty=1.5 if i == 6 else 1.0,
                             frequency_penalty=0.5 if i == 8 else 0.0)
              for i in range(len(prompts))]
    params[0] = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=2)
    arrivals = sorted(rng.integers(0, 8, len(prompts)).tolist())
    results = {}
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}):
        config = EngineConfig(**{**SMALL, **ONE_SHAPE, "max_model_len": 256}, num_pages=32, speculative_config=spec)
        engine = Engine(tiny_lm, config, warm_up=False)
        outputs, preemptions = _run(engine, prompts, params, arrivals)
        assert engine.allocator.num_free == 32 and not engine.has_unfinished()
        _, steps = engine.add_request(prompts[0], params[0]), 0  # alone (its prompt is cached)
        while engine.has_unfinished():
            engine.step()
            steps += 1
        results[spec is not None] = outputs, preemptions, engine.spec_stats, steps
    (plain, plain_preempted, _, plain_steps), (spec, spec_preempted, stats, spec_steps) = results.values()
    assert plain_preempted > 0 and spec_preempted > 0
    assert stats.num_accepted_tokens > 20 and 0 < stats.acceptance_rate <= 1
    assert spec_steps < plain_steps * 0.6, (spec_steps, plain_steps)
    assert sum(o.finish_reason == "stop" for o in plain.values()) >= 2
    for i in plain:
        assert spec[i].token_ids == plain[i].token_ids, i
        assert (spec[i].finish_reason, spec[i].matched_stop) == (plain[i].finish_reason, plain[i].matched_stop)
        if params[i].logprobs:
            for got, want in zip(spec[i].logprobs, plain[i].logprobs, strict=True):
                assert [t for t, _ in got.top] == [t for t, _ in want.top]
                np.testing.assert_allclose([got.logprob] + [lp for _, lp in got.top],
                                           [want.logprob] + [lp for _, lp in want.top], atol=1e-4)


def test_speculation_pauses_while_more_requests_run_than_disable_by_batch_size(tiny_dir):
    lm = load_model(tiny_dir, tp=1, dtype="float32")
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "disable_by_batch_size": 2}
    engine = Engine(lm, EngineConfig(**SMALL, **ONE_SHAPE, speculative_config=spec), warm_up=False)
    schedule, seen = engine.scheduler.schedule, []

    def watched():  # per step: requests running, and how many of them draft
        out = schedule()
        seen.append((len(engine.scheduler.running), sum(bool(c.draft) for c in out.prefill)))
        return out

    engine.scheduler.schedule = watched
    overlapped, collect = [], engine.runner.collect  # per read-back: a later step dispatched?
    engine.runner.collect = lambda step: (overlapped.append(engine._inflight not in (None, step)),
                                          collect(step))[1]
    prompt = [5, 9, 3, 7] * 8
    outputs = {}
    for max_tokens in (4, 6, 24, 24):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    while engine.has_unfinished():
        outputs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    busy = [drafts for running, drafts in seen if running > 2]
    assert busy and not any(busy)
    assert sum(overlapped) >= 2  # paused, the steps overlap again (async scheduling)
    assert sum(drafts for running, drafts in seen if running <= 2) > 0
    assert engine.spec_stats.num_drafts > 0
    plain = GreedyGenerator(lm).generate([prompt], 24)[0]
    assert [len(t) for t in outputs.values()] == [4, 6, 24, 24]
    assert all(t == plain[: len(t)] for t in outputs.values())


class _EvenTokens:
    """A stand-in grammar (the engine's Matcher interface) over the tiny vocabulary: even
    token ids only, complete after ``length`` tokens."""

    def __init__(self, length: int = 20):
        self.length, self.taken = length, 0
        self.mask = np.zeros(-(-VOCAB // 32), np.int32)
        for t in range(0, VOCAB, 2):
            self.mask[t // 32] |= np.int32(1 << (t % 32)) if t % 32 < 31 else np.int32(-2**31)

    def bitmask(self):
        return self.mask.copy()

    def copy(self):
        return _EvenTokens(self.length)

    def advance(self, token):
        self.taken += 1
        return token % 2 == 0

    @property
    def done(self):
        return self.taken >= self.length

    error = "odd token"

    def accepted_prefix(self, tokens):
        n = 0
        while n < len(tokens) and tokens[n] % 2 == 0 and self.taken + n < self.length:
            n += 1
        return n

    def draft_bitmasks(self, draft):
        return np.stack([self.mask] * (len(draft) + 1))


def test_speculative_decoding_under_a_grammar_gives_the_plain_outputs(tiny_dir, monkeypatch):
    from qwenjax.structured import Matcher

    monkeypatch.setattr(Matcher, "bitmasks", staticmethod(lambda ms: np.stack([m.bitmask() for m in ms])))
    lm = load_model(tiny_dir, tp=1, dtype="float32")
    rng = np.random.default_rng(3)
    loop = (2 * rng.integers(0, VOCAB // 2, 6)).tolist()
    prompts = [loop * 5, loop * 3 + rng.integers(0, VOCAB, 20).tolist(), rng.integers(0, VOCAB, 30).tolist()]
    params = [SamplingParams(temperature=0.0, max_tokens=40),
              SamplingParams(temperature=1.0, seed=4, max_tokens=40),
              SamplingParams(temperature=0.0, max_tokens=40, logprobs=1)]
    results = {}
    for spec in (None, {"num_speculative_tokens": 4, "prompt_lookup_min": 1}):
        engine = Engine(lm, EngineConfig(**SMALL, **ONE_SHAPE, speculative_config=spec), warm_up=False)
        monkeypatch.setattr(engine, "_matcher", lambda params: _EvenTokens())
        results[spec is not None] = _run(engine, prompts, params)[0], engine.spec_stats
    (plain, _), (spec, stats) = results.values()
    assert stats.num_accepted_tokens > 5
    for i in plain:
        assert spec[i].token_ids == plain[i].token_ids, i
        assert len(plain[i].token_ids) == 20 and plain[i].finish_reason == "stop"
        assert all(t % 2 == 0 for t in plain[i].token_ids)


def test_priority_scheduling_admits_and_keeps_the_lowest_values_first(tiny_dir):
    lm = load_model(tiny_dir, tp=1, dtype="float32")
    config = EngineConfig(**{**SMALL, **ONE_SHAPE, "max_num_seqs": 2, "decode_buckets": (2,),
                             "max_model_len": 256}, num_pages=40, scheduling_policy="priority")
    engine = Engine(lm, config, warm_up=False)
    preempted, preempt = [], engine.scheduler._preempt

    def watched(request):  # the victim, and the priorities of those it left running
        preempted.append((request.priority, [r.priority for r in engine.scheduler.running if r is not request]))
        preempt(request)

    engine.scheduler._preempt = watched
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, VOCAB, 150).tolist() for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ranks = {engine.add_request(p, params, priority=rank): rank for p, rank in zip(prompts, (5, 4, 3, 2, 1, 0))}
    finished_at, outputs, step = {}, {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished_at[ranks[out.request_id]] = step
                outputs[ranks[out.request_id]] = out.token_ids
        engine.check()
        step += 1
    # Admitted two at a time in priority order (the last added first), so they end in that order.
    assert [finished_at[r] for r in range(6)] == sorted(finished_at.values())
    assert finished_at[1] < finished_at[2] and finished_at[3] < finished_at[4]
    assert preempted and all(rank >= max(others, default=rank) for rank, others in preempted)
    victims = {rank for rank, _ in preempted}
    reference = GreedyGenerator(lm).generate([prompts[5 - r] for r in sorted(victims)], 40)
    for rank, want in zip(sorted(victims), reference):  # recomputed after preemption: unchanged
        assert outputs[rank] == want, rank

    fcfs = Engine(lm, EngineConfig(**SMALL), warm_up=False)
    with pytest.raises(ValueError, match="priority is 3.*scheduling_policy='priority'"):
        fcfs.add_request([1, 2, 3], params, priority=3)
    with pytest.raises(ValueError, match="scheduling_policy must be"):
        Engine(lm, EngineConfig(**SMALL, scheduling_policy="lifo"), warm_up=False)


def test_outputs_waiting_for_a_slow_consumer_are_taken_as_one():
    """EngineThread: several outputs of a sequence queued before its consumer came back merge
    into one with both deltas and the later state; other sequences and errors stay apart."""
    from qwenjax.engine.async_engine import _coalesced
    from qwenjax.engine.request import RequestOutput, TokenLogprob

    def out(ids, index=0, finish=None, lps=None):
        return RequestOutput("r", [1], "x" * len(ids), list(ids), f"<{ids[-1]}>", ids[-1:],
                             finish is not None, finish, delta_logprobs=lps, index=index)

    a = out([5], lps=[TokenLogprob(5, -0.1, [])])
    b = out([5, 6], lps=[TokenLogprob(6, -0.2, [])])
    c = out([5, 6, 7], finish="length")
    other = out([9], index=1)
    error = ValueError("boom")
    merged = _coalesced([a, b, other, c, error])
    assert len(merged) == 4 and merged[-1] is error
    first = merged[0]
    assert first.delta_token_ids == [5, 6] and first.token_ids == [5, 6]
    assert [lp.token_id for lp in first.delta_logprobs] == [5, 6] and first.delta_text == "<5><6>"
    assert merged[1] is other and merged[2] is c  # not merged across another sequence
    (done,) = _coalesced([b, c])
    assert done.finish_reason == "length" and done.delta_token_ids == [6, 7] and done.finished


def test_a_data_parallel_mesh_is_refused_with_the_way_out(tiny_dir):
    """A dp axis would run every replica on the same batch: refused, naming what to do."""
    from qwenjax.parallel import make_mesh

    lm = load_model(tiny_dir, dtype="float32", mesh=make_mesh(tp=2, dp=2))
    with pytest.raises(ValueError, match="the mesh has dp=2: one engine serves one replica"):
        Engine(lm, EngineConfig(max_model_len=64, num_pages=16), warm_up=False, progress=False)


def test_engine_seed_makes_unseeded_sampling_repeatable(tiny_dir):
    """EngineConfig.seed (vLLM's --seed): requests without a seed draw theirs from it, so the
    same requests sample the same tokens in a new engine; without it, each engine draws anew."""
    lm = load_model(tiny_dir, tp=1, dtype="float32")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, VOCAB, 9).tolist() for _ in range(3)]
    params = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)] * 3

    def tokens(seed):
        engine = Engine(lm, EngineConfig(**SMALL, **ONE_SHAPE, num_pages=128, seed=seed), warm_up=False)
        outputs, _ = _run(engine, prompts, params)
        return [outputs[i].token_ids for i in range(len(prompts))]

    assert tokens(7) == tokens(7) != tokens(8)
    assert tokens(None) != tokens(None)
    with pytest.raises(ValueError, match="seed must be an int"):
        Engine(lm, EngineConfig(**SMALL, num_pages=128, seed="7"), warm_up=False)


def test_max_model_len_auto_fits_the_kv_cache(tiny_dir):
    """max_model_len -1 (vLLM's auto): the model's max context, lowered to what the pages hold;
    a fixed max_model_len that does not fit is still refused, naming the way out."""
    lm = load_model(tiny_dir, tp=1, dtype="float32")
    assert lm.config.max_context > 16 * 8
    engine = Engine(lm, EngineConfig(max_model_len=-1, num_pages=16, page_size=8), warm_up=False,
                    progress=False)
    assert engine.max_model_len == 128 and engine.context_room(100) == 29
    roomy = Engine(lm, EngineConfig(max_model_len=-1, num_pages=lm.config.max_context), warm_up=False,
                   progress=False)
    assert roomy.max_model_len == lm.config.max_context
    with pytest.raises(ValueError, match="lower max_model_len or add pages"):
        Engine(lm, EngineConfig(max_model_len=256, num_pages=16, page_size=8), warm_up=False,
               progress=False)
