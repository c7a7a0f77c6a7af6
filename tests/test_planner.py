"""Mesh configs and the memory/speed planner: arithmetic only, nothing compiled or allocated."""
import argparse
import json
from pathlib import Path

import pytest
import yaml

from qwenjax.config import preset
from qwenjax.mesh_config import MESH_DIR, MeshConfig, list_mesh_configs, load_mesh_config
from qwenjax.plan_cli import add_plan_parser
from qwenjax.planner import GB, GiB, KiB, plan

Q72 = preset("qwen2.5-72b")
Q05 = preset("qwen2.5-0.5b")
BOXES = ("4xh100-80gb-tp4", "8xh100-80gb-tp8", "8xa100-80gb-tp8", "4xa100-40gb-tp4",
         "8xl40s-48gb-tp8-pcie", "4xmi300x-tp4", "1xmi300x-tp1", "2xa100-80gb-tp2",
         "2x8xh100-tp16", "2x8xh100-tp8-pp2", "cpu-8")


def _raw(name: str) -> dict:
    return yaml.safe_load((MESH_DIR / f"{name}.yaml").read_text())


def _write(tmp_path: Path, raw: dict, name: str | None = None) -> Path:
    name = name or raw["name"]
    raw = dict(raw, name=name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- mesh configs ------------------------------------------------------------------------------
def test_every_box_config_loads_and_is_consistent(monkeypatch):
    monkeypatch.delenv("QWENJAX_MESH_DIR", raising=False)
    files = sorted(p.stem for p in MESH_DIR.glob("*.yaml"))
    assert set(BOXES) <= set(files)
    assert list_mesh_configs() == files
    for name in files:
        mesh = load_mesh_config(name)
        assert mesh.name == name
        assert mesh.dp * mesh.tp * mesh.pp == mesh.hosts * mesh.devices_per_host
        assert 0 < mesh.kv_cache_fraction <= 1
        assert mesh.hardware.memory_gb > 0 and mesh.hardware.hbm_read_tbps > 0
        if mesh.tp > 1:
            assert mesh.collective_link is not None
        if mesh.hosts > 1:
            assert mesh.hardware.inter_node is not None


def test_box_figures():
    h100 = load_mesh_config("4xh100-80gb-tp4")
    assert h100.hardware.hbm_read_tbps == 2.87  # measured, DESIGN.md
    assert h100.hardware.intra_node.latency_us == 8
    tp16 = load_mesh_config("2x8xh100-tp16")
    assert (tp16.hosts, tp16.devices_per_host, tp16.tp) == (2, 8, 16) and tp16.tp_spans_hosts
    assert tp16.collective_link == tp16.hardware.inter_node
    pp2 = load_mesh_config("2x8xh100-tp8-pp2")
    assert (pp2.tp, pp2.pp) == (8, 2) and not pp2.tp_spans_hosts
    assert pp2.collective_link == pp2.hardware.intra_node
    l40s = load_mesh_config("8xl40s-48gb-tp8-pcie")
    assert l40s.hardware.intra_node.bandwidth_gbps < 32  # PCIe Gen4 x16, no NVLink
    assert l40s.hardware.intra_node.latency_us > 5 * h100.hardware.intra_node.latency_us


def test_load_by_path_and_from_env_dir(tmp_path, monkeypatch):
    path = MESH_DIR / "cpu-8.yaml"
    assert load_mesh_config(path) == load_mesh_config(str(path)) == load_mesh_config("cpu-8")
    custom = _write(tmp_path, _raw("cpu-8"), name="my-box")
    monkeypatch.setenv("QWENJAX_MESH_DIR", str(tmp_path))
    assert load_mesh_config("my-box").source == str(custom)
    assert "my-box" in list_mesh_configs() and "cpu-8" in list_mesh_configs()
    with pytest.raises(FileNotFoundError, match=r"'no-such-box' not found.*known: .*4xh100-80gb-tp4"):
        load_mesh_config("no-such-box")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_mesh_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["axes"].update(tp=0), r"axes\.tp must be a positive int, got 0"),
    (lambda r: r["axes"].update(tp="8"), r"axes\.tp must be a positive int, got '8'"),
    (lambda r: r["axes"].update(tp=True), r"axes\.tp must be a positive int, got True"),
    (lambda r: r.update(page_size=16.0), r"page_size must be a positive int, got 16\.0"),
    (lambda r: r.update(kv_cache_fraction=1.5), r"kv_cache_fraction must be a number in \(0, 1\], got 1\.5"),
    (lambda r: r.update(dtype="fp8"), r"dtype must be one of bfloat16, float16, float32, got 'fp8'"),
    (lambda r: r["hardware"].update(memory_gb="80GB"), r"hardware\.memory_gb must be a positive number"),
    (lambda r: r["hardware"]["intra_node"].update(latency_us=-1),
     r"hardware\.intra_node\.latency_us must be a non-negative number, got -1"),
    (lambda r: r.update(tensor_parallel=8), r"unknown key\(s\) tensor_parallel"),
    (lambda r: r["hardware"]["intra_node"].update(bandwith_gbps=450),
     r"unknown key\(s\) hardware\.intra_node\.bandwith_gbps"),
    (lambda r: r["axes"].pop("pp"), r"missing key\(s\) axes\.pp"),
    (lambda r: r["axes"].update(dp=2),
     r"axes dp×tp×pp = 2×8×1 = 16 must equal hosts×devices_per_host = 1×8 = 8"),
    (lambda r: r.update(hosts=2, devices_per_host=4), r"hardware\.inter_node is required with hosts = 2"),
])
def test_bad_yaml_names_file_and_key(tmp_path, edit, message):
    raw = _raw("8xh100-80gb-tp8")
    edit(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(ValueError, match=message) as err:
        MeshConfig.from_yaml(path)
    assert str(err.value).startswith(f"{path}: ")


def test_tp_group_must_align_with_hosts(tmp_path):
    raw = _raw("2x8xh100-tp16")
    raw["devices_per_host"], raw["axes"] = 6, {"dp": 1, "tp": 4, "pp": 3}
    raw["hosts"] = 2
    with pytest.raises(ValueError, match=r"axes\.tp = 4 must divide devices_per_host = 6"):
        MeshConfig.from_yaml(_write(tmp_path, raw))
    raw["axes"] = {"dp": 1, "tp": 12, "pp": 1}
    raw["devices_per_host"] = 6
    raw["hosts"] = 2
    MeshConfig.from_yaml(_write(tmp_path, raw))  # 12 = two whole hosts of 6: fine
    raw["devices_per_host"], raw["hosts"], raw["axes"] = 8, 3, {"dp": 2, "tp": 12, "pp": 1}
    with pytest.raises(ValueError, match=r"axes\.tp = 12 spans hosts, so it must be a multiple of "
                                         r"devices_per_host = 8"):
        MeshConfig.from_yaml(_write(tmp_path, raw))


def test_name_must_match_file(tmp_path):
    raw = _raw("cpu-8")
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"other\.yaml: name is 'cpu-8' but the file is 'other'"):
        MeshConfig.from_yaml(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match=r"x\.yaml: the file must be a mapping, got list"):
        MeshConfig.from_yaml(path)


# ---- the planner: 72B ------------------------------------------------------------------------
def _replicated_params(config) -> int:
    return (2 * config.num_layers + 1) * config.hidden_size  # RMSNorm weights


def test_72b_on_4xh100_tp4():
    p = plan(Q72, load_mesh_config("4xh100-80gb-tp4"))
    assert p.weights_bytes_model == pytest.approx(145e9, abs=1e9)
    # 72B divides evenly at TP4 (8 KV heads, mlp 29568, vocab 152064): no padding, and
    # everything but the norms splits four ways.
    params, rep = Q72.param_count(), _replicated_params(Q72)
    assert p.weights_bytes_per_device == ((params - rep) // 4 + rep) * 2
    assert p.weights_bytes_per_device == pytest.approx(36.35e9, abs=1e9)
    assert p.weights_bytes_laid_out == p.weights_bytes_model
    assert (p.q_heads_per_device, p.kv_heads_per_device, p.mlp_per_device, p.vocab_per_device) == \
        (16, 2, 7392, 38016)
    assert p.kv_bytes_per_token == 80 * 8 * 128 * 2 * 2 == 320 * KiB
    assert p.kv_bytes_per_token_per_device == 80 * KiB
    assert p.kv_bytes_per_sequence == 10 * GiB  # one 32k sequence, model-level
    assert p.fits, p.reason
    # 72 GB budget − 36.4 weights − ~1.2 workspace leaves ~34.5 GB: ~420k tokens, 12 × 32k.
    assert 400_000 < p.kv_capacity_tokens < 440_000
    assert p.kv_capacity_tokens % 16 == 0 and p.kv_capacity_seqs == 12
    assert p.kv_capacity_tokens * p.kv_bytes_per_token_per_device <= p.kv_cache_bytes_per_device
    used = p.weights_bytes_per_device + p.workspace_bytes_per_device + p.kv_cache_bytes_per_device
    assert used == p.memory_budget_bytes_per_device == 72 * GB


def test_a_draft_model_takes_its_weights_and_a_page_for_every_page(capsys):
    mesh = load_mesh_config("4xh100-80gb-tp4")
    alone, p = plan(Q72, mesh), plan(Q72, mesh, draft=preset("qwen2.5-0.5b"))
    # The 0.5B at TP4: its 2 KV heads replicated to 4, one per device: 24 layers × K and V × 64
    # × 2 bytes per token; its weights split four ways but for the norms and biases' share.
    assert p.draft_kv_bytes_per_token_per_device == 24 * 2 * 64 * 2 == 6 * KiB
    assert 0.2 * GB < p.draft_weights_bytes_per_device < 0.3 * GB
    assert p.weights_bytes_per_device == alone.weights_bytes_per_device + p.draft_weights_bytes_per_device
    per_token = p.kv_bytes_per_token_per_device + p.draft_kv_bytes_per_token_per_device
    assert p.kv_capacity_tokens * per_token <= p.kv_cache_bytes_per_device
    assert (alone.kv_capacity_seqs, p.kv_capacity_seqs) == (12, 11)
    assert p.modeled_decode_ms == alone.modeled_decode_ms and any("draft model" in n for n in p.notes)
    with pytest.raises(ValueError, match="needs pp = 1"):
        plan(Q72, load_mesh_config("2x8xh100-tp8-pp2"), draft=preset("qwen2.5-0.5b"))
    code, out = _run_cli(["plan", "--model", "qwen2.5-72b", "--mesh", "4xh100-80gb-tp4",
                          "--speculative-model", "qwen2.5-0.5b", "--json"], capsys)
    assert code == 0 and json.loads(out)["draft_kv_bytes_per_token_per_device"] == 6 * KiB


def test_72b_at_131k_is_40_gib_per_sequence_and_flagged():
    p = plan(Q72, load_mesh_config("4xh100-80gb-tp4"), max_model_len=131072)
    assert p.kv_bytes_per_sequence == 40 * GiB
    assert p.kv_bytes_per_sequence_per_device == 10 * GiB
    assert p.kv_capacity_seqs == 3
    assert any("exceeds the model's context 32768" in n for n in p.notes)


def test_decode_model_4xh100():
    p = plan(Q72, load_mesh_config("4xh100-80gb-tp4"), context=2048)
    embed_per_device = 152064 // 4 * 8192 * 2  # gathered per token, never streamed
    streamed = p.weights_bytes_per_device - embed_per_device
    assert p.decode_weight_bytes_read == streamed
    assert streamed == pytest.approx(35.7e9, abs=0.05e9)  # DESIGN.md: one GPU's share at TP4
    assert p.decode_kv_bytes_read == 80 * KiB * 2048
    assert p.modeled_hbm_ms == pytest.approx((streamed + 80 * KiB * 2048) / 2.87e12 * 1e3)
    assert p.num_allreduces == 2 * 80 + 1
    per_us = 8 + 2 * 3 / 4 * 8192 * 2 / 450e9 * 1e6
    assert p.allreduce_us == pytest.approx(per_us)
    assert p.modeled_collective_ms == pytest.approx(161 * per_us / 1e3)
    assert p.modeled_pipeline_ms == 0
    assert p.modeled_decode_ms == pytest.approx(p.modeled_hbm_ms + p.modeled_collective_ms)
    assert 12.0 < p.modeled_hbm_ms < 13.0 and 1.2 < p.modeled_collective_ms < 1.4
    assert p.modeled_tokens_per_s == pytest.approx(1e3 / p.modeled_decode_ms)
    longer = plan(Q72, load_mesh_config("4xh100-80gb-tp4"), context=32768)
    assert longer.modeled_hbm_ms - p.modeled_hbm_ms == pytest.approx(
        80 * KiB * (32768 - 2048) / 2.87e12 * 1e3)


def test_72b_does_not_fit_4xa100_40gb():
    p = plan(Q72, load_mesh_config("4xa100-40gb-tp4"))
    assert not p.fits
    assert p.reason == "weights need 36.4 GB per device but only 36.0 GB of 40 GB × 0.9 are available"
    assert p.kv_capacity_tokens == 0 and p.kv_capacity_seqs == 0


def test_reason_names_workspace_then_kv(tmp_path):
    raw = _raw("4xa100-40gb-tp4")
    # 36.8 GB budget: the weights (36.4) fit, weights + workspace (~1.2) do not.
    p = plan(Q72, MeshConfig.from_yaml(_write(tmp_path, dict(raw, kv_cache_fraction=0.92))))
    assert not p.fits and p.reason.startswith("weights (36.4 GB) + workspace (1.2 GB) need 37.5 GB")
    # 38 GB budget: ~0.45 GB left for KV; one 32k sequence needs 80 KiB × 32768 = 2.68 GB.
    p = plan(Q72, MeshConfig.from_yaml(_write(tmp_path, dict(raw, kv_cache_fraction=0.95))))
    assert not p.fits
    assert p.reason.startswith("KV cache for one 32768-token sequence needs 2.68 GB per device")
    assert "after weights (36.4 GB) and workspace (1.2 GB)" in p.reason
    # A shorter context fits in what is left.
    p = plan(Q72, MeshConfig.from_yaml(_write(tmp_path, dict(raw, kv_cache_fraction=0.95))),
             max_model_len=4096)
    assert p.fits and p.kv_capacity_seqs >= 1


def test_72b_fits_one_mi300x():
    p = plan(Q72, load_mesh_config("1xmi300x-tp1"))
    assert p.fits, p.reason
    assert p.weights_bytes_per_device == p.weights_bytes_model
    assert p.kv_bytes_per_token_per_device == p.kv_bytes_per_token == 320 * KiB
    assert p.kv_capacity_seqs >= 2  # 172.8 − 145.4 − workspace ≈ 26 GB of KV
    assert p.num_allreduces == 0 and p.modeled_collective_ms == 0
    assert p.collective_link == "none"


def test_l40s_pcie_collectives_are_the_design_floor():
    l40s = plan(Q72, load_mesh_config("8xl40s-48gb-tp8-pcie"))
    h100 = plan(Q72, load_mesh_config("8xh100-80gb-tp8"))
    assert l40s.fits, l40s.reason
    # DESIGN.md: 8-16 ms/token on PCIe at batch 1. 161 all-reduces × (50 µs latency from
    # published 8-GPU PCIe nccl-tests + 1.1 µs for 16 KiB at 25 GB/s) = 8.2 ms: the low end.
    assert 8.0 <= l40s.modeled_collective_ms <= 16.0
    assert l40s.modeled_collective_ms > 6 * h100.modeled_collective_ms
    assert l40s.weights_bytes_per_device == h100.weights_bytes_per_device
    assert l40s.modeled_hbm_ms == pytest.approx(h100.modeled_hbm_ms * 2.87 / 0.864)


def test_tp16_replicates_kv_heads_and_uses_inter_node_link():
    tp16 = plan(Q72, load_mesh_config("2x8xh100-tp16"))
    tp8 = plan(Q72, load_mesh_config("8xh100-80gb-tp8"))
    assert (tp16.kv_replicas, tp16.kv_heads_laid_out, tp16.kv_heads_per_device) == (2, 16, 1)
    assert tp16.q_heads_per_device == 4
    assert tp16.kv_bytes_per_token_per_device == tp8.kv_bytes_per_token_per_device == 40 * KiB
    assert tp16.kv_bytes_per_token_laid_out == 2 * tp16.kv_bytes_per_token
    # Replicated K/V projections make the group store more than the checkpoint, so a
    # device holds a little more than half of TP8's share.
    assert tp16.weights_bytes_laid_out > tp16.weights_bytes_model
    assert 0.5 * tp8.weights_bytes_per_device < tp16.weights_bytes_per_device \
        < 0.52 * tp8.weights_bytes_per_device
    assert tp16.collective_link == "inter_node"
    # Two-level across the hosts: reduce-scatter and all-gather on NVLink, the all-reduce of
    # 1/8 of the bytes between the two hosts on InfiniBand.
    in_host = 2 * (8 + 7 / 8 * 16384 / 450e9 * 1e6)
    assert tp16.allreduce_us == pytest.approx(in_host + 20 + 2 * 1 / 2 * 2048 / 50e9 * 1e6)
    assert tp16.modeled_collective_ms > 2 * tp8.modeled_collective_ms
    assert tp16.fits and tp16.kv_capacity_tokens > tp8.kv_capacity_tokens


def test_tp8_pp2_halves_weights_and_adds_one_hop():
    pp2 = plan(Q72, load_mesh_config("2x8xh100-tp8-pp2"))
    tp8 = plan(Q72, load_mesh_config("8xh100-80gb-tp8"))
    assert pp2.layers_per_stage == (40, 40)
    # Every stage holds half the layers plus the embedding, final norm and lm_head, which the
    # runtime replicates over pp.
    vocab, hidden = 152064 // 8, 8192
    table = vocab * hidden * 2
    assert pp2.weights_bytes_per_stage == (pp2.weights_bytes_per_device,) * 2
    assert pp2.weights_bytes_per_device == pytest.approx(
        (tp8.weights_bytes_per_device - 2 * table) / 2 + 2 * table, abs=hidden * 2)
    assert pp2.kv_bytes_per_token_per_device == tp8.kv_bytes_per_token_per_device // 2 == 20 * KiB
    assert pp2.kv_capacity_tokens > 2 * tp8.kv_capacity_tokens
    # Stages run one after the other: batch-1 decode reads the same bytes and runs the
    # same all-reduces as TP8, plus one inter-node hop.
    assert pp2.modeled_hbm_ms == pytest.approx(tp8.modeled_hbm_ms)
    assert pp2.modeled_collective_ms == pytest.approx(tp8.modeled_collective_ms)
    # One hop between the stages and one all-reduce over them (the last stage's hidden state).
    assert pp2.modeled_pipeline_ms == pytest.approx((2 * 20 + 16384 / 50e9 * 1e6 * 2) / 1e3)
    assert pp2.modeled_decode_ms == pytest.approx(tp8.modeled_decode_ms + pp2.modeled_pipeline_ms)


def test_pp_with_tied_embeddings_puts_the_table_on_both_ends(tmp_path):
    raw = _raw("2x8xh100-tp8-pp2")
    p = plan(Q05, MeshConfig.from_yaml(_write(tmp_path, raw)))
    tp8 = plan(Q05, load_mesh_config("8xh100-80gb-tp8"))
    embed, norm = Q05.vocab_size // 8 * 896 * 2, 896 * 2
    assert p.layers_per_stage == (12, 12)
    assert p.weights_bytes_per_stage[0] + p.weights_bytes_per_stage[1] == \
        tp8.weights_bytes_per_device + embed + norm


# ---- padding and replication counted as the layout does it ------------------------------------
def test_05b_tp8_layout_is_counted_exactly():
    p = plan(Q05, load_mesh_config("cpu-8"))
    # 14 q / 2 KV heads at TP8: KV heads ×4 → 8 (1 per device), each serving 2 q slots (16 q
    # heads, 2 of them zero); mlp 4864/8 = 608; vocab 151936/8 = 18992; embeddings tied.
    assert (p.q_heads_laid_out, p.kv_heads_laid_out, p.kv_replicas) == (16, 8, 4)
    e, d = 896, 64
    per_layer = (e * 1 * (2 + 2) * d      # qkv: 2 q slots + K + V
                 + 1 * (2 + 2) * d        # qkv bias
                 + 1 * 2 * d * e          # o
                 + e * 2 * 608 + 608 * e  # gate_up, down
                 + 2 * e)                 # norms, replicated
    elems = 24 * per_layer + 18992 * e + e
    assert p.weights_bytes_per_device == elems * 4  # cpu-8 is float32
    assert p.weights_bytes_laid_out > p.weights_bytes_model
    assert p.kv_bytes_per_token_per_device == 24 * 1 * d * 2 * 4
    assert p.kv_bytes_per_token == 24 * 2 * d * 2 * 4
    assert p.fits, p.reason


def test_fp8_weights_are_counted_as_the_runtime_lays_them_out():
    """The plan's per-device weight bytes with fp8 projections equal the bytes of one device's
    shards of the arrays the runtime builds (random weights on the fake 8-device mesh)."""
    import jax
    import jax.numpy as jnp

    from qwenjax.model import Layout, random_weights
    from qwenjax.parallel import make_mesh

    config = preset("qwen2.5-0.5b")
    small = type(config)(**{**config.__dict__, "num_layers": 2})
    p = plan(small, load_mesh_config("cpu-8"), quantization="fp8")
    assert p.quantization == "fp8" and "fp8 projection weights" in p.format()
    weights = random_weights(Layout.create(small, 8, quantization="fp8"), make_mesh(8), jnp.float32)
    device0 = sum(s.data.nbytes for leaf in jax.tree.leaves(weights)
                  for s in leaf.addressable_shards if s.device == jax.devices()[0])
    assert p.weights_bytes_per_device == device0
    assert p.weights_bytes_per_device < plan(small, load_mesh_config("cpu-8")).weights_bytes_per_device


def test_72b_fits_two_a100s_with_fp8_weights_only():
    dense = plan(Q72, load_mesh_config("2xa100-80gb-tp2"))
    fp8 = plan(Q72, load_mesh_config("2xa100-80gb-tp2"), quantization="fp8")
    assert not dense.fits and fp8.fits, (dense.reason, fp8.reason)
    # Half the layer bytes: the embedding and lm_head (2 × 152k × 8192 / 2 in bf16) stay.
    assert 37 * GB < fp8.weights_bytes_per_device < 38 * GB
    assert fp8.modeled_hbm_ms < 0.55 * dense.modeled_hbm_ms


def test_fp8_kv_cache_nearly_doubles_the_tokens_that_fit():
    dense = plan(Q72, load_mesh_config("4xh100-80gb-tp4"))
    fp8 = plan(Q72, load_mesh_config("4xh100-80gb-tp4"), kv_cache_dtype="fp8")
    # 80 layers × 2 KV heads per device × (K, V) × (128 e4m3 bytes + a 4-byte scale).
    assert fp8.kv_bytes_per_token_per_device == 80 * 2 * 2 * 132
    assert dense.kv_bytes_per_token_per_device == 80 * 2 * 2 * 256
    assert fp8.kv_bytes_per_token == 80 * 8 * 2 * 132
    assert 1.9 < fp8.kv_capacity_tokens / dense.kv_capacity_tokens < 1.95
    assert "fp8 KV cache" in fp8.format()


def test_dtype_override_and_argument_checks():
    mesh = load_mesh_config("4xh100-80gb-tp4")
    f32 = plan(Q72, mesh, dtype="float32")
    bf16 = plan(Q72, mesh)
    assert f32.weights_bytes_per_device == 2 * bf16.weights_bytes_per_device
    assert f32.kv_bytes_per_token == 2 * bf16.kv_bytes_per_token
    with pytest.raises(ValueError, match="max_num_seqs must be a positive int, got 0"):
        plan(Q72, mesh, max_num_seqs=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        plan(Q72, mesh, dtype="int8")
    bigger = plan(Q72, mesh, max_num_seqs=1024)
    assert bigger.workspace_bytes_per_device > bf16.workspace_bytes_per_device
    assert bigger.kv_capacity_tokens < bf16.kv_capacity_tokens


# ---- report and CLI ------------------------------------------------------------------------------
def test_text_report_shows_both_parts():
    text = plan(Q72, load_mesh_config("4xh100-80gb-tp4")).format()
    assert "36.36 GB per device" in text
    assert "80.0 KiB/token per device" in text and "10.00 GiB per 32768-token sequence" in text
    assert "HBM" in text and "12.51 ms" in text
    assert "161 all-reduces × 8.05 µs" in text and "1.30 ms" in text
    assert "fit        yes" in text


def _run_cli(argv, capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="qwenjax")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


def test_cli_json(capsys):
    code, out = _run_cli(["plan", "--model", "qwen2.5-72b-instruct", "--mesh", "4xh100-80gb-tp4",
                          "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    for key in ("weights_bytes_per_device", "kv_bytes_per_token", "kv_capacity_tokens", "fits",
                "modeled_decode_ms", "modeled_hbm_ms", "modeled_collective_ms", "reason"):
        assert key in data
    assert data == json.loads(plan(Q72, load_mesh_config("4xh100-80gb-tp4")).to_json())
    assert data["fits"] is True and data["kv_bytes_per_token"] == 327680


def test_cli_options_and_hf_dir(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(Q05.to_hf_dict()))
    code, out = _run_cli(["plan", "--model", str(tmp_path), "--mesh", str(MESH_DIR / "cpu-8.yaml"),
                          "--max-model-len", "1024", "--max-num-seqs", "8", "--context", "512",
                          "--json"], capsys)
    data = json.loads(out)
    assert code == 0
    assert (data["max_model_len"], data["max_num_seqs"], data["context"]) == (1024, 8, 512)
    assert data["weights_bytes_per_device"] == plan(Q05, load_mesh_config("cpu-8")).weights_bytes_per_device
    code, out = _run_cli(["plan", "--model", "qwen2.5-72b", "--mesh", "4xa100-40gb-tp4"], capsys)
    assert code == 0 and "fit        NO: weights need 36.4 GB" in out


def test_cli_errors(capsys):
    with pytest.raises(ValueError, match="neither a preset"):
        _run_cli(["plan", "--model", "qwen9-1t", "--mesh", "cpu-8"], capsys)
    with pytest.raises(FileNotFoundError, match="known: "):
        _run_cli(["plan", "--model", "qwen2.5-0.5b", "--mesh", "9xh900"], capsys)


def test_int4_weights_are_counted_as_the_runtime_lays_them_out():
    """Codes count half a byte (XLA stores 4-bit integers two to a byte), float32 scales and
    4-bit zero points one per group: the elements of one device's shards of the arrays the
    runtime builds."""
    import jax
    import jax.numpy as jnp

    from qwenjax.model import Layout, random_weights
    from qwenjax.parallel import make_mesh

    config = preset("qwen2.5-0.5b")
    small = type(config)(**{**config.__dict__, "num_layers": 2})
    p = plan(small, load_mesh_config("cpu-8"), quantization="int4")
    weights = random_weights(Layout.create(small, 8, quantization="int4"), make_mesh(8), jnp.float32)
    device0 = sum(s.data.size * (0.5 if s.data.dtype == jnp.uint4 else s.data.dtype.itemsize)
                  for leaf in jax.tree.leaves(weights)
                  for s in leaf.addressable_shards if s.device == jax.devices()[0])
    assert p.weights_bytes_per_device == device0
    assert "int4 projection weights" in p.format()


def test_72b_fits_one_gpu_with_int4_weights():
    """The 72B on one MI300X (192 GB) in bf16 needs 145 GB of weights; in int4 with groups of
    128 about 43 GB (embedding and lm_head stay bf16: 5 GB of it)."""
    dense = plan(Q72, load_mesh_config("1xmi300x-tp1"))
    int4 = plan(Q72, load_mesh_config("1xmi300x-tp1"), quantization="int4")
    assert 140 * GB < dense.weights_bytes_per_device < 150 * GB
    assert 40 * GB < int4.weights_bytes_per_device < 46 * GB
    assert int4.kv_cache_bytes_per_device > dense.kv_cache_bytes_per_device + 95 * GB
