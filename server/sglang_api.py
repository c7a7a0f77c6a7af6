"""SGLang's native HTTP API, on the same app as the OpenAI-compatible one (server/openai_api.py),
for clients written against ``python -m sglang.launch_server``:

    POST /generate          text or input_ids (one or a batch), sampling_params, stream,
                            return_logprob / logprob_start_len / top_logprobs_num, rid, lora_path
    POST /encode            embeddings of text or input_ids (the last token's, as /v1/embeddings)
    POST /classify          (text or input_ids) a classification or reward checkpoint's scores
    POST /abort_request     {"rid": …}: stop a running /generate request ({"abort_all": true}: all)
    POST /flush_cache       forget the cached prefixes (400 while requests run)
    GET  /get_model_info    model path, is_generation, architectures
    GET  /get_server_info   the serving limits, under SGLang's names
    GET  /get_load          per data-parallel replica: requests held and tokens (a router's probe)
    GET  /health_generate   200 once a one-token generation went through (503 if it fails)

``sampling_params`` takes SGLang's names (``max_new_tokens``, default 128; ``min_new_tokens``,
``no_stop_trim``, ``sampling_seed``, ``json_schema``/``regex``/``ebnf``, …); a field this server
does not have is refused by name. Answers are SGLang's: ``{"text", "output_ids", "meta_info"}``
(a list for a batch or n > 1), ``meta_info.finish_reason`` ``{"type": "stop", "matched": …}`` or
``{"type": "length", "length": …}``, logprobs as ``[logprob, token_id, text or null]``. A
stream sends each sequence's state so far (text cumulative, as SGLang's) as server-sent events,
then ``data: [DONE]``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from typing import Any, Mapping, Sequence

import grpc
from aiohttp import web

import qwenjax
from qwenjax.engine.speculative import SpeculativeConfig
from qwenjax.pooling import PoolingParams
from qwenjax.sampling import is_int
from qwenjax.sglang import (MAX_NEW_TOKENS, finish_reason, hidden_state_lists,  # noqa: F401 (tests)
                            sampling_fields)
from server import openai_protocol as proto
from server.gateway import Refused, merged

HEALTH_TIMEOUT_S = 20.0  # /health_generate: SGLang's default wait for the probe's token

GENERATE_FIELDS = frozenset(("text", "input_ids", "sampling_params", "rid", "stream",
                             "return_logprob", "logprob_start_len", "top_logprobs_num",
                             "return_text_in_logprobs", "return_hidden_states", "lora_path",
                             "priority"))
ENCODE_FIELDS = frozenset(("text", "input_ids", "rid", "priority"))


@dataclasses.dataclass
class GenerateRequest:
    prompts: list[str | list[int]]
    fields: list[dict[str, Any]]      # SamplingParams fields of each prompt
    rids: list[str]
    batched: bool                     # a list was sent: the answer is a list
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1       # prompt logprobs from this position (-1: none)
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    return_hidden_states: bool = False
    lora: list[str | None] = dataclasses.field(default_factory=list)
    priority: int = 0
    # max_new_tokens 0: the prompt only (SGLang's frontend caches prefixes and scores choices
    # so); the request runs with one token, which the answer leaves out.
    prompt_only: list[bool] = dataclasses.field(default_factory=list)


def _prompts(body: Mapping[str, Any]) -> tuple[list[str | list[int]], bool]:
    """(prompts, whether a batch was sent) from ``text`` or ``input_ids``."""
    if ("text" in body) == ("input_ids" in body):
        raise ValueError("send one of text or input_ids")
    if "text" in body:
        text = body["text"]
        if isinstance(text, str):
            return [text], False
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return list(text), True
        raise ValueError("text must be a string or a non-empty list of strings")
    ids = body["input_ids"]
    if isinstance(ids, list) and ids and all(is_int(t) for t in ids):
        return [list(ids)], False
    if (isinstance(ids, list) and ids and all(isinstance(p, list) and p and all(is_int(t) for t in p)
                                              for p in ids)):
        return [list(p) for p in ids], True
    raise ValueError("input_ids must be a non-empty list of token ids or a non-empty list of them")


def _per_prompt(value: Any, count: int, name: str, kind: type, what: str) -> list:
    """A value given once for every prompt, or a list with one per prompt."""
    values = value if isinstance(value, list) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} prompts")
    for v in values:
        if v is not None and not isinstance(v, kind):
            raise ValueError(f"{name} must be {what} (or a list of one per prompt), got "
                             f"{json.dumps(v)[:80]}")
    return values


def parse_generate(body: Any) -> GenerateRequest:
    body = proto.check_fields(body, GENERATE_FIELDS, "/generate")
    prompts, batched = _prompts(body)
    if len(prompts) > proto.MAX_PROMPTS:
        raise ValueError(f"a batch has at most {proto.MAX_PROMPTS} prompts, got {len(prompts)}")
    count = len(prompts)
    params = body.get("sampling_params", {})
    per = params if isinstance(params, list) else [params] * count
    if len(per) != count:
        raise ValueError(f"sampling_params has {len(per)} entries for {count} prompts")
    fields = [sampling_fields(p) for p in per]
    rids = _per_prompt(body.get("rid"), count, "rid", str, "a string")
    if not isinstance(body.get("rid"), list) and body.get("rid") is not None and count > 1:
        raise ValueError("rid: a batch needs one rid per prompt (a list)")
    rids = [rid or uuid.uuid4().hex for rid in rids]
    if len(set(rids)) != len(rids):
        raise ValueError("rid: each prompt of a batch needs its own")
    request = GenerateRequest(prompts, fields, rids, batched)
    request.prompt_only = [f.get("max_tokens") == 0 for f in fields]
    for f, only in zip(fields, request.prompt_only):
        if only:
            f["max_tokens"] = 1
            if f.get("min_tokens"):
                raise ValueError("sampling_params.min_new_tokens must be 0 with max_new_tokens 0")
    request.lora = _per_prompt(body.get("lora_path"), count, "lora_path", str,
                               "the name of a loaded LoRA adapter")
    for name in ("stream", "return_logprob", "return_text_in_logprobs", "return_hidden_states"):
        value = body.get(name, False)
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        setattr(request, name, value)
    for name in ("logprob_start_len", "top_logprobs_num", "priority"):
        value = body.get(name, getattr(request, name))
        if not is_int(value):
            raise ValueError(f"{name} must be an integer (one for all prompts), got "
                             f"{json.dumps(value)[:80]}")
        setattr(request, name, int(value))
    if request.top_logprobs_num < 0 or request.logprob_start_len < -1:
        raise ValueError("top_logprobs_num must be ≥ 0 and logprob_start_len ≥ -1")
    if request.return_hidden_states:
        for f in fields:
            f["return_hidden_states"] = True
    if request.return_logprob:
        for f in fields:
            f["logprobs"] = request.top_logprobs_num
            if request.logprob_start_len >= 0:
                f["prompt_logprobs"] = request.top_logprobs_num
    return request


def _entry(logprob: float | None, token_id: int, token_text, with_text: bool) -> list:
    if logprob is not None and not math.isfinite(logprob):
        logprob = proto.LOGPROB_FLOOR  # JSON has no -inf (a banned token)
    return [logprob, token_id, token_text(token_id)[0] if with_text else None]


def _logprobs(entries: Sequence, token_text, with_text: bool, top: bool) -> tuple[list, list]:
    """(token logprobs, top logprobs per position) of TokenLogprob entries."""
    tokens, tops = [], []
    for lp in entries:
        tokens.append(_entry(lp.logprob, lp.token_id, token_text, with_text))
        tops.append([_entry(v, t, token_text, with_text) for t, v in lp.top] if top else None)
    return tokens, tops


# SGLang's pause modes as Engine.pause's (mode, clear_cache).
_SGLANG_PAUSE = {"abort": ("abort", False), "retract": ("keep", True), "in_place": ("keep", False)}


class SGLangAPI:
    """The native routes, sharing the OpenAI API's gateway, body parsing and streaming."""

    def __init__(self, api):
        self.api = api  # server.openai_api.OpenAIServer
        self.gateway = api.gateway

    def register(self, router: web.UrlDispatcher, enable_sleep_mode: bool = False,
                 allow_weight_updates: bool = False) -> None:
        """``enable_sleep_mode``: also SGLang's /release_memory_occupation and
        /resume_memory_occupation (its --enable-memory-saver), over the same sleep mode;
        ``allow_weight_updates``: /pause_generation and /continue_generation beside the
        weight update, for the trainer that syncs."""
        if allow_weight_updates:
            router.add_post("/pause_generation", self.pause_generation)
            router.add_post("/continue_generation", self.continue_generation)
        if enable_sleep_mode:
            router.add_route("*", "/release_memory_occupation", self.release_memory_occupation)
            router.add_route("*", "/resume_memory_occupation", self.resume_memory_occupation)
        router.add_post("/generate", self.generate)
        router.add_post("/encode", self.encode)
        router.add_post("/abort_request", self.abort_request)
        router.add_route("*", "/flush_cache", self.flush_cache)  # SGLang takes GET and POST
        router.add_get("/get_model_info", self.get_model_info)
        for path in ("/get_server_info", "/server_info"):  # (the frontend asks the newer name)
            router.add_get(path, self.get_server_info)
        router.add_get("/health_generate", self.health_generate)
        router.add_get("/get_load", self.get_load)

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        """SGLang's, for RL loops (free the device between rollouts): the weights' and the KV
        cache's device memory handed back while idle, as ``POST /sleep?level=1`` (the weights
        wait in host memory, so a resume without a weight update serves them again). Whatever
        ``tags`` name ("weights", "kv_cache"), both go and come back together."""
        await self._tags(request)
        await self.gateway.sleep(1)
        return web.json_response(None)

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        await self._tags(request)
        await self.gateway.wake_up()
        return web.json_response(None)

    async def pause_generation(self, request: web.Request) -> web.Response:
        """``{"mode": "abort" | "retract" | "in_place"}`` (SGLang's; default abort): "retract"
        frees the running requests' K/V (recomputed once generation continues), "in_place"
        keeps it (``Engine.pause``)."""
        mode = (await self._optional_object(request, {"mode"})).get("mode", "abort")
        if not isinstance(mode, str) or mode not in _SGLANG_PAUSE:
            raise self._refuse(ValueError(f"mode must be one of {', '.join(_SGLANG_PAUSE)}, "
                                          f"got {mode!r}"))
        mode, clear_cache = _SGLANG_PAUSE[mode]
        await self.gateway.pause(mode, clear_cache)
        return web.Response(text="Generation paused successfully.")

    async def continue_generation(self, request: web.Request) -> web.Response:
        await self.gateway.resume()
        return web.Response(text="Generation continued successfully.")

    async def _optional_object(self, request: web.Request, fields: set[str]) -> dict:
        """The body of a route whose body may be missing, empty or null: a JSON object of
        ``fields`` (``{}`` when there is none)."""
        body = await self.api._body(request) if request.can_read_body else {}
        return self.api._object(body if body is not None else {}, fields)

    async def _tags(self, request: web.Request) -> None:
        tags = (await self._optional_object(request, {"tags"})).get("tags")
        if tags is not None and (not isinstance(tags, list) or not set(tags) <= {"weights", "kv_cache",
                                                                                "cuda_graph"}):
            raise self._refuse(ValueError(f"tags must be a list of 'weights', 'kv_cache' and "
                                          f"'cuda_graph', got {tags!r}"))

    def _refuse(self, error: ValueError) -> Refused:
        return self.gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    async def _ids(self, prompt: str | list[int]) -> list[int]:
        try:
            return prompt if isinstance(prompt, list) else await self.gateway.encode(text=prompt)
        except ValueError as error:
            raise self._refuse(error) from None

    async def generate(self, request: web.Request) -> web.StreamResponse:
        gateway = self.gateway
        gateway.require_engine(generate=True)
        start = time.monotonic()
        parsed = self.api._parse(parse_generate, await self.api._body(request))
        engine = gateway.engine
        runs = []
        for i, prompt in enumerate(parsed.prompts):
            ids = await self._ids(prompt)
            fields = parsed.fields[i]
            if "max_tokens" not in fields:
                fields = {**fields, "max_tokens": max(1, min(MAX_NEW_TOKENS, engine.context_room(len(ids))))}
            if parsed.logprob_start_len >= len(ids):
                raise self._refuse(ValueError(f"logprob_start_len ({parsed.logprob_start_len}) must "
                                              f"be less than the prompt's {len(ids)} tokens"))
            try:
                ids, params = gateway.prepare(fields, ids, parsed.priority)
            except ValueError as error:
                raise self._refuse(error) from None
            runs.append((ids, params))
        calls = [gateway.call(ids, params, parsed.priority, client_id=parsed.rids[i],
                              lora=parsed.lora[i]) for i, (ids, params) in enumerate(runs)]
        token_text = proto.TokenText(engine.tokenizer)
        n = runs[0][1].n
        many = parsed.batched or n > 1

        def answer(i: int, output) -> dict[str, Any]:
            ids, params = runs[i]
            if parsed.prompt_only[i]:  # the token it ran with is not an output
                output = proto.prompt_only_output(output)
            meta = {"id": parsed.rids[i],
                    "finish_reason": finish_reason(output, 0 if parsed.prompt_only[i] else params.max_tokens),
                    "prompt_tokens": len(ids), "completion_tokens": len(output.token_ids),
                    "cached_tokens": output.num_cached_tokens,
                    "e2e_latency": time.monotonic() - start}
            if parsed.return_logprob:
                top = parsed.top_logprobs_num > 0
                with_text = parsed.return_text_in_logprobs
                out_tokens, out_tops = _logprobs(output.logprobs or (), token_text, with_text, top)
                meta["output_token_logprobs"] = out_tokens
                meta["output_top_logprobs"] = out_tops
                if parsed.logprob_start_len >= 0:
                    entries = list(output.prompt_logprobs or ())[parsed.logprob_start_len:]
                    first = parsed.logprob_start_len == 0  # the first token has no logprob
                    tokens, tops = _logprobs(entries[first:], token_text, with_text, top)
                    if first:
                        tokens.insert(0, _entry(None, ids[0], token_text, with_text))
                        tops.insert(0, None)
                    meta["input_token_logprobs"] = tokens
                    meta["input_top_logprobs"] = tops
            if output.hidden_states is not None:
                meta["hidden_states"] = hidden_state_lists(output)
            reply = {"text": output.text, "output_ids": list(output.token_ids), "meta_info": meta}
            if many:
                reply["index"] = i * n + output.index
            return reply

        if not parsed.stream:
            finals: dict[int, dict] = {}
            async for i, output in merged(calls):
                if output.finish_reason is not None:
                    finals[i * n + output.index] = answer(i, output)
            replies = [finals[index] for index in sorted(finals)]
            for reply in replies:
                reply.pop("index", None)
            return web.json_response(replies if many else replies[0])

        async def events():
            async for i, output in merged(calls):
                if output.finish_reason is not None or (output.delta_token_ids
                                                        and not parsed.prompt_only[i]):
                    yield answer(i, output)

        return await self.api._stream(request, events())

    async def encode(self, request: web.Request) -> web.Response:
        """Embeddings (qwenjax/pooling.py, normalized): ``{"embedding", "meta_info"}``, a list
        for a batch."""
        self.gateway.require_engine(generate=True)
        return await self.pooled(await self.api._body(request), "/encode", "embed")

    async def pooled(self, body: Any, endpoint: str, task: str) -> web.Response:
        """/encode, and /classify in SGLang's form: each input's pooled output (an embedding,
        a classifier's probabilities, a reward) as ``{"embedding", "meta_info"}``."""
        gateway = self.gateway
        try:
            body = proto.check_fields(body, ENCODE_FIELDS, endpoint)
            prompts, batched = _prompts(body)
            rids = _per_prompt(body.get("rid"), len(prompts), "rid", str, "a string")
            priority = body.get("priority", 0)
            if not is_int(priority):
                raise ValueError("priority must be an integer")
        except ValueError as error:
            raise self._refuse(error) from None
        pooling, runs = PoolingParams(task=task), []
        for prompt in prompts:
            ids = await self._ids(prompt)
            try:
                gateway.engine.validate(ids, pooling, priority)
            except ValueError as error:
                raise self._refuse(error) from None
            runs.append(ids)
        calls = [gateway.call(ids, pooling, priority) for ids in runs]
        replies = {}
        async for i, output in merged(calls):
            if output.finished:
                replies[i] = {"embedding": output.embedding, "meta_info": {
                    "id": rids[i] or uuid.uuid4().hex, "prompt_tokens": len(runs[i]),
                    "finish_reason": {"type": "length", "length": 0}}}
        ordered = [replies[i] for i in range(len(runs))]
        return web.json_response(ordered if batched else ordered[0])

    async def abort_request(self, request: web.Request) -> web.Response:
        """``{"rid": …}``: the running request with that rid stops; its /generate answer ends
        with ``finish_reason.type`` "abort". 200 either way (SGLang's), ``found`` says which."""
        body = self.api._object(await self.api._body(request), {"rid", "abort_all"})
        if body.get("abort_all") is True:
            return web.json_response({"found": self.gateway.abort_all() > 0})
        rid = body.get("rid")
        if not isinstance(rid, str) or not rid:
            raise self._refuse(ValueError("rid must be a non-empty string (or abort_all: true)"))
        thread = self.gateway.require_engine(admitting=False)
        engine_id = self.gateway.active(rid)
        if engine_id is not None:
            thread.abort(engine_id)
        return web.json_response({"found": engine_id is not None})

    async def flush_cache(self, request: web.Request) -> web.Response:
        thread = self.gateway.require_engine(admitting=False)
        if await thread.reset_prefix_cache():
            return web.Response(text="Cache flushed.")
        return web.Response(status=400, text="Cache not flushed: requests are running or waiting; "
                                             "retry once they finish.")

    async def get_model_info(self, request: web.Request) -> web.Response:
        self.gateway.require_engine(admitting=False)
        lm = self.gateway.engine.lm
        from qwenjax.score_head import ARCHITECTURES

        head = lm.score_head.kind if lm.score_head is not None else None
        architecture = next((a for a, kind in ARCHITECTURES.items() if kind == head), "Qwen2ForCausalLM")
        return web.json_response({
            "model_path": str(lm.source), "tokenizer_path": str(lm.source),
            "is_generation": head is None, "served_model_name": self.api._names()[0],
            "model_type": "qwen2", "architectures": [architecture], "weight_version": "default",
            "has_image_understanding": False, "has_audio_understanding": False})

    async def get_server_info(self, request: web.Request) -> web.Response:
        self.gateway.require_engine(admitting=False)
        engine, engines = self.gateway.engine, self.gateway.engines
        config, mesh = engine.config, dict(engine.lm.mesh.shape)
        speculative = SpeculativeConfig.parse(config.speculative_config)
        return web.json_response({
            "version": qwenjax.__version__, "model_path": str(engine.lm.source),
            "served_model_name": self.api._names()[0], "dtype": str(engine.lm.dtype),
            "quantization": engine.lm.quantization,
            "tp_size": mesh.get("tp", 1), "pp_size": mesh.get("pp", 1), "dp_size": len(engines),
            "context_length": engine.max_model_len, "page_size": config.page_size,
            "max_total_num_tokens": engine.allocator.num_pages * config.page_size,
            "max_running_requests": config.max_num_seqs,
            "chunked_prefill_size": config.max_num_batched_tokens,
            "kv_cache_dtype": config.kv_cache_dtype,
            "disable_radix_cache": not config.enable_prefix_caching,
            "schedule_policy": config.scheduling_policy,
            "speculative_algorithm": speculative.method if speculative is not None else None,
            "speculative_num_draft_tokens":
                speculative.num_speculative_tokens if speculative is not None else None,
            "internal_states": [{"num_running_requests": len(e.scheduler.running),
                                 "num_waiting_requests": len(e.scheduler.waiting)} for e in engines],
        })

    async def get_load(self, request: web.Request) -> web.Response:
        """SGLang's load probe (what its router balances on), one entry per data-parallel
        replica: ``num_reqs`` running and waiting, ``num_waiting_reqs``, ``num_tokens`` the KV
        token slots in use plus the tokens the waiting requests still have to prefill
        (``num_pending_tokens``), ``ts_tic`` a monotonic time in seconds."""
        self.gateway.require_engine(admitting=False)
        loads, now = [], time.perf_counter()
        for rank, engine in enumerate(self.gateway.engines):
            # A snapshot (one C-level copy) of the engine thread's queues.
            running, waiting = len(engine.scheduler.running), tuple(engine.scheduler.waiting)
            pending = sum(r.num_pending for r in waiting)
            used = engine.allocator.num_used * engine.config.page_size
            loads.append({"dp_rank": rank, "num_reqs": running + len(waiting),
                          "num_waiting_reqs": len(waiting), "num_tokens": used + pending,
                          "num_pending_tokens": pending, "ts_tic": now})
        return web.json_response(loads)

    async def health_generate(self, request: web.Request) -> web.Response:
        """200 once a one-token request has been generated; 503 if the engine is down, the
        request fails, or no token comes within HEALTH_TIMEOUT_S."""
        gateway = self.gateway
        try:
            gateway.require_engine(generate=True)
            params = gateway.engine.sampling_params({"max_tokens": 1, "temperature": 0.0,
                                                     "ignore_eos": True}, 1)
            call = gateway.call([0], params, counted=False)

            async def one():
                async for _, _output in merged([call]):
                    pass

            await asyncio.wait_for(one(), HEALTH_TIMEOUT_S)
        except (Refused, asyncio.TimeoutError):
            return web.Response(status=503)
        return web.Response(status=200)
