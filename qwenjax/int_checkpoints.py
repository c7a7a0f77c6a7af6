"""AWQ and GPTQ checkpoints: packed integer weights read as slices of their HF ``[out, in]`` weight.

Both formats keep a linear layer as ``qweight`` (codes packed into int32 words), ``qzeros``
(zero points, packed the same way along the output axis) and ``scales`` (one per group of
``group_size`` input channels and output channel): ``W[o, i] = (code - zero) * scale`` with
zero and scale taken at ``(i // group_size, o)``.

- AWQ (AutoAWQ "gemm"): ``qweight [in, out / 8]``, eight 4-bit codes per word along the
  output axis, interleaved: the nibble at bits ``4k`` holds output ``8c + AWQ_ORDER[k]``.
  ``qzeros [in / g, out / 8]`` is packed the same way.
- GPTQ (AutoGPTQ, GPTQModel): ``qweight [in / p, out]`` with ``p = 32 / bits`` codes per word
  along the *input* axis in order (bits ``b·k`` hold input ``p·r + k``);
  ``qzeros [in / g, out / p]`` along the output axis in order. The v1 format
  (``checkpoint_format: gptq``, the default) stores each zero point minus one.

``PackedIntTensor`` exposes one of four parts, each as float32 blocks of the ``[out, in]``
weight, so the loader's per-head and per-shard readers work on it unchanged: ``dense`` (the
dequantized weight), ``codes``, and ``scales``/``zeros`` repeated over their groups. Indexing
reads only the words, zero points and scales the block needs.
"""
from __future__ import annotations

import numpy as np

from qwenjax.quantization import CheckpointQuantization

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output of each nibble within an AWQ word
PARTS = ("dense", "codes", "scales", "zeros")


def unpack_words(words: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """``[..., n]`` int32 words → ``[..., n · 32/bits]`` codes (int32) along the last axis.
    ``order[k]``: the position within its word's run of outputs that nibble ``k`` holds
    (None: in order)."""
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    codes = (words.astype(np.int32).view(np.uint32)[..., None] >> shifts) & np.uint32(2 ** bits - 1)
    if order is not None:
        codes = codes[..., np.argsort(order)]
    return codes.reshape(*words.shape[:-1], words.shape[-1] * per_word).astype(np.int32)


def pack_words(codes: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """The inverse of ``unpack_words`` (writing test checkpoints)."""
    per_word = 32 // bits
    grouped = codes.astype(np.uint32).reshape(*codes.shape[:-1], codes.shape[-1] // per_word, per_word)
    if order is not None:
        grouped = grouped[..., list(order)]
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).view(np.int32)


def _indices(key, size: int) -> np.ndarray:
    if isinstance(key, slice):
        return np.arange(size)[key]
    raise TypeError(f"packed checkpoint tensors are sliced with slices only, got {key!r}")


class PackedIntTensor:
    """One AWQ/GPTQ linear as its ``[out, in]`` weight (``.T``: ``[in, out]``), reading ``part``."""

    def __init__(self, name: str, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
                 quant: CheckpointQuantization, g_idx: np.ndarray | None = None):
        self.name, self.quant = name, quant
        bits, method = quant.bits, quant.method
        per_word = 32 // bits
        if qweight.dtype != np.int32 or qzeros.dtype != np.int32:
            raise ValueError(f"{name}: qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
        if method == "awq":
            inp, out = qweight.shape[0], qweight.shape[1] * per_word
        else:
            inp, out = qweight.shape[0] * per_word, qweight.shape[1]
        group = quant.group_size or inp
        groups = -(-inp // group)
        expected = {"scales": (groups, out), "qzeros": (groups, out // per_word)}
        for what, array in (("scales", scales), ("qzeros", qzeros)):
            if tuple(array.shape) != expected[what]:
                raise ValueError(f"{name}: {what} has shape {tuple(array.shape)}; a {method} weight "
                                 f"of {out} outputs × {inp} inputs in groups of {group} needs "
                                 f"{expected[what]}")
        if g_idx is not None and not np.array_equal(np.asarray(g_idx), np.arange(inp) // group):
            raise ValueError(f"{name}: g_idx puts input channels in groups out of order "
                             "(GPTQ act-order / desc_act); such checkpoints are not supported")
        self._q, self._z, self._s = qweight, qzeros, scales
        self._group, self._out, self._in = group, out, inp
        self.part, self._transposed = "dense", False

    @property
    def shape(self) -> tuple[int, int]:
        return (self._in, self._out) if self._transposed else (self._out, self._in)

    def _view(self, **changes) -> "PackedIntTensor":
        view = PackedIntTensor.__new__(PackedIntTensor)
        view.__dict__.update(self.__dict__, **changes)
        return view

    @property
    def T(self) -> "PackedIntTensor":
        return self._view(_transposed=not self._transposed)

    def view(self, part: str) -> "PackedIntTensor":
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        return self._view(part=part)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (2 - len(key))
        if self._transposed:
            key = key[::-1]
        outs, ins = _indices(key[0], self._out), _indices(key[1], self._in)
        block = self._block(outs, ins)  # [len(outs), len(ins)] float32
        return block.T if self._transposed else block

    def _block(self, outs: np.ndarray, ins: np.ndarray) -> np.ndarray:
        if outs.size == 0 or ins.size == 0:
            return np.zeros((outs.size, ins.size), np.float32)
        if self.part == "codes":
            return self._codes(outs, ins).astype(np.float32)
        groups = ins // self._group
        if self.part == "scales":
            return self._scales(outs, groups)
        if self.part == "zeros":
            return self._zeros(outs, groups).astype(np.float32)
        zeros = self._zeros(outs, groups)
        return (self._codes(outs, ins) - zeros).astype(np.float32) * self._scales(outs, groups)

    def _codes(self, outs, ins) -> np.ndarray:
        bits = self.quant.bits
        per_word = 32 // bits
        if self.quant.method == "awq":  # [in, out / 8], packed along out
            w0, w1 = outs.min() // per_word, outs.max() // per_word + 1
            words = np.asarray(self._q[ins.min(): ins.max() + 1, w0:w1])
            codes = unpack_words(words, bits, AWQ_ORDER)        # [in range, out range]
            return codes[np.ix_(ins - ins.min(), outs - w0 * per_word)].T
        w0, w1 = ins.min() // per_word, ins.max() // per_word + 1  # [in / p, out], packed along in
        words = np.asarray(self._q[w0:w1, outs.min(): outs.max() + 1])
        codes = unpack_words(words.T, bits)                       # [out range, in range]
        return codes[np.ix_(outs - outs.min(), ins - w0 * per_word)]

    def _zeros(self, outs, groups) -> np.ndarray:
        bits = self.quant.bits
        per_word = 32 // bits
        w0, w1 = outs.min() // per_word, outs.max() // per_word + 1
        words = np.asarray(self._z[groups.min(): groups.max() + 1, w0:w1])
        order = AWQ_ORDER if self.quant.method == "awq" else None
        zeros = unpack_words(words, bits, order) + self.quant.zero_offset  # [groups, out range]
        return zeros[np.ix_(groups - groups.min(), outs - w0 * per_word)].T

    def _scales(self, outs, groups) -> np.ndarray:
        scales = np.asarray(self._s[groups.min(): groups.max() + 1, outs.min(): outs.max() + 1],
                            np.float32)
        return scales[np.ix_(groups - groups.min(), outs - outs.min())].T
