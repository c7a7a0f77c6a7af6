"""Tool calling: tools and past calls rendered by the chat template, calls parsed from replies."""
import json

import pytest

from qwenjax.tool_calls import CallScanner, parse_tool_calls, tool_choice_constraint

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}},
]


def test_hermes_blocks_bare_json_and_fences_parse():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"}),
                                                                  ("add", {"a": 1, "b": 2})]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    bare = '{"name": "add", "arguments": "{\\"a\\": 3}"}'  # arguments sent as JSON text
    assert [(c.name, c.arguments) for c in parse_tool_calls(bare, TOOLS)[1]] == [("add", '{"a": 3}')]
    fenced = '```json\n[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {}}]\n```'
    assert [c.name for c in parse_tool_calls(fenced, TOOLS)[1]] == ["add", "get_weather"]


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # broken JSON
    '{"name": "delete_everything", "arguments": {}}',  # not an offered tool
    '{"name": "add", "arguments": [1, 2]}',  # arguments not an object
    '[{"name": "add", "arguments": {}}, {"other": 1}]',  # one item is not a call
])
def test_what_is_not_a_call_stays_content(text):
    assert parse_tool_calls(text, TOOLS) == (text, [])


def test_no_tools_offered_means_no_calls():
    assert parse_tool_calls('{"name": "add", "arguments": {}}', None)[1] == []


def test_tool_choice_constraints():
    assert tool_choice_constraint(TOOLS, "auto") is None and tool_choice_constraint(None, None) is None
    named = tool_choice_constraint(TOOLS, "add").json
    assert named["properties"]["name"] == {"const": "add"} and named["required"] == ["name", "arguments"]
    required = tool_choice_constraint(TOOLS, "required").json
    assert required["type"] == "array" and len(required["items"]["anyOf"]) == 2
    with pytest.raises(ValueError, match="tool_choice 'multiply' is not"):
        tool_choice_constraint(TOOLS, "multiply")
    with pytest.raises(ValueError, match="offers no tools"):
        tool_choice_constraint([], "required")


def test_without_parallel_calls_a_reply_keeps_its_first_call(tokenizer):
    """parallel_tool_calls false (OpenAI's): of a reply with several calls the first is kept
    (vLLM's rule), and tool_choice "required"'s grammar takes a list of one call only."""
    from qwenjax.structured import GrammarCompiler

    two = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    bare = '[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]'
    for text, content, first in ((two, "Checking.", {"city": "Oslo"}), (bare, "", {"a": 1})):
        assert len(parse_tool_calls(text, TOOLS)[1]) == 2
        kept, (call,) = parse_tool_calls(text, TOOLS, parallel=False)
        assert kept == content and json.loads(call.arguments) == first
    one = tool_choice_constraint(TOOLS, "required", parallel=False)
    assert one.json["maxItems"] == 1 and "maxItems" not in tool_choice_constraint(TOOLS, "required").json
    compiler = GrammarCompiler(tokenizer.to_json(), 151936, tokenizer.eos_token_ids)

    def takes(spec, text):
        matcher = compiler.matcher(spec)
        return all(matcher.advance(t) for t in tokenizer.encode(text)) and matcher.done

    single = '[{"name": "add", "arguments": {"a": 1}}]'
    assert takes(one, single) and not takes(one, bare)
    assert takes(tool_choice_constraint(TOOLS, "required"), bare)


def test_strict_tools_hold_auto_calls_to_their_schemas(tokenizer):
    """tool_choice "auto" with a tool marked strict (OpenAI's "strict": true): the reply is free
    text, but from <tool_call> on the call must name an offered tool and a strict tool's
    arguments follow its parameters (a lax tool's: any object). Through llguidance and the real
    tokenizer (<tool_call> is one special token)."""
    from qwenjax.structured import GrammarCompiler

    strict = [{"type": "function", "function": {**TOOLS[1]["function"], "strict": True}}, TOOLS[0]]
    assert tool_choice_constraint(TOOLS, "auto") is None and tool_choice_constraint(strict, "none") is None
    spec = tool_choice_constraint(strict, "auto")
    compiler = GrammarCompiler(tokenizer.to_json(), 151936, tokenizer.eos_token_ids)

    def takes(text):
        matcher = compiler.matcher(spec)
        return all(matcher.advance(t) for t in tokenizer.encode(text))

    def call(name, arguments):
        return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'

    assert tokenizer.encode("<tool_call>") == [151657]
    assert takes("No tool needed: 2 + 2 is 4.")
    assert takes("Let me add. " + call("add", '{"a": 1, "b": 2}') + "\n" + call("get_weather", '{"x": [1]}'))
    assert not takes(call("add", '{"a": "one"}'))  # the strict tool's schema
    assert not takes(call("multiply", "{}"))  # not an offered tool
    # gRPC's Tool.strict is the same flag.
    from qwenjax_proto.v1 import inference_pb2 as pb
    from server.convert import tools_to_dicts

    wire = tools_to_dicts([pb.Tool(name="add", parameters=json.dumps(TOOLS[1]["function"]["parameters"]),
                                   strict=True), pb.Tool(name="get_weather")])
    assert tool_choice_constraint(wire, "") == spec


def _scan(text: str, size: int, tagged: bool, at: int = 0, parallel: bool = True):
    """CallScanner fed ``text`` ``size`` characters at a time: {index: (name, id, arguments)}."""
    scanner, calls = CallScanner(TOOLS, parallel), {}
    scanner.begin(tagged, at)
    for end in range(size, len(text) + size, size):
        for index, call, piece in scanner.advance(text[:end]):
            if call is not None:
                assert index not in calls and piece == ""
                calls[index] = [call.name, call.id, ""]
            else:
                calls[index][2] += piece
    assert [(c.name, c.id, c.arguments) for c in scanner.calls] == [tuple(v) for v in calls.values()]
    return calls


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_calls_stream_piece_by_piece_as_they_are_written(size):
    """CallScanner: each call opens with its name once its head is written, then its arguments'
    text follows as it comes; joined, the pieces are the arguments the whole reply's parse gives
    (braces, brackets, quotes and escapes inside strings do not end them early)."""
    weather = '{"name": "get_weather", "arguments": {"city": "Par}is \\"x\\" {["}}'
    add = '{"name":"add","arguments":{"a": 1, "b": [2, {"c": 3}]}}'
    tagged = f"Checking.\n<tool_call>\n{weather}\n</tool_call>\n<tool_call>\n{add}\n</tool_call>"
    for text, is_tagged, at in ((tagged, True, len("Checking.\n")), (f"[{weather}, {add}]", False, 0),
                                (f"```json\n[\n  {add},\n{weather}\n]\n```", False, 0),
                                (add, False, 0)):
        calls = _scan(text, size, is_tagged, at)
        parsed = parse_tool_calls(text, TOOLS)[1]
        assert [name for name, _, _ in calls.values()] == [c.name for c in parsed]
        assert [json.loads(a) for _, _, a in calls.values()] == [json.loads(c.arguments) for c in parsed]
    assert list(_scan(tagged, size, True, parallel=False)) == [0]  # one call at most
    # What it cannot follow stops it, there: the whole reply's parse has those calls.
    for text in ('<tool_call>{"arguments": {}, "name": "add"}</tool_call>',  # keys the other way
                 '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>',  # JSON text
                 '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "<tool_call>[1]"):
        assert _scan(text, size, True) == {}
    assert list(_scan(f"<tool_call>{add}</tool_call><tool_call>{{\"x\": 1}}", size, True)) == [0]
    # An unfinished call streams as far as it went.
    (cut,) = _scan(tagged[:tagged.index("Par") + 3], size, True).values()
    assert cut[0] == "get_weather" and cut[2] == '{"city": "Par'


def test_the_grpc_complete_ends_tool_calls_only_for_a_call_the_model_chose():
    """OpenAI's (and the HTTP API's) finish reasons: "tool_calls" for "auto"/"required", "stop"
    for a named tool_choice's forced call; the calls are parsed either way."""
    from qwenjax.engine.request import RequestOutput
    from server.convert import complete_response

    reply = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    output = RequestOutput(request_id="r", prompt_token_ids=[1, 2], text=reply, token_ids=[3, 4],
                           delta_text="", delta_token_ids=[], finished=True, finish_reason="stop")
    for choice, reason in (("", "tool_calls"), ("auto", "tool_calls"), ("required", "tool_calls"),
                           ("add", "stop")):
        complete = complete_response(output, 0.1, 0.2, TOOLS, tool_choice=choice).complete
        assert complete.finish_reason == reason, choice
        assert [c.name for c in complete.tool_calls] == ["add"] and complete.content == ""
    assert complete_response(output, 0.1, 0.2, None).complete.finish_reason == "stop"
    two = RequestOutput(request_id="r", prompt_token_ids=[1, 2], text=f"[{reply}, {reply}]",
                        token_ids=[3, 4], delta_text="", delta_token_ids=[], finished=True,
                        finish_reason="stop")
    assert len(complete_response(two, 0.1, 0.2, TOOLS).complete.tool_calls) == 2
    assert len(complete_response(two, 0.1, 0.2, TOOLS, parallel=False).complete.tool_calls) == 1


def test_the_chat_template_renders_tools_and_past_calls(tokenizer):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "content": '{"temp_c": 18}'}]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS)
    assert '"name": "get_weather"' in text and "# Tools" in text
    # The call's arguments render as a JSON object, not as a string holding JSON.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n{\"temp_c\": 18}\n</tool_response>" in text
    assert "# Tools" not in tokenizer.apply_chat_template(messages[:1])
    with pytest.raises(ValueError, match=r"messages\[1\].tool_calls\[0\].arguments is not JSON"):
        tokenizer.apply_chat_template([messages[0], {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "f", "arguments": "{oops"}}]}])
    with pytest.raises(ValueError, match=r"tools\[0\].function.name"):
        tokenizer.apply_chat_template(messages[:1], tools=[{"type": "function", "function": {}}])
    with pytest.raises(ValueError, match=r"messages\[0\].tool_calls: only an assistant"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x", "tool_calls": []}])


def test_grammar_masks_of_a_batch_equal_each_matchers_own(tokenizer):
    """Matcher.bitmasks (llguidance's threads, a step's constrained rows at once) gives each
    matcher's own mask, whatever grammar and state each row is in."""
    import numpy as np

    from qwenjax.structured import GrammarCompiler, Matcher, StructuredOutputs

    vocab = 151936
    compiler = GrammarCompiler(tokenizer.to_json(), vocab, tokenizer.eos_token_ids)
    specs = [StructuredOutputs(json=TOOLS[1]["function"]["parameters"]),
             StructuredOutputs(regex=r"\d{3}-\d{4}"), StructuredOutputs(choice=["red", "green"]),
             StructuredOutputs(json_object=True)]
    matchers = [compiler.matcher(s) for s in specs]
    for m, text in zip(matchers, ['{"a": 1', "555-", "gr", ""]):  # each a few tokens in
        for t in tokenizer.encode(text):
            assert m.advance(t)
    batch = Matcher.bitmasks(matchers)
    assert batch.shape == (4, vocab // 32) and batch.dtype == np.int32
    for row, m in zip(batch, matchers):
        np.testing.assert_array_equal(row, m.bitmask())
    assert len({row.tobytes() for row in batch}) == 4  # four different masks
    allowed = lambda mask: {t for t in range(vocab) if mask[t // 32] >> (t % 32) & 1}  # noqa: E731
    assert allowed(batch[2]) == {t for t in allowed(batch[2]) if tokenizer.decode([t]).strip()
                                 and "green".startswith("gr" + tokenizer.decode([t]))}


def test_a_drafts_masks_equal_those_of_a_matcher_that_took_the_tokens(tokenizer):
    """Speculative decoding with a grammar: the part of a draft the grammar takes, and the mask
    at each drafted position, without moving the matcher."""
    import numpy as np

    from qwenjax.structured import GrammarCompiler, StructuredOutputs

    compiler = GrammarCompiler(tokenizer.to_json(), 151936, tokenizer.eos_token_ids)
    matcher = compiler.matcher(StructuredOutputs(regex=r"\d{3}-\d{3}-\d{4}"))
    for t in tokenizer.encode("555-"):
        assert matcher.advance(t)
    good, bad = tokenizer.encode("123-4567"), tokenizer.encode("12x")
    assert matcher.accepted_prefix(good) == len(good)
    assert matcher.accepted_prefix(bad) == len(tokenizer.encode("12"))
    before = matcher.bitmask()
    masks = matcher.draft_bitmasks(good)
    np.testing.assert_array_equal(matcher.bitmask(), before)  # state unchanged
    walker = matcher.copy()
    np.testing.assert_array_equal(masks[0], walker.bitmask())
    for i, t in enumerate(good):
        assert walker.advance(t)
        np.testing.assert_array_equal(masks[i + 1], walker.bitmask())
    assert len({m.tobytes() for m in masks}) > 1


def test_a_structural_tag_constrains_only_what_follows_its_trigger(tokenizer):
    """vLLM's/SGLang's structural tag: free text, and after a trigger one of its structures
    (begin, JSON by the schema, end). Qwen2.5's <tool_call> is an added token: named as one."""
    from qwenjax.structured import GrammarCompiler, StructuredOutputs

    compiler = GrammarCompiler(tokenizer.to_json(), 151936, tokenizer.eos_token_ids)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    call = {"begin": '<tool_call>\n{"name": "get_weather", "arguments": ', "schema": schema,
            "end": "}\n</tool_call>"}
    as_text = json.dumps({"type": "structural_tag", "structures": [call], "triggers": ["<tool_call>"]})
    spelled = {"structures": [{"begin": "<function=f>", "schema": {"type": "integer"},
                               "end": "</function>"}], "triggers": ["<function="]}

    def takes(tag, text: str) -> bool:
        matcher = compiler.matcher(StructuredOutputs(structural_tag=tag))
        return all(matcher.advance(t) for t in tokenizer.encode(text))

    assert takes(as_text, 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": '
                          '{"city": "Paris"}}\n</tool_call> Done.')
    assert takes(as_text, "No call at all.")
    assert not takes(as_text, '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}')
    assert not takes(as_text, '<tool_call>\n{"name": "other"')
    assert takes(spelled, "x <function=f>12</function> y") and not takes(spelled, "<function=g>")
    assert not takes(spelled, "<function=f>twelve")
    for bad, match in [({"structures": [call], "triggers": ["<fn>"]}, r"begin must be a string starting"),
                       ({"structures": [], "triggers": ["<tool_call>"]}, "structures must be"),
                       ({"structures": [call]}, "triggers must be"),
                       ({"format": {"type": "triggered_tags"}}, '"format" form'),
                       ({**json.loads(as_text), "extra": 1}, "unknown key"),
                       ("{not json", "a JSON object")]:
        with pytest.raises(ValueError, match=match):
            StructuredOutputs(structural_tag=bad)
