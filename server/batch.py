"""``qwenjax run-batch``: an OpenAI batch file through the OpenAI-compatible API, offline, as
vLLM's ``run-batch`` (``python -m vllm.entrypoints.openai.run_batch``).

Each input line is one request in OpenAI's batch format::

    {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

with ``url`` one of ``URLS``; each output line answers one input line, in input order::

    {"id": "batch_req_…", "custom_id": "q-1",
     "response": {"status_code": 200, "request_id": "chatcmpl-…", "body": {...}}, "error": null}

The bodies are those of the HTTP API (server/openai_api.py): the same handlers serve them over
a private Unix socket, so a batch line and an HTTP request with the same body get the same
answer (and the same refusals, as ``status_code`` 4xx with OpenAI's error body). A line that
is not a request (not JSON, no ``custom_id``, an unknown ``url``, ``stream: true``, a
``custom_id`` seen before) gets ``response: null`` and ``error: {"code", "message"}``.
Up to ``max_concurrency`` lines run at once; the engine batches them as it batches clients.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
from typing import IO, Iterable, Sequence

import aiohttp

from server.gateway import Admission, Gateway
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


@dataclasses.dataclass
class BatchSummary:
    total: int = 0
    succeeded: int = 0      # status 200
    failed: int = 0         # a refusal (4xx/5xx) or a line that is not a request
    seconds: float = 0.0


class LineError(ValueError):
    """A line that is not a batch request; ``code`` goes to the output line's error."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def parse_line(text: str, seen: set[str]) -> tuple[str, str, dict]:
    """(custom_id, url, body) of one input line; LineError naming what is wrong."""
    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        raise LineError("invalid_json", f"the line is not JSON: {error}") from None
    if not isinstance(line, dict):
        raise LineError("invalid_request", f"a line must be a JSON object, got {type(line).__name__}")
    unknown = sorted(set(line) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise LineError("invalid_request", f"unknown field(s) {', '.join(map(repr, unknown))}; a line "
                                           "has custom_id, method, url and body")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("invalid_request", "custom_id must be a non-empty string")
    if custom_id in seen:
        raise LineError("duplicate_custom_id", f"custom_id {custom_id!r} appears on an earlier line; "
                                               "each request needs its own")
    seen.add(custom_id)
    if line.get("method", "POST") != "POST":
        raise LineError("invalid_method", f"method must be POST, got {line.get('method')!r}")
    url = line.get("url")
    if url not in URLS:
        raise LineError("invalid_url", f"url must be one of {', '.join(URLS)}, got {url!r}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_request", f"body must be a JSON object, got {type(body).__name__}")
    if body.get("stream"):
        raise LineError("invalid_request", "body.stream must be false in a batch (each answer is "
                                           "written whole)")
    return custom_id, url, body


def _output(custom_id: str | None, response: dict | None = None, error: dict | None = None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response,
            "error": error}


async def run_batch(engine_thread, lines: Iterable[str], sink: IO[str], *,
                    served_model_names: Sequence[str] = (), reasoning_parser: str | None = None,
                    max_concurrency: int = 256, progress_every: float = 30.0) -> BatchSummary:
    """Answer every request of ``lines`` (the input file's lines) with ``engine_thread``'s
    engine, writing one output line per input line (blank lines skipped) to ``sink`` in input
    order, as each is ready."""
    from server.openai_api import OpenAIServer

    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be ≥ 1, got {max_concurrency}")
    metrics = ServerMetrics(lambda: gateway.engines, lambda: gateway.in_flight)
    gateway = Gateway(Admission(0, 0), metrics)  # no queue limits: the batch waits its turn
    gateway.engine_thread = engine_thread
    api = OpenAIServer(gateway, metrics.registry, lambda: True, max_request_bytes=1 << 30,
                       served_model_names=served_model_names, reasoning_parser=reasoning_parser)
    summary = BatchSummary()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwenjax-batch-") as directory:
        path = os.path.join(directory, "api.sock")
        await api.start(path=path)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path),
                                             timeout=aiohttp.ClientTimeout(total=None)) as session:
                await _run(session, lines, sink, summary, max_concurrency, progress_every, start)
        finally:
            await api.stop()
    summary.seconds = time.perf_counter() - start
    return summary


async def _run(session: aiohttp.ClientSession, lines: Iterable[str], sink: IO[str],
               summary: BatchSummary, max_concurrency: int, progress_every: float,
               start: float) -> None:
    seen: set[str] = set()
    slots = asyncio.Semaphore(max_concurrency)
    pending: dict[int, asyncio.Task] = {}
    written = 0
    last_report = start

    async def answer(custom_id: str, url: str, body: dict) -> dict:
        try:
            async with session.post(f"http://batch{url}", json=body) as reply:
                status = reply.status
                data = await reply.json(content_type=None)
        except (aiohttp.ClientError, json.JSONDecodeError) as error:  # the API's own failure
            log.error("run-batch: request %r failed: %s", custom_id, error)
            return _output(custom_id, error={"code": "internal_error", "message": str(error)})
        finally:
            slots.release()
        request_id = data.get("id") if isinstance(data, dict) and status == 200 else None
        return _output(custom_id, {"status_code": status,
                                   "request_id": request_id or f"batch-{uuid.uuid4().hex}",
                                   "body": data})

    def finished(record: dict) -> None:
        nonlocal last_report
        response = record["response"]
        summary.total += 1
        if response is not None and response["status_code"] == 200:
            summary.succeeded += 1
        else:
            summary.failed += 1
        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        now = time.perf_counter()
        if progress_every and now - last_report >= progress_every:
            last_report = now
            log.info("run-batch: %d lines answered (%d failed) in %.0f s", summary.total,
                     summary.failed, now - start)

    async def flush(block: bool) -> None:
        """Write the answers that are ready in input order (``block``: all of them)."""
        nonlocal written
        while written in pending and (block or pending[written].done()):
            finished(await pending.pop(written))
            written += 1

    async def immediate(record: dict) -> dict:
        return record

    index = 0
    try:
        for text in lines:
            if not text.strip():
                continue
            try:
                custom_id, url, body = parse_line(text, seen)
            except LineError as error:
                custom_id = _custom_id(text)
                pending[index] = asyncio.ensure_future(immediate(
                    _output(custom_id, error={"code": error.code, "message": str(error)})))
            else:
                await slots.acquire()
                pending[index] = asyncio.ensure_future(answer(custom_id, url, body))
            index += 1
            await asyncio.sleep(0)  # let finished answers be written as the input is read
            await flush(block=False)
        await flush(block=True)
    finally:
        for task in pending.values():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending.values(), return_exceptions=True)
        sink.flush()


def _custom_id(text: str) -> str | None:
    """The custom_id of a line that is not a valid request, when it has a readable one."""
    try:
        line = json.loads(text)
    except json.JSONDecodeError:
        return None
    value = line.get("custom_id") if isinstance(line, dict) else None
    return value if isinstance(value, str) else None


def read_lines(source: str) -> Iterable[str]:
    """The lines of a local file, or of stdin for ``-``."""
    import sys

    if source == "-":
        yield from sys.stdin
        return
    with open(source, encoding="utf-8") as f:
        yield from f
