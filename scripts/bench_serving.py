"""Serving benchmark: concurrent streamed requests against `qwenjax serve` over loopback.

    python scripts/bench_serving.py --requests 64 --concurrency 16 --max-tokens 64
    python scripts/bench_serving.py --api openai ...              # the same over the HTTP API
    python scripts/bench_serving.py --address 127.0.0.1:50051     # a gRPC server already running
    python scripts/bench_serving.py --base-url http://HOST:8000   # any OpenAI-compatible server
                                                                  # (qwenjax, vLLM, SGLang)
    python scripts/bench_serving.py --input-len 1024 --output-len 128   # random token prompts

Without ``--address`` or ``--base-url`` it starts ``python -m server`` on free loopback ports
with the given engine options, waits for health SERVING, runs the load and stops the server
with SIGTERM. Every request is a greedy chat turn that runs to ``--max-tokens``
(``ignore_eos``), so two servers given the same arguments do the same work. Reports output
tokens/s, requests/s, TTFT and inter-token latency percentiles, and checks that every
request completed.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
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


class Workload:
    """What each request asks: a chat question (default), or --input-len random token ids sent as
    a raw prompt (vLLM's random dataset; needs no tokenizer, so random-weight presets serve it).
    Every request is greedy and runs to max_tokens (ignore_eos)."""

    def __init__(self, max_tokens: int, token_prompts: list[list[int]] | None = None):
        self.max_tokens = max_tokens
        self.token_prompts = token_prompts

    @classmethod
    def make(cls, max_tokens: int, input_len: int | None, requests: int, seed: int = 0) -> Workload:
        if input_len is None:
            return cls(max_tokens)
        rng = random.Random(seed)
        # Ordinary vocabulary ids (below every Qwen2.5 vocabulary's special tokens).
        return cls(max_tokens, [[rng.randrange(1000, 100_000) for _ in range(input_len)]
                                for _ in range(requests + 1)])

    def grpc_request(self, pb, index: int, max_tokens: int):
        sampling = pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        if self.token_prompts is not None:
            return pb.GenerateRequest(token_ids=pb.TokenIds(ids=self.token_prompts[index]), sampling=sampling)
        question = QUESTIONS[index % len(QUESTIONS)]
        return pb.GenerateRequest(messages=pb.Messages(messages=[pb.Message(role="user", content=question)]),
                                  sampling=sampling)

    def http_request(self, model: str, index: int, max_tokens: int) -> tuple[str, dict]:
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        if self.token_prompts is not None:
            return "/v1/completions", {**body, "prompt": self.token_prompts[index]}
        question = QUESTIONS[index % len(QUESTIONS)]
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": question}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args) -> tuple[subprocess.Popen, str, str | None]:
    """The server process, its gRPC address and (--api openai) its HTTP base URL."""
    port, http_port = _free_port(), _free_port() if args.api == "openai" else 0
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
           "--http-port", str(http_port),
           "--metrics-port", "0", "--max-num-seqs", str(args.max_num_seqs),
           "--max-model-len", str(args.max_model_len), "--prefill-chunk", str(args.prefill_chunk),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    # stderr to a file: an unread pipe fills up and stalls the server's logging.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=args.server_log, text=True)
    return proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}" if http_port else None


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


async def _wait_http(base_url: str, timeout: float) -> float:
    import aiohttp

    start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() - start < timeout:
            try:
                async with session.get(f"{base_url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"server at {base_url} not healthy after {timeout:.0f}s")


async def _one_openai(session, base_url: str, model: str, work: Workload, index: int,
                      max_tokens: int) -> dict:
    """One streamed completion; tokens counted from vLLM's continuous usage stats (which
    qwenjax and vLLM send), else one per chunk with text."""
    path, body = work.http_request(model, index, max_tokens)
    start = time.perf_counter()
    arrivals, tokens, finish = [], 0, None
    async with session.post(f"{base_url}{path}", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage")
            count = usage["completion_tokens"] - tokens if usage else 0
            for choice in event.get("choices", ()):
                if not usage and ((choice.get("delta") or {}).get("content") or choice.get("text")):
                    count = 1
                finish = choice.get("finish_reason") or finish
            if count > 0 and event.get("choices"):
                arrivals.append(time.perf_counter())
            tokens += count
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return dict(ttft=arrivals[0] - start if arrivals else None, e2e=time.perf_counter() - start,
                tokens=tokens, gaps=gaps, finish=finish)


async def _load_openai(base_url: str, model: str | None, work: Workload, requests: int,
                       concurrency: int) -> tuple[list, float]:
    import aiohttp

    limits = aiohttp.TCPConnector(limit=concurrency + 1)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        if model is None:
            async with session.get(f"{base_url}/v1/models") as response:
                model = (await response.json())["data"][0]["id"]
        # First-request effects out of the measurement (the extra prompt, index `requests`).
        await _one_openai(session, base_url, model, work, requests, 4)
        limit = asyncio.Semaphore(concurrency)

        async def bounded(i):
            async with limit:
                return await _one_openai(session, base_url, model, work, i, work.max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        return results, time.perf_counter() - start


async def _one(stub, pb, work: Workload, index: int, max_tokens: int) -> dict:
    request = work.grpc_request(pb, index, max_tokens)
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


async def _load(address: str, work: Workload, requests: int, concurrency: int) -> tuple[list, float]:
    import grpc

    from qwenjax_proto.v1 import inference_pb2 as pb, inference_pb2_grpc as rpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.InferenceStub(channel)
        await _one(stub, pb, work, requests, 4)  # first-request effects out of the measurement
        limit = asyncio.Semaphore(concurrency)

        async def bounded(i):
            async with limit:
                return await _one(stub, pb, work, i, work.max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        return results, time.perf_counter() - start


def _pct(values, q) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="use a running gRPC server instead of starting one")
    p.add_argument("--base-url", default=None,
                   help="use a running OpenAI-compatible server (http://HOST:PORT) instead of starting one")
    p.add_argument("--api", choices=["grpc", "openai"], default=None,
                   help="the protocol of the load (default: openai with --base-url, else grpc)")
    p.add_argument("--model", default=None, help="the model the started server loads")
    p.add_argument("--model-name", default=None,
                   help="the request's model field over HTTP (default: the first of /v1/models)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", "--output-len", dest="max_tokens", type=int, default=64,
                   help="tokens each request generates (greedy, ignore_eos)")
    p.add_argument("--input-len", type=int, default=None,
                   help="prompts of this many random token ids (vLLM's random dataset; works with "
                        "random-weight presets) instead of chat questions")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--json", default=None)
    p.add_argument("--server-log", type=argparse.FileType("w"), default=None,
                   help="write the started server's log here (default: discarded)")
    args = p.parse_args(argv)
    if args.address and args.base_url:
        p.error("--address (gRPC) and --base-url (HTTP) name two servers; give one")
    args.api = args.api or ("openai" if args.base_url else "grpc")
    if (args.address and args.api != "grpc") or (args.base_url and args.api != "openai"):
        p.error("--address is a gRPC server (--api grpc), --base-url an HTTP one (--api openai)")
    args.server_log = args.server_log or subprocess.DEVNULL

    proc, address, base_url = None, args.address, args.base_url
    if not (address or base_url):
        proc, address, base_url = _start_server(args)
    try:
        work = Workload.make(args.max_tokens, args.input_len, args.requests)
        if args.api == "openai":
            ready_s = asyncio.run(_wait_http(base_url, args.startup_timeout))
            results, seconds = asyncio.run(_load_openai(base_url, args.model_name, work, args.requests,
                                                        args.concurrency))
        else:
            ready_s = asyncio.run(_wait_serving(address, args.startup_timeout))
            results, seconds = asyncio.run(_load(address, work, args.requests, args.concurrency))
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
        date=datetime.date.today().isoformat(), api=args.api,
        address=base_url if args.api == "openai" else address, requests=args.requests,
        concurrency=args.concurrency, max_tokens=args.max_tokens, input_len=args.input_len,
        completed=completed,
        server_ready_s=ready_s, seconds=seconds, output_tokens=tokens, tokens_per_s=tokens / seconds,
        requests_per_s=args.requests / seconds, ttft_p50_s=statistics.median(ttfts),
        ttft_p99_s=_pct(ttfts, 0.99), itl_p50_ms=1e3 * statistics.median(gaps), itl_p99_ms=1e3 * _pct(gaps, 0.99),
        e2e_p50_s=statistics.median(r["e2e"] for r in results))
    print(f"# serving ({args.api}): {args.requests} requests, concurrency {args.concurrency}, "
          f"{args.max_tokens} tokens each, "
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
