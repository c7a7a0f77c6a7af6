"""What the front ends of one server share: admission, request ids, the in-flight count,
draining and metrics, and the one path from a tokenized request to engine outputs.

The gRPC servicer (``server.servicer``) and the OpenAI-compatible HTTP API
(``server.openai_api``) both run requests through a ``Gateway``, so ``--max-queue``,
``--max-queued-tokens``, the drain on SIGTERM and the metrics count all of a server's
requests together, whichever protocol brought them.

Everything here runs on the server's asyncio loop; the loop is single-threaded, so the
counts and the request-id table need no lock. A refusal is a ``Refused`` carrying a gRPC
status code; the HTTP API maps the code onto an HTTP status.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from typing import Any, AsyncIterator, Mapping, Sequence

import grpc
import jinja2

from qwenjax.engine.request import RequestOutput
from qwenjax.sampling import SamplingParams
from server.metrics import ServerMetrics

log = logging.getLogger("qwenjax.requests")

# Inputs longer than this (characters) are tokenized on a worker thread so a large prompt does
# not stall every other stream on the loop; smaller ones cost less than the thread hop.
_OFFLOAD_CHARS = 16_384


class Refused(Exception):
    """A request the server will not run (or could not finish): a status and why."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Admission:
    """Requests this server admitted that have not streamed a token yet, and their prompt tokens.

    Counted on the loop rather than read from ``scheduler.waiting``: a burst of calls is
    admitted before the engine thread has moved any of them from its command queue into
    the scheduler, so the scheduler's count would let the whole burst through. Counting
    until the first token also covers requests in prefill, the work that a new request
    waits behind before its own first token. A limit of 0 turns that check off.
    """

    def __init__(self, max_queue: int, max_queued_tokens: int):
        self.max_queue = max_queue
        self.max_queued_tokens = max_queued_tokens
        self.queued = 0
        self.queued_tokens = 0

    def admit(self, num_tokens: int) -> str | None:
        """Count the request in and return None, or return why it is refused."""
        if self.max_queue and self.queued >= self.max_queue:
            return (f"{self.queued} requests are waiting for their first token; the limit is "
                    f"{self.max_queue} (--max-queue); retry with backoff")
        if self.max_queued_tokens and self.queued_tokens >= self.max_queued_tokens:
            return (f"{self.queued_tokens} prompt tokens are waiting; the limit is "
                    f"{self.max_queued_tokens} (--max-queued-tokens); retry with backoff")
        self.queued += 1
        self.queued_tokens += num_tokens
        return None

    def release(self, num_tokens: int) -> None:
        self.queued -= 1
        self.queued_tokens -= num_tokens


class Call:
    """One admitted request: iterate ``outputs()`` for its engine outputs. ``ttft_s`` and
    ``elapsed_s`` time it from admission (what the Complete message and metrics report)."""

    def __init__(self, gateway: Gateway, prompt_ids: list[int], params: SamplingParams,
                 priority: int, client_id: str, lora: str | None = None, counted: bool = True):
        """``counted``: False for the server's own probes (/health_generate), kept out of the
        served metrics as SGLang keeps its health checks out."""
        self.gateway = gateway
        self.metrics = gateway.metrics if counted else gateway.uncounted
        self.prompt_ids = prompt_ids
        self.params = params
        self.priority = priority
        self.client_id = client_id
        self.lora = lora
        # Engine ids are never reused: an abort's final output for an old request must not reach
        # a newer request that a client gave the same request_id.
        self.engine_id = uuid.uuid4().hex
        self.start = time.monotonic()
        self.first: float | None = None
        self.finished = False

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def abort(self) -> None:
        """Stop the request if it is still running (a client went away)."""
        if not self.finished:
            self.gateway.engine_thread.abort(self.engine_id)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The request's outputs; raises Refused if admission refuses it or the engine fails it.
        Closing this early aborts the request and frees its pages."""
        gateway, engine_thread, metrics = self.gateway, self.gateway.engine_thread, self.metrics
        if self.client_id and self.client_id in gateway._active:
            raise gateway.refuse(grpc.StatusCode.ALREADY_EXISTS,
                                 f"request_id {self.client_id!r} names a request still running")
        num_prompt = len(self.prompt_ids)
        queued_tokens = num_prompt * self.params.n  # n sequences each prefill the prompt
        # (self.params: SamplingParams, or PoolingParams for an embedding.)
        refusal = gateway.admission.admit(queued_tokens)
        if refusal is not None:
            raise gateway.refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        if self.client_id:
            gateway._active[self.client_id] = self.engine_id
        gateway._running.add(self.engine_id)
        gateway._enter()
        metrics.prompt_tokens.inc(num_prompt)
        self.start = time.monotonic()
        if gateway.log_requests is not None:
            shown = self.prompt_ids[: gateway.log_requests]
            log.info("request %s%s: %d prompt tokens %s%s, lora=%s, priority=%d, %s", self.engine_id,
                     f" ({self.client_id})" if self.client_id else "", num_prompt, shown,
                     "…" if len(shown) < num_prompt else "", self.lora, self.priority, self.params)
        queued, reason, generated = True, None, 0
        last: dict[int, float] = {}  # sequence index → when its latest tokens came
        try:
            stream = engine_thread.generate(self.prompt_ids, self.params, self.engine_id, self.priority,
                                            self.lora)
            # aclosing: if the caller stops iterating (a cancelled handler), the engine stream is
            # closed (and the request aborted) now, not whenever it is garbage-collected.
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    if queued:
                        queued = False
                        gateway.admission.release(queued_tokens)
                    if output.delta_token_ids:
                        now = time.monotonic()
                        if self.first is None:
                            self.first = now
                            metrics.ttft.observe(self.first - self.start)
                        if output.index in last:  # the gap per token since its previous ones
                            metrics.itl.observe((now - last[output.index]) / len(output.delta_token_ids))
                        last[output.index] = now
                        metrics.generation_tokens.inc(len(output.delta_token_ids))
                        generated += len(output.delta_token_ids)
                    if output.finish_reason is not None and output.metrics is not None:
                        metrics.observe_finished(output.metrics, len(output.token_ids))
                    if output.finished:
                        self.finished = True
                        reason = output.finish_reason
                    if output.finish_reason == "error":  # any sequence: the call fails
                        self.finished, reason = True, "error"
                        raise Refused(grpc.StatusCode.INTERNAL, f"the engine step running this "
                                      f"request failed ({output.error}); the server is still "
                                      "serving, retry")
                    yield output
        except ValueError as error:  # the engine thread refused to add it
            reason = "error"
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        except (Refused, GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001 - the engine loop itself broke
            reason = "error"
            raise Refused(grpc.StatusCode.INTERNAL,
                          f"engine failure: {type(error).__name__}: {error}") from error
        finally:
            if queued:
                gateway.admission.release(queued_tokens)
            if gateway.log_requests is not None:
                ttft = "-" if self.first is None else f"{1000 * (self.first - self.start):.0f} ms"
                log.info("request %s finished: %s, ttft %s, e2e %.0f ms", self.engine_id,
                         reason or "abort", ttft, 1000 * (time.monotonic() - self.start))
            metrics.requests.labels(reason or "abort").inc()
            metrics.e2e.observe(time.monotonic() - self.start)
            metrics.request_prompt_tokens.observe(num_prompt)
            metrics.request_generation_tokens.observe(generated)
            if self.client_id and gateway._active.get(self.client_id) == self.engine_id:
                del gateway._active[self.client_id]
            gateway._running.discard(self.engine_id)
            gateway._leave()


class BeamCall:
    """A ``use_beam_search`` request: ``params.n`` beams found by beam search
    (qwenjax/beam_search.py), each step's beams run as one-token Calls (admitted and counted as
    any request). The same ``outputs()`` as a Call: the beams, best first, once the search ends."""

    def __init__(self, gateway: Gateway, prompt_ids: list[int], params: SamplingParams,
                 priority: int, lora: str | None, length_penalty: float):
        self.gateway, self.prompt_ids, self.params = gateway, prompt_ids, params
        self.priority, self.lora, self.length_penalty = priority, lora, length_penalty
        self.engine_id = uuid.uuid4().hex

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        from qwenjax.beam_search import BeamSearch, BeamSearchParams, run_concurrently

        gateway, params = self.gateway, self.params
        search = BeamSearch([self.prompt_ids], BeamSearchParams(
            params.n, params.max_tokens, params.ignore_eos, length_penalty=self.length_penalty),
            gateway.engine.eos_token_ids)
        step = search.step_params()

        async def top(ids):
            last = None
            call = gateway.call(ids, step, self.priority, lora=self.lora)
            async with contextlib.aclosing(call.outputs()) as outputs:
                async for last in outputs:
                    pass
            return last.logprobs[0].top

        await run_concurrently(search, top)
        beams = search.decoded(gateway.engine.tokenizer)[0].sequences
        for rank, beam in enumerate(beams):
            text = beam.text or ""
            yield RequestOutput(self.engine_id, self.prompt_ids, text, beam.token_ids, text,
                                beam.token_ids, finished=rank == len(beams) - 1,
                                finish_reason=beam.finish_reason, index=rank)


class Gateway:
    def __init__(self, admission: Admission, metrics: ServerMetrics, log_requests: int | None = None):
        self.admission = admission
        self.metrics = metrics
        self.uncounted = ServerMetrics(lambda: [])  # a registry nobody scrapes, for probes
        # vLLM's --enable-log-requests: each admitted request logged (its first this-many prompt
        # token ids, --max-log-len) and its end; None: off.
        self.log_requests = log_requests
        # qwenjax.engine.async_engine.EngineThread (or replicas.EngineReplicas, the same
        # interface over several), once the model is up.
        self.engine_thread = None
        self.draining = False
        self._active: dict[str, str] = {}  # client request_id → engine request id
        self._running: set[str] = set()    # engine ids of the requests admitted here, running
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def engine(self):
        return self.engine_thread.engine if self.engine_thread is not None else None

    @property
    def engines(self) -> list:
        """Every engine served (data-parallel replicas: several); empty while loading."""
        return self.engine_thread.engines if self.engine_thread is not None else []

    @property
    def in_flight(self) -> int:
        """Admitted requests not yet answered, over every front end."""
        return self._in_flight

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if ``timeout`` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def refuse(self, code: grpc.StatusCode, message: str, *, generate: bool = True) -> Refused:
        """A Refused to raise; a refused generation request is counted by its code."""
        if generate:
            self.metrics.rejected.labels(code.name).inc()
        return Refused(code, message)

    def require_engine(self, *, admitting: bool = True, generate: bool = False):
        """The EngineThread; raises Refused(UNAVAILABLE) while loading or draining."""
        if self.engine_thread is None:
            raise self.refuse(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry "
                              "once health reports SERVING", generate=generate)
        if admitting and self.draining:
            raise self.refuse(grpc.StatusCode.UNAVAILABLE, "the server is draining before "
                              "shutdown; retry on another replica", generate=generate)
        if generate and self.sleeping:
            raise self.refuse(grpc.StatusCode.UNAVAILABLE, "the engine is asleep (sleep mode); "
                              "retry once it is woken up", generate=generate)
        return self.engine_thread

    async def encode(self, *, text: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
                     tools: Sequence[Mapping[str, Any]] | None = None,
                     add_generation_prompt: bool = True, continue_final_message: bool = False,
                     template_kwargs: Mapping[str, Any] | None = None,
                     chat_template: str | None = None) -> list[int]:
        """Token ids of ``text``, or of ``messages`` rendered by the chat template (or
        ``chat_template``, a request's own) with ``tools`` offered. Raises ValueError naming the
        problem."""
        tokenizer = self.engine.tokenizer
        which = "text" if text is not None else "messages"
        if tokenizer is None:
            raise ValueError(f"{which}: this model has no tokenizer (random-weight preset); "
                             "send token ids")
        if text is not None:
            encode, arg, size = tokenizer.encode, text, len(text)
        else:
            encode = functools.partial(tokenizer.encode_chat, tools=tools,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message,
                                       template_kwargs=template_kwargs, chat_template=chat_template)
            arg = messages
            size = sum(len(m.get("content") or "") for m in messages if isinstance(m, Mapping))
        try:
            # A request's own template may loop for long: never on the loop serving everyone.
            if size > _OFFLOAD_CHARS or chat_template is not None:
                return await asyncio.to_thread(encode, arg)
            return encode(arg)
        except jinja2.TemplateError as error:  # the chat template's own raise_exception
            raise ValueError(f"messages: the chat template refused them: {error}") from None
        except Exception as error:  # noqa: BLE001 - a request's template: its error, a 400
            if chat_template is None or isinstance(error, ValueError):
                raise
            raise ValueError(f"chat_template failed to render: {type(error).__name__}: "
                             f"{error}") from None

    def prepare(self, fields: Mapping[str, Any], prompt_ids: Sequence[int],
                priority: int = 0) -> tuple[list[int], SamplingParams]:
        """(prompt as it runs, SamplingParams): unset fields take the model's defaults, an unset
        max_tokens fits the prompt's room, truncate_prompt_tokens applied. Raises ValueError."""
        engine = self.engine
        params = engine.sampling_params(fields, len(prompt_ids))
        prompt_ids = list(engine.truncated(prompt_ids, params))
        engine.validate(prompt_ids, params, priority)
        return prompt_ids, params

    def call(self, prompt_ids: Sequence[int], params: SamplingParams, priority: int = 0,
             client_id: str = "", lora: str | None = None, *, counted: bool = True) -> Call:
        """``lora``: a LoRA adapter the model was loaded with (checked here: refused before
        admission). ``counted``: False for a probe of the server's own (out of the metrics)."""
        try:
            self.engine.lora_slot(lora)
        except ValueError as error:
            raise self.refuse(grpc.StatusCode.NOT_FOUND, str(error)) from None
        return Call(self, list(prompt_ids), params, priority, client_id, lora, counted)

    async def add_lora(self, name: Any, path: Any, served_names: Sequence[str]) -> None:
        """Load a PEFT adapter while serving (``--allow-runtime-lora-updating``); refusals
        carry the status: a bad or taken name INVALID_ARGUMENT, a missing directory NOT_FOUND."""
        thread = self.require_engine(admitting=False)
        for field, value in (("lora_name", name), ("lora_path", path)):
            if not isinstance(value, str) or not value:
                raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{field} must be a non-empty string, got {value!r}")
        if name in served_names:
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT,
                              f"lora_name {name!r} is the served model's name; name the adapter otherwise")
        if any(name in e.lora_names for e in self.engines):  # before reading anything
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT,
                              f"lora {name!r} is already loaded; unload it first")
        try:
            await thread.add_lora(name, path)
        except FileNotFoundError as error:
            raise self.refuse(grpc.StatusCode.NOT_FOUND, str(error)) from None
        except ValueError as error:
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    @property
    def sleeping(self) -> bool:
        return any(e.sleeping for e in self.engines)

    async def sleep(self, level: Any) -> None:
        """Sleep mode (``--enable-sleep-mode``): FAILED_PRECONDITION while requests run."""
        thread = self.require_engine(admitting=False)
        if level not in (1, 2):
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT, f"level must be 1 or 2, got {level!r}")
        try:
            await thread.sleep(level)
        except ValueError as error:
            raise self.refuse(grpc.StatusCode.FAILED_PRECONDITION, str(error)) from None

    async def wake_up(self) -> None:
        thread = self.require_engine(admitting=False)
        try:
            await thread.wake_up()
        except ValueError as error:
            raise self.refuse(grpc.StatusCode.FAILED_PRECONDITION, str(error)) from None

    @property
    def paused(self) -> bool:
        return bool(self.engines) and all(e.paused for e in self.engines)

    async def pause(self, mode: Any = "abort", clear_cache: Any = True) -> None:
        """Generation paused until ``resume`` (``Engine.pause``; requests sent meanwhile are
        admitted and wait): INVALID_ARGUMENT for a bad mode, FAILED_PRECONDITION for a waiting
        pause that a resume overtook."""
        from qwenjax.engine.live_state import check_pause

        thread = self.require_engine(admitting=False)
        try:
            check_pause(mode, clear_cache)
        except ValueError as error:
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error), generate=False) from None
        try:
            await thread.pause(mode, clear_cache)
        except ValueError as error:
            raise self.refuse(grpc.StatusCode.FAILED_PRECONDITION, str(error), generate=False) from None

    async def resume(self) -> None:
        await self.require_engine(admitting=False).resume()

    async def update_weights(self, path: Any) -> None:
        """Serve a checkpoint's weights from now on (``--allow-weight-updates``): NOT_FOUND for
        a path that is no checkpoint, INVALID_ARGUMENT for one of another architecture."""
        thread = self.require_engine(admitting=False)
        if not isinstance(path, str) or not path:
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT,
                              f"model_path must be a non-empty string, got {path!r}")
        try:
            await thread.update_weights(path)
        except FileNotFoundError as error:
            raise self.refuse(grpc.StatusCode.NOT_FOUND, str(error)) from None
        except ValueError as error:
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    async def remove_lora(self, name: Any) -> None:
        """Unload an adapter: NOT_FOUND when it is not loaded, FAILED_PRECONDITION while
        requests still use it."""
        thread = self.require_engine(admitting=False)
        if not isinstance(name, str) or all(name not in e.lora_names for e in self.engines):
            raise self.refuse(grpc.StatusCode.NOT_FOUND, f"lora {name!r} is not loaded; adapters: "
                              + (", ".join(repr(n) for n in self.engine.lora_names) or "none"))
        try:
            await thread.remove_lora(name)
        except ValueError as error:
            raise self.refuse(grpc.StatusCode.FAILED_PRECONDITION, str(error)) from None

    def beam_call(self, prompt_ids: Sequence[int], params: SamplingParams, priority: int = 0,
                  lora: str | None = None, length_penalty: float = 1.0) -> BeamCall:
        """A ``use_beam_search`` request (``params.n`` beams of ``params.max_tokens``)."""
        try:
            self.engine.lora_slot(lora)
        except ValueError as error:
            raise self.refuse(grpc.StatusCode.NOT_FOUND, str(error)) from None
        return BeamCall(self, list(prompt_ids), params, priority, lora, length_penalty)

    def abort_all(self) -> int:
        """Stop every request admitted through this gateway (SGLang's ``abort_all``); returns
        how many were running."""
        thread = self.require_engine(admitting=False)
        running = list(self._running)
        for engine_id in running:
            thread.abort(engine_id)
        return len(running)

    def active(self, client_id: str) -> str | None:
        """The engine id of the running request a client named ``client_id``."""
        return self._active.get(client_id)


async def merged(calls: Sequence[Call]) -> AsyncIterator[tuple[int, Any]]:
    """(call index, output) of several calls as they come; the first failure ends all of them
    (leaving early cancels the rest, which aborts them)."""
    if len(calls) == 1:
        async with contextlib.aclosing(calls[0].outputs()) as outputs:
            async for output in outputs:
                yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, call: Call) -> None:
        try:
            async with contextlib.aclosing(call.outputs()) as outputs:
                async for output in outputs:
                    queue.put_nowait((i, output, None))
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, error))
        else:
            queue.put_nowait((i, None, None))

    tasks = [asyncio.create_task(pump(i, call)) for i, call in enumerate(calls)]
    try:
        running = len(tasks)
        while running:
            i, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                running -= 1
                continue
            yield i, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
