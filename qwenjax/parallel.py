"""Device mesh, the one logical→mesh sharding table, and the attention head plan.

Layer code names logical axes only (``"vocab"``, ``"embed"``, ``"kv_heads"``, …);
``ShardingRules`` maps them to mesh axes. With the mesh in Auto mode XLA's
partitioner inserts the Megatron collectives itself: one all-reduce after the
attention output projection and one after the MLP down projection per layer.
With pipeline stages the mesh gains a ``pp`` axis; the logical ``stage`` axis (the
leading axis of stage-stacked layer weights and KV pools) maps to it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenjax.config import ModelConfig

MESH_AXES = ("dp", "tp")
PIPELINE_MESH_AXES = ("dp", "pp", "tp")  # with pp > 1; pp = 1 keeps the (dp, tp) mesh

LogicalAxes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name → mesh axis (``None`` = replicated)."""

    batch: str | None = None
    vocab: str | None = "tp"
    embed: str | None = None
    q_heads: str | None = "tp"
    kv_heads: str | None = "tp"
    head_dim: str | None = None
    mlp: str | None = "tp"
    layers: str | None = None
    # Pipeline stage: the leading axis of stage-stacked layer weights and KV pools (pp > 1 only).
    stage: str | None = "pp"
    # KV cache pages and the tokens inside a page are never split.
    pages: str | None = None
    page_slot: str | None = None

    def spec(self, axes: LogicalAxes) -> PartitionSpec:
        mesh_axes = []
        for name in axes:
            if name is None:
                mesh_axes.append(None)
                continue
            if not hasattr(self, name):
                raise ValueError(f"unknown logical axis {name!r} (known: {', '.join(_logical_names())})")
            mesh_axes.append(getattr(self, name))
        used = [a for a in mesh_axes if a is not None]
        if len(used) != len(set(used)):
            raise ValueError(f"logical axes {axes} map two dimensions onto one mesh axis: {mesh_axes}")
        return PartitionSpec(*mesh_axes)

    def sharding(self, mesh: Mesh, axes: LogicalAxes) -> NamedSharding:
        return NamedSharding(mesh, self.spec(axes))


def _logical_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ShardingRules)]


DEFAULT_RULES = ShardingRules()


def make_mesh(tp: int = 1, dp: int = 1, devices: Sequence[jax.Device] | None = None,
              pp: int = 1) -> Mesh:
    """A ``(dp, tp)`` mesh over the first ``dp * tp`` devices (or the ones given); with
    ``pp > 1`` a ``(dp, pp, tp)`` mesh over ``dp * pp * tp`` devices.

    Devices are taken in order with ``tp`` fastest, so a TP group is ``tp`` consecutive
    devices (one node's GPUs) and pipeline stages are successive groups (successive nodes).
    pp = 1 keeps the two-axis mesh, so single-stage programs and shardings are unchanged.

    Axes are Auto (sharding propagation by XLA) rather than jax's Explicit default:
    the model annotates weights and a few activations and lets the partitioner
    place the collectives.
    """
    if tp < 1 or dp < 1 or pp < 1:
        raise ValueError(f"mesh sizes must be ≥ 1, got dp={dp}, pp={pp}, tp={tp}")
    size = dp * pp * tp
    shape = f"dp={dp} × pp={pp} × tp={tp}" if pp > 1 else f"dp={dp} × tp={tp}"
    if devices is None:
        available = jax.devices()
        if size > len(available):
            raise ValueError(
                f"mesh {shape} needs {size} devices; only {len(available)} "
                f"{available[0].platform.upper()} device(s) are visible")
        devices = available[:size]
    if len(devices) != size:
        raise ValueError(f"mesh {shape} needs {size} devices, got {len(devices)}")
    axes = PIPELINE_MESH_AXES if pp > 1 else MESH_AXES
    grid = np.asarray(devices, dtype=object).reshape((dp, pp, tp) if pp > 1 else (dp, tp))
    return Mesh(grid, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def mesh_tp(mesh: Mesh) -> int:
    return mesh.shape.get("tp", 1)


def mesh_pp(mesh: Mesh) -> int:
    return mesh.shape.get("pp", 1)


def split_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    """Real layers per pipeline stage, as even as possible, earlier stages taking the remainder
    (e.g. 5 layers over 4 stages → 2, 1, 1, 1). Every stage is laid out with the largest
    count; the slots a stage does not fill hold zero (identity) layers."""
    if pp < 1 or pp > num_layers:
        raise ValueError(f"pp = {pp} must be between 1 and the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    return tuple(base + (1 if s < extra else 0) for s in range(pp))


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """How the checkpoint's heads are laid out for a tensor-parallel degree.

    Attention runs per KV head on whole GQA groups, so each device must hold
    whole groups. With ``tp`` not dividing the KV heads (e.g. 72B's 8 KV heads
    at TP16, or 0.5B's 2 at TP4), each KV head is replicated ``kv_replicas``
    times at load. Each replica serves a slice of its group's q heads; when the
    group does not split evenly, it is padded with zero q heads whose o_proj
    rows are zero, so outputs are unchanged.
    """

    num_heads: int          # q heads in the checkpoint
    num_kv_heads: int       # KV heads in the checkpoint
    tp: int
    kv_replicas: int        # copies of each checkpoint KV head
    q_per_kv: int           # q heads served by each (replicated) KV head, padding included

    @classmethod
    def create(cls, config: ModelConfig, tp: int) -> "HeadPlan":
        kv_heads = math.lcm(config.num_kv_heads, tp)
        replicas = kv_heads // config.num_kv_heads
        return cls(
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            tp=tp,
            kv_replicas=replicas,
            q_per_kv=-(-config.q_per_kv // replicas),
        )

    @property
    def kv_heads(self) -> int:
        """KV heads after replication (a multiple of tp)."""
        return self.num_kv_heads * self.kv_replicas

    @property
    def q_heads(self) -> int:
        """q heads after padding (kv_heads × q_per_kv)."""
        return self.kv_heads * self.q_per_kv

    @property
    def padded(self) -> bool:
        return self.q_heads != self.num_heads or self.kv_replicas > 1

    def kv_source(self, kv_head: int) -> int:
        """Checkpoint KV head that planned KV head ``kv_head`` copies."""
        return kv_head // self.kv_replicas

    def q_source(self, kv_head: int, slot: int) -> int | None:
        """Checkpoint q head for slot ``slot`` of planned KV head ``kv_head``; None = padding."""
        group = self.num_heads // self.num_kv_heads
        within = (kv_head % self.kv_replicas) * self.q_per_kv + slot
        if within >= group:
            return None
        return self.kv_source(kv_head) * group + within


def padded_size(size: int, tp: int) -> int:
    """``size`` rounded up to a multiple of ``tp`` (MLP width and vocab are zero-padded)."""
    return -(-size // tp) * tp


def one_device_shard(config: ModelConfig, tp: int) -> ModelConfig:
    """A config whose tp=1 model is exactly one device's share of ``config`` at ``tp``.

    Benchmarks on one GPU run this to stand in for a TP group (DESIGN.md,
    "Performance method"): e.g. 72B at TP4 → 16 q heads, 2 KV heads, MLP 7392,
    vocab 38016 per device.
    """
    plan = HeadPlan.create(config, tp)
    return dataclasses.replace(
        config,
        num_heads=plan.q_heads // tp,
        num_kv_heads=plan.kv_heads // tp,
        intermediate_size=padded_size(config.intermediate_size, tp) // tp,
        vocab_size=padded_size(config.vocab_size, tp) // tp,
        name=f"{config.name}/tp{tp}-shard",
    )
