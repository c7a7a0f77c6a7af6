"""IncrementalDetokenizer against full decodes with the real Qwen2.5 tokenizer."""
import random

import pytest

from qwenjax.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.real_model

REPLACEMENT_CHAR = "\ufffd"

# Texts whose byte-level BPE tokens split characters: CJK, emoji (with ZWJ sequences, skin tones
# and flags), rare characters that fall back to single-byte tokens, and code.
STREAM_TEXTS = {
    "chinese": "我爱北京天安门。你好，世界！ 我们 龘靐齉爩 饕餮 魑魅魍魉，中文 测试。",
    "emoji": "Family: 👩‍👩‍👧 and 👨‍👩‍👧‍👦, thumbs 👍🏽, flag 🇫🇷, face 🙂!",
    "byte_fallback": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁𠀂 ꙮ 𓀀𓀁 ⿰",
    "mixed_code": 'def 问候(名字):\n    return f"你好, {名字} 👋"\n\nprint(问候("世界"))  # 🌍\n',
    "replacement_chars": "a\ufffd\ufffd b \ufffd c",
    "ascii_code": "for (int i = 0; i < 10; ++i) {\n    printf(\"%d\\n\", i);\n}\n",
}

CORPUS = [
    *STREAM_TEXTS.values(),
    "The quick brown fox jumps over the lazy dog. " * 3,
    "日本語のテキストと한국어 텍스트, Ωμέγα, Привет, مرحبا, שלום",
    "import numpy as np\r\nx = np.zeros((3, 4), dtype=np.float32)\r\n",
    "<|im_start|>assistant\nSure! Here it is:<|im_end|>\n<tool_call>{\"a\": 1}</tool_call>",
    "1234567890 3.14159 1e-6 0xDEADBEEF\t\t\n\n\n    indented",
    "Cafe\u0301 and Caf\u00e9 — “quotes” … ½ ∑ ∫ √",
]


def stream(tokenizer, output_ids, *, chunks=None, prompt_ids=(), **options):
    """Feed `output_ids` in chunks (default: one token at a time); returns (detok, deltas)."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **options)
    sizes = chunks or [1] * len(output_ids)
    deltas, start = [], 0
    for size in sizes:
        deltas.append(detok.add(output_ids[start : start + size]))
        start += size
    assert start >= len(output_ids)
    deltas.append(detok.finish())
    return detok, deltas


def random_chunks(rng, total, max_size=7):
    sizes = []
    while sum(sizes) < total:
        sizes.append(rng.randint(1, max_size))
    return sizes


def assert_deltas_in_place(deltas, full):
    """Every delta is exactly the text of the full decode at its offset: in particular, no delta
    holds a U+FFFD where the full decode has a real character."""
    offset = 0
    for index, delta in enumerate(deltas):
        assert delta == full[offset : offset + len(delta)], (index, delta, full[offset:])
        offset += len(delta)
    assert offset == len(full)


@pytest.mark.parametrize("name", sorted(STREAM_TEXTS))
def test_token_by_token_matches_full_decode(tokenizer, name):
    ids = tokenizer.encode(STREAM_TEXTS[name])
    full = tokenizer.decode(ids)
    detok, deltas = stream(tokenizer, ids)
    assert_deltas_in_place(deltas, full)
    assert detok.text == full
    assert not detok.stopped and detok.matched_stop is None
    if name in ("chinese", "emoji", "byte_fallback", "mixed_code"):
        # The test means something only if some tokens really end mid-character.
        assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("name", sorted(STREAM_TEXTS))
def test_holds_back_at_most_the_unfinished_character(tokenizer, name):
    """After each token, the text emitted is the decode so far minus at most one trailing U+FFFD
    (a character whose remaining bytes have not arrived)."""
    ids = tokenizer.encode(STREAM_TEXTS[name])
    detok = IncrementalDetokenizer(tokenizer, [])
    emitted = ""
    for count, token_id in enumerate(ids, start=1):
        emitted += detok.add([token_id])
        so_far = tokenizer.decode(ids[:count])
        if so_far.endswith(REPLACEMENT_CHAR):
            assert emitted == so_far[:-1], count
        else:
            assert emitted == so_far, count


def test_ascii_stream_is_not_delayed(tokenizer):
    ids = tokenizer.encode(STREAM_TEXTS["ascii_code"])
    # Neither stop string starts with a character of the text, so nothing is ever held back.
    detok = IncrementalDetokenizer(tokenizer, [], stop=["@@stop", "STOP"])
    for token_id in ids:
        assert detok.add([token_id]) == tokenizer.decode([token_id])
    assert detok.finish() == ""


@pytest.mark.parametrize("seed", range(5))
def test_random_chunks_match_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    for text in STREAM_TEXTS.values():
        ids = tokenizer.encode(text)
        full = tokenizer.decode(ids)
        detok, deltas = stream(tokenizer, ids, chunks=random_chunks(rng, len(ids)))
        assert_deltas_in_place(deltas, full)
        assert detok.text == full


def test_byte_garbage_streams_match_full_decode(tokenizer):
    """Random byte-level tokens (ids < 256 are single bytes) make invalid and unfinished UTF-8
    everywhere; the stream must still reproduce the full decode, U+FFFDs included."""
    rng = random.Random(1)
    im_end = tokenizer.encode("<|im_end|>")[0]
    for _ in range(300):
        ids = [
            rng.randrange(256) if rng.random() < 0.8 else rng.randrange(256, 151000) for _ in range(30)
        ]
        if rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids)), im_end)
        for skip in (True, False):
            full = tokenizer.decode(ids, skip_special_tokens=skip)
            detok, deltas = stream(
                tokenizer, ids, chunks=random_chunks(rng, len(ids), 4), skip_special_tokens=skip
            )
            assert_deltas_in_place(deltas, full)


def test_prompt_context_does_not_change_the_output(tokenizer):
    output_ids = tokenizer.encode(" hello 世界")
    chat_prompt = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    for prompt_ids in ([], chat_prompt, chat_prompt[-2:], tokenizer.encode("你好")):
        detok, deltas = stream(tokenizer, output_ids, prompt_ids=prompt_ids)
        assert detok.text == " hello 世界", prompt_ids


def test_prompt_ending_mid_character(tokenizer):
    prompt_ids = tokenizer.encode("hi 𝔘")
    assert REPLACEMENT_CHAR in tokenizer.decode(prompt_ids[-1:])
    # The output continues the prompt's unfinished bytes; on its own it decodes to U+FFFD there.
    output_ids = tokenizer.encode("𝔘 ok")[1:]
    full = tokenizer.decode(output_ids)
    assert full.startswith(REPLACEMENT_CHAR)
    detok, deltas = stream(tokenizer, output_ids, prompt_ids=prompt_ids[:-1])
    assert detok.text == full


def token_offsets(tokenizer, ids):
    """Character offset where each token's text starts (for texts whose prefixes decode cleanly)."""
    return [len(tokenizer.decode(ids[:count])) for count in range(len(ids) + 1)]


@pytest.mark.parametrize("stop", ["ick bro", "ick brown fox ju", "e lazy d"])
def test_stop_spanning_token_boundaries(tokenizer, stop):
    text = "The quick brown fox jumps over the lazy dog and runs away."
    ids = tokenizer.encode(text)
    offsets = token_offsets(tokenizer, ids)
    start, end = text.index(stop), text.index(stop) + len(stop)
    # The stop starts strictly inside a token and ends inside a later one.
    assert start not in offsets and end not in offsets
    completing_token = next(i for i in range(len(ids)) if offsets[i + 1] >= end)
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    deltas = []
    for index, token_id in enumerate(ids):
        deltas.append(detok.add([token_id]))
        assert detok.stopped == (index >= completing_token), index
    deltas.append(detok.finish())
    assert detok.matched_stop == stop
    assert detok.text == text[:start]
    assert "".join(deltas) == text[:start]
    assert all(delta == "" for delta in deltas[completing_token + 1 :])


@pytest.mark.parametrize("stop", ["Hel", "Hello"])
def test_stop_at_the_first_token(tokenizer, stop):
    ids = tokenizer.encode("Hello world")
    assert tokenizer.decode(ids[:1]) == "Hello"
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    assert detok.add(ids[:1]) == ""
    assert detok.stopped and detok.matched_stop == stop
    assert detok.add(ids[1:]) == ""
    assert detok.finish() == ""
    assert detok.text == ""


def test_partial_stop_at_the_end_is_released_by_finish(tokenizer):
    ids = tokenizer.encode("Hello wor")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["world"])
    streamed = "".join(detok.add([token_id]) for token_id in ids)
    assert streamed == "Hello "
    assert detok.finish() == "wor"
    assert detok.text == "Hello wor"
    assert not detok.stopped and detok.matched_stop is None


def longest_stop_prefix_tail(text, stops):
    lengths = [
        k
        for k in range(1, len(text) + 1)
        for stop in stops
        if len(stop) > k and stop.startswith(text[-k:])
    ]
    return max(lengths, default=0)


def test_holds_back_only_a_possible_stop_prefix(tokenizer):
    """Held text is the longest tail that is a proper prefix of a stop string, no more."""
    text = "if a < b and c </ d then </ans x </answe"
    stops = ["</answer>", "<end>"]
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=stops)
    emitted = ""
    for count, token_id in enumerate(ids, start=1):
        emitted += detok.add([token_id])
        so_far = tokenizer.decode(ids[:count])
        assert emitted == so_far[: len(so_far) - longest_stop_prefix_tail(so_far, stops)], so_far
    assert emitted == "if a < b and c </ d then </ans x "
    assert detok.finish() == "</answe"


def test_earliest_stop_occurrence_wins(tokenizer):
    ids = tokenizer.encode("Hello world, bye")
    detok, _ = stream(tokenizer, ids, stop=["world", "Hello", "bye"])
    assert detok.matched_stop == "Hello" and detok.text == ""
    detok, _ = stream(tokenizer, ids, stop=["bye", "world"])
    assert detok.matched_stop == "world" and detok.text == "Hello "


def test_overlapping_stops_cut_at_the_earliest_start(tokenizer):
    """"own" completes before "brown fox" does, but "brown fox" starts earlier: the detokenizer
    waits until "brown fox" is decided either way."""
    stops = ["own", "brown fox"]
    detok, _ = stream(tokenizer, tokenizer.encode("The brown fox ran"), stop=stops)
    assert detok.matched_stop == "brown fox" and detok.text == "The "
    detok, _ = stream(tokenizer, tokenizer.encode("The brown fix ran"), stop=stops)
    assert detok.matched_stop == "own" and detok.text == "The br"
    # The stream ends while "brown fox" is still possible: finish() settles on "own".
    detok = IncrementalDetokenizer(tokenizer, [], stop=stops)
    assert "".join(detok.add([i]) for i in tokenizer.encode("The brown")) == "The "
    assert not detok.stopped
    assert detok.finish() == "br"
    assert detok.stopped and detok.matched_stop == "own" and detok.text == "The br"
    # include_stop keeps the matched stop string, found the same way.
    detok, deltas = stream(tokenizer, tokenizer.encode("The brown fox ran"), stop=stops, include_stop=True)
    assert detok.matched_stop == "brown fox" and detok.text == "".join(deltas) == "The brown fox"
    detok = IncrementalDetokenizer(tokenizer, [], stop=stops, include_stop=True)
    assert "".join(detok.add([i]) for i in tokenizer.encode("The brown")) == "The "
    assert detok.finish() == "brown" and detok.text == "The brown"


@pytest.mark.parametrize("stop", ["北京", "爱北", "。你", "👧"])
def test_stop_with_multibyte_characters(tokenizer, stop):
    text = "我爱北京天安门。你好 👩‍👩‍👧 end"
    ids = tokenizer.encode(text)
    detok, deltas = stream(tokenizer, ids, stop=[stop])
    assert detok.matched_stop == stop
    assert detok.text == text[: text.index(stop)]
    assert_deltas_in_place(deltas, detok.text)


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("Hi there<|im_end|><tool_call>x</tool_call><|endoftext|>")
    detok, deltas = stream(tokenizer, ids, skip_special_tokens=False)
    assert detok.text == "Hi there<|im_end|><tool_call>x</tool_call><|endoftext|>"
    # <tool_call> is an added token but not a special one, so it stays.
    detok, deltas = stream(tokenizer, ids)
    assert detok.text == "Hi there<tool_call>x</tool_call>"
    detok, deltas = stream(tokenizer, ids, skip_special_tokens=False, stop=["<|im_end|>"])
    assert detok.matched_stop == "<|im_end|>" and detok.text == "Hi there"
    # Skipped tokens are not text, so they cannot match a stop string.
    detok, deltas = stream(tokenizer, ids, stop=["<|im_end|>"])
    assert not detok.stopped and detok.text == "Hi there<tool_call>x</tool_call>"


def test_invalid_use(tokenizer):
    with pytest.raises(ValueError, match=r"stop\[1\]"):
        IncrementalDetokenizer(tokenizer, [], stop=["a", ""])
    with pytest.raises(ValueError, match="sequence of strings"):
        IncrementalDetokenizer(tokenizer, [], stop="abc")
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(tokenizer.encode("hi")) == "hi"
    assert detok.finish() == ""
    assert detok.finish() == ""
    with pytest.raises(RuntimeError, match="after finish"):
        detok.add([1])


def test_random_streams_cut_at_first_stop_occurrence(tokenizer):
    """Random slices of a varied corpus (slices may start or end mid-character), random stops
    taken from the decoded text, random chunking: the result is the full decode cut at the
    earliest occurrence of any stop."""
    rng = random.Random(1234)
    encoded = [tokenizer.encode(text) for text in CORPUS]
    stopped_cases = 0
    for case in range(400):
        ids = [i for _ in range(rng.randint(1, 3)) for i in rng.choice(encoded)]
        start = rng.randrange(len(ids))
        output_ids = ids[start : start + rng.randint(1, 60)]
        prompt_ids = rng.choice(encoded)[: rng.randint(0, 8)]
        skip = rng.random() < 0.7
        full = tokenizer.decode(output_ids, skip_special_tokens=skip)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if full and rng.random() < 0.8:
                at = rng.randrange(len(full))
                stops.append(full[at : at + rng.randint(1, 10)])
            else:
                other = rng.choice(CORPUS)
                at = rng.randrange(len(other))
                stops.append(other[at : at + rng.randint(1, 6)])
        detok, deltas = stream(
            tokenizer,
            output_ids,
            chunks=random_chunks(rng, len(output_ids), 6),
            prompt_ids=prompt_ids,
            skip_special_tokens=skip,
            stop=stops,
        )
        found = [full.find(stop) for stop in stops if stop in full]
        cut = min(found, default=len(full))
        context = (case, output_ids, stops, skip)
        assert detok.text == full[:cut], context
        assert "".join(deltas) == detok.text, context
        assert detok.stopped == bool(found), context
        if found:
            stopped_cases += 1
            assert full.find(detok.matched_stop) == cut, context
    assert stopped_cases > 200


class CountingTokenizer:
    """The tokenizer, counting the token ids the detokenizer has it decode."""

    def __init__(self, tokenizer):
        self._tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self._tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def decoded_per_token(tokenizer, ids, stops) -> tuple[float, str]:
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, [], stop=stops)
    for token_id in ids:
        detok.add([token_id])
    detok.finish()
    return counting.decoded / len(ids), detok.text


@pytest.mark.parametrize("kind", ["corpus", "replacement_tokens"])
def test_cost_per_token_does_not_grow(tokenizer, kind):
    """The work per token (token ids decoded again, counted rather than timed) stays the same
    over a 2000- and a 4000-token stream: nothing re-decodes the whole output."""
    if kind == "corpus":
        ids = []
        while len(ids) < 4000:
            ids += tokenizer.encode(" ".join(CORPUS))
    else:
        # A single token that decodes to "\ufffd\ufffd": every prefix ends in U+FFFD, the case
        # where a naive detokenizer never settles and re-decodes the whole output each step.
        ids = tokenizer.encode("\ufffd\ufffd")
        assert len(ids) == 1
        ids = ids * 4000
    stops = ["<|stop|>", "\n\n\n\n\n", "zzz"]
    cost_2000, text_2000 = decoded_per_token(tokenizer, ids[:2000], stops)
    cost_4000, text_4000 = decoded_per_token(tokenizer, ids[:4000], stops)
    assert text_2000 == tokenizer.decode(ids[:2000])
    assert text_4000 == tokenizer.decode(ids[:4000])
    assert 0 < cost_2000 < 24 and cost_4000 < 1.2 * cost_2000, (cost_2000, cost_4000)


# ---- stop regexes (SGLang's stop_regex) ----------------------------------------------------


def test_literal_stop_regexes_stop_exactly_as_stop_strings(tokenizer):
    """A stop regex that is an escaped string holds back and cuts exactly as the string does."""
    import regex

    rng = random.Random(99)
    encoded = [tokenizer.encode(text) for text in CORPUS]
    stopped = 0
    for case in range(150):
        ids = [i for _ in range(rng.randint(1, 2)) for i in rng.choice(encoded)]
        output_ids = ids[rng.randrange(len(ids)):][:50]
        full = tokenizer.decode(output_ids)
        stops = []
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(max(1, len(full)))
            stops.append(full[at: at + rng.randint(1, 8)] or "x")
        chunks = random_chunks(rng, len(output_ids), 4)
        by_string, string_deltas = stream(tokenizer, output_ids, chunks=chunks, stop=stops)
        by_regex, regex_deltas = stream(tokenizer, output_ids, chunks=chunks,
                                        stop_regex=[regex.escape(s) for s in stops])
        assert (by_regex.text, regex_deltas, by_regex.stopped) == \
            (by_string.text, string_deltas, by_string.stopped), (case, stops)
        if by_string.stopped:
            stopped += 1
            assert by_regex.matched_stop == regex.escape(by_string.matched_stop)
    assert stopped > 60


def test_stop_regex_holds_back_a_possible_match_and_cuts_at_it(tokenizer):
    ids = tokenizer.encode("Step 12 done. Step 13. More")
    detok = IncrementalDetokenizer(tokenizer, [], stop_regex=[r"Step \d+\."])
    streamed = []
    for token_id in ids:
        streamed.append(detok.add([token_id]))
        so_far = "".join(streamed)
        # "Step 12" may still become a match: nothing from "Step" on is released until " done".
        assert not so_far.startswith("Step") or "done" in so_far, so_far
    assert detok.stopped and detok.matched_stop == r"Step \d+\."
    assert detok.text == "Step 12 done. " and "".join(streamed) == detok.text
    kept, _ = stream(tokenizer, ids, stop_regex=[r"Step \d+\."], include_stop=True)
    assert kept.text == "Step 12 done. Step 13."
    # Both a string and a regex: the earliest match wins, whichever it is.
    both, _ = stream(tokenizer, ids, stop=["done"], stop_regex=[r"\d\d"])
    assert both.text == "Step " and both.matched_stop == r"\d\d"


def test_stop_regex_sees_emitted_text_for_lookbehind(tokenizer):
    ids = tokenizer.encode("x = 1\ny = 2\nreturn x")
    detok, _ = stream(tokenizer, ids, stop_regex=[r"(?<=\n)return\b"])
    assert detok.text == "x = 1\ny = 2\n" and detok.stopped
    unreleased, deltas = stream(tokenizer, tokenizer.encode("Step 7"), stop_regex=[r"Step \d+\."])
    assert not unreleased.stopped and unreleased.text == "Step 7" and deltas[-1] == "Step 7"


def test_invalid_stop_regexes_are_refused_by_name(tokenizer):
    from qwenjax.sampling import SamplingParams

    with pytest.raises(ValueError, match=r"stop_regex '\(' is not a valid regular expression"):
        SamplingParams(stop_regex="(")
    with pytest.raises(ValueError, match="matches the empty string"):
        SamplingParams(stop_regex=[r"\d*"])
    with pytest.raises(ValueError, match="sequence of strings"):
        IncrementalDetokenizer(tokenizer, [], stop_regex=r"\d")
    assert SamplingParams(stop_regex=r"\d+\.").stop_regex == (r"\d+\.",)
