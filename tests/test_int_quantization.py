"""Integer weights (W4A16/W8A16): the group quantizer, AWQ and GPTQ packing, checkpoints read
slice by slice and loaded code for code at several tp, and the model against transformers on
the same dequantized weights."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.int_checkpoints import AWQ_ORDER, PackedIntTensor, pack_words, unpack_words
from qwenjax.model import Layout, param_specs, random_weights
from qwenjax.parallel import make_mesh
from qwenjax.quantization import (IntWeight, dequantize_tree, effective_scheme,
                                  parse_quantization_config, quantize_int)
from qwenjax.weights import Checkpoint, checkpoint_layout, load_checkpoint
from test_quantization import PROJECTIONS, _logits
from tiny import hf_logits, tiny_config, write_hf_checkpoint


def test_packing_matches_the_published_formats():
    """AWQ interleaves eight outputs per word in AWQ_ORDER; GPTQ packs in order. A symmetric
    4-bit GPTQ zero point (8) is stored minus one: the familiar 0x77777777 of GPTQ qzeros."""
    codes = np.arange(8, dtype=np.int32).reshape(1, 8)
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    assert pack_words(codes, 4, AWQ_ORDER)[0, 0] == np.int32(0x75316420)
    assert pack_words(codes, 4)[0, 0] == np.int32(0x76543210)
    assert pack_words(np.full((1, 8), 7), 4)[0, 0] == 2004318071
    assert pack_words(np.array([[1, 2, 3, 255]]), 8)[0, 0] == np.uint32(0xFF030201).view(np.int32)
    rng = np.random.default_rng(0)
    for bits, order in ((4, AWQ_ORDER), (4, None), (8, None)):
        codes = rng.integers(0, 2 ** bits, size=(5, 32)).astype(np.int32)
        np.testing.assert_array_equal(unpack_words(pack_words(codes, bits, order), bits, order), codes)


def test_group_quantizer_rounds_each_group_to_nearest():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 3, 5)).astype(np.float32)
    w[:, 1, 2] = 0.0  # padding: exact zeros
    q = quantize_int(jnp.asarray(w), axis=0, group=16, bits=4)
    assert q.value.dtype == jnp.uint4 and q.value.shape == w.shape
    assert q.scale.shape == (4, 3, 5) and q.zero.shape == (4, 3, 5) and q.zero.dtype == jnp.uint4
    deq = np.asarray(q.dequantize())
    # Within half a step of its group (the step is the group's range / 15).
    step = np.repeat(np.asarray(q.scale), 16, axis=0)
    assert (np.abs(deq - w) <= step / 2 + 1e-6).all()
    assert not deq[:, 1, 2].any()
    q8 = quantize_int(jnp.asarray(w), axis=0, group=64, bits=8)
    assert q8.value.dtype == jnp.uint8 and q8.scale.shape == (1, 3, 5)
    assert np.abs(np.asarray(q8.dequantize()) - w).max() < np.abs(deq - w).max() / 8


def test_int_layout_groups_divide_every_shard():
    """Stored groups divide each device's shard: the 72B's MLP at tp 4 (7392 per device)
    keeps groups of 32; o_proj's groups run along head_dim."""
    from qwenjax.config import preset

    layer = param_specs(Layout.create(preset("qwen2.5-72b"), 4, quantization="int4")).layers[0]
    assert isinstance(layer.down, IntWeight) and layer.down.group == 32
    assert layer.gate_up.group == 128 and layer.qkv.group == 128 and layer.o.group == 128
    assert layer.o.axis == 2 and layer.o.scale.shape == (8, 8, 1, 8192)
    assert layer.down.scale.axes == ("mlp", "embed") and layer.down.zero.dtype == jnp.uint4
    small = param_specs(Layout.create(tiny_config(), 1, quantization="int8", group_size=32)).layers[0]
    assert small.o.group == 16 and small.o.value.dtype == jnp.uint8  # head_dim 16 < group 32


@pytest.mark.parametrize("tp", [1, 4])
def test_int_model_equals_the_model_on_its_dequantized_weights(tp):
    config = tiny_config(num_layers=2, vocab_size=256)
    layout, mesh = Layout.create(config, tp, quantization="int4", group_size=32), make_mesh(tp)
    weights = random_weights(layout, mesh, jnp.float32, seed=5)
    assert isinstance(weights.layers[1].down, IntWeight)
    tokens = np.random.default_rng(1).integers(0, 250, size=(2, 16)).astype(np.int32)
    got = _logits(layout, mesh, weights, tokens)
    want = _logits(Layout.create(config, tp), mesh, dequantize_tree(weights), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- checkpoints --------------------------------------------------------------------------
def _write_int_checkpoint(directory, config, method: str, bits: int = 4, group: int = 32,
                          fmt: str = "gptq"):
    """The tiny checkpoint rewritten as AWQ or GPTQ: each projection rounded per group of input
    channels, packed the format's way, float weights removed. Returns the transformers model
    and the dequantized projections the loader must reproduce."""
    import torch
    from safetensors.torch import load_file, save_file

    model = write_hf_checkpoint(config, directory)
    tensors = {k: v.float().numpy() for k, v in load_file(directory / "model.safetensors").items()}
    expected = {}
    for name in list(tensors):
        if not name.endswith(".weight") or name.split(".")[-2] not in PROJECTIONS:
            continue
        w = tensors.pop(name)                                    # [out, in]
        g = group if group > 0 else w.shape[1]
        q = quantize_int(jnp.asarray(w.T), axis=0, group=g, bits=bits)  # groups of inputs
        codes = np.asarray(q.value, np.int32)                    # [in, out]
        zeros = np.asarray(q.zero, np.int32)                     # [in / g, out]
        scales = np.asarray(q.scale, np.float16)
        base = name.removesuffix(".weight")
        if method == "awq":
            tensors[base + ".qweight"] = pack_words(codes, bits, AWQ_ORDER)
            tensors[base + ".qzeros"] = pack_words(zeros, bits, AWQ_ORDER)
        else:
            tensors[base + ".qweight"] = pack_words(codes.T, bits).T.copy()
            stored = zeros - (1 if fmt == "gptq" else 0)
            tensors[base + ".qzeros"] = pack_words(stored & (2 ** bits - 1), bits)
            tensors[base + ".g_idx"] = (np.arange(w.shape[1]) // g).astype(np.int32)
        tensors[base + ".scales"] = scales
        deq = (codes - np.repeat(zeros, g, 0)) * np.repeat(scales.astype(np.float32), g, 0)
        expected[name] = deq.T.astype(np.float32)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
              directory / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((directory / "config.json").read_text())
    if method == "awq":
        raw["quantization_config"] = dict(quant_method="awq", bits=bits, group_size=group,
                                          zero_point=True, version="gemm")
    else:
        raw["quantization_config"] = dict(quant_method="gptq", bits=bits, group_size=group,
                                          desc_act=False, sym=False, checkpoint_format=fmt)
    (directory / "config.json").write_text(json.dumps(raw))
    with torch.no_grad():  # the oracle: transformers on the dequantized weights
        params = dict(model.named_parameters())
        for name, w in expected.items():
            params[name].copy_(torch.from_numpy(w))
    return model, expected


@pytest.mark.parametrize("method,bits,group,fmt", [("awq", 4, 32, "gptq"), ("gptq", 4, 32, "gptq"),
                                                   ("gptq", 8, -1, "gptq_v2")])
def test_packed_checkpoint_reads_as_its_dequantized_weights(tmp_path, method, bits, group, fmt):
    config = tiny_config()
    _, expected = _write_int_checkpoint(tmp_path, config, method, bits, group, fmt)
    ckpt = Checkpoint(tmp_path)
    assert ckpt.quantization.scheme == f"int{bits}" and ckpt.quantization.method == method
    for name, want in expected.items():
        view = ckpt.tensor(name)
        assert isinstance(view, PackedIntTensor) and view.shape == want.shape
        assert ckpt.shape(name) == want.shape and name in ckpt
        np.testing.assert_allclose(view[:, :], want, rtol=1e-6)
        np.testing.assert_allclose(view[3:40:2, 5:], want[3:40:2, 5:], rtol=1e-6)
        np.testing.assert_allclose(view.T[7:30, 1:9], want.T[7:30, 1:9], rtol=1e-6)
        codes, zeros, scales = (view.view(p)[:, :] for p in ("codes", "zeros", "scales"))
        np.testing.assert_allclose((codes - zeros) * scales, want, rtol=1e-6)
        assert codes.max() < 2 ** bits and zeros.max() < 2 ** bits


@pytest.mark.parametrize("method,tp", [("awq", 1), ("awq", 4), ("gptq", 2)])
def test_packed_checkpoint_loads_code_for_code_and_matches_transformers(tmp_path, method, tp):
    """Loaded at its own bits and groups, the device holds the checkpoint's codes; the logits
    equal transformers (fp32) with the dequantized weights, at tp 1, 2 (MLP shards of 48:
    stored groups of 16) and 4 (KV heads replicated, q heads padded)."""
    config = tiny_config(num_layers=2)
    model, expected = _write_int_checkpoint(tmp_path, config, method)
    layout = checkpoint_layout(config, tmp_path, tp)
    assert layout.quantization == "int4" and layout.group_size == 32
    mesh = make_mesh(tp)
    weights = load_checkpoint(tmp_path, layout, mesh, jnp.float32)
    down = weights.layers[1].down
    assert isinstance(down, IntWeight) and down.value.dtype == jnp.uint4
    np.testing.assert_allclose(np.asarray(down.dequantize())[: config.intermediate_size],
                               expected["model.layers.1.mlp.down_proj.weight"].T, rtol=1e-6)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 16)).astype(np.int32)
    want = hf_logits(model, tokens)
    got = _logits(layout, mesh, weights, tokens)[..., : config.vocab_size]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # Asking for the dense model (or fp8) dequantizes the same checkpoint instead.
    dense = load_checkpoint(tmp_path, Layout.create(config, tp), mesh, jnp.float32)
    np.testing.assert_allclose(np.asarray(dense.layers[1].down)[: config.intermediate_size],
                               expected["model.layers.1.mlp.down_proj.weight"].T, rtol=1e-6)


def test_load_time_int4_of_a_dense_checkpoint_matches_quantizing_on_the_host(tmp_path):
    config = tiny_config()
    write_hf_checkpoint(config, tmp_path)
    mesh = make_mesh(2)
    dense = load_checkpoint(tmp_path, Layout.create(config, 2), mesh, jnp.float32)
    layout = checkpoint_layout(config, tmp_path, 2, quantization="int4")
    assert layout.group_size == 128
    int4 = load_checkpoint(tmp_path, layout, mesh, jnp.float32)
    for field in ("qkv", "o", "gate_up", "down"):
        got = getattr(int4.layers[0], field)
        want = quantize_int(jnp.asarray(np.asarray(getattr(dense.layers[0], field))), got.axis,
                            got.group, 4)
        np.testing.assert_array_equal(np.asarray(got.value, np.int32), np.asarray(want.value, np.int32))
        np.testing.assert_allclose(np.asarray(got.scale), np.asarray(want.scale), rtol=1e-7)


def test_int_configs_and_names_are_checked():
    awq = parse_quantization_config(dict(quant_method="awq", bits=4, group_size=128,
                                         zero_point=True, version="GEMM"))
    assert (awq.scheme, awq.group_size, awq.zero_offset) == ("int4", 128, 0)
    gptq = parse_quantization_config(dict(quant_method="gptq", bits=8, group_size=-1, desc_act=False))
    assert (gptq.scheme, gptq.group_size, gptq.zero_offset) == ("int8", None, 1)
    for raw, message in [
            (dict(quant_method="awq", bits=4, group_size=128, version="gemv"), "version 'gemv'"),
            (dict(quant_method="awq", bits=8, group_size=128), "bits 8 is not supported for awq"),
            (dict(quant_method="gptq", bits=3, group_size=128), "bits 3"),
            (dict(quant_method="gptq", bits=4, group_size=0), "group_size must be"),
            (dict(quant_method="gptq", bits=4, group_size=128, lm_head=True), "quantized lm_head"),
            (dict(quant_method="bitsandbytes"), "method 'bitsandbytes' is not supported")]:
        with pytest.raises(ValueError, match=message):
            parse_quantization_config(raw)
    assert effective_scheme(None, awq) == "int4" and effective_scheme("awq_marlin", awq) == "int4"
    assert effective_scheme("fp8", awq) == "fp8" and effective_scheme(None, None) is None
    with pytest.raises(ValueError, match="names a checkpoint format, but the checkpoint is awq"):
        effective_scheme("gptq", awq)
    with pytest.raises(ValueError, match="checkpoint is not quantized"):
        effective_scheme("awq", None)
    with pytest.raises(ValueError, match="quantization must be one of"):
        effective_scheme("nf4", None)


def test_act_order_gptq_is_refused_by_tensor(tmp_path):
    config = tiny_config(num_layers=1)
    _write_int_checkpoint(tmp_path, config, "gptq")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.g_idx"
    tensors[name] = tensors[name][::-1].copy()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="o_proj: g_idx puts input channels in groups out of order"):
        Checkpoint(tmp_path).tensor("model.layers.0.self_attn.o_proj.weight")


def test_plan_reads_an_awq_checkpoints_own_scheme_and_groups(tmp_path, capsys):
    from qwenjax.cli import main

    _write_int_checkpoint(tmp_path, tiny_config(), "awq", group=32)
    assert main(["plan", "--model", str(tmp_path), "--mesh", "cpu-8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["quantization"] == "int4"
    assert main(["plan", "--model", str(tmp_path), "--mesh", "cpu-8", "--json", "-q", "gptq"]) == 2
    assert "names a checkpoint format, but the checkpoint is awq" in capsys.readouterr().err
