"""FP8 weights: float8_e4m3fn values with one float32 scale per output channel.

A matmul weight ``W`` is stored as ``value = round_e4m3(W / scale)`` with ``scale`` the
largest magnitude of each output channel over the contracted axes, divided by 448 (e4m3's
largest finite value). Because the scale is constant along the contracted axes,
``x @ W ≈ (x @ value) * scale`` holds exactly as written: the projection multiplies its
fp32-accumulated output by ``scale`` and never materializes a dequantized weight in the
program. Activations stay in the model dtype (weight-only, "W8A16"): decode is bound by
reading weights, so halving their bytes is the gain, and it needs no FP8 tensor cores
(A100, L40S and MI300X run it too).

Embedding and lm_head stay in the model dtype, as vLLM and the published FP8 checkpoints
keep them: the lookup reads a few rows only, and the logits are the layer most sensitive
to rounding.

Checkpoints already in FP8 (``quantization_config`` in config.json: vLLM's ``fp8`` with
per-tensor or block scales, or ``compressed-tensors`` float8 with tensor/channel scales)
are read by dequantizing each slice with its checkpoint scale and re-quantizing per output
channel on device. For per-channel checkpoints that is exact (same scales, same values);
for per-tensor and block scales a channel's values are rounded once more, to a finer scale.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("fp8",)
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448


def check_scheme(quantization: str | None) -> str | None:
    """``quantization`` validated: None (weights in the model dtype) or one of ``SCHEMES``."""
    if quantization is None or quantization in SCHEMES:
        return quantization
    raise ValueError(f"quantization must be one of {', '.join(SCHEMES)} (or None for the model "
                     f"dtype); got {quantization!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Fp8Weight:
    """A matmul weight as fp8 values and per-output-channel scales: ``W ≈ value * scale``
    with ``scale`` broadcast over the ``contract`` axes."""

    value: jax.Array  # the weight's shape, float8_e4m3fn
    scale: jax.Array  # the weight's shape without the contract axes, float32
    contract: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        scale = jnp.expand_dims(self.scale, self.contract)
        return (self.value.astype(jnp.float32) * scale).astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape


def quantize_fp8(weight: jax.Array, contract: tuple[int, ...]) -> Fp8Weight:
    """Per-output-channel fp8 of ``weight``: one scale per index of the axes not in
    ``contract``. An all-zero channel (padding heads, MLP columns) gets scale 1 and zeros."""
    w = weight.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=contract)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    value = jnp.clip(w / jnp.expand_dims(scale, contract), -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return Fp8Weight(value=value, scale=scale, contract=tuple(contract))


def dequantize_tree(tree, dtype=jnp.float32):
    """Every ``Fp8Weight`` in ``tree`` replaced by its dense weight (tests, comparisons)."""
    return jax.tree.map(lambda w: w.dequantize(dtype) if isinstance(w, Fp8Weight) else w, tree,
                        is_leaf=lambda x: isinstance(x, Fp8Weight))


# ---- FP8 checkpoints -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    """How a checkpoint's weights are stored, from its config.json ``quantization_config``."""

    scheme: str                                  # "fp8"
    method: str                                  # quant_method as written ("fp8", "compressed-tensors")
    block: tuple[int, int] | None = None         # weight_block_size [out, in] of block scales


def checkpoint_quantization(directory: str | os.PathLike) -> CheckpointQuantization | None:
    """The checkpoint's quantization (None: plain weights); unsupported methods are refused
    here, with their name, rather than failing later on a missing ``weight`` tensor."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    with open(path) as f:
        raw = json.load(f).get("quantization_config")
    return parse_quantization_config(raw, str(directory))


def parse_quantization_config(raw: dict | None, where: str = "config.json"
                              ) -> CheckpointQuantization | None:
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: quantization_config must be an object, got {type(raw).__name__}")
    method = raw.get("quant_method")
    if method == "fp8":
        fmt = raw.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"{where}: quantization_config.fmt {fmt!r} is not supported (e4m3 only)")
        block = raw.get("weight_block_size")
        if block is not None:
            if (not isinstance(block, (list, tuple)) or len(block) != 2
                    or not all(isinstance(b, int) and b > 0 for b in block)):
                raise ValueError(f"{where}: quantization_config.weight_block_size must be two "
                                 f"positive ints, got {block!r}")
            block = (block[0], block[1])
        return CheckpointQuantization("fp8", method, block)
    if method == "compressed-tensors":
        groups = raw.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise ValueError(f"{where}: compressed-tensors quantization_config has no config_groups")
        for name, group in groups.items():
            weights = (group or {}).get("weights") or {}
            if (weights.get("type") != "float" or weights.get("num_bits") != 8
                    or weights.get("strategy") not in ("tensor", "channel")):
                raise ValueError(
                    f"{where}: compressed-tensors group {name!r} stores weights as "
                    f"{weights.get('type')!r} with {weights.get('num_bits')!r} bits, strategy "
                    f"{weights.get('strategy')!r}; only 8-bit float weights with tensor or channel "
                    "scales (FP8) are supported")
        return CheckpointQuantization("fp8", method)
    raise ValueError(f"{where}: quantization method {method!r} is not supported; supported: FP8 "
                     "checkpoints (quant_method 'fp8' or 'compressed-tensors' float8), or any "
                     "bf16/fp16 checkpoint with quantization='fp8' at load")


class Fp8CheckpointTensor:
    """A checkpoint's fp8 ``[out, in]`` weight and its scale, dequantized to float32 slice by
    slice: indexing reads only the requested block (as a plain memory-mapped tensor would).

    ``scale`` is per-tensor (``[]``/``[1]``), per-channel (``[out]``/``[out, 1]``) or per block
    (``[⌈out/b0⌉, ⌈in/b1⌉]`` with ``block = (b0, b1)``).
    """

    def __init__(self, value: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None = None,
                 transposed: bool = False):
        self._value, self._transposed = value, transposed
        out, inp = value.shape
        scale = np.asarray(scale, np.float32)
        if scale.size == 1:
            block, scale = (out, inp), scale.reshape(1, 1)
        elif block is None:
            if scale.size != out:
                raise ValueError(f"weight scale of shape {scale.shape} fits neither per-tensor nor "
                                 f"per-channel scales of a {value.shape} weight (no weight_block_size)")
            block, scale = (1, inp), scale.reshape(out, 1)
        elif scale.shape != (math.ceil(out / block[0]), math.ceil(inp / block[1])):
            raise ValueError(f"block scale of shape {scale.shape} does not match a {value.shape} "
                             f"weight in {block} blocks")
        self._scale, self._block = scale, block

    @property
    def shape(self) -> tuple[int, ...]:
        return self._value.shape[::-1] if self._transposed else self._value.shape

    @property
    def T(self) -> "Fp8CheckpointTensor":
        view = Fp8CheckpointTensor.__new__(Fp8CheckpointTensor)
        view.__dict__.update(self.__dict__, _transposed=not self._transposed)
        return view

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (2 - len(key))
        if not all(isinstance(k, slice) for k in key):
            raise TypeError(f"fp8 checkpoint tensors are sliced with slices only, got {key!r}")
        if self._transposed:
            key = key[::-1]
        rows = np.arange(self._value.shape[0])[key[0]]
        cols = np.arange(self._value.shape[1])[key[1]]
        scale = self._scale[np.ix_(rows // self._block[0], cols // self._block[1])]
        block = np.asarray(self._value[key], np.float32) * scale
        return block.T if self._transposed else block
