"""Plot MBU against batch size from scripts/bench_decode.py JSON results (one line per file).

    python scripts/plot_mbu.py gpu-out/decode_tp4.json gpu-out/decode_tp8.json --out docs/mbu.png
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="bench_decode.py --json files")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    devices = set()
    for path in args.results:
        with open(path) as f:
            result = json.load(f)
        rows = sorted(result["rows"], key=lambda r: r["batch"])
        label = f"{result['model']} shard of TP{result['shard_of_tp']}, ctx {rows[0]['ctx']}"
        ax.plot([r["batch"] for r in rows], [100 * r["mbu"] for r in rows], marker="o", label=label)
        devices.add(f"{result['device']}, jax {result['jax']}, {result['date']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences decoding)")
    ax.set_ylabel("MBU (% of measured HBM read bandwidth)")
    ax.set_ylim(0, 105)
    ax.axhline(85, color="grey", linestyle="--", linewidth=1, label="target at batch 32 (85%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("; ".join(sorted(devices)), fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
