"""LoRA adapters (PEFT format) served beside the base weights, several in one batch.

Adapters are registered when the model loads (``LLM(lora_modules={name: dir})``,
``qwenjax serve --lora-modules name=dir``) and stay resident: slot 0 is "no adapter" (zeros),
slot i the i-th adapter. Each projection gets stacked ``A [slots, in…, r]`` and
``B [slots, r, out…]`` laid out like its base weight (the head plan's KV replication and q-head
padding, MLP padding), with the adapter's scale (alpha / r, or alpha / √r with rsLoRA) folded
into B and ranks zero-padded to the largest.

A step computes every slot's low-rank product and keeps each token's own with a one-hot mask:

    delta = ((x · A_all) ⊙ onehot(slot)) · B_all

Its cost is slots × r × (in + out) per token — a few percent of the base projection for a
handful of rank-16 adapters — with static shapes and no per-token weight gather, so rows of
different adapters (and none) share one step. Tokens with slot 0 get exactly the base model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qwenjax.parallel import DEFAULT_RULES, ShardingRules


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerLoRA:
    """One layer's adapters, all slots (slot 0: zeros)."""

    qkv_a: jax.Array      # [slots, embed, 3, r] (q, k, v)
    qkv_b: jax.Array      # [slots, r, kv_heads, q_per_kv + 2, head_dim]
    o_a: jax.Array        # [slots, kv_heads, q_per_kv, head_dim, r]
    o_b: jax.Array        # [slots, r, embed]
    gate_up_a: jax.Array  # [slots, embed, 2, r]
    gate_up_b: jax.Array  # [slots, r, 2, mlp]
    down_a: jax.Array     # [slots, mlp, r]
    down_b: jax.Array     # [slots, r, embed]


AXES = dict(qkv_a=(None, "embed", None, None), qkv_b=(None, None, "kv_heads", None, "head_dim"),
            o_a=(None, "kv_heads", None, "head_dim", None), o_b=(None, None, "embed"),
            gate_up_a=(None, "embed", None, None), gate_up_b=(None, None, None, "mlp"),
            down_a=(None, "mlp", None), down_b=(None, None, "embed"))

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
                  r"lora_([AB])(?:\.default)?\.weight$")


@dataclasses.dataclass
class Adapter:
    """One PEFT adapter read into float32 numpy: (layer, projection) → (A [r, in], B [out, r])."""

    name: str
    path: Path
    rank: int
    scale: float
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]


def read_adapter(name: str, path: str | os.PathLike) -> Adapter:
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors); what this
    runtime cannot apply (DoRA, biases, fan_in_fan_out, modules_to_save, non-projection
    targets) is refused by name."""
    from qwenjax.weights import Checkpoint

    path = Path(path)
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"LoRA {name!r}: {path} has no adapter_config.json")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, allowed in (("use_dora", (False, None)), ("fan_in_fan_out", (False, None)),
                         ("bias", ("none", None)), ("modules_to_save", (None, []))):
        if config.get(key) not in allowed:
            raise ValueError(f"LoRA {name!r}: {key} = {config.get(key)!r} is not supported")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA {name!r}: adapter_config.json r must be a positive int, got {rank!r}")
    alpha = config.get("lora_alpha", rank)
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    ckpt = Checkpoint(path)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    try:
        for key in ckpt.names():
            match = _KEY.match(key)
            if match is None or match.group(2) not in _PROJECTIONS:
                raise ValueError(f"LoRA {name!r}: tensor {key!r} is not a LoRA A/B of a layer "
                                 f"projection ({', '.join(_PROJECTIONS)})")
            layer, projection, which = int(match.group(1)), match.group(2), match.group(3)
            found.setdefault((layer, projection), {})[which] = np.asarray(ckpt.tensor(key), np.float32)
    finally:
        ckpt.close()
    weights = {}
    for (layer, projection), pair in found.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA {name!r}: layer {layer} {projection} has lora_{''.join(pair)} only")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"LoRA {name!r}: layer {layer} {projection} A {a.shape} / B {b.shape} "
                             f"do not have rank {rank}")
        weights[(layer, projection)] = (a, b)
    if not weights:
        raise ValueError(f"LoRA {name!r}: {path} holds no LoRA weights")
    return Adapter(name, path, rank, float(scale), weights)


def build_lora(adapters: list[Adapter], layout, mesh: Mesh, dtype,
               rules: ShardingRules = DEFAULT_RULES) -> list[LayerLoRA]:
    """Stacked per-layer LoRA arrays for ``adapters`` (slot i + 1 = adapters[i]) in ``layout``,
    in its shardings."""
    c, plan = layout.config, layout.heads
    if layout.pp != 1:
        raise ValueError("LoRA adapters need pp = 1 (pipeline stages do not take them yet)")
    e, d, inter = c.hidden_size, c.head_dim, c.intermediate_size
    g_n, j_n = plan.kv_heads, plan.q_per_kv + 2
    slots, r = len(adapters) + 1, max(a.rank for a in adapters)
    q, kv = c.num_heads * d, c.num_kv_heads * d
    # (inputs, outputs) of each projection in the checkpoint's [out, in] convention.
    dims = {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e),
            "gate_proj": (e, inter), "up_proj": (e, inter), "down_proj": (inter, e)}
    for adapter in adapters:
        for (layer, projection), (a, b) in adapter.weights.items():
            if layer >= c.num_layers:
                raise ValueError(f"LoRA {adapter.name!r}: layer {layer} does not exist "
                                 f"(the model has {c.num_layers})")
            if (a.shape[1], b.shape[0]) != dims[projection]:
                raise ValueError(f"LoRA {adapter.name!r}: layer {layer} {projection} maps "
                                 f"{a.shape[1]} → {b.shape[0]}; the model's maps "
                                 f"{dims[projection][0]} → {dims[projection][1]}")
    layers = []
    for i in range(c.num_layers):
        arrays = dict(qkv_a=np.zeros((slots, e, 3, r), np.float32),
                      qkv_b=np.zeros((slots, r, g_n, j_n, d), np.float32),
                      o_a=np.zeros((slots, g_n, plan.q_per_kv, d, r), np.float32),
                      o_b=np.zeros((slots, r, e), np.float32),
                      gate_up_a=np.zeros((slots, e, 2, r), np.float32),
                      gate_up_b=np.zeros((slots, r, 2, layout.mlp), np.float32),
                      down_a=np.zeros((slots, layout.mlp, r), np.float32),
                      down_b=np.zeros((slots, r, e), np.float32))
        for s, adapter in enumerate(adapters, start=1):
            k = adapter.rank

            def get(projection):
                return adapter.weights.get((i, projection))

            for p, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                if (pair := get(projection)) is not None:
                    arrays["qkv_a"][s, :, p, :k] = pair[0].T
            for g in range(g_n):
                for j in range(j_n):
                    if j < plan.q_per_kv:
                        projection, head = "q_proj", plan.q_source(g, j)
                    else:
                        projection = "k_proj" if j == plan.q_per_kv else "v_proj"
                        head = plan.kv_source(g)
                    if head is not None and (pair := get(projection)) is not None:
                        arrays["qkv_b"][s, :k, g, j] = pair[1][head * d:(head + 1) * d].T * adapter.scale
            if (pair := get("o_proj")) is not None:
                for g in range(g_n):
                    for j in range(plan.q_per_kv):
                        head = plan.q_source(g, j)
                        if head is not None:
                            arrays["o_a"][s, g, j, :, :k] = pair[0][:, head * d:(head + 1) * d].T
                arrays["o_b"][s, :k] = pair[1].T * adapter.scale
            for p, projection in enumerate(("gate_proj", "up_proj")):
                if (pair := get(projection)) is not None:
                    arrays["gate_up_a"][s, :, p, :k] = pair[0].T
                    arrays["gate_up_b"][s, :k, p, :inter] = pair[1].T * adapter.scale
            if (pair := get("down_proj")) is not None:
                arrays["down_a"][s, :inter, :k] = pair[0].T
                arrays["down_b"][s, :k] = pair[1].T * adapter.scale
        layers.append(LayerLoRA(**{name: jax.device_put(value.astype(dtype),
                                                        rules.sharding(mesh, AXES[name]))
                                   for name, value in arrays.items()}))
    return layers


def random_lora(layout, mesh: Mesh, dtype, adapters: int, rank: int, seed: int = 0,
                rules: ShardingRules = DEFAULT_RULES) -> list[LayerLoRA]:
    """Random stacks for ``adapters`` adapters of ``rank`` (slot 0 zeros), made in their
    shardings: what a step with LoRA costs, for benchmarks (no checkpoint needed)."""
    c, plan = layout.config, layout.heads
    shapes = dict(qkv_a=(c.hidden_size, 3, rank),
                  qkv_b=(rank, plan.kv_heads, plan.q_per_kv + 2, c.head_dim),
                  o_a=(plan.kv_heads, plan.q_per_kv, c.head_dim, rank), o_b=(rank, c.hidden_size),
                  gate_up_a=(c.hidden_size, 2, rank), gate_up_b=(rank, 2, layout.mlp),
                  down_a=(layout.mlp, rank), down_b=(rank, c.hidden_size))
    shardings = {name: rules.sharding(mesh, AXES[name]) for name in shapes}

    def layer(key):
        keys = jax.random.split(key, len(shapes))
        arrays = {}
        for k, (name, shape) in zip(keys, shapes.items()):
            value = jax.random.normal(k, (adapters + 1, *shape), jnp.float32) * 0.01
            arrays[name] = value.at[0].set(0).astype(dtype)
        return arrays

    make = jax.jit(layer, out_shardings=shardings)
    return [LayerLoRA(**make(k)) for k in jax.random.split(jax.random.key(seed), c.num_layers)]


def lora_delta(eq_a: str, eq_b: str, x: jax.Array, a: jax.Array, b: jax.Array,
               onehot: jax.Array, take: np.ndarray | None = None) -> jax.Array:
    """``((x · A) ⊙ onehot) · B`` in fp32: ``eq_a`` gives ``[t, slots, …, r]``; ``take``
    picks along the axis after slots (the fused QKV's slot → q/k/v map)."""
    xa = jnp.einsum(eq_a, x, a, preferred_element_type=jnp.float32)
    if take is not None:
        xa = jnp.take(xa, take, axis=2)
    xa = xa * onehot.reshape(onehot.shape + (1,) * (xa.ndim - 2))
    return jnp.einsum(eq_b, xa.astype(x.dtype), b, preferred_element_type=jnp.float32)


def qkv_slot_projection(q_per_kv: int) -> np.ndarray:
    """For each slot of the fused QKV (q_per_kv q heads, then K, then V): 0 = q, 1 = k, 2 = v."""
    return np.asarray([0] * q_per_kv + [1, 2], np.int32)


def parse_lora_modules(values: list[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``name=path`` strings (vLLM's --lora-modules) or a mapping → {name: path}."""
    if not values:
        return {}
    if isinstance(values, Mapping):
        items = list(values.items())
    else:
        items = []
        for value in values:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules takes name=path, got {value!r}")
            items.append((name, path))
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"--lora-modules names an adapter twice: {names}")
    return dict(items)
