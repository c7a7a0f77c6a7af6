"""Engine throughput and start-up on the real Qwen2.5-Coder-0.5B-Instruct.

    python scripts/bench_engine.py                 # everything below, markdown table + --json
    python scripts/bench_engine.py --only engine   # one part: engine | hf | startup | prefix

- engine: ``LLM.chat`` on 16 chat prompts, every request generating exactly
  ``--max-tokens`` tokens (ignore_eos), continuous batching, greedy.
- hf: transformers ``generate`` on the same 16 prompts as one static batch
  (left padding), exactly the same number of new tokens, same dtype and threads.
- prefix: the 16 questions under one long shared system prompt (~``--prefix-tokens``),
  the first request alone and then the other 15 at once, with prefix caching on and
  off (same loaded weights): TTFT and wall time of the 15, and the tokens reused.
- startup: two fresh processes building the engine (model load + ahead-of-time
  compilation of every shape bucket): the first with an empty compilation cache
  (cold), the second reusing it (warm).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

QUESTIONS = [
    "What is the capital of France?", "Write a Python function that reverses a string.",
    "Explain what a hash map is.", "Name three primary colors.", "What is 17 times 23?",
    "Translate 'good morning' into Spanish.", "Write a haiku about the sea.",
    "What does HTTP stand for?", "Give me a SQL query that counts rows in a table.",
    "Why is the sky blue?", "Write a bash loop that prints 1 to 10.", "What is recursion?",
    "List four prime numbers.", "Explain big-O notation briefly.", "What is a linked list?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


def _messages():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


def bench_engine(args) -> dict:
    from qwenjax import LLM, SamplingParams

    # Every shape compiled before timing (CPU defaults to compiling on first use).
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=len(QUESTIONS), max_prefill_seqs=4, prefill_chunk=args.prefill_chunk,
              progress=False, warm_up=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.chat(_messages(), params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    ttft = sorted(o.metrics.ttft for o in outputs)
    return dict(seconds=seconds, output_tokens=tokens, tokens_per_s=tokens / seconds,
                ttft_median_s=ttft[len(ttft) // 2], dtype=llm.lm.dtype)


def bench_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenjax.model_fetch import fetch_default_model

    directory = args.model or fetch_default_model(progress=False)
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or "float32"]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in _messages()]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
                  temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(**tokenizer(texts[:2], return_tensors="pt", padding=True), max_new_tokens=4,
                       do_sample=False, temperature=None, top_p=None, top_k=None)
        start = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        seconds = time.perf_counter() - start
    tokens = (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]
    return dict(seconds=seconds, output_tokens=tokens, tokens_per_s=tokens / seconds,
                torch=torch.__version__, threads=torch.get_num_threads())


def _system_prompt(tokens: int, first_rule: int = 100) -> str:
    rule = ("Rule {i}: answer in plain English, keep code examples short and runnable, say when "
            "you are unsure, and never invent an API that does not exist. ")
    text, i = "", first_rule
    while len(text) < tokens * 4:  # ~4 characters per token for English text
        text += rule.format(i=i)
        i += 1
    return "You are a helpful coding assistant. " + text


def bench_prefix(args) -> dict:
    from qwenjax import LLM, SamplingParams
    from qwenjax.loading import load_model

    lm = load_model(args.model, dtype=args.dtype)

    def chats(first_rule):
        system = _system_prompt(args.prefix_tokens, first_rule)
        return [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in QUESTIONS]

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    # A rehearsal with another system prompt of the same length compiles the step shapes the
    # measured run uses (cheaper than compiling every bucket up front).
    rehearsal, measured = chats(100), chats(200)
    longest = max(len(lm.tokenizer.encode_chat(c)) for c in rehearsal + measured)
    results = {"prompt_tokens": len(lm.tokenizer.encode_chat(measured[0]))}
    for enable in (True, False):
        llm = LLM(lm, max_model_len=max(args.max_model_len, longest + params.max_tokens),
                  max_num_seqs=len(QUESTIONS), max_prefill_seqs=4, prefill_chunk=args.prefill_chunk,
                  enable_prefix_caching=enable, progress=False, warm_up=False)
        llm.chat(rehearsal[:1], params, use_tqdm=False)
        llm.chat(rehearsal[1:], params, use_tqdm=False)
        first = llm.chat(measured[:1], params, use_tqdm=False)[0]
        start = time.perf_counter()
        rest = llm.chat(measured[1:], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        ttft = sorted(o.metrics.ttft for o in rest)
        results["on" if enable else "off"] = dict(
            first_ttft_s=first.metrics.ttft, seconds=seconds, ttft_median_s=ttft[len(ttft) // 2],
            ttft_max_s=ttft[-1], cached_tokens=sum(o.num_cached_tokens for o in rest))
        del llm
    return results


def _startup_child(args) -> None:
    """Runs in a subprocess: build the engine and report how long each part took."""
    from qwenjax import LLM

    start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=len(QUESTIONS), max_prefill_seqs=4, prefill_chunk=args.prefill_chunk,
              progress=False, warm_up=True)
    total = time.perf_counter() - start
    print(json.dumps(dict(total_s=total, warm_up_s=llm.engine.warm_up_seconds,
                          shapes=len(llm.engine.runner.shapes()))))


def bench_startup(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
        for phase in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--startup-child", "--max-model-len", str(args.max_model_len),
                   "--prefill-chunk", str(args.prefill_chunk)]
            if args.model:
                cmd += ["--model", args.model]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory (default: the fetched 0.5B)")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="engine prefill chunk (buckets: chunk/8 and chunk)")
    p.add_argument("--prefix-tokens", type=int, default=600, help="shared system prompt (prefix part)")
    p.add_argument("--only", choices=["engine", "hf", "startup", "prefix"], default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--startup-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.startup_child:
        _startup_child(args)
        return 0

    import jax

    header = dict(date=datetime.date.today().isoformat(), jax=jax.__version__,
                  device=jax.devices()[0].device_kind, cpus=os.cpu_count(),
                  prompts=len(QUESTIONS), max_tokens=args.max_tokens)
    results = dict(header)
    parts = [args.only] if args.only else ["engine", "hf", "startup", "prefix"]
    benches = {"engine": bench_engine, "hf": bench_hf, "startup": bench_startup, "prefix": bench_prefix}
    for part in parts:
        results[part] = benches[part](args)
        print(f"# {part}: {json.dumps(results[part])}", flush=True)
    print(f"\n# engine vs transformers, {len(QUESTIONS)} prompts × {args.max_tokens} new tokens, "
          f"{header['device']} ({header['cpus']} cores), jax {header['jax']}, {header['date']}")
    print("| what | figure |\n|---|---|")
    if "engine" in results:
        e = results["engine"]
        print(f"| qwenjax engine ({e['dtype']}) | {e['tokens_per_s']:.1f} output tok/s "
              f"({e['seconds']:.1f} s; median TTFT {e['ttft_median_s']:.2f} s) |")
    if "hf" in results:
        h = results["hf"]
        print(f"| transformers generate (torch {h['torch']}, {h['threads']} threads) | "
              f"{h['tokens_per_s']:.1f} output tok/s ({h['seconds']:.1f} s) |")
    if "engine" in results and "hf" in results:
        print(f"| speed-up | {results['engine']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}× |")
    if "startup" in results:
        s = results["startup"]
        for phase in ("cold", "warm"):
            print(f"| {phase} start (load + compile {s[phase]['shapes']} shapes) | {s[phase]['total_s']:.1f} s "
                  f"(compile {s[phase]['warm_up_s']:.1f} s) |")
    if "prefix" in results:
        r = results["prefix"]
        for key in ("on", "off"):
            x = r[key]
            print(f"| shared {r['prompt_tokens']}-token prompts, prefix caching {key}: 15 requests after the "
                  f"first | TTFT median {x['ttft_median_s']:.2f} s, max {x['ttft_max_s']:.2f} s; "
                  f"{x['seconds']:.1f} s in all; {x['cached_tokens']} tokens reused |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
