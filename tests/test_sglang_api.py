"""SGLang's native HTTP API (server/sglang_api.py): the request mapping without a model, then
the routes on the real Qwen2.5-Coder-0.5B, checked against the OpenAI API of the same server
(one engine: the same greedy tokens and logprobs)."""
from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import pytest

from server import sglang_api as sg
from server_harness import Servers, http

PROMPT = "def fibonacci(n):"


# --------------------------------------------------------------------------- no model


def test_sampling_params_take_sglangs_names():
    fields = sg.sampling_fields({"max_new_tokens": 7, "min_new_tokens": 2, "top_k": -1,
                                 "no_stop_trim": True, "sampling_seed": 5, "stop": "\n",
                                 "stop_token_ids": [3], "logit_bias": {"12": -5},
                                 "stream_interval": 4, "spaces_between_special_tokens": True,
                                 "stop_regex": r"\d+\."})
    assert fields == {"max_tokens": 7, "min_tokens": 2, "top_k": 0,
                      "include_stop_str_in_output": True, "seed": 5, "stop": ("\n",),
                      "stop_token_ids": (3,), "logit_bias": {12: -5}, "stop_regex": (r"\d+\.",)}
    schema = sg.sampling_fields({"json_schema": '{"type": "object"}'})["structured_outputs"]
    assert schema.json == {"type": "object"}
    grammar = sg.sampling_fields({"ebnf": 'root ::= "yes" | "no"'})["structured_outputs"].grammar
    assert "start" in grammar and '"yes"' in grammar  # GBNF rewritten in llguidance's Lark
    tag = sg.sampling_fields({"structural_tag": json.dumps({
        "structures": [{"begin": "<a>", "schema": {"type": "integer"}, "end": "</a>"}],
        "triggers": ["<a"]})})["structured_outputs"].structural_tag
    assert tag["structures"] == (("<a>", {"type": "integer"}, "</a>"),)


@pytest.mark.parametrize("params, message", [
    ({"stop_regex": [1]}, "stop_regex must be"),
    ({"custom_params": {}}, "custom_params"),
    ({"spaces_between_special_tokens": False}, "only true"),
    ({"regex": "a", "ebnf": "root ::= \"a\""}, "set one of"),
    ({"json_schema": "{not json"}, "sampling_params.json_schema"),
    ({"structural_tag": '{"structures": []}'}, "sampling_params.structural_tag"),
    ({"stop": [1]}, "stop must be"),
])
def test_bad_sampling_params_are_named(params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sg.sampling_fields(params)


@pytest.mark.parametrize("body, message", [
    ({"text": "a", "input_ids": [1]}, "one of text or input_ids"),
    ({}, "one of text or input_ids"),
    ({"text": []}, "non-empty list"),
    ({"input_ids": [[1], []]}, "input_ids must be"),
    ({"text": ["a", "b"], "rid": "x"}, "one rid per prompt"),
    ({"text": ["a", "b"], "rid": ["x", "x"]}, "its own"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "1 entries for 2 prompts"),
    ({"text": "a", "return_hidden_states": 1}, "return_hidden_states must be true or false"),
    ({"text": "a", "input_embeds": [[0.5]]}, "input_embeds"),
    ({"text": "a", "top_logprobs_num": -1}, "top_logprobs_num must be"),
])
def test_bad_generate_requests_are_named(body, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sg.parse_generate(body)


def test_parse_generate_batches_and_logprobs():
    parsed = sg.parse_generate({"input_ids": [[1, 2], [3]], "rid": ["a", "b"],
                                "sampling_params": [{"temperature": 0}, {"n": 2}],
                                "return_logprob": True, "top_logprobs_num": 3,
                                "logprob_start_len": 0})
    assert parsed.batched and parsed.prompts == [[1, 2], [3]] and parsed.rids == ["a", "b"]
    assert parsed.fields == [{"temperature": 0, "logprobs": 3, "prompt_logprobs": 3},
                             {"n": 2, "logprobs": 3, "prompt_logprobs": 3}]
    single = sg.parse_generate({"text": "hi"})
    assert not single.batched and len(single.rids[0]) == 32 and single.fields == [{}]


# --------------------------------------------------------------------------- real model


def test_the_offline_engine_answers_as_sglangs(tmp_path):
    """qwenjax.sglang.Engine, SGLang's sgl.Engine: its argument names, sampling_params, and
    answers (dicts, lists for batches and n > 1, streams, logprobs), on the tiny model."""
    import numpy as np
    from tiny import tiny_config, write_hf_checkpoint

    import qwenjax.sglang as sgl
    from qwenjax import LLM, SamplingParams

    write_hf_checkpoint(tiny_config(), tmp_path)
    engine = sgl.Engine(model_path=str(tmp_path), context_length=64, max_running_requests=4,
                        mem_fraction_static=0.5, random_seed=3, disable_radix_cache=True,
                        log_level="error", dtype="float32", num_pages=32, page_size=8,
                        json_model_override_args='{"rope_theta": 10000.0}', cuda_graph_bs=[2],
                        warm_up=False, progress=False)
    assert engine.llm.engine.max_model_len == 64 and engine.llm.engine.prefix_cache is None
    assert engine.llm.engine.runner.decode_buckets == [0, 2, 4]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 250, n).tolist() for n in (6, 11)]
    want = LLM(engine.llm.lm, max_model_len=64, num_pages=32, page_size=8, warm_up=False,
               progress=False).generate(prompts, SamplingParams(temperature=0.0, max_tokens=5,
                                                                ignore_eos=True), use_tqdm=False)
    greedy = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    one = engine.generate(input_ids=prompts[0], sampling_params=greedy, rid="r1",
                          return_logprob=True, top_logprobs_num=2, logprob_start_len=2)
    assert one["output_ids"] == want[0].token_ids and one["text"] == ""  # (no tokenizer)
    meta = one["meta_info"]
    assert meta["id"] == "r1" and meta["finish_reason"] == {"type": "length", "length": 5}
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (6, 5) and meta["e2e_latency"] > 0
    assert [e[1] for e in meta["output_token_logprobs"]] == want[0].token_ids
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    assert [e[1] for e in meta["input_token_logprobs"]] == prompts[0][2:]
    assert len(meta["input_top_logprobs"]) == 4 and all(len(t) == 2 for t in meta["input_top_logprobs"])
    batch = engine.generate(input_ids=prompts, sampling_params=greedy)
    assert [a["output_ids"] for a in batch] == [w.token_ids for w in want]
    assert "hidden_states" not in batch[0]["meta_info"]
    # return_hidden_states, SGLang's shape: the prompt's rows, then one per generated token but
    # the last (their values against HF's: test_engine.py).
    rows = engine.generate(input_ids=prompts[1], sampling_params=greedy,
                           return_hidden_states=True)["meta_info"]["hidden_states"]
    assert len(rows) == 5 and np.shape(rows[0]) == (11, 64)
    assert all(np.shape(r) == (64,) for r in rows[1:])
    pair = engine.generate(input_ids=prompts[1], sampling_params={"n": 2, "max_new_tokens": 3,
                                                                  "temperature": 1.0})
    assert len(pair) == 2 and all(len(a["output_ids"]) <= 3 for a in pair)
    assert [a["meta_info"]["index"] for a in pair] == [0, 1]
    # The default max_new_tokens is SGLang's 128, cut to the room the prompt leaves.
    assert engine.generate(input_ids=prompts[0], sampling_params={"ignore_eos": True})[
        "meta_info"]["completion_tokens"] == 64 - 6 + 1
    cut = engine.generate(input_ids=prompts[0], sampling_params={"ignore_eos": True,
                                                                 "max_new_tokens": 500})
    assert cut["meta_info"]["finish_reason"] == {"type": "length", "length": 64 - 6 + 1}
    # max_new_tokens 0: the prompt alone, with its logprobs.
    scored = engine.generate(input_ids=prompts[0], sampling_params={"max_new_tokens": 0},
                             return_logprob=True, logprob_start_len=0)
    assert scored["output_ids"] == [] and scored["meta_info"]["completion_tokens"] == 0
    assert len(scored["meta_info"]["input_token_logprobs"]) == 6
    chunks = list(engine.generate(input_ids=prompts[0], sampling_params=greedy, stream=True))
    assert chunks[-1]["output_ids"] == want[0].token_ids and chunks[-1]["meta_info"]["finish_reason"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    for bad, message in (({"max_tokens": 3}, "does not accept the field(s) max_tokens"),
                         ({"temperature": -1}, "temperature")):
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.generate(input_ids=prompts[0], sampling_params=bad)
    with pytest.raises(ValueError, match="one of prompt"):
        engine.generate()
    assert len(engine.encode(input_ids=prompts[0])["embedding"]) == 64
    encoded = asyncio.run(engine.async_encode(input_ids=prompts))
    np.testing.assert_allclose([e["embedding"] for e in encoded],
                               [e["embedding"] for e in engine.encode(input_ids=prompts)], atol=1e-5)
    assert engine.flush_cache() is True
    engine.release_memory_occupation(tags=["kv_cache"])
    assert engine.llm.engine.sleeping
    engine.resume_memory_occupation()
    assert engine.generate(input_ids=prompts[0], sampling_params=greedy)["output_ids"] == want[0].token_ids
    ok, message = engine.update_weights_from_disk(str(tmp_path / "nowhere"))
    assert not ok and "nowhere" in message
    # async_generate: calls made at once share the engine; a stream left early and a cancelled
    # caller abort their requests.
    long = {"max_new_tokens": 40, "ignore_eos": True}

    async def calls():
        single, batch = await asyncio.gather(
            engine.async_generate(input_ids=prompts[0], sampling_params=greedy, rid="a0"),
            engine.async_generate(input_ids=prompts, sampling_params=greedy))
        chunks = [c async for c in await engine.async_generate(
            input_ids=prompts[1], sampling_params=greedy, stream=True)]
        left = await engine.async_generate(input_ids=prompts[0], sampling_params=long, stream=True)
        async for _ in left:
            break
        await left.aclose()
        waiting = asyncio.create_task(engine.async_generate(input_ids=prompts[1],
                                                            sampling_params=long, rid="x"))
        await asyncio.sleep(0)  # (it starts: its rid is taken)
        with pytest.raises(ValueError, match="'x' is already running"):
            await engine.async_generate(input_ids=prompts[0], rid="x")
        waiting.cancel()
        with pytest.raises(ValueError, match="temperature"):
            await engine.async_generate(input_ids=prompts[0], sampling_params={"temperature": -1})
        with pytest.raises(ValueError, match="its own"):
            await engine.async_generate(input_ids=prompts, rid="same")
        # One prompt of a batch refused (no such adapter): the other's request is aborted.
        with pytest.raises(ValueError, match="nope"):
            await engine.async_generate(input_ids=prompts, sampling_params=long,
                                        lora_path=[None, "nope"])
        await asyncio.wait_for(engine._driver.task, 60)
        return single, batch, chunks

    aborted = engine.llm.engine.stats.finished["abort"]
    single, batch, chunks = asyncio.run(calls())
    assert engine.llm.engine.stats.finished["abort"] == aborted + 3
    assert single["output_ids"] == want[0].token_ids and single["meta_info"]["id"] == "a0"
    assert [a["output_ids"] for a in batch] == [w.token_ids for w in want]
    assert chunks[-1]["output_ids"] == want[1].token_ids and len(chunks) == 5
    assert not engine.llm.engine.has_unfinished() and engine.llm.engine.allocator.num_used == 0
    with pytest.raises(TypeError):
        sgl.Engine(model_path=str(tmp_path), not_an_argument=1)
    # SGLang's lora_paths forms.
    assert sgl._lora_paths(["a=/x", "/y", {"lora_name": "c", "lora_path": "/z"}]) == \
        {"a": "/x", "/y": "/y", "c": "/z"}
    assert sgl._lora_paths({"a": "/x"}) == {"a": "/x"} and sgl._lora_paths("b=/w") == {"b": "/w"}
    with pytest.raises(ValueError, match="lora_paths"):
        sgl._lora_paths([{"lora_name": "c"}])


@pytest.fixture(scope="module")
def base(server_loop, served_engine_thread):
    servers = Servers(server_loop, served_engine_thread, port=0, metrics_port=None, http_port=0)
    yield f"http://127.0.0.1:{servers.start().http_port}"
    servers.stop_all()


def _post(base: str, path: str, body=None, method: str = "POST") -> tuple[int, object]:
    return http(base, path, body, method=method)


def _events(response) -> list:
    events = []
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_generate_equals_the_openai_completion(base):
    status, reply = _post(base, "/generate", {"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 10}})
    assert status == 200, reply
    status, completion = _post(base, "/v1/completions", {"prompt": PROMPT, "temperature": 0,
                                                         "max_tokens": 10})
    assert reply["text"] == completion["choices"][0]["text"]
    meta = reply["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 10}
    assert meta["prompt_tokens"] == completion["usage"]["prompt_tokens"]
    assert meta["completion_tokens"] == len(reply["output_ids"]) == 10
    assert len(meta["id"]) == 32 and meta["e2e_latency"] > 0
    _, decoded = _post(base, "/detokenize", {"tokens": reply["output_ids"]})
    assert decoded["prompt"] == reply["text"]

    # A batch of token-id prompts, two greedy samples each: a list, prompt-major.
    _, ids = _post(base, "/tokenize", {"prompt": PROMPT})
    status, replies = _post(base, "/generate", {"input_ids": [ids["tokens"], ids["tokens"][:3]],
                                                "sampling_params": {"temperature": 0, "n": 2,
                                                                    "max_new_tokens": 10}})
    assert status == 200 and len(replies) == 4
    assert [r["text"] for r in replies[:2]] == [reply["text"]] * 2
    assert replies[2]["output_ids"] == replies[3]["output_ids"] != reply["output_ids"]

    # return_hidden_states: the prompt's rows, then one per generated token but the last.
    status, hidden = _post(base, "/generate", {"input_ids": ids["tokens"], "return_hidden_states": True,
                                               "sampling_params": {"temperature": 0, "max_new_tokens": 3}})
    rows = hidden["meta_info"]["hidden_states"]
    assert status == 200 and hidden["output_ids"] == reply["output_ids"][:3]
    assert len(rows) == 3 and [len(r) for r in rows[0]] == [896] * len(ids["tokens"])
    assert [len(r) for r in rows[1:]] == [896, 896] and "hidden_states" not in meta


def test_generate_logprobs_match_the_openai_api(base):
    body = {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 6},
            "return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 0,
            "return_text_in_logprobs": True}
    status, reply = _post(base, "/generate", body)
    assert status == 200, reply
    meta = reply["meta_info"]
    _, completion = _post(base, "/v1/completions", {"prompt": PROMPT, "temperature": 0,
                                                    "max_tokens": 6, "logprobs": 2, "echo": True})
    openai = completion["choices"][0]["logprobs"]
    assert [e[1] for e in meta["output_token_logprobs"]] == reply["output_ids"]
    assert [e[2] for e in meta["output_token_logprobs"]] == openai["tokens"][-6:]
    inputs = meta["input_token_logprobs"]
    assert len(inputs) == meta["prompt_tokens"] and inputs[0][0] is None
    assert meta["input_top_logprobs"][0] is None
    ours = [e[0] for e in inputs[1:] + meta["output_token_logprobs"]]
    assert openai["token_logprobs"][0] is None
    assert ours == pytest.approx(openai["token_logprobs"][1:], abs=1e-3)
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    assert meta["output_top_logprobs"][0][0][1] == reply["output_ids"][0]  # greedy: the top one

    # From a later prompt position on, no texts.
    status, later = _post(base, "/generate", {**body, "logprob_start_len": 2,
                                              "return_text_in_logprobs": False})
    assert later["meta_info"]["input_token_logprobs"] == [[lp, tid, None] for lp, tid, _ in inputs[2:]]
    status, refused = _post(base, "/generate", {**body, "logprob_start_len": 500})
    assert status == 400 and "logprob_start_len" in refused["error"]["message"]


def test_frontend_select_with_max_new_tokens_zero(base):
    """The calls SGLang's frontend (sglang.RuntimeEndpoint) makes for ``sgl.select``: the prefix
    alone with max_new_tokens 0 (no output), then each choice's prompt logprobs from two tokens
    before its end; and /server_info, which it reads. (The frontend itself needs torch to import,
    so its requests are sent here as it sends them.)"""
    prefix = "The capital of France is"
    status, cached = _post(base, "/generate", {"text": prefix, "sampling_params": {"max_new_tokens": 0}})
    assert status == 200, cached
    assert cached["text"] == "" and cached["output_ids"] == []
    meta = cached["meta_info"]
    assert meta["completion_tokens"] == 0 and meta["finish_reason"] == {"type": "length", "length": 0}
    choices = [" Paris.", " London."]
    start = max(meta["prompt_tokens"] - 2, 0)
    status, scored = _post(base, "/generate", {
        "text": [prefix + c for c in choices], "sampling_params": {"max_new_tokens": 0, "temperature": 0},
        "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": start})
    assert status == 200 and len(scored) == 2
    for choice, reply in zip(choices, scored):
        inputs = reply["meta_info"]["input_token_logprobs"]
        assert reply["meta_info"]["output_token_logprobs"] == [] and reply["output_ids"] == []
        assert "".join(text for _, _, text in inputs).endswith(choice)
        # The same logprobs as OpenAI's echo of that text.
        _, echo = _post(base, "/v1/completions", {"prompt": prefix + choice, "max_tokens": 1,
                                                  "temperature": 0, "logprobs": 0, "echo": True})
        want = echo["choices"][0]["logprobs"]["token_logprobs"][start:-1]
        assert [lp for lp, _, _ in inputs] == pytest.approx(want, abs=1e-3)
    paris, london = (sum(lp for lp, _, _ in r["meta_info"]["input_token_logprobs"]) for r in scored)
    assert paris > london
    with urllib.request.urlopen(urllib.request.Request(
            base + "/generate", data=json.dumps({"text": prefix, "stream": True, "sampling_params": {
                "max_new_tokens": 0}}).encode(), headers={"Content-Type": "application/json"})) as response:
        events = _events(response)
    assert events[-1] == "[DONE]" and [e["text"] for e in events[:-1]] == [""]
    status, info = _post(base, "/server_info", method="GET")
    assert status == 200 and set(info) == set(_post(base, "/get_server_info", method="GET")[1])
    status, refused = _post(base, "/generate", {"text": prefix, "sampling_params": {
        "max_new_tokens": 0, "min_new_tokens": 2}})
    assert status == 400 and "min_new_tokens must be 0" in refused["error"]["message"]


def test_generate_streams_cumulative_text_and_constraints(base):
    body = {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 10},
            "stream": True}
    request = urllib.request.Request(base + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        events = _events(response)
    assert events[-1] == "[DONE]" and len(events) > 2
    texts = [e["text"] for e in events[:-1]]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # each chunk: all so far
    _, whole = _post(base, "/generate", {**body, "stream": False})
    assert texts[-1] == whole["text"] and events[-2]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-2])

    _, stopped = _post(base, "/generate", {"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 30, "stop": ["\n"]}})
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": "\n"}
    # stop_regex: the output ends before the first match (the greedy text returns within 30).
    _, whole = _post(base, "/generate", {"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 30}})
    pattern = r"return\s+\w+"
    first = re.search(pattern, whole["text"])
    assert first is not None, whole["text"]
    _, regex_stopped = _post(base, "/generate", {"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 30, "stop_regex": [pattern]}})
    assert regex_stopped["text"] == whole["text"][:first.start()]
    assert regex_stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    _, digits = _post(base, "/generate", {"text": "My lucky number is", "sampling_params": {
        "temperature": 0, "max_new_tokens": 8, "regex": "[0-9]{3}"}})
    assert re.fullmatch("[0-9]{3}", digits["text"]), digits
    _, answer = _post(base, "/generate", {"text": "Is the sky blue? Answer:", "sampling_params": {
        "temperature": 0, "max_new_tokens": 8, "ebnf": 'root ::= "yes" | "no"'}})
    assert answer["text"] in ("yes", "no")


def test_abort_request_ends_a_running_generate(base):
    body = {"text": PROMPT, "rid": "sg-abort-1", "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}}
    request = urllib.request.Request(base + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        first = response.readline()
        while not first.startswith(b"data: "):
            first = response.readline()
        assert _post(base, "/abort_request", {"rid": "sg-abort-1"}) == (200, {"found": True})
        events = [json.loads(first[6:])] + _events(response)
    assert events[-1] == "[DONE]"
    last = events[-2]["meta_info"]
    assert last["finish_reason"]["type"] == "abort" and last["completion_tokens"] < 400
    assert _post(base, "/abort_request", {"rid": "sg-abort-1"}) == (200, {"found": False})
    status, refused = _post(base, "/abort_request", {"rid": ""})
    assert status == 400

    # abort_all: every running request stops (two streams, ids given and not).
    responses = []
    for rid in ("sg-abort-2", None):
        one = {k: v for k, v in body.items() if k != "rid"} | ({"rid": rid} if rid else {})
        responses.append(urllib.request.urlopen(urllib.request.Request(
            base + "/generate", data=json.dumps(one).encode(),
            headers={"Content-Type": "application/json"}), timeout=120))
    try:
        for response in responses:  # both running
            while not response.readline().startswith(b"data: "):
                pass
        status, (load,) = _post(base, "/get_load", method="GET")  # SGLang's router probe
        assert status == 200 and load["dp_rank"] == 0 and load["num_reqs"] == 2, load
        assert load["num_tokens"] >= 2 * len(PROMPT.split()) and load["num_waiting_reqs"] == 0
        assert _post(base, "/abort_request", {"abort_all": True}) == (200, {"found": True})
        for response in responses:
            rest = _events(response)
            assert rest[-1] == "[DONE]" and rest[-2]["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        for response in responses:
            response.close()


def test_info_cache_health_and_encode(base):
    status, info = _post(base, "/get_model_info", method="GET")
    assert status == 200 and info["is_generation"] and info["architectures"] == ["Qwen2ForCausalLM"]
    status, server = _post(base, "/get_server_info", method="GET")
    assert status == 200 and server["tp_size"] == 1 and server["context_length"] == 512
    assert server["max_running_requests"] == 8 and server["max_total_num_tokens"] == 8 * 32 * 16
    assert _post(base, "/flush_cache")[0] == 200
    assert _post(base, "/flush_cache", method="GET")[0] == 200
    status, (load,) = _post(base, "/get_load", method="GET")  # idle, nothing cached
    assert status == 200 and {k: v for k, v in load.items() if k != "ts_tic"} == {
        "dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0, "num_pending_tokens": 0}
    requests = re.compile(r"^qwenjax:requests_total\S* (\S+)$", re.M)

    def served() -> float:  # requests the metrics counted
        return sum(map(float, requests.findall(_post(base, "/metrics", method="GET")[1])))

    before = served()
    assert _post(base, "/health_generate", method="GET")[0] == 200
    assert served() == before  # a probe is not traffic (SGLang keeps its health checks out)

    status, vectors = _post(base, "/encode", {"text": ["hello world", "def f():"]})
    assert status == 200 and len(vectors) == 2
    _, openai = _post(base, "/v1/embeddings", {"input": ["hello world", "def f():"]})
    for ours, theirs in zip(vectors, openai["data"]):
        assert ours["embedding"] == pytest.approx(theirs["embedding"], abs=1e-4)
    status, one = _post(base, "/encode", {"input_ids": [1, 2, 3], "rid": "e1"})
    assert one["meta_info"]["id"] == "e1" and one["meta_info"]["prompt_tokens"] == 3

    status, refused = _post(base, "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 10**6}})
    assert status == 400 and "max context" in refused["error"]["message"]
    status, refused = _post(base, "/generate", {"text": "x", "bogus": 1})
    assert status == 400 and "bogus" in refused["error"]["message"]
