"""The ``qwenjax.v1.Inference`` servicer: requests → status codes, admission, streaming.

Everything here runs on the server's asyncio loop; the engine runs on its own
thread (``EngineThread``) and answers through per-request asyncio queues. The
loop is single-threaded, so admission counts and the request-id table need no lock.

A request leaves the engine in one of three ways, and each frees its pages:
it finishes; the client cancels or its deadline passes (grpc.aio cancels this
handler, which closes the engine stream, which sends ``abort`` to the engine
thread); or an ``Abort`` call names it. A done-callback on the RPC sends the
abort as well, so no path depends on generator finalisation alone.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import pathlib
import time
import uuid

import grpc
import jinja2

from qwenjax.tool_calls import tool_choice_constraint
from qwenjax_proto.v1 import inference_pb2 as pb
from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc
from server import convert
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

# Inputs longer than this (characters) are tokenized on a worker thread so a large prompt does
# not stall every other stream on the loop; smaller ones cost less than the thread hop.
_OFFLOAD_CHARS = 16_384


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


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, admission: Admission, metrics: ServerMetrics, max_request_bytes: int):
        self.admission = admission
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.engine_thread = None   # qwenjax.engine.async_engine.EngineThread, once the model is up
        self.draining = False
        self._active: dict[str, str] = {}  # client request_id → engine request id
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def engine(self):
        return self.engine_thread.engine if self.engine_thread is not None else None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def wait_idle(self, timeout: float) -> bool:
        """True once no Generate is in flight; False if ``timeout`` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # ---- shared checks -----------------------------------------------------------------------
    async def _reject(self, context, code: grpc.StatusCode, message: str, *, generate: bool = False):
        if generate:
            self.metrics.rejected.labels(code.name).inc()
        await context.abort(code, message)

    async def _require_engine(self, context, *, admitting: bool = True, generate: bool = False):
        if self.engine_thread is None:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE,
                               "the model is still loading; retry once health reports SERVING",
                               generate=generate)
        if admitting and self.draining:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE,
                               "the server is draining before shutdown; retry on another replica",
                               generate=generate)
        return self.engine_thread

    def _check_request(self, request, name: str) -> None:
        size = request.ByteSize()
        if size > self.max_request_bytes:
            raise ValueError(f"{name} is {size} bytes; the limit is {self.max_request_bytes} bytes "
                             "(--max-request-bytes)")
        unknown = convert.find_unknown_field(request, name)
        if unknown:
            raise ValueError(unknown)

    async def _encode(self, request, tools=None) -> list[int]:
        """Token ids of a request's ``input`` oneof (text, token_ids or messages), ``tools``
        offered through the chat template."""
        which = request.WhichOneof("input")
        if which is None:
            names = ", ".join(f.name for f in request.DESCRIPTOR.oneofs_by_name["input"].fields)
            raise ValueError(f"input is not set: send one of {names}")
        if tools and which != "messages":
            raise ValueError("tools need the messages input: the chat template offers them")
        if request.continue_final_message and which != "messages":
            raise ValueError("continue_final_message needs the messages input")
        if which == "token_ids":
            return list(request.token_ids.ids)
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError(f"{which}: this model has no tokenizer (random-weight preset); "
                             "send token_ids")
        if which == "text":
            encode, arg, size = tokenizer.encode, request.text, len(request.text)
        else:
            continuing = request.continue_final_message
            encode = functools.partial(tokenizer.encode_chat, tools=tools,
                                       add_generation_prompt=not continuing,
                                       continue_final_message=continuing)
            arg = convert.messages_to_dicts(request.messages)
            size = sum(len(m["content"]) for m in arg)
        try:
            if size > _OFFLOAD_CHARS:
                return await asyncio.to_thread(encode, arg)
            return encode(arg)
        except jinja2.TemplateError as error:  # the chat template's own raise_exception
            raise ValueError(f"messages: the chat template refused them: {error}") from None

    # ---- RPCs ----------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):
        engine_thread = await self._require_engine(context, generate=True)
        try:
            self._check_request(request, "GenerateRequest")
            fields = convert.sampling_fields(request.sampling)
            tools = convert.tools_to_dicts(request.tools) or None
            constraint = tool_choice_constraint(tools, request.tool_choice or None)
            if constraint is not None:
                if "structured_outputs" in fields:
                    raise ValueError(f"tool_choice {request.tool_choice!r} constrains the output "
                                     "itself; leave structured_outputs unset")
                fields["structured_outputs"] = constraint
            prompt_ids = await self._encode(request, tools)
            # Unset fields take the model's defaults; an unset max_tokens fits the prompt's room.
            params = engine_thread.engine.sampling_params(fields, len(prompt_ids))
            prompt_ids = engine_thread.engine.truncated(prompt_ids, params)
            engine_thread.engine.validate(prompt_ids, params, request.priority)
        except ValueError as error:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(error), generate=True)
        client_id = request.request_id
        if client_id and client_id in self._active:
            await self._reject(context, grpc.StatusCode.ALREADY_EXISTS,
                               f"request_id {client_id!r} names a request still running", generate=True)
        num_prompt = len(prompt_ids)
        queued_tokens = num_prompt * params.n  # n sequences each prefill the prompt
        refusal = self.admission.admit(queued_tokens)
        if refusal is not None:
            await self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal, generate=True)

        # Engine ids are never reused: an abort's final output for an old request must not reach
        # a newer request that a client gave the same request_id.
        engine_id = uuid.uuid4().hex
        if client_id:
            self._active[client_id] = engine_id
        self._in_flight += 1
        self._idle.clear()
        self.metrics.prompt_tokens.inc(num_prompt)
        start = time.monotonic()
        state = {"queued": True, "final": None, "first": None}
        context.add_done_callback(
            lambda _: state["final"] is None and engine_thread.abort(engine_id))
        failure = None
        try:
            stream = engine_thread.generate(prompt_ids, params, engine_id, request.priority)
            # aclosing: if this handler is cancelled while suspended at its own yield, the engine
            # stream is closed (and the request aborted) now, not whenever it is garbage-collected.
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    if state["queued"]:
                        state["queued"] = False
                        self.admission.release(queued_tokens)
                    if output.delta_token_ids:
                        if state["first"] is None:
                            state["first"] = time.monotonic()
                            self.metrics.ttft.observe(state["first"] - start)
                        self.metrics.generation_tokens.inc(len(output.delta_token_ids))
                    if output.finish_reason == "error":  # any sequence: the call fails
                        state["final"] = output
                        failure = (grpc.StatusCode.INTERNAL, f"the engine step running this request "
                                   f"failed ({output.error}); the server is still serving, retry")
                        break
                    chunk = convert.chunk_response(output)
                    if chunk is not None:
                        yield chunk
                    if output.finish_reason is not None:  # one Complete per sequence
                        ttft = state["first"] - start if state["first"] is not None else None
                        yield convert.complete_response(
                            output, ttft, time.monotonic() - start,
                            tools if request.tool_choice != "none" else None)
                    if output.finished:
                        state["final"] = output
        except ValueError as error:  # the engine thread refused to add it
            failure = (grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Exception as error:  # noqa: BLE001 - the engine loop itself broke
            log.exception("request %s failed", engine_id)
            failure = (grpc.StatusCode.INTERNAL, f"engine failure: {type(error).__name__}: {error}")
        finally:
            if state["queued"]:
                self.admission.release(queued_tokens)
            final = state["final"]
            reason = final.finish_reason if final is not None else ("error" if failure else "abort")
            self.metrics.requests.labels(reason).inc()
            self.metrics.e2e.observe(time.monotonic() - start)
            if client_id and self._active.get(client_id) == engine_id:
                del self._active[client_id]
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        if failure is not None:
            await context.abort(*failure)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        engine_thread = await self._require_engine(context, admitting=False)
        engine_id = self._active.get(request.request_id) if request.request_id else None
        if engine_id is not None:
            engine_thread.abort(engine_id)
        return pb.AbortResponse(found=engine_id is not None)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        await self._require_engine(context)
        try:
            self._check_request(request, "TokenizeRequest")
            ids = await self._encode(request, convert.tools_to_dicts(request.tools) or None)
        except ValueError as error:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.TokenizeResponse(ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        await self._require_engine(context)
        engine = self.engine
        try:
            self._check_request(request, "DetokenizeRequest")
            if engine.tokenizer is None:
                raise ValueError("this model has no tokenizer (random-weight preset)")
            convert.check_token_ids(request.ids, engine.lm.config.vocab_size, "ids")
        except ValueError as error:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        text = engine.tokenizer.decode(list(request.ids), skip_special_tokens=request.skip_special_tokens)
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        await self._require_engine(context)
        return model_info(self.engine)


def model_name(source: str) -> str:
    path = pathlib.Path(source)
    return path.name if path.is_dir() else source


def model_info(engine) -> pb.ModelInfo:
    lm, c, sc = engine.lm, engine.lm.config, engine.scheduler_config
    return pb.ModelInfo(
        model=model_name(lm.source), vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim, mesh_shape={str(k): int(v) for k, v in lm.mesh.shape.items()},
        dtype=str(lm.dtype), max_context=engine.max_model_len, page_size=sc.page_size,
        kv_capacity_tokens=engine.allocator.num_pages * sc.page_size, max_num_seqs=sc.max_num_seqs,
        sampling_defaults={k: float(v) for k, v in engine.sampling_defaults.items()})
