"""scripts/bench_prefill.py runs end to end (tiny shapes on CPU) and counts FLOPs correctly."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_prefill.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_prefill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_figures(tmp_path):
    bench = _load()
    out = tmp_path / "prefill.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["prompt"] for r in result["rows"]] == [32, 64]
    for row in result["rows"]:
        assert row["seconds"] > 0
        assert abs(row["mfu_measured"] * result["measured_gemm_tflops"] - row["tflops"]) < 1e-6 * row["tflops"] + 1e-12
        assert row["ttft_ms_modeled"] >= row["seconds"] * 1e3


def test_flop_count_of_the_72b_tp4_shard():
    bench = _load()
    from qwenjax.config import preset
    from qwenjax.parallel import one_device_shard

    shard = one_device_shard(preset("qwen2.5-72b"), 4)
    # ~70B non-embedding parameters / 4 → ~35 GFLOP per token for the matmuls.
    per_token = bench.prefill_flops(shard, 1) - 2 * 2 * 80 * shard.num_heads * 128
    assert 33e9 < per_token < 37e9
    # Attention grows quadratically: doubling the prompt more than doubles the FLOPs.
    assert bench.prefill_flops(shard, 32768) > 2.2 * bench.prefill_flops(shard, 16384)
