"""Tool calling for Qwen2.5 (vLLM's ``hermes`` parser, which Qwen2.5 uses): tools are offered
through the chat template (``Tokenizer.apply_chat_template(..., tools=...)``), and the model
answers with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, parsed here.

``tool_choice`` as in the OpenAI API: "auto" (the model decides), "none" (tools are shown but
no call is parsed), "required" (at least one call) or a tool's name (that call). The last two
are enforced with structured outputs: the output must be a JSON list of calls, or that one call.
``parallel`` false (OpenAI's ``parallel_tool_calls``) allows one call a reply: "required"'s list
holds one call, and a reply with several keeps its first (vLLM's rule).
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from qwenjax.structured import StructuredOutputs

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


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


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = _function(tool)
    return {"type": "object",
            "properties": {"name": {"const": function["name"]},
                           "arguments": dict(function.get("parameters") or {"type": "object"})},
            "required": ["name", "arguments"], "additionalProperties": False}


def model_chose_to_call(tool_choice: str | None) -> bool:
    """Whether calls parsed from a reply were the model's choice ("auto", "required"; unset is
    "auto"), which ends it with finish_reason "tool_calls"; a named tool's forced call ends with
    "stop", as in OpenAI's API and vLLM's."""
    return (tool_choice or "auto") in ("auto", "required")


def tool_choice_constraint(tools: Sequence[Mapping[str, Any]] | None, tool_choice: str | None,
                           parallel: bool = True) -> StructuredOutputs | None:
    """The structured-output constraint ``tool_choice`` needs (None for "auto"/"none"; a list
    of one call for "required" without ``parallel``), raising ValueError naming a choice that
    does not fit ``tools``."""
    choice = tool_choice or "auto"
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
