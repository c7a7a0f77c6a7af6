"""Front-end cost per streamed token: the CPU time the server's event loop spends on each token it
streams, over gRPC and over the OpenAI-compatible HTTP API.

The event loop (gRPC and HTTP handlers) and the engine thread share one Python process, and so
its GIL: while the loop encodes and writes a token, the engine's host work (scheduling, packing,
stop checks) can wait. ``scripts/bench_host.py`` measures the engine's own host time; this adds
what serving costs on top. A tiny random-weight model keeps the engine fast, so the front end
carries real load; clients run on a thread of their own, and the loop's and the engine
thread's CPU time are read from their per-thread clocks (Linux).

At batch B and a device step of T ms, the loop needs about B × (µs per token) of the GIL per
step: the report states that share for the batch sizes and step times of the GPU targets.

    python scripts/bench_frontend.py --requests 64 --tokens 64 --concurrency 32
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import threading
import time


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds ``thread`` has run (Linux per-thread clock)."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def tiny_engine(concurrency: int):
    from qwenjax.config import ModelConfig
    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax.loading import LoadedModel
    from qwenjax.model import Layout, Model, random_weights
    from qwenjax.parallel import make_mesh

    config = ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                         rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_ids=(2,))
    mesh = make_mesh(tp=1)
    layout = Layout.create(config, 1)
    import jax.numpy as jnp

    lm = LoadedModel(config, layout, mesh, random_weights(layout, mesh, jnp.float32), Model(layout, mesh),
                     "float32", None, "tiny-random")
    # Prompts are 16 tokens: few prefill rows and packed tokens keep the compiled shapes few.
    engine_config = EngineConfig(max_num_seqs=concurrency, max_num_batched_tokens=max(64, 4 * concurrency),
                                 prefill_chunk=16, max_prefill_seqs=2, page_size=16, max_model_len=256,
                                 num_pages=concurrency * 16 + 16)
    return Engine(lm, engine_config, warm_up=True, progress=False)


def _totals(results) -> tuple[int, int]:
    return sum(r[0] for r in results), sum(r[1] for r in results)


def emulate_device(engine, step_ms: float) -> None:
    """Make each step take at least ``step_ms`` of 'device' time, as a GPU step would: a step
    starts when it is dispatched and the previous one is done, and its tokens are ready
    ``step_ms`` later (read-back sleeps until then, releasing the GIL as a device wait does)."""
    runner = engine.runner
    dispatch, collect = runner.dispatch, runner.collect
    state = {"free_at": 0.0, "ready": {}}

    def timed_dispatch(out):
        step = dispatch(out)
        start = max(time.perf_counter(), state["free_at"])
        state["free_at"] = state["ready"][id(step)] = start + step_ms / 1e3
        return step

    def timed_collect(step):
        ready = state["ready"].pop(id(step), None)
        if ready is not None and ready > time.perf_counter():
            time.sleep(ready - time.perf_counter())
        return collect(step)

    runner.dispatch, runner.collect = timed_dispatch, timed_collect


async def grpc_load(address: str, requests: int, concurrency: int, tokens: int) -> int:
    import grpc

    from qwenjax_proto.v1 import inference_pb2 as pb
    from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc

    limit = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one(i: int) -> int:
            request = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[10 + (i + j) % 900 for j in range(16)]),
                sampling=pb.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
            async with limit:
                count = chunks = 0
                async for response in stub.Generate(request):
                    if response.HasField("chunk"):
                        count += len(response.chunk.token_ids)
                        chunks += 1
                return count, chunks

        return _totals(await asyncio.gather(*(one(i) for i in range(requests))))


async def http_load(base: str, requests: int, concurrency: int, tokens: int) -> int:
    import aiohttp

    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int) -> int:
            body = {"prompt": [10 + (i + j) % 900 for j in range(16)], "max_tokens": tokens,
                    "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
            async with limit:
                async with session.post(f"{base}/v1/completions", json=body) as response:
                    count = chunks = 0
                    async for line in response.content:
                        if line.startswith(b"data: {"):
                            usage = json.loads(line[6:]).get("usage")
                            if usage and usage["completion_tokens"] > count:
                                count, chunks = usage["completion_tokens"], chunks + 1
                    return count, chunks

        return _totals(await asyncio.gather(*(one(i) for i in range(requests))))


async def direct_load(engine_thread, requests: int, concurrency: int, tokens: int):
    """The same requests through EngineThread.generate on this thread's loop: no network, no
    encoding (the baseline the protocols are compared with)."""
    from qwenjax.sampling import SamplingParams

    limit = asyncio.Semaphore(concurrency)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int):
        async with limit:
            count = chunks = 0
            async for output in engine_thread.generate([10 + (i + j) % 900 for j in range(16)],
                                                       params, f"direct-{i}-{time.monotonic_ns()}"):
                count += len(output.delta_token_ids)
                chunks += bool(output.delta_token_ids)
            return count, chunks

    return _totals(await asyncio.gather(*(one(i) for i in range(requests))))


def measure(server, loop_thread, engine_thread, api: str, requests: int, concurrency: int,
            tokens: int) -> dict:
    if api == "direct":
        load = direct_load(server.gateway.engine_thread, requests, concurrency, tokens)
    elif api == "grpc":
        load = grpc_load(server.address, requests, concurrency, tokens)
    else:
        load = http_load(f"http://127.0.0.1:{server.http_port}", requests, concurrency, tokens)
    loop0, engine0, wall0 = thread_cpu(loop_thread), thread_cpu(engine_thread), time.perf_counter()
    streamed, chunks = asyncio.run(load)  # the clients: this thread, its own event loop
    wall = time.perf_counter() - wall0
    loop_s, engine_s = thread_cpu(loop_thread) - loop0, thread_cpu(engine_thread) - engine0
    return dict(api=api, requests=requests, concurrency=concurrency, tokens=streamed,
                chunks=chunks, tokens_per_chunk=streamed / max(chunks, 1),
                loop_us_per_chunk=1e6 * loop_s / max(chunks, 1),
                tokens_per_s=streamed / wall, loop_us_per_token=1e6 * loop_s / streamed,
                engine_us_per_token=1e6 * engine_s / streamed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32, help="streams at once (and the engine's batch)")
    p.add_argument("--tokens", type=int, default=64, help="tokens each request streams")
    p.add_argument("--api", default="direct,grpc,openai",
                   help="direct: EngineThread.generate without a protocol (the baseline)")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="emulate a device step of this many ms (0: as fast as the tiny model runs, "
                        "where the front end is the bottleneck)")
    p.add_argument("--json", default=None)
    p.add_argument("--switch-interval", type=float, default=None, metavar="S",
                   help="sys.setswitchinterval for the run (default: the interpreter's, 0.005)")
    args = p.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    from qwenjax.engine.async_engine import EngineThread
    from server.app import InferenceServer, ServerConfig

    engine = tiny_engine(args.concurrency)
    if args.step_ms:
        emulate_device(engine, args.step_ms)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="server-loop", daemon=True)
    loop_thread.start()
    run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(60)  # noqa: E731
    server = InferenceServer(ServerConfig(port=0, metrics_port=None, http_port=0, max_queue=0,
                                          max_queued_tokens=0, step_timeout=0))
    run(server.start())
    engine_thread = EngineThread(engine)
    run(server.attach(engine_thread))
    try:
        for api in args.api.split(","):  # one short pass first: connections, first-call effects
            measure(server, loop_thread, engine_thread._thread, api, 4, 4, 4)
        rows = [measure(server, loop_thread, engine_thread._thread, api, args.requests,
                        args.concurrency, args.tokens) for api in args.api.split(",")]
    finally:
        run(server.stop())
        engine_thread.shutdown()
        loop.call_soon_threadsafe(loop.stop)

    import jax

    emulated = f", emulated device step {args.step_ms:g} ms" if args.step_ms else ""
    print(f"# front end: {args.requests} requests × {args.tokens} tokens, {args.concurrency} at once, "
          f"tiny random model{emulated}, GIL switch interval {sys.getswitchinterval() * 1e3:g} ms, "
          f"{jax.devices()[0].platform}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}")
    if args.step_ms:
        ideal = args.concurrency * 1e3 / args.step_ms
        for r in rows:
            r["ideal_tokens_per_s"] = ideal
            r["shortfall"] = 1 - r["tokens_per_s"] / ideal
        print(f"(at most {ideal:.0f} tokens/s: {args.concurrency} streams, one token per "
              f"{args.step_ms:g} ms step; shortfall = 1 − measured / that)")
    print("| api | tokens/s | tokens per chunk | event loop µs/chunk | event loop µs/token | "
          "engine thread µs/token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        shortfall = f" ({100 * r['shortfall']:.1f}% short)" if "shortfall" in r else ""
        print(f"| {r['api']} | {r['tokens_per_s']:.0f}{shortfall} | {r['tokens_per_chunk']:.2f} | "
              f"{r['loop_us_per_chunk']:.1f} | {r['loop_us_per_token']:.1f} | "
              f"{r['engine_us_per_token']:.1f} |")
    print("\nEvent-loop time per step at one token per chunk (a GPU step slow enough for the loop to "
          "keep up), as a share of the device step (batch × µs/chunk ÷ step):")
    print("| api | batch 32, 10 ms step | batch 64, 15 ms step | batch 64, 30 ms step |")
    print("|---|---|---|---|")
    for r in rows:
        c = r["loop_us_per_chunk"] * 1e-3  # ms
        print(f"| {r['api']} | {100 * 32 * c / 10:.1f}% | {100 * 64 * c / 15:.1f}% | "
              f"{100 * 64 * c / 30:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "step_ms": args.step_ms, "rows": rows},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
