"""Sampling: per-request parameters, the host-side batch builder and the on-device sampler.

Three stages, as everywhere in the engine:

* ``SamplingParams`` — what a client asked for, validated once at admission.
* ``build_sampling_batch`` — host numpy: one padded row per sequence in the step.
* ``sample`` — pure JAX inside the jitted step: penalties → suppression →
  greedy / (temperature → top-k → top-p → min-p → Gumbel-max).

Reproducibility contract: a sampled row's token depends only on its own seed,
step and logits. Every operation is row-local (no batch-wide reductions feed a
row's result) and the random noise comes from a per-row key
``fold_in(key(seed), step)``, so the same seeded request gives the same tokens
whatever else shares its batch and whichever row it lands in.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import math
import numbers
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.structured import StructuredOutputs

# Temperatures below this are treated as greedy, as vLLM does: dividing logits by
# ~1e-6 pushes them towards float32 overflow and the distribution is an argmax
# for any practical purpose anyway.
GREEDY_TEMPERATURE_EPS = 1e-5

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # also the limit of a bad word
MAX_BAD_WORDS = 128
PENALTY_RANGE = 2.0  # presence / frequency penalties live in [-2, 2] (OpenAI API)
MAX_SEED = 2**63  # exclusive; seeds are int64 on the wire
LOGIT_BIAS_RANGE = 100.0  # OpenAI API: a bias of -100 bans a token, +100 all but forces it
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias
MAX_N = 128  # sequences of one request (parallel sampling)
MAX_CACHE_SALT_CHARS = 256

# Smallest non-zero width of the penalty and suppression tables. Widths are
# powers of two from here, so the jitted step sees at most ~log2(max_history)
# distinct K values (16, 32, …, 65536 for a 64k context) instead of one per length.
MIN_TABLE_WIDTH = 16


# --------------------------------------------------------------------------- params


def _fail(field: str, requirement: str, value) -> ValueError:
    return ValueError(f"{field} must be {requirement}, got {value!r}")


def is_int(value) -> bool:
    """An integer that is not a bool (JSON and Python callers alike)."""
    # bool is an int subclass in Python; True as max_tokens is a caller bug.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_fields(body: Any, allowed: frozenset[str], endpoint: str,
                 what: str = "the request body") -> dict[str, Any]:
    """``body`` (``what``: the request body, or an object in it) without its null fields;
    ValueError naming any field ``endpoint`` does not take."""
    if not isinstance(body, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValueError(f"{endpoint} does not accept the field(s) {', '.join(unknown)}; its "
                         f"fields are: {', '.join(sorted(allowed))}")
    return {k: v for k, v in body.items() if v is not None}


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _token_id_key(key) -> int | None:
    """A logit_bias key as a token id: an int, or an int written as a string (JSON objects
    have string keys: {"42": -100}); None for anything else."""
    if is_int(key):
        return int(key)
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            return None
    return None


class RequestOutputKind(enum.IntEnum):
    """vLLM's: what a stream of outputs carries (``AsyncLLM.generate``). CUMULATIVE: each output's
    ``text``/``token_ids``/``logprobs`` are everything so far; DELTA: only what is new; FINAL_ONLY:
    only each sequence's last output (``LLM.generate`` returns those in every case)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling options, vLLM-compatible names and defaults.

    Validated on construction; a bad value raises ``ValueError`` naming the
    field, the value and the allowed range. ``stop``, ``stop_regex``, ``stop_token_ids``
    and ``bad_words`` accept a single value, any sequence or None (empty, as in vLLM) and
    are stored as tuples. What vLLM normalizes is normalized the same way: ``seed=-1`` is
    no seed, ``logprobs=True`` / ``prompt_logprobs=True`` are 1 (False: None), logit_bias
    keys may be token ids as strings (JSON's) and biases are clamped to [-100, 100].
    ``guided_decoding`` is vLLM's older name of ``structured_outputs``.
    """

    n: int = 1  # independent sequences sampled for the prompt (seeded: seed, seed + 1, …)
    # None (vLLM's): as many as the context leaves the prompt (Engine.context_room), set when
    # the request is added and its prompt length is known.
    max_tokens: int | None = 256
    min_tokens: int = 0  # EOS / stop ids are suppressed until this many tokens exist
    temperature: float = 1.0  # 0 (or < GREEDY_TEMPERATURE_EPS) = greedy
    top_k: int = -1  # -1 or 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM style, on prompt ∪ output tokens
    presence_penalty: float = 0.0  # OpenAI style, on output tokens only
    frequency_penalty: float = 0.0  # OpenAI style, on output tokens only
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Regular expressions (the `regex` package's syntax) that end the output at their first match
    # (SGLang's stop_regex), as stop strings do: the match is cut unless include_stop_str_in_output.
    stop_regex: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per token; 0 = chosen token only
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (scoring)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # a matched stop string ends the text, kept in it
    logit_bias: Mapping[int, float] | None = None  # token id → added to its logit, clamped to ±100
    allowed_token_ids: tuple[int, ...] | None = None  # sample only among these (non-empty)
    bad_words: tuple[str, ...] = ()  # never generated (their tokens, with and without a space)
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens; -1: max context
    # Output constrained by a JSON schema, regex, choice list or grammar (qwenjax.structured).
    structured_outputs: StructuredOutputs | None = None
    # Prefix caching shares KV pages only among requests with the same salt (vLLM's cache_salt:
    # one tenant cannot tell from timing what another sent). None: the unsalted, shared cache.
    cache_salt: str | None = None
    # vLLM's: a reasoning model (a reasoning parser) may think this many tokens; then "</think>"
    # is forced and the answer follows. None: no limit.
    thinking_token_budget: int | None = None
    # vLLM's: False leaves the outputs' text empty (token ids only; no stop strings then).
    detokenize: bool = True
    # vLLM's: only True (Qwen2.5's byte-level tokenizer keeps every space itself).
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # SGLang's: the last output carries ``hidden_states``, the final-normed hidden state of every
    # position fed to the model (the prompt's, then each generated token's but the last).
    return_hidden_states: bool = False
    # vLLM's: anything a caller wants carried with the request (read by nothing here).
    extra_args: Mapping[str, Any] | None = None
    # vLLM's older name of structured_outputs (pass it by keyword): moved into
    # structured_outputs on construction and left None, so that dataclasses.replace (which
    # passes every field again) never sees both.
    guided_decoding: StructuredOutputs | None = dataclasses.field(default=None, repr=False,
                                                                  compare=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731

        # vLLM's None for "no such list" (its defaults): empty, as ours are.
        for name in ("stop", "stop_regex", "stop_token_ids", "bad_words"):
            if getattr(self, name) is None:
                set_(name, ())

        for name in ("n", "min_tokens", "top_k"):
            value = getattr(self, name)
            if not is_int(value):
                raise _fail(name, "an int", value)
            set_(name, int(value))
        if not 1 <= self.n <= MAX_N:
            raise _fail("n", f"in [1, {MAX_N}]", self.n)
        if self.max_tokens is not None:
            if not is_int(self.max_tokens) or self.max_tokens < 1:
                raise _fail("max_tokens", "None (fill the context) or an int ≥ 1", self.max_tokens)
            set_("max_tokens", int(self.max_tokens))
        if self.min_tokens < 0:
            raise _fail("min_tokens", "≥ 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", f"≤ max_tokens ({self.max_tokens})", self.min_tokens)
        if self.top_k < -1:
            raise _fail("top_k", "-1 (off), 0 (off) or ≥ 1", self.top_k)

        # (field, allowed range in words, predicate); NaN fails every predicate.
        real_fields = (
            ("temperature", "a finite number ≥ 0", lambda x: 0.0 <= x < math.inf),
            ("top_p", "in (0, 1]", lambda x: 0.0 < x <= 1.0),
            ("min_p", "in [0, 1]", lambda x: 0.0 <= x <= 1.0),
            ("repetition_penalty", "a finite number > 0", lambda x: 0.0 < x < math.inf),
            ("presence_penalty", f"in [{-PENALTY_RANGE:g}, {PENALTY_RANGE:g}]",
             lambda x: -PENALTY_RANGE <= x <= PENALTY_RANGE),
            ("frequency_penalty", f"in [{-PENALTY_RANGE:g}, {PENALTY_RANGE:g}]",
             lambda x: -PENALTY_RANGE <= x <= PENALTY_RANGE),
        )
        for name, requirement, ok in real_fields:
            value = getattr(self, name)
            if not _is_real(value) or not ok(float(value)):
                raise _fail(name, requirement, value)
            set_(name, float(value))

        if is_int(self.seed) and self.seed == -1:
            set_("seed", None)  # vLLM's (and the OpenAI clients') "no seed"
        if self.seed is not None:
            if not is_int(self.seed) or not 0 <= self.seed < MAX_SEED:
                raise _fail("seed", "None or an int in [0, 2**63)", self.seed)
            set_("seed", int(self.seed))

        for name, limit in (("stop", MAX_STOP_STRINGS), ("bad_words", MAX_BAD_WORDS)):
            strings = getattr(self, name)
            strings = (strings,) if isinstance(strings, str) else strings
            if not isinstance(strings, (list, tuple)):
                raise _fail(name, "a str or a sequence of str", strings)
            strings = tuple(strings)
            if len(strings) > limit:
                raise ValueError(f"{name} must hold at most {limit} strings, got {len(strings)}")
            for s in strings:
                # A stop string may be whitespace ("\n"); a bad word is a word.
                if not isinstance(s, str) or not (s.strip() if name == "bad_words" else s):
                    raise _fail(name, "words" if name == "bad_words" else "non-empty strings", s)
                if len(s) > MAX_STOP_STRING_CHARS:
                    raise ValueError(f"{name} strings must be at most {MAX_STOP_STRING_CHARS} "
                                     f"chars, got {len(s)} chars ({s[:20]!r}…)")
            set_(name, strings)

        patterns = (self.stop_regex,) if isinstance(self.stop_regex, str) else self.stop_regex
        if not isinstance(patterns, (list, tuple)):
            raise _fail("stop_regex", "a str or a sequence of str", patterns)
        if len(patterns) > MAX_STOP_STRINGS:
            raise ValueError(f"stop_regex must hold at most {MAX_STOP_STRINGS} patterns, got {len(patterns)}")
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern:
                raise _fail("stop_regex", "non-empty strings", pattern)
            if len(pattern) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop_regex patterns must be at most {MAX_STOP_STRING_CHARS} chars, "
                                 f"got {len(pattern)} chars ({pattern[:20]!r}…)")
            from qwenjax.detokenizer import compile_stop_regex

            compile_stop_regex(pattern)  # a clear error now rather than at admission
        set_("stop_regex", tuple(patterns))

        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("give structured_outputs or guided_decoding (its older name), "
                                 f"not both; got structured_outputs={self.structured_outputs!r:.80} "
                                 f"and guided_decoding={self.guided_decoding!r:.80}")
            set_("structured_outputs", self.guided_decoding)
            set_("guided_decoding", None)
        if isinstance(self.structured_outputs, Mapping):
            set_("structured_outputs", StructuredOutputs(**self.structured_outputs))
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputs):
            raise _fail("structured_outputs", "None, a StructuredOutputs or a dict of its fields",
                        self.structured_outputs)

        if self.cache_salt is not None and (not isinstance(self.cache_salt, str)
                                            or not 1 <= len(self.cache_salt) <= MAX_CACHE_SALT_CHARS):
            raise _fail("cache_salt", f"None or a string of 1 to {MAX_CACHE_SALT_CHARS} chars",
                        self.cache_salt)

        if self.thinking_token_budget is not None:
            k = self.thinking_token_budget
            if not is_int(k) or k < 0:
                raise _fail("thinking_token_budget", "None or an int ≥ 0", k)
            set_("thinking_token_budget", int(k))

        if self.truncate_prompt_tokens is not None:
            k = self.truncate_prompt_tokens
            if not is_int(k) or not (k == -1 or k >= 1):
                raise _fail("truncate_prompt_tokens", "None, -1 (the max context) or an int ≥ 1", k)
            set_("truncate_prompt_tokens", int(k))

        ids = (self.stop_token_ids,) if is_int(self.stop_token_ids) else self.stop_token_ids
        if not isinstance(ids, (list, tuple, np.ndarray)):
            raise _fail("stop_token_ids", "an int or a sequence of ints", ids)
        for i in ids:
            if not is_int(i) or i < 0:
                raise _fail("stop_token_ids", "ints ≥ 0", i)
        set_("stop_token_ids", tuple(int(i) for i in ids))

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
                     "detokenize", "spaces_between_special_tokens", "return_hidden_states"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise _fail(name, "a bool", getattr(self, name))
            set_(name, bool(getattr(self, name)))
        if not self.spaces_between_special_tokens:
            raise _fail("spaces_between_special_tokens", "True (Qwen2.5's byte-level tokenizer "
                        "has no spaces to add)", False)
        if not self.detokenize and (self.stop or self.stop_regex):
            raise ValueError("stop and stop_regex need detokenize=True (they are matched in the text)")
        try:
            set_("output_kind", RequestOutputKind(self.output_kind))
        except ValueError:
            raise _fail("output_kind", "a RequestOutputKind (CUMULATIVE, DELTA, FINAL_ONLY)",
                        self.output_kind) from None
        if self.extra_args is not None and not isinstance(self.extra_args, Mapping):
            raise _fail("extra_args", "None or a mapping", self.extra_args)

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)):  # vLLM's pydantic reads True as 1
                value = 1 if value else None
                set_(name, value)
            if value is not None:
                if not is_int(value) or not 0 <= value <= MAX_LOGPROBS:
                    raise _fail(name, f"None or an int in [0, {MAX_LOGPROBS}]", value)
                set_(name, int(value))

        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise _fail("logit_bias", "None or a mapping of token id to bias", self.logit_bias)
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias must hold at most {MAX_LOGIT_BIAS} entries, "
                                 f"got {len(self.logit_bias)}")
            bias = {}
            for key, value in self.logit_bias.items():
                token = _token_id_key(key)
                if token is None or token < 0:
                    raise _fail("logit_bias keys", "token ids (ints ≥ 0, or such ints as strings)", key)
                if not _is_real(value) or math.isnan(value):
                    raise _fail(f"logit_bias[{token}]", "a number (clamped to "
                                f"[{-LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}])", value)
                # Clamped as vLLM's from_optional does: -100 already bans a token, +100 all but forces it.
                bias[token] = min(LOGIT_BIAS_RANGE, max(-LOGIT_BIAS_RANGE, float(value)))
            set_("logit_bias", bias or None)

        if self.allowed_token_ids is not None:
            allowed = self.allowed_token_ids
            if not isinstance(allowed, (list, tuple, np.ndarray)) or len(allowed) == 0:
                raise _fail("allowed_token_ids", "None or a non-empty sequence of token ids", allowed)
            for t in allowed:
                if not is_int(t) or t < 0:
                    raise _fail("allowed_token_ids", "token ids (ints ≥ 0)", t)
            set_("allowed_token_ids", tuple(int(t) for t in allowed))

    @classmethod
    def from_optional(cls, **fields) -> SamplingParams:
        """SamplingParams from ``fields`` with the None-valued ones left at their defaults
        (vLLM's from_optional, which callers use to pass request fields as they come), except
        max_tokens, whose None is kept as vLLM keeps it: as many tokens as the context leaves.
        An unknown name raises TypeError, as the constructor does."""
        return cls(**{name: value for name, value in fields.items()
                      if value is not None or name == "max_tokens"})

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's clone): nothing in it is shared with these params, so a
        caller mutating a logit_bias dict or a JSON schema of one does not change the other."""
        return copy.deepcopy(self)

    def token_ids_named(self) -> list[tuple[str, int]]:
        """Every token id these params name, with the field naming it (for the vocabulary check)."""
        named = [("stop_token_ids", t) for t in self.stop_token_ids]
        named += [("logit_bias", t) for t in self.logit_bias or ()]
        named += [("allowed_token_ids", t) for t in self.allowed_token_ids or ()]
        return named

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature 0 or below GREEDY_TEMPERATURE_EPS)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_penalties(self) -> bool:
        """True when the sampler needs this request's prompt/output token history."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


# --------------------------------------------------------------------------- device batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Per-row sampling state for one step, padded to R rows (padding rows are greedy)."""

    temperature: jax.Array  # [R] float32, < GREEDY_TEMPERATURE_EPS = greedy
    top_k: jax.Array  # [R] int32, 0 = off
    top_p: jax.Array  # [R] float32, 1 = off
    min_p: jax.Array  # [R] float32, 0 = off
    seeds: jax.Array  # [R] uint32, per-request seed
    steps: jax.Array  # [R] int32, tokens this request has generated so far
    repetition_penalty: jax.Array  # [R] float32, 1 = off
    presence_penalty: jax.Array  # [R] float32, 0 = off
    frequency_penalty: jax.Array  # [R] float32, 0 = off
    penalty_ids: jax.Array  # [R, K] int32, -1 = padding; distinct ids seen in prompt or output
    penalty_counts: jax.Array  # [R, K] int32, occurrences of each id in the OUTPUT
    penalty_in_prompt: jax.Array  # [R, K] bool, whether each id occurs in the PROMPT
    suppress_ids: jax.Array  # [R, S] int32, -1 = padding; ids banned this step
    bias_ids: jax.Array  # [R, B] int32, -1 = padding; distinct ids with a logit bias
    bias_values: jax.Array  # [R, B] float32, added to those ids' logits
    allow_only: jax.Array  # [R] bool, only the row's bias_ids may be sampled (allowed_token_ids)
    token_mask: jax.Array  # [R, M] int32, M = 0 or vocab / 32: bit t % 32 of word t // 32 set =
    #                        token t allowed (structured outputs; rows without a grammar: all set)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    token_ids: jax.Array  # [R] int32
    logprobs: jax.Array  # [R] float32, chosen token under log_softmax(raw logits)
    top_ids: jax.Array  # [R, N] int32, most likely first under the raw distribution
    top_logprobs: jax.Array  # [R, N] float32, raw distribution
    finite: jax.Array  # [R] bool, every raw logit of the row is finite (else its token is garbage)


@dataclasses.dataclass
class SamplingRow:
    """One sequence's host-side sampling inputs for a step."""

    params: SamplingParams
    seed: int  # effective seed (the engine draws one when params.seed is None)
    step: int  # len(output_ids)
    prompt_ids: Sequence[int] = ()  # read only when params.uses_penalties
    output_ids: Sequence[int] = ()  # read only when params.uses_penalties
    suppress_ids: Sequence[int] = ()  # EOS + stop ids while len(output) < min_tokens
    token_mask: np.ndarray | None = None  # [vocab / 32] int32: what the row's grammar allows


def table_width(n: int) -> int:
    """Width of a penalty/suppression table holding ``n`` entries per row.

    0 when no row needs one (the sampler then compiles without that stage),
    otherwise the next power of two ≥ MIN_TABLE_WIDTH, so the number of
    distinct compiled shapes grows with log2 of the history length.
    """
    if n <= 0:
        return 0
    return max(MIN_TABLE_WIDTH, 1 << (n - 1).bit_length())


_NO_IDS = np.zeros(0, np.int64)


def truncation_settings(p: SamplingParams) -> tuple[float, int, float, float]:
    """(temperature, top_k, top_p, min_p) of a sampler row: temperature 0 = greedy, top_k 0 = off."""
    return 0.0 if p.greedy else p.temperature, max(p.top_k, 0), p.top_p, p.min_p


def build_sampling_batch(rows: Sequence[SamplingRow], num_rows: int) -> SamplingBatch:
    """Pack ``rows`` into numpy arrays padded to ``num_rows`` (padding rows are greedy, no-ops).

    Penalty tables are filled only for rows whose params use penalties, so a
    penalty-free row's logits are untouched whatever else shares the batch.
    """
    if num_rows < len(rows):
        raise ValueError(f"num_rows must be ≥ len(rows) ({len(rows)}), got {num_rows}")

    temperature = np.zeros(num_rows, np.float32)
    top_k = np.zeros(num_rows, np.int32)
    top_p = np.ones(num_rows, np.float32)
    min_p = np.zeros(num_rows, np.float32)
    seeds = np.zeros(num_rows, np.uint32)
    steps = np.zeros(num_rows, np.int32)
    rep = np.ones(num_rows, np.float32)
    presence = np.zeros(num_rows, np.float32)
    frequency = np.zeros(num_rows, np.float32)

    allow_only = np.zeros(num_rows, bool)
    histories: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
    suppress: list[np.ndarray] = []
    biases: list[tuple[np.ndarray, np.ndarray]] = []
    for i, row in enumerate(rows):
        p = row.params
        if row.step < 0:
            raise ValueError(f"rows[{i}].step must be ≥ 0, got {row.step}")
        temperature[i], top_k[i], top_p[i], min_p[i] = truncation_settings(p)
        seeds[i] = row.seed % 2**32
        steps[i] = row.step
        rep[i] = p.repetition_penalty
        presence[i] = p.presence_penalty
        frequency[i] = p.frequency_penalty
        if p.uses_penalties:
            prompt = np.asarray(row.prompt_ids, np.int64).reshape(-1)
            output = np.asarray(row.output_ids, np.int64).reshape(-1)
            ids = np.union1d(prompt, output)
            out_ids, out_counts = np.unique(output, return_counts=True)
            counts = np.zeros(len(ids), np.int32)
            counts[np.searchsorted(ids, out_ids)] = out_counts
            histories.append((ids, counts, np.isin(ids, prompt)))
        else:
            histories.append(None)
        suppress.append(np.unique(np.asarray(row.suppress_ids, np.int64).reshape(-1))
                        if len(row.suppress_ids) else _NO_IDS)
        biases.append(_bias_entries(p))
        allow_only[i] = p.allowed_token_ids is not None

    k = table_width(max((len(h[0]) for h in histories if h is not None), default=0))
    s = table_width(max((len(x) for x in suppress), default=0))
    b = table_width(max((len(ids) for ids, _ in biases), default=0))
    penalty_ids = np.full((num_rows, k), -1, np.int32)
    penalty_counts = np.zeros((num_rows, k), np.int32)
    penalty_in_prompt = np.zeros((num_rows, k), bool)
    suppress_ids = np.full((num_rows, s), -1, np.int32)
    for i, h in enumerate(histories):
        if h is not None:
            ids, counts, in_prompt = h
            penalty_ids[i, : len(ids)] = ids
            penalty_counts[i, : len(ids)] = counts
            penalty_in_prompt[i, : len(ids)] = in_prompt
        suppress_ids[i, : len(suppress[i])] = suppress[i]
    bias_ids = np.full((num_rows, b), -1, np.int32)
    bias_values = np.zeros((num_rows, b), np.float32)
    for i, (ids, values) in enumerate(biases):
        bias_ids[i, : len(ids)] = ids
        bias_values[i, : len(ids)] = values
    masks = {len(row.token_mask) for row in rows if row.token_mask is not None}
    if len(masks) > 1:
        raise ValueError(f"rows' token masks differ in width: {sorted(masks)}")
    token_mask = np.full((num_rows, masks.pop() if masks else 0), -1, np.int32)
    for i, row in enumerate(rows):
        if row.token_mask is not None:
            token_mask[i] = row.token_mask
    return SamplingBatch(temperature, top_k, top_p, min_p, seeds, steps, rep, presence,
                         frequency, penalty_ids, penalty_counts, penalty_in_prompt, suppress_ids,
                         bias_ids, bias_values, allow_only, token_mask)


def _bias_entries(p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """A row's bias table: its logit_bias, and with allowed_token_ids exactly the allowed ids
    (bias 0 unless logit_bias gives one; a bias on an id that is not allowed has no effect)."""
    bias = p.logit_bias or {}
    if p.allowed_token_ids is not None:
        ids = np.unique(np.asarray(p.allowed_token_ids, np.int64))
    elif bias:
        ids = np.asarray(sorted(bias), np.int64)
    else:
        return _NO_IDS, np.zeros(0, np.float32)
    return ids, np.asarray([bias.get(int(t), 0.0) for t in ids], np.float32)


# --------------------------------------------------------------------------- sampler


def _scatter_ids(ids: jax.Array, vocab: int) -> jax.Array:
    # Negative indices wrap in JAX scatters; aim padding one past the vocab so
    # mode="drop" discards it instead of hitting the last token.
    return jnp.where(ids < 0, vocab, ids)


def apply_penalties(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Repetition (prompt ∪ output), then presence and frequency (output only). [R, V] → [R, V].

    The ids in a row are distinct, so the gather → update → scatter below never
    writes one token twice.
    """
    if batch.penalty_ids.shape[1] == 0:
        return logits
    num_rows, vocab = logits.shape
    rows = jnp.arange(num_rows)[:, None]
    ids = _scatter_ids(batch.penalty_ids, vocab)
    current = logits.at[rows, ids].get(mode="fill", fill_value=0.0)  # [R, K]
    rp = batch.repetition_penalty[:, None]
    penalized = jnp.where(current > 0, current / rp, current * rp)
    counts = batch.penalty_counts
    penalized = (penalized
                 - batch.presence_penalty[:, None] * (counts > 0)
                 - batch.frequency_penalty[:, None] * counts)
    return logits.at[rows, ids].set(penalized, mode="drop")


def count_output_token(batch: SamplingBatch, token: jax.Array) -> SamplingBatch:
    """``batch`` with one more output token per row counted in its penalty table (``token`` [R],
    -1 = none): what the host would have packed, for a token it has not read back yet (async
    scheduling). The table gains one column, for tokens the row has not seen before. With no
    table (width 0) no row uses penalties: a row that does holds at least its prompt's ids."""
    if batch.penalty_ids.shape[1] == 0:
        return batch
    uses = ((batch.repetition_penalty != 1.0) | (batch.presence_penalty != 0.0)
            | (batch.frequency_penalty != 0.0))
    token = jnp.where(uses, token, -1)[:, None]
    seen = (batch.penalty_ids == token) & (token >= 0)
    new = (token >= 0) & ~seen.any(axis=1, keepdims=True)
    return dataclasses.replace(
        batch,
        penalty_ids=jnp.concatenate([batch.penalty_ids, jnp.where(new, token, -1)], axis=1),
        penalty_counts=jnp.concatenate([batch.penalty_counts + seen, new.astype(jnp.int32)], axis=1),
        penalty_in_prompt=jnp.concatenate([batch.penalty_in_prompt, jnp.zeros_like(new)], axis=1))


def apply_logit_bias(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """allowed_token_ids (every id outside a row's table → -inf), then logit_bias (each table
    id's value added). [R, V] → [R, V]; the ids in a row are distinct."""
    if batch.bias_ids.shape[1] == 0:
        return logits
    num_rows, vocab = logits.shape
    rows = jnp.arange(num_rows)[:, None]
    ids = _scatter_ids(batch.bias_ids, vocab)
    listed = jnp.zeros(logits.shape, bool).at[rows, ids].set(True, mode="drop")
    logits = jnp.where(batch.allow_only[:, None] & ~listed, -jnp.inf, logits)
    return logits.at[rows, ids].add(batch.bias_values, mode="drop")


def apply_token_mask(logits: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Structured outputs: -inf for every token whose bit in the row's ``token_mask``
    [R, vocab / 32] is clear. [R, V] → [R, V]; width 0 = no row has a grammar."""
    if token_mask.shape[1] == 0:
        return logits
    num_rows, vocab = logits.shape
    bits = (token_mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [R, M, 32]
    allowed = bits.reshape(num_rows, -1)[:, :vocab].astype(bool)
    return jnp.where(allowed, logits, -jnp.inf)


def suppress_tokens(logits: jax.Array, suppress_ids: jax.Array) -> jax.Array:
    """Ban ``suppress_ids`` [R, S] (-1 = padding) by setting their logits to -inf, except in a
    row where that would leave no token at all: the grammar's mask or allowed_token_ids keep
    only what is banned (say, EOS once a grammar is complete, with min_tokens not reached).
    The hard constraint wins there rather than an arbitrary token being drawn."""
    if suppress_ids.shape[1] == 0:
        return logits
    rows = jnp.arange(logits.shape[0])[:, None]
    banned = logits.at[rows, _scatter_ids(suppress_ids, logits.shape[1])].set(-jnp.inf, mode="drop")
    nothing_left = jnp.all(banned == -jnp.inf, axis=-1) & jnp.any(logits > -jnp.inf, axis=-1)
    return jnp.where(nothing_left[:, None], logits, banned)


# Rows whose top_k is at most this take their candidates from ``lax.top_k``; the others find
# their thresholds by bisection over the whole vocabulary (no sort: on CPU, 16 rows × 152k took
# 3 ms for the candidates and 459 ms to sort; 64 rows: 2.9 s to sort, 0.24 s to bisect).
TOP_K_CANDIDATES = 64


def _threshold_from_sorted(sorted_desc: jax.Array, k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per-row threshold from each row's largest logits in descending order [R, W] (at least
    the row's top-k candidates)."""
    width = sorted_desc.shape[1]
    # Ties with the k-th logit are in the top k (as in HF and the bisection below).
    kth = jnp.take_along_axis(sorted_desc, (jnp.minimum(k, width) - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf), axis=-1)
    # Exclusive prefix sum by shifting rather than cumsum - probs, which would
    # add a rounding error of its own.
    mass_before = jnp.concatenate(
        [jnp.zeros_like(probs[:, :1]), jnp.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
    keep_p = jnp.sum(mass_before < top_p[:, None], axis=-1)
    # top_p = 1 must keep everything exactly: float32 prefix sums can reach 1.0
    # before the tail and would otherwise cut tokens a no-sort batch keeps.
    keep_p = jnp.where(top_p < 1.0, keep_p, width)
    num_keep = jnp.clip(jnp.minimum(k, keep_p), 1, width)  # [R] ≥ 1
    return jnp.take_along_axis(sorted_desc, (num_keep - 1)[:, None], axis=-1)[:, 0]


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 values ``x`` (for an exact bisection)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _first_true(lo: jax.Array, hi: jax.Array, test) -> jax.Array:
    """Per row, the smallest key u in (lo, hi] with ``test(u)`` [R] → [R] bool true, given
    test(lo) false, test(hi) true and ``test`` monotonic: 32 halvings of a uint32 range."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        passed = test(mid)
        return jnp.where(passed, lo, mid), jnp.where(passed, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def _bisected_threshold(scaled: jax.Array, k: jax.Array, top_p: jax.Array,
                        sizable: jax.Array) -> jax.Array:
    """Per-row threshold of top-k then top-p over the whole vocabulary without sorting it: the
    k-th largest logit by bisection on the count of logits at or above a key (only when some
    ``sizable`` row has TOP_K_CANDIDATES < k < vocab), then the smallest logit v whose tokens
    above it hold less than top_p of the top-k mass, by bisection on that mass. Both are the
    values a descending sort gives."""
    vocab = scaled.shape[1]
    keys = _order_keys(scaled)  # [R, V]
    smallest = jnp.zeros(k.shape, jnp.uint32)  # below every logit's key
    largest = jnp.max(keys, axis=-1)

    def kth_largest():
        fewer = lambda u: jnp.sum(keys >= u[:, None], axis=-1) < k  # noqa: E731
        above = _first_true(smallest, largest + 1, fewer)  # one past the k-th largest's key
        return jnp.min(jnp.where(keys >= (above - 1)[:, None], scaled, jnp.inf), axis=-1)

    in_range = sizable & (k < vocab)
    top_k = jax.lax.cond(jnp.any(in_range), kth_largest,
                         lambda: jnp.full(k.shape, -jnp.inf, scaled.dtype))
    top_k = jnp.where(in_range, top_k, -jnp.inf)
    probs = jax.nn.softmax(jnp.where(scaled >= top_k[:, None], scaled, -jnp.inf), axis=-1)
    light = lambda u: jnp.sum(jnp.where(keys > u[:, None], probs, 0.0), axis=-1) < top_p  # noqa: E731
    cut = _first_true(smallest, largest, light)
    top_p_threshold = jnp.min(jnp.where(keys >= cut[:, None], scaled, jnp.inf), axis=-1)
    return jnp.where(top_p < 1.0, jnp.maximum(top_p_threshold, top_k), top_k)


def _truncation_threshold(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array,
                          truncates: jax.Array) -> jax.Array:
    """Per-row logit threshold [R] implementing top-k then top-p on ``scaled`` [R, V].

    Tokens with ``scaled >= threshold`` survive (ties with the last kept token survive too,
    and ties with the k-th logit count as top k, as in HF). Top-p keeps the shortest
    most-likely prefix whose mass reaches top_p, measured after top-k renormalisation; the
    top token is always kept because its exclusive prefix mass is 0.

    A row with 0 < top_k ≤ TOP_K_CANDIDATES needs only its top_k largest logits, which
    ``lax.top_k`` finds; the other truncating rows bisect over the whole vocabulary
    (``_bisected_threshold``), only when there are any. A row's tokens never depend on what
    else shares the batch.
    """
    vocab = scaled.shape[1]
    width = min(TOP_K_CANDIDATES, vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # [R]
    few = k <= width
    top = jax.lax.top_k(scaled, width)[0]
    threshold = jnp.where(few, _threshold_from_sorted(top, k, top_p), -jnp.inf)
    sizable = truncates & ~few
    return jax.lax.cond(jnp.any(sizable),
                        lambda: jnp.where(few, threshold, _bisected_threshold(scaled, k, top_p, sizable)),
                        lambda: threshold)


def row_noise(seeds: jax.Array, steps: jax.Array, vocab: int) -> jax.Array:
    """The Gumbel noise [R, vocab] each row's sample adds, from key ``fold_in(key(seed), step)``
    (a draft model draws its proposal for a step with the same noise: qwenjax/engine/draft_model.py)."""
    def row(seed, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.gumbel(key, (vocab,), jnp.float32)

    return jax.vmap(row)(seeds, steps)


def truncated_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                     top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Temperature → top-k → top-p → min-p, per row: the logits [R, V] scaled by the row's
    temperature, the tokens it cannot sample at -inf (greedy rows: only scaled by 1)."""
    num_rows = logits.shape[0]
    greedy = temperature < GREEDY_TEMPERATURE_EPS
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]

    # Finding the top-k/top-p candidates dominates the sampler's cost; skip it when no row
    # asks for top-k/top-p. Skipping is row-neutral: a row with both off keeps every token
    # in every branch.
    truncates = ~greedy & ((top_k > 0) | (top_p < 1.0))
    threshold = jax.lax.cond(
        jnp.any(truncates),
        lambda: _truncation_threshold(scaled, top_k, top_p, truncates),
        lambda: jnp.full((num_rows,), -jnp.inf, scaled.dtype))
    # min-p relative to the max prob is unchanged by top-k/top-p renormalisation
    # (the max token is always kept), so it is a log-space offset from the max.
    # log(0) = -inf turns it off.
    max_scaled = jnp.max(scaled, axis=-1)
    threshold = jnp.maximum(threshold, max_scaled + jnp.log(min_p))
    return jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)


def _sample_rows(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Temperature → top-k → top-p → min-p → Gumbel-max, per row. [R, V] → [R] int32."""
    masked = truncated_logits(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p)
    noise = row_noise(batch.seeds, batch.steps, logits.shape[1])
    return jnp.argmax(masked + noise, axis=-1).astype(jnp.int32)


def has_tables(batch: SamplingBatch) -> bool:
    """Whether any row of ``batch`` needs ``adjusted_logits`` (a grammar, allowed_token_ids or
    logit_bias, penalties, banned ids): a table of non-zero width."""
    return any(table.shape[1] for table in (batch.token_mask, batch.bias_ids, batch.penalty_ids,
                                            batch.suppress_ids))


def without_tables(batch: SamplingBatch) -> SamplingBatch:
    """``batch`` with zero-width tables: what ``choose`` reads (its compiled programs then
    depend on the row count alone)."""
    rows = batch.temperature.shape[0]
    return dataclasses.replace(
        batch, penalty_ids=np.zeros((rows, 0), np.int32), penalty_counts=np.zeros((rows, 0), np.int32),
        penalty_in_prompt=np.zeros((rows, 0), bool), suppress_ids=np.zeros((rows, 0), np.int32),
        bias_ids=np.zeros((rows, 0), np.int32), bias_values=np.zeros((rows, 0), np.float32),
        token_mask=np.zeros((rows, 0), np.int32))


def adjusted_logits(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """The logits [R, V] float32 a row chooses from (vLLM's order): the grammar's token mask,
    allowed_token_ids and logit_bias → penalties → suppress_ids. Only the tables read here
    vary in width, so the engine compiles this step apart from ``choose`` (a new table width
    then compiles this small program, not the whole sampler)."""
    logits = logits.astype(jnp.float32)
    with jax.named_scope("penalties"):
        adjusted = apply_logit_bias(apply_token_mask(logits, batch.token_mask), batch)
        return suppress_tokens(apply_penalties(adjusted, batch), batch.suppress_ids)


def sample(logits: jax.Array, batch: SamplingBatch, num_top: int = 0) -> SampleOutput:
    """Choose one token per row of ``logits`` [R, V] float32; ``num_top`` must be static.

    Order (vLLM): the grammar's token mask, allowed_token_ids and logit_bias → penalties →
    suppress_ids (``adjusted_logits``) → greedy argmax, or temperature → top-k → top-p →
    min-p → Gumbel-max with key ``fold_in(key(seed), step)`` (``choose``).
    Logprobs describe the raw model distribution (log_softmax of ``logits``),
    not the penalised/truncated one, as vLLM's default does.
    """
    return choose(logits, adjusted_logits(logits, batch), batch, num_top)


def choose(logits: jax.Array, adjusted: jax.Array, batch: SamplingBatch,
           num_top: int = 0) -> SampleOutput:
    """``sample`` given the ``adjusted_logits`` of ``logits``: reads only the per-row values of
    ``batch`` (temperature, top-k/p, min-p, seeds, steps), never its tables."""
    logits, adjusted = logits.astype(jnp.float32), adjusted.astype(jnp.float32)
    greedy = batch.temperature < GREEDY_TEMPERATURE_EPS
    greedy_ids = jnp.argmax(adjusted, axis=-1).astype(jnp.int32)
    with jax.named_scope("sample"):
        # An all-greedy step (the common serving default) skips the noise and
        # the truncation entirely.
        token_ids = jax.lax.cond(
            jnp.all(greedy), lambda: greedy_ids,
            lambda: jnp.where(greedy, greedy_ids, _sample_rows(adjusted, batch)))
    with jax.named_scope("logprobs"):
        chosen, top_ids, top_logprobs = raw_logprobs(logits, token_ids, num_top)
    # A NaN/inf logit (a numerical fault in the step) would still argmax to some token; the
    # engine fails the row instead. One reduction over [R, V] the sampler reads anyway.
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    return SampleOutput(token_ids, chosen, top_ids, top_logprobs, finite)


def raw_logprobs(logits: jax.Array, token_ids: jax.Array, num_top: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Under ``log_softmax(logits)`` [R, V]: the logprob of each row's ``token_ids`` [R], and its
    ``num_top`` (static) most likely ids and their logprobs, most likely first. For sampled
    tokens and for scoring prompt tokens alike."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)[:, 0]
    if num_top > 0:
        top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
    else:
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return chosen, top_ids.astype(jnp.int32), top_logprobs
