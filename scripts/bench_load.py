"""Load time and peak host RSS: orbax checkpoint vs safetensors directory, each load in a fresh process.

    python scripts/bench_load.py [--model DIR] [--dtype float32] [--tp 1 4] [--repeats 3]

Converts ``--model`` (default: the fetched Qwen2.5-Coder-0.5B-Instruct) into one orbax checkpoint
per tp under ``--work``, then for each tp times ``load_model`` (until the arrays are ready) from
the safetensors directory, from the checkpoint written for that tp (direct restore) and from the
one written for another tp (restore + on-device re-layout). Each measurement is a new Python
process (so peak RSS is that load's), on CPU with as many fake devices as the largest tp; the
page cache is warmed by one unreported load per source. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, resource, sys, time
import jax
import orbax.checkpoint  # imported before the baseline so both sources start from the same RSS
from qwenjax.loading import load_model

def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

model, tp, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
before = rss_mib()
start = time.perf_counter()
lm = load_model(model, tp=tp, dtype=dtype)
jax.block_until_ready(lm.weights)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rss_before_mib": before, "peak_rss_mib": peak}))
"""


def child_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def measure(model: Path, tp: int, dtype: str, devices: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(tp), dtype],
                         env=child_env(devices), capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"load of {model} at tp={tp} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def convert(model: Path, out: Path, tp: int, dtype: str, devices: int) -> None:
    if out.exists():
        return
    code = ("import sys; from qwenjax.orbax_checkpoint import convert_to_orbax; "
            "convert_to_orbax(sys.argv[1], sys.argv[2], tp=int(sys.argv[3]), dtype=sys.argv[4], progress=False)")
    subprocess.run([sys.executable, "-c", code, str(model), str(out), str(tp), dtype],
                   env=child_env(devices), check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF directory (default: the fetched 0.5B)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3, help="loads per row; the median is reported")
    p.add_argument("--work", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    args = p.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from qwenjax.model_fetch import fetch_default_model

        args.model = fetch_default_model(progress=False)
    work = args.work or Path(tempfile.mkdtemp(prefix="qwenjax-bench-load-"))
    devices = max(args.tp)
    ckpts = {}
    for tp in args.tp:
        ckpts[tp] = work / f"orbax-tp{tp}-{args.dtype}"
        convert(args.model, ckpts[tp], tp, args.dtype, devices)

    load_before = os.getloadavg()[0]
    rows = []
    for tp in args.tp:
        sources = [("safetensors", args.model), (f"orbax (written at tp={tp})", ckpts[tp])]
        sources += [(f"orbax (written at tp={other}, re-laid out)", ckpts[other])
                    for other in args.tp if other != tp]
        for label, path in sources:
            measure(path, tp, args.dtype, devices)  # warm the page cache; not reported
            runs = [measure(path, tp, args.dtype, devices) for _ in range(args.repeats)]
            rows.append((tp, label, statistics.median(r["seconds"] for r in runs),
                         statistics.median(r["rss_before_mib"] for r in runs),
                         statistics.median(r["peak_rss_mib"] for r in runs)))
            print(f"tp={tp} {label}: {rows[-1][2]:.2f}s", file=sys.stderr, flush=True)

    import jax

    print(f"\n{args.model.name}, {args.dtype}, {devices} fake CPU devices, jax {jax.__version__}, "
          f"median of {args.repeats} fresh processes each; 1-min load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs\n")
    print("| tp | source | load (s) | RSS before load (MiB) | peak RSS (MiB) |")
    print("|---:|---|---:|---:|---:|")
    for tp, label, seconds, before, peak in rows:
        print(f"| {tp} | {label} | {seconds:.2f} | {before:.0f} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
