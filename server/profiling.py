"""Profiling a running server (vLLM's and SGLang's ``/start_profile``, ``/stop_profile``): a
``jax.profiler`` trace of everything the process does between the two calls, written under the
server's ``--profiler-dir`` (vLLM: ``VLLM_TORCH_PROFILER_DIR``), one timestamped folder per
trace. ``/stop_profile`` answers with the folder, the Perfetto trace (open it in
ui.perfetto.dev; TensorBoard reads the folder) and where the device's time went
(``qwenjax.benchmarking.summarize_trace``). The routes exist only when a directory is set.

SGLang's ``{"num_steps": N}`` stops the trace by itself once the engines have dispatched N
more steps (a ``/stop_profile`` before then stops it early); the next ``/stop_profile`` then
answers with that finished trace.
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
        self.finished: dict | None = None  # a num_steps trace that stopped by itself, until read
        self._auto: asyncio.Task | None = None
        self._start_steps = 0
        self._lock = asyncio.Lock()

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/start_profile", self.start)
        router.add_post("/stop_profile", self.stop)

    async def _fields(self, request: web.Request, fields: set[str]) -> dict:
        if not await request.read():  # vLLM's clients send no body, SGLang's may send {}
            return {}
        return self.api._object(await self.api._body(request), fields)

    def _steps(self) -> int:
        return sum(engine.num_steps for engine in self.api.gateway.engines)

    async def start(self, request: web.Request) -> web.Response:
        import jax

        body = await self._fields(request, {"num_steps"})
        num_steps = body.get("num_steps")
        if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool)
                                      or num_steps < 1):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"num_steps must be a positive integer, got {num_steps!r}")
        async with self._lock:
            if self.running is not None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"a profile is already being written to {self.running}; "
                              "POST /stop_profile first")
            folder = self.directory / datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(folder), create_perfetto_trace=True)
            self.running, self.finished = folder, None
            if num_steps is not None:
                self._start_steps = self._steps()
                self._auto = asyncio.get_running_loop().create_task(
                    self._stop_after(folder, self._start_steps + num_steps))
        answer = {"status": "profiling", "directory": str(folder)}
        if num_steps is not None:
            answer["num_steps"] = num_steps
        return web.json_response(answer)

    async def _stop_after(self, folder: pathlib.Path, steps: int) -> None:
        while self._steps() < steps:
            await asyncio.sleep(0.005)
        async with self._lock:
            if self.running == folder:  # not stopped by hand meanwhile
                self.finished = await self._finish() | {"num_steps": steps - self._start_steps}

    async def stop(self, request: web.Request) -> web.Response:
        await self._fields(request, set())
        async with self._lock:
            if self.running is None:
                if self.finished is None:
                    raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                  "no profile is running; POST /start_profile first")
                answer, self.finished = self.finished, None  # stopped by itself after num_steps
                return web.json_response(answer)
            if self._auto is not None:
                self._auto.cancel()
            answer = await self._finish()
        return web.json_response(answer)

    async def _finish(self) -> dict:
        """Stop the running trace (the lock held) and describe it."""
        import jax

        from qwenjax.benchmarking import summarize_trace

        folder, self._auto = self.running, None
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
        return answer
