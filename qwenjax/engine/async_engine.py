"""The engine on a thread of its own, feeding per-request asyncio queues.

The engine is single-threaded; callers on any event loop (AsyncLLM, the gRPC
server) talk to it through a command queue, and it answers on the loop of the
caller that added the request: once per step and loop, with all of that step's
outputs for the loop's requests (one wake-up, not one per request).

A consumer that falls behind (a loop busy encoding other streams) finds several
outputs of its request waiting; it takes them as one (``RequestOutput.followed_by``),
so a server under load sends fewer, larger chunks instead of falling further behind.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import sys
import threading
import time
import traceback
from typing import AsyncIterator, Sequence

from qwenjax.engine.engine import Engine
from qwenjax.engine.request import RequestOutput
from qwenjax.sampling import SamplingParams

log = logging.getLogger(__name__)


def _deliver(deliveries) -> None:
    """On a subscriber loop: put each item into its request's queue."""
    for queue, item in deliveries:
        queue.put_nowait(item)


def _settle(future: asyncio.Future, result, error) -> None:
    if not future.done():  # the caller may have been cancelled
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _coalesced(items: list) -> list:
    """Consecutive outputs of the same sequence merged into one (an exception ends the list)."""
    merged: list = []
    for item in items:
        last = merged[-1] if merged else None
        if (isinstance(item, RequestOutput) and isinstance(last, RequestOutput)
                and last.index == item.index and last.finish_reason is None):
            merged[-1] = last.followed_by(item)
        else:
            merged.append(item)
    return merged


@dataclasses.dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineThread:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._subscribers: dict[str, _Subscriber] = {}
        self._stop = threading.Event()
        self._step_started: float | None = None  # monotonic time the running step began
        self._pause_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._thread = threading.Thread(target=self._run, name="qwenjax-engine", daemon=True)
        self._thread.start()

    @property
    def engines(self) -> list[Engine]:
        """The engines this serves (one; ``replicas.EngineReplicas`` has several)."""
        return [self.engine]

    @property
    def step_seconds(self) -> float:
        """How long the step now running has been running (0 between steps): a hung device or
        collective shows here, since nothing fails (server.app's watchdog reads it)."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    def stack(self) -> str:
        """Where the engine thread is now (for the log of a step that runs too long)."""
        frame = sys._current_frames().get(self._thread.ident)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(not running)"

    # ---- called from any thread ------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str, priority: int = 0,
                       lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them; leaving early aborts it."""
        self.engine.validate(prompt_ids, params, priority)  # raise here, before anything is queued
        self.engine.lora_slot(lora)
        subscriber = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", request_id, list(prompt_ids), params, subscriber, priority, lora))
        finished = False
        queue = subscriber.queue
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for item in _coalesced(items):
                    if isinstance(item, BaseException):
                        finished = True  # refused or failed: nothing of ours is left to abort
                        raise item
                    yield item
                    if item.finished:
                        finished = True
                        return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def call(self, fn, *args):
        """``fn(engine, *args)`` run on the engine thread between two steps (what changes the
        engine's state outside a request: LoRA slots); its result, or its exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("call", fn, args, loop, future))
        return await future

    async def add_lora(self, name: str, path) -> None:
        """Load a PEFT adapter into a free LoRA slot: read on a worker thread, written into the
        resident stacks between steps. Raises ValueError/FileNotFoundError naming the problem."""
        from qwenjax.lora import read_adapter

        adapter = await asyncio.to_thread(read_adapter, name, path)
        await self.call(Engine.add_lora, adapter)

    async def remove_lora(self, name: str) -> None:
        await self.call(Engine.remove_lora, name)

    async def sleep(self, level: int = 1) -> None:
        await self.call(Engine.sleep, level)

    async def wake_up(self) -> None:
        await self.call(Engine.wake_up)

    async def reset_prefix_cache(self) -> bool:
        return await self.call(Engine.reset_prefix_cache)

    @property
    def paused(self) -> bool:
        return self.engine.paused

    async def pause(self, mode: str = "abort", clear_cache: bool = True) -> None:
        """``Engine.pause`` between two steps; with mode "wait", returns once the requests it
        waits for have finished and the engine is paused (ValueError if ``resume`` came first)."""
        await self.call(Engine.pause, mode, clear_cache)
        if mode == "wait":
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._commands.put(("paused?", loop, future))
            await future

    async def resume(self) -> None:
        await self.call(Engine.resume)

    async def update_weights(self, path) -> None:
        """Load a checkpoint's weights on a worker thread while steps go on, then swap them in
        between two steps (``Engine.load_weights``, ``Engine.set_weights``)."""
        weights = await asyncio.to_thread(self.engine.load_weights, path)
        await self.call(Engine.set_weights, weights)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------------
    def _publish(self, request_id: str, item) -> None:
        self._publish_all([(request_id, item)])

    def _publish_all(self, items) -> None:
        """Hand (request id, output or exception) pairs to their subscribers: one call into each
        subscriber loop, however many of its requests the step advanced."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            subscriber = self._subscribers.get(request_id)
            if subscriber is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                del self._subscribers[request_id]
            by_loop.setdefault(subscriber.loop, []).append((subscriber.queue, item))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # the caller's loop has closed; nobody is listening
                pass

    def _handle(self, command) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params, subscriber, priority, lora = command
            if request_id in self._subscribers:
                # Never replace a live subscriber: its client would wait forever.
                error = ValueError(f"request_id {request_id!r} is already in use")
                subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, error)
                return
            self._subscribers[request_id] = subscriber
            try:
                self.engine.add_request(prompt_ids, params, request_id=request_id, priority=priority,
                                        lora=lora)
            except Exception as error:  # e.g. a duplicate id: only this request fails
                self._publish(request_id, error)
        elif kind == "abort":
            self.engine.abort(command[1])
        elif kind == "paused?":
            self._pause_waiters.append(command[1:])
        elif kind == "call":
            _, fn, args, loop, future = command
            try:
                result, error = fn(self.engine, *args), None
            except Exception as exc:
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the caller's loop has closed
                pass

    def _answer_pause_waiters(self) -> None:
        """Settle the ``pause("wait")`` calls whose pause took effect, or was resumed away."""
        if not self._pause_waiters or self.engine.pausing:
            return
        error = None if self.engine.paused else ValueError(
            "resumed before the requests the pause waited for had finished")
        waiters, self._pause_waiters = self._pause_waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_settle, future, None, error)
            except RuntimeError:  # the caller's loop has closed
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.wants_step()
            try:
                command = self._commands.get(block=block, timeout=0.5 if block else None)
                while True:
                    self._handle(command)
                    command = self._commands.get_nowait()
            except queue.Empty:
                pass
            self._answer_pause_waiters()
            if not self.engine.wants_step():
                continue
            self._step_started = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as error:  # the engine itself is broken: fail everyone listening
                log.exception("engine step crashed")
                self._publish_all([(request_id, error) for request_id in list(self._subscribers)])
                continue
            finally:
                self._step_started = None
            self._publish_all([(output.request_id, output) for output in outputs])
            self._answer_pause_waiters()
