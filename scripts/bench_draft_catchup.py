"""The first-draft stall of speculative decoding with a draft model: the engine steps of
requests already decoding while a long prompt joins.

The draft model must have seen a request's prompt before it can draft for it. The engine now
computes the draft's K/V of each prompt chunk alongside the served model's prefill of it;
``--mode at-first-draft`` turns that off (``catch_up`` a no-op), so the whole prompt is caught
up in the step of the request's first draft, as before session 12. Steps are synchronous here,
so each step's wall time is its own.

    python scripts/bench_draft_catchup.py                       # the real 0.5B drafting for itself
    python scripts/bench_draft_catchup.py --model 7B_DIR --draft-model 0.5B_DIR --prompt-len 8192
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def scenario(engine, rng, vocab: int, args) -> tuple[list[float], list[int]]:
    """Three requests decoding with drafts, then the long prompt joins: the next steps' wall
    times and catch-up calls; then everything runs to its end."""
    from qwenjax.sampling import SamplingParams

    decoding = SamplingParams(temperature=0.0, max_tokens=40 + 3 * args.steps, ignore_eos=True)
    for n in (12, 16, 20):
        engine.add_request(rng.integers(100, vocab // 2, n).tolist(), decoding)
    for _ in range(6):
        engine.step()
    engine.add_request(rng.integers(100, vocab // 2, args.prompt_len).tolist(),
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    times, calls = [], []
    for _ in range(args.steps):
        before = engine.drafter.catchup_calls
        start = time.perf_counter()
        engine.step()
        times.append(round(time.perf_counter() - start, 3))
        calls.append(engine.drafter.catchup_calls - before)
    while engine.has_unfinished():
        engine.step()
    return times, calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded 0.5B)")
    p.add_argument("--draft-model", default=None, help="default: the served model itself")
    p.add_argument("--dtype", default=None)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk")
    p.add_argument("--steps", type=int, default=10, help="steps timed after the prompt joins")
    p.add_argument("--mode", default="alongside,at-first-draft")
    args = p.parse_args()

    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax.loading import load_model
    from qwenjax.model_fetch import fetch_default_model

    model = args.model or str(fetch_default_model(progress=False))
    lm = load_model(model, dtype=args.dtype)
    vocab = lm.config.vocab_size
    for mode in args.mode.split(","):
        engine = Engine(lm, EngineConfig(
            max_num_seqs=8, max_num_batched_tokens=2 * args.chunk, prefill_chunk=args.chunk,
            max_prefill_seqs=4, max_model_len=args.prompt_len + 1024, enable_prefix_caching=False,
            async_scheduling=False,
            speculative_config={"model": args.draft_model or model, "num_speculative_tokens": 4}),
            warm_up=False)
        if mode == "at-first-draft":
            engine.drafter.catch_up = lambda batch: None
        for _ in range(2):  # the first pass compiles every shape it meets; the second is timed
            times, calls = scenario(engine, np.random.default_rng(0), vocab, args)
        print(json.dumps({"mode": mode, "step_s": times, "catchup_calls": calls,
                          "max_step_s": max(times)}), flush=True)


if __name__ == "__main__":
    main()
