"""The ``qwenjax.v1.Inference`` servicer: requests → status codes, streaming.

Admission, request ids, the in-flight count and metrics live in the server's ``Gateway``
(``server.gateway``), shared with the OpenAI-compatible HTTP API. Everything here runs on
the server's asyncio loop; the engine runs on its own thread (``EngineThread``) and answers
through per-request asyncio queues.

A request leaves the engine in one of three ways, and each frees its pages:
it finishes; the client cancels or its deadline passes (grpc.aio cancels this
handler, which closes the engine stream, which sends ``abort`` to the engine
thread); or an ``Abort`` call names it. A done-callback on the RPC sends the
abort as well, so no path depends on generator finalisation alone.
"""
from __future__ import annotations

import contextlib
import pathlib

import grpc

from qwenjax.tool_calls import constraint_source, tool_choice_constraint
from qwenjax_proto.v1 import inference_pb2 as pb
from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc
from server import convert
from server.gateway import Gateway, Refused, merged


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway, max_request_bytes: int,
                 served_model_names: tuple[str, ...] = (), allow_runtime_lora_updating: bool = False,
                 reasoning_parser: str | None = None):
        self.gateway = gateway
        self.reasoning_parser = reasoning_parser  # qwenjax.reasoning: chat replies split
        self.max_request_bytes = max_request_bytes
        self.served_model_names = served_model_names
        self.allow_runtime_lora_updating = allow_runtime_lora_updating

    # ---- shared checks -----------------------------------------------------------------------
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
        suffix = getattr(request, "suffix", "")  # GenerateRequest's; TokenizeRequest has none
        if suffix:
            if which == "messages":
                raise ValueError("suffix (fill in the middle) needs the text or token_ids input")
            tokenizer = self.gateway.engine.tokenizer
            if tokenizer is None:
                raise ValueError("suffix needs the model's tokenizer")
            prefix = list(request.token_ids.ids) if which == "token_ids" else request.text
            return tokenizer.encode_fill_in_the_middle(prefix, suffix)
        if which == "token_ids":
            return list(request.token_ids.ids)
        if which == "text":
            return await self.gateway.encode(text=request.text)
        continuing = request.continue_final_message
        return await self.gateway.encode(messages=convert.messages_to_dicts(request.messages),
                                         tools=tools, add_generation_prompt=not continuing,
                                         continue_final_message=continuing)

    # ---- RPCs ----------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):
        gateway = self.gateway
        try:
            gateway.require_engine(generate=True)
            try:
                self._check_request(request, "GenerateRequest")
                fields = convert.sampling_fields(request.sampling)
                tools = convert.tools_to_dicts(request.tools) or None
                parallel = (not request.HasField("parallel_tool_calls")
                            or request.parallel_tool_calls)
                constraint = tool_choice_constraint(tools, request.tool_choice or None, parallel)
                if constraint is not None:
                    if "structured_outputs" in fields:
                        raise ValueError(f"{constraint_source(request.tool_choice)} constrains "
                                         "the output itself; leave structured_outputs unset")
                    fields["structured_outputs"] = constraint
                prompt_ids, params = gateway.prepare(fields, await self._encode(request, tools),
                                                     request.priority)
            except ValueError as error:
                raise gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
            call = gateway.call(prompt_ids, params, request.priority, request.request_id,
                                lora=request.lora or None)
            context.add_done_callback(lambda _: call.abort())
            async with contextlib.aclosing(call.outputs()) as outputs:
                async for output in outputs:
                    chunk = convert.chunk_response(output)
                    if chunk is not None:
                        yield chunk
                    if output.finish_reason is not None:  # one Complete per sequence
                        yield convert.complete_response(
                            output, call.ttft_s, call.elapsed_s,
                            tools if request.tool_choice != "none" else None,
                            self.reasoning_parser if request.WhichOneof("input") == "messages" else None,
                            request.tool_choice, parallel)
        except Refused as refused:
            await context.abort(refused.code, refused.message)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        try:
            engine_thread = self.gateway.require_engine(admitting=False)
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        engine_id = self.gateway.active(request.request_id) if request.request_id else None
        if engine_id is not None:
            engine_thread.abort(engine_id)
        return pb.AbortResponse(found=engine_id is not None)

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        """Each input's embedding (qwenjax/pooling.py), the inputs run as concurrent requests;
        the first failure cancels the others."""
        from qwenjax.pooling import PoolingParams

        gateway = self.gateway
        try:
            gateway.require_engine(generate=True)
            try:
                self._check_request(request, "EmbedRequest")
                if not request.inputs:
                    raise ValueError("inputs is empty: give at least one text or token_ids input")
                pooling = PoolingParams(normalize=False if request.raw else None,
                                        dimensions=request.dimensions or None,
                                        task=request.task or "embed")
                per_token = pooling.per_token(gateway.engine.head_kind)
                runs = []
                for i, item in enumerate(request.inputs):
                    which = item.WhichOneof("input")
                    if which is None:
                        raise ValueError(f"inputs[{i}] has neither text nor token_ids")
                    ids = (list(item.token_ids.ids) if which == "token_ids"
                           else await gateway.encode(text=item.text))
                    gateway.engine.validate(ids, pooling, request.priority)
                    runs.append(ids)
            except ValueError as error:
                raise gateway.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
            calls = [gateway.call(ids, pooling, request.priority, lora=request.lora or None)
                     for ids in runs]
            vectors = {}
            async for i, output in merged(calls):
                if output.finished:
                    vectors[i] = output.embedding
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        if per_token:
            return pb.EmbedResponse(embeddings=[
                pb.Embedding(tokens=[pb.FloatList(values=row) for row in vectors[i]],
                             prompt_tokens=len(ids)) for i, ids in enumerate(runs)])
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=vectors[i], prompt_tokens=len(ids))
                                            for i, ids in enumerate(runs)])

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            self.gateway.require_engine()
            try:
                self._check_request(request, "TokenizeRequest")
                ids = await self._encode(request, convert.tools_to_dicts(request.tools) or None)
            except ValueError as error:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        return pb.TokenizeResponse(ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        try:
            self.gateway.require_engine()
            engine = self.gateway.engine
            try:
                self._check_request(request, "DetokenizeRequest")
                if engine.tokenizer is None:
                    raise ValueError("this model has no tokenizer (random-weight preset)")
                convert.check_token_ids(request.ids, engine.lm.config.vocab_size, "ids")
            except ValueError as error:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        text = engine.tokenizer.decode(list(request.ids), skip_special_tokens=request.skip_special_tokens)
        return pb.DetokenizeResponse(text=text)

    async def LoadLoRAAdapter(self, request: pb.LoadLoRAAdapterRequest,
                              context) -> pb.LoadLoRAAdapterResponse:
        try:
            self._check_lora_updating()
            served = self.served_model_names or (model_name(self.gateway.engine.lm.source),)
            await self.gateway.add_lora(request.lora_name, request.lora_path, served)
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        return pb.LoadLoRAAdapterResponse(lora_adapters=list(self.gateway.engine.lora_names))

    async def UnloadLoRAAdapter(self, request: pb.UnloadLoRAAdapterRequest,
                                context) -> pb.UnloadLoRAAdapterResponse:
        try:
            self._check_lora_updating()
            await self.gateway.remove_lora(request.lora_name)
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        return pb.UnloadLoRAAdapterResponse(lora_adapters=list(self.gateway.engine.lora_names))

    def _check_lora_updating(self) -> None:
        self.gateway.require_engine(admitting=False)
        if not self.allow_runtime_lora_updating:
            raise self.gateway.refuse(grpc.StatusCode.PERMISSION_DENIED,
                                      "loading adapters while serving is off; start the server "
                                      "with --allow-runtime-lora-updating")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        try:
            self.gateway.require_engine()
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        return model_info(self.gateway.engine, self.served_model_names)


def model_name(source: str) -> str:
    path = pathlib.Path(source)
    return path.name if path.is_dir() or path.suffix == ".gguf" else source


def model_info(engine, served_model_names: tuple[str, ...] = ()) -> pb.ModelInfo:
    lm, c, sc = engine.lm, engine.lm.config, engine.scheduler_config
    return pb.ModelInfo(
        model=served_model_names[0] if served_model_names else model_name(lm.source), vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim, mesh_shape={str(k): int(v) for k, v in lm.mesh.shape.items()},
        dtype=str(lm.dtype), quantization=lm.quantization or "",
        kv_cache_dtype=engine.runner.kv_cache_dtype, lora_adapters=list(engine.lora_names),
        max_context=engine.max_model_len, page_size=sc.page_size,
        kv_capacity_tokens=engine.allocator.num_pages * sc.page_size, max_num_seqs=sc.max_num_seqs,
        sampling_defaults={k: float(v) for k, v in engine.sampling_defaults.items()})
