"""A request's state as the engine sees it, and what the engine hands back."""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    from qwenjax.lora import LoRARequest


class RequestStatus(enum.Enum):
    WAITING = "waiting"    # queued, or preempted and waiting to be recomputed
    RUNNING = "running"    # holds pages; gets tokens scheduled every step
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request. ``num_computed`` tokens have their K/V in ``pages``."""

    request_id: str
    prompt_ids: list[int]
    params: Any                      # qwenjax.sampling.SamplingParams
    seed: int                        # the effective seed (random when params.seed is None)
    arrival_time: float
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    # Prefix caching: the cache entries of this request's leading full pages (``pages[i]``
    # holds entry ``i``'s contents, or an equal copy), and whether the chain broke off.
    cache_entries: list = dataclasses.field(default_factory=list)
    cache_broken: bool = False
    num_cached_tokens: int | None = None  # prompt tokens found cached at first admission
    # LoRA: the adapter the request runs with (None: the base model) and its weight slot.
    lora_name: str | None = None
    lora_slot: int = 0
    lora_load: int = 0  # which load of the adapter (LoRASlots.load_id): salts the prefix cache
    # Async scheduling: tokens sampled by dispatched steps and not yet read back (0–2), and the
    # row of the latest such token in its step's sampled ids (the next step reads it there).
    num_inflight: int = 0
    inflight_row: int = -1
    # Parallel sampling (SamplingParams.n > 1): the client's request id and which of its n
    # sequences this is. Outputs carry the parent's id and the index.
    parent_id: str | None = None
    index: int = 0
    # Sequence 0 of the same request, for the others: they wait for it to compute the prompt.
    leader: Request | None = dataclasses.field(default=None, repr=False)
    # Prompt logprobs (params.prompt_logprobs set): entry i scores prompt token i given the
    # tokens before it; entry 0 is None (nothing comes before it). Filled as chunks compute.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # params.bad_words as token id sequences (Engine._bad_words_ids).
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    # params.structured_outputs: this sequence's place in its grammar (qwenjax.structured.Matcher).
    matcher: Any = dataclasses.field(default=None, repr=False)
    # Speculative decoding: its decode steps check drafts (qwenjax.engine.speculative): n-gram
    # drafts from its n-gram index (a speculative.NgramIndex, made by the scheduler), or a draft
    # model's (what the draft cache holds of it: a draft_model.DraftState; None once its pages
    # are released).
    speculate: bool = False
    ngrams: Any = dataclasses.field(default=None, repr=False)
    draft_state: Any = dataclasses.field(default=None, repr=False)
    # Scheduling policy "priority": lower values are admitted, and kept, first (vLLM's).
    priority: int = 0
    # Pooling: a pooling request (qwenjax.pooling.PoolingParams), the rows it has pooled so far
    # (a qwenjax.pooling.PoolState, made by the engine) and, once its prompt is computed, all
    # of them ([rows, width] float32 numpy).
    pooling: Any = None
    pool: Any = dataclasses.field(default=None, repr=False)
    embedding: Any = dataclasses.field(default=None, repr=False)
    # params.thinking_token_budget: how far its reasoning has run (qwenjax.reasoning.ThinkingBudget;
    # None without a budget, or when the prompt closed the reasoning).
    thinking_budget: Any = None
    # time.monotonic() when the scheduler first admitted it (its queue time ends there).
    first_scheduled_time: float | None = None
    # page_table's copy of ``pages``: (the list it copies, int32 array, entries filled).
    _page_table: tuple | None = dataclasses.field(default=None, repr=False)

    def page_table(self) -> np.ndarray:
        """``pages`` as int32, kept up to date as pages are appended (the scheduler appends to
        the list, or replaces it): packing a step copies this instead of converting a Python
        list of every page of every row, every step (O(context) per row)."""
        pages, cached = self.pages, self._page_table
        if cached is not None and cached[0] is pages and cached[2] <= len(pages):
            _, table, filled = cached
        else:
            table, filled = np.empty((max(16, len(pages)),), np.int32), 0
        if len(pages) > filled:
            if len(pages) > len(table):
                grown = np.empty((2 * len(pages),), np.int32)
                grown[:filled] = table[:filled]
                table = grown
            table[filled: len(pages)] = pages[filled:]
            self._page_table = pages, table, len(pages)
        return table[: len(pages)]

    @property
    def cache_salt(self) -> str | None:
        """What keeps this request's prefix-cache pages apart: its cache_salt, and its LoRA
        adapter (the same tokens have other K/V under another adapter)."""
        salt = self.params.cache_salt
        if self.lora_name is None:
            return salt
        return f"lora:{self.lora_name}@{self.lora_load}\0{salt or ''}"

    @property
    def prompt_logprobs_done(self) -> bool:
        return self.prompt_logprobs is None or len(self.prompt_logprobs) == len(self.prompt_ids)

    @property
    def needs_known_outputs(self) -> bool:
        """Its next sampling step reads its latest output tokens on the host (a grammar, a bad
        word of several tokens, a thinking budget not yet spent): the engine reads its step back
        before scheduling the next (as for n-gram drafts, while the scheduler drafts:
        ``Scheduler.drafting``)."""
        return (self.matcher is not None or any(len(ids) > 1 for ids in self.bad_words_ids)
                or (self.thinking_budget is not None and not self.thinking_budget.done))

    def banned_ids(self, drafted: Sequence[int] = ()) -> tuple[int, ...]:
        """The ids its bad words ban at the next token (its output tokens must all be known),
        after the ``drafted`` tokens if any: a word's last id wherever the output ends with the
        ids before it."""
        out = self.output_ids + list(drafted)
        return tuple(ids[-1] for ids in self.bad_words_ids
                     if len(ids) == 1 or (len(ids) <= len(out) + 1
                                          and out[len(out) - len(ids) + 1:] == list(ids[:-1])))

    @property
    def num_known(self) -> int:
        """Tokens whose ids the host holds: the prompt and the outputs read back so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """The sequence's length, counting tokens still on their way back from the device."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_inflight

    @property
    def num_output_tokens(self) -> int:
        """Outputs so far, counting those on their way back (what the sampler's step index is)."""
        return len(self.output_ids) + self.num_inflight

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V still have to be computed (1 for a decoding request)."""
        return self.num_tokens - self.num_computed

    def tokens(self, start: int, stop: int) -> list[int]:
        """Ids of tokens ``start:stop``, all of which must be known (not in flight)."""
        assert stop <= self.num_known, f"tokens up to {stop} asked, {self.num_known} known"
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n: stop - n]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclasses.dataclass(frozen=True)
class Logprob:
    """vLLM's entry of a position's logprobs: the token's log-probability, its rank among the
    vocabulary (1: the most likely; None where it is not among the top alternatives asked
    for) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class TokenLogprob(Mapping):
    """One position's logprobs: the token there, its logprob and the top alternatives.

    Also a read-only mapping in vLLM's shape, token id → ``Logprob``: the token itself first,
    then the alternatives, so vLLM code such as ``lp[token_id].logprob`` or
    ``{t: e.logprob for t, e in lp.items()}`` runs unchanged. ``decode`` (set by ``LLM``)
    fills ``decoded_token``."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the most likely alternatives
    decode: Callable[[int], str] | None = dataclasses.field(default=None, repr=False, compare=False)

    def _tokens(self) -> list[int]:
        """The token, then the alternatives other than it."""
        return [self.token_id] + [token for token, _ in self.top if token != self.token_id]

    def __getitem__(self, token_id: int) -> Logprob:
        """One entry, built (and its text decoded) only when read."""
        rank = next((r for r, (token, _) in enumerate(self.top, 1) if token == token_id), None)
        if token_id == self.token_id:
            value = self.logprob
        elif rank is not None:
            value = self.top[rank - 1][1]
        else:
            raise KeyError(token_id)
        return Logprob(value, rank, self.decode(token_id) if self.decode is not None else None)

    def __iter__(self) -> Iterator[int]:
        return iter(self._tokens())

    def __len__(self) -> int:
        return len(self._tokens())


@dataclasses.dataclass
class RequestMetrics:
    """Engine-side times of a request (time.monotonic()): added, first computed in a step,
    first token sampled, finished."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        """Waiting for its first step (behind other requests' prefills, or a full KV cache)."""
        t = self.first_scheduled_time
        return None if t is None else t - self.arrival_time

    @property
    def prefill_time(self) -> float | None:
        """From its first step to its first token (its prompt's chunks)."""
        t0, t1 = self.first_scheduled_time, self.first_token_time
        return None if t0 is None or t1 is None else t1 - t0

    @property
    def decode_time(self) -> float | None:
        """From its first token to its end."""
        t0, t1 = self.first_token_time, self.finish_time
        return None if t0 is None or t1 is None else t1 - t0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


class GrowingPrefix(NamedTuple):
    """The first ``length`` items of ``items``, a list that is only ever appended to (a
    sequence's token ids, its logprobs): an O(1) stand-in for the copy ``items[:length]``."""

    items: list
    length: int


class _Snapshot:
    """A RequestOutput list field that may be set to a ``GrowingPrefix``: copied on the first
    read, so an output nobody reads in full (a stream consumer takes the deltas) costs nothing
    per step, and one read later still holds what it held when it was made."""

    def __init__(self, default: Any = dataclasses.MISSING):
        self.default = default

    def __set_name__(self, owner, name: str):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:  # the dataclass asks for the field's default
            if self.default is dataclasses.MISSING:
                raise AttributeError(self.slot[1:])
            return self.default
        value = obj.__dict__[self.slot]
        if type(value) is GrowingPrefix:
            value = obj.__dict__[self.slot] = value.items[: value.length]
        return value

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value


@dataclasses.dataclass
class RequestOutput:
    """A sequence's state after a step: the new part (``delta_*``) and the whole so far.

    With ``n`` > 1 a request has n sequences; each output describes one (``index``). A
    sequence's last output has ``finish_reason`` set; ``finished`` is set on the last output of
    the whole request (for n = 1 the two coincide).
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int] = _Snapshot()
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None      # "stop" | "length" | "abort" | "error"
    matched_stop: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = _Snapshot(default=None)
    delta_logprobs: list[TokenLogprob] | None = None
    # With params.prompt_logprobs: one entry per prompt token, the first None (see Request);
    # set from the first output on (with n > 1, on sequence 0's outputs).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None
    index: int = 0                        # which of the request's n sequences
    # A pooling request's answer (on its last output): floats, or a list of them per pooled token.
    embedding: list | None = None
    # SamplingParams.return_hidden_states (on the sequence's last output): [positions, hidden]
    # float32, the final-normed hidden states of the prompt and of every generated token but the
    # last (SGLang's).
    hidden_states: Any = dataclasses.field(default=None, repr=False, compare=False)
    prompt: str | None = None  # the prompt's text (LLM.generate/chat fill it in; vLLM's)
    # vLLM's: the LoRARequest the call ran on (None: the base model); LLM and AsyncLLM fill it in.
    lora_request: LoRARequest | None = None
    stopped_at_eos: bool = False  # ended by the model's end-of-sequence token
    # LLM.generate/chat with n > 1 (vLLM's shape): the prompt's n sequences, on a result that is
    # otherwise sequence 0's.
    sequences: list[RequestOutput] | None = dataclasses.field(default=None, repr=False, compare=False)

    # vLLM's shape: ``output.outputs[i].text``: the sequences of the prompt (this one alone, or
    # ``sequences``).
    @property
    def outputs(self) -> list[RequestOutput]:
        return self.sequences if self.sequences is not None else [self]

    def as_delta(self) -> RequestOutput:
        """This output with ``text``, ``token_ids`` and ``logprobs`` holding only what is new
        (vLLM's RequestOutputKind.DELTA)."""
        return dataclasses.replace(self, text=self.delta_text, token_ids=self.delta_token_ids,
                                   logprobs=self.delta_logprobs)

    @property
    def stop_reason(self) -> str | int | None:
        """vLLM's: the stop string or stop token id that ended the sequence; None for EOS and
        the length limit (``matched_stop`` names the EOS token too, as SGLang's ``matched``)."""
        return None if self.stopped_at_eos else self.matched_stop

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the sampled tokens' logprobs (with ``logprobs`` asked for; else None)."""
        return None if self.logprobs is None else float(sum(lp.logprob for lp in self.logprobs))

    def followed_by(self, later: RequestOutput) -> RequestOutput:
        """One output standing for this one and the ``later`` one of the same sequence: the
        later state, with both deltas (a consumer that fell behind takes them at once)."""
        logprobs = None
        if self.delta_logprobs is not None or later.delta_logprobs is not None:
            logprobs = (self.delta_logprobs or []) + (later.delta_logprobs or [])
        return dataclasses.replace(
            later, delta_text=self.delta_text + later.delta_text,
            delta_token_ids=self.delta_token_ids + later.delta_token_ids, delta_logprobs=logprobs,
            prompt_logprobs=later.prompt_logprobs if later.prompt_logprobs is not None
            else self.prompt_logprobs)
