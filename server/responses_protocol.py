"""OpenAI's Responses API (``POST /v1/responses``) as a chat completion: pure translation.

A Responses request is rewritten into the chat-completions body it means (``input`` items →
messages, ``instructions`` → a system message, ``max_output_tokens`` → max_tokens,
``text.format`` → response_format, flat function tools → chat tools), which
``openai_protocol.parse_chat`` then checks like any chat request. The reply is built back in
the Responses shape: ``output`` items (an assistant message with ``output_text``, function
calls), ``status``/``incomplete_details``, ``usage`` with input/output tokens, and the
streaming events ``response.created`` … ``response.completed``.

Responses are stored (``store``, default true, as OpenAI's) in a bounded in-memory
``ResponseStore``: ``GET /v1/responses/{id}`` returns one, and ``previous_response_id``
continues its conversation (its input and output, not its instructions, as OpenAI does).
Not here: built-in tools (web/file search, computer use), reasoning items, images and files
(the model reads text).
"""
from __future__ import annotations

import itertools
import json
from typing import Any, AsyncIterator, Mapping, Sequence

from server import openai_protocol as proto

# Responses fields → what they become; the rest of a request is refused by name.
_OWN = frozenset(("model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
                  "stream", "tools", "tool_choice", "text", "parallel_tool_calls", "store",
                  "metadata", "user", "previous_response_id", "reasoning", "truncation",
                  "top_logprobs", "include", "background", "service_tier", "stream_options"))
# vLLM's extra sampling fields, passed to the chat request unchanged.
_PASSED = ("top_k", "min_p", "repetition_penalty", "seed", "stop", "priority", "cache_salt",
           "request_id", "presence_penalty", "frequency_penalty", "min_tokens", "ignore_eos",
           "stop_token_ids", "structured_outputs", "logit_bias", "chat_template_kwargs")
FIELDS = _OWN | frozenset(_PASSED)
_TEXT_PARTS = ("input_text", "output_text", "text")


def to_chat_body(body: Any, history: list[dict] | None = None) -> dict[str, Any]:
    """The chat-completions body a Responses request means (ValueError names a bad field).
    ``history``: the conversation of ``previous_response_id``, before this request's input."""
    if not isinstance(body, Mapping):
        raise ValueError("the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) for /v1/responses: {', '.join(unknown)}")
    for name in ("previous_response_id", "store"):
        kind = str if name == "previous_response_id" else bool
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise ValueError(f"{name} must be a {kind.__name__}")
    if body.get("background") is not None and not isinstance(body["background"], bool):
        raise ValueError("background must be a bool")
    if body.get("background"):
        if body.get("store") is False:
            raise ValueError("background responses must be stored: leave store true")
        if body.get("stream"):
            raise ValueError("background responses do not stream here: poll GET "
                             "/v1/responses/{id} instead")
    reasoning = body.get("reasoning")
    if reasoning not in (None, {}) and not (isinstance(reasoning, Mapping)
                                            and reasoning.get("effort") in (None, "none")):
        raise ValueError("reasoning is not supported: Qwen2.5 does not reason in a separate channel")
    if body.get("truncation") not in (None, "disabled"):
        raise ValueError(f'truncation must be "disabled" (prompts are never cut silently), '
                         f'got {json.dumps(body.get("truncation"))}')
    chat: dict[str, Any] = {k: body[k] for k in _PASSED if k in body}
    for name in ("model", "temperature", "top_p", "stream", "user", "metadata",
                 "parallel_tool_calls", "stream_options"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ValueError("instructions must be a string")
        messages.append({"role": "system", "content": instructions})
    messages += [dict(m) for m in history or ()] + _input_messages(body.get("input"))
    chat["messages"] = messages
    if body.get("top_logprobs") is not None:
        chat["logprobs"] = True
        chat["top_logprobs"] = body["top_logprobs"]
    text = body.get("text")
    if text is not None:
        if not isinstance(text, Mapping) or not isinstance(text.get("format", {}), Mapping):
            raise ValueError('text must be an object {"format": {"type": ...}}')
        fmt = dict(text.get("format") or {"type": "text"})
        if fmt.get("type") == "json_schema":
            fmt = {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"),
                                                          "schema": fmt.get("schema")}}
        chat["response_format"] = fmt
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if "n" in chat:
        raise ValueError("the Responses API makes one output (no n)")
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise ValueError('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "name": ...}')
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        chat["tool_choice"] = choice
    return chat


def _input_messages(items: Any) -> list[dict]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ValueError("input must be a string or a non-empty list of input items")
    messages: list[dict] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"input[{i}] must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ValueError(f"input[{i}].role must be user, system, developer or assistant, "
                                 f"got {json.dumps(role)}")
            messages.append({"role": role, "content": _text(item.get("content"), f"input[{i}]")})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise ValueError(f"input[{i}].{key} must be a string")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "reasoning":
            continue  # a reply's reasoning, sent back: reasoning models are not shown their own
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
                raise ValueError(f"input[{i}] (function_call_output) needs call_id and output strings")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        else:
            raise ValueError(f"input[{i}] is a {kind!r} item; this server reads message, "
                             "function_call, function_call_output and reasoning items")
    return messages


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{j}] is a {kind!r} part; this model reads text only "
                             '({"type": "input_text", "text": ...})')
        texts.append(part["text"])
    return "\n".join(texts)


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            raise ValueError(f"tools[{i}] is a {kind!r} tool; only function tools are supported")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": function})
    return out


# --------------------------------------------------------------------------- responses
def function_call_item(call_json: Mapping[str, Any]) -> dict[str, Any]:
    """A chat tool call (``openai_protocol.tool_call_json``) as a Responses output item."""
    return {"type": "function_call", "id": "fc_" + call_json["id"].removeprefix("call_"),
            "call_id": call_json["id"], "name": call_json["function"]["name"],
            "arguments": call_json["function"]["arguments"], "status": "completed"}


def message_item(item_id: str, text: str, logprobs: list | None, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [text_part(text, logprobs)] if status == "completed" else []}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict:
    """A reply's reasoning (a reasoning parser's), as the Responses API carries raw reasoning."""
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if status == "completed" else []}


def text_part(text: str, logprobs: list | None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


def response_object(response_id: str, created: int, model: str, body: Mapping[str, Any], *,
                    status: str, output: list[dict], usage_json: dict | None = None,
                    finish_reason: str | None = None) -> dict[str, Any]:
    """The ``response`` object, echoing the request's settings as OpenAI does."""
    incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
    if incomplete is not None and status == "completed":
        status = "incomplete"
    text = body.get("text") or {"format": {"type": "text"}}
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status,
        "model": model, "output": output, "error": None, "incomplete_details": incomplete,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": body.get("parallel_tool_calls", True), "text": text,
        "metadata": body.get("metadata") or {},
        "previous_response_id": body.get("previous_response_id"), "reasoning": None,
        "store": body.get("store") is not False, "background": bool(body.get("background")),
        "truncation": "disabled", "user": body.get("user"),
        "usage": usage_json,
    }


def chat_logprobs_to_responses(entries: Mapping[str, Any] | None) -> list:
    """Chat's ``logprobs.content`` entries are the Responses shape already (token, logprob,
    bytes, top_logprobs)."""
    return list((entries or {}).get("content") or [])


def tool_calls_from(message: Mapping[str, Any]) -> list[dict]:
    return [function_call_item(c) for c in message.get("tool_calls") or ()]



class ResponseBuilder:
    """One response's JSON (``collect``) or its stream of events (``events``), from the
    engine's outputs of the chat request it ran as."""

    def __init__(self, response_id: str, model: str, body: Mapping[str, Any],
                 parsed: proto.ParsedRequest, prompt_tokens: int, token_text: proto.TokenText):
        self.id, self.model, self.body, self.parsed = response_id, model, body, parsed
        self.prompt_tokens, self.token_text = prompt_tokens, token_text
        self.created = proto.now()
        self.message_id = "msg_" + response_id.removeprefix("resp-").removeprefix("resp_")
        self.reasoning_id = "rs_" + self.message_id.removeprefix("msg_")
        self.result: dict[str, Any] | None = None  # the finished response

    def _logprobs(self, entries) -> list:
        if not self.parsed.chat_logprobs or not entries:
            return []
        return chat_logprobs_to_responses(proto.chat_logprobs(entries, self.token_text))

    def _object(self, status: str, output: list[dict], finished=None) -> dict[str, Any]:
        return response_object(
            self.id, self.created, self.model, self.body, status=status, output=output,
            usage_json=None if finished is None else usage(
                self.prompt_tokens, len(finished.token_ids), finished.num_cached_tokens),
            finish_reason=None if finished is None else finished.finish_reason)

    def pending(self, status: str) -> dict[str, Any]:
        """The response before it finishes: "queued", "in_progress", "cancelled" (no output)."""
        return self._object(status, [])

    def final(self, output, text: str | None = None, logprobs: list | None = None,
              streamed: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """The finished response. ``text``/``logprobs``: what a stream sent as the message (the
        same text the non-streamed reply would hold); ``streamed``: the function calls it sent
        as they were written (the first calls, with their ids and arguments as sent)."""
        message, _ = proto.chat_message(output.text, self.parsed)
        items = tool_calls_from(message)
        kept = min(len(streamed), len(items))  # a call the model broke off is not one
        items[:kept] = [dict(item) for item in streamed[:kept]]
        if text is None:
            text, logprobs = message["content"], self._logprobs(output.logprobs or ())
        if text or not items:
            items.insert(0, message_item(self.message_id, text or "", logprobs))
        if message.get("reasoning"):
            items.insert(0, reasoning_item(self.reasoning_id, message["reasoning"]))

        return self._object("completed", items, output)

    async def collect(self, outputs: AsyncIterator) -> dict[str, Any]:
        last = None
        async for output in outputs:
            if output.finish_reason is not None:
                last = output
        self.result = self.final(last)
        return self.result

    async def events(self, outputs: AsyncIterator) -> AsyncIterator[dict[str, Any]]:
        """response.created, in_progress, the message's item/part/text deltas (content before
        any tool call), each function call as the model writes it (its item, then its
        arguments in pieces), completed."""
        sequence = iter(range(1 << 62))

        def event(kind: str, **fields) -> dict:
            return {"type": kind, "sequence_number": next(sequence), **fields}

        start = self.pending("in_progress")
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        stream = proto.ChatStream(self.parsed, stream_calls=True)
        # The reasoning item (with a reasoning parser, when the reply has any) comes first.
        thought = dict(item_id=self.reasoning_id, output_index=0, content_index=0)
        reasoning, thinking = "", None  # None: no reasoning item; True: open; False: done
        where = dict(item_id=self.message_id, output_index=0, content_index=0)
        text, sent_logprobs, opened, closed = "", [], False, False  # the message item
        streamed: list[dict] = []  # function_call items sent as they were written
        items = 0  # output items added so far
        call_index = None  # the output index of the call being streamed

        def think(delta: str):
            nonlocal reasoning, thinking, items
            if thinking is None:
                thinking, items = True, items + 1
                yield event("response.output_item.added", output_index=0,
                            item=reasoning_item(self.reasoning_id, "", status="in_progress"))
            reasoning += delta
            yield event("response.reasoning_text.delta", **thought, delta=delta)

        def end_thinking():
            nonlocal thinking
            if thinking:
                thinking = False
                yield event("response.reasoning_text.done", **thought, text=reasoning)
                yield event("response.output_item.done", output_index=0,
                            item=reasoning_item(self.reasoning_id, reasoning))

        def deltas(content: str, logprobs: list):
            nonlocal opened, text, items
            if not opened:
                opened = True
                yield from end_thinking()
                where["output_index"], items = items, items + 1
                yield event("response.output_item.added", output_index=where["output_index"],
                            item=message_item(self.message_id, "", None, status="in_progress"))
                yield event("response.content_part.added", **where, part=text_part("", None))
            text += content
            sent_logprobs.extend(logprobs)
            yield event("response.output_text.delta", **where, delta=content, logprobs=logprobs)

        def close_message():
            nonlocal closed
            if opened and not closed:
                closed = True
                message = message_item(self.message_id, text, sent_logprobs)
                yield event("response.output_text.done", **where, text=text, logprobs=sent_logprobs)
                yield event("response.content_part.done", **where, part=message["content"][0])
                yield event("response.output_item.done", output_index=where["output_index"], item=message)

        def close_call():
            nonlocal call_index
            if call_index is not None:
                item = streamed[-1]
                item["status"] = "completed"
                yield event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=call_index, arguments=item["arguments"])
                yield event("response.output_item.done", output_index=call_index, item=dict(item))
                call_index = None

        def calls():
            nonlocal items, call_index
            for _, call, piece in stream.call_pieces():
                if call is not None:
                    yield from close_call()
                    yield from end_thinking()
                    yield from close_message()
                    item = function_call_item(proto.tool_call_json(call))
                    streamed.append({**item, "status": "in_progress"})
                    yield event("response.output_item.added", output_index=items,
                                item={**item, "status": "in_progress"})
                    call_index, items = items, items + 1
                else:
                    streamed[-1]["arguments"] += piece
                    yield event("response.function_call_arguments.delta", item_id=streamed[-1]["id"],
                                output_index=call_index, delta=piece)

        async for output in outputs:
            thinking_delta, content = stream.feed(output.delta_text)
            if thinking_delta:
                for e in think(thinking_delta):
                    yield e
            if content:
                for e in deltas(content, self._logprobs(output.delta_logprobs)):
                    yield e
            for e in calls():
                yield e
            if output.finish_reason is None:
                continue
            thinking_delta, rest, parsed_calls = stream.finish()
            if thinking_delta:
                for e in think(thinking_delta):
                    yield e
            if rest or (not opened and not parsed_calls and not streamed):  # an empty reply is an empty message
                for e in deltas(rest, []):
                    yield e
            for e in itertools.chain(calls(), close_call(), end_thinking(), close_message()):
                yield e
            done = self.result = self.final(output, text, sent_logprobs, streamed)
            for index, item in enumerate(done["output"]):
                if item["type"] != "function_call" or index < items:
                    continue  # sent already
                yield event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"})
                yield event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=index, delta=item["arguments"])
                yield event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=index, arguments=item["arguments"])
                yield event("response.output_item.done", output_index=index, item=item)
            yield event("response.completed" if done["status"] == "completed"
                        else "response.incomplete", response=done)


def input_messages(body: Mapping[str, Any]) -> list[dict]:
    """This request's own input as chat messages (what a stored conversation keeps of it)."""
    return _input_messages(body.get("input"))


def output_messages(response: Mapping[str, Any]) -> list[dict]:
    """A finished response's output items as the chat messages that continue a conversation."""
    text = "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in response["output"] if item["type"] == "function_call"]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return [message]


class ResponseStore:
    """Finished responses and their conversations, least recently used dropped first.

    In memory and per server process (as vLLM's): a restart forgets them, and a client that
    needs more than ``capacity`` of them kept sends the conversation in ``input`` instead."""

    def __init__(self, capacity: int = 1024):
        import collections

        self.capacity = capacity
        self._entries: collections.OrderedDict[str, tuple[dict, list[dict]]] = collections.OrderedDict()

    def put(self, response: dict[str, Any], conversation: list[dict] | None) -> None:
        """Keep ``response``; ``conversation`` (None while it runs, or when it was cancelled or
        failed) is what a response continuing it starts from."""
        self._entries[response["id"]] = (response, conversation)
        self._entries.move_to_end(response["id"])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict] | None] | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def __len__(self) -> int:
        return len(self._entries)
