"""LoRA adapters (PEFT format) served beside the base weights, several in one batch.

Adapters are registered when the model loads (``LLM(lora_modules={name: dir})``,
``qwenjax serve --lora-modules name=dir``) or later into free slots (``Engine.add_lora``;
``max_loras`` slots of ``max_lora_rank`` are allocated at load), and stay resident until
unloaded: slot 0 is "no adapter" (zeros), slot i holds one adapter. Each projection gets
stacked ``A [slots, in…, r]`` and
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
import functools
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

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


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """vLLM's way to name an adapter per call (``generate(..., lora_request=LoRARequest("sql",
    1, "/adapters/sql"))``): loaded into a free slot on first use, then found by name. The
    integer id is accepted for vLLM's signature; names identify adapters here."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""


@dataclasses.dataclass
class Adapter:
    """One PEFT adapter read into float32 numpy: (layer, projection) → (A [r, in], B [out, r])."""

    name: str
    path: Path
    rank: int
    scale: float
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]


def read_adapter(name: str, path: str | os.PathLike) -> Adapter:
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors), or the Hub id of
    one in the local Hugging Face cache (qwenjax/hub_cache.py); what this runtime cannot apply
    (DoRA, biases, fan_in_fan_out, modules_to_save, non-projection targets) is refused by name."""
    from qwenjax.hub_cache import local_model_dir
    from qwenjax.weights import Checkpoint

    path = local_model_dir(str(path))
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


def check_adapter(adapter: Adapter, layout) -> None:
    """Refuse, by name, an adapter whose layers or projection shapes are not the model's."""
    c = layout.config
    e, d, inter = c.hidden_size, c.head_dim, c.intermediate_size
    q, kv = c.num_heads * d, c.num_kv_heads * d
    # (inputs, outputs) of each projection in the checkpoint's [out, in] convention.
    dims = {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e),
            "gate_proj": (e, inter), "up_proj": (e, inter), "down_proj": (inter, e)}
    for (layer, projection), (a, b) in adapter.weights.items():
        if layer >= c.num_layers:
            raise ValueError(f"LoRA {adapter.name!r}: layer {layer} does not exist "
                             f"(the model has {c.num_layers})")
        if (a.shape[1], b.shape[0]) != dims[projection]:
            raise ValueError(f"LoRA {adapter.name!r}: layer {layer} {projection} maps "
                             f"{a.shape[1]} → {b.shape[0]}; the model's maps "
                             f"{dims[projection][0]} → {dims[projection][1]}")


def slot_shapes(layout, rank: int) -> dict[str, tuple[int, ...]]:
    """One slot's shape of each LayerLoRA stack (its leading slot axis left out)."""
    c, plan = layout.config, layout.heads
    e, d = c.hidden_size, c.head_dim
    return dict(qkv_a=(e, 3, rank), qkv_b=(rank, plan.kv_heads, plan.q_per_kv + 2, d),
                o_a=(plan.kv_heads, plan.q_per_kv, d, rank), o_b=(rank, e),
                gate_up_a=(e, 2, rank), gate_up_b=(rank, 2, layout.mlp),
                down_a=(layout.mlp, rank), down_b=(rank, e))


def slot_arrays(adapter: Adapter | None, layout, rank: int) -> list[dict[str, np.ndarray]]:
    """One slot of every layer's stacks (float32, no slot axis) holding ``adapter`` laid out
    like the base weights, its rank zero-padded to ``rank`` (None: an empty slot, zeros)."""
    c, plan = layout.config, layout.heads
    d, inter = c.head_dim, c.intermediate_size
    g_n, j_n = plan.kv_heads, plan.q_per_kv + 2
    if adapter is not None and adapter.rank > rank:
        raise ValueError(f"LoRA {adapter.name!r} has rank {adapter.rank}; the slots hold rank ≤ "
                         f"{rank} (max_lora_rank)")
    shapes = slot_shapes(layout, rank)
    layers = []
    for i in range(c.num_layers):
        arrays = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        layers.append(arrays)
        if adapter is None:
            continue
        k = adapter.rank

        def get(projection):
            return adapter.weights.get((i, projection))

        for p, projection in enumerate(("q_proj", "k_proj", "v_proj")):
            if (pair := get(projection)) is not None:
                arrays["qkv_a"][:, p, :k] = pair[0].T
        for g in range(g_n):
            for j in range(j_n):
                if j < plan.q_per_kv:
                    projection, head = "q_proj", plan.q_source(g, j)
                else:
                    projection = "k_proj" if j == plan.q_per_kv else "v_proj"
                    head = plan.kv_source(g)
                if head is not None and (pair := get(projection)) is not None:
                    arrays["qkv_b"][:k, g, j] = pair[1][head * d:(head + 1) * d].T * adapter.scale
        if (pair := get("o_proj")) is not None:
            for g in range(g_n):
                for j in range(plan.q_per_kv):
                    head = plan.q_source(g, j)
                    if head is not None:
                        arrays["o_a"][g, j, :, :k] = pair[0][:, head * d:(head + 1) * d].T
            arrays["o_b"][:k] = pair[1].T * adapter.scale
        for p, projection in enumerate(("gate_proj", "up_proj")):
            if (pair := get(projection)) is not None:
                arrays["gate_up_a"][:, p, :k] = pair[0].T
                arrays["gate_up_b"][:k, p, :inter] = pair[1].T * adapter.scale
        if (pair := get("down_proj")) is not None:
            arrays["down_a"][:inter, :k] = pair[0].T
            arrays["down_b"][:k] = pair[1].T * adapter.scale
    return layers


def build_lora(adapters: list[Adapter], layout, mesh: Mesh, dtype, slots: int | None = None,
               rank: int | None = None, rules: ShardingRules = DEFAULT_RULES) -> list[LayerLoRA]:
    """Stacked per-layer LoRA arrays for ``adapters`` (slot i + 1 = adapters[i]) in ``layout``,
    in its shardings. ``slots`` (default: one per adapter, plus slot 0) and ``rank`` (default:
    the largest adapter's) leave room for adapters loaded later (``write_slot``)."""
    if layout.pp != 1:
        raise ValueError("LoRA adapters need pp = 1 (pipeline stages do not take them yet)")
    slots = len(adapters) + 1 if slots is None else slots
    rank = max(a.rank for a in adapters) if rank is None else rank
    if len(adapters) + 1 > slots:
        raise ValueError(f"{len(adapters)} LoRA adapters do not fit {slots - 1} slots (max_loras)")
    for adapter in adapters:
        check_adapter(adapter, layout)
    per_slot = [slot_arrays(None, layout, rank)] + [slot_arrays(a, layout, rank) for a in adapters]
    per_slot += [per_slot[0]] * (slots - len(per_slot))
    return [LayerLoRA(**{name: jax.device_put(np.stack([s[i][name] for s in per_slot]).astype(dtype),
                                              rules.sharding(mesh, AXES[name]))
                         for name in AXES})
            for i in range(layout.config.num_layers)]


def write_slot(stacks: list[LayerLoRA], slot: int, arrays: list[dict[str, np.ndarray]]
               ) -> list[LayerLoRA]:
    """``stacks`` with slot ``slot`` of every layer replaced by ``arrays`` (``slot_arrays``):
    new arrays of the same shapes and shardings, so the compiled step runs them as they are.
    The old stacks are not donated: a step in flight may still be reading them."""
    out = []
    for layer, values in zip(stacks, arrays):
        shardings, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, layer))
        out.append(_slot_writer(tuple(shardings), treedef)(layer, slot, LayerLoRA(**values)))
    return out


@functools.lru_cache(maxsize=8)
def _slot_writer(shardings: tuple, treedef):
    def write(layer, slot, values):
        return jax.tree.map(lambda stack, value: stack.at[slot].set(value.astype(stack.dtype)),
                            layer, values)
    # The stacks keep their shardings: the compiled step takes the new arrays as it took the old.
    return jax.jit(write, out_shardings=jax.tree.unflatten(treedef, shardings))


def random_lora(layout, mesh: Mesh, dtype, adapters: int, rank: int, seed: int = 0,
                rules: ShardingRules = DEFAULT_RULES) -> list[LayerLoRA]:
    """Random stacks for ``adapters`` adapters of ``rank`` (slot 0 zeros), made in their
    shardings: what a step with LoRA costs, for benchmarks (no checkpoint needed)."""
    shapes = slot_shapes(layout, rank)
    shardings = {name: rules.sharding(mesh, AXES[name]) for name in shapes}

    def layer(key):
        keys = jax.random.split(key, len(shapes))
        arrays = {}
        for k, (name, shape) in zip(keys, shapes.items()):
            value = jax.random.normal(k, (adapters + 1, *shape), jnp.float32) * 0.01
            arrays[name] = value.at[0].set(0).astype(dtype)
        return arrays

    make = jax.jit(layer, out_shardings=shardings)
    return [LayerLoRA(**make(k))
            for k in jax.random.split(jax.random.key(seed), layout.config.num_layers)]


class LoRASlots:
    """Which adapter holds each weight slot (slot 0: none) — the engine's live registry.

    Each load gets a number of its own (``load_id``): a name unloaded and loaded again from
    another directory salts the prefix cache anew, so no request reuses K/V computed under
    the old weights."""

    def __init__(self, slots: int, rank: int, names: Sequence[str] = ()):
        if len(names) + 1 > slots:
            raise ValueError(f"{len(names)} LoRA adapters do not fit {slots - 1} slots")
        self.rank = rank
        self._slots: list[str | None] = [None] + list(names) + [None] * (slots - 1 - len(names))
        self._loads = itertools.count(1)
        self._load_ids = {name: next(self._loads) for name in names}

    @property
    def capacity(self) -> int:
        """Adapters that can be resident at once (max_loras)."""
        return len(self._slots) - 1

    @property
    def names(self) -> tuple[str, ...]:
        """The loaded adapters, in slot order."""
        return tuple(name for name in self._slots if name is not None)

    def slot(self, name: str) -> int:
        if name not in self._load_ids:
            served = ", ".join(repr(n) for n in self.names) or "none"
            raise ValueError(f"lora {name!r} is not loaded; adapters: {served}")
        return self._slots.index(name)

    def load_id(self, name: str) -> int:
        return self._load_ids[name]

    def add(self, name: str) -> int:
        """A free slot for ``name``; raises if the name is loaded or every slot is taken."""
        if name in self._load_ids:
            raise ValueError(f"lora {name!r} is already loaded; unload it first")
        if None not in self._slots[1:]:
            raise ValueError(f"all {self.capacity} LoRA slots are taken ({', '.join(self.names)}); "
                             "unload one first, or start with a larger max_loras")
        slot = self._slots.index(None, 1)
        self._slots[slot] = name
        self._load_ids[name] = next(self._loads)
        return slot

    def remove(self, name: str) -> int:
        slot = self.slot(name)
        self._slots[slot] = None
        del self._load_ids[name]
        return slot


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
    """``name=path`` strings or JSON objects (vLLM's --lora-modules forms: ``{"name": …,
    "path": …, "base_model_name": …}``; SGLang's --lora-paths ``{"lora_name": …,
    "lora_path": …, "pinned": …}``), or a mapping → {name: path}."""
    if not values:
        return {}
    if isinstance(values, Mapping):
        items = list(values.items())
    else:
        items = [_lora_module(value) for value in values]
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"--lora-modules names an adapter twice: {names}")
    return dict(items)


def _lora_module(value: str) -> tuple[str, str]:
    if value.lstrip().startswith("{"):
        try:
            module = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"--lora-modules: {value!r} is not valid JSON ({error})") from None
        # base_model_name (vLLM) and pinned (SGLang) change nothing here: adapters apply to the
        # served model, and every loaded adapter stays resident.
        known = {"name", "path", "base_model_name", "lora_name", "lora_path", "pinned"}
        unknown = sorted(set(module) - known) if isinstance(module, dict) else []
        name = module.get("name", module.get("lora_name")) if isinstance(module, dict) else None
        path = module.get("path", module.get("lora_path")) if isinstance(module, dict) else None
        if unknown or not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ValueError(f"--lora-modules takes name=path or a JSON object with \"name\" and "
                             f"\"path\" strings (and optionally \"base_model_name\"), got {value!r}")
        return name, path
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules takes name=path or JSON '{{\"name\": …, \"path\": …}}', "
                         f"got {value!r}")
    return name, path
