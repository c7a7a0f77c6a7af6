"""The OpenAI-compatible HTTP API, driven by the official ``openai`` client over loopback, on the
real Qwen2.5-Coder-0.5B (the engine conftest's session fixtures share with test_server.py).

Greedy outputs are compared with the gRPC API of the same server: both go through one engine,
so the HTTP layer must neither lose nor change a token. The request/response mapping and the
tool-call streaming are also tested without a model (``server.openai_protocol`` is pure).
"""
from __future__ import annotations

import asyncio
import json
import pathlib
import re
import time
from http.client import HTTPConnection

import grpc
import pytest

from qwenjax_proto.v1 import inference_pb2 as pb
from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc
from server import openai_protocol as proto
from server_harness import SERVER_ENGINE, Servers, collect, greedy, http, wait_engine_idle, wait_until

TOKEN = "http-token-51c2"
MAX_REQUEST_BYTES = 64 << 10
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


# --------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def start(server_loop, served_engine_thread):
    servers = Servers(server_loop, served_engine_thread, port=0, metrics_port=None, http_port=0,
                      max_request_bytes=MAX_REQUEST_BYTES)
    yield servers.start
    servers.stop_all()


@pytest.fixture(scope="module")
def server(start):
    return start()


@pytest.fixture(scope="module")
def base(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def client(base):
    import openai

    with openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def name(client) -> str:
    return client.models.list().data[0].id


def grpc_greedy(server, max_tokens: int, **input_) -> tuple[list[int], str]:
    with grpc.insecure_channel(server.address) as channel:
        responses = pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(sampling=greedy(max_tokens), **input_), timeout=120)
        ids, text, _ = collect(responses)
    return ids, text


# --------------------------------------------------------------------------- the real model


def test_models_health_version_and_the_model_name(base, client, name, server, start):
    models = client.models.list().data
    assert [m.id for m in models] == [name] == ["qwen2.5-coder-0.5b-instruct"]
    assert models[0].max_model_len == SERVER_ENGINE["max_model_len"]
    assert models[0].permission[0]["object"] == "model_permission"  # vLLM's model card
    assert client.models.retrieve(name).max_model_len == SERVER_ENGINE["max_model_len"]
    org = f"http://127.0.0.1:{start(served_model_names=('Qwen/Coder-0.5B',)).http_port}"
    assert http(org, "/v1/models/Qwen/Coder-0.5B")[1]["id"] == "Qwen/Coder-0.5B"  # a "/" in it
    status, missing = http(base, "/v1/models/nope")
    assert status == 404 and "`nope` does not exist" in missing["error"]["message"]
    assert http(base, "/load") == (200, {"server_load": 0})
    assert http(base, "/health")[0] == 200
    assert http(base, "/ping")[0] == 200 and http(base, "/ping", {})[0] == 200  # vLLM's probe
    assert http(base, "/version")[1]["version"]
    status, body = http(base, "/v1/chat/completions", {
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and body["error"]["type"] == "NotFoundError" and "gpt-4o" in body["error"]["message"]


def test_chat_greedy_matches_grpc_and_reports_usage(client, name, server, tokenizer):
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    reply = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
    ids, text = grpc_greedy(server, 8, messages=pb.Messages(messages=[pb.Message(**m) for m in messages]))
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == "length" and reply.id.startswith("chatcmpl-") and reply.model == name
    assert reply.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    assert reply.usage.completion_tokens == len(ids) == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8

    # Streamed: a role chunk, content deltas adding up to the same text, then a usage chunk.
    chunks = list(client.chat.completions.create(
        model=name, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    # Usage on every chunk: each counts the tokens so far, and the closing chunk has the total.
    chunks = list(client.chat.completions.create(
        model=name, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and chunks[-1].choices == [] and counts[-1] == 8


def test_chat_logprobs_n_seed_and_stop(client, name, server):
    messages = [{"role": "user", "content": "Count: one, two,"}]
    reply = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    # The tokens' bytes spell the reply (and the EOS token, which has a logprob too, if it ended so).
    spelled = b"".join(bytes(t.bytes) for t in content).decode()
    assert spelled == reply.choices[0].message.content + (
        "<|im_end|>" if reply.choices[0].finish_reason == "stop" else "")
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0

    sampled = dict(model=name, messages=messages, max_tokens=6, temperature=0.9, seed=11, n=2)
    first, again = (client.chat.completions.create(**sampled) for _ in range(2))
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert 2 <= first.usage.completion_tokens <= 12  # both sequences count

    # A stop string ends the reply and is reported as vLLM's stop_reason.
    text = client.chat.completions.create(model=name, messages=messages, max_tokens=12,
                                          temperature=0).choices[0].message.content
    word = text.split()[1] if len(text.split()) > 1 else text[-2:]
    stopped = client.chat.completions.create(model=name, messages=messages, max_tokens=12,
                                             temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == word
    assert stopped.choices[0].message.content == text[: text.index(word)]
    # No max_tokens: the reply may fill the context (vLLM's default), not stop at 256. What a
    # 240-token prompt's request becomes (273 tokens of room), then end to end with a prompt
    # that leaves less room (each decode step of the float32 model costs ~0.1 s on a CPU).
    room = SERVER_ENGINE["max_model_len"] + 1 - 240
    _, params = asyncio.run(server.http._prepare(proto.parse_chat({"model": name, "messages": messages}),
                                                 list(range(1000, 1240))))
    assert params.max_tokens == room > 256
    long = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Count: one, two, three, four. " * 45}],
        temperature=0, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.prompt_tokens > 400
    assert long.usage.prompt_tokens + long.usage.completion_tokens == SERVER_ENGINE["max_model_len"] + 1
    # SGLang's stop_regex: the same cut, by a pattern (extra_body, as vLLM's extra fields).
    by_regex = client.chat.completions.create(model=name, messages=messages, max_tokens=12,
                                              temperature=0, extra_body={"stop_regex": re.escape(word)})
    assert by_regex.choices[0].message.content == text[: text.index(word)]
    assert by_regex.choices[0].model_extra["stop_reason"] == re.escape(word)


def test_completions_batch_echo_logprobs_and_token_prompts(client, name, server, tokenizer):
    import openai

    prompt = "def fibonacci(n):"
    ids, text = grpc_greedy(server, 6, text=prompt)
    token_prompt = tokenizer.encode("import numpy as")
    reply = client.completions.create(model=name, prompt=[prompt, "x = 1", "y"], max_tokens=6,
                                      temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.choices[0].text == text
    assert reply.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in (prompt, "x = 1", "y"))
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    unset = client.completions.create(model=name, prompt=prompt, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert unset.usage.completion_tokens == proto.COMPLETION_MAX_TOKENS  # OpenAI's default, 16

    echoed = client.completions.create(model=name, prompt=token_prompt, max_tokens=4, temperature=0,
                                       echo=True, logprobs=2)
    choice = echoed.choices[0]
    assert choice.text.startswith("import numpy as") and len(choice.text) > len("import numpy as")
    lp = choice.logprobs
    # Every prompt token, then each output (index p is token p, as OpenAI's and vLLM's, which
    # scoring harnesses slice by prompt length): the first has no logprob, null.
    assert len(lp.tokens) == len(token_prompt) + 4 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert None not in lp.token_logprobs[1:]
    assert "".join(lp.tokens) == choice.text
    # Each token's own logprob and its top 2 (vLLM's: the token first, then its alternatives).
    for token, token_lp, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert next(iter(top.items())) == (token, token_lp) and len(top) <= 3
    assert lp.text_offset == sorted(lp.text_offset)
    assert echoed.choices[0].model_extra["prompt_logprobs"][0] is None
    alone = client.completions.create(model=name, prompt=prompt, max_tokens=3, temperature=0, logprobs=0)
    assert [list(top) for top in alone.choices[0].logprobs.top_logprobs] == \
        [[t] for t in alone.choices[0].logprobs.tokens]  # logprobs 0: the token alone

    # max_tokens 0 with echo (vLLM's, for scoring): the prompt and its logprobs, nothing generated.
    for stream in (False, True):
        kwargs = dict(model=name, prompt=token_prompt, max_tokens=0, echo=True, logprobs=1, stream=stream)
        if stream:
            chunks = list(client.completions.create(**kwargs, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
                      for t in c.choices[0].logprobs.tokens]
            finish, usage = chunks[-2].choices[0].finish_reason, chunks[-1].usage
        else:
            only = client.completions.create(**kwargs)
            text, tokens = only.choices[0].text, only.choices[0].logprobs.tokens
            finish, usage = only.choices[0].finish_reason, only.usage
        assert text == "import numpy as" == "".join(tokens) and len(tokens) == len(token_prompt)
        assert finish == "length" and usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=name, prompt=prompt, max_tokens=0)

    # Streamed with n > 1: every choice's echo carries the prompt's logprobs (the engine
    # computes them once, on sequence 0).
    firsts: dict[int, list] = {}
    for chunk in client.completions.create(model=name, prompt=token_prompt, max_tokens=3, n=3, seed=5,
                                           echo=True, logprobs=1, stream=True):
        for c in chunk.choices:
            firsts.setdefault(c.index, c.logprobs.tokens)
    assert sorted(firsts) == [0, 1, 2]
    assert all(tokens[:len(token_prompt)] == lp.tokens[:len(token_prompt)] for tokens in firsts.values())

    # prompt_logprobs (vLLM's, for scoring): per prompt token, its logprob (the first: null).
    scored = client.completions.create(model=name, prompt=token_prompt, max_tokens=1, temperature=0,
                                       extra_body={"prompt_logprobs": 1})
    entries = scored.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(token_prompt) and entries[0] is None
    for token, entry in zip(token_prompt[1:], entries[1:]):
        assert entry[str(token)]["logprob"] <= 0 and 1 <= len(entry) <= 2
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=1, extra_body={"prompt_logprobs": 0})
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens

    # Streamed, several prompts: each choice's deltas add up to its non-streamed text.
    texts: dict[int, str] = {}
    for chunk in client.completions.create(model=name, prompt=[prompt, "x = 1", "y"], max_tokens=6,
                                           temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in reply.choices}


def test_fill_in_the_middle_with_suffix(client, name, tokenizer, server):
    """suffix: the Coder model writes what goes between the prompt and the suffix; the gRPC
    GenerateRequest.suffix gives the same tokens."""
    prompt, after = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    reply = client.completions.create(model=name, prompt=prompt, suffix=after, max_tokens=8,
                                      temperature=0)
    assert reply.choices[0].text.strip().startswith("a + b")
    assert grpc_greedy(server, 8, text=prompt, suffix=after)[1] == reply.choices[0].text
    prefix, suffix = tokenizer.encode("x = "), tokenizer.encode("y")
    assert tokenizer.encode_fill_in_the_middle(prefix, "y") == [
        tokenizer.special_token_id("<|fim_prefix|>"), *prefix, tokenizer.special_token_id("<|fim_suffix|>"),
        *suffix, tokenizer.special_token_id("<|fim_middle|>")]


def test_structured_outputs_through_response_format_and_vllm_fields(client, name):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Give the largest city of France as JSON."}],
        max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)

    choice = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Is Paris in France?"}], max_tokens=5,
        temperature=0, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].message.content in ("yes", "no")
    guided = client.completions.create(model=name, prompt="The answer is", max_tokens=8,
                                       temperature=0, extra_body={"guided_regex": "[0-9]{3}"})
    assert guided.choices[0].text.isdigit() and len(guided.choices[0].text) == 3


def test_a_structural_tag_constrains_the_tool_call_inside_a_free_reply(client, name):
    """response_format structural_tag (vLLM's, SGLang's): the model chooses to call, and the
    call's arguments follow the tag's schema (an enum the model would not pick by itself). The
    0.5B model writes its calls as bare JSON, so the trigger is that JSON's start (the
    <tool_call> token form is in test_tool_calls)."""
    only_lyon = {"type": "object", "properties": {"city": {"enum": ["Lyon"]}}, "required": ["city"],
                 "additionalProperties": False}
    tag = {"type": "structural_tag", "triggers": ['{"name": "get_weather"'],
           "structures": [{"begin": '{"name": "get_weather", "arguments": ',
                           "schema": only_lyon, "end": "}"}]}
    messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    free = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER],
                                          max_tokens=48, temperature=0).choices[0]
    assert json.loads(free.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    tagged = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER],
                                            max_tokens=48, temperature=0,
                                            response_format=tag).choices[0]
    assert tagged.finish_reason == "tool_calls"
    assert json.loads(tagged.message.tool_calls[0].function.arguments) == {"city": "Lyon"}


def test_token_ids_and_token_id_logprobs_as_vllm_returns_them(client, name, tokenizer, base):
    """return_token_ids (the prompt's and each choice's ids, what RL trainers read) and
    return_tokens_as_token_ids ("token_id:ID" in logprobs), streamed and not."""
    extra = {"return_token_ids": True, "return_tokens_as_token_ids": True}
    prompt = "def fib(n):"
    done = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0,
                                     logprobs=1, extra_body=extra).choices[0]
    assert done.prompt_token_ids == tokenizer.encode(prompt) and len(done.token_ids) == 6
    assert tokenizer.decode(done.token_ids) == done.text
    assert done.logprobs.tokens == [f"token_id:{t}" for t in done.token_ids]
    offsets = [0]
    for t in done.token_ids[:-1]:  # offsets still count the text's characters
        offsets.append(offsets[-1] + len(tokenizer.token_bytes(t).decode(errors="replace")))
    assert done.logprobs.text_offset == offsets
    chunks = [c.choices[0] for c in client.completions.create(
        model=name, prompt=prompt, max_tokens=6, temperature=0, stream=True, extra_body=extra)]
    assert chunks[0].prompt_token_ids == done.prompt_token_ids
    assert [t for c in chunks for t in c.token_ids] == done.token_ids

    messages = [{"role": "user", "content": "Name a prime number."}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0,
                                          logprobs=True, extra_body=extra)
    ids = chat.choices[0].token_ids
    assert chat.prompt_token_ids == tokenizer.encode_chat(messages) and len(ids) == chat.usage.completion_tokens
    assert [e.token for e in chat.choices[0].logprobs.content] == [f"token_id:{t}" for t in ids]
    stream = list(client.chat.completions.create(model=name, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True, extra_body=extra))
    assert stream[0].prompt_token_ids == chat.prompt_token_ids
    assert [t for c in stream for t in c.choices[0].token_ids] == ids
    # OpenAI's newer fields: accepted; reasoning_effort reaches the chat template (as vLLM's).
    reply = client.chat.completions.create(model=name, messages=messages, max_tokens=2,
                                           reasoning_effort="low", extra_body={"prompt_cache_key": "k"})
    assert reply.choices[0].message.content
    assert proto.parse_chat({"messages": messages, "reasoning_effort": "low"}).template_kwargs == {
        "reasoning_effort": "low"}
    status, refused = http(base, "/v1/chat/completions", {"messages": messages, "reasoning_effort": "extreme"})
    assert status == 400 and "reasoning_effort must be one of" in refused["error"]["message"]


def test_tool_calls_named_and_streamed(client, name):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER],
                                           tool_choice=forced, max_tokens=40, temperature=0)
    choice = reply.choices[0]
    # A named tool_choice's forced call ends with "stop" (OpenAI's and vLLM's); one the model
    # chose ("auto") with "tool_calls".
    assert choice.finish_reason == "stop" and choice.message.content is None
    auto = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
        tools=[WEATHER], max_tokens=48, temperature=0).choices[0]
    assert auto.finish_reason == "tool_calls" and auto.message.tool_calls[0].function.name == "get_weather"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"} and call.id.startswith("call_")

    chunks = list(client.chat.completions.create(model=name, messages=messages, tools=[WEATHER],
                                                 tool_choice=forced, max_tokens=40, temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert not "".join(d.content or "" for d in deltas)  # a forced call streams no content
    # The call streams as it is written: its id and name first, then its arguments in pieces.
    (opening, *pieces) = [t for d in deltas for t in d.tool_calls or ()]
    assert opening.index == 0 and opening.function.name == "get_weather" and opening.id.startswith("call_")
    assert len(pieces) > 1 and all(p.index == 0 and p.id is None and p.function.name is None for p in pieces)
    arguments = "".join(p.function.arguments for p in pieces)
    assert json.loads(arguments) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "stop"

    # The call goes back into the conversation with its result; the model answers in text.
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    answer = client.chat.completions.create(model=name, messages=follow, tools=[WEATHER],
                                            tool_choice="none", max_tokens=6, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"


def test_parallel_tool_calls_false_asks_for_one_call(client, base, name, tokenizer):
    """tool_choice "required" with parallel_tool_calls false: the grammar closes the list after
    one call (the reply's tokens are a list of one), though the question asks for two cities."""
    chunks = list(client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Weather in Paris and Rome?"}],
        tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=60,
        temperature=0, stream=True, extra_body={"return_token_ids": True}))
    opening, *pieces = [t for c in chunks for t in c.choices[0].delta.tool_calls or ()]
    assert {t.index for t in [opening, *pieces]} == {0} and opening.function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    reply = json.loads(tokenizer.decode([t for c in chunks for t in c.choices[0].token_ids or ()]))
    arguments = "".join(t.function.arguments for t in pieces)
    assert len(reply) == 1 and json.loads(arguments) == reply[0]["arguments"]
    status, refused = http(base, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": "no"})
    assert status == 400 and "parallel_tool_calls must be true or false" in refused["error"]["message"]


def test_score_and_rerank_compare_embeddings(base):
    """vLLM's /score and the rerank API on the served model: cosine similarities of the
    /v1/embeddings vectors, 1-to-N and pairwise, documents ranked best first."""
    import numpy as np

    texts = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Interest rates rose again."]
    _, embedded = http(base, "/v1/embeddings", {"input": texts})
    vectors = [np.asarray(d["embedding"]) for d in embedded["data"]]
    status, scored = http(base, "/score", {"text_1": texts[0], "text_2": texts[1:]})
    assert status == 200, scored
    scores = [d["score"] for d in scored["data"]]
    assert scores == pytest.approx([vectors[0] @ vectors[1], vectors[0] @ vectors[2]], abs=1e-4)
    assert scores[0] > scores[1] and scored["data"][1]["object"] == "score"
    status, pairwise = http(base, "/v1/score", {"text_1": texts[:2], "text_2": texts[1:]})
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(
        [vectors[0] @ vectors[1], vectors[1] @ vectors[2]], abs=1e-4)
    status, refused = http(base, "/score", {"text_1": texts[:2], "text_2": texts})
    assert status == 400 and "pairwise" in refused["error"]["message"]

    status, ranked = http(base, "/v2/rerank", {"query": texts[0], "top_n": 1,
                                               "documents": [texts[2], {"text": texts[1]}]})
    assert status == 200, ranked
    assert [r["index"] for r in ranked["results"]] == [1]
    assert ranked["results"][0]["document"] == {"text": texts[1]}
    assert ranked["results"][0]["relevance_score"] == pytest.approx(scores[0], abs=1e-4)
    status, everything = http(base, "/rerank", {"query": texts[0], "documents": texts[1:],
                                                "return_documents": False})
    assert [r["index"] for r in everything["results"]] == [0, 1]
    assert "document" not in everything["results"][0]


def test_embeddings(client, name, base, server, tokenizer):
    """/v1/embeddings through the official client: one unit vector per input (texts and token
    ids alike), closer for paraphrases; base64 is the same float32 values; ``dimensions`` cuts
    then normalizes, ``normalize: false`` (vLLM's) leaves the raw state; bad fields refused."""
    import base64

    import numpy as np

    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quantum chromodynamics."]
    reply = client.embeddings.create(model=name, input=texts)
    vectors = np.array([d.embedding for d in reply.data])
    assert [d.index for d in reply.data] == [0, 1, 2] and vectors.shape == (3, 896)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar = vectors @ vectors.T
    assert similar[0, 1] > similar[0, 2] + 0.2 and similar[0, 1] > similar[1, 2] + 0.2
    ids = tokenizer.encode(texts[0])
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    by_ids = client.embeddings.create(model=name, input=[ids]).data[0].embedding
    np.testing.assert_allclose(by_ids, vectors[0], atol=1e-6)
    status, packed = http(base, "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"})
    assert status == 200
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, vectors[0], atol=1e-6)
    _, raw = http(base, "/v1/embeddings", {"input": texts[0], "normalize": False})
    raw = np.array(raw["data"][0]["embedding"])
    assert abs(np.linalg.norm(raw) - 1) > 0.1
    np.testing.assert_allclose(raw / np.linalg.norm(raw), vectors[0], atol=1e-5)
    cut = client.embeddings.create(model=name, input=texts[0], dimensions=32).data[0].embedding
    np.testing.assert_allclose(cut, raw[:32] / np.linalg.norm(raw[:32]), atol=1e-5)
    # gRPC's Embed: the same vectors.
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        reply = stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text=texts[0]), pb.EmbedInput(
            token_ids=pb.TokenIds(ids=ids))]), timeout=120)
        assert [e.prompt_tokens for e in reply.embeddings] == [len(ids)] * 2
        for e in reply.embeddings:
            np.testing.assert_allclose(e.values, vectors[0], atol=1e-5)
        raw32 = stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text=texts[0])], raw=True,
                                           dimensions=32), timeout=120).embeddings[0].values
        np.testing.assert_allclose(raw32, raw[:32], rtol=1e-4, atol=1e-4)
        with pytest.raises(grpc.RpcError) as error:
            stub.Embed(pb.EmbedRequest(), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for body, field in (({"input": []}, "input"), ({"input": "x", "dimensions": 4096}, "dimensions"),
                        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": "x", "pooling": "mean"}, "pooling")):
        status, error = http(base, "/v1/embeddings", body)
        assert status == 400 and field in error["error"]["message"], (body, error)


def test_reasoning_parser_splits_chat_replies(start, server, name, base):
    """A server with --reasoning-parser deepseek_r1 (over the same engine): the reply's text
    before </think> as reasoning (reasoning and reasoning_content), the rest as content, the
    same whether streamed or not, in the Responses API (a reasoning item) and in gRPC's
    Complete; the raw text is what a server without the parser returns."""
    import openai

    from qwenjax.reasoning import split_reasoning

    thinking = start(reasoning_parser="deepseek_r1")
    messages = [{"role": "user", "content": "Print this string verbatim: <think>hello</think>world"}]
    _, raw = grpc_greedy(server, 30, messages=pb.Messages(messages=[pb.Message(**m) for m in messages]))
    reasoning, content = split_reasoning(raw)
    assert reasoning and content  # the 0.5B does copy the tags
    with openai.OpenAI(base_url=f"http://127.0.0.1:{thinking.http_port}/v1", api_key="unused",
                       max_retries=0, timeout=120) as client:
        message = client.chat.completions.create(model=name, messages=messages, max_tokens=30,
                                                 temperature=0).choices[0].message
        assert (message.reasoning_content, message.reasoning, message.content) == (reasoning, reasoning, content)
        deltas = [c.choices[0].delta for c in client.chat.completions.create(
            model=name, messages=messages, max_tokens=30, temperature=0, stream=True) if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
        assert "".join(d.content or "" for d in deltas) == content
        response = client.responses.create(model=name, input=messages[0]["content"],
                                           max_output_tokens=30, temperature=0)
        assert [item.type for item in response.output] == ["reasoning", "message"]
        assert response.output[0].content[0].text == reasoning and response.output_text == content
    with grpc.insecure_channel(thinking.address) as channel:
        responses = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
            sampling=greedy(30), messages=pb.Messages(messages=[pb.Message(**m) for m in messages])))
        (complete,) = [r.complete for r in responses if r.HasField("complete")]
    assert (complete.reasoning, complete.content) == (reasoning, content)
    # vLLM's thinking_token_budget reaches the engine (tested there, test_llm.py), which needs
    # its reasoning parser: this test's shared engine runs without one and says so.
    status, error = http(base, "/v1/chat/completions", {"messages": messages, "max_tokens": 4,
                                                        "thinking_token_budget": 2})
    assert status == 400 and "thinking_token_budget limits a reasoning model" in error["error"]["message"]
    status, error = http(base, "/v1/chat/completions", {"messages": messages, "thinking_token_budget": -2})
    assert status == 400 and "thinking_token_budget" in error["error"]["message"]


def test_responses_api_text_stream_and_usage(client, name, server, tokenizer):
    """/v1/responses through the official client: the same greedy text as gRPC, the
    instructions as a system message, usage in input/output tokens, an incomplete status at
    max_output_tokens; streamed events whose deltas add up to the final text."""
    instructions = "You are terse."
    question = "Write a Python function that adds two numbers."
    messages = [{"role": "system", "content": instructions}, {"role": "user", "content": question}]
    ids, text = grpc_greedy(server, 8, messages=pb.Messages(messages=[pb.Message(**m) for m in messages]))
    reply = client.responses.create(model=name, instructions=instructions, input=question,
                                    max_output_tokens=8, temperature=0)
    assert reply.output_text == text and reply.model == name and reply.object == "response"
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    (item,) = reply.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert reply.usage.input_tokens == len(tokenizer.encode_chat(messages))
    assert reply.usage.output_tokens == len(ids) == 8
    assert reply.usage.total_tokens == reply.usage.input_tokens + 8

    events = list(client.responses.create(model=name, instructions=instructions, input=question,
                                          max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == text and events[-1].response.usage.output_tokens == 8

    # Input items: a multi-turn conversation with content parts, as the SDK sends them.
    turns = client.responses.create(model=name, max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Say hi."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
        {"role": "user", "content": "Again."}])
    assert turns.output_text and turns.usage.output_tokens <= 4


def test_responses_are_stored_and_continued(client, name, tokenizer):
    """store (default true): GET /v1/responses/{id} returns it, and previous_response_id runs the
    stored conversation (input and output, not instructions) before the new input."""
    import openai

    first = client.responses.create(model=name, instructions="Answer in French.", input="Say hi.",
                                    max_output_tokens=4, temperature=0)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model=name, previous_response_id=first.id, input="Again.",
                                     max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    conversation = [{"role": "user", "content": "Say hi."},
                    {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "Again."}]
    assert second.usage.input_tokens == len(tokenizer.encode_chat(conversation))
    # Streamed responses are stored too, by the time the stream ends.
    streamed = list(client.responses.create(model=name, previous_response_id=second.id,
                                            input="Once more.", max_output_tokens=2, stream=True))
    last = streamed[-1].response
    assert client.responses.retrieve(last.id).usage.input_tokens == last.usage.input_tokens
    unstored = client.responses.create(model=name, input="x", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError, match="resp_nope"):
        client.responses.create(model=name, input="x", previous_response_id="resp_nope")


def test_background_responses_are_polled_and_cancelled(client, name, served_model):
    """background: answered at once (queued), run on and stored as it goes; cancel stops one
    still running (its pages come back); a finished one cannot be cancelled."""
    import time

    import openai

    def until_done(response_id: str):
        for _ in range(600):
            response = client.responses.retrieve(response_id)
            if response.status not in ("queued", "in_progress"):
                return response
            time.sleep(0.05)
        raise AssertionError(f"{response_id} still {response.status}")

    plain = client.responses.create(model=name, input="Say hi.", max_output_tokens=4, temperature=0)
    queued = client.responses.create(model=name, input="Say hi.", max_output_tokens=4,
                                     temperature=0, background=True)
    assert queued.status in ("queued", "in_progress") and queued.output == [] and queued.background
    done = until_done(queued.id)
    assert done.status == "incomplete" and done.output_text == plain.output_text
    with pytest.raises(openai.BadRequestError, match="only a background response still running"):
        client.responses.cancel(done.id)
    # A long one, cancelled while it runs.
    long = client.responses.create(model=name, input="Count to a thousand.", temperature=0,
                                   max_output_tokens=400, background=True)
    while client.responses.retrieve(long.id).status == "queued":
        time.sleep(0.02)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(long.id).status == "cancelled"
    engine = served_model[1]
    for _ in range(100):  # the abort reaches the engine thread within a step or two
        if not engine.has_unfinished() and engine.allocator.num_used == 0:
            break
        time.sleep(0.05)
    assert not engine.has_unfinished() and engine.allocator.num_used == 0
    with pytest.raises(openai.BadRequestError, match="cancelled: only a finished response"):
        client.responses.create(model=name, input="x", previous_response_id=long.id)
    for bad, message in (({"store": False}, "must be stored"), ({"stream": True}, "do not stream")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.responses.create(model=name, input="x", background=True, **bad)


def test_responses_api_function_calls_and_refusals(client, name):
    import openai

    tool = {"type": "function", **WEATHER["function"]}
    question = "What is the weather in Paris?"
    reply = client.responses.create(model=name, input=question, tools=[tool], temperature=0,
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    max_output_tokens=40)
    (call,) = reply.output
    assert call.type == "function_call" and call.name == "get_weather" and reply.status == "completed"
    assert set(json.loads(call.arguments)) == {"city"} and call.call_id.startswith("call_")

    events = list(client.responses.create(model=name, input=question, tools=[tool], temperature=0,
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=40, stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [d.type for d in done] == ["function_call"]
    assert json.loads(done[0].arguments) == json.loads(call.arguments)
    assert not [e for e in events if e.type == "response.output_text.delta"]
    # The arguments stream as the model writes them; the completed response holds that call.
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and "".join(pieces) == done[0].arguments
    assert events[-1].response.output[0].model_dump() == done[0].model_dump()

    # The call and its output go back as input items; the model answers in text.
    answer = client.responses.create(model=name, tools=[tool], tool_choice="none", temperature=0,
                                     max_output_tokens=6, input=[
                                         {"role": "user", "content": question},
                                         {"type": "function_call", "call_id": call.call_id,
                                          "name": call.name, "arguments": call.arguments},
                                         {"type": "function_call_output", "call_id": call.call_id,
                                          "output": '{"temp_c": 21}'}])
    assert answer.output_text and answer.output[0].type == "message"

    def refused(**kwargs):
        with pytest.raises(openai.BadRequestError) as error:
            client.responses.create(**{"model": name, "input": "hi", **kwargs})
        return error.value.body["message"]

    assert "frobnicate" in refused(extra_body={"frobnicate": 1})
    assert "web_search" in refused(tools=[{"type": "web_search"}])
    assert "input_image" in refused(input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x"}]}])
    assert "temperature" in refused(temperature=-1)


def test_bad_requests_name_the_field(base, client, name):
    import openai

    def refused(**kwargs):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(
                **{"model": name, "messages": [{"role": "user", "content": "hi"}], **kwargs})
        return error.value.body["message"]

    assert "temperature" in refused(temperature=-1)
    assert "frobnicate" in refused(extra_body={"frobnicate": 1})
    assert "max_tokens" in refused(max_tokens=SERVER_ENGINE["max_model_len"] + 10)
    assert "top_logprobs" in refused(top_logprobs=2)
    assert "may not set messages" in refused(extra_body={"chat_template_kwargs": {"messages": []}})
    assert "chat_template_kwargs" in refused(extra_body={"chat_template_kwargs": ["x"]})
    assert "image_url" in refused(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}])
    assert http(base, "/v1/completions", b"{not json")[0] == 400
    status, body = http(base, "/v1/completions", {"prompt": "x" * MAX_REQUEST_BYTES})
    assert status == 413 and "--max-request-bytes" in body["error"]["message"]
    status, body = http(base, "/v1/completions", {"prompt": [], "max_tokens": 1})
    assert status == 400 and "prompt" in body["error"]["message"]
    assert http(base, "/v1/nothing", {})[0] == 404


def test_tokenize_detokenize_and_metrics(base, tokenizer):
    status, body = http(base, "/tokenize", {"prompt": "hello world"})
    assert status == 200 and body["tokens"] == tokenizer.encode("hello world") and body["count"] == 2
    assert body["token_strs"] is None
    status, strs = http(base, "/tokenize", {"prompt": "hello world", "return_token_strs": True,
                                            "add_special_tokens": True})
    assert strs["token_strs"] == ["hello", "Ġworld"]  # vLLM's: the vocabulary entries
    status, chat = http(base, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat["tokens"] == tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert http(base, "/detokenize", {"tokens": body["tokens"]})[1] == {"prompt": "hello world"}
    assert http(base, "/detokenize", {"tokens": [10**9]})[0] == 400
    status, text = http(base, "/metrics")
    assert status == 200 and "qwenjax:requests_total" in text


def test_metrics_under_vllm_and_sglang_names(base, name):
    """vLLM's and SGLang's dashboards read their own names, labelled with the served model."""
    from prometheus_client.parser import text_string_to_metric_families

    assert http(base, "/v1/completions", {"prompt": "hi", "max_tokens": 6, "ignore_eos": True})[0] == 200

    def scrape() -> dict:
        samples = {}
        for family in text_string_to_metric_families(http(base, "/metrics")[1]):
            for sample in family.samples:
                labels = dict(sample.labels)
                samples[sample.name, labels.pop("model_name", None),
                        tuple(sorted(labels.items()))] = sample.value
        return samples

    got = scrape()

    def value(metric: str, model=name, **labels) -> float:
        return got[metric, model, tuple(sorted(labels.items()))]

    for ours, theirs in (("qwenjax:prompt_tokens_total", "vllm:prompt_tokens_total"),
                         ("qwenjax:prompt_tokens_total", "sglang:prompt_tokens_total"),
                         ("qwenjax:generation_tokens_total", "vllm:generation_tokens_total"),
                         ("qwenjax:time_to_first_token_seconds_count",
                          "vllm:time_to_first_token_seconds_count"),
                         ("qwenjax:e2e_request_latency_seconds_count",
                          "sglang:e2e_request_latency_seconds_count"),
                         ("qwenjax:requests_running", "vllm:num_requests_running"),
                         ("qwenjax:requests_waiting", "sglang:num_queue_reqs"),
                         ("qwenjax:kv_cache_usage_perc", "sglang:token_usage"),
                         ("qwenjax:kv_tokens_used", "sglang:num_used_tokens"),
                         ("qwenjax:prefix_cache_hit_rate", "sglang:cache_hit_rate"),
                         ("qwenjax:iteration_tokens_count", "vllm:iteration_tokens_total_count")):
        assert value(theirs) == value(ours, None) and (ours, name, ()) not in got
    assert value("vllm:prompt_tokens_total") > 0
    assert value("vllm:request_success_total", finished_reason="length") == \
        value("qwenjax:requests_total", None, finish_reason="length") >= 1
    assert value("sglang:num_requests_total", finish_reason="length") >= 1
    assert value("sglang:gen_throughput") >= 0.0  # (its first read: 0 or the rate since start)
    assert value("vllm:time_to_first_token_seconds_bucket", le="+Inf") >= 1
    # The gaps between a sequence's outputs after its first (6 tokens here: some come apart).
    itl = value("qwenjax:inter_token_latency_seconds_count", None)
    assert itl >= 1 and value("vllm:inter_token_latency_seconds_count") == itl == \
        value("vllm:time_per_output_token_seconds_count") == value("sglang:inter_token_latency_seconds_count")
    # The unlabelled families are declared once, each with its type.
    text = http(base, "/metrics")[1]
    assert text.count("# TYPE vllm:num_requests_waiting gauge") == 1
    assert "# TYPE sglang:time_to_first_token_seconds histogram" in text


def test_metrics_aliases_can_be_turned_off(start, name):
    quiet = start(metrics_aliases=())
    text = http(f"http://127.0.0.1:{quiet.http_port}", "/metrics")[1]
    assert "qwenjax:requests_running" in text and "vllm:" not in text and "sglang:" not in text


def test_invocations_route_by_the_bodys_fields(base, name):
    """SageMaker's /invocations (vLLM's): the same answers as the routes the bodies are for."""
    chat = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}
    completion = {"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}
    for body, path in ((chat, "/v1/chat/completions"), (completion, "/v1/completions")):
        status, answer = http(base, "/invocations", body)
        direct = http(base, path, body)[1]
        assert status == 200 and answer["object"] == direct["object"]
        assert answer["choices"][0] == direct["choices"][0]
    status, embedded = http(base, "/invocations", {"input": "hello"})
    assert status == 200 and embedded["data"][0]["embedding"] == \
        http(base, "/v1/embeddings", {"input": "hello"})[1]["data"][0]["embedding"]
    status, refused = http(base, "/invocations", {"text": "x"})
    assert status == 400 and "messages" in refused["error"]["message"]


def test_a_requests_own_chat_template_needs_the_servers_trust(start, base, tokenizer):
    """vLLM's chat_template field: refused unless --trust-request-chat-template; only a
    template's text is taken (a path is not read from a request)."""
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": template}
    status, refused = http(base, "/tokenize", body)
    assert status == 400 and "--trust-request-chat-template" in refused["error"]["message"]
    trusting = f"http://127.0.0.1:{start(trust_request_chat_template=True).http_port}"
    status, tokens = http(trusting, "/tokenize", body)
    assert status == 200 and tokens["tokens"] == tokenizer.encode("[user] hi\n")
    status, reply = http(trusting, "/v1/chat/completions", {**body, "max_tokens": 2})
    assert status == 200 and reply["usage"]["prompt_tokens"] == len(tokens["tokens"])
    status, refused = http(trusting, "/v1/chat/completions", {**body, "chat_template": "/etc/passwd"})
    assert status == 400 and "Jinja template's text" in refused["error"]["message"]
    status, refused = http(trusting, "/v1/chat/completions", {**body, "chat_template": "{{ 1 / 0 }}"})
    assert status == 400 and "chat_template failed to render: ZeroDivisionError" in \
        refused["error"]["message"]


def test_bearer_token(start, name):
    import openai

    guarded = start(api_token=(TOKEN, "second-key"))  # vLLM's --api-key, given twice
    base = f"http://127.0.0.1:{guarded.http_port}"
    assert http(base, "/health")[0] == 200  # probes send no token
    assert http(base, "/v1/models")[0] == 401
    assert http(base, "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    for key in (TOKEN, "second-key"):
        with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as c:
            assert c.models.list().data[0].id == name


def _raw(port: int, method: str, path: str, headers: dict, body: bytes | None = None):
    """(status, headers, body) of one HTTP request."""
    connection = HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def test_cors_preflight_and_headers(start, name):
    """Browsers' cross-origin calls (server/cors.py): preflights answered before the bearer
    token is asked for, every response (streams too) marked for an allowed origin, and a
    narrowed set of origins, methods and headers enforced; the command line's flags."""
    import argparse

    from server.cli import add_serve_arguments, server_config
    from server.cors import CORS

    guarded = start(api_token=TOKEN)
    ui = "https://ui.example"
    status, headers, _ = _raw(guarded.http_port, "OPTIONS", "/v1/chat/completions", {
        "Origin": ui, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    chat = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 2, "stream": True}).encode()
    auth = {"Origin": ui, "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    status, headers, text = _raw(guarded.http_port, "POST", "/v1/chat/completions", auth, chat)
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    assert headers["Access-Control-Allow-Origin"] == "*"
    status, headers, _ = _raw(guarded.http_port, "GET", "/v1/models", {"Origin": ui})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == "*"  # the browser can read why

    narrow = start(cors=CORS(origins=(ui,), methods=("POST",), headers=("authorization",),
                             credentials=True))
    status, headers, _ = _raw(narrow.http_port, "GET", "/v1/models", {"Origin": ui})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ui
    assert headers["Access-Control-Allow-Credentials"] == "true" and headers["Vary"] == "Origin"
    status, headers, _ = _raw(narrow.http_port, "GET", "/v1/models", {"Origin": "https://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    for origin, method, asked, problem in (("https://evil.example", "POST", "", "origin"),
                                           (ui, "DELETE", "", "method"),
                                           (ui, "POST", "x-custom", "headers")):
        status, _, text = _raw(narrow.http_port, "OPTIONS", "/v1/completions", {
            "Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": asked})
        assert status == 400 and text == f"Disallowed CORS {problem}"
    off = start(cors=None)
    status, headers, _ = _raw(off.http_port, "GET", "/v1/models", {"Origin": ui})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--allowed-origins", f'["{ui}"]', "--allow-credentials"])
    assert server_config(args).cors == CORS(origins=(ui,), credentials=True)
    assert server_config(parser.parse_args([])).cors == CORS()  # every origin, as vLLM
    with pytest.raises(SystemExit):
        parser.parse_args(["--allowed-origins", ui])  # not a JSON list


def test_start_and_stop_profile(start, name, tmp_path):
    """vLLM's and SGLang's /start_profile, /stop_profile: a jax.profiler trace of the requests
    between them under --profiler-dir, and where the device time went; off without the flag."""
    import gzip

    assert http(f"http://127.0.0.1:{start().http_port}", "/start_profile", {})[0] == 404
    base = f"http://127.0.0.1:{start(profiler_dir=str(tmp_path)).http_port}"
    status, started = http(base, "/start_profile", b"")
    assert status == 200 and started["directory"].startswith(str(tmp_path))
    assert http(base, "/start_profile", {})[0] == 409  # one at a time
    status, _ = http(base, "/v1/completions", {"model": name, "prompt": "def f(x):", "max_tokens": 3})
    assert status == 200
    status, stopped = http(base, "/stop_profile", {})
    assert status == 200 and stopped["directory"] == started["directory"]
    with gzip.open(stopped["trace"], "rt") as f:
        assert json.load(f)["traceEvents"]
    assert stopped["summary"]["busy_us"] > 0
    status, refused = http(base, "/stop_profile", {})
    assert status == 409 and "no profile is running" in refused["error"]["message"]
    # SGLang's num_steps: the trace stops by itself after that many engine steps.
    status, refused = http(base, "/start_profile", {"num_steps": 0})
    assert status == 400 and "num_steps must be a positive integer" in refused["error"]["message"]
    status, refused = http(base, "/start_profile", {"activities": ["RPD"]})
    assert status == 400 and "activities" in refused["error"]["message"]
    status, refused = http(base, "/start_profile", {"output_dir": "/elsewhere"})
    assert status == 400 and "output_dir must lie inside" in refused["error"]["message"]
    status, started = http(base, "/start_profile", {"num_steps": 2})
    assert status == 200 and started["num_steps"] == 2
    status, _ = http(base, "/v1/completions", {"model": name, "prompt": "def g(y):", "max_tokens": 6,
                                               "ignore_eos": True})
    assert status == 200
    time.sleep(0.5)  # 6 tokens took more than 2 steps: the trace stops (in the background)
    status, stopped = http(base, "/stop_profile", {})  # waits for it, answers with it
    assert status == 200 and stopped["directory"] == started["directory"] and stopped["trace"]
    assert stopped["num_steps"] == 2  # stopped by itself, not by this call
    assert http(base, "/stop_profile", {})[0] == 409
    assert http(base, "/start_profile", {})[0] == 200
    assert http(base, "/stop_profile", {})[0] == 200

    # The body python -m sglang.profiler sends (numbers as strings): the trace waits for
    # start_step, lasts num_steps, and goes into output_dir with a memory profile (MEM).
    body = {"output_dir": str(tmp_path / "sglang" / "1700000000.0"), "num_steps": "2",
            "start_step": str(10**9), "activities": ["CPU", "GPU", "MEM"], "profile_by_stage": False,
            "merge_profiles": False, "profile_prefix": None}
    status, waiting = http(base, "/start_profile", body)
    assert status == 200 and waiting["status"] == "waiting" and waiting["start_step"] == 10**9
    status, stopped = http(base, "/stop_profile", {})  # before start_step came: no trace
    assert status == 200 and stopped["trace"] is None
    body["start_step"] = "1"  # long past: it starts at once
    status, started = http(base, "/start_profile", body)
    assert status == 200 and started["status"] == "profiling"
    assert started["directory"] == body["output_dir"]
    status, _ = http(base, "/v1/completions", {"model": name, "prompt": "def h(z):", "max_tokens": 6,
                                               "ignore_eos": True})
    time.sleep(0.5)
    status, stopped = http(base, "/stop_profile", {})
    assert status == 200 and stopped["num_steps"] == 2 and stopped["trace"].startswith(body["output_dir"])
    assert pathlib.Path(stopped["memory_profile"]).stat().st_size > 0


def test_disconnect_aborts_and_drain_refuses(start, served_model, name, server_loop):
    """A client that goes away mid-stream frees its request; a draining server answers 503 and
    its health goes 503, while a stream already running finishes."""
    engine = served_model[1]
    server = start()
    body = json.dumps({"model": name, "prompt": "def long_function(", "max_tokens": 200,
                       "temperature": 0, "ignore_eos": True, "stream": True})
    connection = HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    assert server.gateway.in_flight == 1
    connection.close()
    wait_until(lambda: server.gateway.in_flight == 0, 10.0)
    wait_engine_idle(engine, timeout=10.0)

    running = HTTPConnection("127.0.0.1", server.http_port, timeout=120)
    running.request("POST", "/v1/completions", body.replace("200", "12"),
                    {"Content-Type": "application/json"})
    stream = running.getresponse()
    assert stream.readline().startswith(b"data: ")
    drained = asyncio.run_coroutine_threadsafe(server.drain(timeout=60), server_loop.loop)
    base = f"http://127.0.0.1:{server.http_port}"
    wait_until(lambda: http(base, "/health")[0] == 503, 5.0)
    status, refused = http(base, "/v1/completions", {"prompt": "late", "max_tokens": 1})
    assert status == 503 and "draining" in refused["error"]["message"]
    events = [line for line in stream.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    finished = [json.loads(e[6:]) for e in events[:-1]]
    assert finished[-1]["choices"][0]["finish_reason"] == "length"
    assert drained.result(60) is True
    running.close()


def test_clients_that_leave_in_waves_leak_nothing(start, served_model, name):
    """Two waves of 8 requests over the HTTP API, most abandoned by their clients (streams
    closed after a few events, non-streamed requests timed out): every engine request ends,
    every page is freed, the in-flight count returns to 0, and the requests left alone finish."""
    import random

    import aiohttp

    engine = served_model[1]
    server = start()
    url = f"http://127.0.0.1:{server.http_port}/v1/completions"
    rng = random.Random(5)

    async def one(session, i: int) -> str:
        stream = i % 3 != 2
        leave = rng.choice([1, 3, None]) if stream else rng.choice([0.2, 0.6, None])
        body = {"model": name, "prompt": f"def wave_{i}(", "max_tokens": 16, "temperature": 0,
                "ignore_eos": True, "stream": stream}
        timeout = aiohttp.ClientTimeout(total=leave if not stream and leave else 120)
        try:
            async with session.post(url, json=body, timeout=timeout) as response:
                if not stream:
                    return (await response.json())["choices"][0]["finish_reason"]
                events, finish = 0, None
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        events += 1
                        finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
                        if leave is not None and events >= leave:
                            return "left"
                return finish
        except asyncio.TimeoutError:
            return "left"

    async def waves() -> list[str]:
        async with aiohttp.ClientSession() as session:
            results = []
            for wave in range(2):
                results += await asyncio.gather(*(one(session, 8 * wave + i) for i in range(8)))
            return results

    results = asyncio.run(waves())
    assert set(results) <= {"left", "length"} and 4 <= results.count("left") <= 14, results
    wait_until(lambda: server.gateway.in_flight == 0, 15.0)
    wait_engine_idle(engine, timeout=15.0)
    assert server.gateway.admission.queued == 0 and server.gateway.admission.queued_tokens == 0
    # Each abandoned request was aborted (not run to its end for nobody).
    requests = server.metrics.requests
    assert requests.labels("abort")._value.get() == results.count("left")
    assert requests.labels("length")._value.get() == results.count("length")


# --------------------------------------------------------------------------- without a model


def test_parse_maps_openai_and_vllm_fields():
    chat = proto.parse_chat({
        "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 7, "stop": "\n", "logit_bias": {"42": -100}, "top_k": 5,
        "logprobs": True, "user": "someone", "stream": True,
        "stream_options": {"include_usage": True}, "seed": None})
    assert chat.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    assert chat.fields == {"max_tokens": 7, "stop": ("\n",), "logit_bias": {42: -100}, "top_k": 5,
                           "logprobs": 0}
    assert chat.stream and chat.include_usage and chat.model == "m"
    # Both names: max_completion_tokens wins (vLLM's); top_logprobs 0 alone asks for nothing.
    both = proto.parse_chat({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                             "max_completion_tokens": 5, "top_logprobs": 0})
    assert both.fields == {"max_tokens": 5} and not both.chat_logprobs
    only = proto.parse_completion({"prompt": "x", "max_tokens": 0, "echo": True})
    assert only.prompt_only and only.fields["max_tokens"] == 1

    completion = proto.parse_completion({"prompt": [[1, 2], [3]], "logprobs": 3, "echo": True,
                                         "best_of": 1, "guided_choice": ["a", "b"], "cache_salt": "t"})
    assert completion.fields["cache_salt"] == "t"
    assert completion.prompts == [[1, 2], [3]] and completion.echo
    assert completion.fields["logprobs"] == 3 and completion.fields["prompt_logprobs"] == 3
    assert tuple(completion.fields["structured_outputs"].choice) == ("a", "b")

    for body, field in [({"prompt": "x", "best_of": 3}, "best_of"), ({"prompt": "x", "suffix": "y", "echo": True}, "suffix"),
                        ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
                        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
                        ({"prompt": "x", "guided_json": {}, "guided_regex": "a"}, "guided_json"),
                        ({"prompt": [1, "a"]}, "prompt"), ({"prompt": "x", "stop": [1]}, "stop"),
                        ({"prompt": "x", "stream": "yes"}, "stream"),
                        ({"prompt": "x", "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
                        ({"prompt": "x", "structured_outputs": {"jsonn": {}}}, "jsonn")]:
        with pytest.raises(ValueError, match=field):
            proto.parse_completion(body)
    # A strict tool (OpenAI's "strict": true) holds "auto" calls to its schema: a structural tag.
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    tagged = proto.parse_chat({"messages": [{"role": "user", "content": "x"}], "tools": [strict]})
    (begin, schema, end), = tagged.fields["structured_outputs"].structural_tag["structures"]
    assert begin == '<tool_call>\n{"name": "get_weather", "arguments": ' and schema["required"] == ["city"]
    assert "structured_outputs" not in proto.parse_chat(
        {"messages": [{"role": "user", "content": "x"}], "tools": [strict], "tool_choice": "none"}).fields
    for body, field in [({"messages": []}, "messages"),
                        ({"messages": [{"role": "user", "content": "x"}], "tools": [strict],
                          "response_format": {"type": "json_object"}}, 'a tool marked "strict": true'),
                        ({"messages": [{"role": "robot", "content": "x"}]},
                         r"messages\[0\]\.role is \"robot\"; expected one of system, developer"),
                        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "get_weather"},
                         "tool_choice"),
                        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web"}]},
                         "tools"),
                        ({"messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "xml"}}, "response_format"),
                        ({"messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "structural_tag", "triggers": ["<a>"],
                                              "structures": [{"begin": "<b>", "end": ""}]}},
                         r"response_format\.structures\[0\]\.begin")]:
        with pytest.raises(ValueError, match=field):
            proto.parse_chat(body)


def test_responses_request_becomes_the_chat_request_it_means():
    from server.responses_protocol import to_chat_body

    chat = to_chat_body({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 5, "top_p": 0.5,
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}},
        "input": [{"role": "developer", "content": "d"}, {"role": "user", "content": "q"},
                  {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
                  {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "call_1", "output": "1"}],
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "f"}, "top_k": 3, "parallel_tool_calls": False})
    assert chat["max_tokens"] == 5 and chat["top_p"] == 0.5 and chat["top_k"] == 3
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    roles = [m["role"] for m in chat["messages"]]
    assert roles == ["system", "developer", "user", "assistant", "tool"]
    assert [c["id"] for c in chat["messages"][3]["tool_calls"]] == ["call_1", "call_2"]  # one turn
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                                "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    parsed = proto.parse_chat(dict(chat, tool_choice="none"))  # and it is a valid chat request
    assert parsed.fields["max_tokens"] == 5 and parsed.messages[1]["role"] == "system"
    assert parsed.parallel_tool_calls is False
    for body, message in (({"input": []}, "input must be"), ({"input": "x", "truncation": "auto"},
                                                            "truncation"),
                          ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning")):
        with pytest.raises(ValueError, match=message):
            to_chat_body(body)


def test_tool_call_stream_holds_back_only_what_may_be_a_call():
    def run(text: str, pieces: int = 1, **request) -> tuple[str, str, list]:
        parsed = proto.ParsedRequest(fields={}, tools=[WEATHER], **request)
        stream = proto.ToolCallStream(parsed)
        sent = "".join(stream.feed(text[i:i + pieces]) for i in range(0, len(text), pieces))
        rest, calls = stream.finish()
        return sent, rest, calls

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for size in (1, 3, 1000):
        sent, rest, calls = run("Let me check. " + call, size)
        assert sent + rest == "Let me check." and [c.name for c in calls] == ["get_weather"]
        # Text that only looks like the tag's start is sent once it is clearly not one.
        sent, rest, calls = run("a <tool is not <b> a call", size)
        assert sent + rest == "a <tool is not <b> a call" and not calls
        assert "<" not in run("x <tool_c", size)[0]
    sent, rest, calls = run('{"name": "get_weather", "arguments": {"city": "Oslo"}}', 2)
    assert sent == rest == "" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    fenced = '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'
    assert run(fenced, 2)[:2] == ("", "") and len(run(fenced, 2)[2]) == 1
    # A reply that opens like one but is not (code, a list of numbers) streams from there on.
    code = "```python\ndef f():\n    return 1\n```"
    for text in (code, "[1, 2, 3] are the numbers", "{a} is a set"):
        sent, rest, calls = run(text, 2)
        assert sent + rest == text and not calls and len(sent) >= len(text) - 4
    sent, rest, calls = run('[{"name": "get_weather", "arguments": {"city": "Rome"}}]',
                            tool_choice="required")
    assert sent == rest == "" and len(calls) == 1
    two = call + "\n" + call.replace("Paris", "Rome")
    assert [json.loads(c.arguments)["city"] for c in run(two)[2]] == ["Paris", "Rome"]
    sent, rest, calls = run("Sure. " + two, 4, parallel_tool_calls=False)
    assert sent + rest == "Sure." and [json.loads(c.arguments)["city"] for c in calls] == ["Paris"]
    assert run("plain <tool_call> text", tool_choice="none") == ("plain <tool_call> text", "", [])


def test_the_chat_stream_sends_calls_as_they_are_written():
    """stream_calls (the chat completions stream): a call's id and name go out once its head is
    written, its arguments piece by piece after; a call the scanner cannot follow comes whole
    at the end, after those it streamed (finish's calls past ``opened``)."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    odd = '<tool_call>\n{"arguments": {"city": "Rome"}, "name": "get_weather"}\n</tool_call>'
    stream = proto.ChatStream(proto.ParsedRequest(fields={}, tools=[WEATHER]), stream_calls=True)
    content, deltas, when = "", [], []
    text = "On it. " + call + "\n" + odd
    for i in range(0, len(text), 3):
        content += stream.feed(text[i:i + 3])[1]
        pieces = [proto.call_piece_json(*piece) for piece in stream.call_pieces()]
        deltas, when = deltas + pieces, when + [i + 3] * len(pieces)
    # The name went out with the arguments' brace, the arguments as they came.
    assert when[0] == text.index('{"city"') + 3 - text.index('{"city"') % 3
    assert len(deltas) > 3 and when[-1] <= text.index("}\n</tool_call>") + 3
    _, rest, calls = stream.finish()
    assert content + rest == "On it." and [c.name for c in calls] == ["get_weather"] * 2
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"] == {"name": "get_weather",
                                                                              "arguments": ""}
    assert all(d["index"] == 0 and set(d) == {"index", "function"} for d in deltas[1:])
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"city": "Paris"}
    assert stream.tools.opened == 1 and json.loads(calls[1].arguments) == {"city": "Rome"}


def test_bench_serving_over_the_http_api(base, tmp_path):
    """scripts/bench_serving.py --base-url: the load any OpenAI-compatible server can take; every
    request completes and the tokens counted from the usage stats add up."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_serving.py"
    spec = importlib.util.spec_from_file_location("bench_serving", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serving.json"
    assert bench.main(["--base-url", base, "--requests", "4", "--concurrency", "2", "--max-tokens", "5",
                       "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["api"] == "openai" and summary["completed"] == 4 and summary["output_tokens"] == 20
    assert 0 < summary["ttft_p50_s"] <= summary["e2e_p50_s"]
    # vLLM's random dataset: prompts of random token ids through /v1/completions.
    assert bench.main(["--base-url", base, "--requests", "2", "--concurrency", "2", "--input-len", "40",
                       "--output-len", "3", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["input_len"] == 40 and summary["completed"] == 2 and summary["output_tokens"] == 6


def test_wrong_types_are_refused_naming_the_field(base, name):
    """Every field of both endpoints, given values of the wrong kind: the answer is a 400 that
    names the field (or, where the value happens to be valid, a completed request); never a 500."""
    values = ["x", {"a": 1}]  # a string and an object are wrong for nearly every field
    valid = {"model": name, "max_tokens": 1}
    seen = 0
    for path, fields, base_body in [
            ("/v1/completions", proto.COMPLETION_FIELDS, {"prompt": "def f("}),
            ("/v1/chat/completions", proto.CHAT_FIELDS, {"messages": [{"role": "user", "content": "hi"}]})]:
        for field in sorted(fields):
            for value in values:
                body = {**base_body, **valid, field: value}
                if field in ("stream", "stream_options"):
                    continue  # a streamed answer is tested elsewhere; their types are checked below
                status, answer = http(base, path, body)
                assert status in (200, 400, 404), (path, field, value, status, answer)
                if status == 400:
                    message = answer["error"]["message"]
                    # The field, or (for the guided_* names, checked once mapped) its last word.
                    assert field in message or field.split("_")[-1] in message, (field, value, message)
                if status == 404:
                    assert field == "model"
                seen += 1
    assert seen > 150
    for body in ({"stream": "yes"}, {"stream_options": [1]}, {"stream_options": {"include_usage": 1},
                                                              "stream": True}):
        status, answer = http(base, "/v1/completions", {"prompt": "x", **valid, **body})
        assert status == 400 and "stream" in answer["error"]["message"]


def test_bench_frontend_runs_and_counts_every_token(tmp_path):
    """scripts/bench_frontend.py (the front end's CPU cost per streamed token), tiny and quick:
    every token of every request arrives over each protocol, one chunk per token at most."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_frontend.py"
    spec = importlib.util.spec_from_file_location("bench_frontend", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "frontend.json"
    assert bench.main(["--requests", "4", "--tokens", "5", "--concurrency", "2", "--step-ms", "5",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["api"] for r in rows] == ["direct", "grpc", "openai"]
    for r in rows:
        assert r["tokens"] == 20 and 1 <= r["tokens_per_chunk"] <= 5, r
    assert rows[1]["loop_us_per_chunk"] > 0 and rows[2]["loop_us_per_chunk"] > 0
