"""vLLM's ``vllm.inputs`` import path: the prompt shapes ``LLM.generate`` takes."""
from qwenjax.llm import TextPrompt, TokensPrompt

__all__ = ["TextPrompt", "TokensPrompt"]
