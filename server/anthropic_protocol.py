"""Anthropic's Messages API (``POST /v1/messages``, as vLLM serves it) as a chat completion:
pure translation, as the Responses API's (server/responses_protocol.py).

A Messages request becomes the chat-completions body it means: ``system`` → a system
message, content blocks → messages (``text`` joined, an assistant's ``tool_use`` blocks →
``tool_calls``, a user's ``tool_result`` blocks → ``tool`` messages), ``tools``
(``input_schema``) → function tools, ``tool_choice`` auto/any/tool/none → auto/required/the
named function/none (``disable_parallel_tool_use`` → ``parallel_tool_calls`` false),
``stop_sequences`` → stop. The reply is built back as a message of
content blocks (``thinking`` with a reasoning parser, ``text``, ``tool_use``), ``stop_reason``
end_turn / max_tokens / stop_sequence / tool_use, ``usage`` in input/output tokens, and the
stream's events ``message_start`` … ``message_stop``. ``thinking`` enabled, on a server with a
reasoning parser, caps the reasoning at its ``budget_tokens`` (vLLM's thinking_token_budget).
Images and documents are refused (the model reads text), as are Anthropic's server-side tools.
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Mapping

from server import openai_protocol as proto

_OWN = frozenset(("model", "max_tokens", "messages", "system", "stop_sequences", "temperature",
                  "top_p", "top_k", "stream", "tools", "tool_choice", "metadata", "thinking",
                  "service_tier"))
# vLLM's extra sampling fields, passed to the chat request unchanged.
_PASSED = ("min_p", "repetition_penalty", "seed", "priority", "presence_penalty",
           "frequency_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "chat_template_kwargs")
FIELDS = _OWN | frozenset(_PASSED)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def to_chat_body(body: Any, reasoning: bool = False) -> dict[str, Any]:
    """The chat-completions body a Messages request means (ValueError names a bad field).
    ``reasoning``: the server splits a reasoning model's thinking off (--reasoning-parser), so
    ``thinking`` enabled is taken: its ``budget_tokens`` is vLLM's thinking_token_budget."""
    if not isinstance(body, Mapping):
        raise ValueError("the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) for /v1/messages: {', '.join(unknown)}")
    if body.get("max_tokens") is None:
        raise ValueError("max_tokens is required")
    chat: dict[str, Any] = {k: body[k] for k in _PASSED if k in body}
    thinking = body.get("thinking")
    kind = thinking.get("type") if isinstance(thinking, Mapping) else None
    if thinking is not None and kind not in ("enabled", "disabled"):
        raise ValueError(f'thinking.type must be "enabled" or "disabled", got {kind!r}')
    if kind == "enabled":
        if not reasoning:
            raise ValueError("thinking is not supported: serve a reasoning model with "
                             "--reasoning-parser, whose reasoning comes back as thinking blocks")
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"thinking.budget_tokens must be a positive integer, got {budget!r}")
        chat["thinking_token_budget"] = budget
    for name in ("model", "max_tokens", "temperature", "top_p", "top_k", "stream"):
        if body.get(name) is not None:
            chat[name] = body[name]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop_sequences must be a list of strings")
        chat["stop"] = stops
    messages = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _text(system, "system")})
    messages += _messages(body.get("messages"))
    chat["messages"] = messages
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
        if body["tool_choice"].get("disable_parallel_tool_use") is True:
            chat["parallel_tool_calls"] = False
    return chat


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, Mapping) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    raise ValueError(f"{where} must be a string or a list of text blocks")


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out: list[dict] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
            raise ValueError(f'{where} must be an object with role "user" or "assistant"')
        role, content = message["role"], message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ValueError(f"{where}.content must be a string or a list of content blocks")
        texts, calls = [], []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, Mapping) else None
            at = f"{where}.content[{j}]"
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), Mapping):
                    raise ValueError(f"{at}: a tool_use block needs a name and an input object")
                calls.append({"id": str(block.get("id", f"toolu_{i}_{j}")), "type": "function",
                              "function": {"name": block["name"],
                                           "arguments": json.dumps(block.get("input", {}))}})
            elif kind == "tool_result" and role == "user":
                result = block.get("content", "")
                out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                            "content": _text(result, f"{at}.content") if result != "" else ""})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # earlier reasoning is not sent back to the model (as chat templates do)
            elif kind in ("image", "document"):
                raise ValueError(f"{at}: {kind} blocks are not supported (the model reads text)")
            else:
                raise ValueError(f"{at}: a {kind!r} block is not supported in a {role} message")
        if texts or calls:
            entry: dict[str, Any] = {"role": role, "content": "".join(texts) or None}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
    return out


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or not isinstance(tool.get("name"), str):
            raise ValueError(f"tools[{i}] must be an object with a name")
        if tool.get("type") not in (None, "custom"):
            raise ValueError(f"tools[{i}]: server tools ({tool.get('type')}) are not supported; "
                             "give custom tools with an input_schema")
        function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, Mapping) else None
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ValueError('tool_choice must be {"type": "auto"|"any"|"none"} or {"type": "tool", "name": …}')


def _stop(output, called: bool, stops: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished reply."""
    if output.finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    matched = output.matched_stop
    if isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return "end_turn", None


class MessageBuilder:
    """One message's JSON (``collect``) or its events (``events``), from the engine's outputs of
    the chat request it ran as."""

    def __init__(self, message_id: str, model: str, body: Mapping[str, Any],
                 parsed: proto.ParsedRequest, prompt_tokens: int):
        self.id, self.model, self.parsed, self.prompt_tokens = message_id, model, parsed, prompt_tokens
        self.stops = list(body.get("stop_sequences") or ())

    def _usage(self, output_tokens: int, cached: int = 0) -> dict[str, int]:
        return {"input_tokens": self.prompt_tokens, "output_tokens": output_tokens,
                "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}

    def _message(self, content: list, stop_reason=None, stop_sequence=None, usage=None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": usage or self._usage(0)}

    @staticmethod
    def _tool_use(call: Mapping[str, Any]) -> dict[str, Any]:
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            arguments = {}
        return {"type": "tool_use", "id": call["id"], "name": function["name"],
                "input": arguments if isinstance(arguments, dict) else {"value": arguments}}

    def final(self, output) -> dict[str, Any]:
        message, called = proto.chat_message(output.text, self.parsed)
        content = []
        if message.get("reasoning"):
            content.append({"type": "thinking", "thinking": message["reasoning"], "signature": ""})
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        content += [self._tool_use(c) for c in message.get("tool_calls") or ()]
        reason, sequence = _stop(output, called, self.stops)
        return self._message(content, reason, sequence,
                             self._usage(len(output.token_ids), output.num_cached_tokens))

    async def collect(self, outputs: AsyncIterator) -> dict[str, Any]:
        last = None
        async for output in outputs:
            if output.finish_reason is not None:
                last = output
        return self.final(last)

    async def events(self, outputs: AsyncIterator) -> AsyncIterator[dict[str, Any]]:
        """message_start; each block's content_block_start, deltas and stop (thinking, text,
        then each tool_use: its input's JSON as the model writes it, in ``input_json_delta``
        pieces, as chat streaming sends calls); message_delta with the stop reason and usage;
        message_stop."""
        yield {"type": "message_start", "message": self._message([])}
        stream = proto.ChatStream(self.parsed, stream_calls=True)
        index, open_kind = -1, None  # the block being streamed: "thinking", "text", "tool_use" or None

        def switch(kind: str):
            nonlocal index, open_kind
            if open_kind == kind:
                return
            if open_kind is not None:
                yield {"type": "content_block_stop", "index": index}
            index, open_kind = index + 1, kind
            empty = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" \
                else {"type": "text", "text": ""}
            yield {"type": "content_block_start", "index": index, "content_block": empty}

        def delta(kind: str, text: str):
            yield from switch(kind)
            payload = {"type": "thinking_delta", "thinking": text} if kind == "thinking" \
                else {"type": "text_delta", "text": text}
            yield {"type": "content_block_delta", "index": index, "delta": payload}

        async for output in outputs:
            thinking, text = stream.feed(output.delta_text)
            rest, calls = "", []
            if output.finish_reason is not None:
                more, rest, calls = stream.finish()
                thinking += more
            for kind, piece in (("thinking", thinking), ("text", text + rest)):
                if piece:
                    for event in delta(kind, piece):
                        yield event
            for _, call, piece in stream.call_pieces():
                if call is not None:  # a call opens: its own tool_use block
                    if open_kind is not None:
                        yield {"type": "content_block_stop", "index": index}
                    index, open_kind = index + 1, "tool_use"
                    yield {"type": "content_block_start", "index": index, "content_block": {
                        "type": "tool_use", "id": call.id, "name": call.name, "input": {}}}
                else:
                    yield {"type": "content_block_delta", "index": index,
                           "delta": {"type": "input_json_delta", "partial_json": piece}}
            if output.finish_reason is None:
                continue
            if open_kind is not None:
                yield {"type": "content_block_stop", "index": index}
            done = self.final(output)
            # The calls the stream could not follow come whole, after those it streamed.
            streamed = stream.tools.opened
            for block in [b for b in done["content"] if b["type"] == "tool_use"][streamed:]:
                index += 1
                yield {"type": "content_block_start", "index": index,
                       "content_block": {**block, "input": {}}}
                yield {"type": "content_block_delta", "index": index,
                       "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}}
                yield {"type": "content_block_stop", "index": index}
            yield {"type": "message_delta",
                   "delta": {"stop_reason": done["stop_reason"], "stop_sequence": done["stop_sequence"]},
                   "usage": {"output_tokens": done["usage"]["output_tokens"]}}
            yield {"type": "message_stop"}
