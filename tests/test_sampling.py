"""Sampling: parameter validation, the batch builder, and the sampler against exact references."""
from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.sampling import (
    SamplingBatch, SamplingParams, SamplingRow, apply_penalties, build_sampling_batch,
    count_output_token, sample, table_width)

try:
    from scipy import stats as scipy_stats
except ImportError:  # scipy is not a dependency; fall back to the regularised gamma function
    scipy_stats = None

_sample = jax.jit(sample, static_argnames=("num_top",))


def run(logits, rows, num_rows=None, num_top=0):
    batch = build_sampling_batch(rows, num_rows or len(rows))
    return jax.device_get(_sample(jnp.asarray(logits, jnp.float32), batch, num_top=num_top))


def chi2_pvalue(stat: float, dof: int) -> float:
    if scipy_stats is not None:
        return float(scipy_stats.chi2.sf(stat, dof))
    return float(jax.scipy.special.gammaincc(dof / 2.0, stat / 2.0))


# --------------------------------------------------------------------------- params

BAD_PARAMS = [
    ("n", dict(n=0)),
    ("n", dict(n=129)),
    ("n", dict(n=2.0)),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=-3)),
    ("max_tokens", dict(max_tokens=True)),
    ("max_tokens", dict(max_tokens=10.0)),
    ("max_tokens", dict(max_tokens="10")),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=11, max_tokens=10)),
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature=float("inf"))),
    ("temperature", dict(temperature="0.7")),
    ("temperature", dict(temperature=True)),
    ("top_k", dict(top_k=-2)),
    ("top_k", dict(top_k=5.0)),
    ("top_k", dict(top_k=False)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_p", dict(top_p=float("nan"))),
    ("min_p", dict(min_p=-0.01)),
    ("min_p", dict(min_p=1.01)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("repetition_penalty", dict(repetition_penalty=float("inf"))),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("presence_penalty", dict(presence_penalty=float("-inf"))),
    ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("seed", dict(seed=-2)),  # -1 is vLLM's "no seed"
    ("seed", dict(seed=2**63)),
    ("seed", dict(seed=1.5)),
    ("seed", dict(seed=True)),
    ("stop", dict(stop="")),
    ("stop", dict(stop=["ok", ""])),
    ("stop", dict(stop=["x"] * 17)),
    ("stop", dict(stop=["a" * 257])),
    ("stop", dict(stop=[3])),
    ("stop", dict(stop=5)),
    ("stop_regex", dict(stop_regex=5)),
    ("stop_token_ids", dict(stop_token_ids=[1, -2])),
    ("stop_token_ids", dict(stop_token_ids=[1.0])),
    ("stop_token_ids", dict(stop_token_ids=[True])),
    ("ignore_eos", dict(ignore_eos=1)),
    ("skip_special_tokens", dict(skip_special_tokens="no")),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=21)),
    ("logprobs", dict(logprobs=2.0)),
    ("logprobs", dict(logprobs="1")),
    ("logit_bias", dict(logit_bias=[(1, 2.0)])),
    ("logit_bias keys", dict(logit_bias={-1: 2.0})),
    ("logit_bias keys", dict(logit_bias={"five": 2.0})),
    ("logit_bias keys", dict(logit_bias={"-3": 2.0})),
    ("logit_bias keys", dict(logit_bias={"2.5": 2.0})),
    ("logit_bias keys", dict(logit_bias={2.0: 2.0})),
    (r"logit_bias\[5\]", dict(logit_bias={5: "1.5"})),
    (r"logit_bias\[5\]", dict(logit_bias={"5": True})),
    (r"logit_bias\[5\]", dict(logit_bias={5: float("nan")})),
    ("logit_bias", dict(logit_bias={i: 1.0 for i in range(1025)})),
    ("allowed_token_ids", dict(allowed_token_ids=[])),
    ("allowed_token_ids", dict(allowed_token_ids=[3, -1])),
    ("allowed_token_ids", dict(allowed_token_ids=5)),
    ("prompt_logprobs", dict(prompt_logprobs=21)),
    ("prompt_logprobs", dict(prompt_logprobs=-1)),
    ("bad_words", dict(bad_words=[" "])),
    ("bad_words", dict(bad_words=["ok", ""])),
    ("bad_words", dict(bad_words=["w"] * 129)),
    ("bad_words", dict(bad_words=[7])),
    ("truncate_prompt_tokens", dict(truncate_prompt_tokens=0)),
    ("truncate_prompt_tokens", dict(truncate_prompt_tokens=-2)),
    ("truncate_prompt_tokens", dict(truncate_prompt_tokens=3.0)),
]


@pytest.mark.parametrize("field,kwargs", BAD_PARAMS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_PARAMS)])
def test_bad_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field) as err:
        SamplingParams(**kwargs)
    # The message also carries the offending value or a description of it.
    value = next(iter(kwargs.values())) if len(kwargs) == 1 else kwargs[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_good_params_normalize():
    p = SamplingParams(stop="###", stop_token_ids=[7, np.int64(9)], temperature=1, top_k=np.int32(5),
                       seed=2**63 - 1, logprobs=20)
    assert p.stop == ("###",)
    assert p.stop_token_ids == (7, 9) and all(type(i) is int for i in p.stop_token_ids)
    assert type(p.temperature) is float and p.temperature == 1.0
    assert type(p.top_k) is int and p.top_k == 5
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=4).stop_token_ids == (4,)
    assert SamplingParams(stop=["s" * 256] * 16).stop[0] == "s" * 256  # the limits are inclusive
    assert SamplingParams(stop="\n").stop == ("\n",)  # whitespace is a fine stop string
    assert SamplingParams(bad_words="hello").bad_words == ("hello",)
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt_tokens == -1
    assert SamplingParams(min_tokens=5, max_tokens=5, presence_penalty=-2, frequency_penalty=2).min_tokens == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


# --------------------------------------------------------------------------- vLLM's spellings


def test_vllm_none_lists_are_empty():
    p = SamplingParams(stop=None, stop_token_ids=None, bad_words=None, stop_regex=None,
                       allowed_token_ids=None, logit_bias=None)
    assert (p.stop, p.stop_token_ids, p.bad_words, p.stop_regex) == ((), (), (), ())
    assert p == SamplingParams()


def test_vllm_seed_minus_one_and_boolean_logprobs():
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=np.int64(-1)).seed is None
    assert SamplingParams(seed=0).seed == 0  # 0 is a seed, not "no seed"
    p = SamplingParams(logprobs=True, prompt_logprobs=True)
    assert (p.logprobs, p.prompt_logprobs) == (1, 1) and type(p.logprobs) is int
    p = SamplingParams(logprobs=False, prompt_logprobs=np.bool_(False))
    assert (p.logprobs, p.prompt_logprobs) == (None, None)
    assert SamplingParams(logprobs=0).logprobs == 0  # 0 (the chosen token alone) stays 0


def test_logit_bias_takes_string_token_ids_and_clamps():
    p = SamplingParams(logit_bias={"42": -150, 7: 300.0, "9": 1, np.int32(3): float("-inf"),
                                   "11": np.float32(0.5)})
    assert p.logit_bias == {42: -100.0, 7: 100.0, 9: 1.0, 3: -100.0, 11: 0.5}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    assert [t for _, t in p.token_ids_named()] == [42, 7, 9, 3, 11]  # checked against the vocab
    # The clamped bias is what the sampler adds: -1e9 is -100, which a logit 150 above the
    # others survives (unclamped it would be banned); +1e9 is +100, enough to lift one 50 below.
    logits = np.zeros((2, 16), np.float32)
    logits[0, 5], logits[1, 5] = 150.0, -50.0
    rows = [SamplingRow(SamplingParams(temperature=0, logit_bias={"5": -1e9}), seed=0, step=0),
            SamplingRow(SamplingParams(temperature=0, logit_bias={"5": 1e9}), seed=0, step=0)]
    assert run(logits, rows).token_ids.tolist() == [5, 5]


def test_clone_is_a_deep_copy():
    from qwenjax.structured import StructuredOutputs

    p = SamplingParams(logit_bias={4: 2.0}, stop=["x"], seed=3,
                       structured_outputs=StructuredOutputs(json={"type": "object", "properties": {}}))
    q = p.clone()
    assert q == p and q is not p and type(q) is SamplingParams
    q.logit_bias[4] = -1.0  # a caller mutating its copy's dict (the dataclass is frozen, dicts are not)
    q.structured_outputs.json["properties"]["a"] = {"type": "string"}
    assert p.logit_bias == {4: 2.0} and p.structured_outputs.json["properties"] == {}


def test_max_tokens_none_means_the_room_the_context_leaves():
    """vLLM's max_tokens=None: accepted (the engine sets the number once it knows the prompt:
    Engine.filled), min_tokens then unbounded here; a number must still be ≥ 1."""
    p = SamplingParams(max_tokens=None, min_tokens=500)
    assert p.max_tokens is None and p.min_tokens == 500
    assert dataclasses.replace(p, max_tokens=600).max_tokens == 600
    with pytest.raises(ValueError, match=r"min_tokens must be ≤ max_tokens \(400\), got 500"):
        dataclasses.replace(p, max_tokens=400)
    with pytest.raises(ValueError, match="max_tokens must be None .fill the context. or an int ≥ 1, got 0"):
        SamplingParams(max_tokens=0)


def test_from_optional_leaves_none_at_the_defaults():
    p = SamplingParams.from_optional(temperature=None, top_p=None, seed=None, stop=None,
                                     n=None, logit_bias={"5": 200}, top_k=5)
    assert p == SamplingParams(top_k=5, logit_bias={5: 100.0})
    assert (p.temperature, p.top_p, p.max_tokens, p.n, p.seed) == (1.0, 1.0, 256, 1, None)
    assert SamplingParams.from_optional() == SamplingParams()
    # max_tokens None is a value (fill the context), kept as vLLM's from_optional keeps it.
    assert SamplingParams.from_optional(max_tokens=None, temperature=None).max_tokens is None
    with pytest.raises(TypeError, match="no_such_field"):
        SamplingParams.from_optional(no_such_field=1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.from_optional(temperature=-1.0)


def test_guided_decoding_is_structured_outputs_older_name():
    from qwenjax.structured import StructuredOutputs

    spec = StructuredOutputs(regex="[ab]+")
    p = SamplingParams(guided_decoding=spec, temperature=0)
    assert p.structured_outputs is spec and p.guided_decoding is None
    assert p == SamplingParams(structured_outputs=spec, temperature=0)
    assert "guided_decoding" not in repr(p)
    assert SamplingParams(guided_decoding={"choice": ["x", "y"]}).structured_outputs == \
        StructuredOutputs(choice=("x", "y"))
    # dataclasses.replace passes every field again: guided_decoding is None there, no conflict.
    q = dataclasses.replace(p, temperature=0.5)
    assert q.structured_outputs is spec and q.temperature == 0.5
    assert dataclasses.replace(p, structured_outputs=None).structured_outputs is None
    with pytest.raises(ValueError, match="structured_outputs or guided_decoding"):
        SamplingParams(structured_outputs=spec, guided_decoding=StructuredOutputs(regex="c"))
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(guided_decoding="[ab]+")


def test_structured_outputs_takes_vllms_options():
    import qwenjax
    from qwenjax.structured import StructuredOutputs

    assert qwenjax.StructuredOutputsParams is StructuredOutputs
    assert qwenjax.GuidedDecodingParams is StructuredOutputs
    assert {"StructuredOutputsParams", "GuidedDecodingParams"} <= set(qwenjax.__all__)
    spec = qwenjax.StructuredOutputsParams(json={"type": "object"}, json_object=None, disable_fallback=True,
                                           disable_any_whitespace=True, disable_additional_properties=True,
                                           whitespace_pattern=r"[ ]?")
    assert spec.json_object is False and spec.disable_any_whitespace and spec.whitespace_pattern == "[ ]?"
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(json_object=None)
    for field, bad in [("disable_any_whitespace", 1), ("disable_fallback", "yes"),
                       ("disable_additional_properties", None), ("whitespace_pattern", ""),
                       ("whitespace_pattern", 3)]:
        with pytest.raises(ValueError, match=f"structured_outputs.{field}"):
            StructuredOutputs(regex="a", **{field: bad})
    # One backend: disable_fallback changes nothing; the JSON options leave other constraints alone.
    assert (StructuredOutputs(json={"type": "object"}, disable_fallback=True).grammar_text()
            == StructuredOutputs(json={"type": "object"}).grammar_text())
    assert (StructuredOutputs(regex="a b", disable_any_whitespace=True, whitespace_pattern=" ",
                              disable_additional_properties=True).grammar_text()
            == StructuredOutputs(regex="a b").grammar_text())


def test_disable_additional_properties_closes_each_object_schema():
    from qwenjax.structured import _without_additional_properties

    item = {"type": "object", "properties": {"id": {"type": "integer"}}}
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "string"},  # a property named "properties" is not a schema map
            "tags": {"type": "array", "items": item},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "either": {"anyOf": [item, {"type": "null"}]},
            "ref": {"$ref": "#/$defs/Point"},
        },
        "$defs": {"Point": {"type": "object", "patternProperties": {"^x": {"type": "number"}}}},
        "enum_like": {"const": {"properties": {"a": 1}}},  # data, not a schema
    }
    closed = {**item, "additionalProperties": False}
    assert _without_additional_properties(schema) == {
        "type": "object",
        "properties": {
            "properties": {"type": "string"},
            "tags": {"type": "array", "items": closed},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "either": {"anyOf": [closed, {"type": "null"}]},
            "ref": {"$ref": "#/$defs/Point"},
        },
        "$defs": {"Point": {"type": "object", "patternProperties": {"^x": {"type": "number"}},
                            "additionalProperties": False}},
        "enum_like": {"const": {"properties": {"a": 1}}},
        "additionalProperties": False,
    }
    assert "additionalProperties" not in item and "additionalProperties" not in schema  # not mutated


def test_json_options_shape_what_the_grammar_takes(tokenizer):
    """disable_any_whitespace, whitespace_pattern and disable_additional_properties, through the
    real tokenizer's llguidance matcher: text is taken when every token is and the JSON is whole."""
    from qwenjax.structured import GrammarCompiler, StructuredOutputs

    compiler = GrammarCompiler(tokenizer.to_json(), 151936, tokenizer.eos_token_ids)

    def takes(spec, text):
        matcher = compiler.matcher(spec)
        return all(matcher.advance(t) for t in tokenizer.encode(text)) and matcher.done

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    spaced = ['{"a": 1}', '{ "a" : 1 }', '{\n  "a": 1\n}']
    assert takes(StructuredOutputs(json=schema), '{"a":1}')
    assert all(takes(StructuredOutputs(json=schema), text) for text in spaced)
    compact = StructuredOutputs(json=schema, disable_any_whitespace=True)
    assert takes(compact, '{"a":1}')
    assert not any(takes(compact, text) for text in spaced)
    one_space = StructuredOutputs(json=schema, whitespace_pattern=" ")
    assert takes(one_space, '{"a": 1}') and takes(one_space, '{ "a" : 1 }')
    assert not takes(one_space, '{"a":  1}') and not takes(one_space, '{"a":\n1}')
    any_object = StructuredOutputs(json_object=True, disable_any_whitespace=True)
    assert takes(any_object, '{"x":[1,2]}') and not takes(any_object, '{"x": [1, 2]}')

    extra = '{"a":1,"b":2}'
    assert takes(StructuredOutputs(json=schema), extra)
    assert not takes(StructuredOutputs(json=schema, disable_additional_properties=True), extra)
    assert takes(StructuredOutputs(json=schema, disable_additional_properties=True), '{"a":1}')

    with pytest.raises(ValueError, match=r"^structured_outputs\.whitespace_pattern must be a regex"):
        compiler.matcher(StructuredOutputs(json=schema, whitespace_pattern="("))


def test_greedy_and_uses_penalties():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy
    assert not SamplingParams().uses_penalties
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(presence_penalty=-0.5).uses_penalties
    assert SamplingParams(frequency_penalty=0.1).uses_penalties


# --------------------------------------------------------------------------- builder


def test_table_width_buckets():
    assert [table_width(n) for n in (0, 1, 15, 16, 17, 100, 1024, 1025)] == [
        0, 16, 16, 16, 32, 128, 1024, 2048]


def test_build_sampling_batch_contents():
    rows = [
        SamplingRow(SamplingParams(temperature=0.8, top_k=-1, top_p=0.9, min_p=0.05,
                                   repetition_penalty=1.3, frequency_penalty=0.5),
                    seed=2**40 + 5, step=4, prompt_ids=[3, 3, 9, 1], output_ids=[9, 2, 9, 2, 2],
                    suppress_ids=[151643, 7]),
        # No penalties: its history is ignored even when supplied.
        SamplingRow(SamplingParams(temperature=0, top_k=4), seed=11, step=0,
                    prompt_ids=list(range(100)), output_ids=[1]),
    ]
    b = build_sampling_batch(rows, num_rows=4)
    np.testing.assert_array_equal(b.temperature, np.float32([0.8, 0, 0, 0]))
    np.testing.assert_array_equal(b.top_k, [0, 4, 0, 0])
    np.testing.assert_array_equal(b.top_p, np.float32([0.9, 1, 1, 1]))
    np.testing.assert_array_equal(b.min_p, np.float32([0.05, 0, 0, 0]))
    assert b.seeds.dtype == np.uint32 and list(b.seeds) == [5, 11, 0, 0]
    np.testing.assert_array_equal(b.steps, [4, 0, 0, 0])
    np.testing.assert_array_equal(b.repetition_penalty, np.float32([1.3, 1, 1, 1]))
    np.testing.assert_array_equal(b.frequency_penalty, np.float32([0.5, 0, 0, 0]))
    assert b.penalty_ids.shape == (4, 16) and b.suppress_ids.shape == (4, 16)
    np.testing.assert_array_equal(b.penalty_ids[0, :4], [1, 2, 3, 9])
    assert (b.penalty_ids[0, 4:] == -1).all() and (b.penalty_ids[1:] == -1).all()
    np.testing.assert_array_equal(b.penalty_counts[0, :4], [0, 3, 0, 2])
    np.testing.assert_array_equal(b.penalty_in_prompt[0, :4], [True, False, True, True])
    np.testing.assert_array_equal(b.suppress_ids[0, :2], [7, 151643])
    assert (b.suppress_ids[0, 2:] == -1).all() and (b.suppress_ids[1:] == -1).all()

    plain = build_sampling_batch([SamplingRow(SamplingParams(), seed=1, step=0)], 2)
    assert plain.penalty_ids.shape == (2, 0) and plain.suppress_ids.shape == (2, 0)
    long = build_sampling_batch([SamplingRow(SamplingParams(presence_penalty=1.0), seed=1, step=0,
                                             prompt_ids=range(40))], 1)
    assert long.penalty_ids.shape == (1, 64)
    with pytest.raises(ValueError, match="num_rows"):
        build_sampling_batch(rows, num_rows=1)


# --------------------------------------------------------------------------- greedy / top-k 1


def test_top_k_1_and_temperature_0_are_argmax():
    rng = np.random.default_rng(0)
    num_rows, vocab = 64, 1000
    for trial in range(4):
        logits = rng.normal(size=(num_rows, vocab)).astype(np.float32) * 3
        top1 = [SamplingRow(SamplingParams(temperature=float(rng.uniform(0.3, 3)), top_k=1),
                            seed=int(rng.integers(2**63)), step=int(rng.integers(1000)))
                for _ in range(num_rows)]
        greedy = [SamplingRow(SamplingParams(temperature=0.0, top_p=0.5, min_p=0.2),
                              seed=int(rng.integers(2**63)), step=trial) for _ in range(num_rows)]
        expected = logits.argmax(-1)
        np.testing.assert_array_equal(run(logits, top1).token_ids, expected)
        np.testing.assert_array_equal(run(logits, greedy).token_ids, expected)
    # Sanity: the same logits sampled at temperature 1 are not all argmax.
    free = [SamplingRow(SamplingParams(), seed=r, step=0) for r in range(num_rows)]
    assert (run(logits, free).token_ids != expected).sum() > num_rows // 4


# --------------------------------------------------------------------------- reproducibility


def test_seeded_row_is_independent_of_batch_and_position():
    rng = np.random.default_rng(1)
    vocab = 300
    targets = []
    for i in range(24):
        params = [SamplingParams(temperature=1.5),  # no sort: the batch decides whether to sort
                  SamplingParams(temperature=0.9, top_p=0.95),
                  SamplingParams(temperature=1.2, min_p=0.02),
                  # lax.top_k candidates alone; a whole-vocabulary sort beside top-p rows
                  SamplingParams(temperature=0.8, top_k=7, top_p=0.9)][i % 4]
        targets.append((SamplingRow(params, seed=int(rng.integers(2**63)), step=int(rng.integers(500))),
                        rng.normal(size=vocab).astype(np.float32)))

    def filler(n):
        rows, logits = [], []
        for j in range(n):
            p = [SamplingParams(temperature=0.0),
                 SamplingParams(temperature=0.7, top_k=5),
                 SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=1.0),
                 SamplingParams(top_p=0.3, logit_bias={1: 5.0, 7: -3.0}),
                 SamplingParams(temperature=0.9, allowed_token_ids=list(range(0, vocab, 3)))][j % 5]
            rows.append(SamplingRow(p, seed=int(rng.integers(2**32)), step=j,
                                    prompt_ids=rng.integers(vocab, size=50).tolist(),
                                    output_ids=rng.integers(vocab, size=30).tolist(),
                                    suppress_ids=rng.integers(vocab, size=3).tolist()))
            logits.append(rng.normal(size=vocab).astype(np.float32))
        return rows, logits

    # Batch A: targets first, in order, padded with dummy rows.
    rows_a = [r for r, _ in targets]
    tokens_a = run(np.stack([lg for _, lg in targets] + [np.zeros(vocab, np.float32)] * 8),
                   rows_a, num_rows=32).token_ids[:24]
    # Batch B: targets shuffled between filler rows that sort, penalise and suppress.
    fill_rows, fill_logits = filler(40)
    order = rng.permutation(64)
    rows_b, logits_b = [None] * 64, [None] * 64
    for src, dst in enumerate(order):
        if src < 24:
            rows_b[dst], logits_b[dst] = targets[src]
        else:
            rows_b[dst], logits_b[dst] = fill_rows[src - 24], fill_logits[src - 24]
    tokens_b = run(np.stack(logits_b), rows_b).token_ids[order[:24]]
    # Batch C: each target alone.
    tokens_c = np.array([run(lg[None], [r]).token_ids[0] for r, lg in targets])

    np.testing.assert_array_equal(tokens_a, tokens_b)
    np.testing.assert_array_equal(tokens_a, tokens_c)
    # And the seed matters: re-seeding the targets changes most tokens.
    reseeded = [dataclasses.replace(r, seed=r.seed + 1) for r, _ in targets]
    tokens_d = run(np.stack([lg for _, lg in targets]), reseeded).token_ids
    assert (tokens_d != tokens_a).sum() >= 12


# --------------------------------------------------------------------------- distribution


def exact_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """float64 reference: temperature → top-k → top-p → min-p, renormalised after each cut."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones(len(z), bool)
    if top_k > 0:
        keep[np.argsort(-z)[top_k:]] = False
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        mass_before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        # The cut must not sit on a float32 rounding edge, or the reference is moot.
        assert np.abs(mass_before - top_p).min() > 1e-4
        cut = np.zeros(len(p), bool)
        cut[order[mass_before >= top_p]] = True
        p[cut] = 0.0
        p /= p.sum()
    if min_p > 0:
        p[p < min_p * p.max()] = 0.0
        p /= p.sum()
    return p


def chi_square(counts, probs):
    """(statistic, dof) with bins of expected count < 5 pooled into one."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big])
    exp = list(expected[big])
    small_exp, small_obs = expected[~big & (probs > 0)].sum(), counts[~big & (probs > 0)].sum()
    if small_exp > 0:
        obs.append(small_obs)
        exp.append(small_exp)
    obs, exp = np.array(obs, np.float64), np.array(exp, np.float64)
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


NUM_DRAWS = 20_000
VOCAB = 50
CASES = {
    "temperature": dict(temperature=0.7),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "top_k_temperature": dict(top_k=5, temperature=1.3),
    # top-p measured on the top-k-renormalised distribution, as HF/vLLM chain them.
    "top_k_top_p": dict(top_k=12, top_p=0.75, temperature=0.9),
}


@pytest.fixture(scope="module")
def draws():
    """Token histograms for each case: one seed, NUM_DRAWS steps, all rows in one call."""
    logits = np.random.default_rng(2).normal(size=VOCAB).astype(np.float32) * 1.5
    out = {}
    for name, kwargs in CASES.items():
        params = SamplingParams(**kwargs)
        rows = [SamplingRow(params, seed=12345, step=s) for s in range(NUM_DRAWS)]
        tokens = run(np.broadcast_to(logits, (NUM_DRAWS, VOCAB)), rows).token_ids
        out[name] = np.bincount(tokens, minlength=VOCAB)
    return logits, out


@pytest.mark.parametrize("name", list(CASES))
def test_sampled_distribution_matches_exact(draws, name):
    logits, counts = draws
    probs = exact_distribution(logits, **CASES[name])
    assert counts[name].sum() == NUM_DRAWS
    allowed = probs > 0
    if name != "temperature":  # the truncating cases must actually truncate something
        assert (~allowed).sum() >= 5
    assert counts[name][~allowed].sum() == 0, np.flatnonzero(counts[name] * ~allowed)
    stat, dof = chi_square(counts[name], probs)
    assert dof >= 4
    assert chi2_pvalue(stat, dof) > 1e-3, (stat, dof)


def test_chi_square_has_power(draws):
    # temperature 0.7 draws judged against the temperature 1.0 distribution must be rejected.
    logits, counts = draws
    stat, dof = chi_square(counts["temperature"], exact_distribution(logits, temperature=1.0))
    assert chi2_pvalue(stat, dof) < 1e-6


def test_pvalue_fallback_matches_scipy():
    reference = [(3.0, 1, 0.08326451666355), (40.0, 20, 0.004995412308)]  # scipy.stats.chi2.sf
    for stat, dof, p in reference:
        assert math.isclose(float(jax.scipy.special.gammaincc(dof / 2.0, stat / 2.0)), p, rel_tol=1e-4)
        assert math.isclose(chi2_pvalue(stat, dof), p, rel_tol=1e-4)


# --------------------------------------------------------------------------- penalties


def reference_penalties(logits, prompt, output, params: SamplingParams):
    out = logits.astype(np.float64).copy()
    if not params.uses_penalties:
        return out
    for t in set(prompt) | set(output):
        rp = params.repetition_penalty
        out[t] = out[t] / rp if out[t] > 0 else out[t] * rp
    for t, c in collections.Counter(output).items():
        out[t] -= params.presence_penalty + params.frequency_penalty * c
    return out


PENALTY_PARAMS = [
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6),
    SamplingParams(presence_penalty=1.5),
    SamplingParams(presence_penalty=-0.8),
    SamplingParams(frequency_penalty=0.9),
    SamplingParams(frequency_penalty=-0.3),
    SamplingParams(repetition_penalty=1.3, presence_penalty=0.7, frequency_penalty=0.4),
    SamplingParams(),  # no penalties: untouched even with K > 0 in the batch
]


def _penalty_rows(rng, vocab, temperature=1.0):
    rows, histories = [], []
    for i, p in enumerate(PENALTY_PARAMS * 2):
        p = dataclasses.replace(p, temperature=temperature)
        prompt = rng.integers(vocab, size=int(rng.integers(0, 40))).tolist()
        # Output drawn from a narrow range so tokens repeat and counts reach > 1.
        output = rng.integers(vocab // 4, size=int(rng.integers(5, 30))).tolist()
        if i == 0:
            prompt, output = [], []
        rows.append(SamplingRow(p, seed=i, step=len(output), prompt_ids=prompt, output_ids=output))
        histories.append((prompt, output, p))
    return rows, histories


def test_penalties_match_reference():
    rng = np.random.default_rng(3)
    vocab = 200
    rows, histories = _penalty_rows(rng, vocab)
    logits = rng.normal(size=(len(rows), vocab)).astype(np.float32) * 2
    batch = build_sampling_batch(rows, len(rows))
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), batch))
    expected = np.stack([reference_penalties(lg, *h) for lg, h in zip(logits, histories)])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    changed = np.abs(expected - logits).max(-1) > 0.05
    assert changed[1:7].all() and changed[9:15].all()  # every penalised row with history moved
    np.testing.assert_array_equal(got[[7, 15]], logits[[7, 15]])  # bit-exact for no-penalty rows


def test_a_token_counted_on_device_penalises_as_if_packed_by_the_host():
    """Async scheduling: the last output token is still on the device when the batch is packed;
    count_output_token adds it there (seen in the prompt, seen in the output, new, or none)."""
    rng = np.random.default_rng(7)
    vocab = 200
    rows, histories = _penalty_rows(rng, vocab)
    logits = jnp.asarray(rng.normal(size=(len(rows), vocab)).astype(np.float32) * 2)
    last = []
    for i, (row, (prompt, output, _)) in enumerate(zip(rows, histories)):
        choices = [prompt[0] if prompt else 7, output[0] if output else 8, vocab - 1 - i, -1]
        last.append(choices[i % 4])
    full = build_sampling_batch([dataclasses.replace(r, output_ids=list(r.output_ids) + [t])
                                 if t >= 0 else r for r, t in zip(rows, last)], len(rows))
    counted = jax.jit(count_output_token)(build_sampling_batch(rows, len(rows)),
                                          jnp.asarray(last, jnp.int32))
    want = np.asarray(apply_penalties(logits, full))
    np.testing.assert_allclose(np.asarray(apply_penalties(logits, counted)), want, rtol=1e-6, atol=1e-6)
    assert counted.penalty_ids.shape[1] == full.penalty_ids.shape[1] + 1


def test_greedy_with_penalties_follows_penalised_argmax():
    rng = np.random.default_rng(4)
    vocab = 64
    rows, histories = _penalty_rows(rng, vocab, temperature=0.0)
    # Logits peaked on the repeated output range so penalties flip the argmax.
    logits = rng.normal(size=(len(rows), vocab)).astype(np.float32)
    logits[:, : vocab // 4] += 2.0
    expected = np.array([reference_penalties(lg, *h).argmax() for lg, h in zip(logits, histories)])
    np.testing.assert_array_equal(run(logits, rows).token_ids, expected)
    assert (expected != logits.argmax(-1)).sum() >= 4


def test_suppressed_ids_never_sampled():
    rng = np.random.default_rng(5)
    vocab, num_rows = 40, 512
    banned = [3, 17, 29]
    logits = rng.normal(size=(num_rows, vocab)).astype(np.float32)
    logits[:, banned] += 6.0  # the banned ids would otherwise win almost every draw
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=2.0, top_p=0.9)]
    rows = [SamplingRow(params[i % 3], seed=i, step=0, suppress_ids=banned) for i in range(num_rows)]
    tokens = run(logits, rows).token_ids
    assert not np.isin(tokens, banned).any()
    unbanned = logits.copy()
    unbanned[:, banned] = -np.inf
    np.testing.assert_array_equal(tokens[1::3], unbanned[1::3].argmax(-1))
    # Control: without suppression the banned ids dominate.
    free = [dataclasses.replace(r, suppress_ids=()) for r in rows]
    assert np.isin(run(logits, free).token_ids, banned).mean() > 0.9


def test_logit_bias_and_allowed_token_ids():
    rng = np.random.default_rng(8)
    vocab, num_rows = 40, 384
    logits = rng.normal(size=(num_rows, vocab)).astype(np.float32)
    allowed = [2, 5, 11, 30]
    bias = {5: 3.0, 11: -2.0, 20: 4.0}  # 20 is not allowed: its bias has no effect there
    params = [SamplingParams(temperature=0.0, allowed_token_ids=allowed, logit_bias=bias),
              SamplingParams(temperature=1.0, allowed_token_ids=allowed),
              SamplingParams(temperature=0.0, logit_bias=bias),
              SamplingParams(temperature=1.5, top_k=3, logit_bias={7: 100.0}),
              SamplingParams(temperature=0.0, logit_bias={int(t): -100.0 for t in range(vocab // 2)}),
              SamplingParams(temperature=0.0)]
    rows = [SamplingRow(params[i % 6], seed=i, step=0) for i in range(num_rows)]
    tokens = run(logits, rows).token_ids

    def reference(lg, p):
        lg = lg.copy()
        if p.allowed_token_ids is not None:
            lg[np.setdiff1d(np.arange(vocab), p.allowed_token_ids)] = -np.inf
        for t, b in (p.logit_bias or {}).items():
            lg[t] += b
        return lg

    for i in (0, 2, 4, 5):  # greedy rows: the argmax of the biased, masked logits
        expected = [reference(logits[j], params[i]).argmax() for j in range(i, num_rows, 6)]
        np.testing.assert_array_equal(tokens[i::6], expected)
    assert np.isin(tokens[1::6], allowed).all() and len(set(tokens[1::6])) == len(allowed)
    assert (tokens[3::6] == 7).all()  # +100 outweighs any other logit here
    assert (tokens[4::6] >= vocab // 2).all()
    # Control: the bias and the mask change the greedy rows' tokens.
    assert (tokens[0::6] != logits[0::6].argmax(-1)).mean() > 0.5
    assert (tokens[2::6] != logits[2::6].argmax(-1)).sum() > 10

    batch = build_sampling_batch(rows[:3], 4)
    assert batch.bias_ids.shape == (4, 16) and batch.allow_only.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(batch.bias_ids[0, :5], [2, 5, 11, 30, -1])
    np.testing.assert_array_equal(batch.bias_values[0, :4], [0.0, 3.0, -2.0, 0.0])
    np.testing.assert_array_equal(batch.bias_ids[2, :4], [5, 11, 20, -1])
    assert build_sampling_batch([SamplingRow(SamplingParams(), 1, 0)], 2).bias_ids.shape == (2, 0)


def test_token_mask_keeps_only_the_grammars_tokens():
    """Structured outputs' bitmask: bit t % 32 of word t // 32 allows token t; rows without a
    grammar are untouched by the masked rows beside them."""
    rng = np.random.default_rng(9)
    vocab, num_rows = 70, 256  # 3 words, the last one partly past the vocabulary
    logits = rng.normal(size=(num_rows, vocab)).astype(np.float32)
    allowed = np.array([0, 31, 32, 45, 69])
    mask = np.zeros(3, np.uint32)
    for t in allowed:
        mask[t // 32] |= np.uint32(1) << np.uint32(t % 32)
    mask = mask.view(np.int32)  # bit 31 set: a negative word
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=2)]
    rows = [SamplingRow(params[i % 4], seed=i, step=0, token_mask=mask if i % 4 < 2 else None)
            for i in range(num_rows)]
    out = run(logits, rows)
    tokens = out.token_ids
    masked = np.full_like(logits, -np.inf)
    masked[:, allowed] = logits[:, allowed]
    np.testing.assert_array_equal(tokens[0::4], masked[0::4].argmax(-1))
    assert np.isin(tokens[1::4], allowed).all() and set(tokens[1::4]) == set(allowed)
    np.testing.assert_array_equal(tokens[2::4], logits[2::4].argmax(-1))  # no grammar: as before
    alone = run(logits[3::4], [r for r in rows[3::4]]).token_ids
    np.testing.assert_array_equal(tokens[3::4], alone)
    # Logprobs stay the raw distribution's, as for every other constraint.
    raw = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logprobs[0::4], raw[np.arange(0, num_rows, 4), tokens[0::4]], atol=1e-5)
    assert build_sampling_batch(rows[2:3], 2).token_mask.shape == (2, 0)
    with pytest.raises(ValueError, match="token masks differ"):
        build_sampling_batch([rows[0], dataclasses.replace(rows[1], token_mask=mask[:2])], 2)


# --------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(6)
    vocab, num_top = 500, 5
    logits = rng.normal(size=(8, vocab)).astype(np.float32) * 4
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=3),
              SamplingParams(repetition_penalty=2.0, presence_penalty=2.0),
              SamplingParams(top_p=0.5)]
    rows = [SamplingRow(params[i % 4], seed=i, step=i,
                        prompt_ids=logits[i].argsort()[-3:].tolist()) for i in range(8)]
    out = run(logits, rows, num_top=num_top)
    x = logits.astype(np.float64)
    lsm = x - x.max(-1, keepdims=True)
    lsm -= np.log(np.exp(lsm).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logprobs, lsm[np.arange(8), out.token_ids], atol=2e-5)
    expected_top = np.argsort(-lsm, axis=-1)[:, :num_top]
    np.testing.assert_array_equal(out.top_ids, expected_top)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(lsm, expected_top, -1), atol=2e-5)
    assert (np.diff(out.top_logprobs, axis=-1) <= 0).all()
    # Penalised rows still report the raw model's view: their top-1 is the raw argmax.
    np.testing.assert_array_equal(out.top_ids[2::4, 0], logits[2::4].argmax(-1))
    none = run(logits, rows)
    assert none.top_ids.shape == (8, 0) and none.top_logprobs.shape == (8, 0)


# --------------------------------------------------------------------------- compilation


def test_jits_once_per_shape():
    traces = []

    def counted(logits, batch, num_top):
        traces.append(logits.shape)
        return sample(logits, batch, num_top)

    step = jax.jit(counted, static_argnames=("num_top",))
    rng = np.random.default_rng(7)

    def call(rows, num_top=2):
        logits = jnp.asarray(rng.normal(size=(8, 100)), jnp.float32)
        return step(logits, build_sampling_batch(rows, 8), num_top=num_top)

    call([SamplingRow(SamplingParams(temperature=0.5), seed=1, step=0)])
    call([SamplingRow(SamplingParams(top_p=0.3, top_k=4), seed=9, step=3),
          SamplingRow(SamplingParams(temperature=0), seed=2, step=1)])
    assert len(traces) == 1
    if hasattr(step, "_cache_size"):
        assert step._cache_size() == 1
    # A penalty table (K = 16) is a new shape; a second history that fits in 16 is not.
    call([SamplingRow(SamplingParams(presence_penalty=1.0), seed=1, step=2, prompt_ids=[1, 2, 3])])
    call([SamplingRow(SamplingParams(frequency_penalty=1.0), seed=1, step=2, output_ids=list(range(16)))])
    assert len(traces) == 2
    call([SamplingRow(SamplingParams(), seed=1, step=0)], num_top=3)
    assert len(traces) == 3


def test_sampling_batch_is_a_pytree():
    batch = build_sampling_batch([SamplingRow(SamplingParams(), seed=1, step=0)], 2)
    leaves = jax.tree_util.tree_leaves(batch)
    assert len(leaves) == len(dataclasses.fields(SamplingBatch)) == 17


def test_suppression_yields_where_it_would_leave_no_token():
    """min_tokens' EOS ban (or a bad word) against a mask that allows only those ids, as a
    complete grammar does: the row still draws an allowed id, not an arbitrary one."""
    vocab = 40
    logits = np.random.default_rng(9).normal(size=(4, vocab)).astype(np.float32)
    only_eos = SamplingParams(temperature=0.0, allowed_token_ids=[2])
    rows = [SamplingRow(only_eos, seed=0, step=0, suppress_ids=[2]),
            SamplingRow(dataclasses.replace(only_eos, temperature=1.0), seed=1, step=0, suppress_ids=[2]),
            SamplingRow(SamplingParams(temperature=0.0, allowed_token_ids=[2, 9]), seed=2, step=0,
                        suppress_ids=[2]),
            SamplingRow(SamplingParams(temperature=0.0), seed=3, step=0, suppress_ids=[int(logits[3].argmax())])]
    tokens = run(logits, rows).token_ids
    assert tokens.tolist()[:3] == [2, 2, 9]
    assert tokens[3] != logits[3].argmax() and tokens[3] == np.argsort(logits[3])[-2]


def test_whole_vocabulary_thresholds_equal_a_sorts():
    """Rows with top_k off or above TOP_K_CANDIDATES find their top-k and top-p thresholds by
    bisection, without sorting the vocabulary: the same tokens kept as from a descending sort,
    with masked (-inf) tokens, ties at the k-th logit, top_p 1 and k ≥ vocab."""
    from qwenjax.sampling import TOP_K_CANDIDATES, _threshold_from_sorted, _truncation_threshold

    rng = np.random.default_rng(7)
    rows, vocab = 32, 3000
    logits = (rng.normal(size=(rows, vocab)) * rng.uniform(0.5, 4.0, size=(rows, 1))).astype(np.float32)
    logits[3, :2000] = -np.inf
    logits[5, 100:140] = np.sort(logits[5])[-120]  # ties around the 120th largest
    top_k = rng.choice([0, 7, TOP_K_CANDIDATES + 1, 120, 1500, vocab, vocab + 5], rows).astype(np.int32)
    top_k[5] = 120
    top_p = rng.choice([0.3, 0.9, 0.99, 1.0], rows).astype(np.float32)
    top_p[5] = 1.0
    got = jax.jit(_truncation_threshold)(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p),
                                         jnp.ones((rows,), bool))
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    want = _threshold_from_sorted(-jnp.sort(-jnp.asarray(logits), axis=-1), k, jnp.asarray(top_p))
    # The same tokens kept (a row keeping everything may say -inf or its smallest logit).
    np.testing.assert_array_equal(logits >= np.asarray(got)[:, None], logits >= np.asarray(want)[:, None])
    cut = (top_p < 1.0) | (np.asarray(k) < vocab)
    np.testing.assert_array_equal(np.asarray(got)[cut], np.asarray(want)[cut])
    assert float(got[5]) == np.sort(logits[5])[-120]  # every tie kept


def test_vllms_import_paths_with_qwenjax_in_place_of_vllm():
    """A vLLM script's imports, with ``vllm`` replaced by ``qwenjax``, give qwenjax's classes."""
    import qwenjax
    from qwenjax.inputs import TextPrompt, TokensPrompt
    from qwenjax.outputs import CompletionOutput, RequestOutput
    from qwenjax.pooling_params import PoolingParams
    from qwenjax.sampling_params import BeamSearchParams, GuidedDecodingParams, StructuredOutputsParams

    assert (qwenjax.SamplingParams, qwenjax.StructuredOutputs, qwenjax.BeamSearchParams,
            qwenjax.PoolingParams, qwenjax.TokensPrompt, qwenjax.TextPrompt) == (
        SamplingParams, StructuredOutputsParams, BeamSearchParams, PoolingParams, TokensPrompt,
        TextPrompt)
    assert GuidedDecodingParams is StructuredOutputsParams
    assert CompletionOutput is RequestOutput is qwenjax.RequestOutput
    params = SamplingParams(max_tokens=3, structured_outputs=StructuredOutputsParams(choice=["a", "b"]))
    assert params.structured_outputs.choice == ("a", "b")
