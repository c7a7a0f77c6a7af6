"""Paged decode attention benchmark: our Pallas kernel vs jax's bundled Pallas-Triton
paged_attention vs the XLA reference, on one GPU's shard of Qwen2.5-72B.

Head configs stand for one device of a TP group (DESIGN.md "Performance method"):
72B has 64 q / 8 KV heads, so TP8 leaves 8 q / 1 KV per GPU and TP4 16 q / 2 KV.

Timing rule (DESIGN.md): one small jitted call measures Python dispatch, so each
measurement is one jitted program that chains `--layers` attention calls, each
reading its own pages of one shared pool (like the layers of a model step), timed
over several repetitions after warm-up. Small cases get more layers so the KV
working set stays well above the L2 cache (50 MiB on H100), which would otherwise
flatter the bandwidth. The HBM read bandwidth is measured in the same run with a
reduction over a >= 2 GiB array, timed the same way.

Reported per case and implementation: microseconds per attention call, KV bytes
of valid tokens read per second (TB/s), that as a fraction of the measured HBM
bandwidth, and the max |error| of one call against the XLA reference. The bundled
kernel does not scale its logits, so its time includes one multiply of q by
1/sqrt(head_dim).

    python scripts/bench_attention.py                      # all cases, bf16
    python scripts/bench_attention.py --smoke              # tiny, interpret mode, CPU
    # tuning our kernel's defaults (pages per block, split-K, Triton params):
    python scripts/bench_attention.py --impls ours --json sweep.json \
        --variants ";splits=4;splits=16;ppb=4;ppb=16,warps=8;warps=8;stages=3"
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.paged_attention import paged_decode_attention, plan_launch  # noqa: E402
from pallas_kernels.reference import paged_decode_attention_reference  # noqa: E402
from qwenjax.benchmarking import measure_read_bandwidth, median_seconds  # noqa: E402

# name -> (batch, context tokens)
CASES = {
    "b32_ctx2k": (32, 2048),
    "b128_ctx4k": (128, 4096),
    "b8_ctx32k": (8, 32768),
    "b1_ctx2k": (1, 2048),
    "b1_ctx32k": (1, 32768),
}
SMOKE_CASES = {"smoke_b2_ctx40": (2, 40), "smoke_b1_ctx64": (1, 64)}
# name -> (q heads, kv heads) on one GPU
HEADS = {"72b_tp8": (8, 1), "72b_tp4": (16, 2)}
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
IMPLS = ("ours", "bundled", "xla")


@dataclasses.dataclass(frozen=True)
class Variant:
    """Launch parameters of our kernel; None picks the kernel's default."""

    pages_per_block: int | None = None
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def parse(cls, text: str) -> "Variant":
        keys = {"ppb": "pages_per_block", "splits": "num_splits", "warps": "num_warps",
                "stages": "num_stages"}
        fields = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key.strip() not in keys:
                raise SystemExit(f"--variants: unknown key {key!r}; use one of {sorted(keys)}")
            fields[keys[key.strip()]] = int(value)
        return cls(**fields)

    def label(self) -> str:
        parts = []
        if self.pages_per_block is not None:
            parts.append(f"ppb={self.pages_per_block}")
        if self.num_splits is not None:
            parts.append(f"splits={self.num_splits}")
        parts.append(f"w{self.num_warps}s{self.num_stages}")
        return "ours[" + ",".join(parts) + "]"


def make_inputs(rng, *, batch, context, q_heads, kv_heads, head_dim, page_size, layers,
                dtype, ragged):
    """One shared page pool holding every layer's pages, in shuffled order."""
    pages_per_seq = -(-context // page_size)
    pages_per_layer = batch * pages_per_seq
    total_pages = layers * pages_per_layer
    page_ids = rng.permutation(total_pages).astype(np.int32)
    block_tables = page_ids.reshape(layers, batch, pages_per_seq)
    if ragged:
        lengths = rng.integers(context // 2, context + 1, size=batch)
    else:
        lengths = np.full(batch, context)
    key_q, key_k, key_v = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
    pool_shape = (kv_heads, total_pages, page_size, head_dim)
    return dict(
        q=jax.random.normal(key_q, (batch, q_heads, head_dim), dtype),
        k_pages=jax.random.normal(key_k, pool_shape, dtype),
        v_pages=jax.random.normal(key_v, pool_shape, dtype),
        lengths=jnp.asarray(lengths, jnp.int32),
        block_tables=jnp.asarray(block_tables),
    )


def bundled_attention(interpret: bool):
    """jax's Pallas-Triton paged_attention (deprecated in 0.11), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    except Exception as err:  # noqa: BLE001 - any failure means "skip it"
        print(f"bundled paged_attention unavailable ({type(err).__name__}: {err}); skipping it")
        return None

    def call(q, k_pages, v_pages, lengths, block_tables):
        # It takes its arguments in another order, does not scale the logits (a
        # model would fold 1/sqrt(head_dim) into q), and k_splits must divide the
        # table width.
        pages_per_seq = block_tables.shape[1]
        k_splits = math.gcd(16, pages_per_seq)
        q = (q * (1.0 / math.sqrt(q.shape[-1]))).astype(q.dtype)
        return paged_attention(q, k_pages, v_pages, block_tables, lengths,
                               k_splits=k_splits, interpret=interpret)

    return call


def chained(attention, layers):
    """One program running `layers` attention calls; each layer's output is the
    next layer's query, so none can be skipped or reordered."""

    def run(q, k_pages, v_pages, lengths, block_tables):
        x = q
        for layer in range(layers):
            x = attention(x, k_pages, v_pages, lengths, block_tables[layer])
        return x

    return jax.jit(run)


def bench_case(name, batch, context, heads_name, args, rng, impls, variants):
    q_heads, kv_heads = HEADS[heads_name]
    dtype = DTYPES[args.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes_per_token = 2 * kv_heads * args.head_dim * itemsize  # K and V
    layer_bytes = batch * context * kv_bytes_per_token
    layers = max(args.layers, min(args.max_layers, -(-args.min_working_set // layer_bytes)))
    inputs = make_inputs(rng, batch=batch, context=context, q_heads=q_heads,
                         kv_heads=kv_heads, head_dim=args.head_dim,
                         page_size=args.page_size, layers=layers, dtype=dtype,
                         ragged=args.ragged)
    valid_bytes = int(np.asarray(inputs["lengths"]).sum()) * kv_bytes_per_token
    pool_bytes = 2 * inputs["k_pages"].nbytes
    print(f"{name} {heads_name}: {layers} layers per program, K+V pool "
          f"{pool_bytes / 2**30:.2f} GiB", file=sys.stderr)
    pages_per_seq = inputs["block_tables"].shape[2]
    first_layer = (inputs["q"], inputs["k_pages"], inputs["v_pages"], inputs["lengths"],
                   inputs["block_tables"][0])
    expected = paged_decode_attention_reference(*first_layer).astype(jnp.float32)

    candidates = []
    for variant in variants:
        def ours(q, k, v, lengths, bt, variant=variant):
            return paged_decode_attention(
                q, k, v, lengths, bt, interpret=args.interpret,
                pages_per_block=variant.pages_per_block, num_splits=variant.num_splits,
                num_warps=variant.num_warps, num_stages=variant.num_stages)
        try:
            ppb, splits, _ = plan_launch(
                batch=batch, num_kv_heads=kv_heads, page_size=args.page_size,
                pages_per_seq=pages_per_seq, itemsize=itemsize,
                pages_per_block=variant.pages_per_block, num_splits=variant.num_splits)
            params = f"ppb={ppb} splits={splits}"
        except ValueError as err:  # the timed call below reports it as a failed row
            params = f"invalid: {err}"
        label = variant.label() if len(variants) > 1 else "ours"
        if "ours" in impls:
            candidates.append((label, ours, params))
    if "bundled" in impls and (bundled := bundled_attention(args.interpret)) is not None:
        candidates.append(("bundled", bundled, f"k_splits={math.gcd(16, pages_per_seq)}"))
    if "xla" in impls:
        candidates.append(("xla", paged_decode_attention_reference, "gather + softmax"))

    rows = []
    for impl, attention, params in candidates:
        row = dict(case=name, batch=batch, context=context, heads=heads_name,
                   q_heads=q_heads, kv_heads=kv_heads, impl=impl, params=params,
                   layers=layers, kv_bytes_per_call=valid_bytes, dtype=args.dtype)
        try:
            got = jax.jit(attention)(*first_layer).astype(jnp.float32)
            row["max_abs_err"] = float(jnp.max(jnp.abs(got - expected)))
            seconds = median_seconds(chained(attention, layers), *inputs.values(), reps=args.reps, warmup=2)
        except Exception as err:  # noqa: BLE001 - report and go on with the others
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            print(f"  {name} {heads_name} {impl}: FAILED {row['error']}", file=sys.stderr)
            rows.append(row)
            continue
        per_call = seconds / layers
        row["us_per_call"] = per_call * 1e6
        row["tbps"] = valid_bytes / per_call / 1e12
        rows.append(row)
    del inputs, first_layer, expected
    gc.collect()
    return rows


def markdown_table(rows, hbm_tbps) -> str:
    lines = [
        "| case | heads (q/kv) | impl | params | us/call | KV MB/call | TB/s | of HBM "
        "| max abs err |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mb = r["kv_bytes_per_call"] / 1e6
        if "error" in r:
            lines.append(f"| {r['case']} | {r['q_heads']}/{r['kv_heads']} | {r['impl']} | "
                         f"{r['params']} | failed | {mb:.4g} | | | {r['error'][:60]} |")
            continue
        lines.append(
            f"| {r['case']} | {r['q_heads']}/{r['kv_heads']} | {r['impl']} | {r['params']} | "
            f"{r['us_per_call']:.1f} | {mb:.4g} | {r['tbps']:.3f} | "
            f"{r['tbps'] / hbm_tbps:.0%} | {r['max_abs_err']:.2e} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None,
                   help=f"comma list from {sorted(CASES)} (default all; --smoke: tiny ones)")
    p.add_argument("--heads", default=",".join(HEADS), help=f"comma list from {sorted(HEADS)}")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=10, help="timed repetitions after warm-up")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list from {IMPLS}")
    p.add_argument("--variants", default="",
                   help="our kernel's launch parameters to compare, ';'-separated, e.g. "
                        "'ppb=8,splits=16,warps=4,stages=2;ppb=16' (default: kernel defaults)")
    p.add_argument("--layers", type=int, default=16, help="attention calls per timed program")
    p.add_argument("--max-layers", type=int, default=128)
    p.add_argument("--min-working-set", type=int, default=512 << 20,
                   help="bytes of KV per timed program; small cases get more layers")
    p.add_argument("--bandwidth-bytes", type=int, default=4 << 30,
                   help="size of the array read to measure HBM bandwidth")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--ragged", action="store_true",
                   help="lengths uniform in [ctx/2, ctx] instead of all ctx")
    p.add_argument("--interpret", action="store_true", help="run Pallas kernels interpreted")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, interpret mode, 2 layers, 1 rep: checks the script on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="also write results as JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.interpret = True
        args.reps = min(args.reps, 1)
        args.layers = 2
        args.max_layers = 2
        args.min_working_set = 0
        args.bandwidth_bytes = min(args.bandwidth_bytes, 16 << 20)
        args.head_dim = min(args.head_dim, 64)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cases = SMOKE_CASES if args.smoke else CASES
    names = args.cases.split(",") if args.cases else list(cases)
    for n in names:
        if n not in cases:
            raise SystemExit(f"--cases: unknown case {n!r}; choose from {sorted(cases)}")
    heads = args.heads.split(",")
    for h in heads:
        if h not in HEADS:
            raise SystemExit(f"--heads: unknown config {h!r}; choose from {sorted(HEADS)}")
    impls = tuple(args.impls.split(","))
    variants = [Variant.parse(v) for v in args.variants.split(";") if v] or [Variant()]
    if args.smoke and not args.variants:
        # Tiny contexts pick one split by default; also run the split-K + combine path.
        variants.append(Variant(pages_per_block=1, num_splits=2))

    device = jax.devices()[0]
    if device.platform == "cpu" and not args.interpret:
        print("no GPU: running the Pallas kernels in interpret mode", file=sys.stderr)
        args.interpret = True
    hbm = measure_read_bandwidth(args.bandwidth_bytes, max(args.reps, 3))
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"dtype {args.dtype}, head_dim {args.head_dim}, page_size {args.page_size}")
    print(f"measured read bandwidth: {hbm / 1e12:.3f} TB/s "
          f"(bf16 reduction over {args.bandwidth_bytes / 2**30:.2f} GiB, 10× in one program)")

    rng = np.random.default_rng(args.seed)
    rows = []

    def result() -> dict:
        out = dict(device=device.device_kind, platform=device.platform,
                   jax_version=jax.__version__, dtype=args.dtype, head_dim=args.head_dim,
                   page_size=args.page_size, hbm_read_tbps=hbm / 1e12, interpret=args.interpret,
                   results=[dict(r, frac_of_hbm=r["tbps"] * 1e12 / hbm) if "tbps" in r else r
                            for r in rows])
        if args.json:  # after every case: a run cut short by a time limit keeps what finished
            Path(args.json).write_text(json.dumps(out, indent=2))
        return out

    for name in names:
        batch, context = cases[name]
        for heads_name in heads:
            rows.extend(bench_case(name, batch, context, heads_name, args, rng, impls, variants))
            result()
    print()
    print(markdown_table(rows, hbm / 1e12))
    if args.json:
        print(f"wrote {args.json}")
    return result()


if __name__ == "__main__":
    main()
