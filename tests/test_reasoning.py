"""Reasoning outputs (qwenjax/reasoning.py, --reasoning-parser deepseek_r1): the split of a
finished reply, the same split streamed in any pieces, and the chat/Responses shapes. The
server over the real model is tested in test_server_openai.py."""
import asyncio
import dataclasses
import json
import random

import pytest

from qwenjax.engine.request import RequestOutput
from qwenjax.reasoning import ReasoningStream, check_reasoning_parser, split_reasoning
from server import openai_protocol as proto

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("text,want", [
    ("<think>\nIt is 4.</think>\n\nFour.", ("\nIt is 4.", "\n\nFour.")),
    ("It is 4.</think>Four.", ("It is 4.", "Four.")),   # the template opened the thinking
    ("still thinking when max_tokens ran out", ("still thinking when max_tokens ran out", None)),
    ("  <think>x", ("x", None)),
    ("<thinking>not a tag</think>yes", ("<thinking>not a tag", "yes")),
    ("</think>only an answer", (None, "only an answer")),
    ("a</thi</think>b</think>c", ("a</thi", "b</think>c")),  # the first closing tag ends it
    ("", (None, None)),
    ("<think></think>", (None, None)),
])
def test_split(text, want):
    assert split_reasoning(text) == want


def test_streamed_pieces_add_up_to_the_split():
    rng = random.Random(0)
    texts = ["<think>\nabc</think>\n\nAnswer", "abc</think>ans", "thinking", "  <think>x", "<th",
             "<thinking>no</think>yes", "a</thi</think>b</think>c", "   ", "x<think>y</think>z",
             "<think>" + "long " * 40 + "</think>" + "answer " * 20]
    for text in texts:
        want = split_reasoning(text)
        for _ in range(100):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
            stream, reasoning, content = ReasoningStream(), "", ""
            for a, b in zip([0] + cuts, cuts + [len(text)]):
                r, c = stream.feed(text[a:b])
                reasoning, content = reasoning + r, content + c
            r, c = stream.feed("", final=True)
            assert ((reasoning + r) or None, (content + c) or None) == want, (text, cuts)


def test_an_unknown_parser_is_refused_by_name():
    assert check_reasoning_parser("deepseek_r1") == "deepseek_r1" and check_reasoning_parser(None) is None
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        check_reasoning_parser("qwen9")


def test_chat_message_and_stream_split_reasoning_then_tool_calls():
    parsed = proto.ParsedRequest(fields={}, tools=[WEATHER], reasoning_parser="deepseek_r1")
    text = "<think>The user wants weather.</think>\n\nChecking. " + CALL
    message, called = proto.chat_message(text, parsed)
    assert called and message["reasoning"] == message["reasoning_content"] == "The user wants weather."
    assert message["content"] == "Checking." and message["tool_calls"][0]["function"]["name"] == "get_weather"
    for size in (1, 4, 1000):
        stream, reasoning, content = proto.ChatStream(parsed), "", ""
        for i in range(0, len(text), size):
            r, c = stream.feed(text[i:i + size])
            reasoning, content = reasoning + r, content + c
        r, rest, calls = stream.finish()
        assert reasoning + r == "The user wants weather." and (content + rest).strip() == "Checking."
        assert [c.name for c in calls] == ["get_weather"]
    # All reasoning (no closing tag): no content. Without a parser, nothing is split.
    message, _ = proto.chat_message("hmm, let me think", dataclasses.replace(parsed, tools=None))
    assert message["content"] is None and message["reasoning"] == "hmm, let me think"
    message, _ = proto.chat_message("<think>a</think>b", proto.ParsedRequest(fields={}))
    assert message == {"role": "assistant", "content": "<think>a</think>b"}


def _outputs(text: str, size: int):
    """RequestOutputs streaming ``text`` in pieces of ``size`` characters, the last finished."""
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    so_far = ""
    for i, piece in enumerate(pieces):
        so_far += piece
        last = i == len(pieces) - 1
        yield RequestOutput("r", [1, 2], so_far, list(range(i + 1)), piece, [i], last,
                            finish_reason="stop" if last else None)


def test_responses_reasoning_item_streamed_and_whole():
    from server import responses_protocol as rproto

    parsed = proto.ParsedRequest(fields={}, reasoning_parser="deepseek_r1")
    text = "<think>Two and two.</think>Four."

    async def run(stream: bool, size: int):
        builder = rproto.ResponseBuilder("resp_1", "m", {"input": "q"}, parsed, 2, proto.TokenText(None))

        async def outputs():
            for output in _outputs(text, size):
                yield output

        if not stream:
            return await builder.collect(outputs()), []
        events = [e async for e in builder.events(outputs())]
        return builder.result, events

    whole, _ = asyncio.run(run(False, 1000))
    assert [item["type"] for item in whole["output"]] == ["reasoning", "message"]
    assert whole["output"][0]["content"] == [{"type": "reasoning_text", "text": "Two and two."}]
    assert whole["output"][1]["content"][0]["text"] == "Four."
    for size in (1, 5):
        result, events = asyncio.run(run(True, size))
        assert json.dumps(result["output"]) == json.dumps(whole["output"])
        kinds = [e["type"] for e in events]
        thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
        said = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert thought == "Two and two." and said == "Four."
        # The reasoning item is done before the message opens at output index 1.
        assert kinds.index("response.reasoning_text.done") < kinds.index("response.content_part.added")
        done = [e for e in events if e["type"] == "response.output_item.done"]
        assert [(e["output_index"], e["item"]["type"]) for e in done] == [(0, "reasoning"), (1, "message")]
    # A reasoning item sent back as input is skipped, not refused.
    assert rproto.input_messages({"input": [{"role": "user", "content": "q"}, whole["output"][0],
                                            {"role": "user", "content": "again"}]}) == [
        {"role": "user", "content": "q"}, {"role": "user", "content": "again"}]


def test_responses_and_messages_stream_calls_as_they_are_written():
    """The Responses and Messages streams, after reasoning and content: each tool call's item
    (block) opens once its name is written, its arguments follow in pieces, and the finished
    response holds those calls (their ids, their arguments as sent); a call the stream cannot
    follow (keys the other way) comes whole after them."""
    from server import anthropic_protocol as ap
    from server import responses_protocol as rproto

    parsed = proto.ParsedRequest(fields={}, tools=[WEATHER], reasoning_parser="deepseek_r1")
    odd = '<tool_call>\n{"arguments": {"city": "Rome"}, "name": "get_weather"}\n</tool_call>'
    text = "<think>Weather.</think>Checking. " + CALL + "\n" + CALL.replace("Paris", "Oslo") + "\n" + odd

    async def events(builder, size: int):
        async def outputs():
            for output in _outputs(text, size):
                yield output
        return [e async for e in builder.events(outputs())]

    for size in (1, 6, 1000):
        builder = rproto.ResponseBuilder("resp_1", "m", {"input": "q"}, parsed, 2, proto.TokenText(None))
        sent = asyncio.run(events(builder, size))
        added = [(e["output_index"], e["item"]["type"]) for e in sent if e["type"] == "response.output_item.added"]
        done = [(e["output_index"], e["item"]) for e in sent if e["type"] == "response.output_item.done"]
        assert added == [(0, "reasoning"), (1, "message"), (2, "function_call"), (3, "function_call"),
                         (4, "function_call")] == [(i, item["type"]) for i, item in done]
        output = builder.result["output"]
        assert [item for _, item in done] == output and output[1]["content"][0]["text"] == "Checking."
        for index, city in ((2, "Paris"), (3, "Oslo"), (4, "Rome")):
            pieces = [e["delta"] for e in sent if e["type"] == "response.function_call_arguments.delta"
                      and e["output_index"] == index]
            assert json.loads("".join(pieces)) == json.loads(output[index]["arguments"]) == {"city": city}
            assert len(pieces) == (1 if index == 4 or size == 1000 else len(pieces)) and pieces
        if size == 1:
            assert len([e for e in sent if e["type"] == "response.function_call_arguments.delta"
                        and e["output_index"] == 2]) > 3

        messages = ap.MessageBuilder("msg_1", "m", {}, parsed, 2)
        sent = asyncio.run(events(messages, size))
        starts = [e["content_block"] for e in sent if e["type"] == "content_block_start"]
        assert [b["type"] for b in starts] == ["thinking", "text", "tool_use", "tool_use", "tool_use"]
        for index, city in ((2, "Paris"), (3, "Oslo"), (4, "Rome")):
            partial = "".join(e["delta"]["partial_json"] for e in sent if e["type"] == "content_block_delta"
                              and e["index"] == index)
            assert json.loads(partial) == {"city": city} and starts[index]["id"].startswith("call_")
        assert sent[-2]["delta"]["stop_reason"] == "tool_use"
