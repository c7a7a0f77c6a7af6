"""Embeddings from the served model (vLLM's pooling, ``LLM.embed``, ``/v1/embeddings``).

A pooling request runs its prompt like any other (chunked prefill, prefix caching, batched
with decoding requests) and yields the final-normed hidden state of its last token ("last"
pooling, as decoder embedding models built on Qwen2 use), optionally cut to its first
``dimensions`` values (Matryoshka) and L2-normalized. The engine samples one token for it too
(the step computes that row anyway) and drops it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np


TASKS = ("embed", "classify", "reward")


@dataclasses.dataclass(frozen=True)
class PoolingParams:
    """``task``: "embed" (the hidden state), or, on a classification / reward checkpoint
    (qwenjax/score_head.py), "classify" (the softmax of its head's logits) or "reward" (its
    head's raw output)."""

    normalize: bool = True          # L2-normalize the embedding
    dimensions: int | None = None   # keep the first this-many values (None: all)
    task: str = "embed"

    @property
    def n(self) -> int:
        """One output per prompt (as SamplingParams.n = 1, for code that handles both)."""
        return 1

    def __post_init__(self):
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")
        d = self.dimensions
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"dimensions must be a positive int, got {d!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task != "embed" and d is not None:
            raise ValueError(f"dimensions applies to embeddings, not to task {self.task!r}")

    def check(self, hidden_size: int, head_kind: str | None = None) -> None:
        """Whether the served model can answer: ``head_kind`` is its score head's ("classify",
        "reward"; None: a causal LM)."""
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise ValueError(f"dimensions is {self.dimensions}; the model's embeddings have "
                             f"{hidden_size}")
        if self.task != "embed" and self.task != head_kind:
            have = f"a {head_kind} head" if head_kind else "no score head (a causal LM)"
            raise ValueError(f"task {self.task!r} needs a checkpoint with a {self.task} head "
                             f"(Qwen2For{'SequenceClassification' if self.task == 'classify' else 'RewardModel'}); "
                             f"the served model has {have}")

    def apply(self, pooled: np.ndarray, hidden_size: int) -> list[float]:
        """The answer from a pooled row: the last-token hidden state (``hidden_size`` values),
        then the score head's outputs when the model has one."""
        pooled = np.asarray(pooled, np.float32)
        if self.task != "embed":
            scores = pooled[hidden_size:].astype(np.float64)
            if self.task == "classify":
                scores = np.exp(scores - scores.max())
                scores = scores / scores.sum()
            return scores.tolist()
        vector = pooled[:hidden_size][: self.dimensions]
        if self.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return vector.tolist()


def score_pairs(num_first: int, num_second: int) -> list[tuple[int, int]]:
    """The (i, j) pairs vLLM's scoring takes, indexing first + second: one first text against
    each second one, or two lists of one length pairwise."""
    if num_first == 1:
        return [(0, 1 + j) for j in range(num_second)]
    if num_first == num_second:
        return [(i, num_first + i) for i in range(num_first)]
    raise ValueError(f"text_1 has {num_first} texts and text_2 {num_second}: give text_1 one "
                     "text, or both lists of one length (scored pairwise)")


def cosine(a, b) -> float:
    """The cosine similarity of two embeddings."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


@dataclasses.dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclasses.dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclasses.dataclass
class PoolingOutput:
    data: list[float]


@dataclasses.dataclass
class ScoringOutput:
    score: float


@dataclasses.dataclass
class ScoringRequestOutput:
    """``LLM.score``'s result for one pair (vLLM's: ``.outputs.score``)."""

    request_id: str
    prompt_token_ids: list[int]  # the two texts' ids, one after the other
    outputs: ScoringOutput


@dataclasses.dataclass
class _PooledRequestOutput:
    """One prompt's result, vLLM's shape (``.outputs``), from a pooling request's last
    RequestOutput (``of``)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: Any
    wrap: ClassVar[type]

    @classmethod
    def of(cls, output):
        return cls(output.request_id, output.prompt_token_ids, cls.wrap(output.embedding))


class EmbeddingRequestOutput(_PooledRequestOutput):
    """``LLM.embed``'s result (``.outputs.embedding``)."""

    wrap = EmbeddingOutput


class ClassificationRequestOutput(_PooledRequestOutput):
    """``LLM.classify``'s result (``.outputs.probs``)."""

    wrap = ClassificationOutput


class PoolingRequestOutput(_PooledRequestOutput):
    """``LLM.reward``'s result (``.outputs.data``: the reward)."""

    wrap = PoolingOutput
