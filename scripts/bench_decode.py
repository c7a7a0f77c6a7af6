"""Decode step time of one device's shard of a TP group, against HBM read bandwidth.

Method (DESIGN.md, "one GPU stands in for a TP group"): random weights for one
device's share of the model at ``--shard-of-tp`` (e.g. 72B at TP4: 16 q heads,
2 KV heads, MLP 7392, vocab/4), a paged KV cache holding ``--ctx`` tokens per
sequence, and ``--steps`` greedy decode steps run inside ONE jitted program
(a lone small call would time Python dispatch, not the GPU). HBM read bandwidth
is measured in the same run. Printed per batch size: ms/step, bytes moved
(weights a step reads — all but an untied embedding table, of which it reads a few
rows — plus valid KV), TB/s and MBU (= bytes / time / measured bandwidth), and
separately the modeled collectives of the full TP group and the resulting
modeled tokens/s.

``--verify K`` also times the step that checks K speculative drafts per sequence (the
engine's packed-prefill path with 1 + K tokens a row, logits and sampling at every
position) at the ``--verify-batch`` sizes: its cost over a decode step is the number of
tokens a step must yield on average for speculation to pay (docs/architecture.md).

    python scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 4 --batch 1,8,32,64 --ctx 2048
    python scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 8 --batch 1 --verify 4
    python scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 4 --quantization fp8 --kv-cache-dtype fp8
    python scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 4 --batch 32 --lora 4   # vs no --lora
    python scripts/bench_decode.py --smoke      # tiny, CPU, seconds (run by the tests)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.benchmarking import (decode_weight_bytes, format_profile, measure_read_bandwidth,
                                  profile_call, shard_model,
                                  write_results)
from qwenjax.config import preset
from qwenjax.kv_cache import KVCache, kv_bytes_per_vector
from qwenjax.model import Model, PackedChunks, StepBatch
from qwenjax.sampling import SamplingParams, SamplingRow, build_sampling_batch, sample
from qwenjax.planner import allreduce_us, allreduces_per_step


def modeled_collectives_ms(config, tp: int, batch: int, link_gbps: float, latency_us: float) -> float:
    """The planner's collective model for this batch's residual stream (bf16)."""
    per_us = allreduce_us(tp, batch * config.hidden_size * 2, latency_us, link_gbps)
    return allreduces_per_step(config.num_layers) * per_us / 1e3


# Qwen2.5-Instruct's generation_config.json: what a request leaving its sampling fields unset
# gets (qwenjax.generation_config), penalty included.
CHAT_DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


def sampling_batch(batch: int, mode: str, ctx: int = 0, vocab: int = 0):
    """Every row sampled as a chat request is by default ("chat": Qwen2.5-Instruct's
    generation_config, its repetition penalty over a ``ctx``-token history of random ids below
    ``vocab``, about as many distinct ids as a real prompt or more), the same without the
    penalty ("top-p"), or greedily."""
    if mode == "greedy":
        params, history = SamplingParams(temperature=0.0), 0
    elif mode == "top-p":
        params, history = SamplingParams(**{**CHAT_DEFAULTS, "repetition_penalty": 1.0}), 0
    else:
        params, history = SamplingParams(**CHAT_DEFAULTS), ctx
    rng = np.random.default_rng(0)
    rows = [SamplingRow(params=params, seed=i, step=0, prompt_ids=rng.integers(vocab, size=history))
            for i in range(batch)]
    return jax.tree.map(jnp.asarray, build_sampling_batch(rows, batch))


def time_steps(step_loop, weights, cache, tokens, steps: int, reps: int) -> tuple[float, object, object]:
    """Median seconds per step of ``step_loop(weights, cache, tokens) → (cache, out)`` (``steps``
    steps in one call), compiled with the cache donated as serving does; after one untimed call
    (compile + warm-up). Returns (seconds, the run, the cache after the last call)."""
    run = jax.jit(step_loop, donate_argnums=(1,))
    cache, _ = run(weights, cache, tokens)
    jax.block_until_ready(cache)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        cache, out = run(weights, cache, tokens)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / steps, run, cache


def bench_batch(model: Model, weights, shard, batch: int, ctx: int, steps: int, page_size: int,
                dtype, reps: int, sampling: str = "chat", profile: str | None = None,
                kv_cache_dtype: str = "auto") -> dict:
    # With LoRA stacks in the weights, rows take adapters 1, 2, … in turn (every slot in use).
    slots = 0 if weights.lora is None else weights.lora[0].o_b.shape[0] - 1
    lora_ids = None if not slots else jnp.arange(batch, dtype=jnp.int32) % slots + 1
    pages_per_seq = -(-(ctx + steps) // page_size)
    cache = KVCache.create(num_layers=shard.num_layers, kv_heads=shard.num_kv_heads,
                           head_dim=shard.head_dim, num_pages=batch * pages_per_seq,
                           page_size=page_size, dtype=dtype, mesh=model.mesh,
                           kv_cache_dtype=kv_cache_dtype)
    block_tables = jnp.arange(batch * pages_per_seq, dtype=jnp.int32).reshape(batch, pages_per_seq)
    rows = sampling_batch(batch, sampling, ctx, shard.vocab_size)

    def decode(weights, cache, tokens):
        # The engine's step program and its sampler, `steps` times in one program.
        def step(i, carry):
            cache, tokens = carry
            pos = jnp.full((batch, 1), ctx, jnp.int32) + i
            logits, cache = model.last_logits(
                weights, cache, StepBatch(tokens, pos, pos[:, 0] + 1, block_tables, lora_ids))
            return cache, sample(logits, rows).token_ids[:, None]

        return jax.lax.fori_loop(0, steps, step, (cache, tokens))

    tokens = jnp.zeros((batch, 1), jnp.int32)
    seconds, run, cache = time_steps(decode, weights, cache, tokens, steps, reps)
    weight_bytes = decode_weight_bytes(weights)
    kv_token = shard.num_layers * shard.num_kv_heads * 2 * kv_bytes_per_vector(
        shard.head_dim, dtype, kv_cache_dtype)
    kv_bytes = batch * (ctx + steps / 2) * kv_token
    result = dict(batch=batch, ctx=ctx, seconds_per_step=seconds, weight_bytes=weight_bytes,
                  kv_bytes=kv_bytes)
    if profile:
        summary = profile_call(lambda: run(weights, cache, tokens), out=profile)
        result["profile"] = {k: summary[k] for k in ("busy_us", "span_us", "idle_fraction", "by_kind_us")}
        print(format_profile(summary), flush=True)
    return result


def bench_verify(model: Model, weights, shard, batch: int, ctx: int, k: int, steps: int,
                 page_size: int, dtype, reps: int, sampling: str = "chat",
                 kv_cache_dtype: str = "auto") -> float:
    """Seconds per step that checks ``k`` drafts for each of ``batch`` sequences at ``ctx``: one
    packed chunk of 1 + k tokens per sequence (paged K/V writes, blockwise attention), logits and
    the sampler at every position, ``steps`` times inside one program."""
    n = 1 + k
    pages_per_seq = -(-(ctx + n) // page_size)
    cache = KVCache.create(num_layers=shard.num_layers, kv_heads=shard.num_kv_heads,
                           head_dim=shard.head_dim, num_pages=batch * pages_per_seq,
                           page_size=page_size, dtype=dtype, mesh=model.mesh,
                           kv_cache_dtype=kv_cache_dtype)
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    cols = np.tile(np.arange(n), batch)
    positions = ctx + cols
    chunk = PackedChunks(
        tokens=i32(np.zeros(batch * n)), positions=i32(positions), token_rows=i32(np.repeat(np.arange(batch), n)),
        token_cols=i32(cols), row_tokens=i32(np.arange(batch * n).reshape(batch, n)),
        row_positions=i32(positions.reshape(batch, n)), seq_lens=i32(np.full(batch, ctx + n)),
        block_tables=i32(np.arange(batch * pages_per_seq).reshape(batch, pages_per_seq)),
        last_token=i32(np.arange(batch) * n + n - 1))
    rows = sampling_batch(batch * n, sampling, ctx, shard.vocab_size)

    def verify(weights, cache, tokens):
        def step(i, carry):
            cache, tokens = carry
            hidden, cache = model.hidden_states(weights, cache, (dataclasses.replace(chunk, tokens=tokens),))
            return cache, sample(model.logits(weights, hidden[0]), rows).token_ids

        return jax.lax.fori_loop(0, steps, step, (cache, chunk.tokens))

    return time_steps(verify, weights, cache, chunk.tokens, steps, reps)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-72b")
    p.add_argument("--shard-of-tp", type=int, default=4)
    p.add_argument("--batch", default="1,8,32,64")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32, help="decode steps inside one program")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quantization", default=None, choices=["fp8", "int4", "int8"],
                   help="fp8: projection weights in float8_e4m3fn with per-channel scales; "
                        "int4/int8: integer codes with a scale and zero point per 128 inputs "
                        "(AWQ/GPTQ's layout); activations stay in --dtype")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="fp8: KV pages in e4m3 with a scale per token and head")
    p.add_argument("--lora", type=int, default=0, metavar="N",
                   help="N random LoRA adapters resident, rows spread over them (the cost of "
                        "serving adapters: every step computes all N)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--bandwidth-gib", type=float, default=4.0, help="array size for the HBM read test")
    p.add_argument("--link-gbps", type=float, default=450.0,
                   help="per-direction link bandwidth per device for the collective model (NVLink-4: 450)")
    p.add_argument("--link-latency-us", type=float, default=8.0, help="all-reduce latency (NVLink-4 ≈ 8 µs)")
    p.add_argument("--attention", default="auto", choices=["auto", "pallas", "xla"],
                   help="decode attention: auto = the Pallas kernel on GPUs (as the engine)")
    p.add_argument("--sampling", default="chat", choices=["chat", "top-p", "greedy"],
                   help="the sampler in the loop: chat = what a chat request gets by default "
                        "(Qwen2.5-Instruct's generation_config: temperature 0.7, top-p 0.8, "
                        "top-k 20, repetition penalty 1.05 over the ctx-token history); top-p = "
                        "the same without the penalty")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="trace one more run of the first batch size with jax.profiler: writes "
                        "PATH.trace.json.gz and PATH.json and prints where the device time went")
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="also time the step checking K speculative drafts per sequence")
    p.add_argument("--verify-batch", default="1", help="batch sizes for --verify")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--smoke", action="store_true", help="tiny shapes for a CPU check")
    args = p.parse_args(argv)

    config = preset(args.preset)
    if args.smoke:
        config = dataclasses.replace(preset("qwen2.5-0.5b"), num_layers=2)
        args.batch, args.ctx, args.steps, args.reps, args.bandwidth_gib = "1,2", 40, 2, 1, 0.01
        args.verify, args.verify_batch = args.verify and 2, "1"
    dtype = jnp.dtype(args.dtype)
    shard, model, weights = shard_model(config, args.shard_of_tp, dtype, args.attention,
                                        args.quantization)
    if args.lora:
        from qwenjax.lora import random_lora

        weights = dataclasses.replace(weights, lora=random_lora(
            model.layout, model.mesh, dtype, args.lora, args.lora_rank))
    bandwidth = measure_read_bandwidth(int(args.bandwidth_gib * 2**30), reps=max(args.reps, 3))

    device = jax.devices()[0]
    header = dict(date=datetime.date.today().isoformat(), jax=jax.__version__, device=device.device_kind,
                  platform=device.platform, model=config.name, shard_of_tp=args.shard_of_tp,
                  shard=dict(q_heads=shard.num_heads, kv_heads=shard.num_kv_heads,
                             mlp=shard.intermediate_size, vocab=shard.vocab_size,
                             layers=shard.num_layers),
                  dtype=args.dtype, quantization=args.quantization,
                  kv_cache_dtype=args.kv_cache_dtype, lora=args.lora, lora_rank=args.lora_rank,
                  attention=args.attention,
                  sampling=args.sampling,
                  measured_read_tbps=bandwidth / 1e12,
                  collective_model=dict(link_gbps=args.link_gbps, latency_us=args.link_latency_us,
                                        all_reduces_per_step=2 * config.num_layers + 1))
    print(f"# decode: {config.name} shard of TP{args.shard_of_tp} on {device.device_kind} "
          f"(jax {jax.__version__}, {args.dtype}{', fp8 weights' if args.quantization else ''}"
          f"{', fp8 KV' if args.kv_cache_dtype == 'fp8' else ''}, "
          f"{header['date']})")
    print(f"# shard: {header['shard']}; measured HBM read {bandwidth / 1e12:.2f} TB/s")
    print("| batch | ctx | ms/step (measured) | weights GB | KV GB | TB/s | MBU | "
          "collectives ms (modeled) | tok/s per seq (modeled) | tok/s total (modeled) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for i, batch in enumerate(int(b) for b in args.batch.split(",")):
        r = bench_batch(model, weights, shard, batch, args.ctx, args.steps, args.page_size, dtype,
                        args.reps, args.sampling, args.profile if i == 0 else None,
                        args.kv_cache_dtype)
        moved = r["weight_bytes"] + r["kv_bytes"]
        r["tbps"] = moved / r["seconds_per_step"] / 1e12
        r["mbu"] = moved / r["seconds_per_step"] / bandwidth
        r["collectives_ms_modeled"] = modeled_collectives_ms(config, args.shard_of_tp, batch,
                                                             args.link_gbps, args.link_latency_us)
        step_ms = r["seconds_per_step"] * 1e3 + r["collectives_ms_modeled"]
        r["tok_s_per_seq_modeled"] = 1e3 / step_ms
        r["tok_s_total_modeled"] = batch * 1e3 / step_ms
        rows.append(r)
        write_results(args.json, header, rows)  # after every row: a run cut short keeps them
        print(f"| {batch} | {args.ctx} | {r['seconds_per_step'] * 1e3:.2f} | {r['weight_bytes'] / 1e9:.2f} | "
              f"{r['kv_bytes'] / 1e9:.2f} | {r['tbps']:.2f} | {r['mbu']:.0%} | "
              f"{r['collectives_ms_modeled']:.2f} | {r['tok_s_per_seq_modeled']:.1f} | "
              f"{r['tok_s_total_modeled']:.0f} |", flush=True)
    verify_batches = [int(b) for b in args.verify_batch.split(",")] if args.verify else []
    if verify_batches:
        print(f"\n# checking {args.verify} drafts per sequence (speculative decoding) vs a decode step")
        print("| batch | ms/step checking drafts | decode ms/step | ratio = tokens a step must yield to pay |")
        print("|---|---|---|---|")
    for batch in verify_batches:
        seconds = bench_verify(model, weights, shard, batch, args.ctx, args.verify, args.steps,
                               args.page_size, dtype, args.reps, args.sampling, args.kv_cache_dtype)
        decode = next((r["seconds_per_step"] for r in rows if r["batch"] == batch), None)
        if decode is None:
            decode = bench_batch(model, weights, shard, batch, args.ctx, args.steps, args.page_size,
                                 dtype, args.reps, args.sampling,
                                 kv_cache_dtype=args.kv_cache_dtype)["seconds_per_step"]
        header.setdefault("verify", []).append(dict(batch=batch, k=args.verify, seconds_per_step=seconds,
                                                    decode_seconds_per_step=decode))
        write_results(args.json, header, rows)
        print(f"| {batch} | {seconds * 1e3:.2f} | {decode * 1e3:.2f} | {seconds / decode:.2f} |", flush=True)
    write_results(args.json, header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
