"""Reasoning outputs (vLLM's ``--reasoning-parser deepseek_r1``).

Models that think before they answer — QwQ-32B and DeepSeek-R1-Distill-Qwen-1.5B…32B, all
Qwen2 checkpoints — write their reasoning, then ``</think>``, then the answer. Their chat
templates often end the prompt with ``<think>\\n``, so the output may lack the opening tag;
an output with no closing tag (still thinking when ``max_tokens`` ran out) is all reasoning.
The split is done on the text: the tags are plain text to the tokenizers of some of these
models and special tokens to others.

``split_reasoning`` splits a finished output; ``ReasoningStream`` splits one as it streams,
holding back a tail that may be the start of a tag, so that the streamed pieces add up to
the finished split. ``ThinkingBudget`` caps the reasoning of one sequence (vLLM's
``thinking_token_budget``): past the budget the engine forces the closing tag.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

REASONING_PARSERS = ("deepseek_r1",)
START, END = "<think>", "</think>"


def check_reasoning_parser(name: str | None) -> str | None:
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser must be one of {list(REASONING_PARSERS)}, got {name!r}")
    return name


def held_back(text: str, tag: str) -> int:
    """Characters at the end of ``text`` that may begin ``tag`` (fewer than all of it): what a
    stream holds back until it is clear whether the tag comes."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _parts(text: str, final: bool) -> tuple[str, str | None]:
    """(reasoning, content; None before the closing tag) of ``text``; unless ``final``, what
    may still turn out to be a tag is left out."""
    stripped = text.lstrip()
    if stripped.startswith(START):
        body = stripped[len(START):]
    elif not final and START.startswith(stripped):
        return "", None  # nothing yet, or what may still open with <think>
    else:
        body = text
    end = body.find(END)
    if end < 0:
        return (body if final else body[: len(body) - held_back(body, END)]), None
    return body[:end], body[end + len(END):]


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a finished output, None for an empty part."""
    reasoning, content = _parts(text, final=True)
    return reasoning or None, content or None


class ReasoningStream:
    """The reasoning and content deltas of an output streamed in text deltas."""

    def __init__(self):
        self.text = ""
        self._reasoning = 0  # characters of each part sent so far
        self._content = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """(reasoning delta, content delta) to send now; ``final``: the output is complete."""
        self.text += delta
        reasoning, content = _parts(self.text, final)
        out = reasoning[self._reasoning:], (content or "")[self._content:]
        self._reasoning, self._content = len(reasoning), len(content or "")
        return out


@dataclasses.dataclass
class ThinkingBudget:
    """One sequence's ``SamplingParams.thinking_token_budget`` (vLLM's): its reasoning may run
    ``budget`` tokens; then the closing tag's tokens (``end_ids``) are forced, one a step, and the
    reply goes on after it. A reply that closes its reasoning sooner is left alone."""

    budget: int
    end_ids: tuple[int, ...]
    token_bytes: Callable[[int], bytes] = dataclasses.field(repr=False)
    counted: int = 0     # reasoning tokens sampled so far
    forcing: int = -1    # the index in end_ids of the next forced token; -1: none forced
    done: bool = False   # the reasoning has closed: nothing more to count or force
    _tail: bytes = b""   # the last bytes of the output, where a closing tag may be forming

    def __post_init__(self):
        if self.budget <= 0:
            self.forcing = 0

    @property
    def forced(self) -> int | None:
        """The token the next step must sample, or None."""
        return self.end_ids[self.forcing] if self.forcing >= 0 and not self.done else None

    def take(self, token_id: int) -> None:
        """Follow a sampled (or forced) token."""
        if self.done:
            return
        if self.forcing >= 0:
            self.forcing += 1
            self.done = self.forcing == len(self.end_ids)
            return
        self.counted += 1
        tag = END.encode()
        self._tail = (self._tail + self.token_bytes(token_id))[-2 * len(tag):]
        if tag in self._tail:
            self.done = True
        elif self.counted >= self.budget:
            self.forcing = 0
