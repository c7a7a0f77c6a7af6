"""Tool calling for Qwen2.5 (vLLM's ``hermes`` parser, which Qwen2.5 uses): tools are offered
through the chat template (``Tokenizer.apply_chat_template(..., tools=...)``), and the model
answers with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, parsed here.

``tool_choice`` as in the OpenAI API: "auto" (the model decides), "none" (tools are shown but
no call is parsed), "required" (at least one call) or a tool's name (that call). The last two
are enforced with structured outputs: the output must be a JSON list of calls, or that one call.
``parallel`` false (OpenAI's ``parallel_tool_calls``) allows one call a reply: "required"'s list
holds one call, and a reply with several keeps its first (vLLM's rule). With "auto", a tool
marked ``"strict": true`` (OpenAI's) puts the calls under a structural tag: the reply is free,
but from ``<tool_call>`` on the call names an offered tool and a strict one's arguments follow
its schema.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import regex

from qwenjax.structured import StructuredOutputs

TAG = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
# A call object up to its arguments' value: {"name": "…", "arguments": (the order Qwen writes,
# and the order the tool_choice grammars keep).
_CALL_HEAD = regex.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
# A bare reply's first call (after a ```json fence, a list's bracket), and the next listed one.
_BARE_FIRST = regex.compile(r"\s*(?:```(?:json)?\s*)?(?:\[\s*)?\{")
_NEXT_LISTED = regex.compile(r"\s*\}\s*,\s*\{")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (as the OpenAI API carries it)
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The function of an OpenAI-style tool ({"type": "function", "function": {...}}, or bare)."""
    return tool.get("function", tool)


def tool_names(tools: Sequence[Mapping[str, Any]] | None) -> list[str]:
    return [_function(tool)["name"] for tool in tools or ()]


def _as_call(value: Any, names: Sequence[str]) -> ToolCall | None:
    if not isinstance(value, Mapping) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models send the arguments as JSON text already
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, Mapping):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]] | None, parallel: bool = True
                     ) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a reply to a request that offered ``tools``: the text before the
    first call, and each call to an offered tool (only the first with ``parallel`` false).
    ``<tool_call>`` blocks are read first; a reply that is wholly a JSON call or list of calls
    (small models often drop the tags or fence it as ```json; tool_choice "required" asks for
    a list) counts too. Anything unparsable stays content."""
    content, calls = _parse(text, tools)
    return content, calls if parallel else calls[:1]


def _parse(text: str, tools: Sequence[Mapping[str, Any]] | None) -> tuple[str, list[ToolCall]]:
    names = tool_names(tools)
    if not names:
        return text, []
    calls = []
    for match in _BLOCK.finditer(text):
        try:
            value = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        call = _as_call(value, names)
        if call is not None:
            calls.append(call)
    if calls:
        return text[: text.index("<tool_call>")].strip(), calls
    fenced = _FENCE.fullmatch(text.strip())
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return text, []
    values = value if isinstance(value, list) else [value]
    calls = [_as_call(v, names) for v in values]
    if values and all(c is not None for c in calls):
        return "", calls
    return text, []


class CallScanner:
    """A reply's tool calls as it streams, for streamed tool-call deltas (OpenAI's): a call
    opens once its ``{"name": …, "arguments": `` head and the first character of its
    arguments have come, then its arguments' JSON text follows piece by piece as it arrives.

    ``begin(tagged, at)`` says where the calls are: ``<tool_call>`` blocks from ``at`` on, or a
    bare reply (a call, or a list of calls, fenced or not). A call it cannot follow (a tool not
    offered, its keys in another order, arguments given as a JSON string) stops it there: that
    call and those after it are left to the parse of the whole reply (``parse_tool_calls``,
    which stays the answer); so are calls past the first with ``parallel`` false."""

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None, parallel: bool = True):
        self.names = tool_names(tools)
        self.limit = None if parallel else 1
        self.calls: list[ToolCall] = []  # opened, in order (their arguments as streamed)
        self.tagged: bool | None = None  # None until begin()
        self.stopped = False
        self._pos = 0  # where the next call is looked for
        # The open call's arguments: where the scan is, its bracket depth, inside a string,
        # after a backslash; and how much of them has been handed out.
        self._scan: list | None = None
        self._sent = 0

    def begin(self, tagged: bool, at: int = 0) -> None:
        if self.tagged is None:
            self.tagged, self._pos = tagged, at

    def advance(self, text: str) -> list[tuple[int, ToolCall | None, str]]:
        """What ``text`` (the reply so far, grown since the last call) adds: ``(index, call,
        "")`` for a call that opens, ``(index, None, piece)`` for more of its arguments."""
        out: list[tuple[int, ToolCall | None, str]] = []
        while True:
            if self._scan is not None:
                end = self._arguments_end(text)
                upto = len(text) if end is None else end
                if upto > self._sent:
                    piece = text[self._sent:upto]
                    self._sent = upto
                    call = self.calls[-1]
                    self.calls[-1] = dataclasses.replace(call, arguments=call.arguments + piece)
                    out.append((len(self.calls) - 1, None, piece))
                if end is None:
                    return out
                self._scan, self._pos = None, end
            if self.tagged is None or self.stopped or len(self.calls) == self.limit:
                return out
            start = self._next_call(text)
            if start is None:
                return out
            head = _CALL_HEAD.match(text, start, partial=True) if start >= 0 else None
            if head is not None and (head.partial or head.end() == len(text)):
                return out  # the head, or the arguments' first character, is still coming
            try:
                name = json.loads(f'"{head.group(1)}"') if head is not None else None
            except json.JSONDecodeError:
                name = None
            if name not in self.names or text[head.end()] != "{":
                self.stopped = True
                return out
            self.calls.append(ToolCall(name, ""))
            out.append((len(self.calls) - 1, self.calls[-1], ""))
            self._scan, self._sent = [head.end(), 0, False, False], head.end()

    def _next_call(self, text: str) -> int | None:
        """Where the next call's ``{`` is; None: not known yet; -1: there is none."""
        if self.tagged:
            tag = text.find(TAG, self._pos)
            if tag < 0:
                return None
            start = tag + len(TAG)
            while start < len(text) and text[start].isspace():
                start += 1
        else:
            opening = (_NEXT_LISTED if self.calls else _BARE_FIRST).match(text, self._pos, partial=True)
            if opening is None:
                return -1
            if opening.partial:
                return None
            start = opening.end() - 1
        if start == len(text):
            return None
        return start if text[start] == "{" else -1

    def _arguments_end(self, text: str) -> int | None:
        """Scans the open call's arguments on from where it stopped: their end (past the
        closing brace) once they close, else None."""
        i, depth, quoted, escaped = self._scan
        for i in range(i, len(text)):
            c = text[i]
            if quoted:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    quoted = False
            elif c == '"':
                quoted = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
        self._scan = [len(text), depth, quoted, escaped]
        return None


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = _function(tool)
    return {"type": "object",
            "properties": {"name": {"const": function["name"]},
                           "arguments": dict(function.get("parameters") or {"type": "object"})},
            "required": ["name", "arguments"], "additionalProperties": False}


def _strict_calls(tools: Sequence[Mapping[str, Any]]) -> StructuredOutputs:
    """Qwen2.5's call blocks as a structural tag (triggered by ``<tool_call>``, free text
    around): one structure a tool, a strict tool's arguments held to its parameters' schema,
    another's to any object."""
    structures = []
    for tool in tools:
        function = _function(tool)
        strict = function.get("strict") is True
        structures.append({"begin": f'{TAG}\n{{"name": {json.dumps(function["name"])}, "arguments": ',
                           "schema": dict(function.get("parameters") or {"type": "object"})
                           if strict else {"type": "object"},
                           "end": "}\n</tool_call>"})
    return StructuredOutputs(structural_tag={"structures": structures, "triggers": [TAG]})


def model_chose_to_call(tool_choice: str | None) -> bool:
    """Whether calls parsed from a reply were the model's choice ("auto", "required"; unset is
    "auto"), which ends it with finish_reason "tool_calls"; a named tool's forced call ends with
    "stop", as in OpenAI's API and vLLM's."""
    return (tool_choice or "auto") in ("auto", "required")


def constraint_source(tool_choice: str | None) -> str:
    """What ``tool_choice_constraint``'s constraint comes from (a forced ``tool_choice``, or with
    "auto" a strict tool), for the error that refuses another constraint beside it."""
    choice = tool_choice or "auto"
    return 'a tool marked "strict": true' if choice == "auto" else f"tool_choice {choice!r}"


def tool_choice_constraint(tools: Sequence[Mapping[str, Any]] | None, tool_choice: str | None,
                           parallel: bool = True) -> StructuredOutputs | None:
    """The structured-output constraint ``tool_choice`` needs (None for "none", and for "auto"
    unless a tool is strict; a list of one call for "required" without ``parallel``), raising
    ValueError naming a choice that does not fit ``tools``."""
    choice = tool_choice or "auto"
    if choice == "auto" and any(_function(t).get("strict") is True for t in tools or ()):
        return _strict_calls(tools)
    if choice in ("auto", "none"):
        return None
    if not tools:
        raise ValueError(f"tool_choice is {choice!r} but the request offers no tools")
    if choice == "required":
        calls = {"type": "array", "minItems": 1,
                 "items": {"anyOf": [_call_schema(t) for t in tools]}}
        return StructuredOutputs(json=calls if parallel else {**calls, "maxItems": 1})
    for tool in tools:
        if _function(tool)["name"] == choice:
            return StructuredOutputs(json=_call_schema(tool))
    raise ValueError(f"tool_choice {choice!r} is not \"auto\", \"none\", \"required\" or the name "
                     f"of an offered tool ({', '.join(tool_names(tools))})")
