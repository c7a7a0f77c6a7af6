"""The Qwen2 decoder as free functions over a pytree of weights.

Each parameter is declared once (``param_specs``): shape, logical axes and
initializer. Random init, abstract shapes, shardings and the checkpoint loader
all derive from that declaration.

Layout choices (all for one device's view to be whole GQA groups):
- q, k and v are one fused projection grouped by KV head:
  ``qkv [embed, kv_heads, q_per_kv + 2, head_dim]`` — slot ``q_per_kv`` is K,
  ``q_per_kv + 1`` is V. One GEMM per layer reads the weights once, and sharding
  ``kv_heads`` over ``tp`` keeps each group's q, k, v on one device.
- gate and up are fused as ``gate_up [embed, 2, mlp]`` for the same reason.
- The layer loop is a Python loop (unrolled in the program): a ``lax.scan`` over
  stacked weights copies each layer's slice on GPU (measured 3× slower decode
  on H100, DESIGN.md).
- Pipeline parallelism (``pp > 1``): layer slot ``j`` of every stage is one array
  with a leading ``stage`` axis of size ``pp`` sharded over the ``pp`` mesh axis,
  so stage ``s``'s layers live only on its devices (``Layout.layer_index`` maps a
  slot to the checkpoint layer). The step runs the stages inside one
  ``shard_map`` manual over ``pp`` (``_pipeline``); the layer code is the same.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from qwenjax import attention
from qwenjax.config import ModelConfig
from qwenjax.kv_cache import KVCache, write_kv
from qwenjax.lora import lora_delta, qkv_slot_projection
from qwenjax.parallel import (DEFAULT_RULES, HeadPlan, LogicalAxes, ShardingRules, padded_size,
                              split_layers)
from qwenjax.quantization import (DEFAULT_GROUP_SIZE, FP8_DTYPE, INT_BITS, INT_DTYPES, Fp8Weight,
                                  IntWeight, check_scheme, int_bits, quantize_fp8, quantize_int)
from qwenjax.rope import apply_rope, rope_tables


# ---- declarations -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: LogicalAxes
    init: str = "normal"  # "normal" | "ones" | "zeros"
    # Positions of the axes a projection contracts (its inputs); empty for weights that are
    # not quantizable projections (norms, biases, embedding, lm_head).
    contract: tuple[int, ...] = ()
    dtype: object = None  # None: the model dtype; fixed otherwise (fp8 values, fp32 scales)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerWeights:
    # With pp > 1 every field has a leading [pp] stage axis (one layer of each stage).
    # Quantized, qkv, o, gate_up and down are Fp8Weight (values + scales) or IntWeight.
    attn_norm: jax.Array  # [embed]
    qkv: jax.Array        # [embed, kv_heads, q_per_kv + 2, head_dim]
    qkv_bias: jax.Array   # [kv_heads, q_per_kv + 2, head_dim]
    o: jax.Array          # [kv_heads, q_per_kv, head_dim, embed]
    mlp_norm: jax.Array   # [embed]
    gate_up: jax.Array    # [embed, 2, mlp]
    down: jax.Array       # [mlp, embed]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Weights:
    embed: jax.Array               # [vocab, embed]
    layers: list[LayerWeights]     # num_layers of them; with pp > 1, layers_per_stage slots
    final_norm: jax.Array          # [embed]
    lm_head: jax.Array | None      # [embed, vocab]; None when tied to `embed`
    lora: list | None = None       # per layer lora.LayerLoRA (all adapter slots); None: no LoRA


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shapes of the model as laid out for a tensor- and pipeline-parallel degree."""

    config: ModelConfig
    heads: HeadPlan
    mlp: int    # intermediate size, zero-padded to a multiple of tp
    vocab: int  # vocab size, zero-padded to a multiple of tp
    pp: int = 1  # pipeline stages
    # None: projections in the model dtype; "fp8", "int4" or "int8" (quantization.py).
    quantization: str | None = None
    # Integer schemes: input channels per scale and zero point (None: the whole input).
    group_size: int | None = DEFAULT_GROUP_SIZE

    @classmethod
    def create(cls, config: ModelConfig, tp: int = 1, pp: int = 1,
               quantization: str | None = None,
               group_size: int | None = DEFAULT_GROUP_SIZE) -> "Layout":
        split_layers(config.num_layers, pp)  # validates pp against the layer count
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        return cls(config=config, heads=HeadPlan.create(config, tp),
                   mlp=padded_size(config.intermediate_size, tp),
                   vocab=padded_size(config.vocab_size, tp), pp=pp,
                   quantization=check_scheme(quantization), group_size=group_size)

    @property
    def stage_layers(self) -> tuple[int, ...]:
        """Real (checkpoint) layers of each stage: as even as possible, earlier stages first."""
        return split_layers(self.config.num_layers, self.pp)

    @property
    def layers_per_stage(self) -> int:
        """Layer slots on every device (pp = 1: all layers). A stage with fewer real layers
        fills its last slots with zero layers, which are exact identities (zero o and down
        projections add nothing to the residual) — memory of the fullest stage everywhere, and
        no time lost: stages run in lockstep, so the step waits for the fullest stage anyway."""
        return self.stage_layers[0]

    def layer_index(self, stage: int, slot: int) -> int | None:
        """Checkpoint layer held in ``slot`` of ``stage``; None for a padding (identity) slot."""
        counts = self.stage_layers
        if slot >= counts[stage]:
            return None
        return sum(counts[:stage]) + slot


def param_specs(layout: Layout) -> Weights:
    """The weights as stored: ``dense_param_specs`` with each projection an ``Fp8Weight`` of
    value and scale specs when the layout is quantized."""
    dense = dense_param_specs(layout)
    return jax.tree.map(lambda s: stored_spec(s, layout), dense, is_leaf=_is_spec)


def stored_spec(spec: ParamSpec, layout: Layout) -> ParamSpec | Fp8Weight | IntWeight:
    """How one declared parameter is stored under ``layout.quantization``: projections become
    fp8 values of the same shape and axes plus fp32 scales over their output axes, or integer
    codes plus a scale and zero point per group along their last contracted axis."""
    if layout.quantization is None or not spec.contract:
        return spec
    if layout.quantization == "fp8":
        out = [i for i in range(len(spec.shape)) if i not in spec.contract]
        return Fp8Weight(
            value=dataclasses.replace(spec, dtype=FP8_DTYPE),
            scale=ParamSpec(tuple(spec.shape[i] for i in out), tuple(spec.axes[i] for i in out),
                            "ones", dtype=jnp.float32),
            contract=spec.contract)
    axis = spec.contract[-1]
    group = int_group(spec, layout)
    grouped = spec.shape[:axis] + (spec.shape[axis] // group,) + spec.shape[axis + 1:]
    codes = INT_DTYPES[INT_BITS[layout.quantization]]
    return IntWeight(value=dataclasses.replace(spec, dtype=codes),
                     scale=ParamSpec(grouped, spec.axes, "ones", dtype=jnp.float32),
                     zero=ParamSpec(grouped, spec.axes, "zeros", dtype=codes),
                     axis=axis, group=group)


def int_group(spec: ParamSpec, layout: Layout) -> int:
    """Entries of the grouped axis (``spec``'s last contracted one) that share a scale as
    stored: the checkpoint's group size, or its largest divisor that also divides each
    device's shard of the axis. Smaller stored groups repeat a checkpoint group's scale, so
    the weights are the same; o_proj's groups run along head_dim (a group spanning heads
    repeats per head), and an MLP shard whose length the group does not divide (72B's 29568
    at tp=4: 7392 per device) gets groups of gcd(128, 7392) = 32."""
    axis = spec.contract[-1]
    length = spec.shape[axis]
    if DEFAULT_RULES.spec((spec.axes[axis],))[0] == "tp":  # a tp-sharded axis: per device
        length //= layout.heads.tp
    return math.gcd(layout.group_size or spec.shape[axis], length)


def dense_param_specs(layout: Layout) -> Weights:
    """The declaration every other view of the weights derives from (in the model dtype)."""
    c, h = layout.config, layout.heads
    e, d = c.hidden_size, c.head_dim
    slots = h.q_per_kv + 2

    def layer() -> LayerWeights:
        return LayerWeights(
            attn_norm=ParamSpec((e,), ("embed",), "ones"),
            qkv=ParamSpec((e, h.kv_heads, slots, d), ("embed", "kv_heads", None, "head_dim"),
                          contract=(0,)),
            qkv_bias=ParamSpec((h.kv_heads, slots, d), ("kv_heads", None, "head_dim"), "zeros"),
            o=ParamSpec((h.kv_heads, h.q_per_kv, d, e), ("kv_heads", None, "head_dim", "embed"),
                        contract=(0, 1, 2)),
            mlp_norm=ParamSpec((e,), ("embed",), "ones"),
            gate_up=ParamSpec((e, 2, layout.mlp), ("embed", None, "mlp"), contract=(0,)),
            down=ParamSpec((layout.mlp, e), ("mlp", "embed"), contract=(0,)),
        )

    def staged() -> LayerWeights:
        return jax.tree.map(lambda s: ParamSpec((layout.pp, *s.shape), ("stage", *s.axes), s.init,
                                                tuple(i + 1 for i in s.contract)),
                            layer(), is_leaf=_is_spec)

    # Embedding, final norm and lm_head are replicated over pp (every stage holds them):
    # the lookup and the logits then need no pipeline collective of their own.
    return Weights(
        embed=ParamSpec((layout.vocab, e), ("vocab", "embed")),
        layers=([layer() for _ in range(c.num_layers)] if layout.pp == 1
                else [staged() for _ in range(layout.layers_per_stage)]),
        final_norm=ParamSpec((e,), ("embed",), "ones"),
        lm_head=None if c.tie_word_embeddings else ParamSpec((e, layout.vocab), ("embed", "vocab")),
    )


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def weight_shardings(layout: Layout, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Weights:
    return jax.tree.map(lambda s: rules.sharding(mesh, s.axes), param_specs(layout), is_leaf=_is_spec)


def abstract_weights(layout: Layout, mesh: Mesh, dtype=jnp.bfloat16,
                     rules: ShardingRules = DEFAULT_RULES) -> Weights:
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype or dtype, sharding=rules.sharding(mesh, s.axes)),
        param_specs(layout), is_leaf=_is_spec)


def store(dense: jax.Array, spec: ParamSpec, layout: Layout, mesh: Mesh,
          rules: ShardingRules = DEFAULT_RULES) -> jax.Array | Fp8Weight | IntWeight:
    """One loaded parameter (``dense``, declared by ``spec``) as the layout stores it: itself,
    or quantized on device into its value and scale shardings. Row-parallel projections (o,
    down) contract a sharded axis, so a channel's scale takes the max over all its shards
    (XLA's all-reduce), the same scale a tp=1 load computes."""
    stored = stored_spec(spec, layout)
    if isinstance(stored, ParamSpec):
        return dense
    shardings, treedef = jax.tree.flatten(_stored_shardings(stored, mesh, rules))
    return _quantizer(_form(stored), tuple(shardings), treedef)(dense)


def pack_int(codes: jax.Array, scales: jax.Array, zeros: jax.Array, spec: ParamSpec,
             layout: Layout, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> IntWeight:
    """A checkpoint's integer projection, read as three arrays of ``spec``'s shape (codes, and
    each entry's scale and zero point), in the stored form: one scale and zero per group."""
    stored = stored_spec(spec, layout)
    shardings, treedef = jax.tree.flatten(_stored_shardings(stored, mesh, rules))
    return _packer(_form(stored), tuple(shardings), treedef)(codes, scales, zeros)


@functools.lru_cache(maxsize=64)
def _packer(form: tuple, shardings: tuple, treedef):
    _, axis, group, bits = form

    def pack(codes, scales, zeros):
        def first_of_group(x):
            shape = x.shape
            grouped = x.reshape(shape[:axis] + (shape[axis] // group, group) + shape[axis + 1:])
            return jnp.take(grouped, 0, axis=axis + 1)

        dtype = INT_DTYPES[bits]
        return IntWeight(value=codes.astype(dtype), scale=first_of_group(scales),
                         zero=first_of_group(zeros).astype(dtype), axis=axis, group=group)

    return jax.jit(pack, out_shardings=jax.tree.unflatten(treedef, shardings))


def _stored_shardings(stored, mesh: Mesh, rules: ShardingRules):
    return jax.tree.map(lambda s: rules.sharding(mesh, s.axes), stored, is_leaf=_is_spec)


def _form(stored: Fp8Weight | IntWeight) -> tuple:
    """The static facts of a quantized form (hashable): what ``_quantize`` needs."""
    if isinstance(stored, Fp8Weight):
        return ("fp8", stored.contract)
    return ("int", stored.axis, stored.group, int_bits(stored.value.dtype))


def _quantize(value: jax.Array, form: tuple) -> Fp8Weight | IntWeight:
    if form[0] == "fp8":
        return quantize_fp8(value, form[1])
    return quantize_int(value, *form[1:])


def quantize_weights(weights: Weights, layout: Layout, mesh: Mesh,
                     rules: ShardingRules = DEFAULT_RULES) -> Weights:
    """Dense ``weights`` (as a dense layout stores them) → ``layout``'s stored form, one
    parameter at a time (each dense projection is dropped once quantized)."""
    specs, treedef = jax.tree.flatten(dense_param_specs(layout), is_leaf=_is_spec)
    dense = treedef.flatten_up_to(weights)
    del weights
    out = []
    for i, spec in enumerate(specs):
        out.append(store(dense[i], spec, layout, mesh, rules))
        dense[i] = None
    return jax.tree.unflatten(treedef, out)


@functools.lru_cache(maxsize=64)
def _quantizer(form: tuple, shardings: tuple, treedef):
    # One compiled program per parameter kind, reused by every layer.
    return jax.jit(functools.partial(_quantize, form=form),
                   out_shardings=jax.tree.unflatten(treedef, shardings))


def random_weights(layout: Layout, mesh: Mesh, dtype=jnp.bfloat16, seed: int = 0,
                   rules: ShardingRules = DEFAULT_RULES) -> Weights:
    """Random weights created directly in their shardings (presets, benchmarks).

    Padded q heads, MLP columns and vocab rows get random values too; that is
    fine for timing but such weights are not a published model.
    """
    leaves, treedef = jax.tree.flatten(dense_param_specs(layout), is_leaf=_is_spec)
    # Stored shardings per declared parameter (an Fp8Weight of two for a quantized projection).
    stored = [stored_spec(spec, layout) for spec in leaves]
    shardings = [_stored_shardings(s, mesh, rules) for s in stored]
    fields_per_layer = len(dataclasses.fields(LayerWeights))

    def init():
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        out, staged = [], 0
        for key, spec, kept in zip(keys, leaves, stored):
            shape, axes = spec.shape, spec.axes
            if axes[0] == "stage":
                shape, axes = shape[1:], axes[1:]
            if spec.init == "ones":
                value = jnp.ones(spec.shape, dtype)
            elif spec.init == "zeros":
                value = jnp.zeros(spec.shape, dtype)
            else:
                fan_in = shape[0] if axes[0] != "kv_heads" else shape[0] * shape[1] * shape[2]
                std = 0.02 if axes[0] == "vocab" else fan_in ** -0.5
                value = (jax.random.normal(key, spec.shape, jnp.float32) * std).astype(dtype)
            if spec.axes[0] == "stage":  # zero the padding slots: exact identity layers
                slot, staged = staged // fields_per_layer, staged + 1
                real = [layout.layer_index(s, slot) is not None for s in range(layout.pp)]
                value = value * jnp.asarray(real, dtype).reshape((-1,) + (1,) * len(shape))
            if not isinstance(kept, ParamSpec):
                value = _quantize(value, _form(kept))
            out.append(value)
        return out

    arrays = jax.jit(init, out_shardings=shardings)()
    return jax.tree.unflatten(treedef, arrays)


# ---- the forward pass -----------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepBatch:
    """One step's tokens: ``batch`` sequences, each a chunk of ``chunk`` tokens (padded).

    A padding token has position -1: it writes no KV and its output is garbage.
    """

    tokens: jax.Array        # [batch, chunk] int32
    positions: jax.Array     # [batch, chunk] int32, -1 = padding
    seq_lens: jax.Array      # [batch] int32, cached tokens after this step's writes
    block_tables: jax.Array  # [batch, pages_per_seq] int32 page ids
    lora_ids: jax.Array | None = None  # [batch] int32 LoRA slot of each row (0: none)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedChunks:
    """Prefill chunks of several sequences packed back to back on one token axis.

    The projections and MLP see only real tokens (plus padding up to a bucket of
    T); attention alone works on a row view, one row per sequence, that
    ``row_tokens`` gathers and ``token_rows``/``token_cols`` scatter back.
    """

    tokens: jax.Array            # [T] int32
    positions: jax.Array         # [T] int32, -1 = padding
    token_rows: jax.Array        # [T] int32, the row each token belongs to (padding: 0)
    token_cols: jax.Array        # [T] int32, its column in that row (padding: 0)
    row_tokens: jax.Array        # [rows, chunk] int32, index into T; T = empty slot
    row_positions: jax.Array     # [rows, chunk] int32, -1 = empty slot
    seq_lens: jax.Array          # [rows] int32, cached tokens after this step (0 = empty row)
    block_tables: jax.Array      # [rows, pages_per_seq] int32
    last_token: jax.Array        # [rows] int32, index into T of each row's last token
    lora_ids: jax.Array | None = None  # [T] int32 LoRA slot of each token (0: none)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def _project(x: jax.Array, w: jax.Array | Fp8Weight | IntWeight, dot: Callable) -> jax.Array:
    """``dot(x, w)`` accumulated in fp32 (exact enough for parity, and CPU bf16 dots are only
    fast this way), in ``x``'s dtype. An fp8 weight's scale is constant along the contraction:
    scaling the fp32 output equals multiplying by the dequantized weight, which is never
    materialized. An integer weight's scales vary along it, so it is dequantized here (on GPU
    XLA can fuse the conversion into the dot's operand; whether it does is measured by
    bench_decode)."""
    if isinstance(w, Fp8Weight):
        return (dot(x, w.value.astype(x.dtype)) * w.scale).astype(x.dtype)
    if isinstance(w, IntWeight):
        w = w.dequantize(x.dtype)
    return dot(x, w).astype(x.dtype)


def _matmul(eq: str, x: jax.Array, w: jax.Array | Fp8Weight | IntWeight) -> jax.Array:
    return _project(x, w, lambda a, b: jnp.einsum(eq, a, b, preferred_element_type=jnp.float32))


def _out_projection(attn: jax.Array, o: jax.Array | Fp8Weight | IntWeight) -> jax.Array:
    """``[t, g, j, d] × [g, j, d, e] → [t, e]``, contracting (g, j, d) in the weight's storage
    order. ``jnp.einsum`` lists them as (d, g, j), and XLA:CPU then transposed the whole O
    weight into that order on every step (a copy per layer in the compiled step)."""
    dims = (((1, 2, 3), (0, 1, 2)), ((), ()))
    return _project(attn, o, lambda a, b: jax.lax.dot_general(a, b, dims,
                                                              preferred_element_type=jnp.float32))


class Model:
    """Pure functions of (weights, cache, batch) for one layout, mesh and rules.

    ``constrain`` pins activation shardings so XLA's partitioner reproduces the
    Megatron plan: the residual stream replicated over ``tp``, heads and MLP
    columns split over it.
    """

    def __init__(self, layout: Layout, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES,
                 decode_attention: Callable | None = None, overlap: bool = True):
        if layout.pp != mesh.shape.get("pp", 1):
            raise ValueError(f"layout has pp={layout.pp} but the mesh has pp={mesh.shape.get('pp', 1)}")
        self.layout = layout
        self.overlap = overlap  # pp > 1: decode rows in micro-batches (False: one, stage by stage)
        self.config = layout.config
        self.mesh = mesh
        self.rules = rules
        self.decode_attention = decode_attention
        # Every layer is the same function of its own weights and pools, so it is traced and
        # lowered once per step shape and called num_layers times. XLA inlines the calls: the
        # compiled step is the unrolled one (same ops and buffers, checked in
        # tests/test_model.py), while tracing and lowering a 28-layer 7B step take ~0.1 s
        # instead of ~1 s — most of a warm start, which loads every shape from the cache.
        self._jit_layer = jax.jit(self._layer)

    def constrain(self, x: jax.Array, axes: LogicalAxes) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.rules.sharding(self.mesh, axes))

    def hidden_states(self, weights: Weights, cache: KVCache,
                      batch: StepBatch | PackedChunks | Sequence[StepBatch | PackedChunks]
                      ) -> tuple[list[jax.Array], KVCache]:
        """Final-normed hidden states per part (``[batch, chunk, embed]`` for a StepBatch,
        ``[T, embed]`` for PackedChunks) and the updated cache.

        A step may have several parts (the engine sends decode rows ``[n, 1]`` and packed
        prefill chunks): the projections and MLP run once over all their tokens flattened,
        while RoPE, KV writes and attention run per part, so decode rows never pay for
        prefill padding.
        """
        parts = (batch,) if isinstance(batch, (StepBatch, PackedChunks)) else tuple(batch)
        c = self.config
        tokens = jnp.concatenate([p.tokens.reshape(-1) for p in parts])
        x = self.constrain(jnp.take(weights.embed, tokens, axis=0), ("batch", "embed"))
        prepared = [self._prepare(p) for p in parts]
        if self.layout.pp > 1:
            x, cache = self._pipeline(weights.layers, cache, x, prepared, parts)
        else:
            onehot = self._lora_onehot(weights, parts)
            new_k, new_v = [], []
            for i, layer in enumerate(weights.layers):
                lora = None if onehot is None else (weights.lora[i], onehot)
                with jax.named_scope(f"layer_{i}"):
                    x, k_pages, v_pages = self._jit_layer(layer, x, prepared, cache.k[i], cache.v[i],
                                                           parts, lora)
                new_k.append(k_pages)
                new_v.append(v_pages)
            cache = KVCache(k=new_k, v=new_v)
        x = rms_norm(x, weights.final_norm, c.rms_norm_eps)
        hidden, offset = [], 0
        for p in parts:
            n = p.tokens.size
            hidden.append(x[offset: offset + n].reshape(*p.tokens.shape, -1))
            offset += n
        return hidden, cache

    def _lora_onehot(self, weights: Weights, parts) -> jax.Array | None:
        """``[tokens, slots]``: each token's LoRA slot, one-hot (None without adapters)."""
        if weights.lora is None:
            return None
        slots = weights.lora[0].o_b.shape[0]
        ids = []
        for p in parts:
            if p.lora_ids is None:
                ids.append(jnp.zeros((p.tokens.size,), jnp.int32))
            elif isinstance(p, PackedChunks):
                ids.append(p.lora_ids)
            else:
                ids.append(jnp.repeat(p.lora_ids, p.tokens.shape[1]))
        return jax.nn.one_hot(jnp.concatenate(ids), slots, dtype=jnp.float32)

    def micro_batches(self, parts) -> int:
        """How many micro-batches a step's rows are split into on their way through the stages.

        Decode (one StepBatch) splits its rows into gcd(rows, pp) micro-batches — pp whenever
        the row bucket is a multiple of pp — so while stage 1 works on micro-batch 0, stage 0
        already runs micro-batch 1. Packed prefill and mixed steps go through as one micro-batch
        (stage after stage): their rows have different lengths, and a prefill chunk is long
        enough to keep each stage busy on its own."""
        if not self.overlap or len(parts) != 1 or not isinstance(parts[0], StepBatch):
            return 1
        return math.gcd(parts[0].tokens.shape[0], self.layout.pp)

    def _pipeline(self, layers: list[LayerWeights], cache: KVCache, x: jax.Array, prepared, parts):
        """The layers of all stages over the ``pp`` mesh axis, inside one ``shard_map``.

        Manual over ``pp`` only: inside, each device sees its own stage's slice of the stacked
        weights and pools, and ``tp`` stays automatic (the same constraints and Megatron
        all-reduces as without PP). Time steps t = 0 … M + pp − 2: stage s runs micro-batch
        m = t − s when 0 ≤ m < M, then ``ppermute`` hands its activations to stage s + 1.
        In a bubble (m out of range) a stage computes on stale values but writes no KV (its
        write positions are -1, which ``write_kv`` drops) and its output is never used. The last
        stage's outputs are summed over ``pp`` (zeros elsewhere) so every device ends with the
        final hidden states for the norm and logits.
        """
        from jax.sharding import PartitionSpec as P

        pp = self.layout.pp
        M = self.micro_batches(parts)
        hidden = x.shape[-1]
        # A leading micro-batch axis on everything a stage reads per micro-batch.
        split = lambda a: a.reshape(M, a.shape[0] // M, *a.shape[1:])
        x_mb = split(x)
        parts_mb = jax.tree.map(split, tuple(parts))
        prepared_mb = jax.tree.map(split, list(prepared))
        staged, replicated = P("pp"), P()

        def stage(layers, k_pools, v_pools, x_mb, parts_mb, prepared_mb):
            layers = jax.tree.map(lambda a: a[0], layers)
            first = lambda pool: jax.tree.map(lambda a: a[0], pool)  # noqa: E731 (QuantizedPages too)
            k_pools, v_pools = [first(a) for a in k_pools], [first(a) for a in v_pools]
            s = jax.lax.axis_index("pp")

            def tick(t, carry):
                received, out, k_pools, v_pools = carry
                m = t - s
                valid = (m >= 0) & (m < M)
                m = jnp.clip(m, 0, M - 1)
                pick = lambda a: jax.lax.dynamic_index_in_dim(a, m, 0, keepdims=False)
                parts_m = jax.tree.map(pick, parts_mb)
                prep_m = [dict(p, write_positions=jnp.where(valid, p["write_positions"], -1))
                          for p in jax.tree.map(pick, prepared_mb)]
                h = jnp.where(s == 0, pick(x_mb), received)
                h = self.constrain(h, ("batch", "embed"))
                k_new, v_new = [], []
                for j, layer in enumerate(layers):
                    with jax.named_scope(f"slot_{j}"):
                        h, k_pages, v_pages = self._jit_layer(layer, h, prep_m, k_pools[j], v_pools[j],
                                                              parts_m)
                    k_new.append(k_pages)
                    v_new.append(v_pages)
                done = valid & (s == pp - 1)
                out = jnp.where(done, jax.lax.dynamic_update_index_in_dim(out, h, m, 0), out)
                received = jax.lax.ppermute(h, "pp", [(i, i + 1) for i in range(pp - 1)])
                return received, out, k_new, v_new

            init = (jnp.zeros(x_mb.shape[1:], x_mb.dtype), jnp.zeros_like(x_mb), k_pools, v_pools)
            _, out, k_pools, v_pools = jax.lax.fori_loop(0, M + pp - 1, tick, init)
            out = jax.lax.psum(jnp.where(s == pp - 1, out, jnp.zeros_like(out)), "pp")
            stack = lambda pool: jax.tree.map(lambda a: a[None], pool)  # noqa: E731
            return out, [stack(a) for a in k_pools], [stack(a) for a in v_pools]

        # Under jit even when called eagerly: a shard_map manual over only some axes is refused
        # outside a traced program.
        run = jax.jit(jax.shard_map(
            stage, mesh=self.mesh, axis_names={"pp"}, check_vma=False,
            in_specs=(staged, staged, staged, replicated, replicated, replicated),
            out_specs=(replicated, staged, staged)))
        out, k, v = run(layers, cache.k, cache.v, x_mb, parts_mb, prepared_mb)
        return self.constrain(out.reshape(-1, hidden), ("batch", "embed")), KVCache(k=k, v=v)

    def _prepare(self, part):
        """Per-step, per-part values every layer reuses: RoPE tables and token-level views."""
        cos, sin = rope_tables(part.positions, self.config)
        if isinstance(part, PackedChunks):
            # Each token's K/V go to its own row's pages: a [T, 1] batch of one-token chunks.
            return dict(cos=cos[:, None, None, :], sin=sin[:, None, None, :],
                        write_positions=part.positions[:, None],
                        write_tables=jnp.take(part.block_tables, part.token_rows, axis=0))
        return dict(cos=cos[:, :, None, None, :], sin=sin[:, :, None, None, :],
                    write_positions=part.positions, write_tables=part.block_tables)

    def _layer(self, w: LayerWeights, x, prepared, k_pages, v_pages, parts, lora=None):
        """One decoder layer. ``lora``: (this layer's LayerLoRA, the tokens' one-hot slots)."""
        c, q_per_kv = self.config, self.layout.heads.q_per_kv
        with jax.named_scope("attention"):
            h = rms_norm(x, w.attn_norm, c.rms_norm_eps)
            qkv = _matmul("te,egjd->tgjd", h, w.qkv) + w.qkv_bias
            if lora is not None:
                ad, onehot = lora
                qkv = qkv + lora_delta("te,Lekr->tLkr", "tLjr,Lrgjd->tgjd", h, ad.qkv_a, ad.qkv_b,
                                       onehot, qkv_slot_projection(q_per_kv)).astype(qkv.dtype)
            qkv = self.constrain(qkv, ("batch", "kv_heads", None, "head_dim"))
            outs, offset = [], 0
            for p, prep in zip(parts, prepared):
                n = p.tokens.size
                part = qkv[offset: offset + n].reshape(*p.tokens.shape, *qkv.shape[1:])
                offset += n
                cos, sin = prep["cos"], prep["sin"]
                q = apply_rope(part[..., :q_per_kv, :], cos, sin)            # [..., g, j, d]
                k = apply_rope(part[..., q_per_kv:q_per_kv + 1, :], cos, sin)[..., 0, :]
                v = part[..., q_per_kv + 1, :]                               # [..., g, d]
                if isinstance(p, PackedChunks):
                    k_pages, v_pages = write_kv(k_pages, v_pages, k[:, None], v[:, None],
                                                prep["write_positions"], prep["write_tables"])
                    q_rows = jnp.take(q, p.row_tokens, axis=0, mode="fill", fill_value=0)
                    attn = attention.paged_attention(q_rows, k_pages, v_pages, p.row_positions,
                                                     p.seq_lens, p.block_tables)
                    attn = attn[p.token_rows, p.token_cols]                  # back to [T, g, j, d]
                else:
                    k_pages, v_pages = write_kv(k_pages, v_pages, k, v, prep["write_positions"],
                                                prep["write_tables"])
                    attn = attention.paged_attention(
                        q, k_pages, v_pages, p.positions, p.seq_lens, p.block_tables,
                        decode_kernel=self.decode_attention)
                outs.append(attn.reshape(n, *attn.shape[-3:]))
            attn = jnp.concatenate(outs) if len(outs) > 1 else outs[0]
            out = _out_projection(attn, w.o)
            if lora is not None:
                out = out + lora_delta("tgjd,Lgjdr->tLr", "tLr,Lre->te", attn, ad.o_a, ad.o_b,
                                       onehot).astype(out.dtype)
            x = self.constrain(x + out, ("batch", "embed"))
        with jax.named_scope("mlp"):
            h = rms_norm(x, w.mlp_norm, c.rms_norm_eps)
            gate_up = _matmul("te,ekm->tkm", h, w.gate_up)
            if lora is not None:
                gate_up = gate_up + lora_delta("te,Lekr->tLkr", "tLkr,Lrkm->tkm", h, ad.gate_up_a,
                                               ad.gate_up_b, onehot).astype(gate_up.dtype)
            gate_up = self.constrain(gate_up, ("batch", None, "mlp"))
            act = jax.nn.silu(gate_up[:, 0].astype(jnp.float32)) * gate_up[:, 1].astype(jnp.float32)
            out = _matmul("tm,me->te", act.astype(x.dtype), w.down)
            if lora is not None:
                out = out + lora_delta("tm,Lmr->tLr", "tLr,Lre->te", act.astype(x.dtype), ad.down_a,
                                       ad.down_b, onehot).astype(out.dtype)
            x = self.constrain(x + out, ("batch", "embed"))
        return x, k_pages, v_pages

    def logits(self, weights: Weights, hidden: jax.Array) -> jax.Array:
        """Float32 logits ``[..., vocab]`` (padding columns of a padded vocab removed)."""
        if weights.lm_head is None:
            logits = jnp.einsum("...e,ve->...v", hidden, weights.embed,
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("...e,ev->...v", hidden, weights.lm_head,
                                preferred_element_type=jnp.float32)
        return logits[..., : self.config.vocab_size]

    def forward(self, weights: Weights, cache: KVCache, batch: StepBatch
                ) -> tuple[jax.Array, KVCache]:
        """Logits for every position ``[batch, chunk, vocab]`` (tests, scoring)."""
        (hidden,), cache = self.hidden_states(weights, cache, batch)
        return self.logits(weights, hidden), cache

    def last_logits(self, weights: Weights, cache: KVCache,
                    batch: StepBatch | PackedChunks | Sequence[StepBatch | PackedChunks]
                    ) -> tuple[jax.Array, KVCache]:
        """Logits of each row's last real token ``[rows, vocab]``, rows of all parts in order."""
        hidden, cache = self.hidden_states(weights, cache, batch)
        parts = (batch,) if isinstance(batch, (StepBatch, PackedChunks)) else tuple(batch)
        return self.logits(weights, self.last_hidden(parts, hidden)), cache

    @staticmethod
    def last_hidden(parts: Sequence[StepBatch | PackedChunks], hidden: Sequence[jax.Array]
                    ) -> jax.Array:
        """The hidden state of each row's last real token ``[rows, embed]``, rows of all parts
        in order (``hidden`` as ``hidden_states`` returns it)."""
        last = []
        for p, h in zip(parts, hidden):
            if isinstance(p, PackedChunks):
                last.append(jnp.take(h, p.last_token, axis=0))
            else:
                index = jnp.argmax(p.positions, axis=1)  # positions rise along the chunk
                last.append(jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0])
        return jnp.concatenate(last) if len(last) > 1 else last[0]
