"""The sharding contract: rules table → parameter shardings → Megatron collectives in the HLO."""
import re
from collections import Counter

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from qwenjax.config import preset
from qwenjax.kv_cache import KVCache
from qwenjax.model import Layout, Model, ParamSpec, StepBatch, param_specs, random_weights
from qwenjax.parallel import DEFAULT_RULES, HeadPlan, ShardingRules, make_mesh
from tiny import tiny_config

COLLECTIVE = re.compile(r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def _compiled_collectives(tied: bool, num_layers: int, tp: int = 4) -> Counter:
    config = tiny_config(num_layers=num_layers, tie_word_embeddings=tied, vocab_size=256)
    layout, mesh = Layout.create(config, tp), make_mesh(tp)
    weights = random_weights(layout, mesh, jnp.float32)
    cache = KVCache.create(num_layers=num_layers, kv_heads=layout.heads.kv_heads, head_dim=config.head_dim,
                           num_pages=4, page_size=8, dtype=jnp.float32, mesh=mesh)
    batch = StepBatch(jnp.zeros((2, 8), jnp.int32), jnp.tile(jnp.arange(8, dtype=jnp.int32), (2, 1)),
                      jnp.full((2,), 8, jnp.int32), jnp.arange(4, dtype=jnp.int32).reshape(2, 2))
    hlo = jax.jit(Model(layout, mesh).last_logits, donate_argnums=(1,)).lower(
        weights, cache, batch).compile().as_text()
    return Counter(COLLECTIVE.findall(hlo)), hlo


@pytest.mark.parametrize("tied", [False, True])
def test_two_all_reduces_per_layer_plus_vocab(tied):
    for num_layers in (2, 3):
        ops, _ = _compiled_collectives(tied, num_layers)
        # One after attention-out and one after MLP-down per layer, plus one for the
        # vocab-sharded embedding lookup; nothing is all-gathered.
        assert ops == Counter({"all-reduce": 2 * num_layers + 1}), ops


def test_kv_cache_is_donated_in_place():
    _, hlo = _compiled_collectives(False, 2)
    # Every K and V pool (2 layers × 2) is aliased from input to output: no pool copy per step.
    header = next(line for line in hlo.splitlines() if line.startswith("HloModule"))
    aliases = re.findall(r"\{\d+\}: \((\d+), \{\}, (?:may|must)-alias\)", header)
    assert len(aliases) == 4, header[:300]


def test_layers_lower_once_and_compile_to_the_unrolled_program():
    """Each layer is one jitted function called num_layers times: the lowered module holds its
    body once (fast warm starts), and after XLA inlines the calls the compiled step has exactly
    the ops and buffer sizes of the step with the layer code pasted in per layer."""
    num_layers, tp = 3, 2
    config = tiny_config(num_layers=num_layers, vocab_size=256)
    layout, mesh = Layout.create(config, tp), make_mesh(tp)
    weights = random_weights(layout, mesh, jnp.float32)
    cache = KVCache.create(num_layers=num_layers, kv_heads=layout.heads.kv_heads,
                           head_dim=config.head_dim, num_pages=4, page_size=8, dtype=jnp.float32,
                           mesh=mesh)
    batch = StepBatch(jnp.zeros((2, 8), jnp.int32), jnp.tile(jnp.arange(8, dtype=jnp.int32), (2, 1)),
                      jnp.full((2,), 8, jnp.int32), jnp.arange(4, dtype=jnp.int32).reshape(2, 2))

    def programs(model):
        lowered = jax.jit(model.last_logits, donate_argnums=(1,)).lower(weights, cache, batch)
        return lowered.as_text(), lowered.compile()

    text, compiled = programs(Model(layout, mesh))
    unrolled_model = Model(layout, mesh)
    unrolled_model._jit_layer = unrolled_model._layer  # the layer code traced inline per layer
    unrolled_text, unrolled = programs(unrolled_model)

    assert len(re.findall(r"call @_layer", text)) == num_layers
    assert len(re.findall(r"func\.func private @_layer", text)) == 1
    assert "@_layer" not in unrolled_text
    kinds = lambda hlo: Counter(re.findall(r"= \S+ ([a-z][a-z0-9-]*)\(", hlo))
    assert kinds(compiled.as_text()) == kinds(unrolled.as_text())
    assert "call" not in kinds(compiled.as_text())
    sizes = lambda c: (c.memory_analysis().temp_size_in_bytes, c.memory_analysis().alias_size_in_bytes)
    assert sizes(compiled) == sizes(unrolled)


@pytest.mark.parametrize("tp", [1, 2])
def test_the_compiled_step_never_copies_a_weight(tp):
    """Decode and packed-prefill steps read every weight in place: no copy or transpose in the
    compiled program has a weight shard's dimensions (jnp.einsum's order of the O projection's
    contracting dims once made XLA transpose the O weight every step)."""
    from qwenjax.model import PackedChunks

    config = tiny_config(num_layers=2, vocab_size=256)
    layout, mesh = Layout.create(config, tp), make_mesh(tp)
    weights = random_weights(layout, mesh, jnp.float32)
    cache = KVCache.create(num_layers=2, kv_heads=layout.heads.kv_heads, head_dim=config.head_dim,
                           num_pages=8, page_size=8, dtype=jnp.float32, mesh=mesh)
    i32 = lambda *shape: jnp.zeros(shape, jnp.int32)
    decode = StepBatch(i32(4, 1), i32(4, 1), i32(4), i32(4, 2))
    prefill = PackedChunks(i32(32), i32(32), i32(32), i32(32), i32(2, 16), i32(2, 16), i32(2),
                           i32(2, 2), i32(2))
    model = Model(layout, mesh)
    hlo = jax.jit(model.last_logits, donate_argnums=(1,)).lower(
        weights, cache, (decode, prefill)).compile().as_text()
    dims = lambda shape: sorted(d for d in shape if d != 1)
    weight_dims = [dims(a.addressable_shards[0].data.shape) for a in jax.tree.leaves(weights)
                   if a.ndim > 1]
    moved = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} (?:copy|transpose)\(", hlo)
    assert moved, "the pattern finds the step's activation copies"
    for shape in moved:
        assert dims(int(d) for d in shape.split(",") if d) not in weight_dims, shape


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_every_parameter_sharding_follows_the_rules(tp):
    config = tiny_config(num_layers=2)
    layout, mesh = Layout.create(config, tp), make_mesh(tp)
    weights = random_weights(layout, mesh, jnp.float32)
    specs = jax.tree.leaves(param_specs(layout), is_leaf=lambda x: isinstance(x, ParamSpec))
    arrays = jax.tree.leaves(weights)
    assert len(specs) == len(arrays) == 2 + 7 * config.num_layers + 1
    for spec, array in zip(specs, arrays):
        expected = DEFAULT_RULES.sharding(mesh, spec.axes)
        assert array.sharding.is_equivalent_to(expected, array.ndim), (spec, array.sharding)
        assert array.shape == spec.shape
    # Spot-check the Megatron split itself.
    layer = weights.layers[0]
    assert layer.qkv.sharding.spec == P(None, "tp", None, None)
    assert layer.o.sharding.spec == P("tp", None, None, None)
    assert layer.gate_up.sharding.spec == P(None, None, "tp")
    assert layer.down.sharding.spec == P("tp", None)
    assert weights.embed.sharding.spec == P("tp", None)
    # Each device holds whole GQA groups.
    assert layer.qkv.addressable_shards[0].data.shape[1] == layout.heads.kv_heads // tp


def test_rules_refuse_two_logical_axes_on_one_mesh_axis():
    with pytest.raises(ValueError, match="two dimensions onto one mesh axis"):
        DEFAULT_RULES.spec(("q_heads", "mlp"))
    with pytest.raises(ValueError, match="unknown logical axis 'heads'"):
        DEFAULT_RULES.spec(("heads",))
    assert ShardingRules(mlp=None).spec(("embed", "mlp")) == P(None, None)


@pytest.mark.parametrize("name, tp, kv_heads, q_heads", [
    ("qwen2.5-0.5b", 1, 2, 14), ("qwen2.5-0.5b", 2, 2, 14), ("qwen2.5-0.5b", 4, 4, 16),
    ("qwen2.5-0.5b", 8, 8, 16), ("qwen2.5-7b", 8, 8, 32), ("qwen2.5-72b", 4, 8, 64),
    ("qwen2.5-72b", 8, 8, 64), ("qwen2.5-72b", 16, 16, 64), ("qwen2.5-14b", 16, 16, 48),
])
def test_head_plan(name, tp, kv_heads, q_heads):
    config = preset(name)
    plan = HeadPlan.create(config, tp)
    assert (plan.kv_heads, plan.q_heads) == (kv_heads, q_heads)
    assert plan.kv_heads % tp == 0
    # Every checkpoint q head appears exactly once; each sits with its own KV head.
    sources = [plan.q_source(g, j) for g in range(plan.kv_heads) for j in range(plan.q_per_kv)]
    real = [s for s in sources if s is not None]
    assert sorted(real) == list(range(config.num_heads))
    for g in range(plan.kv_heads):
        for j in range(plan.q_per_kv):
            head = plan.q_source(g, j)
            if head is not None:
                assert head // config.q_per_kv == plan.kv_source(g)


def test_mesh_errors_name_the_limit():
    with pytest.raises(ValueError, match="needs 16 devices; only 8"):
        make_mesh(tp=16)


def test_one_device_shard_of_72b_at_tp4():
    from qwenjax.parallel import one_device_shard

    shard = one_device_shard(preset("qwen2.5-72b"), 4)
    assert (shard.num_heads, shard.num_kv_heads, shard.intermediate_size, shard.vocab_size) == (16, 2, 7392, 38016)
    # A quarter of the model's weights (norms are replicated, so slightly more).
    full = preset("qwen2.5-72b").weight_bytes()
    assert full / 4 < shard.weight_bytes() < full / 4 * 1.001
