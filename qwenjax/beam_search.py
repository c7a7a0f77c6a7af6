"""Beam search over the engine, as vLLM's ``LLM.beam_search`` does it.

Each step asks the engine for one token of every live beam with its ``2 × beam_width`` most
likely continuations (their log-probabilities under the model's raw distribution); each
beam's candidates score ``cum_logprob + logprob``; the best ``beam_width`` that do not end in
EOS live on, those that do are complete. At the end the complete and live beams are ranked
by ``cum_logprob / length ** length_penalty`` (length: prompt and output tokens, an ending
EOS not counted — vLLM's score). The beams of a prompt share its prefix, so the prefix cache
computes a step's prompts in one page or so each rather than from the start.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Awaitable, Callable, Sequence

from qwenjax.sampling import SamplingParams

# Alternatives the engine returns per token (runner.MAX_TOP_LOGPROBS) / 2 candidates per beam.
MAX_BEAM_WIDTH = 10


def step_params(k: int) -> SamplingParams:
    """What each beam's one-token request asks for: its ``k`` most likely next tokens."""
    return SamplingParams(temperature=0.0, max_tokens=1, logprobs=k, ignore_eos=True)


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    # vLLM's fields, accepted: the beams follow the model's raw log-probabilities (vLLM's too:
    # its logprobs are taken before temperature), and beam search has no stop strings.
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number ≥ 0, got {self.temperature!r}")
        if not isinstance(self.beam_width, int) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be an int in [1, {MAX_BEAM_WIDTH}], got "
                             f"{self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")


@dataclasses.dataclass
class BeamSearchSequence:
    tokens: list[int]             # prompt and output (vLLM's)
    cum_logprob: float            # of the output tokens
    num_prompt_tokens: int
    text: str | None = None       # the output, decoded (None without a tokenizer)
    finish_reason: str = "length"  # "stop": ended in EOS

    @property
    def token_ids(self) -> list[int]:
        """The output tokens alone."""
        return self.tokens[self.num_prompt_tokens:]


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first, beam_width of them


def score(beam: BeamSearchSequence, eos_token_ids: Sequence[int], length_penalty: float) -> float:
    length = len(beam.tokens) - (1 if beam.tokens and beam.tokens[-1] in eos_token_ids else 0)
    return beam.cum_logprob / (length ** length_penalty)


class BeamSearch:
    """The search's state, stepped by whoever runs the model: ``pending()`` gives the token
    sequences to extend, ``advance(tops)`` takes each one's ``k`` most likely next tokens
    with their log-probabilities, ``outputs()`` ranks what it found."""

    def __init__(self, prompts: Sequence[Sequence[int]], params: BeamSearchParams,
                 eos_token_ids: Sequence[int]):
        self.params, self.eos = params, tuple(eos_token_ids)
        self.k = 2 * params.beam_width
        self._live = [[BeamSearchSequence(list(p), 0.0, len(p))] for p in prompts]
        self._done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self._steps = 0

    def _score(self, beam: BeamSearchSequence) -> float:
        return score(beam, self.eos, self.params.length_penalty)

    def pending(self) -> list[list[int]]:
        """Every live beam's tokens (none once max_tokens steps are done)."""
        if self._steps >= self.params.max_tokens:
            return []
        return [beam.tokens for beams in self._live for beam in beams]

    def advance(self, tops: Sequence[Sequence[tuple[int, float]]]) -> None:
        cursor = 0
        for i, beams in enumerate(self._live):
            candidates = []
            for beam in beams:
                for token, logprob in tops[cursor][:self.k]:
                    child = BeamSearchSequence(beam.tokens + [token], beam.cum_logprob + logprob,
                                               beam.num_prompt_tokens)
                    if token in self.eos and not self.params.ignore_eos:
                        child.finish_reason = "stop"
                        self._done[i].append(child)
                    else:
                        candidates.append(child)
                cursor += 1
            candidates.sort(key=self._score, reverse=True)
            self._live[i] = candidates[:self.params.beam_width]
        self._steps += 1

    def outputs(self) -> list[BeamSearchOutput]:
        return [BeamSearchOutput(sorted(done + live, key=self._score, reverse=True)
                                 [:self.params.beam_width])
                for done, live in zip(self._done, self._live)]


    def step_params(self) -> SamplingParams:
        return step_params(self.k)

    def decoded(self, tokenizer) -> list[BeamSearchOutput]:
        """``outputs()`` with each beam's output text (none without a tokenizer)."""
        outputs = self.outputs()
        if tokenizer is not None:
            for output in outputs:
                for beam in output.sequences:
                    beam.text = tokenizer.decode(beam.token_ids)
        return outputs


async def run_concurrently(search: BeamSearch,
                           top: Callable[[list[int]], Awaitable[list[tuple[int, float]]]]) -> None:
    """Step ``search`` to its end, each step's beams as concurrent ``top(tokens)`` calls (one
    engine request each); a step that fails cancels its siblings and ends the search."""
    while sequences := search.pending():
        tasks = [asyncio.ensure_future(top(ids)) for ids in sequences]
        try:
            tops = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        search.advance(tops)


def beam_search(prompts: Sequence[Sequence[int]], params: BeamSearchParams,
                top_logprobs: Callable[[list[list[int]], int], list[list[tuple[int, float]]]],
                eos_token_ids: Sequence[int], tokenizer=None) -> list[BeamSearchOutput]:
    """``top_logprobs(sequences, k)``: for each token sequence, the k most likely next tokens
    and their log-probabilities (the engine, one step of all live beams at once); the beams'
    texts decoded with ``tokenizer`` when one is given."""
    search = BeamSearch(prompts, params, eos_token_ids)
    while sequences := search.pending():
        search.advance(top_logprobs(sequences, search.k))
    return search.decoded(tokenizer)
