"""vLLM's ``vllm.outputs`` import path. A qwenjax ``RequestOutput`` is also each sequence's
output (vLLM's ``CompletionOutput``: ``.text``, ``.token_ids``, ``.logprobs``, …)."""
from qwenjax.engine.request import Logprob, RequestOutput
from qwenjax.pooling import (ClassificationOutput, EmbeddingOutput, PoolingOutput, ScoringOutput,
                             ScoringRequestOutput)

CompletionOutput = RequestOutput

__all__ = ["RequestOutput", "CompletionOutput", "Logprob", "EmbeddingOutput", "ClassificationOutput",
           "PoolingOutput", "ScoringOutput", "ScoringRequestOutput"]
