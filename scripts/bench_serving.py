"""Serving benchmark: concurrent streamed Generate calls against `qwenjax serve` over loopback.

    python scripts/bench_serving.py --requests 64 --concurrency 16 --max-tokens 64
    python scripts/bench_serving.py --address 127.0.0.1:50051   # a server that is already running

Without ``--address`` it starts ``python -m server`` on a free loopback port with
the given engine options, waits for health SERVING, runs the load and stops the
server with SIGTERM. Reports output tokens/s, requests/s, TTFT and inter-token
latency percentiles, and checks that every request completed.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

QUESTIONS = [
    "What is the capital of France?", "Write a Python function that reverses a string.",
    "Explain what a hash map is.", "Name three primary colors.", "What is 17 times 23?",
    "Why is the sky blue?", "Write a bash loop that prints 1 to 10.", "What is recursion?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", "0", "--max-num-seqs", str(args.max_num_seqs),
           "--max-model-len", str(args.max_model_len), "--prefill-chunk", str(args.prefill_chunk),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, f"127.0.0.1:{port}"


async def _wait_serving(address: str, timeout: float) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() - start < timeout:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - start
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"server at {address} not SERVING after {timeout:.0f}s")


async def _one(stub, pb, index: int, max_tokens: int) -> dict:
    request = pb.GenerateRequest(
        messages=pb.Messages(messages=[pb.Message(role="user", content=QUESTIONS[index % len(QUESTIONS)])]),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    start = time.perf_counter()
    arrivals, tokens, finish = [], 0, None
    async for response in stub.Generate(request):
        if response.HasField("chunk") and response.chunk.token_ids:
            arrivals.append(time.perf_counter())
            tokens += len(response.chunk.token_ids)
        elif response.HasField("complete"):
            finish = response.complete.finish_reason
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return dict(ttft=arrivals[0] - start if arrivals else None, e2e=time.perf_counter() - start,
                tokens=tokens, gaps=gaps, finish=finish)


async def _load(address: str, requests: int, concurrency: int, max_tokens: int) -> tuple[list, float]:
    import grpc

    from qwenjax_proto.v1 import inference_pb2 as pb, inference_pb2_grpc as rpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.InferenceStub(channel)
        await _one(stub, pb, 0, 4)  # first-request effects out of the measurement
        limit = asyncio.Semaphore(concurrency)

        async def bounded(i):
            async with limit:
                return await _one(stub, pb, i, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        return results, time.perf_counter() - start


def _pct(values, q) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="use a running server instead of starting one")
    p.add_argument("--model", default=None)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    proc, address = (None, args.address) if args.address else _start_server(args)
    try:
        ready_s = asyncio.run(_wait_serving(address, args.startup_timeout))
        results, seconds = asyncio.run(_load(address, args.requests, args.concurrency, args.max_tokens))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    completed = sum(r["finish"] == "length" for r in results)
    summary = dict(
        date=datetime.date.today().isoformat(), address=address, requests=args.requests,
        concurrency=args.concurrency, max_tokens=args.max_tokens, completed=completed,
        server_ready_s=ready_s, seconds=seconds, output_tokens=tokens, tokens_per_s=tokens / seconds,
        requests_per_s=args.requests / seconds, ttft_p50_s=statistics.median(ttfts),
        ttft_p99_s=_pct(ttfts, 0.99), itl_p50_ms=1e3 * statistics.median(gaps), itl_p99_ms=1e3 * _pct(gaps, 0.99),
        e2e_p50_s=statistics.median(r["e2e"] for r in results))
    print(f"# serving: {args.requests} requests, concurrency {args.concurrency}, {args.max_tokens} tokens each, "
          f"{os.cpu_count()} CPU cores, {summary['date']}")
    print("| figure | value |\n|---|---|")
    for key in ("completed", "server_ready_s", "tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s",
                "itl_p50_ms", "itl_p99_ms", "e2e_p50_s"):
        value = summary[key]
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if completed == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
