"""Tiny random Qwen2 checkpoints written by transformers, for parity tests."""
from __future__ import annotations

import numpy as np

from qwenjax.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=14,
                num_kv_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))
    base.update(overrides)
    return ModelConfig(**base)


def write_hf_checkpoint(config: ModelConfig, directory, seed: int = 0, max_shard_size=None):
    """Random-init ``Qwen2ForCausalLM`` in float32, with non-zero biases and norms, saved to ``directory``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.Qwen2Config(**config.to_hf_dict())
    model = transformers.Qwen2ForCausalLM(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF inits biases and norms to constants; randomize them so the test sees them.
            if name.endswith("bias") or "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
