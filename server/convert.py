"""Wire messages ↔ engine objects. Pure functions: no gRPC context, no event loop.

Every rejection is a ``ValueError`` whose message names the field and the limit;
the servicer turns it into ``INVALID_ARGUMENT`` unchanged.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from google.protobuf import unknown_fields

from qwenjax.engine.request import RequestOutput
from qwenjax.reasoning import split_reasoning
from qwenjax.structured import StructuredOutputs
from qwenjax.tool_calls import model_chose_to_call, parse_tool_calls
from qwenjax_proto.v1 import inference_pb2 as pb

# Proto field name → SamplingParams field; the names are the same on purpose.
_SCALAR_SAMPLING_FIELDS = (
    "n", "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "ignore_eos", "logprobs", "skip_special_tokens",
    "include_stop_str_in_output", "prompt_logprobs", "truncate_prompt_tokens", "cache_salt",
    "thinking_token_budget",
)


def find_unknown_field(message, path: str) -> str | None:
    """Where ``message`` (or a message inside it) carries a field this server's schema lacks.

    A client built from a newer .proto may set a sampling option this server would silently
    ignore, producing output the client did not ask for; refusing is the safer answer.
    """
    unknown = unknown_fields.UnknownFieldSet(message)
    if len(unknown):
        return (f"{path} has field number {unknown[0].field_number}, which this server's "
                f"qwenjax.v1 schema does not define (client built from a newer .proto?)")
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        items = enumerate(value) if field.is_repeated else [(None, value)]
        for index, item in items:
            where = f"{path}.{field.name}" + (f"[{index}]" if index is not None else "")
            found = find_unknown_field(item, where)
            if found:
                return found
    return None


def sampling_fields(wire: pb.SamplingParams) -> dict[str, Any]:
    """The fields the request set (proto3 ``optional``: set to 0 is still set). The engine fills
    in the rest from the model's defaults (``Engine.sampling_params``)."""
    fields = {name: getattr(wire, name) for name in _SCALAR_SAMPLING_FIELDS if wire.HasField(name)}
    if wire.stop:
        fields["stop"] = tuple(wire.stop)
    if wire.stop_regex:
        fields["stop_regex"] = tuple(wire.stop_regex)
    if wire.bad_words:
        fields["bad_words"] = tuple(wire.bad_words)
    if wire.stop_token_ids:
        fields["stop_token_ids"] = tuple(wire.stop_token_ids)
    if wire.logit_bias:
        fields["logit_bias"] = dict(wire.logit_bias)
    if wire.allowed_token_ids:
        fields["allowed_token_ids"] = tuple(wire.allowed_token_ids)
    if wire.HasField("structured_outputs"):
        fields["structured_outputs"] = structured_outputs(wire.structured_outputs)
    return fields


def structured_outputs(wire: pb.StructuredOutputs) -> StructuredOutputs:
    kind = wire.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_outputs must set one of json, regex, choice, grammar, json_object, "
                         "structural_tag")
    value = getattr(wire, kind)
    return StructuredOutputs(**{kind: list(value.choices) if kind == "choice" else value})


def messages_to_dicts(wire: pb.Messages) -> list[dict]:
    messages = []
    for m in wire.messages:
        message = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in m.tool_calls]
        messages.append(message)
    return messages


def tools_to_dicts(wire: Sequence[pb.Tool]) -> list[dict]:
    """OpenAI-style tool definitions; a parameters field that is not a JSON object is refused."""
    tools = []
    for i, tool in enumerate(wire):
        function = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters:
            try:
                function["parameters"] = json.loads(tool.parameters)
            except json.JSONDecodeError as error:
                raise ValueError(f"tools[{i}].parameters is not JSON: {error}") from None
        if tool.strict:
            function["strict"] = True
        tools.append({"type": "function", "function": function})
    return tools


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> None:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"{field}[{i}] is {t}; token ids must be in [0, {vocab_size})")


def chunk_response(output: RequestOutput) -> pb.GenerateResponse | None:
    """The new tokens and text of one engine output, or None when it brought neither."""
    if not output.delta_token_ids and not output.delta_text:
        return None
    chunk = pb.Chunk(token_ids=output.delta_token_ids, text=output.delta_text, index=output.index)
    chunk.logprobs.extend(_token_logprob(lp) for lp in output.delta_logprobs or ())
    first = len(output.token_ids) == len(output.delta_token_ids)
    if first and output.prompt_logprobs is not None:
        chunk.prompt_logprobs.extend(_token_logprob(lp) for lp in output.prompt_logprobs[1:])
    return pb.GenerateResponse(chunk=chunk)


def _token_logprob(lp) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def complete_response(output: RequestOutput, ttft_s: float | None, e2e_s: float,
                      tools: Sequence[dict] | None = None,
                      reasoning_parser: str | None = None,
                      tool_choice: str = "auto", parallel: bool = True) -> pb.GenerateResponse:
    """``tools``: the tools the request offered, whose calls are parsed from the reply (None:
    none offered, or tool_choice "none"). ``reasoning_parser``: split the reply's reasoning
    off first (qwenjax.reasoning); calls are parsed from the content after it; ``tool_choice``
    decides their finish reason (qwenjax.tool_calls.model_chose_to_call); ``parallel`` false
    keeps the first call."""
    complete = pb.Complete(
        index=output.index, finish_reason=output.finish_reason or "",
        usage=pb.Usage(prompt_tokens=len(output.prompt_token_ids),
                       completion_tokens=len(output.token_ids),
                       cached_tokens=output.num_cached_tokens),
        timing=pb.Timing(ttft_ms=1000.0 * ttft_s if ttft_s is not None else 0.0,
                         e2e_ms=1000.0 * e2e_s))
    # The engine reports a stop string as str and a stop token (EOS or stop_token_ids) as int.
    if isinstance(output.matched_stop, str):
        complete.matched_stop = output.matched_stop
    elif output.matched_stop is not None:
        complete.matched_stop_token_id = int(output.matched_stop)
    text = output.text
    if reasoning_parser is not None:
        reasoning, text = split_reasoning(text)
        complete.reasoning, complete.content = reasoning or "", text or ""
        text = text or ""
    if tools and output.finish_reason == "stop":
        content, calls = parse_tool_calls(text, tools, parallel)
        if calls:
            if model_chose_to_call(tool_choice):
                complete.finish_reason = "tool_calls"
            complete.content = content
            complete.tool_calls.extend(pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                                       for c in calls)
    return pb.GenerateResponse(complete=complete)
