"""New weights while serving (Engine.update_weights, LLM/AsyncLLM.update_weights, HTTP
/update_weights_from_disk): requests continue under the new weights exactly as a model loaded
from them would, the prefix cache forgets the old K/V, and a checkpoint of another
architecture is refused before anything changes. Also what a trainer's sync uses around it:
pausing generation (Engine.pause, HTTP /pause, /resume) and sleep mode."""
import asyncio
import dataclasses

import numpy as np
import pytest

from qwenjax import AsyncLLM, SamplingParams
from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.greedy import GreedyGenerator
from qwenjax.loading import load_model
from tiny import tiny_config, write_hf_checkpoint

VOCAB = 250
CONFIG = dict(max_num_seqs=4, max_num_batched_tokens=128, prefill_chunk=64, max_prefill_seqs=2,
              page_size=8, max_model_len=256, num_pages=64, decode_buckets=(4,), prefill_buckets=(128,))


def _lively(directory, seed: int, **overrides):
    """A tiny checkpoint whose greedy tokens follow the context (matrices scaled ×4)."""
    from safetensors.numpy import load_file, save_file

    write_hf_checkpoint(tiny_config(vocab_size=VOCAB, **overrides), directory, seed=seed)
    path = directory / "model.safetensors"
    save_file({k: v * 4 if v.ndim == 2 else v for k, v in load_file(path).items()}, path,
              metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return (_lively(tmp_path_factory.mktemp("weights-a"), 0),
            _lively(tmp_path_factory.mktemp("weights-b"), 3))


def test_requests_continue_under_the_new_weights(checkpoints):
    a, b = checkpoints
    lm = load_model(a, tp=2, dtype="float32")
    after = GreedyGenerator(load_model(b, tp=2, dtype="float32"))
    engine = Engine(lm, EngineConfig(**CONFIG, async_scheduling=False), warm_up=False)
    prompt, other = np.random.default_rng(0).integers(0, VOCAB, (2, 40)).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine.add_request(other, SamplingParams(temperature=0.0, max_tokens=1))  # cached, then done
    while engine.has_unfinished():
        engine.step()
    first = engine.add_request(prompt, greedy)
    tokens = []
    for _ in range(5):  # its prefill and a few tokens under the old weights
        tokens += [t for o in engine.step() for t in o.delta_token_ids]
    before = list(tokens)
    assert before == GreedyGenerator(lm).generate([prompt], len(before))[0]
    engine.update_weights(b)
    assert engine.weights_version == 1
    while engine.has_unfinished():
        tokens += [t for o in engine.step() if o.request_id == first for t in o.delta_token_ids]
    # Recomputed under the new weights: the rest is their continuation of what was sent.
    assert tokens[len(before):] == after.generate([prompt + before], 12 - len(before))[0]
    # New requests are the new model's. The pages cached under the old weights are forgotten;
    # those the first request computed again under the new ones are found.
    engine.add_request(other, greedy, request_id="other")
    engine.add_request(prompt, greedy, request_id="again")
    outputs = {}
    while engine.has_unfinished():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert outputs["other"].token_ids == after.generate([other], 12)[0]
    assert outputs["again"].token_ids == after.generate([prompt], 12)[0]
    assert outputs["other"].num_cached_tokens == 0 and outputs["again"].num_cached_tokens == 32
    engine.check()


def test_another_architecture_or_no_checkpoint_is_refused_before_anything_changes(checkpoints, tmp_path):
    a, _ = checkpoints
    wider = _lively(tmp_path / "wider", 1, intermediate_size=128)
    lm = load_model(a, tp=1, dtype="float32")
    engine = Engine(lm, EngineConfig(**CONFIG), warm_up=False)
    weights = engine.lm.weights
    with pytest.raises(ValueError, match="differs in intermediate_size"):
        engine.update_weights(wider)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        engine.update_weights(tmp_path / "nowhere")
    assert engine.lm.weights is weights and engine.weights_version == 0


def test_async_llm_updates_between_steps_while_requests_stream(checkpoints):
    a, b = checkpoints
    llm = AsyncLLM(str(a), tp=1, dtype="float32", **CONFIG, warm_up=False, progress=False)
    prompt = np.random.default_rng(1).integers(0, VOCAB, 20).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = GreedyGenerator(load_model(b, tp=1, dtype="float32")).generate([prompt], 8)[0]

    async def run():
        streaming = asyncio.ensure_future(_collect(llm, prompt, greedy))
        await llm.update_weights(b)  # loaded on a worker thread while the request streams
        streamed = await streaming
        after = await _collect(llm, prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        return streamed, after

    try:
        streamed, after = asyncio.run(run())
    finally:
        llm.shutdown()
    assert len(streamed) == 40 and after == want


async def _collect(llm, prompt, params) -> list[int]:
    tokens = []
    async for output in llm.generate(prompt, params):
        tokens += output.delta_token_ids
    return tokens


def test_http_update_weights_from_disk(checkpoints, server_loop, tmp_path, caplog):
    """SGLang's POST /update_weights_from_disk, on a server started with
    --allow-weight-updates: the next completion is the new model's; refusals name the field or
    the path; without the flag there is no such route."""
    import grpc

    from qwenjax.engine.async_engine import EngineThread
    from qwenjax_proto.v1 import inference_pb2 as pb
    from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc
    from server_harness import Servers, collect, greedy

    a, b = checkpoints
    thread = EngineThread(Engine(load_model(a, tp=1, dtype="float32"), EngineConfig(**CONFIG),
                                 warm_up=False, progress=False))
    servers = Servers(server_loop, thread, port=0, metrics_port=None, http_port=0)
    prompt = np.random.default_rng(2).integers(0, VOCAB, 16).tolist()
    want = GreedyGenerator(load_model(b, tp=1, dtype="float32")).generate([prompt], 6)[0]

    try:
        server = servers.start(allow_weight_updates=True, enable_sleep_mode=True)
        port = server.http_port
        # Sleep mode (vLLM's routes): generation waits out the sleep with 503.
        assert _post(port, "/sleep?level=1", {})[0] == 200 and _get(port, "/is_sleeping") == {"is_sleeping": True}
        status, message = _post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
        assert status == 503 and "asleep" in message
        assert _post(port, "/sleep?level=3", {})[0] == 400
        assert _post(port, "/wake_up", {})[0] == 200 and _get(port, "/is_sleeping") == {"is_sleeping": False}
        # SGLang's names for the same (--enable-memory-saver), with or without tags.
        assert _post(port, "/release_memory_occupation", {"tags": ["weights", "kv_cache"]}) == (200, None)
        assert _get(port, "/is_sleeping") == {"is_sleeping": True}
        assert _post(port, "/release_memory_occupation", {})[0] == 409  # asleep already
        assert _post(port, "/resume_memory_occupation", {"tags": ["kv"]})[0] == 400
        assert _post(port, "/resume_memory_occupation", {}) == (200, None)
        assert _get(port, "/is_sleeping") == {"is_sleeping": False}
        assert _post(port, "/reset_prefix_cache", {}) == (200, {"reset": True})
        assert _post(port, "/update_weights_from_disk", {"model_path": str(b)}) == (
            200, {"success": True, "message": "Succeeded to update model weights."})
        with grpc.insecure_channel(server.address) as channel:
            ids, _, _ = collect(pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt), sampling=greedy(6, ignore_eos=True)), timeout=120))
        assert ids == want and thread.engine.weights_version == 1
        status, message = _post(port, "/update_weights_from_disk", {"model_path": str(tmp_path)})
        assert status == 404 and "no config.json" in message
        assert _post(port, "/update_weights_from_disk", {"path": str(b)})[0] == 400
        assert _post(port, "/update_weights_from_disk", {"model_path": 3})[0] == 400
        locked = servers.start(enable_log_requests=True, max_log_len=4)
        assert _post(locked.http_port, "/update_weights_from_disk", {"model_path": str(b)})[0] == 404
        assert _post(locked.http_port, "/sleep", {})[0] == 404
        assert _post(locked.http_port, "/release_memory_occupation", {})[0] == 404
        assert _post(locked.http_port, "/pause", {})[0] == 404
        assert _post(locked.http_port, "/pause_generation", {})[0] == 404
        # --enable-log-requests: each request logged as admitted (4 prompt ids) and as it ends.
        with caplog.at_level("INFO", logger="qwenjax.requests"):
            with grpc.insecure_channel(locked.address) as channel:
                collect(pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=prompt), sampling=greedy(3)), timeout=120))
        admitted, ended = [r.getMessage() for r in caplog.records if r.name == "qwenjax.requests"]
        assert f"16 prompt tokens {prompt[:4]}…" in admitted and "max_tokens=3" in admitted
        assert "finished: length" in ended and "ttft" in ended
    finally:
        servers.stop_all()
        thread.shutdown()


def _post(port, path, body):
    """(status, JSON answer or None) of a POST; (status, text) when refused."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
            try:
                return response.status, json.loads(raw) if raw else None
            except ValueError:
                return response.status, raw.decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _get(port, path):
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


def test_sleep_frees_the_device_memory_and_wake_up_serves_as_before(checkpoints):
    """vLLM's sleep mode: level 1 keeps the weights on the host and wakes up to the same
    outputs; level 2 drops them, and waking needs new ones (a trainer's step)."""
    import jax

    a, b = checkpoints
    engine = Engine(load_model(a, tp=2, dtype="float32"), EngineConfig(**CONFIG), warm_up=False)
    prompt = np.random.default_rng(3).integers(0, VOCAB, 30).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def run():
        engine.add_request(prompt, greedy)
        outputs = []
        while engine.has_unfinished():
            outputs += [o for o in engine.step() if o.finished]
        return outputs[0]

    first = run()
    weights = jax.tree.leaves(engine.lm.weights)
    engine.sleep(1)
    assert engine.sleeping == 1 and all(a.is_deleted() for a in weights)
    with pytest.raises(ValueError, match="asleep"):
        engine.add_request(prompt, greedy)
    engine.wake_up()
    again = run()
    assert again.token_ids == first.token_ids and again.num_cached_tokens == 0  # cache forgotten
    assert engine.reset_prefix_cache() and run().num_cached_tokens == 0

    engine.sleep(2)
    with pytest.raises(ValueError, match="update_weights before waking"):
        engine.wake_up()
    engine.update_weights(b)  # while asleep
    engine.wake_up()
    assert run().token_ids == GreedyGenerator(load_model(b, tp=2, dtype="float32")).generate([prompt], 8)[0]
    engine.add_request(prompt, greedy)
    with pytest.raises(ValueError, match="still running"):
        engine.sleep(1)
    assert not engine.reset_prefix_cache()


def _tokens(outputs, request_id=None) -> list[int]:
    return [t for o in outputs if request_id in (None, o.request_id) for t in o.delta_token_ids]


def test_pause_keep_holds_requests_and_new_weights_recompute_them(checkpoints):
    """vLLM's pause_generation(mode="keep"), an RL trainer's sync: nothing is scheduled while
    paused (a request sent meanwhile waits too); without clear_cache a kept request goes on
    from its K/V after the resume; with new weights set while paused, it recomputes under them."""
    a, b = checkpoints
    lm = load_model(a, tp=1, dtype="float32")
    engine = Engine(lm, EngineConfig(**CONFIG), warm_up=False)  # async scheduling
    prompt, other = np.random.default_rng(4).integers(0, VOCAB, (2, 24)).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    want = GreedyGenerator(lm).generate([prompt, other], 10)
    engine.add_request(prompt, greedy, request_id="kept")
    outputs = []
    while len(_tokens(outputs)) < 4:
        outputs += engine.step()
    engine.pause("keep", clear_cache=False)
    assert engine.paused and not engine.pausing
    engine.add_request(other, greedy, request_id="late")
    for _ in range(3):  # the step in flight is read back; then nothing runs
        outputs += engine.step()
    sent = len(_tokens(outputs))
    assert 4 <= sent < 10 and not engine.wants_step() and engine.has_unfinished()
    assert engine.step() == [] and engine.num_unfinished == 2
    with pytest.raises(ValueError, match="still running"):
        engine.sleep(1)
    engine.resume()
    while engine.has_unfinished():
        outputs += engine.step()
    assert _tokens(outputs, "kept") == want[0] and _tokens(outputs, "late") == want[1]
    assert engine.scheduler.num_preemptions == 0  # went on from its K/V

    # Paused with clear_cache (the default), new weights set meanwhile: recomputed under them.
    engine.add_request(prompt, greedy, request_id="synced")
    outputs = []
    while len(_tokens(outputs)) < 3:
        outputs += engine.step()
    engine.pause("keep")
    while engine.wants_step():
        outputs += engine.step()
    before = _tokens(outputs)
    assert engine.scheduler.num_preemptions == 1 and not engine.scheduler.running
    engine.update_weights(b)
    engine.resume()
    while engine.has_unfinished():
        outputs += engine.step()
    after = GreedyGenerator(load_model(b, tp=1, dtype="float32"))
    assert _tokens(outputs)[len(before):] == after.generate([prompt + before], 10 - len(before))[0]
    engine.check()


def test_pause_abort_and_wait(checkpoints):
    """mode "abort" ends every unfinished request at once with what it has; mode "wait" lets the
    running ones finish and holds those sent meanwhile, which run after the resume."""
    a, _ = checkpoints
    lm = load_model(a, tp=1, dtype="float32")
    engine = Engine(lm, EngineConfig(**CONFIG), warm_up=False)
    prompts = np.random.default_rng(5).integers(0, VOCAB, (3, 20)).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = GreedyGenerator(lm).generate(prompts, 8)
    engine.add_request(prompts[0], greedy, request_id="running")
    outputs = []
    while not _tokens(outputs):
        outputs += engine.step()
    engine.add_request(prompts[1], SamplingParams(temperature=0.0, max_tokens=8, n=2),
                       request_id="queued")
    engine.pause("abort")
    outputs += engine.step()
    ended = {(o.request_id, o.index): o for o in outputs if o.finish_reason}
    assert {k: o.finish_reason for k, o in ended.items()} == {
        ("running", 0): "abort", ("queued", 0): "abort", ("queued", 1): "abort"}
    assert 1 <= len(ended["running", 0].token_ids) < 8
    assert want[0][:len(ended["running", 0].token_ids)] == ended["running", 0].token_ids
    assert engine.paused and not engine.has_unfinished()
    engine.add_request(prompts[1], greedy, request_id="after")
    assert not engine.wants_step()
    engine.resume()
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert _tokens(outputs, "after") == want[1]

    engine.add_request(prompts[0], greedy, request_id="first")
    outputs = engine.step()
    engine.pause("wait")
    assert engine.pausing and not engine.paused
    engine.add_request(prompts[2], greedy, request_id="held")
    while not engine.paused:
        outputs += engine.step()
    assert _tokens(outputs, "first") == want[0] and not _tokens(outputs, "held")
    assert not engine.wants_step() and [r.request_id for r in engine.scheduler.waiting] == ["held"]
    engine.resume()
    while engine.has_unfinished():
        outputs += engine.step()
    assert _tokens(outputs, "held") == want[2]
    # Resumed before a waiting pause took effect: it never does. A bad mode is refused.
    engine.add_request(prompts[0], greedy, request_id="again")
    engine.step()
    engine.pause("wait")
    engine.add_request(prompts[2], greedy, request_id="not-held")
    engine.abort("not-held")
    engine.resume()
    assert not engine.pausing and not engine.paused
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(ValueError, match="abort, wait, keep"):
        engine.pause("retract")
    engine.check()


def test_http_pause_and_resume(checkpoints, server_loop):
    """vLLM's POST /pause, /resume, GET /is_paused and SGLang's /pause_generation,
    /continue_generation (--allow-weight-updates): a completion sent while paused is answered
    after the resume; "abort" ends a running one; "wait" answers once it has finished."""
    import threading

    from qwenjax.engine.async_engine import EngineThread
    from server_harness import Servers

    a, _ = checkpoints
    lm = load_model(a, tp=1, dtype="float32")
    thread = EngineThread(Engine(lm, EngineConfig(**CONFIG), warm_up=False, progress=False))
    servers = Servers(server_loop, thread, port=0, metrics_port=None, http_port=0)
    prompt = np.random.default_rng(6).integers(0, VOCAB, 16).tolist()

    def complete(max_tokens, answers):
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        answers.append(_post(port, "/v1/completions", body))

    def started(max_tokens):
        answers = []
        worker = threading.Thread(target=complete, args=(max_tokens, answers))
        worker.start()
        while worker.is_alive() and not thread.engine.num_unfinished:  # (until admitted)
            worker.join(0.01)
        return worker, answers

    try:
        server = servers.start(allow_weight_updates=True)
        port = server.http_port
        assert _get(port, "/is_paused") == {"is_paused": False}
        assert _post(port, "/pause?mode=keep&clear_cache=false", {}) == (200, {"status": "paused"})
        assert _get(port, "/is_paused") == {"is_paused": True}
        worker, answers = started(6)
        worker.join(1.0)
        assert worker.is_alive() and thread.engine.num_unfinished == 1  # admitted, waiting
        assert _post(port, "/resume", {}) == (200, {"status": "resumed"})
        worker.join(60)
        status, answer = answers[0]
        assert status == 200 and answer["usage"]["completion_tokens"] == 6
        # A running completion: "abort" ends it with what it has.
        worker, answers = started(200)
        assert _post(port, "/pause", {}) == (200, {"status": "paused"})
        worker.join(60)
        status, answer = answers[0]
        assert status == 200 and answer["choices"][0]["finish_reason"] == "abort"
        assert answer["usage"]["completion_tokens"] < 200
        assert _post(port, "/resume", {})[0] == 200
        # wait_for_inflight_requests (vLLM's older switch): answered once the request finished.
        worker, answers = started(12)
        assert _post(port, "/pause?wait_for_inflight_requests=true", {}) == (200, {"status": "paused"})
        assert thread.engine.num_unfinished == 0  # (its answer may still be on the way)
        worker.join(60)
        assert answers[0][1]["usage"]["completion_tokens"] == 12
        assert _post(port, "/resume", {})[0] == 200
        # SGLang's names.
        assert _post(port, "/pause_generation", {"mode": "retract"}) == (200, "Generation paused successfully.")
        assert _get(port, "/is_paused") == {"is_paused": True}
        assert _post(port, "/continue_generation", {}) == (200, "Generation continued successfully.")
        assert _get(port, "/is_paused") == {"is_paused": False}
        # Refusals name the field.
        for path, body, field in (("/pause?mode=later", {}, "mode"), ("/pause?clear_cache=maybe", {}, "clear_cache"),
                                  ("/pause?level=1", {}, "'level'"),
                                  ("/pause_generation", {"mode": "keep"}, "abort, retract, in_place"),
                                  ("/pause_generation", {"modes": "abort"}, "modes")):
            status, message = _post(port, path, body)
            assert status == 400 and field in message, (path, message)
        assert _get(port, "/is_paused") == {"is_paused": False}
        worker, answers = started(8)
        worker.join(60)
        assert answers[0][1]["choices"][0]["finish_reason"] == "length"
        # Draining for shutdown resumes a paused engine: what it held finishes.
        assert _post(port, "/pause?mode=keep", {})[0] == 200
        worker, answers = started(5)
        assert server_loop.run(server.drain(timeout=60), timeout=90) and not thread.paused
        worker.join(60)
        assert answers[0][1]["usage"]["completion_tokens"] == 5
    finally:
        servers.stop_all()
        thread.shutdown()


def test_async_llm_pause_generation(checkpoints):
    """vLLM's AsyncLLM.pause_generation / resume_generation / is_paused: a stream stops between
    the two and goes on to the same greedy tokens; a waiting pause overtaken by a resume says so."""
    a, _ = checkpoints
    llm = AsyncLLM(str(a), tp=1, dtype="float32", **CONFIG, warm_up=False, progress=False)
    prompt = np.random.default_rng(7).integers(0, VOCAB, 20).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    want = GreedyGenerator(llm.engine.lm).generate([prompt], 30)[0]

    async def run():
        tokens = []

        async def stream(params=greedy):
            async for output in llm.generate(prompt, params):
                tokens.extend(output.delta_token_ids)

        streaming = asyncio.ensure_future(stream())
        while len(tokens) < 3:
            await asyncio.sleep(0.005)
        await llm.pause_generation(mode="keep", clear_cache=False)
        assert await llm.is_paused()
        while llm.engine.wants_step():  # the step in flight comes back
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
        held = len(tokens)
        await asyncio.sleep(0.3)
        assert len(tokens) == held < 30
        await llm.resume_generation()
        await streaming
        # A waiting pause while a long request runs, overtaken by a resume.
        first = list(tokens)
        streaming = asyncio.ensure_future(stream(dataclasses.replace(greedy, max_tokens=200)))
        while llm.engine.num_unfinished == 0:
            await asyncio.sleep(0.005)
        waiting = asyncio.ensure_future(llm.pause_generation(wait_for_inflight_requests=True))
        await asyncio.sleep(0.02)
        assert not waiting.done() and not await llm.is_paused()
        await llm.resume_generation()
        with pytest.raises(ValueError, match="resumed before"):
            await waiting
        await streaming
        return first, tokens[len(first):]

    try:
        first, second = asyncio.run(run())
    finally:
        llm.shutdown()
    assert first == want and len(second) == 200 and not llm.engine.paused
