"""HF safetensors checkpoints → sharded device arrays, each device reading only its slice.

The reader memory-maps each file (numpy has no bfloat16, so ``safetensors``' own
numpy reader cannot open bf16 checkpoints; ``ml_dtypes`` can view the bytes),
and each device's callback copies just the rows/columns its shard needs. A 72B
checkpoint is therefore never materialized whole in host RAM: the largest host
buffer is one parameter's local shards.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from qwenjax.config import ModelConfig
from qwenjax.int_checkpoints import PackedIntTensor
from qwenjax.model import (Layout, LayerWeights, ParamSpec, Weights, dense_param_specs, pack_int,
                           store, stored_spec)
from qwenjax.parallel import DEFAULT_RULES, ShardingRules
from qwenjax.quantization import (CheckpointQuantization, Fp8CheckpointTensor, IntWeight,
                                  checkpoint_quantization, effective_scheme)

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn,
}
# Where FP8 checkpoints keep a weight's scale: ``<weight>_scale`` multiplies (compressed-tensors,
# vLLM's fp8), ``<weight>_scale_inv`` is named for the inverse but multiplies too (block fp8).
_SCALE_SUFFIXES = ("_scale", "_scale_inv")

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def resolve_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


class Checkpoint:
    """Lazy, memory-mapped view of an HF checkpoint directory (one file or an index).

    In an FP8 checkpoint (``quantization_config`` in config.json) a weight with a scale
    tensor reads as its dequantized float32 values (``Fp8CheckpointTensor``), slice by slice.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.quantization: CheckpointQuantization | None = checkpoint_quantization(self.directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.directory}")
        self._tensors: dict[str, tuple[Path, str, tuple[int, ...], int]] = {}
        for name in files:
            self._read_header(self.directory / name)
        self._maps: dict[Path, np.memmap] = {}

    def _read_header(self, path: Path) -> None:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        base = 8 + header_len
        for tensor, info in header.items():
            if tensor == "__metadata__":
                continue
            start, _ = info["data_offsets"]
            self._tensors[tensor] = (path, info["dtype"], tuple(info["shape"]), base + start)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or self._packed_base(name) is not None

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._tensors and self._packed_base(name) is not None:
            return self.packed(name).shape
        return self._tensor_info(name)[2]

    def _packed_base(self, name: str) -> str | None:
        """``<linear>`` when ``name`` is ``<linear>.weight`` stored AWQ/GPTQ-packed."""
        base = name.removesuffix(".weight")
        return base if base != name and base + ".qweight" in self._tensors else None

    def packed(self, name: str) -> PackedIntTensor:
        """The AWQ/GPTQ linear whose dense weight is ``name`` (``<linear>.weight``)."""
        base = self._packed_base(name)
        if base is None:
            raise KeyError(f"checkpoint {self.directory} has no "
                           f"{name.removesuffix('.weight')}.qweight (an AWQ/GPTQ-packed {name})")
        if self.quantization is None or self.quantization.bits is None:
            raise ValueError(f"checkpoint {self.directory}: {base}.qweight is packed, but config.json "
                             "has no AWQ/GPTQ quantization_config")
        g_idx = self._raw(base + ".g_idx") if base + ".g_idx" in self._tensors else None
        return PackedIntTensor(base, self._raw(base + ".qweight"), self._raw(base + ".qzeros"),
                               self._raw(base + ".scales"), self.quantization, g_idx)

    def _tensor_info(self, name: str):
        if name not in self._tensors:
            raise KeyError(f"checkpoint {self.directory} has no tensor {name!r}")
        return self._tensors[name]

    def tensor(self, name: str) -> np.ndarray | Fp8CheckpointTensor | PackedIntTensor:
        """A zero-copy view; slicing it and copying reads only those bytes from disk. An fp8
        weight with a scale, or an AWQ/GPTQ-packed one, is a view that dequantizes the slices
        read from it."""
        if name not in self._tensors and self._packed_base(name) is not None:
            return self.packed(name)
        raw = self._raw(name)
        if raw.dtype == ml_dtypes.float8_e4m3fn:
            scale = next((name + s for s in _SCALE_SUFFIXES if name + s in self._tensors), None)
            if scale is None:
                raise ValueError(f"checkpoint {self.directory}: fp8 tensor {name!r} has no "
                                 f"{name}_scale or {name}_scale_inv")
            if raw.ndim != 2:
                raise ValueError(f"checkpoint {self.directory}: fp8 tensor {name!r} has shape "
                                 f"{raw.shape}; only [out, in] weights can be fp8")
            block = self.quantization.block if self.quantization else None
            return Fp8CheckpointTensor(raw, self._raw(scale), block)
        return raw

    def _raw(self, name: str) -> np.ndarray:
        path, dtype, shape, offset = self._tensor_info(name)
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        np_dtype = np.dtype(_ST_DTYPES[dtype])
        count = int(np.prod(shape, dtype=np.int64))
        raw = self._maps[path][offset: offset + count * np_dtype.itemsize]
        return raw.view(np_dtype).reshape(shape)

    def close(self) -> None:
        self._maps.clear()


def open_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """The directory's safetensors, or the GGUF files a ``qwenjax.gguf_model`` directory names."""
    if (Path(directory) / "gguf.json").is_file():
        from qwenjax.gguf_model import GgufCheckpoint

        return GgufCheckpoint(directory)
    return Checkpoint(directory)


# ---- per-parameter slice readers ----------------------------------------------------------
# Each reader takes the device's index into the *target* array (a tuple of slices) and
# returns that block as float32 numpy, reading only the rows/columns it needs.

def _range(s: slice, size: int) -> range:
    return range(*s.indices(size))


def _row_block(src: np.ndarray, rows: slice, cols: slice, padded_rows: int) -> np.ndarray:
    """``src[rows, cols]`` as float32, where ``rows`` indexes a zero-padded copy of ``src``."""
    row_range = _range(rows, padded_rows)
    block = np.zeros((len(row_range), len(_range(cols, src.shape[1]))), np.float32)
    # Rows are ascending, so the ones that exist in src are a prefix of the block.
    valid = [r for r in row_range if r < src.shape[0]]
    if valid:
        block[: len(valid)] = src[valid[0]: valid[-1] + 1, cols]
    return block


def _vector(ckpt, name):
    return lambda index: np.asarray(ckpt.tensor(name)[index[0]], np.float32)


def _layer_readers(ckpt: Checkpoint, layout: Layout, i: int) -> dict[str, Callable]:
    c, plan = layout.config, layout.heads
    d = c.head_dim
    p = f"model.layers.{i}."

    def head_rows(kv_head: int, slot: int) -> tuple[str, int | None]:
        """Which checkpoint projection and head fill (kv_head, slot) of the fused qkv."""
        if slot < plan.q_per_kv:
            return "q_proj", plan.q_source(kv_head, slot)
        return ("k_proj" if slot == plan.q_per_kv else "v_proj"), plan.kv_source(kv_head)

    def qkv(index):
        se, sg, sj, sd = index
        src_e = _range(se, c.hidden_size)
        gs, js, ds = _range(sg, plan.kv_heads), _range(sj, plan.q_per_kv + 2), _range(sd, d)
        out = np.zeros((len(src_e), len(gs), len(js), len(ds)), np.float32)
        for a, g in enumerate(gs):
            for b, j in enumerate(js):
                proj, head = head_rows(g, j)
                if head is None:
                    continue  # padded q head: zeros
                w = ckpt.tensor(p + f"self_attn.{proj}.weight")
                rows = w[head * d + ds.start: head * d + ds.stop: ds.step or 1, se]
                out[:, a, b, :] = np.asarray(rows, np.float32).T
        return out

    def qkv_bias(index):
        sg, sj, sd = index
        gs, js, ds = _range(sg, plan.kv_heads), _range(sj, plan.q_per_kv + 2), _range(sd, d)
        out = np.zeros((len(gs), len(js), len(ds)), np.float32)
        for a, g in enumerate(gs):
            for b, j in enumerate(js):
                proj, head = head_rows(g, j)
                if head is None:
                    continue
                bias = ckpt.tensor(p + f"self_attn.{proj}.bias")
                out[a, b] = bias[head * d + ds.start: head * d + ds.stop: ds.step or 1]
        return out

    def o(index):
        sg, sj, sd, se = index
        gs, js, ds = _range(sg, plan.kv_heads), _range(sj, plan.q_per_kv), _range(sd, d)
        w = ckpt.tensor(p + "self_attn.o_proj.weight")  # [embed, heads * d]
        out = np.zeros((len(gs), len(js), len(ds), len(_range(se, c.hidden_size))), np.float32)
        for a, g in enumerate(gs):
            for b, j in enumerate(js):
                head = plan.q_source(g, j)
                if head is None:
                    continue  # zero rows: padded heads contribute nothing
                cols = w[se, head * d + ds.start: head * d + ds.stop: ds.step or 1]
                out[a, b] = np.asarray(cols, np.float32).T
        return out

    def gate_up(index):
        se, st, sm = index
        # HF gate/up are [intermediate, embed]; the target is [embed, 2, mlp].
        parts = [_row_block(ckpt.tensor(p + f"mlp.{name}.weight"), sm, se, layout.mlp).T
                 for name in ("gate_proj", "up_proj")[st]]
        return np.stack(parts, axis=1)

    def down(index):
        sm, se = index
        # HF down is [embed, intermediate]; the target is [mlp, embed].
        return _row_block(ckpt.tensor(p + "mlp.down_proj.weight").T, sm, se, layout.mlp)

    return dict(
        attn_norm=_vector(ckpt, p + "input_layernorm.weight"),
        qkv=qkv, qkv_bias=qkv_bias, o=o,
        mlp_norm=_vector(ckpt, p + "post_attention_layernorm.weight"),
        gate_up=gate_up, down=down,
    )


def _staged_readers(ckpt: Checkpoint, layout: Layout, slot: int) -> LayerWeights:
    """Readers for layer slot ``slot`` of every stage (leading ``stage`` index): each device
    reads only its own stage's layer; padding slots are zeros (identity layers)."""
    specs = dense_param_specs(layout).layers[slot]
    per_stage = [None if (i := layout.layer_index(s, slot)) is None else _layer_readers(ckpt, layout, i)
                 for s in range(layout.pp)]

    def reader(name):
        shape = getattr(specs, name).shape[1:]

        def read(index):
            blocks = []
            for s in _range(index[0], layout.pp):
                if per_stage[s] is None:
                    blocks.append(np.zeros([len(_range(i, n)) for i, n in zip(index[1:], shape)],
                                           np.float32))
                else:
                    blocks.append(per_stage[s][name](index[1:]))
            return np.stack(blocks)
        return read

    return LayerWeights(**{f.name: reader(f.name) for f in dataclasses.fields(LayerWeights)})


def _readers(ckpt: Checkpoint, layout: Layout) -> Weights:
    c = layout.config

    def embed(index):
        sv, se = index
        return _row_block(ckpt.tensor("model.embed_tokens.weight"), sv, se, layout.vocab)

    def lm_head(index):
        se, sv = index
        return _row_block(ckpt.tensor("lm_head.weight"), sv, se, layout.vocab).T

    if layout.pp == 1:
        layers = [LayerWeights(**_layer_readers(ckpt, layout, i)) for i in range(c.num_layers)]
    else:
        layers = [_staged_readers(ckpt, layout, slot) for slot in range(layout.layers_per_stage)]
    return Weights(
        embed=embed,
        layers=layers,
        final_norm=_vector(ckpt, "model.norm.weight"),
        lm_head=None if c.tie_word_embeddings else lm_head,
    )


def checkpoint_layout(config: ModelConfig, directory: str | os.PathLike, tp: int, pp: int = 1,
                      quantization: str | None = None) -> Layout:
    """The layout an HF checkpoint directory loads into: a quantized checkpoint stays
    quantized unless ``quantization`` says otherwise (as in vLLM), and an AWQ/GPTQ one keeps
    its group size so its codes load as they are."""
    stored = checkpoint_quantization(directory)
    scheme = effective_scheme(quantization, stored)
    if stored is not None and stored.bits is not None and scheme == stored.scheme:
        return Layout.create(config, tp, pp, scheme, group_size=stored.group_size)
    return Layout.create(config, tp, pp, scheme)


def load_checkpoint(directory: str | os.PathLike, layout: Layout, mesh: Mesh, dtype=jnp.bfloat16,
                    rules: ShardingRules = DEFAULT_RULES) -> Weights:
    """Load an HF Qwen2 checkpoint into ``layout``'s sharded arrays of ``dtype``.

    A quantized layout loads each projection in float32 (exact for bf16 and dequantized fp8
    sources), quantizes it on device and drops it before the next: the peak is the stored
    model plus one float32 parameter."""
    ckpt = open_checkpoint(directory)
    c = layout.config
    if not c.tie_word_embeddings and "lm_head.weight" not in ckpt:
        raise ValueError(f"{directory}: config says untied embeddings but there is no lm_head.weight")
    embed_shape = ckpt.shape("model.embed_tokens.weight")
    if embed_shape != (c.vocab_size, c.hidden_size):
        raise ValueError(f"{directory}: embed_tokens is {embed_shape}, config expects "
                         f"{(c.vocab_size, c.hidden_size)}")
    try:
        specs = dense_param_specs(layout)
        spec_leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
        reader_leaves = treedef.flatten_up_to(_readers(ckpt, layout))
        packed = loads_packed(ckpt.quantization, layout)
        part_readers = {part: treedef.flatten_up_to(_readers(_PartView(ckpt, part), layout))
                        for part in _PACKED_PARTS} if packed else {}
        arrays = []
        for i, (spec, read) in enumerate(zip(spec_leaves, reader_leaves)):
            sharding = rules.sharding(mesh, spec.axes)
            stored = stored_spec(spec, layout)
            if packed and isinstance(stored, IntWeight):
                parts = [jax.make_array_from_callback(
                    spec.shape, sharding,
                    lambda index, read=part_readers[part][i], t=t: read(index).astype(t))
                    for part, t in _PACKED_PARTS.items()]
                arrays.append(pack_int(*parts, spec, layout, mesh, rules))
                del parts
                continue
            np_dtype = np.dtype(np.float32 if not isinstance(stored, ParamSpec) else dtype)
            dense = jax.make_array_from_callback(
                spec.shape, sharding, lambda index, read=read, t=np_dtype: read(index).astype(t))
            arrays.append(store(dense, spec, layout, mesh, rules))
            del dense
        return jax.tree.unflatten(treedef, arrays)
    finally:
        ckpt.close()


# An AWQ/GPTQ projection loads as three dense-shaped reads of its codes, scales and zero
# points (small integers travel as uint8), which pack_int reduces to the stored groups.
_PACKED_PARTS = {"codes": np.uint8, "scales": np.float32, "zeros": np.uint8}


def loads_packed(stored: CheckpointQuantization | None, layout: Layout) -> bool:
    """Whether ``layout`` takes an AWQ/GPTQ checkpoint's codes as they are (same bits and
    groups) rather than dequantizing it and quantizing again."""
    return (stored is not None and stored.bits is not None and stored.scheme == layout.quantization
            and stored.group_size == layout.group_size)


class _PartView:
    """A checkpoint whose packed linears read as one part (codes, scales or zeros)."""

    def __init__(self, ckpt: Checkpoint, part: str):
        self._ckpt, self._part = ckpt, part

    def tensor(self, name: str):
        return self._ckpt.packed(name).view(self._part)
