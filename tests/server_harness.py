"""Shared by the server tests (in-process and subprocess): loopback clients, /metrics scrapes,
waits with deadlines and a line reader for subprocess logs."""
from __future__ import annotations

import asyncio
import queue
import re
import socket
import subprocess
import threading
import time
import json
import urllib.error
import urllib.request

import grpc

from qwenjax_proto.v1 import inference_pb2 as pb


# The engine the server test modules share (conftest's served_model): few step shapes, so warm-up
# compiles 4 decode-only + 5 prefill programs (~40 s cold on 2 cores, ~12 s from the persistent
# cache); 16-token chunks fit the short prompts used there. float32: bfloat16 was no faster on
# this CPU, and float32 keeps greedy parity exact.
SERVER_DTYPE = "float32"
SERVER_ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=64, prefill_chunk=16, max_prefill_seqs=1,
                     page_size=16, max_model_len=512, num_pages=8 * 32)


def free_port() -> int:
    """A port free a moment ago (for a subprocess that must be told its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopThread:
    """An asyncio loop on its own thread for the servers; tests drive it with ``run``."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Servers:
    """InferenceServers over one EngineThread on a LoopThread, each started with ``defaults``
    overridden by the call's config; ``stop_all`` at the end of the module."""

    def __init__(self, loop: LoopThread, engine_thread, **defaults):
        self.loop, self.engine_thread, self.defaults = loop, engine_thread, defaults
        self.started = []

    def start(self, attach: bool = True, **config):
        from server.app import InferenceServer, ServerConfig

        server = InferenceServer(ServerConfig(**{**self.defaults, **config}))
        self.loop.run(server.start())
        if attach:
            self.loop.run(server.attach(self.engine_thread))
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            self.loop.run(server.stop())


def greedy(max_tokens: int, **more) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, **more)


def collect(responses):
    """(token ids, text, Complete) of a finished Generate stream."""
    ids, text, complete = [], "", None
    for r in responses:
        if r.HasField("chunk"):
            assert complete is None, "a chunk after Complete"
            ids += r.chunk.token_ids
            text += r.chunk.text
        else:
            complete = r.complete
    return ids, text, complete


async def acollect(call):
    ids, text, complete = [], "", None
    async for r in call:
        if r.HasField("chunk"):
            ids += r.chunk.token_ids
            text += r.chunk.text
        else:
            complete = r.complete
    return ids, text, complete


def scrape(port: int) -> dict[str, float]:
    """Samples of the /metrics endpoint: 'name' or 'name{label="v"}' → value."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def wait_until(predicate, timeout: float, interval: float = 0.02) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


def wait_engine_idle(engine, timeout: float = 10.0) -> None:
    wait_until(lambda: engine.num_unfinished == 0 and engine.allocator.num_used == 0, timeout)


class Lines:
    """A subprocess stream read on a thread, so every wait for a line has a deadline."""

    def __init__(self, proc: subprocess.Popen, stream):
        self.proc, self.seen = proc, []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self._queue.put(line) for line in stream], daemon=True).start()

    def until(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, "process exited early:\n" + "".join(self.seen)
                continue
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"no {pattern!r} in {timeout}s:\n" + "".join(self.seen))


def code_of(call) -> tuple[grpc.StatusCode, str]:
    """Status of a streaming call (read to its end) or of a thunk making a unary call."""
    try:
        call() if callable(call) else collect(call)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def http(base: str, path: str, body=None, headers=None, method=None) -> tuple[int, dict | str]:
    """(status, JSON body or text) of an HTTP request; ``body``: bytes, or JSON to encode."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw
