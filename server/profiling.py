"""Profiling a running server (vLLM's and SGLang's ``/start_profile``, ``/stop_profile``): a
``jax.profiler`` trace of everything the process does between the two calls, written under the
server's ``--profiler-dir`` (vLLM: ``VLLM_TORCH_PROFILER_DIR``), one timestamped folder per
trace. ``/stop_profile`` answers with the folder, the Perfetto trace (open it in
ui.perfetto.dev; TensorBoard reads the folder) and where the device's time went
(``qwenjax.benchmarking.summarize_trace``). The routes exist only when a directory is set.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import pathlib

import grpc
from aiohttp import web

from server.gateway import Refused


class Profiler:
    def __init__(self, directory: str | pathlib.Path, api):
        self.directory = pathlib.Path(directory)
        self.api = api  # server.openai_api.OpenAIServer: body parsing
        self.running: pathlib.Path | None = None
        self._lock = asyncio.Lock()

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/start_profile", self.start)
        router.add_post("/stop_profile", self.stop)

    async def _no_fields(self, request: web.Request) -> None:
        if await request.read():  # SGLang's clients may send {} (or its options, not taken here)
            self.api._object(await self.api._body(request), set())

    async def start(self, request: web.Request) -> web.Response:
        import jax

        await self._no_fields(request)
        async with self._lock:
            if self.running is not None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"a profile is already being written to {self.running}; "
                              "POST /stop_profile first")
            folder = self.directory / datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(folder), create_perfetto_trace=True)
            self.running = folder
        return web.json_response({"status": "profiling", "directory": str(folder)})

    async def stop(self, request: web.Request) -> web.Response:
        import jax

        from qwenjax.benchmarking import summarize_trace

        await self._no_fields(request)
        async with self._lock:
            folder = self.running
            if folder is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              "no profile is running; POST /start_profile first")
            await asyncio.to_thread(jax.profiler.stop_trace)  # writes the files: seconds
            self.running = None
        traces = sorted(folder.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
        answer = {"status": "stopped", "directory": str(folder),
                  "trace": str(traces[-1]) if traces else None, "summary": None}
        if traces:
            try:
                answer["summary"] = summarize_trace(traces[-1], top=10)
            except (ValueError, KeyError, json.JSONDecodeError):
                pass  # nothing ran on the device meanwhile
        return web.json_response(answer)
