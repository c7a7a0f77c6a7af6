"""FP8 weights: the quantizer, the fp8 projections against their dequantized weights, FP8
checkpoints (per-tensor, per-channel and block scales) and load-time quantization."""
import json
from collections import Counter

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qwenjax.kv_cache import KVCache
from qwenjax.model import Layout, Model, StepBatch, param_specs, random_weights
from qwenjax.parallel import make_mesh
from qwenjax.quantization import (FP8_MAX, Fp8CheckpointTensor, Fp8Weight, dequantize_tree,
                                  parse_quantization_config, quantize_fp8)
from qwenjax.weights import Checkpoint, load_checkpoint
from test_sharding import COLLECTIVE
from tiny import tiny_config, write_hf_checkpoint

E4M3_STEP = 2.0 ** -3  # e4m3 keeps 3 mantissa bits: rounding error ≤ half a step, relative


def test_quantizer_scales_each_output_channel_over_the_contracted_axes():
    w = np.random.default_rng(0).normal(size=(6, 3, 5)).astype(np.float32)
    w[:, 1, 2] = 0.0           # an all-zero channel (padding) stays zero, scale 1
    w[:, 2, 4] *= 1000.0       # a large channel does not coarsen the others
    q = quantize_fp8(jnp.asarray(w), contract=(0,))
    assert q.value.dtype == jnp.float8_e4m3fn and q.value.shape == w.shape
    assert q.scale.shape == (3, 5) and q.scale.dtype == jnp.float32
    np.testing.assert_allclose(q.scale, np.where(np.abs(w).max(0) > 0, np.abs(w).max(0) / FP8_MAX, 1),
                               rtol=1e-6)
    assert float(q.scale[1, 2]) == 1.0 and not np.asarray(q.value[:, 1, 2], np.float32).any()
    # Each channel's largest value maps to ±448 exactly; every value is within e4m3's rounding.
    assert np.abs(np.asarray(q.value, np.float32)).max(0)[0, 0] == FP8_MAX
    deq = np.asarray(q.dequantize())
    # Normal values: half a mantissa step, relative; subnormals (below 2^-6 × scale): half of
    # the subnormal step 2^-9 × scale, absolute.
    bound = np.abs(w) * (E4M3_STEP / 2 + 1e-6) + np.asarray(q.scale) * 2.0 ** -10
    assert (np.abs(deq - w) <= bound).all()
    # Several contracted axes (the O projection's heads × head_dim): one scale per embed column.
    o = quantize_fp8(jnp.asarray(w), contract=(0, 1))
    assert o.scale.shape == (5,)
    np.testing.assert_allclose(o.scale, np.abs(w).max((0, 1)) / FP8_MAX, rtol=1e-6)


def test_quantized_layout_declares_values_and_scales():
    layout = Layout.create(tiny_config(num_layers=1), 2, quantization="fp8")
    layer = param_specs(layout).layers[0]
    assert isinstance(layer.qkv, Fp8Weight) and layer.qkv.value.dtype == jnp.float8_e4m3fn
    assert layer.qkv.scale.axes == ("kv_heads", None, "head_dim")
    assert layer.o.scale.axes == ("embed",) and layer.down.scale.axes == ("embed",)
    assert layer.gate_up.scale.axes == (None, "mlp")
    # Norms, biases, the embedding and lm_head stay in the model dtype.
    assert layer.attn_norm.dtype is None and layer.qkv_bias.dtype is None
    assert param_specs(layout).lm_head.dtype is None
    with pytest.raises(ValueError, match="quantization must be one of fp8, int4, int8"):
        Layout.create(tiny_config(), 1, quantization="nf4")


def _logits(layout, mesh, weights, tokens):
    config = layout.config
    cache = KVCache.create(num_layers=config.num_layers, kv_heads=layout.heads.kv_heads,
                           head_dim=config.head_dim, num_pages=8, page_size=8, dtype=jnp.float32,
                           mesh=mesh)
    n = tokens.shape[1]
    batch = StepBatch(jnp.asarray(tokens), jnp.tile(jnp.arange(n, dtype=jnp.int32), (tokens.shape[0], 1)),
                      jnp.full((tokens.shape[0],), n, jnp.int32),
                      jnp.arange(8, dtype=jnp.int32).reshape(tokens.shape[0], -1))
    logits, _ = jax.jit(Model(layout, mesh).forward)(weights, cache, batch)
    return np.asarray(logits)


@pytest.mark.parametrize("tp", [1, 4])
def test_fp8_model_equals_the_model_on_its_dequantized_weights(tp):
    """The fp8 projections scale their fp32 outputs; that is the same product as the dense
    model on the dequantized weights (up to float32 rounding), at tp 1 and 4 (o and down
    contract a sharded axis: their scales must not depend on the shard)."""
    config = tiny_config(num_layers=2, vocab_size=256)
    layout, mesh = Layout.create(config, tp, quantization="fp8"), make_mesh(tp)
    weights = random_weights(layout, mesh, jnp.float32, seed=5)
    assert isinstance(weights.layers[1].down, Fp8Weight)
    tokens = np.random.default_rng(1).integers(0, 250, size=(2, 16)).astype(np.int32)
    got = _logits(layout, mesh, weights, tokens)
    dense_layout = Layout.create(config, tp)
    want = _logits(dense_layout, mesh, dequantize_tree(weights), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fp8_step_keeps_two_all_reduces_per_layer():
    """Scaling a row-parallel projection's partial sums before the all-reduce would change the
    collectives; the scale multiplies after it, so the plan is the dense one."""
    config = tiny_config(num_layers=2, vocab_size=256)
    layout, mesh = Layout.create(config, 4, quantization="fp8"), make_mesh(4)
    weights = random_weights(layout, mesh, jnp.float32)
    cache = KVCache.create(num_layers=2, kv_heads=layout.heads.kv_heads, head_dim=config.head_dim,
                           num_pages=4, page_size=8, dtype=jnp.float32, mesh=mesh)
    batch = StepBatch(jnp.zeros((2, 8), jnp.int32), jnp.tile(jnp.arange(8, dtype=jnp.int32), (2, 1)),
                      jnp.full((2,), 8, jnp.int32), jnp.arange(4, dtype=jnp.int32).reshape(2, 2))
    hlo = jax.jit(Model(layout, mesh).last_logits).lower(weights, cache, batch).compile().as_text()
    assert Counter(COLLECTIVE.findall(hlo)) == Counter({"all-reduce": 2 * 2 + 1})


# ---- checkpoints --------------------------------------------------------------------------
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _write_fp8_checkpoint(directory, config, strategy: str, block=(32, 32)):
    """The tiny checkpoint rewritten as an FP8 one: projections as float8_e4m3fn with
    ``strategy`` scales ("tensor", "channel" or "block"), everything else untouched. Returns
    the dequantized projections the loader must see."""
    import torch
    from safetensors.torch import load_file, save_file

    write_hf_checkpoint(config, directory)
    tensors = {k: v.float().numpy() for k, v in load_file(directory / "model.safetensors").items()}
    expected = {}
    for name in list(tensors):
        if not name.endswith(".weight") or name.split(".")[-2] not in PROJECTIONS:
            continue
        w = tensors[name].astype(np.float32)
        out, inp = w.shape
        if strategy == "tensor":
            scale = np.float32(np.abs(w).max() / FP8_MAX).reshape(1)
            full = np.broadcast_to(scale, w.shape)
        elif strategy == "channel":
            scale = (np.abs(w).max(1, keepdims=True) / FP8_MAX).astype(np.float32)
            full = np.broadcast_to(scale, w.shape)
        else:
            rb, cb = -(-out // block[0]), -(-inp // block[1])
            scale = np.zeros((rb, cb), np.float32)
            for i in range(rb):
                for j in range(cb):
                    tile = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
                    scale[i, j] = np.abs(tile).max() / FP8_MAX
            full = np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[:out, :inp]
        q = (w / full).astype(ml_dtypes.float8_e4m3fn)
        tensors[name] = q
        tensors[name + ("_scale_inv" if strategy == "block" else "_scale")] = scale
        expected[name] = q.astype(np.float32) * full
    to_torch = lambda a: (torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
                          if a.dtype == ml_dtypes.float8_e4m3fn else torch.from_numpy(np.ascontiguousarray(a)))
    save_file({k: to_torch(v) for k, v in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    raw = json.loads((directory / "config.json").read_text())
    if strategy == "block":
        raw["quantization_config"] = dict(quant_method="fp8", activation_scheme="dynamic",
                                          weight_block_size=list(block))
    else:
        raw["quantization_config"] = dict(
            quant_method="compressed-tensors", format="float-quantized", ignore=["lm_head"],
            config_groups=dict(group_0=dict(
                targets=["Linear"],
                weights=dict(num_bits=8, type="float", strategy=strategy, symmetric=True),
                input_activations=dict(num_bits=8, type="float", strategy="token", dynamic=True))))
    (directory / "config.json").write_text(json.dumps(raw))
    return expected


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_fp8_checkpoint_reads_as_its_dequantized_weights(tmp_path, strategy):
    config = tiny_config(hidden_size=72, intermediate_size=100)  # not multiples of the block
    expected = _write_fp8_checkpoint(tmp_path, config, strategy)
    ckpt = Checkpoint(tmp_path)
    assert ckpt.quantization.scheme == "fp8"
    for name, want in expected.items():
        view = ckpt.tensor(name)
        assert isinstance(view, Fp8CheckpointTensor) and view.shape == want.shape
        np.testing.assert_array_equal(view[:, :], want)
        np.testing.assert_array_equal(view[3:40:2, 5:], want[3:40:2, 5:])
        np.testing.assert_array_equal(view.T[7:30, 1:9], want.T[7:30, 1:9])
    # Dense load (a quantization=None layout) of the FP8 checkpoint: the dequantized values.
    layout, mesh = Layout.create(config, 2), make_mesh(2)
    weights = load_checkpoint(tmp_path, layout, mesh, jnp.float32)
    np.testing.assert_allclose(np.asarray(weights.layers[1].down),
                               expected["model.layers.1.mlp.down_proj.weight"].T, rtol=1e-6)


def test_channel_fp8_checkpoint_loads_its_own_values_and_scales(tmp_path):
    """Per-channel scales are the layout's own: the fp8 values on device are the checkpoint's
    bytes, at tp 2 as at tp 1."""
    config = tiny_config()
    _write_fp8_checkpoint(tmp_path, config, "channel")
    raw = Checkpoint(tmp_path)._raw
    layout, mesh = Layout.create(config, 2, quantization="fp8"), make_mesh(2)
    weights = load_checkpoint(tmp_path, layout, mesh, jnp.float32)
    down = weights.layers[0].down
    np.testing.assert_array_equal(np.asarray(down.value).view(np.uint8),
                                  raw("model.layers.0.mlp.down_proj.weight").T.view(np.uint8))
    np.testing.assert_allclose(np.asarray(down.scale),
                               raw("model.layers.0.mlp.down_proj.weight_scale")[:, 0], rtol=1e-6)


def test_load_time_fp8_of_a_dense_checkpoint_matches_quantizing_on_the_host(tmp_path):
    config = tiny_config()
    write_hf_checkpoint(config, tmp_path)
    mesh = make_mesh(4)
    dense = load_checkpoint(tmp_path, Layout.create(config, 4), mesh, jnp.float32)
    fp8 = load_checkpoint(tmp_path, Layout.create(config, 4, quantization="fp8"), mesh, jnp.float32)
    for field in ("qkv", "o", "gate_up", "down"):
        want = quantize_fp8(jnp.asarray(np.asarray(getattr(dense.layers[1], field))),
                            getattr(fp8.layers[1], field).contract)
        got = getattr(fp8.layers[1], field)
        np.testing.assert_array_equal(np.asarray(got.value, np.float32), np.asarray(want.value, np.float32))
        np.testing.assert_allclose(np.asarray(got.scale), np.asarray(want.scale), rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(fp8.lm_head), np.asarray(dense.lm_head))


def test_fp8_pipeline_stages_equal_one_stage(tmp_path):
    """With pp = 2 each stage-stacked projection carries stage-stacked scales; the logits equal
    the single-stage fp8 model loaded from the same checkpoint."""
    config = tiny_config(num_layers=3, vocab_size=256)
    write_hf_checkpoint(config, tmp_path)
    tokens = np.random.default_rng(3).integers(0, 250, size=(2, 16)).astype(np.int32)
    logits = []
    for pp in (1, 2):
        layout, mesh = Layout.create(config, 2, pp, quantization="fp8"), make_mesh(tp=2, pp=pp)
        weights = load_checkpoint(tmp_path, layout, mesh, jnp.float32)
        if pp == 2:
            assert weights.layers[0].down.scale.shape == (2, config.hidden_size)
        logits.append(_logits(layout, mesh, weights, tokens))
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_unsupported_quantization_configs_are_refused_by_name():
    assert parse_quantization_config(None) is None
    assert parse_quantization_config(dict(quant_method="fp8", weight_block_size=[128, 128])).block == (128, 128)
    with pytest.raises(ValueError, match="quantization method 'bitsandbytes' is not supported"):
        parse_quantization_config(dict(quant_method="bitsandbytes", load_in_4bit=True))
    with pytest.raises(ValueError, match="'int' with 4 bits"):
        parse_quantization_config(dict(quant_method="compressed-tensors", config_groups=dict(
            g=dict(weights=dict(type="int", num_bits=4, strategy="group")))))
    with pytest.raises(ValueError, match="weight_block_size must be two positive ints"):
        parse_quantization_config(dict(quant_method="fp8", weight_block_size=[128]))


@pytest.mark.real_model
def test_fp8_engine_on_the_real_model(real_model_dir):
    """The batched engine with fp8 weights and an fp8 KV cache (chunked prefill, prefix cache,
    decode over quantized pages) answers as the plain greedy loop over the same weights and
    cache dtype does, and still knows the capital of France."""
    from qwenjax import LLM, SamplingParams
    from qwenjax.greedy import GreedyGenerator
    from qwenjax.loading import load_model

    lm = load_model(real_model_dir, tp=2, dtype="float32", quantization="fp8")
    assert lm.describe() == "float32, fp8 weights"
    assert isinstance(lm.weights.layers[0].qkv, Fp8Weight)
    # One byte per projection weight instead of four, plus a float32 scale per output channel;
    # norms, biases, embedding and lm_head stay float32 (no padding at tp 2 for this model).
    projections = [w for w in jax.tree.leaves(lm.weights.layers, is_leaf=lambda x: isinstance(x, Fp8Weight))
                   if isinstance(w, Fp8Weight)]
    assert len(projections) == 4 * lm.config.num_layers
    saved = sum(3 * w.value.size - w.scale.nbytes for w in projections)
    assert lm.weight_bytes() == lm.config.param_count() * 4 - saved
    llm = LLM(lm, max_model_len=512, max_num_seqs=2, max_prefill_seqs=2, prefill_chunk=128,
              kv_cache_dtype="fp8", warm_up=False, progress=False)
    assert llm.engine.runner.cache.k[0].values.dtype == jnp.uint8  # e4m3 bits
    chats = [[{"role": "user", "content": q}] for q in
             ("What is the capital of France?", "Name three primary colors.")]
    # (8 tokens: "Paris" is the 6th; running the float32 model on CPU is most of this test's time.)
    outputs = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    prompts = [lm.tokenizer.encode_chat(c) for c in chats]
    expected = GreedyGenerator(lm, kv_cache_dtype="fp8").generate(prompts, 8, lm.tokenizer.eos_token_ids)
    assert [o.token_ids for o in outputs] == expected
    assert "Paris" in outputs[0].text
