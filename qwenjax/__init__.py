"""qwenjax: a JAX/XLA SPMD inference runtime for Qwen2.5 models."""

__version__ = "0.1.0"

__all__ = ["LLM", "AsyncLLM", "LLMEngine", "AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs",
           "SamplingParams", "StructuredOutputs", "StructuredOutputsParams",
           "GuidedDecodingParams", "RequestOutput", "LoRARequest", "BeamSearchParams", "PoolingParams",
           "TextPrompt", "TokensPrompt"]


def __getattr__(name):
    # Lazy: `import qwenjax` must not import JAX (tests set XLA flags first; the CLI parses args first).
    if name in ("LLM", "AsyncLLM", "LLMEngine", "AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs",
                "TextPrompt", "TokensPrompt"):
        from qwenjax import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from qwenjax.sampling import SamplingParams

        return SamplingParams
    # vLLM's names of the same class: StructuredOutputsParams, and GuidedDecodingParams before it.
    if name in ("StructuredOutputs", "StructuredOutputsParams", "GuidedDecodingParams"):
        from qwenjax.structured import StructuredOutputs

        return StructuredOutputs
    if name == "BeamSearchParams":
        from qwenjax.beam_search import BeamSearchParams

        return BeamSearchParams
    if name == "PoolingParams":
        from qwenjax.pooling import PoolingParams

        return PoolingParams
    if name == "LoRARequest":
        from qwenjax.lora import LoRARequest

        return LoRARequest
    if name == "RequestOutput":
        from qwenjax.engine.request import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'qwenjax' has no attribute {name!r}")
