"""Pipeline parallelism (TP inside a stage × PP across stages) on 8 fake CPU devices.

Greedy outputs of every TP×PP mesh equal tp=1's (the tiny model; the real 0.5B at TP4×PP2),
a stage's weights and KV pools live only on its devices (bytes per device halve with PP2), the
engine stays batch-invariant with PP2, and the planner ranks two-node TP8×PP2 above TP16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.config import preset
from qwenjax.greedy import GreedyGenerator
from qwenjax.kv_cache import KVCache
from qwenjax.loading import load_model
from qwenjax.mesh_config import load_mesh_config
from qwenjax.model import Layout, Model, PackedChunks, StepBatch, random_weights
from qwenjax.parallel import make_mesh
from qwenjax.planner import plan
from tiny import tiny_config, write_hf_checkpoint

MESHES = [(2, 2), (4, 2), (1, 4)]  # (tp, pp)
VOCAB = 250


def _tiny_dir(tmp_path_factory, num_layers):
    directory = tmp_path_factory.mktemp(f"tiny-pp-{num_layers}")
    write_hf_checkpoint(tiny_config(num_layers=num_layers, vocab_size=VOCAB,
                                    max_position_embeddings=1024), directory)
    return directory


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return _tiny_dir(tmp_path_factory, 4)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    # Four rows: decode splits them into pp micro-batches (2 at PP2, 4 at PP4).
    return [rng.integers(0, VOCAB, n).tolist() for n in (5, 13, 3, 8)]


@pytest.fixture(scope="module")
def tiny4_reference(tiny4, prompts):
    return GreedyGenerator(load_model(tiny4, tp=1, dtype="float32")).generate(prompts, 6)


@pytest.mark.parametrize("tp, pp", MESHES)
def test_tiny_greedy_equals_tp1(tiny4, prompts, tiny4_reference, tp, pp):
    lm = load_model(tiny4, tp=tp, pp=pp, dtype="float32")
    assert dict(lm.mesh.shape) == {"dp": 1, "pp": pp, "tp": tp}
    assert lm.model.micro_batches((StepBatch(*[jnp.zeros((4, 1), jnp.int32)] * 4),)) == pp
    assert GreedyGenerator(lm).generate(prompts, 6) == tiny4_reference


def test_layer_count_not_divisible_by_pp_pads_with_identity_layers(tmp_path_factory, prompts):
    directory = _tiny_dir(tmp_path_factory, 5)
    lm = load_model(directory, tp=1, pp=4, dtype="float32")
    # 5 layers over 4 stages: 2, 1, 1, 1 real layers; each stage has 2 slots, the last 3 one zero slot.
    assert lm.layout.stage_layers == (2, 1, 1, 1) and len(lm.weights.layers) == 2
    assert [lm.layout.layer_index(s, 1) for s in range(4)] == [1, None, None, None]
    down = np.asarray(lm.weights.layers[1].down)
    assert np.abs(down[0]).max() > 0 and not down[1:].any()
    want = GreedyGenerator(load_model(directory, tp=1, dtype="float32")).generate(prompts, 6)
    assert GreedyGenerator(lm).generate(prompts, 6) == want


def _bytes_per_device(arrays) -> dict:
    per_device = {}
    for array in arrays:
        for shard in array.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device


def test_stage_weights_and_kv_pools_live_only_on_their_stage(tiny4):
    config = tiny_config(num_layers=4)
    weights, caches = {}, {}
    for pp in (1, 2):
        lm = load_model(tiny4, tp=2, pp=pp, dtype="float32")
        w, layout = lm.weights, lm.layout
        weights[pp] = (w, _bytes_per_device(jax.tree.leaves(w.layers)),
                       _bytes_per_device([w.embed, w.final_norm, w.lm_head]))
        cache = KVCache.create(num_layers=4, kv_heads=layout.heads.kv_heads, head_dim=config.head_dim,
                               num_pages=8, page_size=8, dtype=jnp.float32, mesh=lm.mesh)
        caches[pp] = _bytes_per_device(cache.k + cache.v)
        # Read from the shardings themselves: the stage axis is split over pp, KV heads over tp.
        assert cache.k[0].sharding.shard_shape(cache.k[0].shape) == (
            (1,) * (pp > 1) + (layout.heads.kv_heads // 2, 8, 8, config.head_dim))
    (w1, layers1, rest1), (w2, layers2, rest2) = weights[1], weights[2]
    assert len(layers1) == 2 and len(layers2) == 4
    # Every device of a stage holds half the layers' weights and half the layers' KV pools.
    assert set(layers2.values()) == {next(iter(layers1.values())) // 2}
    assert set(caches[2].values()) == {next(iter(caches[1].values())) // 2}
    qkv = w2.layers[0].qkv
    assert qkv.sharding.spec[0] == "pp"
    assert qkv.sharding.shard_shape(qkv.shape)[:2] == (1, config.hidden_size)
    # Stage 1's devices hold checkpoint layer 2 in slot 0: the same values as PP1's layer 2.
    stage1 = [s for s in w2.layers[0].down.addressable_shards if s.index[0] == slice(1, 2)]
    ref = np.asarray(w1.layers[2].down)
    assert stage1 and all(np.array_equal(np.asarray(s.data)[0], ref[s.index[1:]]) for s in stage1)
    # Embedding, final norm and lm_head are replicated over pp (each stage holds a tp shard).
    assert set(rest2.values()) == set(rest1.values())


def test_micro_batches_only_for_decode_rows():
    config = tiny_config(num_layers=4)
    mesh = make_mesh(tp=1, pp=4)
    model = Model(Layout.create(config, 1, 4), mesh)
    rows = lambda n: (StepBatch(*[jnp.zeros((n, 1), jnp.int32)] * 4),)
    assert [model.micro_batches(rows(n)) for n in (1, 2, 4, 8, 6)] == [1, 2, 4, 4, 2]
    packed = PackedChunks(*[jnp.zeros((16,), jnp.int32)] * 9)
    assert model.micro_batches((packed,)) == 1 and model.micro_batches(rows(4) + (packed,)) == 1
    assert Model(Layout.create(config, 1, 4), mesh, overlap=False).micro_batches(rows(8)) == 1
    with pytest.raises(ValueError, match="pp = 5 must be between 1 and the model's 4 layers"):
        Layout.create(config, 1, 5)
    with pytest.raises(ValueError, match="layout has pp=4 but the mesh has pp=1"):
        Model(Layout.create(config, 1, 4), make_mesh(tp=4))


def test_engine_batch_invariance_with_pp2(tmp_path_factory):
    """The Engine issue's batch-invariance test (tests/test_engine.py: 16 random arrivals, chunked
    prefill, preemption) run as is at TP2×PP2: decode goes through the stages in micro-batches,
    and every output equals the request's single-request GreedyGenerator output."""
    from test_engine import test_batch_invariance_with_chunked_prefill_and_preemption as invariance

    # Decode buckets 1 and 8: one micro-batch and two; one prefill size (5 shapes, not 24).
    invariance(load_model(_tiny_dir(tmp_path_factory, 2), tp=2, pp=2, dtype="float32"),
               dict(decode_buckets=(1, 8), prefill_buckets=(128,)))


# tp=1's greedy tokens for these two chat prompts (the first 8 of what test_real_model.py checks
# against transformers float32; recorded rather than recompiled to keep CI time down).
REAL_PROMPTS = ("What is the capital of France?", "Name three primary colors.")
REAL_TP1 = [[785, 6722, 315, 9625, 374, 12095, 13, 151645],   # The capital of France is Paris.<eos>
            [19641, 6028, 7987, 525, 2518, 11, 6303, 11]]     # Three primary colors are red, blue,


@pytest.mark.real_model
def test_real_model_greedy_equals_tp1(real_model_dir, tokenizer):
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in REAL_PROMPTS]
    # tp 4 pads the 14 query heads and replicates the 2 KV heads inside each stage. (Every mesh
    # of MESHES, pp 4 the deepest split, runs on the tiny model above: loading and running the
    # float32 0.5B at another mesh cost 18 s and checked no other code.)
    lm = load_model(real_model_dir, tp=4, pp=2, dtype="float32")
    assert lm.layout.stage_layers == (12, 12)
    # No stop ids: the first prompt's 8th token (EOS) must come out of the pipeline too.
    assert GreedyGenerator(lm).generate(prompts, 8) == REAL_TP1


def test_plan_ranks_two_node_tp8_pp2_above_tp16():
    q72 = preset("qwen2.5-72b")
    pp2 = plan(q72, load_mesh_config("2x8xh100-tp8-pp2"))
    tp16 = plan(q72, load_mesh_config("2x8xh100-tp16"))
    assert pp2.modeled_tokens_per_s > tp16.modeled_tokens_per_s
    # The stages: same time each (40 layers, 20 all-reduces … on NVLink), summed at batch 1.
    assert len(pp2.modeled_stage_ms) == 2
    assert pp2.modeled_stage_ms[0] == pytest.approx(pp2.modeled_stage_ms[1], rel=0.05)
    assert pp2.modeled_decode_ms == pytest.approx(sum(pp2.modeled_stage_ms) + pp2.modeled_pipeline_ms)


def test_pallas_decode_kernel_nests_inside_the_stages():
    """The decode kernel's shard_map over tp nests in the pipeline's (manual over pp): same
    logits as the XLA path (interpret mode on CPU; on GPUs "auto" picks the kernel)."""
    from qwenjax.attention import decode_kernel_for
    from qwenjax.parallel import DEFAULT_RULES

    config = tiny_config(num_layers=2)
    layout, mesh = Layout.create(config, 2, 2), make_mesh(2, pp=2)
    weights = random_weights(layout, mesh, jnp.float32, seed=3)
    kernel = decode_kernel_for(mesh, DEFAULT_RULES, "pallas", interpret=True)
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (2, 20))
    tables = jnp.asarray([[3, 0, 5], [1, 4, 2]], jnp.int32)

    def run(model):
        cache = KVCache.create(num_layers=2, kv_heads=layout.heads.kv_heads, head_dim=config.head_dim,
                               num_pages=6, page_size=8, dtype=jnp.float32, mesh=mesh)
        prefill = StepBatch(jnp.asarray(tokens[:, :18], jnp.int32), jnp.tile(jnp.arange(18, dtype=jnp.int32), (2, 1)),
                            jnp.full((2,), 18, jnp.int32), tables)
        step = jax.jit(model.forward)
        _, cache = step(weights, cache, prefill)
        out = []
        for t in (18,):  # two decode rows: two micro-batches of one
            batch = StepBatch(jnp.asarray(tokens[:, t:t + 1], jnp.int32), jnp.full((2, 1), t, jnp.int32),
                              jnp.full((2,), t + 1, jnp.int32), tables)
            logits, cache = step(weights, cache, batch)
            out.append(np.asarray(logits))
        return np.concatenate(out, axis=1)

    np.testing.assert_allclose(run(Model(layout, mesh, decode_attention=kernel)), run(Model(layout, mesh)),
                               atol=1e-5, rtol=1e-5)


def test_pipeline_step_hlo_contract():
    """A TP2×PP2 decode step of 4 rows: one loop of M + pp − 1 = 3 ticks (2 micro-batches), per
    tick 2 slots × 2 Megatron all-reduces and one collective-permute to the next stage, plus the
    embedding's all-reduce and the output's psum over pp; every pool donated in place."""
    import re
    from collections import Counter

    from test_sharding import COLLECTIVE

    config = tiny_config(num_layers=4, vocab_size=256)
    layout, mesh = Layout.create(config, 2, 2), make_mesh(2, pp=2)
    weights = random_weights(layout, mesh, jnp.float32)
    cache = KVCache.create(num_layers=4, kv_heads=layout.heads.kv_heads, head_dim=config.head_dim,
                           num_pages=8, page_size=8, dtype=jnp.float32, mesh=mesh)
    batch = StepBatch(jnp.zeros((4, 1), jnp.int32), jnp.zeros((4, 1), jnp.int32), jnp.ones((4,), jnp.int32),
                      jnp.arange(8, dtype=jnp.int32).reshape(4, 2))
    hlo = jax.jit(Model(layout, mesh).last_logits, donate_argnums=(1,)).lower(
        weights, cache, batch).compile().as_text()
    assert Counter(COLLECTIVE.findall(hlo)) == Counter({"all-reduce": 2 * 2 + 2, "collective-permute": 1})
    assert re.findall(r'"known_trip_count":\{"n":"(\d+)"', hlo) == ["3"]
    header = next(line for line in hlo.splitlines() if line.startswith("HloModule"))
    assert len(re.findall(r"\{\d+\}: \((\d+), \{\}, (?:may|must)-alias\)", header)) == 2 * 2
