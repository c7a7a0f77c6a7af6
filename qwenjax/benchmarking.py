"""Timing helpers shared by the benchmark scripts.

DESIGN.md's timing rule: a lone small jitted call measures Python dispatch
(~0.1 ms), not the device, so device work is repeated inside one program.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable, *args, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn(*args)`` (outputs awaited) after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_read_bandwidth(num_bytes: int, reps: int, inner: int = 10) -> float:
    """Device read bandwidth in bytes/s: a bf16 reduction over ``num_bytes``, ``inner`` times
    inside one program so dispatch is amortized."""
    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)

    @jax.jit
    def read(x):
        # The loop index enters the reduction so XLA cannot hoist it out of the loop.
        body = lambda i, acc: acc + jnp.sum(x * i.astype(x.dtype), dtype=jnp.float32)
        return jax.lax.fori_loop(0, inner, body, jnp.float32(0))

    seconds = median_seconds(read, x, reps=reps)
    del x
    return (num_bytes // 2) * 2 * inner / seconds


def measure_matmul_flops(n: int, dtype, reps: int, inner: int = 10) -> float:
    """Dense matmul rate in FLOP/s: ``inner`` chained ``n × n`` products inside one program,
    accumulating in float32 (as the model's matmuls do)."""
    a = jnp.ones((n, n), dtype) * jnp.asarray(1.0 / n, dtype)
    b = jnp.ones((n, n), dtype)

    @jax.jit
    def chain(a, b):
        body = lambda i, x: jnp.dot(x, b, preferred_element_type=jnp.float32).astype(dtype)
        return jax.lax.fori_loop(0, inner, body, a)

    seconds = median_seconds(chain, a, b, reps=reps)
    return 2 * n**3 * inner / seconds


def shard_model(config, shard_of_tp: int, dtype):
    """DESIGN.md's "one GPU stands in for a TP group": random weights for one device's share of
    ``config`` at ``shard_of_tp``, on one device. Returns (shard config, Model, weights)."""
    from qwenjax.model import Layout, Model, random_weights
    from qwenjax.parallel import make_mesh, one_device_shard

    shard = one_device_shard(config, shard_of_tp)
    mesh = make_mesh(tp=1)
    layout = Layout.create(shard, 1)
    return shard, Model(layout, mesh), random_weights(layout, mesh, dtype)


def write_results(path: str | None, header: dict, rows: list[dict]) -> None:
    """The benchmark's header and rows as one JSON object (nothing when ``path`` is None)."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(dict(header, rows=rows), f, indent=2)
