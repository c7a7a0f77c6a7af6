"""Profiling a running server (vLLM's and SGLang's ``/start_profile``, ``/stop_profile``): a
``jax.profiler`` trace of everything the process does between the two calls, written under the
server's ``--profiler-dir`` (vLLM: ``VLLM_TORCH_PROFILER_DIR``), one timestamped folder per
trace (qwenjax/profiling.py, shared with ``LLM.start_profile``). ``/stop_profile`` answers
with the folder, the Perfetto trace (open it in ui.perfetto.dev; TensorBoard reads the folder)
and where the device's time went (``qwenjax.benchmarking.summarize_trace``). The routes exist
only when a directory is set.

SGLang's ``{"num_steps": N}`` stops the trace by itself once the engines have dispatched N
more steps (a ``/stop_profile`` before then stops it early); the next ``/stop_profile`` then
answers with that finished trace. The rest of SGLang's body works as ``python -m
sglang.profiler`` sends it: ``start_step`` (the trace begins when the engines' step count
reaches it), ``output_dir`` (a folder inside the server's directory), ``profile_prefix``,
``activities`` (``CPU`` and ``GPU`` are both in every trace; ``MEM`` adds a device memory
profile at the end).
"""
from __future__ import annotations

import asyncio
import pathlib

import grpc
from aiohttp import web

from qwenjax.profiling import check_prefix, start_trace, stop_trace, trace_folder
from server.gateway import Refused


# SGLang's activities: the jax trace holds the host's (CPU) and the device's (GPU) work together;
# MEM adds a device memory profile (pprof) written when the trace stops.
ACTIVITIES = ("CPU", "GPU", "MEM")
# What SGLang's /start_profile takes (python -m sglang.profiler sends most of them, numbers as
# strings); with_stack and record_shapes are PyTorch profiler options (the trace has the stack
# of each jitted call and the shapes of each XLA op anyway), merge_profiles merges per-rank
# files (this process writes one trace).
START_FIELDS = {"num_steps", "start_step", "output_dir", "activities", "profile_prefix",
                "profile_id", "profile_by_stage", "merge_profiles", "with_stack", "record_shapes"}


def _count(body: dict, name: str) -> int | None:
    """A positive step count, as an int or (SGLang's client) a string of digits."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{name} must be a positive integer, got {value!r}")
    return value


class Profiler:
    def __init__(self, directory: str | pathlib.Path, api):
        self.directory = pathlib.Path(directory)
        self.api = api  # server.openai_api.OpenAIServer: body parsing
        self.running: pathlib.Path | None = None
        self.finished: dict | None = None  # a num_steps trace that stopped by itself, until read
        self.memory = False  # the running profile writes a device memory profile at its end
        self.tracing = False  # the running profile's trace has begun (see start_step)
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

    def _folder(self, body: dict) -> pathlib.Path:
        """Where the trace goes: SGLang's output_dir (inside the server's directory: a client
        picks a folder, not any path on the server), else a new timestamped folder."""
        prefix = body.get("profile_prefix") or body.get("profile_id") or ""
        try:
            check_prefix(prefix, "profile_prefix and profile_id")
        except ValueError as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        output_dir = body.get("output_dir")
        if output_dir is None:
            return trace_folder(self.directory, prefix)
        root = self.directory.resolve()
        folder = (root / str(output_dir)).resolve()  # a relative one is under the directory
        if not isinstance(output_dir, str) or not folder.is_relative_to(root):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"output_dir must lie inside the server's --profiler-dir ({root}), "
                          f"got {output_dir!r}")
        return folder / prefix if prefix else folder

    async def start(self, request: web.Request) -> web.Response:
        body = await self._fields(request, START_FIELDS)
        num_steps, start_step = _count(body, "num_steps"), _count(body, "start_step")
        activities = body.get("activities") or ["CPU", "GPU"]
        if not isinstance(activities, list) or not set(activities) <= set(ACTIVITIES):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"activities must be a list of {', '.join(ACTIVITIES)} (the trace holds "
                          f"the host's and the device's work; ROCm's RPD and CUDA_PROFILER are "
                          f"PyTorch's), got {activities!r}")
        for name in ("profile_by_stage", "merge_profiles", "with_stack", "record_shapes"):
            if not isinstance(body.get(name, False), bool):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{name} must be true or false")
        if body.get("profile_by_stage"):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "profile_by_stage is not supported: "
                          "one engine step holds prefill chunks and decode rows together; the "
                          "trace's summary splits the device time by kind of work")
        folder = self._folder(body)
        async with self._lock:
            if self.running is not None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"a profile is already being written to {self.running}; "
                              "POST /stop_profile first")
            self.running, self.finished, self.memory = folder, None, "MEM" in activities
            self.tracing = False
            folder.mkdir(parents=True, exist_ok=True)
            if start_step is None or start_step <= self._steps():
                self._start_trace()
            if start_step is not None or num_steps is not None:
                self._auto = asyncio.get_running_loop().create_task(
                    self._run(folder, start_step, num_steps))
        answer = {"status": "profiling" if self.tracing else "waiting", "directory": str(folder)}
        for name, value in (("num_steps", num_steps), ("start_step", start_step)):
            if value is not None:
                answer[name] = value
        return web.json_response(answer)

    def _start_trace(self) -> None:
        start_trace(self.running)
        self.tracing, self._start_steps = True, self._steps()

    async def _wait_steps(self, steps: int) -> None:
        while self._steps() < steps:
            await asyncio.sleep(0.005)

    async def _run(self, folder: pathlib.Path, start_step: int | None, num_steps: int | None) -> None:
        """SGLang's start_step (the engines' step count at which the trace begins) and
        num_steps (how many steps it lasts), in the background."""
        if start_step is not None:
            await self._wait_steps(start_step)
            async with self._lock:
                if self.running != folder:
                    return
                if not self.tracing:
                    self._start_trace()
        if num_steps is not None:
            await self._wait_steps(self._start_steps + num_steps)
            async with self._lock:
                if self.running == folder:  # not stopped by hand meanwhile
                    self.finished = await self._finish() | {"num_steps": num_steps}

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
            if not self.tracing:  # stopped before its start_step came
                answer = {"status": "stopped", "directory": str(self.running), "trace": None,
                          "summary": None}
                self.running, self._auto = None, None
                return web.json_response(answer)
            answer = await self._finish()
        return web.json_response(answer)

    async def _finish(self) -> dict:
        """Stop the running trace (the lock held) and describe it (SGLang's MEM: with a
        device memory profile)."""
        folder, self._auto = self.running, None
        try:  # writing the files takes seconds: off the event loop
            return await asyncio.to_thread(stop_trace, folder, self.memory)
        finally:
            self.running, self.tracing = None, False
