"""Paged KV cache: per-layer K and V page pools on device.

Pool layout ``[kv_heads, num_pages, page_size, head_dim]`` puts the KV-head axis
first so sharding it over ``tp`` keeps each device's attention local, and one
page of one head is a contiguous ``page_size × head_dim`` tile for the kernel.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from qwenjax.parallel import DEFAULT_RULES, ShardingRules

POOL_AXES = ("kv_heads", "pages", "page_slot", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: list[jax.Array]  # per layer [kv_heads, num_pages, page_size, head_dim]
    v: list[jax.Array]  # per layer [kv_heads, num_pages, page_size, head_dim]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def create(cls, *, num_layers: int, kv_heads: int, head_dim: int, num_pages: int,
               page_size: int, dtype, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> "KVCache":
        shape = (kv_heads, num_pages, page_size, head_dim)
        sharding = rules.sharding(mesh, POOL_AXES)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(k=[zeros() for _ in range(num_layers)], v=[zeros() for _ in range(num_layers)])


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             positions: jax.Array, block_tables: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter a step's new keys/values ``[batch, chunk, kv_heads, head_dim]`` into their pages.

    Padding tokens (position < 0) are aimed one past the last page and dropped.
    Called inside the jitted step with the pools donated, so XLA updates them in
    place instead of copying the pool every step.
    """
    num_pages, page_size = k_pages.shape[1], k_pages.shape[2]
    safe_pos = jnp.maximum(positions, 0)
    page = jnp.take_along_axis(block_tables, safe_pos // page_size, axis=1)
    page = jnp.where(positions >= 0, page, num_pages).reshape(-1)
    slot = (safe_pos % page_size).reshape(-1)

    def scatter(pages, new):
        kv_heads, head_dim = new.shape[2], new.shape[3]
        new = new.reshape(-1, kv_heads, head_dim).swapaxes(0, 1).astype(pages.dtype)
        return pages.at[:, page, slot].set(new, mode="drop")

    return scatter(k_pages, k), scatter(v_pages, v)
