"""Quantized weights: FP8 with per-channel scales, and 4/8-bit integers with group scales.

**FP8** (``"fp8"``): float8_e4m3fn values with one float32 scale per output channel.

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

**Integers** (``"int4"``, ``"int8"``): unsigned codes with a float32 scale and an integer zero
point per group of consecutive input channels (AWQ and GPTQ's format, "W4A16"):
``W = (code - zero) * scale``. The scale varies along the contraction, so the projection
dequantizes the weight inside the step (XLA fuses the conversion into the matmul's operand
on GPU when it can). AWQ and GPTQ checkpoints load their codes, zeros and scales exactly
(int_checkpoints.py); ``quantization="int4"`` on a dense checkpoint rounds each group to
nearest (min/max range, no calibration: below AWQ/GPTQ quality, as it is for vLLM's RTN).
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

SCHEMES = ("fp8", "int4", "int8")
# Names vLLM takes for checkpoints in these formats; they select the checkpoint's own scheme.
CHECKPOINT_FORMATS = ("awq", "gptq", "awq_marlin", "gptq_marlin")
QUANTIZATION_CHOICES = SCHEMES + CHECKPOINT_FORMATS  # what --quantization accepts
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448
INT_BITS = {"int4": 4, "int8": 8}
INT_DTYPES = {4: jnp.uint4, 8: jnp.uint8}
DEFAULT_GROUP_SIZE = 128  # input channels per scale when quantizing a dense checkpoint


def check_scheme(quantization: str | None) -> str | None:
    """``quantization`` validated: None (weights in the model dtype) or one of ``SCHEMES``."""
    if quantization is None or quantization in SCHEMES:
        return quantization
    raise ValueError(f"quantization must be one of {', '.join(SCHEMES)} (or None for the model "
                     f"dtype); got {quantization!r}")


def check_requested(quantization: str | None) -> str | None:
    """A user's ``quantization``: a scheme, a checkpoint format name (vLLM's), or None."""
    if quantization is None or quantization in QUANTIZATION_CHOICES:
        return quantization
    raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)} (or "
                     f"None: the checkpoint's own); got {quantization!r}")


def effective_scheme(requested: str | None, stored: "CheckpointQuantization | None") -> str | None:
    """The scheme a checkpoint stored as ``stored`` loads in when the user asks for
    ``requested``: a quantized checkpoint stays quantized unless told otherwise (as in vLLM),
    and a format name ("awq", "gptq") must name the checkpoint's own format."""
    check_requested(requested)
    if requested in CHECKPOINT_FORMATS:
        method = requested.removesuffix("_marlin")
        if stored is None or stored.method != method:
            found = stored.method if stored is not None else "not quantized"
            raise ValueError(f"quantization {requested!r} names a checkpoint format, but the "
                             f"checkpoint is {found}; use one of {', '.join(SCHEMES)} to quantize "
                             "at load")
        return stored.scheme
    if requested is None and stored is not None:
        return stored.scheme
    return requested


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class IntWeight:
    """A matmul weight as unsigned integer codes with a scale and zero point per ``group``
    consecutive entries of its contracted axis ``axis``: ``W = (value - zero) * scale``."""

    value: jax.Array  # the weight's shape, uint4 or uint8 codes
    scale: jax.Array  # the weight's shape with `axis` divided by `group`, float32
    zero: jax.Array   # like scale, in value's dtype: the code of 0.0
    axis: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        shape, a = self.value.shape, self.axis
        codes = self.value.astype(jnp.float32).reshape(
            shape[:a] + (shape[a] // self.group, self.group) + shape[a + 1:])
        zero = jnp.expand_dims(self.zero.astype(jnp.float32), a + 1)
        scale = jnp.expand_dims(self.scale, a + 1)
        return ((codes - zero) * scale).reshape(shape).astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def bits(self) -> int:
        return int_bits(self.value.dtype)


def element_bytes(dtype) -> float:
    """Bytes a stored element takes: XLA keeps 4-bit integers two to a byte."""
    dtype = jnp.dtype(dtype)
    return 0.5 if dtype in (jnp.dtype(jnp.uint4), jnp.dtype(jnp.int4)) else dtype.itemsize


def int_bits(dtype) -> int:
    """Bits of an integer code dtype (uint4 or uint8)."""
    return 4 if jnp.dtype(dtype) == jnp.uint4 else 8


def quantize_int(weight: jax.Array, axis: int, group: int, bits: int) -> IntWeight:
    """Round-to-nearest ``bits``-bit codes of ``weight`` over groups of ``group`` entries along
    ``axis``, each group's range [min, max] mapped onto [0, 2^bits - 1]. An all-zero group
    (padding) gets scale 1 and zero 0: exact zeros."""
    top = 2 ** bits - 1
    shape = weight.shape
    w = weight.astype(jnp.float32).reshape(shape[:axis] + (shape[axis] // group, group)
                                           + shape[axis + 1:])
    lo = jnp.minimum(jnp.min(w, axis=axis + 1), 0.0)
    hi = jnp.maximum(jnp.max(w, axis=axis + 1), 0.0)
    scale = jnp.where(hi > lo, (hi - lo) / top, 1.0)
    zero = jnp.clip(jnp.round(-lo / scale), 0, top)
    codes = jnp.clip(jnp.round(w / jnp.expand_dims(scale, axis + 1)) + jnp.expand_dims(zero, axis + 1),
                     0, top)
    dtype = INT_DTYPES[bits]
    return IntWeight(value=codes.reshape(shape).astype(dtype), scale=scale,
                     zero=zero.astype(dtype), axis=axis, group=group)


def is_quantized(x) -> bool:
    return isinstance(x, (Fp8Weight, IntWeight))


def dequantize_tree(tree, dtype=jnp.float32):
    """Every quantized weight in ``tree`` replaced by its dense weight (tests, comparisons)."""
    return jax.tree.map(lambda w: w.dequantize(dtype) if is_quantized(w) else w, tree,
                        is_leaf=is_quantized)


# ---- FP8 checkpoints -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    """How a checkpoint's weights are stored, from its config.json ``quantization_config``."""

    scheme: str                                  # "fp8", "int4" or "int8"
    method: str                                  # quant_method as written ("fp8", "awq", …)
    block: tuple[int, int] | None = None         # weight_block_size [out, in] of block scales
    group_size: int | None = None                # AWQ/GPTQ input channels per scale (None: all)
    zero_offset: int = 0                         # added to stored zeros (GPTQ's v1 format: 1)

    @property
    def bits(self) -> int | None:
        return INT_BITS.get(self.scheme)


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
    if method in ("awq", "gptq"):
        return _parse_int_config(raw, method, where)
    raise ValueError(f"{where}: quantization method {method!r} is not supported; supported: FP8 "
                     "checkpoints (quant_method 'fp8' or 'compressed-tensors' float8), AWQ (gemm) "
                     "and GPTQ (4 or 8 bits, no act-order), or any bf16/fp16 checkpoint with "
                     f"quantization one of {', '.join(SCHEMES)} at load")


def _parse_int_config(raw: dict, method: str, where: str) -> CheckpointQuantization:
    """AutoAWQ's ``{"quant_method": "awq", "bits"/"w_bit": 4, "group_size"/"q_group_size": 128,
    "zero_point": true, "version": "gemm"}`` or AutoGPTQ/GPTQModel's ``{"quant_method": "gptq",
    "bits": 4|8, "group_size": 128|-1, "desc_act": false, "sym": …, "checkpoint_format": …}``."""
    bits = raw.get("bits", raw.get("w_bit"))
    group = raw.get("group_size", raw.get("q_group_size"))
    allowed_bits = (4,) if method == "awq" else (4, 8)
    if bits not in allowed_bits:
        raise ValueError(f"{where}: quantization_config.bits {bits!r} is not supported for {method} "
                         f"(supported: {', '.join(map(str, allowed_bits))})")
    if not isinstance(group, int) or isinstance(group, bool) or not (group > 0 or group == -1):
        raise ValueError(f"{where}: quantization_config.group_size must be a positive int or -1, "
                         f"got {group!r}")
    if raw.get("lm_head"):
        raise ValueError(f"{where}: a quantized lm_head is not supported (quantization_config.lm_head)")
    offset = 0
    if method == "awq":
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{where}: AWQ version {version!r} is not supported (gemm only: its "
                             "packing is the one AWQ checkpoints on the hub use)")
        if raw.get("zero_point", True) is not True:
            raise ValueError(f"{where}: AWQ without zero points is not supported (zero_point must be true)")
    else:
        fmt = raw.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported "
                             "(gptq or gptq_v2)")
        offset = 1 if fmt == "gptq" else 0  # v1 stores each zero point minus one
        # desc_act (act-order) is checked per tensor from g_idx: it only matters when the
        # groups are not in input order.
    return CheckpointQuantization(f"int{bits}", method, group_size=None if group == -1 else group,
                                  zero_offset=offset)


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
