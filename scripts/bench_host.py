"""Host overhead of the engine loop: wall time of ``Engine.step()`` against the device time of the
same step, in steady-state decode.

``--batch`` requests (random prompts, ``ignore_eos``) are admitted and prefilled; then
``--steps`` decode steps are timed, for each ``--mode``:

- engine: ``Engine.step()`` end to end (schedule, pack, run the compiled step, sample, read the
  tokens back, stop checks, detokenize, outputs). ``async`` schedules and dispatches step N+1
  before reading step N back (the engine's default), so the host's work hides behind the
  device's; ``sync`` waits for each step before scheduling the next;
- device: the same compiled step program and sampler on the same packed inputs, called
  ``--steps`` times back to back with one wait at the end (dispatch overlaps device work,
  so this is the device's rate).

Host overhead = (engine − device) / engine per step (DESIGN.md's target: ≤ 5% at batch 64).
Then ``--steps`` more steps are split into phases (ms per step): schedule, plan, run
(dispatch), wait (token read-back, where the device time lands) and outputs. With ``async``
the other phases overlap the device, so ``wait`` is what is left of the device time.

    python scripts/bench_host.py --model qwen2.5-7b --batch 64        # a GPU, random weights
    python scripts/bench_host.py --smoke                              # CPU, seconds (tests)
    python scripts/bench_host.py --pack 1000,32000 --batch 64,256     # host only: packing a step

``--pack CONTEXTS`` times ``pack_decode`` alone (no model, no device): a decode step's arrays
for ``--batch`` rows at each context length (16-token pages; every 16th row gains a page
between calls, as sequences grow), the per-step host cost that grows with the context.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time

import jax
import numpy as np


def measure(engine, batch: int, prompt_len: int, steps: int, seed: int = 0,
            mode: str = "async") -> dict:
    from qwenjax.sampling import SamplingParams

    engine.config = dataclasses.replace(engine.config, async_scheduling=mode == "async")
    rng = np.random.default_rng(seed)
    vocab = engine.lm.config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps * 3 + 8, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(rng.integers(0, vocab, prompt_len).tolist(), params)
    # Until every request decodes (prefill done), then a few more steps to compile and settle.
    while any(r.num_pending > 1 for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()

    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    engine_s = (time.perf_counter() - start) / steps
    phases = host_phases(engine, steps)

    # The device side of one more decode step: its plan, run again and again.
    runner = engine.runner
    out = engine.scheduler.schedule()
    assert not out.prefill and len(out.decode) == batch, "not a pure decode step"
    plan, _ = runner.plan(out)
    jax.block_until_ready(runner.run(plan))
    start = time.perf_counter()
    for _ in range(steps):
        sampled = runner.run(plan)
    jax.block_until_ready(sampled)
    device_s = (time.perf_counter() - start) / steps
    for request in list(engine.scheduler.running):
        engine.abort(request.request_id)
    engine.step()
    return dict(batch=batch, mode=mode, bucket=plan.decode_rows, engine_ms=engine_s * 1e3,
                device_ms=device_s * 1e3, host_overhead=(engine_s - device_s) / engine_s, phases_ms=phases)


def host_phases(engine, steps: int) -> dict[str, float]:
    """Where an engine step's wall time goes, ms per step over ``steps`` more decode steps:
    schedule, plan (pack the arrays and the sampling batch), run (dispatch the step and the
    sampler), wait (read the tokens back: the device's time shows up here), outputs (stop
    checks, detokenizing, RequestOutputs)."""
    runner, scheduler = engine.runner, engine.scheduler
    totals = dict(schedule=0.0, plan=0.0, run=0.0, wait=0.0, outputs=0.0)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
        return wrapper

    originals = scheduler.schedule, runner.plan, runner.run, runner.collect
    scheduler.schedule = timed("schedule", scheduler.schedule)
    runner.plan, runner.run = timed("plan", runner.plan), timed("run", runner.run)
    runner.collect = timed("wait", runner.collect)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - start
    finally:
        scheduler.schedule, runner.plan, runner.run, runner.collect = originals
    totals["outputs"] = total - totals["schedule"] - totals["plan"] - totals["run"] - totals["wait"]
    return {name: seconds / steps * 1e3 for name, seconds in totals.items()}


def pack_ms(batch: int, context: int, calls: int = 50, page_size: int = 16) -> float:
    """Milliseconds per ``pack_decode`` of ``batch`` decode rows at ``context`` tokens."""
    from qwenjax.engine.request import Request
    from qwenjax.engine.scheduler import ScheduledChunk
    from qwenjax.engine.step_plan import pack_decode
    from qwenjax.sampling import SamplingParams

    pages = -(-context // page_size)
    width = pages + calls + 1  # room for the pages added while timing
    requests = []
    for i in range(batch):
        request = Request(str(i), list(range(16)), SamplingParams(), 0, 0.0)
        request.output_ids = list(range(context - 16))
        request.pages = list(range(i * width, i * width + pages))
        requests.append(request)
    chunks = [ScheduledChunk(r, context - 1, 1) for r in requests]
    pack_decode(chunks, batch, width)
    start = time.perf_counter()
    for _ in range(calls):
        for request in requests[::16]:
            request.pages += [0]
        arrays, _ = pack_decode(chunks, batch, width)
    elapsed = time.perf_counter() - start
    tables = arrays[3]
    assert all(tables[i, : len(r.pages)].tolist() == r.pages for i, r in enumerate(requests))
    return elapsed / calls * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-7b", help="preset (random weights) or HF directory")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch", default="64", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--mode", default="async,sync", help="comma-separated: async, sync")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="0.5B random weights, batch 4, CPU")
    p.add_argument("--pack", default=None, help="comma-separated context lengths: time packing only")
    args = p.parse_args(argv)
    if args.pack:
        print("| batch | context | pack_decode ms |\n|---|---|---|")
        for batch in (int(b) for b in args.batch.split(",")):
            for context in (int(c) for c in args.pack.split(",")):
                print(f"| {batch} | {context} | {pack_ms(batch, context):.3f} |", flush=True)
        return 0
    if args.smoke:
        args.model, args.batch, args.prompt_len, args.steps = "qwen2.5-0.5b", "4", 16, 4

    from qwenjax.benchmarking import write_results
    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax.loading import load_model

    lm = load_model(args.model, dtype=args.dtype)
    batches = [int(b) for b in args.batch.split(",")]
    config = EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=max(512, args.prompt_len),
                          prefill_chunk=max(512, args.prompt_len) if not args.smoke else 16,
                          max_prefill_seqs=4, max_model_len=args.prompt_len + args.steps * 3 + 64,
                          num_pages=None, enable_prefix_caching=False)
    engine = Engine(lm, config, warm_up=False)
    device = jax.devices()[0]
    header = dict(date=datetime.date.today().isoformat(), jax=jax.__version__, device=device.device_kind,
                  model=str(args.model), dtype=lm.dtype, prompt_len=args.prompt_len, steps=args.steps)
    print(f"# host overhead: {args.model} ({lm.dtype}) on {device.device_kind}, jax {jax.__version__}, "
          f"{header['date']}")
    print("| batch | mode | engine ms/step | device ms/step | host overhead | schedule | plan | run | "
          "wait | outputs |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for batch in batches:
        for mode in args.mode.split(","):
            r = measure(engine, batch, args.prompt_len, args.steps, mode=mode)
            rows.append(r)
            write_results(args.json, header, rows)  # after every row: a run cut short keeps them
            phases = " | ".join(f"{r['phases_ms'][k]:.3f}"
                                for k in ("schedule", "plan", "run", "wait", "outputs"))
            print(f"| {batch} | {mode} | {r['engine_ms']:.2f} | {r['device_ms']:.2f} | "
                  f"{r['host_overhead']:.1%} | {phases} |", flush=True)
    write_results(args.json, header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
