"""Speculative decoding with n-gram drafts (or a draft model's) on the real Qwen2.5-Coder-0.5B-Instruct.

    python scripts/bench_spec.py                      # k = 0 (off), 2, 4, 8; markdown table
    python scripts/bench_spec.py --k 0,4 --json out.json
    python scripts/bench_spec.py --model 7B_DIR --draft-model 0.5B_DIR   # a draft model's drafts

Two workloads, greedy (or ``--temperature``, seeded), each request alone (batch 1: the latency case speculation is for) and
then all requests of the workload at once:
- edit: code-editing requests whose answer mostly repeats code from the prompt (rename a
  variable, add a docstring) — where n-gram drafts are accepted;
- chat: short questions whose answer repeats little — what drafting costs when it misses.

Each configuration runs its workload once untimed (compiling its step shapes; prefix caching
is off so that the timed run has the same shapes), then once timed. The outputs of every
configuration are checked equal to those of k = 0 (drafts never change the tokens: greedy
and seeded sampling alike).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

CODE = '''def summarize(values):
    total = 0
    count = 0
    smallest = None
    largest = None
    for value in values:
        total += value
        count += 1
        if smallest is None or value < smallest:
            smallest = value
        if largest is None or value > largest:
            largest = value
    mean = total / count if count else 0.0
    return {"total": total, "count": count, "mean": mean,
            "smallest": smallest, "largest": largest}
'''

EDIT = [
    f"Rename the variable `total` to `running_sum` in this function. Reply with the whole "
    f"function only.\n\n```python\n{CODE}```",
    f"Add a one-line docstring to this function. Reply with the whole function only.\n\n"
    f"```python\n{CODE}```",
    f"Rename the function to `describe` and keep everything else. Reply with the whole "
    f"function only.\n\n```python\n{CODE}```",
    f"Add type hints (list[float] in, dict out) to this function. Reply with the whole "
    f"function only.\n\n```python\n{CODE}```",
]
CHAT = ["What is the capital of France?", "Explain what a hash map is.",
        "Write a haiku about the sea.", "Why is the sky blue?"]


def run(llm, prompts, params, together: bool):
    """(seconds, outputs) of the prompts as chats, one at a time or all at once."""
    messages = [[{"role": "user", "content": p}] for p in prompts]
    start = time.perf_counter()
    if together:
        outputs = llm.chat(messages, params, use_tqdm=False)
    else:
        outputs = [llm.chat([m], params, use_tqdm=False)[0] for m in messages]
    return time.perf_counter() - start, outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded 0.5B)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--k", default="0,2,4,8", help="num_speculative_tokens values; 0 = off")
    p.add_argument("--draft-model", default=None,
                   help="draft with this model (same tokenizer) instead of n-grams")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (seeded: the tokens stay those of k = 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    import jax

    from qwenjax import LLM, SamplingParams
    from qwenjax.loading import load_model

    lm = load_model(args.model, dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=0,
                            max_tokens=args.max_tokens)
    rows, reference = [], {}
    for k in (int(x) for x in args.k.split(",")):
        spec = None
        if k:
            spec = ({"method": "ngram", "num_speculative_tokens": k} if args.draft_model is None
                    else {"model": args.draft_model, "num_speculative_tokens": k})
        llm = LLM(lm, max_model_len=1024, max_num_seqs=8, enable_prefix_caching=False,
                  speculative_config=spec, warm_up=False, progress=False)
        for workload, prompts in (("edit", EDIT), ("chat", CHAT)):
            for together in (False, True):
                run(llm, prompts, params, together)  # compiles this run's step shapes
                before = llm.engine.spec_stats
                drafted, accepted = before.num_draft_tokens, before.num_accepted_tokens
                seconds, outputs = run(llm, prompts, params, together)
                stats = llm.engine.spec_stats
                key = (workload, together)
                ids = [o.token_ids for o in outputs]
                reference.setdefault(key, ids)
                tokens = sum(map(len, ids))
                rows.append(dict(
                    k=k, workload=workload, batch=len(prompts) if together else 1, seconds=seconds,
                    output_tokens=tokens, tokens_per_s=tokens / seconds,
                    draft_tokens=stats.num_draft_tokens - drafted,
                    accepted=stats.num_accepted_tokens - accepted,
                    same_as_k0=ids == reference[key]))
                print(json.dumps(rows[-1]), flush=True)
    header = dict(date=datetime.date.today().isoformat(), jax=jax.__version__,
                  device=str(jax.devices()[0].device_kind), platform=platform.processor() or platform.machine(),
                  dtype=str(lm.dtype), max_tokens=args.max_tokens,
                  temperature=args.temperature, top_p=args.top_p,
                  drafts=args.draft_model or "ngram")
    base = {(r["workload"], r["batch"]): r["tokens_per_s"] for r in rows if r["k"] == 0}
    print(f"\n{header}\n")
    print("| k | workload | batch | output tok/s | vs k=0 | drafts accepted | same tokens as k=0 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rate = f"{r['accepted']}/{r['draft_tokens']}" if r["draft_tokens"] else "-"
        speedup = r["tokens_per_s"] / base[(r["workload"], r["batch"])] if base else float("nan")
        print(f"| {r['k']} | {r['workload']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
              f"{speedup:.2f}× | {rate} | {r['same_as_k0']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
