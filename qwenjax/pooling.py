"""Embeddings from the served model (vLLM's pooling, ``LLM.embed``, ``/v1/embeddings``).

A pooling request runs its prompt like any other (chunked prefill, prefix caching, batched
with decoding requests) and yields the final-normed hidden state of its last token ("last"
pooling, as decoder embedding models built on Qwen2 use), optionally cut to its first
``dimensions`` values (Matryoshka) and L2-normalized. The engine samples one token for it too
(the step computes that row anyway) and drops it.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PoolingParams:
    normalize: bool = True          # L2-normalize the embedding
    dimensions: int | None = None   # keep the first this-many values (None: all)

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

    def check(self, hidden_size: int) -> None:
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise ValueError(f"dimensions is {self.dimensions}; the model's embeddings have "
                             f"{hidden_size}")

    def apply(self, hidden: np.ndarray) -> list[float]:
        """The embedding of a last-token hidden state (float32)."""
        vector = np.asarray(hidden, np.float32)[: self.dimensions]
        if self.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return vector.tolist()


@dataclasses.dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclasses.dataclass
class EmbeddingRequestOutput:
    """``LLM.embed``'s result for one prompt (vLLM's shape: ``.outputs.embedding``)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput

    @classmethod
    def of(cls, output) -> "EmbeddingRequestOutput":
        """From a pooling request's last RequestOutput."""
        return cls(output.request_id, output.prompt_token_ids, EmbeddingOutput(output.embedding))
