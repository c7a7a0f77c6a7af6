"""The engine and the Python API on the real Qwen2.5-Coder-0.5B-Instruct (float32, CPU)."""
import asyncio
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from qwenjax import LLM, AsyncLLM, SamplingParams
from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.greedy import GreedyGenerator
from qwenjax.loading import load_model

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Name three primary colors.",
    "Translate 'good morning' into Spanish.",
]
# Few step shapes (8 real-model programs, not 23: compiling is most of these tests' time).
SMALL = dict(max_model_len=1024, max_num_seqs=4, max_prefill_seqs=2, prefill_chunk=128,
             decode_buckets=(1,), prefill_buckets=(64,), warm_up=False, progress=False)
# The engine of the real-model batching tests: 11 shapes, from 1 decode row to 4 with 128 tokens.
# The real model's scheduling tests (batch invariance, prefix caching) share these shapes, so the
# step programs compile once for both. 20 pages of 16: 320 tokens, small enough to preempt.
BATCHING = dict(max_num_seqs=4, max_num_batched_tokens=128, prefill_chunk=64, max_prefill_seqs=2,
                decode_buckets=(1,), prefill_buckets=(16, 64), page_size=16, max_model_len=320,
                num_pages=20)
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


@pytest.fixture(scope="module")
def lm(real_model_dir):
    return load_model(real_model_dir, tp=1, dtype="float32")


@pytest.fixture(scope="module")
def llm(lm):
    return LLM(lm, **SMALL)


def _chat(text):
    return [{"role": "user", "content": text}]


def test_chat_matches_the_hf_verified_greedy_path(llm, lm):
    outputs = llm.chat([_chat(q) for q in QUESTIONS], GREEDY, use_tqdm=False)
    prompts = [lm.tokenizer.encode_chat(_chat(q)) for q in QUESTIONS]
    # GreedyGenerator is the path test_real_model.py checks token-for-token against transformers.
    expected = GreedyGenerator(lm).generate(prompts, 32, lm.tokenizer.eos_token_ids)
    for out, want, prompt in zip(outputs, expected, prompts):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == want
        assert out.finish_reason == ("stop" if want[-1] in lm.tokenizer.eos_token_ids else "length")
        assert out.metrics.ttft > 0 and out.metrics.latency >= out.metrics.ttft
    assert outputs[0].text == "The capital of France is Paris."
    assert outputs[0].matched_stop == 151645  # <|im_end|>


def test_stream_deltas_are_utf8_safe_and_add_up(llm):
    params = SamplingParams(temperature=0.0, max_tokens=40)
    prompt = _chat("用中文写一句关于大海的话，并加上一个表情符号。")
    deltas = [o.delta_text for o in llm.stream(prompt, params, chat=True)]
    final = llm.chat(prompt, params, use_tqdm=False)[0].text
    assert "".join(deltas) == final
    assert any("\u4e00" <= ch <= "\u9fff" for ch in final)  # it did answer in Chinese
    assert not any("\ufffd" in d for d in deltas)
    assert len([d for d in deltas if d]) > 5  # streamed, not dumped at the end


def test_stop_string_across_tokens(llm):
    params = SamplingParams(temperature=0.0, max_tokens=32, stop=["France is P"])
    out = llm.chat(_chat(QUESTIONS[0]), params, use_tqdm=False)[0]
    assert out.text == "The capital of "
    assert out.finish_reason == "stop" and out.matched_stop == "France is P"
    streamed = "".join(o.delta_text for o in llm.stream(_chat(QUESTIONS[0]), params, chat=True))
    assert streamed == "The capital of "
    kept = SamplingParams(temperature=0.0, max_tokens=32, stop=["France is P"], include_stop_str_in_output=True)
    out = llm.chat(_chat(QUESTIONS[0]), kept, use_tqdm=False)[0]
    assert out.text == "The capital of France is P" and out.finish_reason == "stop"


def test_vllm_prompt_dicts(llm):
    """vLLM's TextPrompt / TokensPrompt dicts, alone or in a list with per-prompt params."""
    from qwenjax import TextPrompt, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=4)
    text = "def fib(n):"
    ids = llm.tokenizer.encode(text)
    plain = llm.generate([text], params, use_tqdm=False)[0].token_ids
    one = llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)
    both = llm.generate([TextPrompt(prompt=text), {"prompt_token_ids": ids}],
                        [params, SamplingParams(temperature=0.0, max_tokens=2)], use_tqdm=False)
    assert one[0].token_ids == both[0].token_ids == plain and both[1].token_ids == plain[:2]
    assert both[0].prompt_token_ids == ids
    # vLLM's quickstart reads output.prompt and output.outputs[0].text.
    assert one[0].prompt == both[1].prompt == text
    assert one[0].outputs[0].text == one[0].text and one[0].outputs[0].stop_reason is None
    assert one[0].cumulative_logprob is None
    scored = llm.generate(text, SamplingParams(temperature=0.0, max_tokens=3, logprobs=0), use_tqdm=False)[0]
    assert scored.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in scored.logprobs))
    for bad, message in (({"prompt": text, "multi_modal_data": {}}, "'multi_modal_data' .*text models"),
                         ({"prompt": text, "cache_salt": "s"}, "cache_salt in SamplingParams"),
                         ({"prompt": text, "prompt_token_ids": ids}, "needs one of"),
                         ({"prompt_token_ids": "abc"}, "prompt_token_ids must be a list of ints")):
        with pytest.raises(ValueError, match=message):
            llm.generate(bad, params, use_tqdm=False)


def test_bad_words_are_never_generated(llm, lm):
    """A one-token word is banned outright; a word of several tokens loses its last token
    wherever the output ends with the ones before it (async scheduling holds the request
    until its latest token is back on the host)."""
    params = SamplingParams(temperature=0.0, max_tokens=16, bad_words=["Paris", "capital of France"])
    out = llm.chat(_chat(QUESTIONS[0]), params, use_tqdm=False)[0]
    banned = [lm.tokenizer.encode(w) for w in (" Paris", "Paris", " capital of France")]
    ids = out.token_ids
    for word in banned:
        assert not any(ids[i: i + len(word)] == word for i in range(len(ids))), (word, out.text)
    assert "Paris" not in out.text and "capital of France" not in out.text
    assert out.text.startswith("The capital of")  # the word's first tokens alone are fine
    assert out.finish_reason in ("stop", "length")
    # Async scheduling reads such a request's steps back before the next: a token every step.
    engine = llm.engine
    assert engine.config.async_scheduling
    engine.add_request(lm.tokenizer.encode("Once upon a time"), SamplingParams(
        temperature=0.0, max_tokens=8, ignore_eos=True, bad_words=["capital of France"]))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    assert steps <= 8 + 1, steps  # one step of prefill and the first token, 7 more, the last read


def test_structured_outputs_json_regex_choice_in_one_batch(llm):
    """Rows under a JSON schema, a regex and a choice list share the batch with a free row;
    each output is what its constraint allows, and the free row is what it is alone."""
    import re

    from qwenjax.structured import StructuredOutputs

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    phone = r"\d{3}-\d{3}-\d{4}"
    requests = [
        ("Describe a person named Alice who is 30, as JSON.", StructuredOutputs(json=schema)),
        ("Give me a US phone number.", StructuredOutputs(regex=phone)),
        ("Is Paris in France? Answer yes or no.", StructuredOutputs(choice=["Yes", "No"])),
        (QUESTIONS[0], None),
    ]
    outs = llm.chat([_chat(q) for q, _ in requests],
                    [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=s) for _, s in requests],
                    use_tqdm=False)
    person = json.loads(outs[0].text)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and person["name"]
    assert re.fullmatch(phone, outs[1].text), outs[1].text
    assert outs[2].text in ("Yes", "No")
    assert all(o.finish_reason == "stop" for o in outs)
    assert outs[3].text == "The capital of France is Paris."
    # n = 2 sampled sequences follow the grammar each on its own.
    two = llm.chat(_chat("Pick a colour."), SamplingParams(
        n=2, temperature=1.0, seed=3, max_tokens=8,
        structured_outputs={"choice": ["red", "green", "blue"]}), use_tqdm=False)
    # (One result per prompt, vLLM's shape: its outputs are the n sequences.)
    assert len(two) == 1 and [o.index for o in two[0].outputs] == [0, 1]
    assert all(o.text in ("red", "green", "blue") for o in two[0].outputs)
    with pytest.raises(ValueError, match=r"structured_outputs.regex does not compile"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputs(regex="[a-")), use_tqdm=False)
    with pytest.raises(ValueError, match="structured_outputs.json must be a JSON schema"):
        StructuredOutputs(json="{not json")
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputs(regex="a", choice=["b"])


def test_structured_outputs_start_after_the_reasoning(lm):
    """With a reasoning parser, a grammar constrains the reply only once its reasoning has
    closed (</think>), also in drafts; a prompt that already closed it is constrained from the
    first token."""
    from qwenjax.reasoning import split_reasoning

    llm = LLM(lm, **SMALL, reasoning_parser="deepseek_r1")
    choice = SamplingParams(temperature=0.0, max_tokens=24, structured_outputs={"choice": ["yes", "no"]})
    out = llm.chat(_chat("Print this string verbatim: <think>hello</think>world"), choice,
                   use_tqdm=False)[0]
    reasoning, content = split_reasoning(out.text)
    assert reasoning == "hello" and content in ("yes", "no") and out.finish_reason == "stop", out.text
    closed = llm.chat([_chat("Is Paris in France?") + [
        {"role": "assistant", "content": "<think>It is.</think>"}]], choice, use_tqdm=False,
        continue_final_message=True, add_generation_prompt=False)[0]
    assert closed.text in ("yes", "no")
    # The matcher's view of drafts: free up to the closing tag, the grammar's after it.
    matcher = llm.engine._matcher(choice).after_reasoning("</think>", lm.tokenizer.token_bytes)
    think = lm.tokenizer.encode("hi</think>")
    yes, maybe = lm.tokenizer.encode("yes"), lm.tokenizer.encode("maybe")
    assert matcher.accepted_prefix(think + yes) == len(think + yes)
    assert matcher.accepted_prefix(think + maybe) == len(think)
    masks = matcher.draft_bitmasks(think + yes)
    assert (masks[: len(think)] == -1).all() and not (masks[len(think)] == -1).all()
    assert matcher.thinking and not matcher.done  # state unchanged by the probes
    from qwenjax.structured import Matcher

    plain = llm.engine._matcher(choice)  # a step's rows: thinking ones take any token
    rows = Matcher.bitmasks([plain, matcher, plain.copy()])
    assert (rows[1] == -1).all() and (rows[0] == plain.bitmask()).all() and (rows[2] == rows[0]).all()
    for token in think:
        assert matcher.advance(token)
    assert not matcher.thinking and (matcher.bitmask() == masks[len(think)]).all()


def test_thinking_token_budget_forces_the_closing_tag(lm):
    """vLLM's thinking_token_budget: with a reasoning parser, the reply may think that many
    tokens, then "</think>" is forced (token by token) and the answer follows; a reply that
    closed its reasoning in the prompt is not touched; without a parser it is refused."""
    from qwenjax.reasoning import ThinkingBudget, split_reasoning

    llm = LLM(lm, **SMALL, reasoning_parser="deepseek_r1")
    end = lm.tokenizer.encode("</think>", add_special_tokens=False)
    prompt = _chat("What is 2 + 3? Think first.")
    free = llm.chat(prompt, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0]
    budget = SamplingParams(temperature=0.0, max_tokens=5 + len(end) + 3, thinking_token_budget=5)
    out = llm.chat(prompt, budget, use_tqdm=False)[0]
    assert out.token_ids[:5] == free.token_ids and out.token_ids[5:5 + len(end)] == end
    reasoning, content = split_reasoning(out.text)
    assert reasoning == lm.tokenizer.decode(free.token_ids) and content, out.text
    assert llm.chat(prompt, dataclasses.replace(budget, thinking_token_budget=0, max_tokens=len(end)),
                    use_tqdm=False)[0].token_ids == end
    # A prompt that closed its reasoning (an assistant turn continued after it) gets no budget.
    engine = llm.engine
    engine.add_request(lm.tokenizer.encode("2 + 3? <think>Five.</think>"), budget, request_id="closed")
    assert engine._requests["closed"].thinking_budget is None
    engine.abort("closed")
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(ValueError, match="thinking_token_budget limits a reasoning model"):
        LLM(lm, **SMALL).chat(prompt, budget, use_tqdm=False)
    with pytest.raises(ValueError, match="thinking_token_budget"):
        SamplingParams(thinking_token_budget=-1)
    # A reply that closes its reasoning by itself is left alone.
    state = ThinkingBudget(10, tuple(end), lm.tokenizer.token_bytes)
    for token in lm.tokenizer.encode("ok</think>", add_special_tokens=False):
        assert state.forced is None
        state.take(token)
    assert state.done and state.forced is None


def test_tool_calls_auto_and_required(llm):
    """Tools offered through the chat template: the model's reply parses into a call ("auto"),
    and "required" constrains the reply to a list of calls to offered tools."""

    from qwenjax.tool_calls import parse_tool_calls
    from test_tool_calls import TOOLS

    question = _chat("What's the weather like in Paris today?")
    greedy = SamplingParams(temperature=0.0, max_tokens=48)
    auto = llm.chat(question, greedy, tools=TOOLS, use_tqdm=False)[0]
    _, calls = parse_tool_calls(auto.text, TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})], auto.text
    required = llm.chat(question, greedy, tools=TOOLS, tool_choice="required", use_tqdm=False)[0]
    content, calls = parse_tool_calls(required.text, TOOLS)
    assert content == "" and calls and calls[0].name == "get_weather", required.text
    assert required.finish_reason == "stop"
    from qwenjax.structured import StructuredOutputs

    constrained = SamplingParams(structured_outputs=StructuredOutputs(regex="a+"))
    with pytest.raises(ValueError, match="tool_choice 'required' constrains the output itself"):
        llm.chat(question, constrained, tools=TOOLS, tool_choice="required")


def test_logprobs_and_min_tokens(llm, lm):
    out = llm.chat(_chat(QUESTIONS[0]), SamplingParams(temperature=0.0, max_tokens=8, logprobs=3),
                   use_tqdm=False)[0]
    assert len(out.logprobs) == len(out.token_ids)
    for step in out.logprobs:
        assert len(step.top) == 3 and step.top[0][0] == step.token_id  # greedy picks the top one
        assert step.logprob == pytest.approx(step.top[0][1]) and step.logprob <= 0
        assert step.top[0][1] >= step.top[1][1] >= step.top[2][1]
    # min_tokens keeps EOS away: the 8-token answer must run to 12 tokens.
    longer = llm.chat(_chat(QUESTIONS[0]), SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12),
                      use_tqdm=False)[0]
    assert len(longer.token_ids) == 12 and longer.finish_reason == "length"
    assert not set(longer.token_ids) & set(lm.tokenizer.eos_token_ids)


def test_async_llm_concurrent_requests_and_cancel(lm, llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    expected = [o.text for o in llm.chat([_chat(q) for q in QUESTIONS[:3]], greedy, use_tqdm=False)]
    engine_llm = AsyncLLM(lm, **SMALL)

    async def collect(question):
        text = ""
        async for out in engine_llm.chat(_chat(question), greedy):
            text += out.delta_text
        return text

    async def cancel_early():
        async for out in engine_llm.generate("Count from one to one hundred.",
                                             SamplingParams(temperature=0.0, max_tokens=200)):
            if len(out.token_ids) >= 3:
                break  # leaving the loop aborts the request

    async def abort_by_id():  # vLLM's order (prompt, params, request id) and awaited abort
        # (Sampled, so ignore_eos: an early end-of-text must not finish it before the abort.)
        async for out in engine_llm.generate("Count to fifty.",
                                             SamplingParams(max_tokens=200, ignore_eos=True), "by-id"):
            if len(out.token_ids) >= 2:
                await engine_llm.abort("by-id")
        return out.finish_reason, len(out.token_ids)

    async def named_call():  # tool_choice reaches the async path too
        from test_tool_calls import TOOLS

        text = ""
        async for out in engine_llm.chat(_chat("What is 2 + 2?"), GREEDY, tools=TOOLS, tool_choice="add"):
            text = out.text
        return text

    async def main():
        results = await asyncio.gather(*(collect(q) for q in QUESTIONS[:3]), cancel_early(),
                                       named_call(), abort_by_id())
        for _ in range(100):  # the abort reaches the engine thread within a step or two
            if engine_llm.engine.allocator.num_used == 0:
                break
            await asyncio.sleep(0.05)
        return results

    try:
        results = asyncio.run(main())
        assert results[:3] == expected
        assert json.loads(results[4])["name"] == "add", results[4]
        assert results[5][0] == "abort" and results[5][1] < 200, results[5]
        assert engine_llm.engine.allocator.num_used == 0
    finally:
        engine_llm.shutdown()


def test_batch_invariance_real_model(lm):
    """Random arrivals, prompts of 1–150 tokens, 64-token chunks, a pool small enough to preempt:
    every request's greedy tokens equal its own single-request run. (At tp = 4 the same
    scheduling runs on the tiny model, test_engine.py: 78 s of the suite's 20-minute budget
    bought no path the two do not cover.)"""
    rng = np.random.default_rng(1)
    words = lm.tokenizer.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 40)
                                + " Explain recursion, then list prime numbers and colors.")
    lengths = [1, 7, 40, 65, 100, 130, 150, 70]
    prompts = [words[len(words) - n:] for n in lengths]
    # Prefix caching off: the prompts are suffixes of one periodic text, so many share full pages,
    # and sharing would spare the preemptions this test is about (and feed the single runs).
    # (The 0.5B's prefill is what this test spends, ~0.6 s a 64-token chunk on a 2-core CPU.)
    config = EngineConfig(**BATCHING, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine = Engine(lm, config, warm_up=False)
    arrivals = sorted(rng.integers(0, 12, len(prompts)))
    ids, outputs, step, requests = {}, {}, 0, []
    while len(outputs) < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                ids[engine.add_request(prompts[i], params)] = i
                requests.append(engine.scheduler.waiting[-1])
        outputs.update({ids[o.request_id]: o.token_ids for o in engine.step() if o.finished})
        engine.check()
        step += 1
    assert sum(r.num_preemptions for r in requests) > 0
    assert engine.allocator.num_free == BATCHING["num_pages"]
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=f"alone-{i}")
        alone = None
        while alone is None:
            alone = next((o.token_ids for o in engine.step() if o.finished), None)
        assert outputs[i] == alone, f"request {i} ({len(prompt)} tokens)"


def test_prefix_caching_real_model_shared_system_prompt(lm):
    """Chats under one long system prompt: greedy outputs with prefix caching equal those without,
    and every request after the first reports the shared full pages as cached. (tp 2 runs the
    same on the tiny model, test_prefix_cache.py; the 0.5B's padded heads at tp 4 run in the
    engine in test_cli.py and against transformers in test_real_model.py: 20 s saved here.)"""
    system = ("You are the support assistant of a company that sells solar panels, batteries and "
              "inverters. Answer briefly, cite the product line when relevant, never invent prices, "
              "and ask for the order number when a customer reports a delivery problem.")
    prompts = [lm.tokenizer.encode_chat([{"role": "system", "content": system},
                                         {"role": "user", "content": q}]) for q in QUESTIONS[:3]]
    shared = next(i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1)
    page = 16
    assert shared >= 3 * page
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def run(enable: bool):
        # The shapes of test_batch_invariance_real_model: compiled once for both tests.
        config = EngineConfig(**BATCHING, enable_prefix_caching=enable)
        engine = Engine(lm, config, warm_up=False)
        outputs = {}
        for batch in ([0], [1, 2]):  # the first request alone, then the others together
            for i in batch:
                engine.add_request(prompts[i], params, request_id=str(i))
            while engine.has_unfinished():
                outputs.update({int(o.request_id): o for o in engine.step() if o.finished})
                engine.check()
        assert engine.allocator.num_used == 0
        return outputs

    cached, plain = run(True), run(False)
    for i in range(len(prompts)):
        assert cached[i].token_ids == plain[i].token_ids, f"request {i}"
        assert plain[i].num_cached_tokens == 0
    assert cached[0].num_cached_tokens == 0
    for i in (1, 2):
        assert cached[i].num_cached_tokens >= shared // page * page


def test_vllm_argument_names(tmp_path):
    from tiny import tiny_config, write_hf_checkpoint

    write_hf_checkpoint(tiny_config(), tmp_path)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, gpu_memory_utilization=0.5, num_pages=16,
              warm_up=False, progress=False)
    assert llm.lm.mesh.shape["tp"] == 2 and llm.engine.config.kv_cache_fraction == 0.5
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(str(tmp_path), tp=2, tensor_parallel_size=4)


def test_vllm_offline_api_shapes(llm, lm):
    """What vLLM scripts do with LLM: sampling_params by keyword, logprobs as {token id:
    Logprob}, stop_reason None at EOS, per-call chat templates, vLLM-only constructor
    arguments accepted. (max_tokens past the context: the tiny model's test below.)"""
    from qwenjax.engine.request import Logprob

    greedy = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, prompt_logprobs=1)
    out = llm.chat(_chat("Say OK."), sampling_params=greedy, use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.stop_reason is None  # EOS: None, as vLLM's
    assert out.matched_stop in lm.tokenizer.eos_token_ids  # (SGLang's "matched" names it)
    first = out.logprobs[0]
    token = out.token_ids[0]
    assert first[token] == Logprob(first.logprob, 1, lm.tokenizer.decode([token]))  # greedy: rank 1
    assert list(first)[0] == token and 2 <= len(first) <= 3
    assert sum(out.logprobs[i][t].logprob for i, t in enumerate(out.token_ids)) == \
        pytest.approx(out.cumulative_logprob)
    prompt_lp = out.prompt_logprobs
    assert prompt_lp[0] is None and prompt_lp[1][out.prompt_token_ids[1]].logprob <= 0
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate("x", GREEDY, sampling_params=GREEDY, use_tqdm=False)
    assert llm.get_tokenizer() is llm.tokenizer
    # vLLM's LLMEngine loop over the same engine: the same reply, its prompt text and decoded
    # logprob tokens.
    stepped = llm.llm_engine
    stepped.add_request("chat", {"prompt_token_ids": out.prompt_token_ids}, greedy)
    stepped.add_request("text", "def f(", SamplingParams(temperature=0.0, max_tokens=2, logprobs=0))
    last = {}
    while stepped.has_unfinished_requests():
        last.update((o.request_id, o) for o in stepped.step())
    assert last["chat"].token_ids == out.token_ids and last["chat"].prompt == out.prompt
    entry = last["chat"].logprobs[0][token]
    assert entry.decoded_token == first[token].decoded_token and entry.rank == 1
    assert entry.logprob == pytest.approx(first[token].logprob, abs=1e-5)
    assert last["text"].prompt == "def f(" and last["text"].finished

    template = "{% for m in messages %}<<{{ m['content'] }}{{ suffix }}>>{% endfor %}"
    ids = llm.chat(_chat("hi"), GREEDY, chat_template=template, chat_template_kwargs={"suffix": "!"},
                   use_tqdm=False)[0].prompt_token_ids
    assert ids == lm.tokenizer.encode("<<hi!>>")

    other = LLM(lm, trust_remote_code=True, enforce_eager=True, swap_space=4, block_size=32,
                enable_sleep_mode=True, **SMALL)
    assert other.engine.config.page_size == 32
    with pytest.raises(TypeError):
        LLM(lm, not_a_vllm_argument=1, **SMALL)


def test_dummy_weights_and_another_tokenizer(tmp_path, real_model_dir):
    """vLLM's load_format="dummy": a directory with only config.json serves random weights of
    its shapes; ``tokenizer`` takes the tokenizer from another directory; serve's flags."""
    import argparse
    import shutil

    from server.cli import add_serve_arguments
    from tiny import tiny_config

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps(tiny_config(vocab_size=151936).to_hf_dict()))
    with pytest.raises(FileNotFoundError):
        LLM(str(config_only), warm_up=False, progress=False)  # no weights to read
    llm = LLM(str(config_only), load_format="dummy", tokenizer=str(real_model_dir), num_pages=32,
              max_model_len=64, warm_up=False, progress=False)
    assert llm.lm.config.hidden_size == 64 and llm.tokenizer.encode("hello") == [14990]
    out, = llm.generate(["hello"], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                        use_tqdm=False)
    assert len(out.token_ids) == 3 and isinstance(out.text, str)
    with pytest.raises(ValueError, match="load_format must be one of auto, safetensors, dummy"):
        LLM(str(config_only), load_format="pt")
    empty = tmp_path / "empty"
    shutil.copytree(config_only, empty)
    with pytest.raises(FileNotFoundError, match="is not a directory with tokenizer.json"):
        LLM(str(config_only), load_format="dummy", tokenizer=str(empty))
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([str(config_only), "--load-format", "dummy", "--tokenizer", "t"])
    assert (args.load_format, args.tokenizer) == ("dummy", "t")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import tiny_config, write_hf_checkpoint

    directory = tmp_path_factory.mktemp("tiny")
    write_hf_checkpoint(tiny_config(), directory)
    return directory


TINY = dict(dtype="float32", warm_up=False, progress=False)


def test_max_tokens_none_fills_the_room_the_prompt_leaves(tiny_dir):
    """vLLM's SamplingParams(max_tokens=None): as many tokens as the context leaves, through
    generate, stream (the engine's own path) and the engine's sampling_params; a max_tokens
    past the context is cut to that room (vLLM's offline engine)."""
    llm = LLM(str(tiny_dir), max_model_len=64, num_pages=32, page_size=8, **TINY)
    prompt = list(range(3, 53))  # 50 tokens: room for 64 + 1 - 50 = 15
    fill = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    out, = llm.generate([prompt], fill, use_tqdm=False)
    assert len(out.token_ids) == 15 and out.finish_reason == "length"
    streamed = [o for o in llm.stream(prompt, fill)]
    assert streamed[-1].token_ids == out.token_ids and streamed[-1].finish_reason == "length"
    assert llm.engine.sampling_params({"max_tokens": None}, len(prompt)).max_tokens == 15
    past, = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True),
                         use_tqdm=False)
    assert past.token_ids == out.token_ids and past.finish_reason == "length"
    # min_tokens must fit the room; the error names it and the limit.
    with pytest.raises(ValueError, match="prompt has 50 tokens and min_tokens is 20: 70 exceeds "
                                         "the max context of 64 "):
        llm.generate([prompt], SamplingParams(max_tokens=None, min_tokens=20), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt has 65 tokens; max context is 64"):
        llm.engine.add_request(list(range(3, 68)), fill)


def test_get_metrics_counts_under_vllms_names(tiny_dir):
    """LLM.get_metrics(): vLLM's Counter/Gauge objects and names (the ones the server's /metrics
    gives the same series), with exact counts through a preemption, a prefix cache hit and an
    abort."""
    from qwenjax.metrics import Counter, Gauge, Histogram
    from server.metrics import METRIC_ALIASES

    llm = LLM(str(tiny_dir), max_num_seqs=4, max_num_batched_tokens=16, prefill_chunk=8,
              max_prefill_seqs=2, page_size=8, max_model_len=96, num_pages=12,
              async_scheduling=False, **TINY)

    def read():
        metrics = llm.get_metrics()
        assert all(isinstance(m, (Counter, Gauge, Histogram)) for m in metrics)
        return {(m.name, tuple(m.labels.items())): m if isinstance(m, Histogram) else m.value
                for m in metrics}

    names = {name for name, _ in read()}
    assert names <= set(METRIC_ALIASES["vllm"].values())
    assert {"vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
            "vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
            "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
            "vllm:iteration_tokens_total"} <= names
    assert all((value.count if isinstance(value, Histogram) else value) == 0
               for value in read().values())
    rng = np.random.default_rng(0)
    first, second = rng.integers(3, 250, 30).tolist(), rng.integers(3, 250, 60).tolist()
    params = [SamplingParams(temperature=0.0, max_tokens=65, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)]
    outputs = llm.generate([first, second], params, use_tqdm=False)  # 95 + 80 tokens > 12 pages
    assert [len(o.token_ids) for o in outputs] == [65, 20]
    after = read()
    assert after[("vllm:prompt_tokens", ())] == 90  # once each, though preempted ones recompute
    assert after[("vllm:generation_tokens", ())] == 85
    assert after[("vllm:request_success", (("finished_reason", "length"),))] == 2
    assert after[("vllm:request_success", (("finished_reason", "stop"),))] == 0
    assert after[("vllm:num_preemptions", ())] == llm.engine.scheduler.num_preemptions >= 1
    # Every step computed ≤ 16 tokens (max_num_batched_tokens), the prompts' (again after a
    # preemption) and the generated ones but the last of each sequence.
    steps = after[("vllm:iteration_tokens_total", ())]
    assert steps.count == llm.engine.num_steps == steps.buckets["16.0"] == steps.buckets["+Inf"]
    assert steps.buckets["8.0"] < steps.count and steps.sum >= 90 + 85 - 2
    queries = after[("vllm:prefix_cache_queries", ())]
    assert queries >= 90 and after[("vllm:kv_cache_usage_perc", ())] == 0.0
    # A prompt twice: the second time its 2 full pages (16 of 20 tokens) are found cached.
    third = rng.integers(3, 250, 20).tolist()
    for _ in range(2):
        llm.generate([third], SamplingParams(max_tokens=1), use_tqdm=False)
    again = read()
    assert again[("vllm:prefix_cache_queries", ())] == queries + 40
    assert again[("vllm:prefix_cache_hits", ())] - after[("vllm:prefix_cache_hits", ())] == 16
    # While a stream runs it holds pages; leaving it early aborts it.
    stream = llm.stream(second, SamplingParams(max_tokens=30, ignore_eos=True))
    next(stream)
    running = read()
    assert running[("vllm:num_requests_running", ())] == 1
    assert running[("vllm:kv_cache_usage_perc", ())] == llm.engine.allocator.num_used / 12 > 0
    stream.close()
    assert read()[("vllm:request_success", (("finished_reason", "abort"),))] == 1


def test_start_and_stop_profile(tiny_dir, tmp_path, monkeypatch):
    """vLLM's LLM.start_profile/stop_profile: a jax.profiler trace of the calls between them, in
    a timestamped folder under profile_dir or vLLM's $VLLM_TORCH_PROFILER_DIR."""
    import gzip

    llm = LLM(str(tiny_dir), max_model_len=64, num_pages=16, page_size=8, **TINY)
    for name in ("QWENJAX_PROFILER_DIR", "VLLM_TORCH_PROFILER_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"pass profile_dir, or set \$QWENJAX_PROFILER_DIR or "
                                         r"\$VLLM_TORCH_PROFILER_DIR"):
        llm.start_profile()
    with pytest.raises(ValueError, match="no profile is running"):
        llm.stop_profile()
    with pytest.raises(ValueError, match="profile_prefix must be letters"):
        llm.start_profile("../up", profile_dir=tmp_path)
    llm.start_profile("run", profile_dir=tmp_path / "given")
    with pytest.raises(ValueError, match="a profile is already being written to .*given"):
        llm.start_profile(profile_dir=tmp_path)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    trace = llm.stop_profile()
    folder = pathlib.Path(trace["directory"])
    assert folder.parent == tmp_path / "given" and folder.name.startswith("run-")
    assert trace["trace"].startswith(str(folder)) and trace["summary"]["busy_us"] > 0
    with gzip.open(trace["trace"], "rt") as f:
        assert json.load(f)["traceEvents"]
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path / "vllm"))
    llm.start_profile()
    assert pathlib.Path(llm.stop_profile()["directory"]).parent == tmp_path / "vllm"


def test_hf_overrides_run_as_the_edited_config_json(tiny_dir, tmp_path):
    """LLM(hf_overrides=…) (vLLM's): YaRN given at load runs exactly as a checkpoint whose
    config.json says it, and not as the checkpoint without it."""
    import json
    import shutil

    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    edited = tmp_path / "edited"
    shutil.copytree(tiny_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]  # Qwen2.5's own (older) layout, as its docs edit it
    (edited / "config.json").write_text(json.dumps({**config, "rope_theta": theta, "rope_scaling": yarn}))
    prompt = list(range(3, 123))  # past the original 64 positions
    greedy = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0, ignore_eos=True)

    def run(model, **options):
        llm = LLM(str(model), max_model_len=256, num_pages=64, page_size=8, **TINY, **options)
        out, = llm.generate([prompt], greedy, use_tqdm=False)
        return llm, [lp.logprob for lp in out.logprobs]

    overridden, got = run(tiny_dir, hf_overrides={"rope_scaling": yarn})
    assert overridden.lm.config.max_context == 256 and overridden.lm.layout.config is overridden.lm.config
    edited_llm, want = run(edited)
    assert edited_llm.lm.config.rope_scaling == overridden.lm.config.rope_scaling
    assert got == pytest.approx(want, abs=1e-6)
    # (This random model's next-token logprobs barely depend on the input: YaRN moves them ~1e-4.)
    assert got != pytest.approx(run(tiny_dir)[1], abs=1e-6)
    with pytest.raises(ValueError, match="hf_overrides"):
        LLM(str(tiny_dir), hf_overrides={"num_hidden_layers": 1}, **TINY)


def test_output_kind_detokenize_and_vllms_other_sampling_fields(tiny_dir):
    """vLLM's output_kind (AsyncLLM streams: everything so far, only what is new, only the
    end), detokenize=False (token ids alone), extra_args carried; what cannot apply is named."""
    import asyncio

    from qwenjax import AsyncLLM
    from qwenjax.sampling_params import RequestOutputKind

    llm = AsyncLLM(str(tiny_dir), max_model_len=64, num_pages=32, page_size=8, **TINY)
    prompt = list(range(3, 13))
    try:
        def stream(kind, **more):
            params = SamplingParams(**{"temperature": 0.0, "max_tokens": 6, "ignore_eos": True,
                                       "output_kind": kind, "logprobs": 0,
                                       "extra_args": {"trace": 1}, **more})

            async def run():
                return [o async for o in llm.generate(prompt, params)]
            return asyncio.run(run())

        cumulative, delta, final = (stream(k) for k in RequestOutputKind)
        assert len(final) == 1 and final[0].token_ids == cumulative[-1].token_ids and len(final[0].token_ids) == 6
        assert [t for o in delta for t in o.token_ids] == final[0].token_ids
        assert [len(o.logprobs) for o in delta] == [len(o.token_ids) for o in delta]
        # (How many outputs a stream has depends on timing: steps that come together merge.)
        assert all(o.token_ids[len(o.token_ids) - len(o.delta_token_ids):] == o.delta_token_ids
                   and o.text.endswith(o.delta_text) for o in cumulative)
        assert cumulative[-1].text == final[0].text == "".join(o.text for o in delta)
        # n > 1 (vLLM's shape): streamed outputs are each one sequence's; FINAL_ONLY is one output
        # holding the n.
        sampled = dict(temperature=1.0, seed=5, n=3)
        streamed = stream(RequestOutputKind.CUMULATIVE, **sampled)
        [three] = stream(RequestOutputKind.FINAL_ONLY, **sampled)
        assert {o.index for o in streamed} == {0, 1, 2} and all(len(o.outputs) == 1 for o in streamed)
        assert [s.index for s in three.outputs] == [0, 1, 2] and three.finished
        assert all(s.finish_reason == "length" and len(s.token_ids) == 6 for s in three.outputs)
        last = {o.index: o.token_ids for o in streamed if o.finish_reason}
        assert [s.token_ids for s in three.outputs] == [last[i] for i in range(3)]
    finally:
        llm.shutdown()
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA
    with pytest.raises(ValueError, match="output_kind must be"):
        SamplingParams(output_kind=7)
    with pytest.raises(ValueError, match="spaces_between_special_tokens must be True"):
        SamplingParams(spaces_between_special_tokens=False)
    with pytest.raises(ValueError, match="need detokenize=True"):
        SamplingParams(detokenize=False, stop=["x"])


def test_detokenize_false_gives_token_ids_alone(lm):
    llm = LLM(lm, **SMALL)
    ids = llm.get_tokenizer().encode("def fib(n):")
    plain, bare = llm.generate([ids, ids], [SamplingParams(temperature=0.0, max_tokens=5),
                                            SamplingParams(temperature=0.0, max_tokens=5,
                                                           detokenize=False)], use_tqdm=False)
    assert plain.text and bare.text == "" and bare.token_ids == plain.token_ids


def test_llm_engine_steps_as_vllms(tiny_dir):
    """vLLM's LLMEngine loop (add_request, step while has_unfinished_requests): the same
    tokens as LLM.generate, each output_kind's shape, n > 1 sequences apart, aborts, and
    llm.llm_engine over an LLM's own engine."""
    from qwenjax import EngineArgs, LLMEngine
    from qwenjax.sampling_params import RequestOutputKind

    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_dir), max_model_len=64,
                                                   num_pages=32, page_size=8, **TINY))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 250, n).tolist() for n in (5, 9, 12, 7)]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("greedy", {"prompt_token_ids": prompts[0]}, greedy)
    engine.add_request("pair", prompts[1], SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=5,
                                                          ignore_eos=True))
    engine.add_request("final", prompts[2], dataclasses.replace(
        greedy, output_kind=RequestOutputKind.FINAL_ONLY))
    engine.add_request("delta", prompts[0], dataclasses.replace(
        greedy, output_kind=RequestOutputKind.DELTA))
    engine.add_request("cut", prompts[3], SamplingParams(temperature=0.0, max_tokens=40))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("greedy", prompts[0], greedy)
    # (max_tokens larger than the room the prompt leaves: cut to it, as LLM.generate.)
    engine.add_request("long", prompts[3], SamplingParams(temperature=0.0, max_tokens=500,
                                                          ignore_eos=True))
    assert engine.get_num_unfinished_requests() == 6
    seen: dict[str, list] = {}
    steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        if steps == 2:
            engine.abort_request(["cut"])
        for output in outputs:
            seen.setdefault(output.request_id, []).append(output)
    assert engine.get_num_unfinished_requests() == 0 and engine.step() == []
    reference = LLM(engine.lm, max_model_len=64, num_pages=32, page_size=8, **TINY).generate(
        [prompts[0], prompts[2], prompts[3]], greedy, use_tqdm=False)
    assert seen["greedy"][-1].token_ids == reference[0].token_ids and seen["greedy"][-1].finished
    assert all(o.token_ids == seen["greedy"][-1].token_ids[:len(o.token_ids)] for o in seen["greedy"])
    [final] = seen["final"]
    assert final.finished and final.token_ids == reference[1].token_ids
    assert [t for o in seen["delta"] for t in o.token_ids] == reference[0].token_ids
    pair = seen["pair"]
    assert {o.index for o in pair} == {0, 1} and all(len(o.outputs) == 1 for o in pair)
    assert sorted(len(o.token_ids) for o in pair if o.finish_reason) == [5, 5] and pair[-1].finished
    assert seen["cut"][-1].finish_reason == "abort"
    long = seen["long"][-1]
    # (The context holds the K/V of 64 tokens: the last token generated needs none.)
    assert long.finish_reason == "length" and len(prompts[3]) + len(long.token_ids) == 64 + 1
    assert long.token_ids[:6] == reference[2].token_ids

    # llm.llm_engine: the same loop over an LLM's engine; its tokenizer is the LLM's.
    llm = LLM(engine.lm, max_model_len=64, num_pages=32, page_size=8, **TINY)
    stepped = llm.llm_engine
    assert stepped is llm.llm_engine and stepped.get_tokenizer() is llm.get_tokenizer()
    stepped.add_request("again", prompts[2], greedy, prompt_text="the third")
    # generate runs meanwhile (stepping the same engine): it keeps the view's outputs for it.
    assert llm.generate([prompts[0]], greedy, use_tqdm=False)[0].token_ids == reference[0].token_ids
    assert not llm.engine.has_unfinished() and llm._held
    outputs = []
    while stepped.has_unfinished_requests():
        outputs += stepped.step()
    # (Held while generate ran: one output, the latest, with every delta since.)
    assert len(outputs) == 1 and outputs[0].finished
    assert outputs[0].delta_token_ids == outputs[0].token_ids == reference[1].token_ids
    assert outputs[-1].token_ids == reference[1].token_ids and outputs[-1].prompt == "the third"
    # And the other way: a stream's outputs wait while the view steps; an abandoned stream's
    # last output is dropped, not held.
    stream = llm.stream(prompts[0], greedy)
    first = next(stream)
    stepped.add_request("beside", prompts[2], greedy)
    while stepped.has_unfinished_requests():
        stepped.step()
    rest = list(stream)
    assert first.token_ids + [t for o in rest for t in o.delta_token_ids] == reference[0].token_ids
    abandoned = llm.stream(prompts[0], greedy)
    next(abandoned)
    abandoned.close()
    stepped.add_request("after", prompts[2], greedy)
    while stepped.has_unfinished_requests():
        stepped.step()
    assert llm._held == [] and llm._owners == set()
    # 6 tokens of each of the five requests run to the end, and the abandoned stream's first.
    generated = next(m.value for m in stepped.get_metrics() if m.name == "vllm:generation_tokens")
    assert 5 * 6 + 1 <= generated <= 5 * 6 + 6
    with pytest.raises(TypeError, match="unexpected keyword"):
        stepped.add_request("x", prompts[0], greedy, priorty=1)
