"""The OpenAI-compatible HTTP API, the one vLLM and SGLang serve, beside the gRPC server.

    GET  /v1/models, /v1/models/{model}
    POST /v1/completions        prompt: text, token ids, or a list of either; stream: SSE
    POST /v1/chat/completions   messages, tools/tool_choice, response_format; stream: SSE
    POST /v1/responses          OpenAI's Responses API (server/responses_protocol.py)
    POST /v1/messages           Anthropic's Messages API (server/anthropic_protocol.py)
    GET  /v1/responses/{id}     a stored response
    POST /classify, /pooling    vLLM's, on classification and reward checkpoints
    POST /score, /rerank        vLLM's (and /v1/…, /v2/rerank): embedding cosine similarities
    POST /tokenize, /detokenize vLLM's
    GET  /health                200 while serving; 503 while loading, draining or stalled
    GET  /version, /metrics     the version; the server's Prometheus registry
    GET  /load                  vLLM's: {"server_load": requests being handled}
    POST /invocations           SageMaker's route (vLLM's): chat, completion, embedding,
                                rerank or score, told apart by the body's fields
    POST /generate, …           SGLang's native API (server/sglang_api.py)

It runs on the gRPC server's asyncio loop and sends every request through the same
``Gateway``: one admission limit, one drain, one set of metrics for both protocols.
Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status of the refusal (400 bad field, 404 unknown model, 401 token, 413 too large, 429
queue full, 503 loading or draining, 500 a failed step). A client that disconnects
aborts its requests: the handler is cancelled, which closes the engine stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import ssl
from typing import Any, AsyncIterator, Callable, Sequence

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import qwenjax
from qwenjax.pooling import cosine
from qwenjax.sampling import is_int
from qwenjax.tool_calls import model_chose_to_call
from server import anthropic_protocol as aproto, convert, openai_protocol as proto
from server import responses_protocol as rproto
from server.auth import bearer_token, expected_tokens, token_matches
from server.gateway import Gateway, Refused, merged

log = logging.getLogger(__name__)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_ERROR_TYPE = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               409: "ConflictError", 413: "RequestTooLargeError", 429: "RateLimitError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}
_OPEN_PATHS = ("/health", "/ping", "/version", "/metrics")
ANTHROPIC_PATH = "/v1/messages"  # no token: probes and scrapers send none


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPE.get(status, "Error"), "param": None,
                      "code": status}}


def _error(status: int, message: str, path: str = "") -> web.Response:
    """An error response in the shape of the API asked (Anthropic's under /v1/messages)."""
    body = aproto.error_body if path.startswith(ANTHROPIC_PATH) else error_body
    return web.json_response(body(status, message), status=status)


def _sse(data: Any, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


class OpenAIServer:
    """The HTTP API over a Gateway. ``serving()``: whether health says SERVING."""

    def __init__(self, gateway: Gateway, registry, serving: Callable[[], bool], *,
                 api_token: str | Sequence[str] | None = None, max_request_bytes: int = 4 << 20,
                 served_model_names: Sequence[str] = (), allow_runtime_lora_updating: bool = False,
                 reasoning_parser: str | None = None, allow_weight_updates: bool = False,
                 enable_sleep_mode: bool = False, cors=None, profiler_dir: str | None = None,
                 trust_request_chat_template: bool = False):
        self.gateway = gateway
        # vLLM's --trust-request-chat-template: a request may bring its own chat_template (it
        # runs in Jinja's sandbox either way; off by default, as vLLM's).
        self.trust_request_chat_template = trust_request_chat_template
        self.reasoning_parser = reasoning_parser  # qwenjax.reasoning: chat replies split
        self.registry = registry
        self.serving = serving
        self._tokens = expected_tokens(api_token) if api_token else None
        self.max_request_bytes = max_request_bytes
        self.served_model_names = tuple(served_model_names)
        self.created = proto.now()
        self._runner: web.AppRunner | None = None
        self.app = app = web.Application(client_max_size=max_request_bytes,
                                         middlewares=[self._errors_and_auth])
        app.router.add_get("/v1/models", self.models)
        # OpenAI's models.retrieve; a served name may hold "/" (Qwen/Qwen2.5-7B-Instruct).
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/invocations", self.invocations)  # SageMaker's one route (vLLM's)
        app.router.add_get("/load", self.load)  # vLLM's server load
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post(ANTHROPIC_PATH, self.messages)
        app.router.add_post(ANTHROPIC_PATH + "/count_tokens", self.count_message_tokens)
        app.router.add_get("/v1/responses/{response_id}", self.get_response)
        app.router.add_post("/v1/responses/{response_id}/cancel", self.cancel_response)
        self.responses_store = rproto.ResponseStore()
        # Background responses still running: id → (its task, its ResponseBuilder).
        self._background: dict[str, tuple[asyncio.Task, rproto.ResponseBuilder]] = {}
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/classify", self.classify)
        app.router.add_post("/pooling", self.pooling)
        for path in ("/score", "/v1/score"):
            app.router.add_post(path, self.score)
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            app.router.add_post(path, self.rerank)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)  # vLLM's (SageMaker's probe), GET and POST
        app.router.add_post("/ping", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        if allow_runtime_lora_updating:  # vLLM's routes, behind its VLLM_ALLOW_RUNTIME_LORA_UPDATING
            app.router.add_post("/v1/load_lora_adapter", self.load_lora_adapter)
            app.router.add_post("/v1/unload_lora_adapter", self.unload_lora_adapter)
        if allow_weight_updates:  # SGLang's route; vLLM's pause routes (its dev mode's)
            app.router.add_post("/update_weights_from_disk", self.update_weights_from_disk)
            app.router.add_post("/pause", self.pause)
            app.router.add_post("/resume", self.resume)
            app.router.add_get("/is_paused", self.is_paused)
        if enable_sleep_mode:  # vLLM's routes
            app.router.add_post("/sleep", self.sleep)
            app.router.add_post("/wake_up", self.wake_up)
            app.router.add_get("/is_sleeping", self.is_sleeping)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        from server.sglang_api import SGLangAPI

        self.sglang = SGLangAPI(self)
        # /generate, /encode, … (SGLang's native API)
        self.sglang.register(app.router, enable_sleep_mode, allow_weight_updates)
        if profiler_dir:  # vLLM's and SGLang's /start_profile, /stop_profile (server/profiling.py)
            from server.profiling import Profiler

            Profiler(profiler_dir, self).register(app.router)
        if cors is not None:  # a server/cors.CORS: browsers' preflights answered before auth
            cors.install(app)

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    ssl_context: ssl.SSLContext | None = None, *, path: str | None = None) -> int | None:
        """Listen on ``host:port`` (0: any free port) and return the bound port; or, with
        ``path``, on that Unix socket only (run-batch's private channel) and return None."""
        # handler_cancellation: a client that disconnects cancels its handler, which aborts
        # the engine request instead of generating for nobody.
        self._runner = runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                              handler_cancellation=True)
        await runner.setup()
        if path is not None:
            await web.UnixSite(runner, path).start()
            return None
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=False)
        await site.start()
        return runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- plumbing -------------------------------------------------------------------------
    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler):
        if self._tokens is not None and not request.path.startswith(_OPEN_PATHS):
            # (Anthropic's clients send the key as x-api-key.)
            api_key = request.headers.get("x-api-key")
            presented = bearer_token(request.headers.get("Authorization")) or \
                (api_key.encode() if api_key else None)
            if presented is None:
                return _error(401, "missing 'Authorization: Bearer <token>' header",
                              request.path)
            if not token_matches(presented, self._tokens):
                return _error(401, "wrong bearer token", request.path)
        try:
            return await handler(request)
        except Refused as refused:
            return _error(_HTTP_STATUS.get(refused.code, 500), refused.message, request.path)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the request body is over {self.max_request_bytes} bytes "
                               "(--max-request-bytes)", request.path)
        except web.HTTPException as http:  # 404/405 of the router, in OpenAI's error shape
            if http.status < 400:
                raise
            return _error(http.status, f"{request.method} {request.path}: {http.reason}", request.path)

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the request body is not JSON: {error}") from None

    def _names(self) -> tuple[str, ...]:
        from server.servicer import model_name

        return self.served_model_names or (model_name(self.gateway.engine.lm.source),)

    def _check_model(self, model: str | None) -> str:
        """The name responses report: the base model's, or a LoRA adapter's (``model`` naming
        an adapter runs it, as in vLLM); a request naming another model is refused (404)."""
        names = self._names()
        adapters = self.gateway.engine.lora_names
        if model is not None and model not in names and model not in adapters:
            served = ", ".join(repr(n) for n in names + adapters)
            raise Refused(grpc.StatusCode.NOT_FOUND, f"the model {model!r} does not exist; this "
                          f"server serves {served} (GET /v1/models)")
        return model if model in adapters else names[0]

    def _lora(self, model: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model)."""
        return model if model is not None and model in self.gateway.engine.lora_names else None

    def _parse(self, parse, body):
        try:
            return parse(body)
        except ValueError as error:
            raise self.gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    async def _prepare(self, parsed: proto.ParsedRequest, prompt_ids: list[int]):
        fields = parsed.fields
        if "max_tokens" not in fields:
            # Completions: 16, as OpenAI's; chat: the model's generation_config max_new_tokens,
            # else all the context leaves (vLLM's), not SamplingParams' 256.
            engine = self.gateway.engine
            room = engine.context_room(len(prompt_ids))
            default = parsed.default_max_tokens
            if default is None:
                default = engine.sampling_defaults.get("max_tokens", room)
            fields = {**fields, "max_tokens": max(1, min(default, room))}
        try:
            return self.gateway.prepare(fields, prompt_ids, parsed.priority)
        except ValueError as error:
            raise self.gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    def _request_id(self, request: web.Request, parsed: proto.ParsedRequest, prefix: str) -> str:
        rid = parsed.request_id or request.headers.get("X-Request-Id") or ""
        return f"{prefix}-{rid}" if rid else proto.new_id(prefix)

    async def _stream(self, request: web.Request, events: AsyncIterator[Any], *,
                      typed: bool = False, error_event: Callable | None = None) -> web.StreamResponse:
        """Server-sent events from ``events`` (dicts), then ``[DONE]``. The response starts only
        when the first event is ready, so a refusal before it is a plain HTTP error. ``typed``
        (the Responses API): each event is named by its "type" and no ``[DONE]`` follows."""
        name = (lambda event: event.get("type")) if typed else (lambda event: None)
        async with contextlib.aclosing(events) as events:
            first = await anext(events, None)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                if first is not None:
                    await response.write(_sse(first, name(first)))
                async for event in events:
                    await response.write(_sse(event, name(event)))
            except Refused as refused:  # after the response started: an error event
                status = _HTTP_STATUS.get(refused.code, 500)
                if error_event is not None:
                    await response.write(_sse(error_event(status, refused.message), "error"))
                else:
                    error = error_body(status, refused.message)
                    await response.write(_sse({"type": "error", **error["error"]}, "error") if typed
                                         else _sse(error))
            if not typed:
                await response.write(_sse("[DONE]"))
            await response.write_eof()
            return response

    # ---- endpoints --------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.serving() else 503)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": qwenjax.__version__})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        data = self._model_cards()
        return web.json_response({"object": "list", "data": data, "has_more": False,
                                  "first_id": data[0]["id"], "last_id": data[-1]["id"]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for card in self._model_cards():
            if card["id"] == name:
                return web.json_response(card)
        return _error(404, f"The model `{name}` does not exist.", request.path)

    async def invocations(self, request: web.Request) -> web.Response:
        """SageMaker's one route, as vLLM serves it: the body's fields say which API it is for."""
        body = await self._body(request)  # (aiohttp keeps the bytes for the handler to read)
        routes = ((("messages",), self.chat_completions), (("prompt",), self.completions),
                  (("input",), self.embeddings), (("query", "documents"), self.rerank),
                  (("text_1", "text_2"), self.score))
        for fields, handler in routes:
            if isinstance(body, dict) and all(field in body for field in fields):
                return await handler(request)
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      "an /invocations body must be a chat (messages), completion (prompt), "
                      "embedding (input), rerank (query, documents) or score (text_1, text_2) request")

    async def load(self, request: web.Request) -> web.Response:
        """vLLM's /load: the requests this server is handling (a router's load signal)."""
        return web.json_response({"server_load": self.gateway.in_flight})

    def _model_cards(self) -> list[dict]:
        self.gateway.require_engine(admitting=False)
        engine = self.gateway.engine
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "qwenjax",
                 "root": engine.lm.source, "parent": None, "max_model_len": engine.max_model_len}
                for name in self._names()]
        data += [{"id": name, "object": "model", "created": self.created, "owned_by": "qwenjax",
                  "root": name, "parent": self._names()[0], "max_model_len": engine.max_model_len}
                 for name in engine.lora_names]
        # Anthropic's clients list models from the same path: their fields ride along. And
        # vLLM's model cards carry OpenAI's (legacy) permission list: the same open one here.
        created_at = datetime.datetime.fromtimestamp(self.created, datetime.timezone.utc).isoformat()
        for entry in data:
            entry.update(type="model", display_name=entry["id"], created_at=created_at,
                         permission=[{"id": f"modelperm-{entry['id']}", "object": "model_permission",
                                      "created": self.created, "allow_create_engine": False,
                                      "allow_sampling": True, "allow_logprobs": True,
                                      "allow_search_indices": False, "allow_view": True,
                                      "allow_fine_tuning": False, "organization": "*",
                                      "group": None, "is_blocking": False}])
        return data

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        """``{"lora_name": …, "lora_path": …}``: a PEFT directory on the server's disk into a
        free LoRA slot; requests name it as their ``model`` once this returns (vLLM's answer)."""
        body = self._object(await self._body(request), {"lora_name", "lora_path"})
        name = body.get("lora_name")
        await self.gateway.add_lora(name, body.get("lora_path"), self._names())
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        """``{"lora_name": …}`` (vLLM's ``lora_int_id`` is accepted and unused)."""
        body = self._object(await self._body(request), {"lora_name", "lora_int_id"})
        name = body.get("lora_name")
        await self.gateway.remove_lora(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        """``{"model_path": …}``: an HF checkpoint of the served architecture on the server's
        disk, served from the next step on (SGLang's answer: ``success`` and ``message``)."""
        body = self._object(await self._body(request), {"model_path", "load_format"})
        await self.gateway.update_weights(body.get("model_path"))
        return web.json_response({"success": True, "message": "Succeeded to update model weights."})

    async def pause(self, request: web.Request) -> web.Response:
        """``POST /pause?mode=abort|wait|keep&clear_cache=true|false`` (vLLM's): no more steps
        until ``POST /resume``; requests sent meanwhile wait (``Engine.pause``). vLLM's older
        ``wait_for_inflight_requests=true`` is mode "wait"."""
        query = request.query
        unknown = sorted(set(query) - {"mode", "clear_cache", "wait_for_inflight_requests"})
        if unknown:
            raise self.gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, f"unknown query "
                                      f"parameter {unknown[0]!r}; /pause takes mode, clear_cache "
                                      "and wait_for_inflight_requests", generate=False)
        mode = query.get("mode", "abort")
        if self._flag(query, "wait_for_inflight_requests", False):
            mode = "wait"
        await self.gateway.pause(mode, self._flag(query, "clear_cache", True))
        return web.json_response({"status": "paused"})

    def _flag(self, query, name: str, default: bool) -> bool:
        value = query.get(name)
        if value is None:
            return default
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise self.gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, f"{name} must be true or "
                                  f"false, got {value!r}", generate=False)

    async def resume(self, request: web.Request) -> web.Response:
        await self.gateway.resume()
        return web.json_response({"status": "resumed"})

    async def is_paused(self, request: web.Request) -> web.Response:
        return web.json_response({"is_paused": self.gateway.paused})

    async def sleep(self, request: web.Request) -> web.Response:
        """``POST /sleep?level=1|2`` (vLLM's): the weights' and KV cache's device memory handed
        back while idle; generation requests get 503 until ``POST /wake_up``."""
        level = request.query.get("level", "1")
        await self.gateway.sleep(int(level) if level.isdigit() else level)
        return web.Response()

    async def wake_up(self, request: web.Request) -> web.Response:
        await self.gateway.wake_up()
        return web.Response()

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.gateway.sleeping})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """Forget the cached prefixes (vLLM's route): ``{"reset": false}`` while requests run."""
        thread = self.gateway.require_engine(admitting=False)
        return web.json_response({"reset": await thread.reset_prefix_cache()})

    def _object(self, body: Any, fields: set[str]) -> dict:
        if not isinstance(body, dict):
            raise self.gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, "the request body must be "
                                      f"a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - fields)
        if unknown:
            raise self.gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"unknown field(s) {', '.join(map(repr, unknown))}; this "
                                      f"endpoint takes {', '.join(sorted(fields))}")
        return body

    async def tokenize(self, request: web.Request) -> web.Response:
        gateway = self.gateway
        gateway.require_engine()
        body = await self._body(request)
        try:
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            self._check_model(body.get("model"))
            own = {"model", "prompt", "add_special_tokens", "return_token_strs"}  # not chat's
            unknown = sorted(set(body) - own - {"messages", "tools", "add_generation_prompt",
                                                "continue_final_message", "chat_template_kwargs",
                                                "chat_template"})
            for name in ("add_special_tokens", "return_token_strs"):
                if not isinstance(body.get(name, False), bool):
                    raise ValueError(f"{name} must be true or false")
            if unknown:
                raise ValueError(f"/tokenize does not accept the field(s) {', '.join(unknown)}")
            if ("prompt" in body) == ("messages" in body):
                raise ValueError("send one of prompt or messages")
            if "prompt" in body:
                if not isinstance(body["prompt"], str):
                    raise ValueError("prompt must be a string")
                ids = await gateway.encode(text=body["prompt"])
            else:
                chat = proto.parse_chat({k: body[k] for k in body if k not in own - {"model"}})
                ids = await gateway.encode(messages=chat.messages, tools=chat.tools,
                                           add_generation_prompt=chat.add_generation_prompt,
                                           continue_final_message=chat.continue_final_message,
                                           template_kwargs=chat.template_kwargs,
                                           chat_template=self._request_template(chat))
        except ValueError as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        # (add_special_tokens, vLLM's: Qwen2.5's tokenizer adds none to a prompt either way.)
        strs = gateway.engine.tokenizer.convert_ids_to_tokens(ids) if body.get("return_token_strs") \
            else None
        return web.json_response({"count": len(ids), "max_model_len": gateway.engine.max_model_len,
                                  "tokens": ids, "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        gateway = self.gateway
        gateway.require_engine()
        body = await self._body(request)
        engine = gateway.engine
        try:
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
                raise ValueError("tokens must be a list of token ids")
            self._check_model(body.get("model"))
            convert.check_token_ids(tokens, engine.lm.config.vocab_size, "tokens")
            if engine.tokenizer is None:
                raise ValueError("this model has no tokenizer (random-weight preset)")
        except ValueError as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        return web.json_response({"prompt": engine.tokenizer.decode(tokens, skip_special_tokens=False)})

    async def _completion_runs(self, parsed: proto.ParsedRequest) -> list[tuple[list[int], Any, str]]:
        """(prompt ids as run, SamplingParams, echoed text) of each prompt of a completion."""
        gateway = self.gateway
        runs = []
        for prompt in parsed.prompts:
            try:
                if parsed.suffix is not None:
                    if gateway.engine.tokenizer is None:
                        raise ValueError("suffix needs the model's tokenizer")
                    ids = gateway.engine.tokenizer.encode_fill_in_the_middle(prompt, parsed.suffix)
                else:
                    ids = prompt if isinstance(prompt, list) else await gateway.encode(text=prompt)
            except ValueError as error:
                raise gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
            run_ids, params = await self._prepare(parsed, ids)
            echo = ""
            if parsed.echo and gateway.engine.tokenizer is None:
                raise gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, "echo needs the model's "
                                     "tokenizer, and this model has none (random-weight preset)")
            if parsed.echo:
                echo = prompt if isinstance(prompt, str) and len(run_ids) == len(ids) else \
                    gateway.engine.tokenizer.decode(run_ids, skip_special_tokens=False)
            runs.append((run_ids, params, echo))
        return runs

    async def embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's /v1/embeddings: the last token's final hidden state of each input (vLLM's
        pooling of a decoder model; qwenjax/pooling.py), the inputs run as concurrent requests."""
        self.gateway.require_engine(generate=True)
        parsed = self._parse(proto.parse_embeddings, await self._body(request))
        model, runs, vectors = await self._pool(parsed)
        tokens = sum(map(len, runs))
        return web.json_response({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": i,
                      "embedding": proto.embedding_json(vectors[i], parsed.encoding_format)}
                     for i in range(len(runs))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _head_task(self) -> str:
        """What /pooling answers by default: the model's own task (embed, classify, reward)."""
        return self.gateway.engine.pooling_params().task

    async def classify(self, request: web.Request) -> web.Response:
        """vLLM's /classify on a classification checkpoint: each input's class probabilities
        and its most likely label; SGLang's form (``text``/``input_ids``) is SGLang's answer."""
        self.gateway.require_engine(generate=True)
        body = await self._body(request)
        if isinstance(body, dict) and ("text" in body or "input_ids" in body) and "input" not in body:
            return await self.sglang.pooled(body, "/classify", self._head_task())
        parsed = self._parse(lambda b: proto.parse_embeddings(b, "/classify", "classify"), body)
        model, runs, vectors = await self._pool(parsed)
        labels = self.gateway.engine.lm.score_head.labels
        tokens = sum(map(len, runs))
        return web.json_response({
            "id": proto.new_id("classify"), "object": "list", "created": proto.now(), "model": model,
            "data": [{"index": i, "label": labels[vectors[i].index(max(vectors[i]))],
                      "probs": vectors[i], "num_classes": len(vectors[i])} for i in range(len(runs))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})

    async def pooling(self, request: web.Request) -> web.Response:
        """vLLM's /pooling: the model's pooled output of each input: a reward checkpoint's
        reward, a classifier's probabilities, otherwise the (normalized) embedding; or the
        ``task`` asked for (``token_embed``, ``token_classify``: a list per pooled token)."""
        self.gateway.require_engine(generate=True)
        task = self._head_task()
        parsed = self._parse(lambda b: proto.parse_embeddings(b, "/pooling", task), await self._body(request))
        model, runs, vectors = await self._pool(parsed)
        tokens = sum(map(len, runs))
        return web.json_response({
            "id": proto.new_id("pool"), "object": "list", "created": proto.now(), "model": model,
            "data": [{"index": i, "object": "pooling",
                      "data": proto.embedding_json(vectors[i], parsed.encoding_format)}
                     for i in range(len(runs))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})

    def _embedding_model(self, endpoint: str) -> None:
        head = self.gateway.engine.lm.score_head
        if head is not None:
            raise self.gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, f"{endpoint} compares "
                                      f"embeddings; this is a {head.kind} checkpoint (a "
                                      "cross-encoder score is not supported)")

    async def score(self, request: web.Request) -> web.Response:
        """vLLM's /score on an embedding model: the cosine similarity of each (text_1, text_2)
        pair's embeddings (last-token, normalized; as /v1/embeddings)."""
        self.gateway.require_engine(generate=True)
        self._embedding_model("/score")
        parsed, pairs = self._parse(proto.parse_score, await self._body(request))
        model, runs, vectors = await self._pool(parsed)
        tokens = sum(map(len, runs))
        return web.json_response({
            "id": proto.new_id("score"), "object": "list", "created": proto.now(), "model": model,
            "data": [{"index": k, "object": "score", "score": cosine(vectors[i], vectors[j])}
                     for k, (i, j) in enumerate(pairs)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})

    async def rerank(self, request: web.Request) -> web.Response:
        """The Jina/Cohere rerank API (vLLM's /rerank, /v1/rerank, /v2/rerank) on an embedding
        model: the documents by the cosine similarity of their embeddings to the query's, best
        first, ``top_n`` of them."""
        self.gateway.require_engine(generate=True)
        self._embedding_model("/rerank")
        parsed = self._parse(proto.parse_rerank, await self._body(request))
        model, runs, vectors = await self._pool(parsed.embedding)
        scores = [cosine(vectors[0], vectors[1 + d]) for d in range(len(parsed.documents))]
        ranked = sorted(range(len(scores)), key=lambda d: -scores[d])[: parsed.top_n]
        tokens = sum(map(len, runs))
        return web.json_response({
            "id": proto.new_id("rerank"), "model": model, "usage": {"total_tokens": tokens},
            "results": [{"index": d, "relevance_score": scores[d],
                         **({"document": {"text": parsed.documents[d]}}
                            if parsed.return_documents else {})} for d in ranked]})

    async def _pool(self, parsed: proto.EmbeddingRequest) -> tuple[str, list[list[int]], dict[int, list]]:
        """(model name, each input's token ids, {input index: its pooled output}): the inputs
        run as concurrent pooling requests."""
        gateway = self.gateway
        model = self._check_model(parsed.model)
        engine = gateway.engine
        runs = []
        try:
            for text in parsed.inputs:
                ids = text if isinstance(text, list) else await gateway.encode(text=text)
                if parsed.truncate_prompt_tokens is not None:
                    ids = ids[-parsed.truncate_prompt_tokens:]
                engine.validate(ids, parsed.pooling, parsed.priority)
                runs.append(ids)
        except ValueError as error:
            raise gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        lora = self._lora(parsed.model)
        calls = [gateway.call(ids, parsed.pooling, parsed.priority, lora=lora) for ids in runs]
        vectors = {}
        async for i, output in merged(calls):
            if output.finished:
                vectors[i] = output.embedding
        return model, runs, vectors

    async def completions(self, request: web.Request) -> web.StreamResponse:
        gateway = self.gateway
        gateway.require_engine(generate=True)
        parsed = self._parse(proto.parse_completion, await self._body(request))
        model = self._check_model(parsed.model)
        runs = await self._completion_runs(parsed)
        calls = [self._call(parsed, ids, params) for ids, params, _ in runs]
        n = runs[0][1].n
        response_id = self._request_id(request, parsed, "cmpl")
        token_text = proto.TokenText(gateway.engine.tokenizer, parsed.tokens_as_ids)
        head = {"id": response_id, "object": "text_completion", "created": proto.now(), "model": model}
        prompt_tokens = sum(len(ids) for ids, _, _ in runs)
        totals = {"completion": 0, "cached": {}}

        def logprobs(i: int, entries, offset: int):
            return proto.completion_logprobs(entries, token_text, offset) \
                if runs[i][1].logprobs is not None else None

        def prompt_entries(i: int, output) -> list:
            return list(output.prompt_logprobs or ()) if runs[i][1].prompt_logprobs is not None else []

        def shown(output):
            """The output as the answer shows it (with max_tokens 0 and echo: the prompt alone)."""
            return proto.prompt_only_output(output) if parsed.prompt_only else output

        def echoed(i: int, entries: list) -> list:
            """Echoed prompt logprobs: the first token's (which has none) as its id alone, so that
            every prompt token is listed (OpenAI's and vLLM's: index p is token p)."""
            if entries and entries[0] is None:
                entries = [proto.FirstToken(runs[i][0][0])] + entries[1:]
            return entries

        if not parsed.stream:
            finals: dict[int, Any] = {}
            prompt_lps: dict[int, list] = {}
            async for i, output in merged(calls):
                output = shown(output)
                if output.prompt_logprobs is not None:
                    prompt_lps.setdefault(i, prompt_entries(i, output))
                if output.finish_reason is not None:
                    finals[i * n + output.index] = (i, output)
                    if output.index == 0:
                        totals["cached"][i] = output.num_cached_tokens
            choices = []
            for index in sorted(finals):
                i, output = finals[index]
                echo = runs[i][2]
                entries = (echoed(i, prompt_lps.get(i, [])) if parsed.echo else []) + list(output.logprobs or ())
                choice = {"index": index, "text": echo + output.text,
                          "logprobs": logprobs(i, entries, 0), "finish_reason": output.finish_reason,
                          "stop_reason": output.stop_reason}
                if "prompt_logprobs" in parsed.fields:  # asked for (echo + logprobs asks too)
                    choice["prompt_logprobs"] = proto.prompt_logprobs_json(prompt_lps.get(i), token_text)
                if parsed.return_token_ids:
                    choice.update(prompt_token_ids=runs[i][0], token_ids=output.token_ids)
                choices.append(choice)
            completion = sum(len(output.token_ids) for _, output in finals.values())
            return web.json_response({**head, "choices": choices, "usage": proto.usage(
                prompt_tokens, completion, sum(totals["cached"].values()))})

        def with_usage(event: dict) -> dict:
            if parsed.continuous_usage:
                event["usage"] = proto.usage(prompt_tokens, totals["completion"],
                                             sum(totals["cached"].values()))
            elif parsed.include_usage:
                event["usage"] = None
            return event

        async def ready():
            """(i, output) as they come, except that with the echo's logprobs a choice waits
            for its prompt's, which (with n > 1) only sequence 0's outputs carry."""
            prompt_lps: dict[int, list] = {}
            held: dict[tuple[int, int], Any] = {}  # a choice's outputs before its prompt's logprobs
            waits = parsed.echo and runs[0][1].prompt_logprobs is not None
            async for i, output in merged(calls):
                output = shown(output)
                if output.prompt_logprobs is not None and i not in prompt_lps:
                    prompt_lps[i] = prompt_entries(i, output)
                    for key in [key for key in held if key[0] == i]:
                        yield i, held.pop(key), prompt_lps[i]
                if waits and i not in prompt_lps:
                    key = (i, output.index)
                    held[key] = held[key].followed_by(output) if key in held else output
                    continue
                yield i, output, prompt_lps.get(i, [])
            for (i, _), output in held.items():  # sequence 0 ended without them (aborted)
                yield i, output, []

        async def events():
            started: dict[int, int] = {}  # choice index → chars sent (for text_offset)
            unsent: dict[int, list[int]] = {}  # return_token_ids: ids of outputs not yet shown
            async for i, output, prompt in ready():
                index = i * n + output.index
                text, entries = output.delta_text, list(output.delta_logprobs or ())
                if parsed.return_token_ids:
                    unsent.setdefault(index, []).extend(output.delta_token_ids)
                first = index not in started
                if first:
                    started[index] = 0
                    if parsed.echo:
                        text = runs[i][2] + text
                        entries = echoed(i, prompt) + entries
                totals["completion"] += len(output.delta_token_ids)
                if output.finish_reason is not None and output.index == 0:
                    totals["cached"][i] = output.num_cached_tokens
                # Nothing new to show (a partial UTF-8 character held back, a model without a
                # tokenizer): no event, unless the client follows the usage token by token.
                if not (text or entries or output.finish_reason is not None
                        or (parsed.continuous_usage and output.delta_token_ids)
                        or (parsed.return_token_ids and first)):
                    continue
                choice = {"index": index, "text": text,
                          "logprobs": logprobs(i, entries, started[index]),
                          "finish_reason": output.finish_reason,
                          "stop_reason": output.stop_reason
                          if output.finish_reason is not None else None}
                if parsed.return_token_ids:  # (vLLM's: the prompt's with a choice's first chunk)
                    choice.update({"prompt_token_ids": runs[i][0]} if first else {},
                                  token_ids=unsent.pop(index))
                started[index] += len(text)
                yield with_usage({**head, "choices": [choice]})
            if parsed.include_usage:
                yield {**head, "choices": [], "usage": proto.usage(
                    prompt_tokens, totals["completion"], sum(totals["cached"].values()))}

        return await self._stream(request, events())

    def _parse_chat(self, body, translate: Callable = lambda body: body) -> proto.ParsedRequest:
        """A chat request (``translate``d into one first), with the server's reasoning parser."""
        parsed = self._parse(lambda b: proto.parse_chat(translate(b)), body)
        return dataclasses.replace(parsed, reasoning_parser=self.reasoning_parser)

    async def _chat_prompt(self, parsed: proto.ParsedRequest) -> list[int]:
        """The token ids of a checked chat request's messages (and tools) as the model reads them."""
        try:
            return await self.gateway.encode(messages=parsed.messages, tools=parsed.tools,
                                             add_generation_prompt=parsed.add_generation_prompt,
                                             continue_final_message=parsed.continue_final_message,
                                             template_kwargs=parsed.template_kwargs,
                                             chat_template=self._request_template(parsed))
        except ValueError as error:
            raise self.gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    def _request_template(self, parsed: proto.ParsedRequest) -> str | None:
        if parsed.chat_template is not None and not self.trust_request_chat_template:
            raise ValueError("chat_template in a request needs the server started with "
                             "--trust-request-chat-template")
        return parsed.chat_template

    async def _chat_call(self, parsed: proto.ParsedRequest):
        """(prompt ids, SamplingParams, the admitted Call) of a checked chat request."""
        prompt_ids, params = await self._prepare(parsed, await self._chat_prompt(parsed))
        return prompt_ids, params, self._call(parsed, prompt_ids, params)

    def _call(self, parsed: proto.ParsedRequest, prompt_ids: list[int], params):
        """The admitted request: a Call, or a BeamCall with use_beam_search."""
        lora = self._lora(parsed.model)
        if parsed.beam_search:
            return self.gateway.beam_call(prompt_ids, params, parsed.priority, lora,
                                          parsed.length_penalty)
        return self.gateway.call(prompt_ids, params, parsed.priority, lora=lora)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        gateway = self.gateway
        gateway.require_engine(generate=True)
        parsed = self._parse_chat(await self._body(request))
        model = self._check_model(parsed.model)
        prompt_ids, params, call = await self._chat_call(parsed)
        response_id = self._request_id(request, parsed, "chatcmpl")
        token_text = proto.TokenText(gateway.engine.tokenizer, parsed.tokens_as_ids)
        head = {"id": response_id, "object": "chat.completion", "created": proto.now(), "model": model}

        def finish_reason(output, called: bool) -> str:
            chosen = called and model_chose_to_call(parsed.tool_choice)
            return "tool_calls" if chosen and output.finish_reason == "stop" else output.finish_reason

        if not parsed.stream:
            finals, prompt_lps = {}, None
            async for _, output in merged([call]):
                if output.prompt_logprobs is not None and prompt_lps is None:
                    prompt_lps = list(output.prompt_logprobs)
                if output.finish_reason is not None:
                    finals[output.index] = output
            choices = []
            for index in sorted(finals):
                output = finals[index]
                message, called = proto.chat_message(output.text, parsed)
                choices.append({"index": index, "message": message,
                                "logprobs": proto.chat_logprobs(output.logprobs or (), token_text)
                                if parsed.chat_logprobs else None,
                                "finish_reason": finish_reason(output, called),
                                "stop_reason": output.stop_reason})
                if parsed.return_token_ids:
                    choices[-1]["token_ids"] = output.token_ids
            completion = sum(len(o.token_ids) for o in finals.values())
            cached = finals[0].num_cached_tokens if 0 in finals else 0
            reply = {**head, "choices": choices,
                     "usage": proto.usage(len(prompt_ids), completion, cached)}
            if params.prompt_logprobs is not None:  # vLLM's place for them
                reply["prompt_logprobs"] = proto.prompt_logprobs_json(prompt_lps, token_text)
            if parsed.return_token_ids:
                reply["prompt_token_ids"] = prompt_ids
            return web.json_response(reply)

        head["object"] = "chat.completion.chunk"

        async def events():
            streams = [proto.ChatStream(parsed, stream_calls=True) for _ in range(params.n)]
            completion, cached = 0, 0
            unsent: list[list[int]] = [[] for _ in range(params.n)]  # return_token_ids

            def chunk(index: int, delta: dict, *, logprobs=None, finish=None, stop=None):
                event = {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish, "stop_reason": stop}]}
                if parsed.return_token_ids:  # the ids the chunks so far did not carry
                    event["choices"][0]["token_ids"], unsent[index] = unsent[index], []
                if parsed.continuous_usage:
                    event["usage"] = proto.usage(len(prompt_ids), completion, cached)
                elif parsed.include_usage:
                    event["usage"] = None
                return event

            first = True
            async for _, output in merged([call]):
                if first:  # every choice opens with the role
                    first = False
                    for index in range(params.n):
                        event = chunk(index, {"role": "assistant", "content": ""})
                        if parsed.return_token_ids and index == 0:  # vLLM's: with the first chunk
                            event["prompt_token_ids"] = prompt_ids
                        yield event
                index, stream = output.index, streams[output.index]
                if parsed.return_token_ids:
                    unsent[index].extend(output.delta_token_ids)
                completion += len(output.delta_token_ids)
                reasoning, content = stream.feed(output.delta_text)
                logprobs = proto.chat_logprobs(output.delta_logprobs, token_text) \
                    if parsed.chat_logprobs and output.delta_logprobs else None
                if reasoning:
                    yield chunk(index, proto.reasoning_delta(reasoning), logprobs=logprobs)
                    logprobs = None
                if content or logprobs or (parsed.continuous_usage and output.delta_token_ids
                                           and not reasoning):
                    yield chunk(index, {"content": content}, logprobs=logprobs)
                for piece in stream.call_pieces():
                    yield chunk(index, {"tool_calls": [proto.call_piece_json(*piece)]})
                if output.finish_reason is None:
                    continue
                if index == 0:
                    cached = output.num_cached_tokens
                reasoning, rest, calls = stream.finish()
                if reasoning:
                    yield chunk(index, proto.reasoning_delta(reasoning))
                if rest:
                    yield chunk(index, {"content": rest})
                for piece in stream.call_pieces():
                    yield chunk(index, {"tool_calls": [proto.call_piece_json(*piece)]})
                opened = stream.tools.opened  # calls past those go whole (the scanner lost them)
                if calls[opened:]:
                    yield chunk(index, {"tool_calls": [proto.tool_call_json(c, k) for k, c in
                                                       enumerate(calls[opened:], opened)]})
                yield chunk(index, {}, finish=finish_reason(output, bool(calls) or opened > 0),
                            stop=output.stop_reason)
            if parsed.include_usage:
                yield {**head, "choices": [], "usage": proto.usage(len(prompt_ids), completion, cached)}

        return await self._stream(request, events())

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API, run as the chat completion it translates to
        (server/responses_protocol.py); stored unless ``store`` is false."""
        gateway = self.gateway
        gateway.require_engine(generate=True)
        body = await self._body(request)
        history: list[dict] = []
        previous = body.get("previous_response_id") if isinstance(body, dict) else None
        if isinstance(previous, str):
            entry = self.responses_store.get(previous)
            if entry is None:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"previous_response_id {previous!r}: no "
                              f"stored response has this id (the server keeps the last "
                              f"{self.responses_store.capacity}, in memory)")
            if entry[1] is None:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"previous_response_id "
                              f"{previous!r} is {entry[0]['status']}: only a finished response "
                              f"can be continued")
            history = entry[1]
        parsed = self._parse_chat(body, lambda b: rproto.to_chat_body(b, history))
        model = self._check_model(parsed.model)
        prompt_ids, params, call = await self._chat_call(parsed)
        reply = rproto.ResponseBuilder(self._request_id(request, parsed, "resp"), model, body, parsed,
                                       len(prompt_ids), proto.TokenText(gateway.engine.tokenizer))
        outputs = (output async for _, output in merged([call]))

        def store() -> None:
            if body.get("store") is not False and reply.result is not None:
                self.responses_store.put(reply.result, history + rproto.input_messages(body)
                                         + rproto.output_messages(reply.result))

        if body.get("background"):
            return web.json_response(self._run_in_background(reply, outputs, store))
        if not parsed.stream:
            result = await reply.collect(outputs)
            store()
            return web.json_response(result)

        async def events():
            async for event in reply.events(outputs):
                if event["type"] in ("response.completed", "response.incomplete"):
                    store()  # before the client sees it end, so it can continue at once
                yield event

        return await self._stream(request, events(), typed=True)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API, run as the chat completion it translates to
        (server/anthropic_protocol.py)."""
        gateway = self.gateway
        gateway.require_engine(generate=True)
        body = await self._body(request)
        reasoning = self.reasoning_parser is not None
        parsed = self._parse_chat(body, lambda b: aproto.to_chat_body(b, reasoning))
        model = self._check_model(parsed.model)
        prompt_ids, _, call = await self._chat_call(parsed)
        message_id = self._request_id(request, parsed, "msg").replace("msg-", "msg_", 1)
        builder = aproto.MessageBuilder(message_id, model, body, parsed, len(prompt_ids))
        outputs = (output async for _, output in merged([call]))
        if not parsed.stream:
            return web.json_response(await builder.collect(outputs))
        return await self._stream(request, builder.events(outputs), typed=True,
                                  error_event=aproto.error_body)

    async def count_message_tokens(self, request: web.Request) -> web.Response:
        """Anthropic's /v1/messages/count_tokens: the prompt's tokens as the model would see it."""
        self.gateway.require_engine()
        body = await self._body(request)
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k in ("model", "messages", "system", "tools",
                                                            "tool_choice", "thinking")}
            body["max_tokens"] = 1
        parsed = self._parse_chat(body, lambda b: aproto.to_chat_body(b, reasoning=True))
        self._check_model(parsed.model)
        return web.json_response({"input_tokens": len(await self._chat_prompt(parsed))})

    def _run_in_background(self, reply, outputs, store) -> dict:
        """Answer at once with the queued response; it runs on, stored as it goes (in_progress,
        then completed, incomplete or failed), until done or cancelled."""
        queued = reply.pending("queued")
        self.responses_store.put(queued, None)

        async def run():
            try:
                self.responses_store.put(reply.pending("in_progress"), None)
                await reply.collect(outputs)
                store()
            except Exception as error:  # refused or failed: the stored response says so
                log.warning("background response %s failed: %s", reply.id, error)
                failed = reply.pending("failed")
                failed["error"] = {"code": "server_error", "message": str(error)}
                self.responses_store.put(failed, None)
            finally:
                self._background.pop(reply.id, None)

        self._background[reply.id] = asyncio.get_running_loop().create_task(run()), reply
        return queued

    async def cancel_response(self, request: web.Request) -> web.Response:
        """Stop a background response still running (its request is aborted); the response,
        now "cancelled". A finished one cannot be cancelled."""
        response_id = request.match_info["response_id"]
        running = self._background.pop(response_id, None)
        if running is not None:
            task, reply = running
            task.cancel()  # (closing its outputs aborts its engine request)
            try:
                await asyncio.gather(task, return_exceptions=True)
            finally:  # (stored even when this request is itself cancelled meanwhile)
                self.responses_store.put(reply.pending("cancelled"), None)
        entry = self.responses_store.get(response_id)
        if entry is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no stored response has the id {response_id!r}")
        if running is None and entry[0]["status"] != "cancelled":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"response {response_id!r} is "
                          f"{entry[0]['status']}: only a background response still running can "
                          f"be cancelled")
        return web.json_response(entry[0])

    async def get_response(self, request: web.Request) -> web.Response:
        entry = self.responses_store.get(request.match_info["response_id"])
        if entry is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no stored response has the id "
                          f"{request.match_info['response_id']!r}")
        return web.json_response(entry[0])
