"""scripts/bench_host.py's measurement runs on a tiny engine and its figures are consistent;
scripts/bench_sampler.py's smoke run."""
import importlib.util
from pathlib import Path

from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.loading import load_model
from tiny import tiny_config, write_hf_checkpoint

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_host.py"


def test_measure_reports_engine_and_device_time(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_host", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    write_hf_checkpoint(tiny_config(vocab_size=128, max_position_embeddings=256), tmp_path)
    engine = Engine(load_model(tmp_path, dtype="float32"),
                    EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, prefill_chunk=16,
                                 max_prefill_seqs=4, max_model_len=128, num_pages=64,
                                 enable_prefix_caching=False), warm_up=False)
    for mode in ("async", "sync"):
        row = bench.measure(engine, batch=3, prompt_len=20, steps=4, mode=mode)
        assert row["batch"] == 3 and row["bucket"] == 4 and row["mode"] == mode
        assert engine.config.async_scheduling == (mode == "async")
        assert row["engine_ms"] > 0 and row["device_ms"] > 0
        assert abs(row["host_overhead"] - (1 - row["device_ms"] / row["engine_ms"])) < 1e-9
        phases = row["phases_ms"]
        assert set(phases) == {"schedule", "plan", "run", "wait", "outputs"}
        assert all(ms >= 0 for ms in phases.values()) and phases["wait"] > 0, phases
        assert not engine.has_unfinished() and engine.allocator.num_used == 0


def test_pack_timing_packs_every_rows_pages():
    """bench_host.py --pack: pack_decode alone (it checks the packed tables hold the pages)."""
    spec = importlib.util.spec_from_file_location("bench_host", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.pack_ms(batch=20, context=3000, calls=20) > 0
    assert bench.main(["--pack", "100", "--batch", "4"]) == 0


def test_bench_sampler_smoke(tmp_path):
    """scripts/bench_sampler.py (gpu_session.sh part 2) times every case and the sort."""
    import json

    spec = importlib.util.spec_from_file_location("bench_sampler", SCRIPT.parent / "bench_sampler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--json", str(tmp_path / "sampler.json")]) == 0
    [row] = json.loads((tmp_path / "sampler.json").read_text())["rows"]
    assert row["rows"] == 4 and all(row[case] > 0 for case in (*bench.CASES, "sort"))
