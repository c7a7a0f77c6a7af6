"""Time to first token of a returning prompt: recomputed, found on the device (prefix cache),
or copied back from host memory (the host tier, ``--kv-offloading-size``).

    python scripts/bench_offload.py                    # the embedded 0.5B, a 1024-token prompt
    python scripts/bench_offload.py --model DIR --tokens 8192 --json out.json

The prompt runs once (its pages cached), then other prompts fill the pool until its pages are
evicted, then it runs again; each configuration is timed on that last run, after an untimed
round that compiles its shapes. Greedy outputs are checked equal across configurations.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded 0.5B)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--tokens", type=int, default=1024, help="prompt length")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import jax
    import numpy as np

    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax.loading import load_model
    from qwenjax.sampling import SamplingParams

    lm = load_model(args.model, dtype=args.dtype)
    page, n = 16, args.tokens
    pages = 2 * (n // page + 2)  # room for the prompt and one other of its size
    vocab = min(lm.config.vocab_size, 150_000)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, n).tolist()
    others = [rng.integers(0, vocab, n).tolist() for _ in range(2)]
    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def ttft(engine, ids) -> tuple[float, list[int], int]:
        start = time.perf_counter()
        engine.add_request(ids, greedy)
        out = None
        while engine.has_unfinished():
            out = next((o for o in engine.step() if o.finished), out)
        return time.perf_counter() - start, out.token_ids, out.num_cached_tokens

    rows = []
    for name, options in (("recomputed", dict(enable_prefix_caching=False)),
                          ("device hit", dict()),
                          ("host restore", dict(kv_offloading_size=4.0))):
        config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=512, prefill_chunk=512,
                              max_prefill_seqs=1, page_size=page, max_model_len=n + 16,
                              num_pages=pages, **options)
        engine = Engine(lm, config, warm_up=False, progress=False)
        for rounds in range(2):  # the first compiles every shape the second uses
            ttft(engine, prompt)
            if name == "host restore":
                for other in others:  # evict the prompt's pages from the device
                    ttft(engine, other)
            seconds, tokens, cached = ttft(engine, prompt)
        rows.append(dict(case=name, ttft_ms=1000 * seconds, cached_tokens=cached, tokens=tokens))
        print(json.dumps(rows[-1]), flush=True)
    header = dict(date=datetime.date.today().isoformat(), jax=jax.__version__,
                  device=str(jax.devices()[0].device_kind),
                  platform=platform.processor() or platform.machine(), dtype=str(lm.dtype),
                  prompt_tokens=n)
    same = len({tuple(r["tokens"]) for r in rows}) == 1
    print(f"\n{header}\n\n| case | TTFT (ms) | prompt tokens not recomputed |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ttft_ms']:.0f} | {r['cached_tokens']} |")
    print(f"\nsame first token in every case: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "same": same}, f, indent=1)


if __name__ == "__main__":
    main()
