"""Timing helpers shared by the benchmark scripts.

DESIGN.md's timing rule: a lone small jitted call measures Python dispatch
(~0.1 ms), not the device, so device work is repeated inside one program.
"""
from __future__ import annotations

import collections
import gzip
import json
import math
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from qwenjax.quantization import element_bytes


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


def shard_model(config, shard_of_tp: int, dtype, attention: str = "auto",
                quantization: str | None = None):
    """DESIGN.md's "one GPU stands in for a TP group": random weights for one device's share of
    ``config`` at ``shard_of_tp``, on one device, with the engine's decode attention
    (``attention``: "auto" = the Pallas kernel on GPUs, "pallas", "xla"; the kernel runs in
    interpret mode on CPU) and ``quantization`` (None, "fp8", "int4" or "int8" projections).
    Returns (shard config, Model, weights)."""
    from qwenjax.attention import decode_kernel_for
    from qwenjax.model import Layout, Model, random_weights
    from qwenjax.parallel import DEFAULT_RULES, make_mesh, one_device_shard

    shard = one_device_shard(config, shard_of_tp)
    mesh = make_mesh(tp=1)
    layout = Layout.create(shard, 1, quantization=quantization)
    kernel = decode_kernel_for(mesh, DEFAULT_RULES, attention,
                               interpret=jax.default_backend() == "cpu")
    return shard, Model(layout, mesh, decode_attention=kernel), random_weights(layout, mesh, dtype)


def decode_weight_bytes(weights) -> int:
    """Weight bytes one decode step reads: every array, except an untied embedding table, of
    which a step reads only its tokens' rows (a tied one is read whole by the logits)."""
    total = sum(_stored_bytes(x) for x in jax.tree.leaves(weights))
    return total - (weights.embed.nbytes if weights.lm_head is not None else 0)


def _stored_bytes(x: jax.Array) -> int:
    # jax reports a byte per 4-bit element; XLA stores them two to a byte.
    return round(x.size * element_bytes(x.dtype))


# ---- profiles -------------------------------------------------------------------------------
# Kinds of device work, by kernel (or XLA op) name; the first pattern that matches wins.
KERNEL_KINDS = (
    ("collective", re.compile(r"nccl|rccl|all-?reduce|all_reduce|allreduce|all-gather|collective", re.I)),
    ("attention", re.compile(r"paged|attention|attn", re.I)),
    ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|hipblas|wgmma|matmul|\bdot\b|dot_general", re.I)),
    ("copy", re.compile(r"copy|transpose|memcpy|memset|dynamic[-_]update|scatter", re.I)),
)


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if pattern.search(name):
            return kind
    return "other"


def _device_events(events: list[dict]) -> list[dict]:
    """Complete events of the device's compute streams in a Chrome/Perfetto trace (GPU:
    ``/device:…`` processes, their "Stream" threads when they have any, so the summary lines
    XLA adds above the kernels are not counted twice; CPU: XLA's executor threads)."""
    process = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = {pid for pid, name in process.items() if name.startswith("/device:")}
    if device:
        on_device = [e for e in complete if e["pid"] in device]
        streams = [e for e in on_device if "stream" in thread.get((e["pid"], e["tid"]), "").lower()]
        return streams or on_device
    return [e for e in complete if thread.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
            and not e["name"].startswith(("ThunkExecutor", "SlinkyThreadPool", "end: "))]


def summarize_trace(trace_file: str | Path, top: int = 15) -> dict:
    """Where the device's time went in a ``jax.profiler`` trace (``*.trace.json.gz``): busy time
    (the union of kernel intervals) against the traced span, time per kind of work, and the
    ``top`` kernels by total time."""
    with gzip.open(trace_file, "rt") as f:
        data = json.load(f)
    events = _device_events(data["traceEvents"] if isinstance(data, dict) else data)
    if not events:
        raise ValueError(f"{trace_file} holds no device events")
    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        entry = per_name[e["name"]]
        entry[0] += 1
        entry[1] += float(e["dur"])
    intervals = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
    busy, end = 0.0, -math.inf
    for start, stop in intervals:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    span = end - intervals[0][0]
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, (_, total) in per_name.items():
        by_kind[kernel_kind(name)] += total
    kernels = sorted(per_name.items(), key=lambda item: -item[1][1])[:top]
    return dict(busy_us=busy, span_us=span, idle_fraction=1 - busy / span if span else 0.0,
                by_kind_us=dict(sorted(by_kind.items(), key=lambda item: -item[1])),
                kernels=[dict(name=name, kind=kernel_kind(name), count=count, total_us=total)
                         for name, (count, total) in kernels])


def profile_call(fn: Callable, *args, out: str | Path) -> dict:
    """Run ``fn(*args)`` once under ``jax.profiler`` and summarize it (``summarize_trace``).
    Writes ``<out>.trace.json.gz`` (open it in ui.perfetto.dev) and ``<out>.json``."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        traces = sorted(Path(directory).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
        if not traces:
            raise RuntimeError("jax.profiler wrote no perfetto trace")
        trace = out.with_name(out.name + ".trace.json.gz")
        shutil.copyfile(traces[-1], trace)
    summary = summarize_trace(trace)
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2))
    return summary


def format_profile(summary: dict) -> str:
    lines = [f"# device busy {summary['busy_us'] / 1e3:.2f} ms of a {summary['span_us'] / 1e3:.2f} ms "
             f"span ({summary['idle_fraction']:.1%} idle)"]
    busy = sum(summary["by_kind_us"].values()) or 1.0
    lines.append("# by kind: " + ", ".join(f"{kind} {us / 1e3:.2f} ms ({us / busy:.0%})"
                                            for kind, us in summary["by_kind_us"].items()))
    lines.append("| kernel | kind | calls | total ms | share |")
    lines.append("|---|---|---|---|---|")
    for k in summary["kernels"]:
        lines.append(f"| {k['name'][:70]} | {k['kind']} | {k['count']} | {k['total_us'] / 1e3:.3f} | "
                     f"{k['total_us'] / busy:.1%} |")
    return "\n".join(lines)


def write_results(path: str | None, header: dict, rows: list[dict]) -> None:
    """The benchmark's header and rows as one JSON object (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(header, rows=rows), f, indent=2)
