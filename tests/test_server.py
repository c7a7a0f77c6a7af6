"""The gRPC server over the real Qwen2.5-Coder-0.5B (float32, CPU), through real loopback channels.

One model, engine and EngineThread (session fixtures in conftest, shared with
test_server_openai.py) serve the module; several servers share them (plain,
token-protected, TLS, small admission limits). The SIGTERM test runs the
server as a subprocess (``python -m server``) with the same engine shapes, so it
reuses the persistent compile cache the in-process warm-up filled.
"""
from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwenjax_proto.v1 import inference_pb2 as pb
from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc
from server_harness import (SERVER_DTYPE, SERVER_ENGINE, Lines, Servers, acollect, code_of, collect,
                            free_port, greedy, scrape, wait_engine_idle, wait_until)

pytestmark = pytest.mark.real_model

REPO = pathlib.Path(__file__).resolve().parents[1]
DTYPE, ENGINE = SERVER_DTYPE, SERVER_ENGINE
MAX_REQUEST_BYTES = 64 << 10
TOKEN = "test-token-7f3a"


# --------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def model(served_model):
    return served_model


@pytest.fixture(scope="module")
def loop(server_loop):
    return server_loop


@pytest.fixture(scope="module")
def engine_thread(served_engine_thread):
    return served_engine_thread


@pytest.fixture(scope="module")
def start_server(loop, engine_thread):
    servers = Servers(loop, engine_thread, port=0, metrics_port=0, max_request_bytes=MAX_REQUEST_BYTES)
    yield servers.start
    servers.stop_all()


@pytest.fixture(scope="module")
def served(start_server):
    return start_server(max_queue=64)


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(served.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.InferenceStub(channel)


# --------------------------------------------------------------------------- stubs


def _serialized_descriptor(pb2_source: str) -> bytes:
    import ast

    return ast.literal_eval(re.search(r"AddSerializedFile\((b'.*?')\)\n", pb2_source).group(1))


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from importlib.metadata import version

    from qwenjax_proto import regenerate

    fresh = {path.name: path.read_text() for path in regenerate.generate(tmp_path)}
    committed = {name: (regenerate.PACKAGE_DIR / name).read_text() for name in fresh}
    stale = "stale stubs: run python -m qwenjax_proto.regenerate and commit the result"
    generated_by = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed["inference_pb2_grpc.py"]).group(1)
    if version("grpcio-tools") == generated_by:
        for name in fresh:
            assert committed[name] == fresh[name], f"{name}: {stale}"
    else:
        # Another grpcio-tools writes other version stamps; the schema itself must still agree.
        assert (_serialized_descriptor(committed["inference_pb2.py"])
                == _serialized_descriptor(fresh["inference_pb2.py"])), stale


# --------------------------------------------------------------------------- generation


PROMPTS = [f"def {name}(" for name in (
    "add", "subtract", "multiply", "divide", "fibonacci", "factorial", "is_prime", "gcd", "lcm",
    "reverse_string", "is_palindrome", "flatten", "chunks", "merge_sorted", "binary_search",
    "quicksort", "mergesort", "transpose", "dot", "mean", "median", "mode", "variance", "softmax",
    "relu", "sigmoid", "read_json", "write_csv", "count_words", "unique", "rotate_left", "clamp")]


def test_32_concurrent_streams_match_the_greedy_reference(model, served):
    from qwenjax.greedy import GreedyGenerator

    lm, engine = model
    tokenizer = lm.tokenizer
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    reference = GreedyGenerator(lm).generate(prompt_ids, 16, stop_token_ids=tokenizer.eos_token_ids)
    before = scrape(served.metrics_port)

    async def run_all():
        async with grpc.aio.insecure_channel(served.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            calls = [stub.Generate(pb.GenerateRequest(text=p, sampling=greedy(16)), timeout=240)
                     for p in PROMPTS]
            return await asyncio.gather(*(acollect(c) for c in calls))

    results = asyncio.run(run_all())
    for i, (ids, text, complete) in enumerate(results):
        assert ids == reference[i], f"prompt {i} {PROMPTS[i]!r}"
        assert text == tokenizer.decode(reference[i]), f"prompt {i}"
        assert complete.finish_reason == ("stop" if ids[-1] in tokenizer.eos_token_ids else "length")
        assert complete.usage.prompt_tokens == len(prompt_ids[i])
        assert complete.usage.completion_tokens == len(ids)
        assert 0 < complete.timing.ttft_ms <= complete.timing.e2e_ms

    # A client sees Complete just before its handler's bookkeeping runs.
    wait_until(lambda: served.gateway.in_flight == 0, 5.0)
    after = scrape(served.metrics_port)
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    finished = sum(delta(f'qwenjax:requests_total{{finish_reason="{r}"}}') for r in ("stop", "length"))
    assert finished == 32
    assert delta("qwenjax:generation_tokens_total") == sum(len(r[0]) for r in results)
    assert delta("qwenjax:prompt_tokens_total") == sum(map(len, prompt_ids))
    assert delta("qwenjax:time_to_first_token_seconds_count") == 32
    assert delta("qwenjax:e2e_request_latency_seconds_count") == 32
    # Per request: its prompt and output sizes, and where its time went on the engine.
    assert delta("qwenjax:request_prompt_tokens_count") == 32
    assert delta("qwenjax:request_prompt_tokens_sum") == sum(map(len, prompt_ids))
    assert delta("qwenjax:request_generation_tokens_sum") == sum(len(r[0]) for r in results)
    for phase in ("queue", "prefill", "decode"):
        assert delta(f"qwenjax:request_{phase}_time_seconds_count") == 32, phase
        assert delta(f"qwenjax:request_{phase}_time_seconds_sum") > 0, phase
    assert delta("qwenjax:time_per_output_token_seconds_count") == sum(len(r[0]) > 1 for r in results)
    assert 0 <= after["qwenjax:kv_cache_usage_perc"] <= 1 and "qwenjax:num_preemptions_total" in after
    assert after["qwenjax:kv_pages_total"] == ENGINE["num_pages"]
    wait_engine_idle(engine)


def test_prefix_cache_reuse_shows_in_usage_and_metrics(model, served, stub):
    """A second request with the same long preamble reuses its full pages: same greedy output,
    Usage.cached_tokens counts them, and the hit counters move by as much."""
    from qwenjax.greedy import GreedyGenerator

    lm, engine = model
    preamble = "You answer questions about the inventory of a small hardware shop in Lyon. " * 5
    prompts = [preamble + "How many hammers are left?", preamble + "Which screws sell best?"]
    ids = [lm.tokenizer.encode(p) for p in prompts]
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert shared >= 64
    reference = GreedyGenerator(lm).generate(ids, 4, stop_token_ids=lm.tokenizer.eos_token_ids)
    before = scrape(served.metrics_port)
    results = [collect(stub.Generate(pb.GenerateRequest(text=p, sampling=greedy(4)), timeout=120))
               for p in prompts]
    wait_until(lambda: served.gateway.in_flight == 0, 5.0)
    after = scrape(served.metrics_port)
    assert [r[0] for r in results] == reference
    page = ENGINE["page_size"]
    assert results[0][2].usage.cached_tokens == 0
    assert results[1][2].usage.cached_tokens == shared // page * page
    delta = lambda name: after[name] - before.get(name, 0.0)  # noqa: E731
    assert delta("qwenjax:prefix_cache_hits_total") == shared // page * page
    assert delta("qwenjax:prefix_cache_queries_total") == sum(map(len, ids))
    wait_engine_idle(engine)


def test_logprobs_stop_strings_and_seeded_sampling(stub):
    responses = list(stub.Generate(pb.GenerateRequest(
        text="def add(", sampling=greedy(3, logprobs=2, ignore_eos=True)), timeout=60))
    ids, _, complete = collect(responses)
    assert complete.finish_reason == "length"
    logprobs = [lp for r in responses if r.HasField("chunk") for lp in r.chunk.logprobs]
    assert [lp.token_id for lp in logprobs] == ids and len(ids) == 3
    for lp in logprobs:
        assert len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob
        assert lp.top[0].token_id == lp.token_id  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top[0].logprob) and lp.logprob <= 0.0

    # Scoring: the prompt and those 3 tokens, fed back as a prompt, score each token as
    # generation did (a different path: prefill chunk, not decode rows).
    prompt = list(stub.Tokenize(pb.TokenizeRequest(text="def add("), timeout=60).ids)
    scored = list(stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt + ids), sampling=greedy(1, prompt_logprobs=1)), timeout=60))
    entries = scored[0].chunk.prompt_logprobs
    assert [e.token_id for e in entries] == (prompt + ids)[1:]
    assert [len(e.top) for e in entries] == [1] * len(entries)
    for e, lp in zip(entries[-3:], logprobs):
        assert e.top[0].token_id == e.token_id and e.logprob == pytest.approx(lp.logprob, abs=0.05)
    assert all(not r.chunk.prompt_logprobs for r in scored[1:] if r.HasField("chunk"))

    # A stop string cuts the text and is reported; the engine found it, not the client.
    _, text, complete = collect(stub.Generate(pb.GenerateRequest(
        text="def add(a, b):\n", sampling=greedy(32, stop=["return"])), timeout=60))
    assert complete.finish_reason == "stop" and complete.matched_stop == "return"
    assert "return" not in text

    sampled = pb.SamplingParams(max_tokens=6, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    first = collect(stub.Generate(pb.GenerateRequest(text="import numpy", sampling=sampled), timeout=60))
    again = collect(stub.Generate(pb.GenerateRequest(text="import numpy", sampling=sampled), timeout=60))
    assert first[0] == again[0] and len(first[0]) == 6


# --------------------------------------------------------------------------- reflection


def test_a_client_built_from_reflection_alone_can_generate(served):
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase)

    with grpc.insecure_channel(served.address) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        assert set(database.get_services()) >= {
            "qwenjax.v1.Inference", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
        pool = descriptor_pool.DescriptorPool(database)  # its own pool: no generated code involved
        service = pool.FindServiceByName("qwenjax.v1.Inference")
        assert {m.name for m in service.methods} == {
            "Generate", "Abort", "Tokenize", "Detokenize", "GetModelInfo", "LoadLoRAAdapter",
            "UnloadLoRAAdapter", "Embed"}
        method = service.methods_by_name["Generate"]
        assert method.server_streaming and not method.client_streaming
        Request = message_factory.GetMessageClass(method.input_type)
        Response = message_factory.GetMessageClass(method.output_type)
        assert Request is not pb.GenerateRequest
        generate = ch.unary_stream("/qwenjax.v1.Inference/Generate",
                                   request_serializer=Request.SerializeToString,
                                   response_deserializer=Response.FromString)
        request = Request(text="def add(")
        request.sampling.max_tokens = 4
        request.sampling.temperature = 0.0
        request.sampling.ignore_eos = True
        responses = list(generate(request, timeout=60))
        tokens = [t for r in responses if r.WhichOneof("kind") == "chunk" for t in r.chunk.token_ids]
        assert len(tokens) == 4
        assert responses[-1].complete.finish_reason == "length"


# --------------------------------------------------------------------------- cancellation


def test_cancel_mid_stream_frees_pages_within_one_second(model, served, stub):
    _, engine = model
    wait_engine_idle(engine)
    call = stub.Generate(pb.GenerateRequest(text="def fibonacci(n):", sampling=greedy(400, ignore_eos=True)),
                         timeout=120)
    chunks = 0
    for response in call:
        chunks += response.HasField("chunk")
        if chunks == 3:
            break
    metrics = scrape(served.metrics_port)
    assert metrics["qwenjax:kv_pages_used"] > 0 and metrics["qwenjax:requests_running"] == 1
    call.cancel()
    elapsed = wait_until(lambda: scrape(served.metrics_port)["qwenjax:kv_pages_used"] == 0, 1.0)
    assert elapsed < 1.0
    wait_until(lambda: scrape(served.metrics_port).get('qwenjax:requests_total{finish_reason="abort"}', 0) >= 1, 2.0)
    assert scrape(served.metrics_port)["qwenjax:requests_running"] == 0

    # A deadline ends the request on the server too, not only the client's wait.
    call = stub.Generate(pb.GenerateRequest(text="def fibonacci(n):", sampling=greedy(400, ignore_eos=True)),
                         timeout=1.5)
    assert code_of(call)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    elapsed = wait_until(lambda: scrape(served.metrics_port)["qwenjax:kv_pages_used"] == 0, 1.0)
    assert elapsed < 1.0 and engine.num_unfinished == 0


DISCONNECTING_CLIENT = """
import sys, grpc
from qwenjax_proto.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
stub = pb_grpc.InferenceStub(grpc.insecure_channel(sys.argv[1]))
for response in stub.Generate(pb.GenerateRequest(text="def main():", sampling=pb.SamplingParams(
        max_tokens=400, temperature=0.0, ignore_eos=True))):
    print("chunk", flush=True)
"""


def test_a_client_that_dies_mid_stream_frees_its_pages(model, served):
    _, engine = model
    wait_engine_idle(engine)
    client = subprocess.Popen([sys.executable, "-c", DISCONNECTING_CLIENT, served.address], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        lines = Lines(client, client.stdout)
        for _ in range(2):
            lines.until("chunk", 60)
        assert engine.allocator.num_used > 0
        client.kill()  # no cancel frame: the server only sees the connection drop
        client.wait(10)
        elapsed = wait_until(lambda: scrape(served.metrics_port)["qwenjax:kv_pages_used"] == 0, 1.0)
        assert elapsed < 1.0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)


def test_200_random_cancels_and_deadlines_leak_no_page(model, served):
    lm, engine = model
    rng = np.random.default_rng(7)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    outcomes: dict[grpc.StatusCode, int] = {}

    async def one(stub, k: int):
        prompt = " ".join(rng.choice(words, int(rng.integers(1, 80))))
        # Up to 300 tokens: far more than a call lives, so a request whose abort got lost would
        # still be running when the waves end.
        call = stub.Generate(pb.GenerateRequest(
            text=prompt, sampling=greedy(int(rng.integers(1, 300)), ignore_eos=True)),
            timeout=float(rng.uniform(0.02, 1.5)))
        mode, stop_after, delay = k % 3, int(rng.integers(1, 4)), float(rng.uniform(0.0, 1.0))

        async def consume():
            seen = 0
            async for _ in call:
                seen += 1
                if mode == 1 and seen >= stop_after:
                    call.cancel()  # the client walks away mid-stream

        try:
            if mode == 2:  # cancelled from outside after a random delay, whatever it is doing
                try:
                    await asyncio.wait_for(consume(), delay)
                except asyncio.TimeoutError:
                    call.cancel()
            else:  # mode 0: the deadline ends it; mode 1: the client cancels
                await consume()
        except grpc.aio.AioRpcError:
            pass
        except asyncio.CancelledError:
            pass
        code = await call.code()
        outcomes[code] = outcomes.get(code, 0) + 1

    async def waves():
        async with grpc.aio.insecure_channel(served.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            for wave in range(8):
                await asyncio.wait_for(asyncio.gather(*(one(stub, wave * 25 + i) for i in range(25))), 30)

    asyncio.run(waves())
    assert sum(outcomes.values()) == 200
    assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED,
                             grpc.StatusCode.DEADLINE_EXCEEDED}, outcomes
    assert outcomes.get(grpc.StatusCode.CANCELLED, 0) > 20
    assert outcomes.get(grpc.StatusCode.DEADLINE_EXCEEDED, 0) > 20
    wait_engine_idle(engine, timeout=2.0)
    engine.check()  # the engine is idle: its state is safe to read from here
    assert engine.allocator.num_free == engine.allocator.num_pages
    wait_until(lambda: served.gateway.in_flight == 0, 5.0)
    assert served.gateway.admission.queued == 0 and served.gateway.admission.queued_tokens == 0
    metrics = scrape(served.metrics_port)
    assert metrics["qwenjax:kv_pages_used"] == 0 and metrics["qwenjax:requests_waiting"] == 0


def test_n_sequences_stream_with_their_index(stub):
    sampling = dict(max_tokens=3, temperature=1.0, ignore_eos=True)
    responses = list(stub.Generate(pb.GenerateRequest(
        text="def f(", sampling=pb.SamplingParams(n=2, seed=5, **sampling)), timeout=60))
    tokens, completes = {0: [], 1: []}, {}
    for r in responses:
        if r.HasField("chunk"):
            assert r.chunk.index not in completes, "a chunk after its sequence's Complete"
            tokens[r.chunk.index] += r.chunk.token_ids
        else:
            completes[r.complete.index] = r.complete
    assert sorted(completes) == [0, 1] and responses[-1].HasField("complete")
    for i in (0, 1):
        assert len(tokens[i]) == completes[i].usage.completion_tokens == 3
        assert completes[i].finish_reason == "length"
    # Sequence 1 of a request seeded 5 is the single request seeded 6.
    ids, _, _ = collect(stub.Generate(pb.GenerateRequest(
        text="def f(", sampling=pb.SamplingParams(seed=6, **sampling)), timeout=60))
    assert ids == tokens[1]


def test_truncate_prompt_tokens_and_bad_words_over_the_wire(stub):
    max_len = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60).max_context
    # A prompt over the context, truncated to it: admitted, one token to sample.
    ids, _, complete = collect(stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[11] * (max_len + 5)),
        sampling=pb.SamplingParams(truncate_prompt_tokens=-1, temperature=0)), timeout=120))
    assert complete.usage.prompt_tokens == max_len and len(ids) == 1
    _, text, _ = collect(stub.Generate(pb.GenerateRequest(
        text="def add(a, b):\n", sampling=greedy(8, bad_words=["return"])), timeout=60))
    assert "return" not in text and text.strip()
    _, text, complete = collect(stub.Generate(pb.GenerateRequest(
        text="The best language is", sampling=greedy(8, structured_outputs=pb.StructuredOutputs(
            choice=pb.Choices(choices=[" Python", " Rust"])))), timeout=60))
    assert text in (" Python", " Rust") and complete.finish_reason == "stop"
    # A structural tag: free text, and after each " <" the number 42 and ">" (unconstrained,
    # the model writes " <1>1</1>NUMBER</n>: <2>…").
    tag = {"structures": [{"begin": " <", "schema": {"enum": [42]}, "end": ">"}], "triggers": [" <"]}
    _, text, _ = collect(stub.Generate(pb.GenerateRequest(
        text="Pick a number and write it as <n>NUMBER</n>:", sampling=greedy(
            24, structured_outputs=pb.StructuredOutputs(structural_tag=json.dumps(tag)))), timeout=60))
    tagged = re.findall(r" <([^>]*)>?", text)
    assert len(tagged) > 1 and set(tagged[:-1]) == {"42"}, text


def test_tool_calls_over_the_wire(stub):
    """A named tool_choice: the reply is that call, parsed into Complete.tool_calls; the same
    conversation with the call and its result continues from them."""

    tools = [pb.Tool(name="add", description="Add two integers", parameters=json.dumps(
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
         "required": ["a", "b"]}))]
    question = pb.Message(role="user", content="What is 2 + 3? Use the tool.")
    _, text, complete = collect(stub.Generate(pb.GenerateRequest(
        messages=pb.Messages(messages=[question]), tools=tools, tool_choice="add",
        sampling=greedy(40)), timeout=60))
    assert complete.finish_reason == "stop", text  # a forced call, as OpenAI's API ends it
    (call,) = complete.tool_calls
    assert call.name == "add" and set(json.loads(call.arguments)) == {"a", "b"} and call.id
    assert complete.content == ""
    history = [question, pb.Message(role="assistant", tool_calls=[call]),
               pb.Message(role="tool", content="5")]
    ids, _, complete = collect(stub.Generate(pb.GenerateRequest(
        messages=pb.Messages(messages=history), tools=tools, tool_choice="none",
        sampling=greedy(4)), timeout=60))
    assert ids and complete.finish_reason in ("stop", "length") and not complete.tool_calls
    # parallel_tool_calls false: "required" asks for a list of one call, though the question
    # names two cities.
    weather = pb.Tool(name="get_weather", parameters=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
    _, text, complete = collect(stub.Generate(pb.GenerateRequest(
        messages=pb.Messages(messages=[pb.Message(role="user", content="Weather in Paris and Rome?")]),
        tools=[weather], tool_choice="required", parallel_tool_calls=False, sampling=greedy(60)),
        timeout=60))
    (call,) = complete.tool_calls
    assert len(json.loads(text)) == 1 and complete.finish_reason == "tool_calls", text


# --------------------------------------------------------------------------- validation


def fuzz_cases(vocab: int, max_len: int):
    """(field the message must name, request) pairs; every request is invalid."""
    SP = pb.SamplingParams
    text = lambda **sampling: pb.GenerateRequest(text="def f(", sampling=SP(**sampling))  # noqa: E731
    nan, inf = math.nan, math.inf
    cases = [
        ("max_tokens", text(max_tokens=0)), ("max_tokens", text(max_tokens=-5)),
        ("max_tokens", text(max_tokens=2**31 - 1)), ("max_tokens", text(max_tokens=max_len)),
        ("min_tokens", text(min_tokens=-1)), ("min_tokens", text(max_tokens=2, min_tokens=5)),
        ("temperature", text(temperature=-0.5)), ("temperature", text(temperature=nan)),
        ("temperature", text(temperature=inf)), ("top_k", text(top_k=-7)),
        ("top_p", text(top_p=0.0)), ("top_p", text(top_p=1.5)), ("top_p", text(top_p=nan)),
        ("min_p", text(min_p=-0.1)), ("min_p", text(min_p=2.0)),
        ("repetition_penalty", text(repetition_penalty=0.0)),
        ("repetition_penalty", text(repetition_penalty=-1.0)),
        ("repetition_penalty", text(repetition_penalty=nan)),
        ("presence_penalty", text(presence_penalty=3.0)),
        ("frequency_penalty", text(frequency_penalty=-2.5)),
        ("frequency_penalty", text(frequency_penalty=1e308 * 10)),
        ("seed", text(seed=-2)), ("seed", text(seed=-(2**63))),  # (-1: no seed, as vLLM's)
        ("logprobs", text(logprobs=-1)), ("logprobs", text(logprobs=21)),
        ("prompt_logprobs", text(prompt_logprobs=21)),
        ("truncate_prompt_tokens", text(truncate_prompt_tokens=0)), ("cache_salt", text(cache_salt="")),
        ("thinking_token_budget", text(thinking_token_budget=-1)),
        ("thinking_token_budget limits a reasoning model", text(thinking_token_budget=3)),
        ("bad_words", text(bad_words=[""])), ("bad_words", text(bad_words=["w"] * 129)),
        ("structured_outputs must set one", text(structured_outputs=pb.StructuredOutputs())),
        ("tools need the messages input", pb.GenerateRequest(text="hi", tools=[pb.Tool(name="f")])),
        ("continue_final_message needs the messages input",
         pb.GenerateRequest(text="hi", continue_final_message=True)),
        ("continue_final_message needs the last message", pb.GenerateRequest(
            messages=pb.Messages(messages=[pb.Message(role="user", content="hi")]),
            continue_final_message=True)),
        ("tools[0].parameters is not JSON", pb.GenerateRequest(
            messages=pb.Messages(messages=[pb.Message(role="user", content="hi")]),
            tools=[pb.Tool(name="f", parameters="{")])),
        ('a tool marked "strict": true constrains the output itself', pb.GenerateRequest(
            messages=pb.Messages(messages=[pb.Message(role="user", content="hi")]),
            tools=[pb.Tool(name="f", strict=True)],
            sampling=SP(structured_outputs=pb.StructuredOutputs(regex="a+")))),
        ("tool_choice 'g' is not", pb.GenerateRequest(
            messages=pb.Messages(messages=[pb.Message(role="user", content="hi")]),
            tools=[pb.Tool(name="f")], tool_choice="g")),
        ("offers no tools", pb.GenerateRequest(
            messages=pb.Messages(messages=[pb.Message(role="user", content="hi")]), tool_choice="required")),
        ("structured_outputs.regex does not compile",
         text(structured_outputs=pb.StructuredOutputs(regex="(unclosed"))),
        ("structured_outputs.json", text(structured_outputs=pb.StructuredOutputs(json="[1, 2"))),
        ("structured_outputs.choice", text(structured_outputs=pb.StructuredOutputs(choice=pb.Choices()))),
        ("structured_outputs.structural_tag.triggers",
         text(structured_outputs=pb.StructuredOutputs(structural_tag='{"structures": []}'))),
        ("stop", text(stop=[""])), ("stop", text(stop=["x"] * 17)), ("stop", text(stop=["y" * 300])),
        ("stop_token_ids", text(stop_token_ids=[-1])), ("stop_token_ids", text(stop_token_ids=[vocab])),
        ("n must be", text(n=0)), ("n must be", text(n=129)),
        ("logit_bias[5]", text(logit_bias={5: nan})), ("logit_bias keys", text(logit_bias={-3: 1.0})),
        ("logit_bias has", text(logit_bias={vocab: 1.0})),
        ("allowed_token_ids", text(allowed_token_ids=[-1])),
        ("allowed_token_ids has", text(allowed_token_ids=[4, vocab])),
        ("prompt is empty", pb.GenerateRequest(text="")),
        ("prompt is empty", pb.GenerateRequest(token_ids=pb.TokenIds())),
        ("input", pb.GenerateRequest()),
        ("input", pb.GenerateRequest(sampling=SP(max_tokens=4))),
        ("prompt token", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-5]))),
        ("prompt token", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, vocab]))),
        ("prompt token", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2**31 - 1]))),
        ("max context", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[11] * (max_len + 1)))),
        # A full context may sample one token: an unset max_tokens is capped to that, one set is not.
        ("max context", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[11] * max_len), sampling=SP(max_tokens=2))),
        ("max context", pb.GenerateRequest(text="hello " * (max_len + 10))),
        ("max context", pb.GenerateRequest(text="x = 1\n" * 20, sampling=SP(max_tokens=max_len - 50))),
        ("messages", pb.GenerateRequest(messages=pb.Messages())),
        ("role", pb.GenerateRequest(messages=pb.Messages(messages=[pb.Message(role="wizard", content="hi")]))),
        ("role", pb.GenerateRequest(messages=pb.Messages(messages=[
            pb.Message(role="user", content="hi"), pb.Message(role="", content="x")]))),
        ("bytes", pb.GenerateRequest(text="a" * (MAX_REQUEST_BYTES + 1))),
        ("bytes", pb.GenerateRequest(messages=pb.Messages(messages=[
            pb.Message(role="user", content="é" * MAX_REQUEST_BYTES)]))),
        ("bytes", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[100_000] * (MAX_REQUEST_BYTES // 2)))),
    ]
    return cases


def with_unknown_field(request: pb.GenerateRequest) -> bytes:
    # Field 99 as a varint: what a client built from a newer .proto might send.
    return request.SerializeToString() + b"\x98\x06\x01"


def test_300_malformed_requests_get_invalid_argument_and_valid_ones_keep_working(model, served, channel, stub):
    lm, engine = model
    cases = fuzz_cases(lm.config.vocab_size, ENGINE["max_model_len"])
    raw_generate = channel.unary_stream("/qwenjax.v1.Inference/Generate",
                                        request_serializer=lambda b: b,
                                        response_deserializer=pb.GenerateResponse.FromString)
    rng = np.random.default_rng(5)  # (a seed whose picks cover every case)
    valid_done, rejected = 0, 0
    for i in range(300):
        if i % 25 == 12:  # a valid request between the bad ones
            ids, _, complete = collect(stub.Generate(pb.GenerateRequest(
                text=f"def f{i}(", sampling=greedy(2, ignore_eos=True)), timeout=60))
            assert len(ids) == 2 and complete.finish_reason == "length"
            valid_done += 1
            continue
        if i % 10 == 3:
            field, call = "field number 99", raw_generate(with_unknown_field(pb.GenerateRequest(text="hi")),
                                                         timeout=30)
        else:
            field, request = cases[int(rng.integers(len(cases)))]
            call = stub.Generate(request, timeout=30)
        code, details = code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (i, field, code, details)
        assert details and field in details, (field, details)
        rejected += 1
    assert valid_done == 12 and rejected == 288
    # Past 4× the limit the transport refuses the message before it is parsed (see docs/server.md).
    code, details = code_of(stub.Generate(pb.GenerateRequest(text="a" * (5 * MAX_REQUEST_BYTES)), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details
    assert scrape(served.metrics_port)['qwenjax:requests_rejected_total{code="INVALID_ARGUMENT"}'] >= 288
    # Two tokens short of the context and max_tokens unset: admitted, the default capped to fit.
    max_len = ENGINE["max_model_len"]
    ids, _, complete = collect(stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[11] * (max_len - 1)), sampling=pb.SamplingParams(ignore_eos=True)),
        timeout=120))
    assert len(ids) == 2 and complete.finish_reason == "length"
    wait_engine_idle(engine)


# --------------------------------------------------------------------------- admission


def test_overload_refuses_the_excess_and_completes_every_admitted_request(model, start_server):
    _, engine = model
    wait_engine_idle(engine)
    limited = start_server(max_queue=4)

    async def burst(server, requests):
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            calls = [stub.Generate(r, timeout=120) for r in requests]
            results = await asyncio.gather(*(acollect(c) for c in calls), return_exceptions=True)
        return results

    results = asyncio.run(burst(limited, [pb.GenerateRequest(
        text=f"def g{i}(", sampling=greedy(4, ignore_eos=True)) for i in range(40)]))
    done = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(done) + len(refused) == 40
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue" in r.details()
               for r in refused)
    assert 4 <= len(done) <= 12 and len(refused) >= 28, (len(done), len(refused))
    for ids, _, complete in done:
        assert len(ids) == 4 and complete.finish_reason == "length"
    assert scrape(limited.metrics_port)['qwenjax:requests_rejected_total{code="RESOURCE_EXHAUSTED"}'] == len(refused)

    # The queued-token limit: two 30-token prompts reach 60 ≥ 50, so a third must wait outside.
    by_tokens = start_server(max_queue=0, max_queued_tokens=50)
    prompt = pb.TokenIds(ids=list(range(1000, 1030)))
    results = asyncio.run(burst(by_tokens, [pb.GenerateRequest(
        token_ids=prompt, sampling=greedy(2, ignore_eos=True)) for _ in range(3)]))
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queued-tokens" in refused[0].details()
    wait_engine_idle(engine)


def test_abort_by_request_id_and_duplicate_ids(model, stub):
    _, engine = model
    assert not stub.Abort(pb.AbortRequest(request_id="nobody"), timeout=10).found
    call = stub.Generate(pb.GenerateRequest(request_id="job-1", text="def long(",
                                            sampling=greedy(400, ignore_eos=True)), timeout=120)
    first = next(call)
    assert first.HasField("chunk")
    duplicate = stub.Generate(pb.GenerateRequest(request_id="job-1", text="x", sampling=greedy(2)), timeout=10)
    assert code_of(duplicate)[0] == grpc.StatusCode.ALREADY_EXISTS
    assert stub.Abort(pb.AbortRequest(request_id="job-1"), timeout=10).found
    ids, _, complete = collect(call)
    assert complete.finish_reason == "abort" and len(ids) < 399
    wait_engine_idle(engine, timeout=2.0)
    # The id is free again once its request ended.
    ids, _, complete = collect(stub.Generate(pb.GenerateRequest(
        request_id="job-1", text="def a(", sampling=greedy(2, ignore_eos=True)), timeout=60))
    assert len(ids) == 2


# --------------------------------------------------------------------------- faults


def test_a_failing_step_fails_only_its_request_and_the_server_keeps_serving(model, served, stub, monkeypatch):
    _, engine = model
    wait_engine_idle(engine)
    request = pb.GenerateRequest(text="def clamp(", sampling=greedy(5, ignore_eos=True))
    expected, _, _ = collect(stub.Generate(request, timeout=60))
    real_dispatch = engine.runner.dispatch
    failures = []

    def dispatch_failing_once(out):
        if not failures:
            failures.append(out)
            raise RuntimeError("injected device failure")
        return real_dispatch(out)

    monkeypatch.setattr(engine.runner, "dispatch", dispatch_failing_once)
    errors_before = scrape(served.metrics_port).get('qwenjax:requests_total{finish_reason="error"}', 0)
    code, details = code_of(stub.Generate(request, timeout=60))
    assert code == grpc.StatusCode.INTERNAL and "injected device failure" in details
    assert len(failures) == 1
    # The engine rebuilt its KV pools after the failure; the same request now gives the same tokens.
    ids, _, complete = collect(stub.Generate(request, timeout=60))
    assert ids == expected and complete.finish_reason == "length"
    after = scrape(served.metrics_port)
    assert after['qwenjax:requests_total{finish_reason="error"}'] == errors_before + 1
    wait_engine_idle(engine)


# --------------------------------------------------------------------------- small RPCs


def test_model_info_tokenize_detokenize_return_real_values(model, stub):
    lm, engine = model
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    c = lm.config
    assert info.model == pathlib.Path(lm.source).name == "qwen2.5-coder-0.5b-instruct"
    assert (info.vocab_size, info.hidden_size, info.num_layers, info.num_heads, info.num_kv_heads,
            info.head_dim) == (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads,
                               c.head_dim) == (151936, 896, 24, 14, 2, 64)
    assert info.max_context == engine.max_model_len == ENGINE["max_model_len"]
    assert dict(info.mesh_shape) == {"dp": 1, "tp": 1} and info.dtype == DTYPE
    assert (info.quantization, info.kv_cache_dtype) == ("", "auto")
    from server.servicer import model_info

    assert model_info(engine, ("qwen", "alias")).model == "qwen"  # --served-model-name
    assert info.page_size == 16 and info.kv_capacity_tokens == ENGINE["num_pages"] * 16
    assert info.max_num_seqs == ENGINE["max_num_seqs"]
    assert dict(info.sampling_defaults) == {}  # the GGUF-built directory has no sampling values

    text = "def add(a, b):\n    return a + b  # ünïcode ✓"
    ids = stub.Tokenize(pb.TokenizeRequest(text=text), timeout=10).ids
    assert list(ids) == lm.tokenizer.encode(text) and len(ids) > 5
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    chat_ids = stub.Tokenize(pb.TokenizeRequest(messages=pb.Messages(
        messages=[pb.Message(**m) for m in messages])), timeout=10).ids
    assert list(chat_ids) == lm.tokenizer.encode_chat(messages)
    tool = {"type": "function", "function": {"name": "now", "description": "The time"}}
    tool_ids = stub.Tokenize(pb.TokenizeRequest(messages=pb.Messages(
        messages=[pb.Message(**m) for m in messages]), tools=[pb.Tool(name="now", description="The time")]),
        timeout=10).ids
    assert list(tool_ids) == lm.tokenizer.encode_chat(messages, tools=[tool]) != list(chat_ids)
    assert stub.Detokenize(pb.DetokenizeRequest(ids=ids), timeout=10).text == text
    special = list(chat_ids[:3])
    assert (stub.Detokenize(pb.DetokenizeRequest(ids=special, skip_special_tokens=False), timeout=10).text
            == lm.tokenizer.decode(special, skip_special_tokens=False))
    code, details = code_of(lambda: stub.Detokenize(pb.DetokenizeRequest(ids=[5, c.vocab_size]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ids[1]" in details
    code, details = code_of(lambda: stub.Tokenize(pb.TokenizeRequest(messages=pb.Messages(
        messages=[pb.Message(role="robot", content="x")])), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "role" in details


def test_health_and_unavailable_before_the_model_is_attached(served, start_server):
    with grpc.insecure_channel(served.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "qwenjax.v1.Inference"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
    loading = start_server(attach=False)
    with grpc.insecure_channel(loading.address) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        code, details = code_of(pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(text="x"), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details


def test_a_step_running_past_step_timeout_turns_health_not_serving(loop, caplog):
    """Nothing fails when a device or a collective hangs: the watchdog sees the step's age."""
    import types

    from server.app import InferenceServer, ServerConfig

    hung = types.SimpleNamespace(step_seconds=0.0, stack=lambda: "  File engine.py, in step\n")
    server = InferenceServer(ServerConfig(port=0, metrics_port=None, step_timeout=0.2))
    loop.run(server.start())
    try:
        loop.run(server.attach(hung))

        def status():
            with grpc.insecure_channel(server.address) as ch:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status

        assert status() == health_pb2.HealthCheckResponse.SERVING
        with caplog.at_level("ERROR", logger="server.app"):
            hung.step_seconds = 1.0
            wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 5.0)
        assert "step_timeout" in caplog.text and "in step" in caplog.text
        hung.step_seconds = 0.0
        wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 5.0)
    finally:
        loop.run(server.stop())


def test_engine_thread_reports_how_long_its_step_runs():
    from qwenjax.engine.async_engine import EngineThread

    class SlowStep:
        def __init__(self):
            self.calls, self.release = 0, threading.Event()

        def wants_step(self):
            return self.calls < 1

        def step(self):
            self.calls += 1
            self.release.wait(10)
            return []

    engine = SlowStep()
    thread = EngineThread(engine)
    try:
        wait_until(lambda: thread.step_seconds > 0.05, 5.0)
        assert "release.wait" in thread.stack()
        engine.release.set()
        wait_until(lambda: thread.step_seconds == 0.0, 5.0)
    finally:
        thread.shutdown()


# --------------------------------------------------------------------------- auth and TLS


def test_bearer_token_is_required_on_inference_calls(start_server):
    secured = start_server(api_token=(TOKEN, "another-token"))  # any of several keys (vLLM's)
    request = pb.GenerateRequest(text="def h(", sampling=greedy(2, ignore_eos=True))
    with grpc.insecure_channel(secured.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for metadata in [(), (("authorization", "Bearer wrong-token"),), (("authorization", TOKEN),),
                         (("authorization", f"Basic {TOKEN}"),)]:
            code, details = code_of(stub.Generate(request, metadata=metadata, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED and details, metadata
            code, _ = code_of(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        ids, _, complete = collect(stub.Generate(request, metadata=(("authorization", f"Bearer {TOKEN}"),),
                                                 timeout=60))
        assert len(ids) == 2 and complete.finish_reason == "length"
        ids, _, _ = collect(stub.Generate(request, metadata=(("authorization", "Bearer another-token"),),
                                          timeout=60))
        assert len(ids) == 2
        # Health stays open for probes that cannot send metadata.
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def self_signed_cert(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path] | None:
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            return None
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=30)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                       critical=False)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def test_tls_with_a_self_signed_certificate(start_server, tmp_path):
    pair = self_signed_cert(tmp_path)
    if pair is None:
        pytest.skip("neither the cryptography package nor an openssl binary is available to make a "
                    "self-signed certificate")
    cert, key = pair
    secure = start_server(tls_cert=str(cert), tls_key=str(key), api_token=TOKEN, http_port=0)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(secure.address, credentials) as ch:
        stub = pb_grpc.InferenceStub(ch)
        auth = (("authorization", f"Bearer {TOKEN}"),)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=auth, timeout=10).max_context == 512
        ids, _, _ = collect(stub.Generate(pb.GenerateRequest(
            text="def tls(", sampling=greedy(2, ignore_eos=True)), metadata=auth, timeout=60))
        assert len(ids) == 2
    with grpc.insecure_channel(secure.address) as ch:  # plaintext to a TLS port never gets through
        code, _ = code_of(lambda: pb_grpc.InferenceStub(ch).GetModelInfo(
            pb.GetModelInfoRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
    # The HTTP API serves HTTPS with the same certificate and token.
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(cert))
    request = urllib.request.Request(f"https://127.0.0.1:{secure.http_port}/v1/models",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        assert json.loads(response.read())["data"][0]["max_model_len"] == 512


# --------------------------------------------------------------------------- drain


def test_drain_refuses_new_calls_and_stop_aborts_what_is_left(model, loop, start_server):
    _, engine = model
    wait_engine_idle(engine)
    server = start_server()
    with grpc.insecure_channel(server.address) as ch:
        stub, health = pb_grpc.InferenceStub(ch), health_pb2_grpc.HealthStub(ch)
        call = stub.Generate(pb.GenerateRequest(request_id="slow", text="def slow(",
                                                sampling=greedy(400, ignore_eos=True)), timeout=60)
        assert next(call).HasField("chunk")
        draining = asyncio.run_coroutine_threadsafe(server.drain(timeout=0.5), loop.loop)
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                   == health_pb2.HealthCheckResponse.NOT_SERVING, 2.0)
        code, details = code_of(stub.Generate(pb.GenerateRequest(text="new", sampling=greedy(2)), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
        code, _ = code_of(lambda: stub.Tokenize(pb.TokenizeRequest(text="x"), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert draining.result(10) is False  # 400 tokens do not fit in a 0.5 s drain
        assert server.gateway.in_flight == 1
        loop.run(server.stop(grace=0.0))  # what the CLI does after the drain timeout
        code, _ = code_of(call)
        assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    wait_engine_idle(engine, timeout=2.0)


# --------------------------------------------------------------------------- drain (subprocess)


def test_sigterm_drains_active_streams_and_exits_0(real_model_dir, model):
    """``model`` first: its warm-up fills the compile cache this process then reads."""
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONUNBUFFERED="1")
    http_port = free_port()
    command = [sys.executable, "-m", "server", "--model", str(real_model_dir), "--dtype", DTYPE,
               "--port", "0", "--metrics-port", "0", "--http-port", str(http_port),
               "--drain-timeout", "120"]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items() if k != "page_size"]
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    log = Lines(proc, proc.stderr)
    try:
        address = log.until(r"listening on (\S+:\d+)", 60).group(1)
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            status = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status  # noqa: E731
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING  # still loading
            log.until(r"serving .* warm-up=", 240)
            ready = time.monotonic() - start
            assert status() == health_pb2.HealthCheckResponse.SERVING

            stub = pb_grpc.InferenceStub(ch)
            results: list = [None] * 7
            streaming = [threading.Event() for _ in range(7)]

            def stream(i: int):
                ids, complete = [], None
                try:
                    for r in stub.Generate(pb.GenerateRequest(
                            text=f"def drain_{i}(", sampling=greedy(24, ignore_eos=True)), timeout=180):
                        if r.HasField("chunk"):
                            ids += r.chunk.token_ids
                            streaming[i].set()
                        else:
                            complete = r.complete
                    results[i] = (ids, complete)
                except grpc.RpcError as error:
                    results[i] = error
                finally:
                    streaming[i].set()

            threads = [threading.Thread(target=stream, args=(i,)) for i in range(7)]
            for t in threads:
                t.start()
            # The eighth (max_num_seqs) over the OpenAI-compatible HTTP API the CLI serves beside gRPC.
            http = HTTPConnection("127.0.0.1", http_port, timeout=180)
            http.request("POST", "/v1/completions", json.dumps({
                "prompt": "def drain_http(", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "stream": True}), {"Content-Type": "application/json"})
            http_stream = http.getresponse()
            assert http_stream.status == 200 and http_stream.readline().startswith(b"data: ")
            for event in streaming:
                assert event.wait(120)
            assert all(r is None for r in results), "a stream ended before SIGTERM"
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 5.0)
            code, details = code_of(stub.Generate(pb.GenerateRequest(text="late", sampling=greedy(2)),
                                                  timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
            late = HTTPConnection("127.0.0.1", http_port, timeout=10)
            late.request("POST", "/v1/completions", json.dumps({"prompt": "late", "max_tokens": 2}),
                         {"Content-Type": "application/json"})
            assert late.getresponse().status == 503
            events = [line for line in http_stream.read().decode().splitlines() if line]
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
            for t in threads:
                t.join(180)
            for r in results:
                assert not isinstance(r, Exception), r
                ids, complete = r
                assert len(ids) == 24 and complete.finish_reason == "length"
        assert proc.wait(timeout=60) == 0
        total = time.monotonic() - start
        print(f"\nsubprocess server: ready in {ready:.1f}s, drained and exited after {total:.1f}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_bench_serving_against_a_running_server(served, tmp_path):
    """scripts/bench_serving.py in --address mode: every request completes and figures add up."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "scripts" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serving.json"
    assert bench.main(["--address", served.address, "--requests", "6", "--concurrency", "3",
                       "--max-tokens", "5", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["completed"] == 6 and summary["output_tokens"] == 30
    assert 0 < summary["ttft_p50_s"] <= summary["e2e_p50_s"]
    assert bench.main(["--address", served.address, "--requests", "2", "--input-len", "30",
                       "--output-len", "3", "--json", str(out)]) == 0  # random token-id prompts
    assert json.loads(out.read_text())["output_tokens"] == 6


def test_engine_tallies_are_exported_when_scraped():
    """The prefix-cache, host-tier and speculative-decoding counters read the engine's own
    tallies (zero while no engine is loaded)."""
    import types

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from qwenjax.engine.engine import SpecDecodeStats
    from qwenjax.engine.host_cache import HostCacheStats
    from qwenjax.engine.prefix_cache import PrefixCacheStats
    from server.metrics import ServerMetrics

    def samples(metrics):
        body = generate_latest(metrics.registry).decode()
        return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}

    engine = types.SimpleNamespace(
        scheduler=types.SimpleNamespace(running=[1], waiting=[], num_preemptions=4,
                                        host_cache=types.SimpleNamespace(
                                            stats=HostCacheStats(stored=5, restored=2, dropped=1))),
        allocator=types.SimpleNamespace(num_used=3, num_pages=8, num_evictable=1),
        scheduler_config=types.SimpleNamespace(page_size=16),
        stats=types.SimpleNamespace(generation_tokens=0, step_tokens=collections.Counter({1: 3, 20: 1})),
        prefix_cache=types.SimpleNamespace(stats=PrefixCacheStats(queries=40, hits=16, evictions=2)),
        spec_stats=SpecDecodeStats(num_drafts=3, num_draft_tokens=10, num_accepted_tokens=7))
    got = samples(ServerMetrics(lambda: [engine]))
    assert got["qwenjax:kv_tokens_used"] == 3 * 16 and got["qwenjax:prefix_cache_hit_rate"] == 16 / 40
    assert got["qwenjax:iteration_tokens_count"] == 4 and got["qwenjax:iteration_tokens_sum"] == 23
    # (Bucket bounds written as prometheus-client writes them, as vLLM's: le="16.0".)
    body = generate_latest(ServerMetrics(lambda: [engine]).registry).decode()
    assert 'qwenjax:iteration_tokens_bucket{le="1.0"} 3.0' in body
    assert 'qwenjax:iteration_tokens_bucket{le="16.0"} 3.0' in body
    assert 'qwenjax:iteration_tokens_bucket{le="32.0"} 4.0' in body
    assert got["qwenjax:spec_decode_num_draft_tokens_total"] == 10
    assert got["qwenjax:spec_decode_num_accepted_tokens_total"] == 7
    assert got["qwenjax:prefix_cache_hits_total"] == 16 and got["qwenjax:kv_pages_used"] == 3
    assert got["qwenjax:kv_offload_pages_restored_total"] == 2
    assert got["qwenjax:num_preemptions_total"] == 4 and got["qwenjax:kv_cache_usage_perc"] == 3 / 8
    assert samples(ServerMetrics(lambda: []))["qwenjax:spec_decode_num_drafts_total"] == 0
    # Data-parallel replicas: each figure is the sum over the engines.
    both = samples(ServerMetrics(lambda: [engine, engine]))
    assert both["qwenjax:prefix_cache_hits_total"] == 32 and both["qwenjax:kv_pages_total"] == 16


def test_generation_throughput_over_the_last_window():
    """SGLang's gen_throughput: tokens per second between scrapes, over the last window."""
    from server.metrics import _Throughput

    clock, count = [100.0], [0]
    rate = _Throughput(lambda: count[0], window=60.0, clock=lambda: clock[0])
    assert rate() == 0.0  # nothing to compare with yet
    for _ in range(8):  # 15 s scrapes at 10 tokens/s
        clock[0] += 15.0
        count[0] += 150
        assert rate() == pytest.approx(10.0)
    clock[0] += 15.0
    count[0] += 1500  # a burst at 100 tokens/s: seen over the last minute (4 scrapes)
    assert rate() == pytest.approx((3 * 150 + 1500) / 60.0)
    for _ in range(4):  # idle for a minute: the rate falls to 0
        clock[0] += 15.0
        rate()
    assert rate() == 0.0
    count[0] = 7  # a new engine counts from 0 again: no negative rate
    clock[0] += 15.0
    assert rate() == 0.0
    count[0] += 100  # read again within a second (an alias of the same scrape): the same value
    clock[0] += 0.001
    assert rate() == 0.0


def test_vllm_info_series_for_routers():
    """vllm:cache_config_info (block size and pages) and vllm:lora_requests_info (the adapters
    of running and waiting requests), which LoRA- and prefix-aware routers read."""
    import types

    from prometheus_client import generate_latest

    from server.metrics import ServerMetrics

    request = lambda lora: types.SimpleNamespace(lora_name=lora)  # noqa: E731
    engine = types.SimpleNamespace(
        scheduler=types.SimpleNamespace(running=[request("sql"), request(None), request("chat")],
                                        waiting=[request("sql")], num_preemptions=0, host_cache=None),
        scheduler_config=types.SimpleNamespace(page_size=16),
        config=types.SimpleNamespace(kv_cache_dtype="auto", enable_prefix_caching=True,
                                     kv_cache_fraction=0.9),
        allocator=types.SimpleNamespace(num_used=3, num_pages=8, num_evictable=1),
        loras=types.SimpleNamespace(capacity=4), prefix_cache=None, spec_stats=None,
        stats=types.SimpleNamespace(generation_tokens=0, step_tokens=collections.Counter()))
    text = generate_latest(ServerMetrics(lambda: [engine, engine], model_name=lambda: "m",
                                         aliases=("vllm",)).registry).decode()
    assert 'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",' \
           'gpu_memory_utilization="0.9",num_gpu_blocks="16"} 1.0' in text
    assert 'vllm:lora_requests_info{max_lora="4",running_lora_adapters="chat,sql",' \
           'waiting_lora_adapters="sql"}' in text
    engine.loras.capacity = 0  # no LoRA slots: no LoRA series, as vLLM without --enable-lora
    assert "vllm:lora_requests_info{" not in generate_latest(
        ServerMetrics(lambda: [engine], model_name=lambda: "m", aliases=("vllm",)).registry).decode()


def test_priority_needs_the_priority_policy(stub):
    code, details = code_of(stub.Generate(pb.GenerateRequest(text="x", priority=2, sampling=greedy(1)),
                                          timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "priority" in details


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
def test_a_taken_port_is_named_by_its_flag(flag):
    """Two servers on one host clash on the default ports: the error says which flag to change,
    and the ports already opened are closed again."""
    import socket

    from server.app import InferenceServer, ServerConfig

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    field = {"--port": "port", "--metrics-port": "metrics_port", "--http-port": "http_port"}[flag]
    config = ServerConfig(**{"port": 0, "metrics_port": 0, "http_port": 0, field: port})
    server = InferenceServer(config)

    async def start():
        try:
            with pytest.raises(OSError, match=f"^{flag} {port}: cannot listen on 127.0.0.1:{port}"):
                await server.start()
        finally:
            await server.stop()  # (what serve() does before it exits 2)

    try:
        asyncio.run(start())
    finally:
        taken.close()
    if flag != "--port":  # the gRPC port it had opened is free again
        again = socket.socket()
        again.bind(("127.0.0.1", server.port))
        again.close()


def test_tls_files_that_are_not_a_key_pair_are_named_before_any_port_is_taken(tmp_path):
    from server.app import InferenceServer, ServerConfig

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    server = InferenceServer(ServerConfig(port=0, metrics_port=None, http_port=0,
                                          tls_cert=str(cert), tls_key=str(key)))

    async def start():
        with pytest.raises(ValueError, match="--tls-cert .* not a usable certificate chain and key"):
            await server.start()
        await server.stop()

    asyncio.run(start())
    assert server.port is None and server.http is None
