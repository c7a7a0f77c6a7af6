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
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from qwenjax import attention
from qwenjax.config import ModelConfig
from qwenjax.kv_cache import KVCache, write_kv
from qwenjax.parallel import DEFAULT_RULES, HeadPlan, LogicalAxes, ShardingRules, padded_size
from qwenjax.rope import apply_rope, rope_tables


# ---- declarations -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: LogicalAxes
    init: str = "normal"  # "normal" | "ones" | "zeros"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerWeights:
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
    layers: list[LayerWeights]
    final_norm: jax.Array          # [embed]
    lm_head: jax.Array | None      # [embed, vocab]; None when tied to `embed`


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shapes of the model as laid out for a tensor-parallel degree."""

    config: ModelConfig
    heads: HeadPlan
    mlp: int    # intermediate size, zero-padded to a multiple of tp
    vocab: int  # vocab size, zero-padded to a multiple of tp

    @classmethod
    def create(cls, config: ModelConfig, tp: int = 1) -> "Layout":
        return cls(config=config, heads=HeadPlan.create(config, tp),
                   mlp=padded_size(config.intermediate_size, tp),
                   vocab=padded_size(config.vocab_size, tp))


def param_specs(layout: Layout) -> Weights:
    """The declaration every other view of the weights derives from."""
    c, h = layout.config, layout.heads
    e, d = c.hidden_size, c.head_dim
    slots = h.q_per_kv + 2

    def layer() -> LayerWeights:
        return LayerWeights(
            attn_norm=ParamSpec((e,), ("embed",), "ones"),
            qkv=ParamSpec((e, h.kv_heads, slots, d), ("embed", "kv_heads", None, "head_dim")),
            qkv_bias=ParamSpec((h.kv_heads, slots, d), ("kv_heads", None, "head_dim"), "zeros"),
            o=ParamSpec((h.kv_heads, h.q_per_kv, d, e), ("kv_heads", None, "head_dim", "embed")),
            mlp_norm=ParamSpec((e,), ("embed",), "ones"),
            gate_up=ParamSpec((e, 2, layout.mlp), ("embed", None, "mlp")),
            down=ParamSpec((layout.mlp, e), ("mlp", "embed")),
        )

    return Weights(
        embed=ParamSpec((layout.vocab, e), ("vocab", "embed")),
        layers=[layer() for _ in range(c.num_layers)],
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
        lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=rules.sharding(mesh, s.axes)),
        param_specs(layout), is_leaf=_is_spec)


def random_weights(layout: Layout, mesh: Mesh, dtype=jnp.bfloat16, seed: int = 0,
                   rules: ShardingRules = DEFAULT_RULES) -> Weights:
    """Random weights created directly in their shardings (presets, benchmarks).

    Padded q heads, MLP columns and vocab rows get random values too; that is
    fine for timing but such weights are not a published model.
    """
    specs = param_specs(layout)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    shardings = [rules.sharding(mesh, s.axes) for s in leaves]

    def init():
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        out = []
        for key, spec in zip(keys, leaves):
            if spec.init == "ones":
                out.append(jnp.ones(spec.shape, dtype))
            elif spec.init == "zeros":
                out.append(jnp.zeros(spec.shape, dtype))
            else:
                fan_in = spec.shape[0] if spec.axes[0] != "kv_heads" else spec.shape[0] * spec.shape[1] * spec.shape[2]
                std = 0.02 if spec.axes[0] == "vocab" else fan_in ** -0.5
                out.append((jax.random.normal(key, spec.shape, jnp.float32) * std).astype(dtype))
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


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def _matmul(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    # fp32 accumulation: exact enough for parity, and CPU bf16 dots are only fast this way.
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


class Model:
    """Pure functions of (weights, cache, batch) for one layout, mesh and rules.

    ``constrain`` pins activation shardings so XLA's partitioner reproduces the
    Megatron plan: the residual stream replicated over ``tp``, heads and MLP
    columns split over it.
    """

    def __init__(self, layout: Layout, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES,
                 decode_attention: Callable | None = None):
        self.layout = layout
        self.config = layout.config
        self.mesh = mesh
        self.rules = rules
        self.decode_attention = decode_attention

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
        new_k, new_v = [], []
        for i, layer in enumerate(weights.layers):
            with jax.named_scope(f"layer_{i}"):
                x, k_pages, v_pages = self._layer(layer, x, prepared, cache.k[i], cache.v[i], parts)
            new_k.append(k_pages)
            new_v.append(v_pages)
        x = rms_norm(x, weights.final_norm, c.rms_norm_eps)
        hidden, offset = [], 0
        for p in parts:
            n = p.tokens.size
            hidden.append(x[offset: offset + n].reshape(*p.tokens.shape, -1))
            offset += n
        return hidden, KVCache(k=new_k, v=new_v)

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

    def _layer(self, w: LayerWeights, x, prepared, k_pages, v_pages, parts):
        c, q_per_kv = self.config, self.layout.heads.q_per_kv
        with jax.named_scope("attention"):
            h = rms_norm(x, w.attn_norm, c.rms_norm_eps)
            qkv = _matmul("te,egjd->tgjd", h, w.qkv) + w.qkv_bias
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
            out = _matmul("tgjd,gjde->te", attn, w.o)
            x = self.constrain(x + out, ("batch", "embed"))
        with jax.named_scope("mlp"):
            h = rms_norm(x, w.mlp_norm, c.rms_norm_eps)
            gate_up = _matmul("te,ekm->tkm", h, w.gate_up)
            gate_up = self.constrain(gate_up, ("batch", None, "mlp"))
            act = jax.nn.silu(gate_up[:, 0].astype(jnp.float32)) * gate_up[:, 1].astype(jnp.float32)
            out = _matmul("tm,me->te", act.astype(x.dtype), w.down)
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
        last = []
        for p, h in zip(parts, hidden):
            if isinstance(p, PackedChunks):
                last.append(jnp.take(h, p.last_token, axis=0))
            else:
                index = jnp.argmax(p.positions, axis=1)  # positions rise along the chunk
                last.append(jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0])
        return self.logits(weights, jnp.concatenate(last) if len(last) > 1 else last[0]), cache
