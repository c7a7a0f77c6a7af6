"""Anthropic's Messages API (server/anthropic_protocol.py): the translation without a model, then
/v1/messages on the real Qwen2.5-Coder-0.5B against the chat completion it runs as (one
engine: the same greedy text), streamed and not, with tools, stop sequences and x-api-key."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from server import anthropic_protocol as ap
from server import openai_protocol as proto
from server_harness import Servers, http

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
HELLO = [{"role": "user", "content": "Write a Python function that says hello."}]


# --------------------------------------------------------------------------- no model


def test_messages_become_the_chat_request_they_mean():
    chat = ap.to_chat_body({
        "model": "m", "max_tokens": 50, "system": [{"type": "text", "text": "Be brief."}],
        "stop_sequences": ["\n\n"], "top_k": 5, "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": [
            {"role": "user", "content": "Weather in Lyon?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "…", "signature": ""},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Lyon"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "12°C"}]},
                {"type": "text", "text": "And tomorrow?"}]}]})
    assert chat["max_tokens"] == 50 and chat["stop"] == ["\n\n"] and chat["top_k"] == 5
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Lyon?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "12°C"},
        {"role": "user", "content": "And tomorrow?"}]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["input_schema"],
        "description": WEATHER["description"]}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert ap.to_chat_body({"max_tokens": 1, "messages": HELLO,
                            "tool_choice": {"type": "any"}})["tool_choice"] == "required"
    single = ap.to_chat_body({"max_tokens": 1, "messages": HELLO, "tools": [WEATHER],
                              "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}})
    assert single["tool_choice"] == "auto" and single["parallel_tool_calls"] is False
    assert proto.parse_chat(single).parallel_tool_calls is False


@pytest.mark.parametrize("body, message", [
    ({"messages": HELLO}, "max_tokens is required"),
    ({"max_tokens": 5, "messages": []}, "messages must be a non-empty list"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "image blocks are not supported"),
    ({"max_tokens": 5, "messages": HELLO, "thinking": {"type": "enabled", "budget_tokens": 9}},
     "thinking is not supported"),
    ({"max_tokens": 5, "messages": HELLO, "thinking": {"type": "on"}}, 'thinking.type must be "enabled"'),
    ({"max_tokens": 5, "messages": HELLO, "tools": [{"type": "web_search_20250305", "name": "w"}]},
     "server tools"),
    ({"max_tokens": 5, "messages": HELLO, "container": "x"}, "unknown field(s) for /v1/messages: container"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 'role "user" or "assistant"'),
])
def test_bad_messages_are_named(body, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ap.to_chat_body(body)


def test_thinking_budget_on_a_reasoning_server():
    """thinking enabled, where the server has a reasoning parser: budget_tokens is vLLM's
    thinking_token_budget (the engine forces </think> there; test_llm.py)."""
    body = {"max_tokens": 64, "messages": HELLO, "thinking": {"type": "enabled", "budget_tokens": 32}}
    chat = ap.to_chat_body(body, reasoning=True)
    assert chat["thinking_token_budget"] == 32
    assert proto.parse_chat(chat).fields["thinking_token_budget"] == 32
    assert "thinking_token_budget" not in ap.to_chat_body({**body, "thinking": {"type": "disabled"}})
    for bad in (0, "32", None, True):
        with pytest.raises(ValueError, match="thinking.budget_tokens must be a positive integer"):
            ap.to_chat_body({**body, "thinking": {"type": "enabled", "budget_tokens": bad}}, reasoning=True)


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def servers(server_loop, served_engine_thread):
    servers = Servers(server_loop, served_engine_thread, port=0, metrics_port=None, http_port=0)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def base(servers) -> str:
    return f"http://127.0.0.1:{servers.start().http_port}"


def _events(base: str, body: dict) -> list[tuple[str, dict]]:
    request = urllib.request.Request(base + "/v1/messages", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    events, name = [], None
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                events.append((name, data))
    return events


def test_a_message_is_the_chat_completion_it_means(base):
    status, message = http(base, "/v1/messages", {"max_tokens": 12, "temperature": 0, "messages": HELLO})
    assert status == 200, message
    _, chat = http(base, "/v1/chat/completions", {"max_tokens": 12, "temperature": 0, "messages": HELLO})
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [{"type": "text", "text": chat["choices"][0]["message"]["content"]}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("max_tokens", None)
    assert message["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert message["usage"]["output_tokens"] == 12 and message["id"].startswith("msg_")
    status, models = http(base, "/v1/models")  # Anthropic's clients list models there too
    assert status == 200 and models["data"][0]["type"] == "model" and models["has_more"] is False
    assert models["first_id"] == models["data"][0]["id"] == message["model"]
    _, counted = http(base, "/v1/messages/count_tokens", {"messages": HELLO})
    assert counted == {"input_tokens": chat["usage"]["prompt_tokens"]}

    # A stop sequence taken from that text: cut before its first occurrence, named.
    text = message["content"][0]["text"]
    stop = text[3:6]
    status, stopped = http(base, "/v1/messages", {"max_tokens": 12, "temperature": 0,
                                                  "messages": HELLO, "stop_sequences": [stop]})
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", stop)
    assert stopped["content"][0]["text"] == text[: text.index(stop)]

    # Streamed: the same text, in Anthropic's event order.
    events = _events(base, {"max_tokens": 12, "temperature": 0, "messages": HELLO})
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "".join(e["delta"]["text"] for n, e in events if n == "content_block_delta") == text
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"]["output_tokens"] == 12


def test_tool_use_blocks(base):
    body = {"max_tokens": 60, "temperature": 0, "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "messages": [{"role": "user", "content": "What is the weather in Lyon?"}]}
    status, message = http(base, "/v1/messages", body)
    assert status == 200, message
    [call] = [b for b in message["content"] if b["type"] == "tool_use"]
    assert call["name"] == "get_weather" and isinstance(call["input"].get("city"), str)
    assert message["stop_reason"] == "tool_use"
    events = _events(base, body)
    starts = [e for n, e in events if n == "content_block_start" and e["content_block"]["type"] == "tool_use"]
    assert len(starts) == 1 and starts[0]["content_block"]["input"] == {}
    partial = [e["delta"]["partial_json"] for n, e in events
               if n == "content_block_delta" and e["delta"]["type"] == "input_json_delta"]
    assert len(partial) > 1 and json.loads("".join(partial)) == call["input"]  # as it was written
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_errors_and_the_api_key_are_anthropics(base, servers):
    status, error = http(base, "/v1/messages", {"messages": HELLO})
    assert status == 400 and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error" and "max_tokens" in error["error"]["message"]
    guarded = f"http://127.0.0.1:{servers.start(api_token='anthropic-key-7').http_port}"
    body = {"max_tokens": 2, "messages": HELLO}
    status, error = http(guarded, "/v1/messages", body)
    assert status == 401 and error["error"]["type"] == "authentication_error"
    status, message = http(guarded, "/v1/messages", body, headers={"x-api-key": "anthropic-key-7"})
    assert status == 200 and message["usage"]["output_tokens"] == 2
