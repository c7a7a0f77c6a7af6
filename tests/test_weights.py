"""The safetensors loader: sharded checkpoints, bf16 files, per-device slices and host memory."""
import json
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.model import Layout
from qwenjax.parallel import make_mesh
from qwenjax.weights import Checkpoint, load_checkpoint
from tiny import tiny_config, write_hf_checkpoint

# ~130 MB of float32 weights; the largest tensor (embed / lm_head) is 33.5 MB.
MEDIUM = tiny_config(vocab_size=16384, hidden_size=512, intermediate_size=2048, num_layers=4,
                     num_heads=8, num_kv_heads=4, head_dim=64)


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded")
    write_hf_checkpoint(MEDIUM, directory, max_shard_size="40MB")
    return directory


def test_sharded_checkpoint_has_an_index_and_several_files(sharded_checkpoint):
    index = json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    ckpt = Checkpoint(sharded_checkpoint)
    assert ckpt.shape("model.embed_tokens.weight") == (16384, 512)


def test_load_reads_only_slices(sharded_checkpoint):
    """tp=8 load into bfloat16: the host never holds more than about one parameter at a time."""
    ckpt = Checkpoint(sharded_checkpoint)
    total = sum(np.prod(ckpt.shape(n)) * 4 for n in ckpt.names())
    largest = max(np.prod(ckpt.shape(n)) * 4 for n in ckpt.names())
    layout, mesh = Layout.create(MEDIUM, 8), make_mesh(8)
    tracemalloc.start()
    try:
        weights = load_checkpoint(sharded_checkpoint, layout, mesh, jnp.bfloat16)
        jax.block_until_ready(weights)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 120e6
    # float32 slices of the largest parameter plus their bf16 copies; far below the checkpoint.
    assert peak < 2 * largest, (peak, largest)
    assert peak < total / 3, (peak, total)
    embed_shards = weights.embed.addressable_shards
    assert len(embed_shards) == 8 and embed_shards[0].data.shape == (16384 // 8, 512)
    expected = ckpt.tensor("model.embed_tokens.weight")[2048:4096].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(embed_shards[1].data), expected)


def test_bf16_checkpoint_loads_exact_values(tmp_path):
    from safetensors.torch import load_file, save_file

    config = tiny_config()
    write_hf_checkpoint(config, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in tensors.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    layout, mesh = Layout.create(config, 2), make_mesh(2)
    weights = load_checkpoint(tmp_path, layout, mesh, jnp.bfloat16)
    want = tensors["model.layers.1.mlp.down_proj.weight"].bfloat16().float().numpy().T
    np.testing.assert_array_equal(np.asarray(weights.layers[1].down, np.float32), want)
    got_k = np.asarray(weights.layers[0].qkv[:, 0, layout.heads.q_per_kv], np.float32)
    want_k = tensors["model.layers.0.self_attn.k_proj.weight"].bfloat16().float().numpy()[:16].T
    np.testing.assert_array_equal(got_k, want_k)


def test_mismatched_checkpoint_is_named(tmp_path):
    write_hf_checkpoint(tiny_config(), tmp_path)
    wrong = Layout.create(tiny_config(vocab_size=300), 1)
    with pytest.raises(ValueError, match=r"embed_tokens is \(250, 64\), config expects \(300, 64\)"):
        load_checkpoint(tmp_path, wrong, make_mesh(1), jnp.float32)
