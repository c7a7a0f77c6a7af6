"""Every mesh config's shape runs the model on fake CPU devices with the outputs of tp=1.

Configs wider than the 8 fake devices run at the same axis ratio scaled down to 8 (TP16 → TP8:
with the tiny model's 2 KV heads both still replicate KV heads 4×/8×); pipeline configs keep
their stages and scale TP (2 nodes × TP8 × PP2 → TP4 × PP2).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kv_cache import KVCache
from qwenjax.mesh_config import MeshAxes, list_mesh_configs, load_mesh_config
from qwenjax.model import Layout, Model, StepBatch
from qwenjax.parallel import make_mesh
from qwenjax.weights import load_checkpoint
from tiny import tiny_config, write_hf_checkpoint

FAKE_DEVICES = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, its tokens, and its logits at tp=1 (the reference)."""
    config = tiny_config(intermediate_size=100, vocab_size=203)
    directory = tmp_path_factory.mktemp("mesh-tiny")
    write_hf_checkpoint(config, directory)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
    return config, directory, tokens, _logits(config, directory, tokens, make_mesh(tp=1))


def _logits(config, directory, tokens, mesh):
    tp, pp = mesh.shape["tp"], mesh.shape.get("pp", 1)
    layout = Layout.create(config, tp, pp)
    weights = load_checkpoint(directory, layout, mesh, jnp.float32)
    cache = KVCache.create(num_layers=config.num_layers, kv_heads=layout.heads.kv_heads,
                           head_dim=config.head_dim, num_pages=4, page_size=8, dtype=jnp.float32, mesh=mesh)
    batch = StepBatch(jnp.asarray(tokens, jnp.int32), jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1)),
                      jnp.full((2,), 16, jnp.int32), jnp.arange(4, dtype=jnp.int32).reshape(2, 2))
    logits, _ = jax.jit(Model(layout, mesh).forward)(weights, cache, batch)
    return np.asarray(logits)


@pytest.mark.parametrize("name", list_mesh_configs())
def test_config_shape_matches_tp1(name, tiny):
    config, directory, tokens, reference = tiny
    mesh_config = load_mesh_config(name)
    scale = max(1, mesh_config.axes.size // FAKE_DEVICES)
    pp = mesh_config.pp
    axes = MeshAxes(dp=max(1, mesh_config.dp // scale), tp=max(1, mesh_config.tp // scale), pp=pp)
    scaled = dataclasses.replace(mesh_config, axes=axes)
    mesh = scaled.jax_mesh(jax.devices()[: axes.size])
    assert dict(mesh.shape) == ({"dp": axes.dp, "pp": pp, "tp": axes.tp} if pp > 1
                                else {"dp": axes.dp, "tp": axes.tp})
    got = _logits(config, directory, tokens, mesh)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=1e-5)


def test_two_engines_on_disjoint_device_subsets_serve_concurrently(tiny):
    import asyncio

    from qwenjax.engine.async_engine import EngineThread
    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax.greedy import GreedyGenerator
    from qwenjax.loading import load_model
    from qwenjax.sampling import SamplingParams

    config, directory, tokens, _ = tiny
    left = load_model(directory, tp=2, devices=[0, 1], dtype="float32")
    right = load_model(directory, tp=2, devices=[2, 3], dtype="float32")
    assert {d.id for d in left.mesh.devices.flat}.isdisjoint(d.id for d in right.mesh.devices.flat)
    assert {d.id for d in right.weights.embed.devices()} == {d.id for d in jax.devices()[2:4]}
    small = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, prefill_chunk=32, max_prefill_seqs=2,
                         page_size=8, max_model_len=128, num_pages=64)
    threads = [EngineThread(Engine(lm, small, warm_up=False)) for lm in (left, right)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [tokens[0].tolist(), tokens[1, :9].tolist()]

    async def run(thread, prompt, rid):
        return [o async for o in thread.generate(prompt, params, rid)][-1].token_ids

    async def main():
        jobs = [run(t, p, f"{i}-{j}") for i, t in enumerate(threads) for j, p in enumerate(prompts)]
        return await asyncio.gather(*jobs)

    try:
        results = asyncio.run(main())
    finally:
        for t in threads:
            t.shutdown()
    want = GreedyGenerator(load_model(directory, tp=1, dtype="float32")).generate(prompts, 10)
    assert results == want + want


def test_device_selection_errors_name_the_device():
    from qwenjax.loading import select_devices

    with pytest.raises(ValueError, match="device 9 does not exist; 8 devices are visible"):
        select_devices([0, 9])
    with pytest.raises(ValueError, match="lists a device twice"):
        select_devices([1, 1])
    with pytest.raises(ValueError, match="needs 2 devices, got 3"):
        make_mesh(tp=2, devices=select_devices([0, 1, 2]))
