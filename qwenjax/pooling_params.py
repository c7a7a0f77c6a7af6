"""vLLM's ``vllm.pooling_params`` import path."""
from qwenjax.pooling import PoolingParams

__all__ = ["PoolingParams"]
