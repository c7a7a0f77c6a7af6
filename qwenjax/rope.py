"""Rotary position embeddings: default RoPE and YaRN (arXiv:2309.00071).

Qwen2 rotates the two halves of each head (``rotate_half``), not interleaved pairs.
Frequencies are computed on the host in float64 and follow transformers'
``_compute_yarn_parameters`` so logits match the HF oracle.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qwenjax.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies ``[head_dim // 2]`` and the cos/sin scale."""
    dim = config.head_dim
    base = config.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv_freq = 1.0 / pos_freqs
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength completes `num_rotations` turns over the original window.
        return (dim * math.log(scaling.original_max_position_embeddings
                               / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp  # high-frequency dims keep their original frequency
    interpolated = inv_freq / scaling.factor
    inv_freq = interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq, scaling.mscale


def rope_tables(positions: jnp.ndarray, config: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin ``[*positions.shape, head_dim]`` in float32."""
    inv_freq, scale = inverse_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x [..., head_dim]``; cos/sin broadcast over the head axes between."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
