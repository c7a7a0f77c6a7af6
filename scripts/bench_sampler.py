"""The sampler's device time per step (``qwenjax.sampling.sample``) over a [rows, vocab] logits
batch, for the truncation settings requests bring:

- greedy: argmax only (the all-greedy step skips the truncation);
- top_k 20, top_p 0.8 (Qwen2.5-Instruct's generation_config): candidates from ``lax.top_k``;
- top_p 0.9 with top_k off, and top_k 1000 with top_p 0.95: the whole vocabulary, by
  bisection (``_bisected_threshold``); "sort" times the descending sort it replaced.

Each figure is one jitted program sampling ``--iters`` times (fresh logits each time), divided
by ``--iters``: device time, not Python dispatch.

    python scripts/bench_sampler.py --rows 64,256          # a GPU
    python scripts/bench_sampler.py --smoke                # CPU, seconds (tests)
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

CASES = {  # name: (temperature, top_k, top_p)
    "greedy": (0.0, 0, 1.0),
    "top_k 20, top_p 0.8": (0.7, 20, 0.8),
    "top_p 0.9": (0.8, 0, 0.9),
    "top_k 1000, top_p 0.95": (0.8, 1000, 0.95),
}


def _sort_threshold(scaled, top_p):
    """What the whole-vocabulary rows did before bisection: a descending sort."""
    from qwenjax.sampling import _threshold_from_sorted

    vocab = scaled.shape[1]
    return _threshold_from_sorted(-jnp.sort(-scaled, axis=-1), jnp.full(top_p.shape, vocab), top_p)


def measure(rows: int, vocab: int, iters: int, case: str | None) -> float:
    """ms per call: ``sample`` with ``CASES[case]``, or the sort (case None)."""
    from qwenjax.sampling import SamplingParams, SamplingRow, build_sampling_batch, sample

    rng = np.random.default_rng(0)
    logits = jnp.asarray((rng.standard_normal((rows, vocab)) * 3).astype(np.float32))
    temperature, top_k, top_p = CASES[case or "top_p 0.9"]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    batch = build_sampling_batch([SamplingRow(params, seed=i, step=0) for i in range(rows)], rows)
    batch = jax.tree.map(jnp.asarray, batch)

    def body(i, total):
        shifted = logits + i.astype(jnp.float32) * 1e-3  # not loop-invariant
        if case is None:
            return total + jnp.sum(_sort_threshold(shifted / temperature, batch.top_p))
        return total + jnp.sum(sample(shifted, batch).token_ids)

    run = jax.jit(lambda: jax.lax.fori_loop(0, iters, body, jnp.zeros((), jnp.float32)))
    jax.block_until_ready(run())  # compile
    start = time.perf_counter()
    jax.block_until_ready(run())
    return (time.perf_counter() - start) / iters * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="64,256", help="comma-separated sampler rows")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="small shapes, CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.vocab, args.iters = "4", 4096, 2

    from qwenjax.benchmarking import write_results

    device = jax.devices()[0]
    header = dict(date=datetime.date.today().isoformat(), jax=jax.__version__,
                  device=device.device_kind, vocab=args.vocab, iters=args.iters)
    print(f"# sampler ms per step, vocab {args.vocab}, {device.device_kind}, jax {jax.__version__}, "
          f"{header['date']}")
    print("| rows | " + " | ".join(CASES) + " | sort (top_p 0.9) |")
    print("|---" * (len(CASES) + 2) + "|")
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        row = dict(rows=rows, **{case: measure(rows, args.vocab, args.iters, case) for case in CASES})
        row["sort"] = measure(rows, args.vocab, args.iters, None)
        results.append(row)
        write_results(args.json, header, results)
        print(f"| {rows} | " + " | ".join(f"{row[c]:.2f}" for c in CASES) + f" | {row['sort']:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
