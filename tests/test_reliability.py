"""Reliability on a tiny float32 model: faults, isolation, the context limit, restart.

* Faults (tests/faults.py): NaN logits fail only the requests whose rows hold them, a step
  that raises fails only its own requests, both come back over gRPC as INTERNAL, the pages go
  back and the server keeps serving.
* Isolation: KV pools pre-filled with garbage (NaN and huge values), or dirtied by heavy
  reuse, give the outputs of a fresh pool; attention never reads past a sequence's length.
* Long context: YaRN at 4× its original window through the paged engine matches transformers;
  a prompt of exactly max_model_len tokens samples one token, one more is refused.
* Graceful restart: SIGTERM drains, the restart is a warm start from the compile cache.
"""
from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import faults
from qwenjax.attention import paged_attention_blockwise, paged_attention_reference
from qwenjax.config import RopeScaling
from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.loading import load_model
from qwenjax.sampling import SamplingParams
from qwenjax_proto.v1 import inference_pb2 as pb
from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc
from server_harness import Lines, LoopThread, acollect, code_of, collect, scrape, wait_until
from tiny import hf_logits, tiny_config, write_hf_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
# YaRN stretching a 32-token original window 4× to the 128-token max context.
CONFIG = tiny_config(vocab_size=203, tie_word_embeddings=True, intermediate_size=100,
                     max_position_embeddings=128,
                     rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32))
MAX_LEN = 128
# Few shapes (decode rows 0/1/2/4 × packed prefill 0/16/32): the tests compile each once.
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, prefill_chunk=32, max_prefill_seqs=1,
              page_size=8, max_model_len=MAX_LEN, num_pages=72, decode_buckets=(4,), prefill_buckets=(32,))
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-yarn")
    return directory, write_hf_checkpoint(CONFIG, directory, seed=3)


@pytest.fixture(scope="module")
def lm(checkpoint):
    return load_model(checkpoint[0], tp=1, dtype="float32")


def new_engine(lm) -> Engine:
    return Engine(lm, EngineConfig(**ENGINE), warm_up=False, progress=False)


@pytest.fixture(scope="module")
def engine(lm):
    """One engine for the engine-level tests (its programs compile once); each test leaves it
    idle, without fault hooks."""
    engine = new_engine(lm)
    yield engine
    faults.remove(engine.runner)


def run(engine, prompts, params) -> list:
    """Final outputs in prompt order; the engine is idle again afterwards."""
    ids = [engine.add_request(p, params[i] if isinstance(params, list) else params)
           for i, p in enumerate(prompts)]
    done = {}
    for _ in range(10_000):
        done.update((o.request_id, o) for o in engine.step() if o.finished)
        engine.check()
        if not engine.has_unfinished():
            break
    assert engine.allocator.num_used == 0 and engine.num_unfinished == 0
    return [done[i] for i in ids]


def prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 200, n).tolist() for n in lengths]  # 200+ mark faulty requests


# --------------------------------------------------------------------------- long context


def test_yarn_at_4x_the_original_window_matches_transformers_up_to_the_max_context(engine, checkpoint):
    """Tokens at positions 96…127 (4× the 32-token YaRN window) through paged prefill chunks
    and decode, and a prompt of exactly max_model_len, against transformers' logits."""
    long_prompt, full_prompt = prompts(11, [97, MAX_LEN])
    # 97 + 32 - 1 = 128 KV slots: the request ends exactly at the max context.
    generated, at_limit = run(engine, [long_prompt, full_prompt], [
        SamplingParams(max_tokens=32, logprobs=1, **GREEDY), SamplingParams(max_tokens=1, logprobs=1, **GREEDY)])
    assert len(generated.token_ids) == 32 and generated.finish_reason == "length"
    assert len(at_limit.token_ids) == 1 and at_limit.finish_reason == "length"

    hf_model = checkpoint[1]
    for prompt, out in ((long_prompt, generated), (full_prompt, at_limit)):
        sequence = prompt + out.token_ids[:-1]
        assert len(sequence) == MAX_LEN
        logits = hf_logits(hf_model, np.asarray([sequence]))[0].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        ref = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))  # log_softmax
        for i, (token, logprob) in enumerate(zip(out.token_ids, out.logprobs)):
            row = ref[len(prompt) - 1 + i]
            assert logprob.logprob == pytest.approx(row[token], abs=1e-4), (len(prompt), i)
            assert row[token] >= row.max() - 1e-4  # greedy: the engine's token is HF's argmax

    with pytest.raises(ValueError, match=f"prompt has {MAX_LEN + 1} tokens; max context is {MAX_LEN}"):
        engine.add_request([5] * (MAX_LEN + 1), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"prompt has 97 tokens and max_tokens is 33: 130 exceeds the max "
                                         r"context of 128 \+ 1"):
        engine.add_request(long_prompt, SamplingParams(max_tokens=33))


# --------------------------------------------------------------------------- faults (engine)


def test_nan_logits_fail_only_their_request_and_return_its_pages(engine):
    batch = prompts(5, [9, 30, 17])
    params = SamplingParams(max_tokens=12, **GREEDY)
    clean = run(engine, batch, params)

    hit = faults.nan_logits(engine.runner, lambda r: r.prompt_ids == batch[1] and r.num_output_tokens >= 3)
    try:
        faulty = run(engine, batch, params)
    finally:
        faults.remove(engine.runner)
    assert len(set(hit)) == 1 and faulty[1].request_id == hit[0]
    assert faulty[1].finish_reason == "error" and "non-finite logits" in faulty[1].error
    assert faulty[1].token_ids == clean[1].token_ids[:3]  # what it streamed before the fault stands
    for i in (0, 2):
        assert faulty[i].finish_reason == "length" and faulty[i].token_ids == clean[i].token_ids
    assert engine.allocator.num_free == engine.allocator.num_pages


# --------------------------------------------------------------------------- isolation


def fill_with_garbage(engine, seed: int) -> None:
    """Every slot of every pool: NaN, ±1e30 or huge normals, as a crashed or stale owner might leave."""
    rng = np.random.default_rng(seed)

    def garbage(pool):
        values = rng.standard_normal(pool.shape).astype(np.float32) * 1e4
        choice = rng.integers(0, 4, pool.shape)
        values[choice == 0] = np.nan
        values[choice == 1] = 1e30
        values[choice == 2] = -1e30
        return jax.device_put(values, pool.sharding)

    engine.runner.cache = jax.tree.map(garbage, engine.runner.cache)
    # The pages no longer hold what the prefix cache indexed: stale owners, not cached prefixes.
    engine.scheduler.reset_prefix_cache()


def test_garbage_filled_and_heavily_reused_pools_give_the_outputs_of_a_fresh_pool(engine):
    batch = prompts(7, [1, 7, 8, 9, 33, 70])  # page edges (8) and several prefill chunks (32)
    params = [SamplingParams(max_tokens=6, logprobs=2, **GREEDY),
              SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=21, ignore_eos=True)] * 3
    engine.runner.reset_cache()  # zeros, as at start-up
    engine.scheduler.reset_prefix_cache()
    fresh = run(engine, batch, params)

    fill_with_garbage(engine, seed=1)
    dirty = run(engine, batch, params)
    # Heavy reuse: requests of other lengths, some aborted mid-way, some preempted, reuse the pages.
    rng = np.random.default_rng(2)
    for round_ in range(2):
        ids = [engine.add_request(p, SamplingParams(max_tokens=int(rng.integers(1, 40)), **GREEDY))
               for p in prompts(100 + round_, rng.integers(1, 80, 8))]
        for step in range(30):
            engine.step()
            if step == 5:
                for rid in ids[::3]:
                    engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
    assert engine.allocator.num_used == 0 and engine.allocator.num_free == ENGINE["num_pages"]
    reused = run(engine, batch, params)

    for got in (dirty, reused):
        for i, (want, out) in enumerate(zip(fresh, got)):
            assert out.token_ids == want.token_ids, i
            if want.logprobs:
                np.testing.assert_allclose([lp.logprob for lp in out.logprobs],
                                           [lp.logprob for lp in want.logprobs], atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 8])
def test_xla_attention_never_reads_past_a_sequence(chunk):
    """The XLA paths (runtime blockwise and the reference) with every slot past a sequence's
    length NaN — the tail of its last page, other sequences' pages — and table slots past its
    pages pointing at NaN pages, -1 or out-of-range ids: the result equals the clean one.
    (The Pallas decode kernel gets the same poisoning in tests/test_paged_attention.py.)"""
    rng = np.random.default_rng(chunk)
    kv_heads, q_per_kv, head_dim, page_size, pages_per_seq = 2, 7, 16, 8, 6
    lengths = [0, 1, 7, 8, 9, 30, 48]
    batch = len(lengths)
    num_pages = batch * pages_per_seq + 2
    tables = (2 + rng.permutation(num_pages - 2)[: batch * pages_per_seq]).reshape(batch, pages_per_seq)
    q = jnp.asarray(rng.standard_normal((batch, chunk, kv_heads, q_per_kv, head_dim)), jnp.float32)
    k = rng.standard_normal((kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    v = rng.standard_normal((kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    positions = np.full((batch, chunk), -1)
    owned = np.zeros((num_pages, page_size), bool)
    for b, n in enumerate(lengths):
        valid = min(chunk, n)
        positions[b, :valid] = np.arange(n - valid, n)
        for t in range(n):
            owned[tables[b, t // page_size], t % page_size] = True

    def attend(fn, k, v, tables):
        return np.asarray(jax.jit(fn)(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions, jnp.int32),
                                      jnp.asarray(lengths, jnp.int32), jnp.asarray(tables, jnp.int32)))

    k_nan, v_nan = k.copy(), v.copy()
    k_nan[:, ~owned], v_nan[:, ~owned] = np.nan, np.nan
    stale = tables.copy()
    for b, n in enumerate(lengths):
        stale[b, -(-n // page_size):] = [0, -1, 1 << 30, 1][b % 4]  # pages 0 and 1 are all NaN
    for fn in (paged_attention_blockwise, paged_attention_reference):
        clean = attend(fn, k, v, tables)
        assert np.isfinite(clean).all()
        np.testing.assert_array_equal(attend(fn, k_nan, v_nan, stale), clean)


# --------------------------------------------------------------------------- over gRPC


@pytest.fixture(scope="module")
def served(lm):
    from qwenjax.engine.async_engine import EngineThread
    from server.app import InferenceServer, ServerConfig

    engine = new_engine(lm)
    faults.raise_in_steps(engine.runner, lambda r: r.prompt_ids[0] == 201)
    faults.nan_logits(engine.runner, lambda r: r.prompt_ids[0] == 202 and len(r.output_ids) >= 2)
    loop, thread = LoopThread(), EngineThread(engine)
    server = InferenceServer(ServerConfig(port=0, metrics_port=0))
    loop.run(server.start())
    loop.run(server.attach(thread))
    yield engine, server
    loop.run(server.stop())
    thread.shutdown()
    loop.close()


def generate(ids, max_tokens):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def test_faults_answer_internal_only_for_their_requests_and_the_server_keeps_serving(served):
    engine, server = served
    a, b, nan_victim, raiser = prompts(9, [5, 12, 6, 4])
    nan_victim[0], raiser[0] = 202, 201

    async def together(requests):
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            calls = [stub.Generate(r, timeout=60) for r in requests]
            return await asyncio.gather(*(acollect(c) for c in calls), return_exceptions=True)

    alone = asyncio.run(together([generate(a, 20), generate(b, 20)]))
    mixed = asyncio.run(together([generate(a, 20), generate(nan_victim, 20), generate(b, 20)]))
    assert isinstance(mixed[1], grpc.aio.AioRpcError) and mixed[1].code() == grpc.StatusCode.INTERNAL
    assert "non-finite logits" in mixed[1].details()
    assert [m[0] for m in (mixed[0], mixed[2])] == [r[0] for r in alone]  # the others never noticed

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        code, details = code_of(stub.Generate(generate(raiser, 5), timeout=60))
        assert code == grpc.StatusCode.INTERNAL and "injected step failure" in details
        ids, _, complete = collect(stub.Generate(generate(a, 20), timeout=60))
        assert ids == alone[0][0] and complete.finish_reason == "length"

        # The context limit over the wire: exactly max_model_len works, one more is refused.
        ids, _, complete = collect(stub.Generate(generate(a * 25 + a[:3], 1), timeout=60))
        assert len(a * 25 + a[:3]) == MAX_LEN and len(ids) == 1 and complete.finish_reason == "length"
        code, details = code_of(stub.Generate(generate(a * 25 + a[:4], 1), timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"max context is {MAX_LEN}" in details
        code, details = code_of(stub.Generate(generate(a * 20, 30), timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens is 30" in details

    wait_until(lambda: server.gateway.in_flight == 0, 5.0)
    metrics = scrape(server.metrics_port)
    assert metrics['qwenjax:requests_total{finish_reason="error"}'] == 2
    assert metrics["qwenjax:kv_pages_used"] == 0 and metrics["qwenjax:requests_in_flight"] == 0


# --------------------------------------------------------------------------- restart


# Three step shapes (decode 0/1 × prefill 0/16): a cold start compiles few programs.
RESTART_ENGINE = ["--max-num-seqs=1", "--max-num-batched-tokens=16", "--prefill-chunk=16",
                  "--max-prefill-seqs=1", "--num-pages=64"]


def test_sigterm_drains_and_the_restart_is_a_warm_start(tmp_path):
    """Start cold with an empty compile cache, stream, SIGTERM mid-stream: the stream finishes,
    new calls get UNAVAILABLE, exit 0. The restart loads every program from the cache: its log
    line says warm, it is faster than the cold start, and its first request succeeds."""
    directory = tmp_path / "model"
    write_hf_checkpoint(tiny_config(max_position_embeddings=1024), directory, seed=4)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "server", "--model", str(directory), "--dtype", "float32",
               "--port", "0", "--metrics-port", "0", "--http-port", "0", "--drain-timeout", "60",
               *RESTART_ENGINE]

    def start():
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        lines = Lines(proc, proc.stderr)
        address = lines.until(r"listening on (\S+:\d+)", 120).group(1)
        start = lines.until(r"(cold|warm) start: compiled (\d+) step shapes in ([\d.]+)s; (\d+) new", 300)
        lines.until(r"serving .* warm-up=", 60)
        return proc, lines, address, start

    procs = []
    try:
        proc, lines, address, cold = start()
        procs.append(proc)
        assert cold.group(1) == "cold" and int(cold.group(4)) > 0
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            result, streaming = {}, threading.Event()

            def stream():
                ids = []
                for r in stub.Generate(generate([5, 6, 7], 1000), timeout=120):
                    if r.HasField("chunk"):
                        ids += r.chunk.token_ids
                        streaming.set()
                    else:
                        result["complete"] = r.complete
                result["ids"] = ids

            thread = threading.Thread(target=stream)
            thread.start()
            assert streaming.wait(60)
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                       == health_pb2.HealthCheckResponse.NOT_SERVING, 5.0)
            code, details = code_of(stub.Generate(generate([5], 2), timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
            thread.join(120)
            assert len(result["ids"]) == 1000 and result["complete"].finish_reason == "length"
        lines.until(r"drained; stopping", 60)
        assert proc.wait(60) == 0

        began = time.monotonic()
        proc, lines, address, warm = start()
        procs.append(proc)
        assert warm.group(1) == "warm" and int(warm.group(4)) == 0 and warm.group(2) == cold.group(2)
        assert float(warm.group(3)) < float(cold.group(3)), (warm.group(0), cold.group(0))
        with grpc.insecure_channel(address) as channel:
            ids, _, complete = collect(pb_grpc.InferenceStub(channel).Generate(generate([5, 6, 7], 4), timeout=60))
        assert ids == result["ids"][:4] and complete.finish_reason == "length"
        print(f"\nrestart: cold warm-up {cold.group(3)}s, warm {warm.group(3)}s; "
              f"second process ready and answered in {time.monotonic() - began:.1f}s")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
