"""vLLM's ``vllm.sampling_params`` import path: a script that imports from it runs with
``vllm`` replaced by ``qwenjax``."""
from qwenjax.beam_search import BeamSearchParams
from qwenjax.sampling import RequestOutputKind, SamplingParams
from qwenjax.structured import StructuredOutputs

# vLLM's names of the one structured-outputs class (GuidedDecodingParams before v0.11).
StructuredOutputsParams = GuidedDecodingParams = StructuredOutputs

__all__ = ["SamplingParams", "BeamSearchParams", "StructuredOutputsParams", "GuidedDecodingParams",
           "RequestOutputKind"]
