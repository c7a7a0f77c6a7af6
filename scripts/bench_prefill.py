"""Prefill (time to first token) of one device's shard of a TP group, against measured GEMM speed.

Method (DESIGN.md, "one GPU stands in for a TP group"), as scripts/bench_decode.py: random
weights for one device's share of the model at ``--shard-of-tp``. A prompt of N tokens is
prefilled in chunks of ``--chunk`` tokens through the engine's packed-prefill path (paged
KV writes, blockwise attention over the pages already written, last-token logits), all
chunks inside ONE jitted program, so the time is the device's. A bf16 GEMM is timed in the
same run. Printed per prompt length: TTFT of the shard, FLOPs (matmuls + causal attention),
TFLOP/s, MFU against the measured GEMM rate and against ``--peak-tflops``, and the modeled
TTFT of the whole TP group (plus its all-reduces over the chunk's activations).

    python scripts/bench_prefill.py --preset qwen2.5-72b --shard-of-tp 4 --prompt 512,2048,8192,32768
    python scripts/bench_prefill.py --smoke      # tiny, CPU, seconds (run by the tests)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.benchmarking import measure_matmul_flops, median_seconds, shard_model, write_results
from qwenjax.config import preset
from qwenjax.kv_cache import KVCache
from qwenjax.model import Model, PackedChunks
from qwenjax.planner import allreduce_us, allreduces_per_step


def prefill_flops(shard, tokens: int) -> float:
    """Matmul FLOPs of ``tokens`` through the shard (embedding lookup excluded, LM head for the
    last token of each chunk ignored) plus causal attention scores and values."""
    d, hd, layers = shard.hidden_size, shard.head_dim, shard.num_layers
    per_token = 2 * layers * (d * (shard.num_heads + 2 * shard.num_kv_heads) * hd  # qkv
                              + shard.num_heads * hd * d                           # o
                              + 3 * d * shard.intermediate_size)                   # gate, up, down
    # QK^T and PV over the causal prefix: 2 matmuls × 2 FLOPs × heads × hd × (N² / 2).
    attention = 2 * 2 * layers * shard.num_heads * hd * tokens * (tokens + 1) / 2
    return per_token * tokens + attention


def bench_prompt(model: Model, weights, shard, tokens: int, chunk: int, page_size: int, dtype,
                 reps: int) -> dict:
    chunk = min(chunk, tokens)
    if tokens % chunk:
        raise ValueError(f"--prompt {tokens} must be a multiple of --chunk {chunk}")
    pages = -(-tokens // page_size)
    cache = KVCache.create(num_layers=shard.num_layers, kv_heads=shard.num_kv_heads,
                           head_dim=shard.head_dim, num_pages=pages, page_size=page_size,
                           dtype=dtype, mesh=model.mesh)
    table = jnp.arange(pages, dtype=jnp.int32)[None]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, shard.vocab_size, tokens), jnp.int32)
    cols = jnp.arange(chunk, dtype=jnp.int32)

    def prefill(weights, cache):
        def one_chunk(i, carry):
            cache, _ = carry
            start = i * chunk
            positions = start + cols
            part = PackedChunks(
                tokens=jax.lax.dynamic_slice(ids, (start,), (chunk,)), positions=positions,
                token_rows=jnp.zeros_like(cols), token_cols=cols, row_tokens=cols[None],
                row_positions=positions[None], seq_lens=(start + chunk)[None], block_tables=table,
                last_token=jnp.full((1,), chunk - 1, jnp.int32))
            logits, cache = model.last_logits(weights, cache, (part,))
            return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

        return jax.lax.fori_loop(0, tokens // chunk, one_chunk, (cache, jnp.zeros((1,), jnp.int32)))

    run = jax.jit(prefill, donate_argnums=(1,))
    state = {"cache": cache}

    def call():
        state["cache"], first = run(weights, state["cache"])
        return first

    seconds = median_seconds(call, reps=reps)
    return dict(prompt=tokens, chunk=chunk, seconds=seconds, flops=prefill_flops(shard, tokens))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-72b")
    p.add_argument("--shard-of-tp", type=int, default=4)
    p.add_argument("--prompt", default="512,2048,8192,32768", help="prompt lengths (tokens)")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per step)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quantization", default=None, choices=["fp8", "int4", "int8"],
                   help="fp8: projection weights in float8_e4m3fn with per-channel scales; "
                        "int4/int8: integer codes with a scale and zero point per 128 inputs "
                        "(AWQ/GPTQ's layout); activations stay in --dtype")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's dense bf16 peak for the spec MFU (H100 SXM: 989)")
    p.add_argument("--link-gbps", type=float, default=450.0, help="per-device link bandwidth (NVLink-4)")
    p.add_argument("--link-latency-us", type=float, default=8.0)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes for a CPU check")
    args = p.parse_args(argv)

    config = preset(args.preset)
    gemm_n = 8192
    if args.smoke:
        config = dataclasses.replace(preset("qwen2.5-0.5b"), num_layers=2)
        args.prompt, args.chunk, args.reps, gemm_n = "32,64", 32, 1, 256
    dtype = jnp.dtype(args.dtype)
    shard, model, weights = shard_model(config, args.shard_of_tp, dtype, quantization=args.quantization)
    gemm = measure_matmul_flops(gemm_n, dtype, reps=max(args.reps, 3))

    device = jax.devices()[0]
    header = dict(date=datetime.date.today().isoformat(), jax=jax.__version__, device=device.device_kind,
                  platform=device.platform, model=config.name, shard_of_tp=args.shard_of_tp,
                  dtype=args.dtype, quantization=args.quantization, measured_gemm_tflops=gemm / 1e12, peak_tflops=args.peak_tflops,
                  chunk=args.chunk)
    print(f"# prefill: {config.name} shard of TP{args.shard_of_tp} on {device.device_kind} "
          f"(jax {jax.__version__}, {args.dtype}, chunk {args.chunk}, {header['date']})")
    print(f"# measured {gemm_n}² GEMM: {gemm / 1e12:.3g} TFLOP/s; spec peak {args.peak_tflops:.0f}")
    print("| prompt | TTFT ms (shard) | TFLOP | TFLOP/s | MFU (measured GEMM) | MFU (peak) | "
          "collectives ms (modeled) | TTFT ms TP group (modeled) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for tokens in (int(t) for t in args.prompt.split(",")):
        r = bench_prompt(model, weights, shard, tokens, args.chunk, args.page_size, dtype, args.reps)
        r["tflops"] = r["flops"] / r["seconds"] / 1e12
        r["mfu_measured"] = r["flops"] / r["seconds"] / gemm
        r["mfu_peak"] = r["flops"] / r["seconds"] / (args.peak_tflops * 1e12)
        chunks = tokens // r["chunk"]
        per = allreduce_us(args.shard_of_tp, r["chunk"] * config.hidden_size * 2,
                           args.link_latency_us, args.link_gbps)
        r["collectives_ms_modeled"] = chunks * allreduces_per_step(config.num_layers) * per / 1e3
        r["ttft_ms_modeled"] = r["seconds"] * 1e3 + r["collectives_ms_modeled"]
        rows.append(r)
        write_results(args.json, header, rows)  # after every row: a run cut short keeps them
        print(f"| {tokens} | {r['seconds'] * 1e3:.1f} | {r['flops'] / 1e12:.2f} | {r['tflops']:.0f} | "
              f"{r['mfu_measured']:.0%} | {r['mfu_peak']:.0%} | {r['collectives_ms_modeled']:.1f} | "
              f"{r['ttft_ms_modeled']:.1f} |", flush=True)
    write_results(args.json, header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
