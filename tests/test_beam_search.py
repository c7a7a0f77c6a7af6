"""Beam search: the algorithm on a hand-made distribution (it finds what greedy misses), and
LLM.beam_search through the engine against the same search over the model's exact logits."""
import dataclasses
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.beam_search import BeamSearchParams, beam_search
from tiny import tiny_config, write_hf_checkpoint

EOS = 9


def _table(sequence):
    """Next-token logprobs of a toy model over tokens {1, 2, EOS} after a prompt [0]."""
    after = tuple(sequence[1:])
    table = {(): {1: 0.6, 2: 0.4},           # greedy takes 1 ...
             (1,): {1: 0.3, 2: 0.3, EOS: 0.4},
             (2,): {1: 0.9, 2: 0.05, EOS: 0.05}}  # ... but 2, 1 is likelier (0.36 > 0.24)
    probs = table.get(after, {1: 0.5, 2: 0.3, EOS: 0.2})
    return sorted(((t, math.log(p)) for t, p in probs.items()), key=lambda x: -x[1])


def _toy(sequences, k):
    return [_table(s)[:k] for s in sequences]


def test_beam_search_finds_the_likelier_sequence_greedy_misses():
    [greedy] = beam_search([[0]], BeamSearchParams(beam_width=1, max_tokens=2, length_penalty=0.0),
                           _toy, (EOS,))
    assert greedy.sequences[0].token_ids == [1, EOS]  # greedy: 1 then EOS (0.24)
    # Scores are divided by the length (prompt included, an ending EOS not): [0, 1, 1] scores
    # log(0.18) / 3 > [0, 1, EOS]'s log(0.24) / 2.
    [normalized] = beam_search([[0]], BeamSearchParams(beam_width=1, max_tokens=2), _toy, (EOS,))
    assert normalized.sequences[0].token_ids == [1, 1]
    [out] = beam_search([[0]], BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=0.0),
                        _toy, (EOS,))
    best = out.sequences[0]
    assert best.token_ids == [2, 1] and best.tokens == [0, 2, 1]
    assert math.isclose(best.cum_logprob, math.log(0.36)) and best.finish_reason == "length"
    assert len(out.sequences) == 2
    # An EOS ends a beam ("stop"); ignore_eos keeps it going.
    [stopped] = beam_search([[0]], BeamSearchParams(beam_width=3, max_tokens=3, length_penalty=0.0),
                            _toy, (EOS,))
    assert any(b.finish_reason == "stop" and b.token_ids[-1] == EOS for b in stopped.sequences)
    [free] = beam_search([[0]], BeamSearchParams(beam_width=3, max_tokens=3, ignore_eos=True),
                         _toy, (EOS,))
    assert all(len(b.token_ids) == 3 for b in free.sequences)
    with pytest.raises(ValueError, match=r"beam_width must be an int in \[1, 10\]"):
        BeamSearchParams(beam_width=11, max_tokens=4)
    # vLLM's positional order and its extra fields.
    params = BeamSearchParams(2, 8, False, 0.0, 0.5, include_stop_str_in_output=True)
    assert params.length_penalty == 0.5 and params.temperature == 0.0
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchParams(2, 8, temperature=-1)


def test_llm_beam_search_equals_the_search_over_exact_logits(tmp_path):
    from qwenjax import LLM, SamplingParams
    from test_quantization import _logits

    config = tiny_config(num_layers=2, vocab_size=256)
    write_hf_checkpoint(config, tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=64, max_num_seqs=8, max_prefill_seqs=4,
              prefill_chunk=32, warm_up=False, progress=False)
    prompts = [list(map(int, np.random.default_rng(i).integers(3, 250, 6 + i))) for i in range(2)]
    params = BeamSearchParams(beam_width=3, max_tokens=5)
    got = llm.beam_search(prompts, params)
    lm = llm.lm
    eos = tuple(llm.engine.eos_token_ids)

    def exact(sequences, k):
        out = []
        for s in sequences:
            logits = _logits(lm.layout, lm.mesh, lm.weights, np.asarray([s], np.int32))[0, -1]
            logprobs = np.asarray(jax_log_softmax(logits[: config.vocab_size]))
            top = np.argsort(-logprobs)[:k]
            out.append([(int(t), float(logprobs[t])) for t in top])
        return out

    want = beam_search(prompts, params, exact, eos)
    for g, w in zip(got, want):
        assert [b.tokens for b in g.sequences] == [b.tokens for b in w.sequences]
        np.testing.assert_allclose([b.cum_logprob for b in g.sequences],
                                   [b.cum_logprob for b in w.sequences], rtol=1e-4, atol=1e-4)
    # AsyncLLM runs the same search as concurrent requests on its engine thread.
    import asyncio

    from qwenjax import AsyncLLM

    served = AsyncLLM(llm.lm, max_model_len=64, max_num_seqs=8, max_prefill_seqs=4,
                      prefill_chunk=32, warm_up=False, progress=False)
    try:
        concurrent = asyncio.run(served.beam_search(prompts, params))
    finally:
        served.shutdown()
    assert [[b.tokens for b in o.sequences] for o in concurrent] == \
        [[b.tokens for b in o.sequences] for o in got]
    # Width 1 is greedy decoding (an independent path: the engine's own sampler).
    [one] = llm.beam_search([prompts[0]], BeamSearchParams(beam_width=1, max_tokens=5,
                                                           ignore_eos=True))
    greedy = llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=5,
                                                       ignore_eos=True), use_tqdm=False)[0]
    assert one.sequences[0].token_ids == greedy.token_ids
    with pytest.raises(ValueError, match="over the max context of 64"):
        llm.beam_search([prompts[0]], BeamSearchParams(beam_width=2, max_tokens=60))


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(jnp.asarray(x, jnp.float32))


def test_use_beam_search_over_http_equals_llm_beam_search(tmp_path, real_model_dir, server_loop):
    """vLLM's ``use_beam_search`` on /v1/completions and /v1/chat/completions: n choices, the
    beams LLM.beam_search finds, best first (a tiny model with the real tokenizer)."""
    import json
    import shutil
    import urllib.error
    import urllib.request

    from qwenjax import LLM
    from qwenjax.engine.async_engine import EngineThread
    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax.loading import load_model
    from server_harness import Servers

    write_hf_checkpoint(tiny_config(num_layers=2, vocab_size=256), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_model_dir / name, tmp_path / name)
    options = dict(max_model_len=64, max_num_seqs=8, max_prefill_seqs=4, prefill_chunk=32,
                   decode_buckets=(8,), prefill_buckets=(128,))
    llm = LLM(str(tmp_path), dtype="float32", warm_up=False, progress=False, **options)
    prompt = list(map(int, np.random.default_rng(4).integers(3, 250, 8)))
    [want] = llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=4))
    lm = load_model(tmp_path, dtype="float32")
    # A chat template whose output stays inside the tiny vocabulary (no special tokens).
    lm = dataclasses.replace(lm, tokenizer=lm.tokenizer.with_chat_template(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    thread = EngineThread(Engine(lm, EngineConfig(**options), warm_up=False, progress=False))
    servers = Servers(server_loop, thread, port=0, metrics_port=None, http_port=0)

    def post(path, body):
        request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())["error"]["message"]

    try:
        server = servers.start()
        status, reply = post("/v1/completions", {"prompt": prompt, "max_tokens": 4, "n": 3,
                                                 "use_beam_search": True})
        assert status == 200, reply
        assert [c["text"] for c in reply["choices"]] == [b.text for b in want.sequences]
        assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
        assert reply["usage"]["completion_tokens"] == sum(len(b.token_ids) for b in want.sequences)
        status, reply = post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "!"}], "max_tokens": 3, "n": 2,
            "use_beam_search": True, "length_penalty": 0.5})
        assert status == 200, reply
        chat_ids = lm.tokenizer.encode("!")
        [chat_want] = llm.beam_search([chat_ids], BeamSearchParams(beam_width=2, max_tokens=3,
                                                                  length_penalty=0.5))
        assert [c["message"]["content"] for c in reply["choices"]] == \
            [b.text for b in chat_want.sequences]
        for body, message in (
                ({"prompt": prompt, "use_beam_search": True, "logprobs": 2}, "logprobs does not work"),
                ({"prompt": prompt, "use_beam_search": True, "n": 11}, r"must be an int in \[1, 10\]"),
                ({"prompt": prompt, "length_penalty": 1.0}, "length_penalty needs use_beam_search")):
            status, error = post("/v1/completions", body)
            assert status == 400 and re.search(message, error), error
    finally:
        servers.stop_all()
        thread.shutdown()
