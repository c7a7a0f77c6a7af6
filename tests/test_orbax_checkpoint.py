"""Orbax checkpoints of the serving layout: convert at one tp, restore at others, same outputs."""
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from qwenjax.cli import main
from qwenjax.greedy import GreedyGenerator
from qwenjax.loading import load_model
from qwenjax.orbax_checkpoint import METADATA_FILE, PARAMS_DIR
from tiny import tiny_config, write_hf_checkpoint

# 2 KV heads, 14 q heads, MLP 90, vocab 250: tp=2 keeps 2 KV heads × 7 q; tp=4 replicates to
# 4 × 4 (2 padding q heads); tp=8 to 8 × 2. MLP pads to 90/92/96 and vocab to 250/252/256.
CONFIG = tiny_config(intermediate_size=90)
PROMPTS = [[5, 17, 42, 99, 3], [200, 7, 7, 1, 64, 128, 31, 8, 249]]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    write_hf_checkpoint(CONFIG, directory, seed=2)  # seed 2: greedy outputs vary (most seeds repeat one id)
    return directory


@pytest.fixture(scope="module")
def ckpt_tp4(hf_dir, tmp_path_factory):
    """Written by the CLI for the 4×H100 TP4 mesh, stored in float32 (the mesh says bfloat16)."""
    out = tmp_path_factory.mktemp("ckpt") / "tp4"
    assert main(["convert", "--model", str(hf_dir), "--mesh", "4xh100-80gb-tp4", "--out", str(out),
                 "--dtype", "float32"]) == 0
    return out


def _leaves(weights):
    return jax.tree.leaves(weights)


def test_checkpoint_directory_holds_the_tp4_layout(ckpt_tp4):
    meta = json.loads((ckpt_tp4 / METADATA_FILE).read_text())
    assert meta["tp"] == 4 and meta["dtype"] == "float32"
    assert meta["heads"] == {"num_heads": 14, "num_kv_heads": 2, "kv_replicas": 2, "q_per_kv": 4}
    assert (meta["mlp"], meta["vocab"]) == (92, 252)
    assert (ckpt_tp4 / "config.json").is_file() and (ckpt_tp4 / "generation_config.json").is_file()
    assert (ckpt_tp4 / PARAMS_DIR).is_dir()


@pytest.mark.parametrize("tp", [4, 2, 8])
def test_restore_at_any_tp_equals_safetensors_load(hf_dir, ckpt_tp4, tp):
    reference = load_model(hf_dir, tp=tp, dtype="float32")
    restored = load_model(ckpt_tp4, tp=tp)
    assert restored.dtype == "float32"
    assert restored.config == dataclasses.replace(reference.config, name=restored.config.name)
    assert restored.layout.heads == reference.layout.heads
    assert (restored.layout.mlp, restored.layout.vocab) == (reference.layout.mlp, reference.layout.vocab)
    if tp != 4:  # the re-layout path: the saved arrays have other shapes
        assert restored.layout.heads.kv_heads != 4 or restored.layout.vocab != 252
    for got, want in zip(_leaves(restored.weights), _leaves(reference.weights), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    generator = GreedyGenerator(reference)
    want_ids = generator.generate(PROMPTS, max_new_tokens=6)
    # One compiled step for both (CI time): same layout and mesh, only the weights differ.
    generator.lm = restored
    got_ids = generator.generate(PROMPTS, max_new_tokens=6)
    assert got_ids == want_ids
    assert len(set(want_ids[0] + want_ids[1])) > 1  # a real continuation, not one repeated id


def test_dtype_from_mesh_and_override(hf_dir, tmp_path):
    """No --dtype: the mesh's (bfloat16); load_model(dtype=…) casts on restore."""
    out = tmp_path / "bf16"
    assert main(["convert", "--model", str(hf_dir), "--mesh", "2xa100-80gb-tp2", "--out", str(out)]) == 0
    assert json.loads((out / METADATA_FILE).read_text())["dtype"] == "bfloat16"
    restored = load_model(out, tp=2)
    assert restored.dtype == "bfloat16"
    assert {leaf.dtype for leaf in _leaves(restored.weights)} == {np.dtype("bfloat16")}
    reference = load_model(hf_dir, tp=2, dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(restored.weights.layers[1].qkv),
                                  np.asarray(reference.weights.layers[1].qkv))
    upcast = load_model(out, tp=2, dtype="float32")
    assert upcast.dtype == "float32" and upcast.weights.embed.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(upcast.weights.embed),
                                  np.asarray(reference.weights.embed).astype(np.float32))


@pytest.mark.parametrize("scheme,dtype", [("fp8", "float8_e4m3fn"), ("int4", "uint4")])
def test_quantized_checkpoint_restores_its_values_and_scales(hf_dir, tmp_path, scheme, dtype):
    """convert -q fp8|int4 stores the quantized values with their float32 scales (and int4's
    zero points); restoring gives exactly what a quantized safetensors load gives, at the tp it
    was written for and at another tp with the same layout; a tp with another layout is
    refused, naming the way out."""
    out = tmp_path / scheme
    assert main(["convert", "--model", str(hf_dir), "--mesh", "2xa100-80gb-tp2", "--out", str(out),
                 "--dtype", "float32", "-q", scheme]) == 0
    assert json.loads((out / METADATA_FILE).read_text())["quantization"] == scheme
    reference = load_model(hf_dir, tp=2, dtype="float32", quantization=scheme)
    # tp=1 keeps the 2 KV heads × 7 q heads of tp=2; int4's stored groups divide each MLP
    # shard, so they differ between tp 1 and 2 (a different layout).
    for tp in (2, 1) if scheme == "fp8" else (2,):
        restored = load_model(out, tp=tp)
        assert restored.quantization == scheme and restored.layout.heads.kv_heads == 2
        for got, want in zip(_leaves(restored.weights), _leaves(reference.weights), strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got).view(np.uint8) if got.dtype.itemsize == 1
                                          else np.asarray(got),
                                          np.asarray(want).view(np.uint8) if want.dtype.itemsize == 1
                                          else np.asarray(want))
    assert str(restored.weights.layers[0].down.value.dtype) == dtype
    with pytest.raises(ValueError, match="convert the HF checkpoint for this tp"):
        load_model(out, tp=4)


def test_broken_checkpoints_give_clear_errors(ckpt_tp4, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset nor a directory"):
        load_model(tmp_path / "absent")
    no_meta = tmp_path / "no_meta"
    shutil.copytree(ckpt_tp4, no_meta)
    (no_meta / METADATA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {METADATA_FILE}"):
        load_model(no_meta, tp=4)
    bad_meta = tmp_path / "bad_meta"
    shutil.copytree(ckpt_tp4, bad_meta)
    meta = json.loads((bad_meta / METADATA_FILE).read_text())
    (bad_meta / METADATA_FILE).write_text(json.dumps(dict(meta, vocab=256)))
    with pytest.raises(ValueError, match="vocab = 256 but config.json at tp=4 gives 252"):
        load_model(bad_meta, tp=4)
    (bad_meta / METADATA_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(bad_meta, tp=4)
    truncated = tmp_path / "truncated"
    shutil.copytree(ckpt_tp4, truncated)
    (truncated / PARAMS_DIR / "manifest.ocdbt").unlink()
    with pytest.raises(FileNotFoundError, match="no params/manifest.ocdbt"):
        load_model(truncated, tp=2)
    no_data = tmp_path / "no_data"
    shutil.copytree(ckpt_tp4, no_data)
    shutil.rmtree(no_data / PARAMS_DIR / "d")  # the tree and manifest stay, the array bytes go
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        load_model(no_data, tp=4)


def test_convert_rejects_mixed_or_missing_arguments(hf_dir, ckpt_tp4, tmp_path, capsys):
    assert main(["convert", "model.gguf", str(tmp_path / "out"), "--mesh", "cpu-8"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["convert", "--model", str(hf_dir), "--out", str(tmp_path / "o")]) == 2
    assert "missing --mesh" in capsys.readouterr().err
    assert main(["convert", "model.gguf"]) == 2
    assert "OUT is missing" in capsys.readouterr().err
    assert main(["convert", "--model", str(hf_dir), "--mesh", "cpu-8", "--out", str(ckpt_tp4)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", "--model", str(ckpt_tp4), "--mesh", "cpu-8", "--out", str(tmp_path / "o")]) == 2
    assert "already a qwenjax orbax checkpoint" in capsys.readouterr().err
