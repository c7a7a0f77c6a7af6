"""scripts/bench_decode.py runs end to end (tiny shapes on CPU) and reports consistent figures."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_decode.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_figures(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "decode.json"
    assert bench.main(["--smoke", "--json", str(out), "--verify", "4"]) == 0
    result = json.loads(out.read_text())
    [verify] = result["verify"]  # the smoke run checks 2 drafts at batch 1
    assert (verify["batch"], verify["k"]) == (1, 2) and verify["seconds_per_step"] > 0
    assert verify["decode_seconds_per_step"] == result["rows"][0]["seconds_per_step"]
    assert result["shard"] == {"q_heads": 4, "kv_heads": 1, "mlp": 1216, "vocab": 37984, "layers": 2}
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["seconds_per_step"] > 0
        assert abs(row["mbu"] - row["tbps"] * 1e12 / (result["measured_read_tbps"] * 1e12)) < 1e-9
        # Modeled collectives: (2 layers × 2 + 1) all-reduces at ≥ 8 µs each.
        assert row["collectives_ms_modeled"] >= 5 * 8e-3
    assert "| 2 | 40 |" in capsys.readouterr().out


def test_fp8_smoke_run_moves_about_half_the_weight_bytes(tmp_path):
    """The same shard with fp8 projections: the bytes a step reads fall to the fp8 values, their
    scales and the float32 rest (norms, biases, lm_head), as summed from the arrays."""
    bench = _load()
    runs = {}
    for name, extra in (("dense", []), ("fp8", ["--quantization", "fp8"])):
        out = tmp_path / f"{name}.json"
        assert bench.main(["--smoke", "--dtype", "float32", "--json", str(out), *extra]) == 0
        runs[name] = json.loads(out.read_text())
    assert runs["fp8"]["quantization"] == "fp8" and runs["dense"]["quantization"] is None
    dense, fp8 = runs["dense"]["rows"][0]["weight_bytes"], runs["fp8"]["rows"][0]["weight_bytes"]
    from qwenjax.config import preset
    from qwenjax.parallel import one_device_shard
    import dataclasses

    shard = one_device_shard(dataclasses.replace(preset("qwen2.5-0.5b"), num_layers=2), 4)
    d, e = shard.head_dim, shard.hidden_size
    projections = 2 * (e * (shard.num_heads + 2 * shard.num_kv_heads) * d + shard.num_heads * d * e
                       + 3 * e * shard.intermediate_size)
    scales = 2 * ((shard.num_heads + 2 * shard.num_kv_heads) * d + e + 2 * shard.intermediate_size + e)
    # The 0.5B ties its embedding: the logits read the whole table, so it counts in both.
    assert dense - fp8 == 3 * projections - 4 * scales


def test_int4_smoke_run_counts_half_a_byte_per_code(tmp_path):
    """int4 projections: half a byte per code (XLA packs them; jax's nbytes says one), plus a
    float32 scale and a 4-bit zero point per group: groups of 128 inputs for qkv and gate_up,
    one head's 64 for o (0.5B's head_dim), 64 for down (1216 MLP columns on the shard)."""
    bench = _load()
    runs = {}
    for name, extra in (("dense", []), ("int4", ["--quantization", "int4"])):
        out = tmp_path / f"{name}.json"
        assert bench.main(["--smoke", "--dtype", "float32", "--json", str(out), *extra]) == 0
        runs[name] = json.loads(out.read_text())
    dense, int4 = runs["dense"]["rows"][0]["weight_bytes"], runs["int4"]["rows"][0]["weight_bytes"]
    h, k, d, e, mlp = 4, 1, 64, 896, 1216
    codes = e * (h + 2 * k) * d + h * d * e + 3 * e * mlp
    groups = e // 128 * (h + 2 * k) * d + h * e + e // 128 * 2 * mlp + mlp // 64 * e
    assert dense - int4 == 2 * (codes * 3.5 - groups * 4.5)


def test_fp8_kv_smoke_run_counts_values_and_scales(tmp_path):
    bench = _load()
    out = tmp_path / "kv.json"
    assert bench.main(["--smoke", "--json", str(out), "--kv-cache-dtype", "fp8"]) == 0
    result = json.loads(out.read_text())
    assert result["kv_cache_dtype"] == "fp8"
    row = result["rows"][-1]
    assert row["batch"] == 2
    # 2 layers × 1 KV head (0.5B at TP4) × (K, V) × (64 e4m3 bytes + a 4-byte scale) per token.
    assert row["kv_bytes"] == 2 * (40 + 2 / 2) * (2 * 1 * 2 * 68)


def test_lora_smoke_run_counts_the_adapter_stacks(tmp_path):
    """--lora 2: two random rank-4 adapters resident, rows on both; their stacks are read by every
    step, so the weight bytes grow by exactly their size."""
    bench = _load()
    runs = {}
    for name, extra in (("base", []), ("lora", ["--lora", "2", "--lora-rank", "4"])):
        out = tmp_path / f"{name}.json"
        assert bench.main(["--smoke", "--dtype", "float32", "--json", str(out), *extra]) == 0
        runs[name] = json.loads(out.read_text())
    assert (runs["lora"]["lora"], runs["lora"]["lora_rank"]) == (2, 4)
    from qwenjax.config import preset
    from qwenjax.parallel import one_device_shard
    import dataclasses

    s = one_device_shard(dataclasses.replace(preset("qwen2.5-0.5b"), num_layers=2), 4)
    d, e, m = s.head_dim, s.hidden_size, s.intermediate_size
    per_slot = (e * 3 * 4 + 4 * (s.num_heads + 2 * s.num_kv_heads) * d + s.num_heads * d * 4 + 4 * e
                + e * 2 * 4 + 4 * 2 * m + m * 4 + 4 * e)
    grown = runs["lora"]["rows"][0]["weight_bytes"] - runs["base"]["rows"][0]["weight_bytes"]
    assert grown == 2 * 3 * per_slot * 4  # 2 layers × 3 slots (one empty) × float32


def test_collective_model_numbers():
    bench = _load()
    from qwenjax.config import preset

    c = preset("qwen2.5-72b")
    # 161 all-reduces × (8 µs + 1.5 × 16 KiB / 450 GB/s) ≈ 1.30 ms per token at TP4, batch 1.
    ms = bench.modeled_collectives_ms(c, 4, 1, 450.0, 8.0)
    assert abs(ms - 161 * (8e-3 + 1.5 * 8192 * 2 / 450e9 * 1e3)) < 1e-9
    assert 1.2 < ms < 1.4
    assert bench.modeled_collectives_ms(c, 1, 1, 450.0, 8.0) == 0.0


def test_mbu_plot_from_results(tmp_path):
    bench = _load()
    out = tmp_path / "decode.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    spec = importlib.util.spec_from_file_location("plot_mbu", SCRIPT.parent / "plot_mbu.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    png = tmp_path / "mbu.png"
    assert plot.main([str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_summarizes_where_the_device_time_went(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "decode.json"
    profile = tmp_path / "decode_profile"
    assert bench.main(["--smoke", "--json", str(out), "--profile", str(profile)]) == 0
    summary = json.loads((tmp_path / "decode_profile.json").read_text())
    assert (tmp_path / "decode_profile.trace.json.gz").stat().st_size > 0
    assert 0 < summary["busy_us"] <= summary["span_us"]
    assert 0 <= summary["idle_fraction"] < 1
    assert summary["by_kind_us"]["matmul"] > 0  # the projections, found by name
    kernels = summary["kernels"]
    assert kernels and all(a["total_us"] >= b["total_us"] for a, b in zip(kernels, kernels[1:]))
    first = json.loads(out.read_text())["rows"][0]
    assert first["profile"]["busy_us"] == summary["busy_us"]
    assert "| kernel | kind | calls | total ms | share |" in capsys.readouterr().out


def test_kernel_kinds():
    from qwenjax.benchmarking import kernel_kind

    assert kernel_kind("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "collective"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "matmul"
    assert kernel_kind("nvjet_tst_64x8_64x16_4x1_v_bz_TNT") == "matmul"
    assert kernel_kind("paged_decode_attention") == "attention"
    assert kernel_kind("copy_fusion.3") == "copy"
    assert kernel_kind("loop_multiply_fusion") == "other"
