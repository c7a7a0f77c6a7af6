"""Paged decode attention: the XLA reference against a float64 numpy oracle, and the
Pallas kernel (interpret mode on CPU) against the reference.

Every test poisons the cache slots that no valid token covers with NaN (unused
pages and the tail of each sequence's last page), so a kernel that reads or
mixes in a masked position fails loudly instead of by a small numeric drift.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.paged_attention import default_num_splits, paged_decode_attention, plan_launch
from pallas_kernels.reference import paged_decode_attention_reference

REPO = Path(__file__).resolve().parents[1]
# Max |error| per input dtype: fp32 paths differ only in summation order; bf16/fp16
# outputs are rounded to 8/11 mantissa bits, and the kernel also rounds the
# softmax probabilities to the input dtype before p @ v, as flash attention does.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}


def ragged_lengths(page_size: int, pages_per_seq: int) -> list[int]:
    """Edge lengths: empty, one token, one short of a page, exactly one page, one past a
    page, a ragged one, and the full table."""
    return [0, 1, page_size - 1, page_size, page_size + 1, 2 * page_size + 3,
            pages_per_seq * page_size]


def make_case(seed, *, num_heads, num_kv_heads, head_dim, page_size, pages_per_seq,
              lengths, dtype, spare_pages=3):
    """Random q and page pool with shuffled, non-contiguous block tables.

    Returns numpy float64 copies of the (dtype-rounded) inputs for the oracle, and
    the device arrays.
    """
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    total_pages = batch * pages_per_seq + spare_pages
    # Page 0 stays unused (so NaN): a masked-off lane that still reads memory
    # typically lands there, on the id a masked block-table load yields.
    block_tables = 1 + rng.permutation(total_pages - 1)[: batch * pages_per_seq]
    block_tables = block_tables.reshape(batch, pages_per_seq).astype(np.int32)
    q = rng.standard_normal((batch, num_heads, head_dim))
    k = rng.standard_normal((num_kv_heads, total_pages, page_size, head_dim))
    v = rng.standard_normal((num_kv_heads, total_pages, page_size, head_dim))
    poisoned = np.ones((total_pages, page_size), bool)
    for seq, length in enumerate(lengths):
        for slot in range(min(length, pages_per_seq * page_size)):
            poisoned[block_tables[seq, slot // page_size], slot % page_size] = False
    k[:, poisoned] = np.nan
    v[:, poisoned] = np.nan
    arrays = dict(
        q=jnp.asarray(q, dtype), k_pages=jnp.asarray(k, dtype), v_pages=jnp.asarray(v, dtype),
        lengths=jnp.asarray(lengths, jnp.int32), block_tables=jnp.asarray(block_tables),
    )
    exact = {name: np.asarray(arrays[name], np.float64) for name in ("q", "k_pages", "v_pages")}
    return exact, arrays


def dense_attention(q, k_pages, v_pages, lengths, block_tables):
    """Float64 oracle: gather each sequence's pages into contiguous K/V, then softmax."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    group = num_heads // num_kv_heads
    out = np.zeros_like(q)
    for seq, length in enumerate(lengths):
        if length == 0:
            continue
        k_seq = k_pages[:, block_tables[seq]].reshape(num_kv_heads, -1, head_dim)[:, :length]
        v_seq = v_pages[:, block_tables[seq]].reshape(num_kv_heads, -1, head_dim)[:, :length]
        for head in range(num_heads):
            logits = k_seq[head // group] @ q[seq, head] / math.sqrt(head_dim)
            probs = np.exp(logits - logits.max())
            out[seq, head] = probs @ v_seq[head // group] / probs.sum()
    return out


def assert_close(actual, expected, dtype):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    assert np.isfinite(actual).all(), "output has NaN/inf: a masked position leaked in"
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


REFERENCE_CASES = [
    # (num_heads, num_kv_heads, head_dim, page_size, dtype): GQA ratio 1, 7, 8
    pytest.param(4, 4, 64, 16, jnp.float32, id="gqa1-d64-ps16-fp32"),
    pytest.param(14, 2, 64, 16, jnp.float32, id="gqa7-d64-ps16-fp32"),
    pytest.param(8, 1, 128, 16, jnp.float32, id="gqa8-d128-ps16-fp32"),
    pytest.param(16, 2, 128, 8, jnp.bfloat16, id="gqa8-d128-ps8-bf16"),
    pytest.param(14, 2, 128, 32, jnp.bfloat16, id="gqa7-d128-ps32-bf16"),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size,dtype", REFERENCE_CASES)
def test_reference_matches_dense_numpy(num_heads, num_kv_heads, head_dim, page_size, dtype):
    pages_per_seq = 4
    lengths = ragged_lengths(page_size, pages_per_seq)
    exact, arrays = make_case(1, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, page_size=page_size,
                              pages_per_seq=pages_per_seq, lengths=lengths, dtype=dtype)
    expected = dense_attention(exact["q"], exact["k_pages"], exact["v_pages"], lengths,
                               np.asarray(arrays["block_tables"]))
    got = jax.jit(paged_decode_attention_reference)(**arrays)
    assert got.dtype == dtype and got.shape == arrays["q"].shape
    assert_close(got, expected, dtype)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), 0.0)  # length 0


def test_reference_scale_argument():
    exact, arrays = make_case(2, num_heads=4, num_kv_heads=2, head_dim=64, page_size=16,
                              pages_per_seq=2, lengths=[5, 32], dtype=jnp.float32)
    # scale s on q·k equals the default scale applied to q * s * sqrt(head_dim).
    scaled_q = exact["q"] * 0.3 * math.sqrt(64)
    expected = dense_attention(scaled_q, exact["k_pages"], exact["v_pages"], [5, 32],
                               np.asarray(arrays["block_tables"]))
    assert_close(paged_decode_attention_reference(**arrays, scale=0.3), expected, jnp.float32)


KERNEL_CASES = [
    # (num_heads, num_kv_heads, head_dim, page_size, dtype, pages_per_block, num_splits)
    pytest.param(14, 2, 64, 16, jnp.float32, None, 1, id="gqa7-d64-fp32-1split"),
    pytest.param(14, 2, 64, 16, jnp.float32, 1, 3, id="gqa7-d64-fp32-3splits"),
    pytest.param(4, 4, 128, 8, jnp.float32, 2, 2, id="gqa1-d128-ps8-fp32-2splits"),
    pytest.param(8, 1, 128, 16, jnp.bfloat16, None, None, id="gqa8-d128-bf16-auto"),
    pytest.param(16, 2, 128, 32, jnp.bfloat16, 1, 4, id="gqa8-d128-ps32-bf16-4splits"),
    pytest.param(32, 2, 64, 16, jnp.float32, 2, 2, id="gqa16-unpadded-fp32-2splits"),
    pytest.param(14, 2, 64, 16, jnp.float16, 2, 1, id="gqa7-d64-fp16-1split"),
]


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,page_size,dtype,pages_per_block,num_splits", KERNEL_CASES)
def test_kernel_matches_reference(num_heads, num_kv_heads, head_dim, page_size, dtype,
                                  pages_per_block, num_splits):
    pages_per_seq = 4
    lengths = ragged_lengths(page_size, pages_per_seq)
    _, arrays = make_case(3, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, page_size=page_size,
                          pages_per_seq=pages_per_seq, lengths=lengths, dtype=dtype)
    expected = np.asarray(paged_decode_attention_reference(**arrays).astype(jnp.float32))
    got = paged_decode_attention(**arrays, interpret=True, pages_per_block=pages_per_block,
                                 num_splits=num_splits)
    assert got.dtype == dtype and got.shape == arrays["q"].shape
    assert_close(got, expected, dtype)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), 0.0)  # length 0


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size,dtype", [
    pytest.param(4, 2, 64, 32, jnp.float32, id="gqa2-d64-ps32-fp32"),
    pytest.param(16, 2, 128, 16, jnp.bfloat16, id="gqa8-d128-ps16-bf16"),
])
def test_kernel_batch16_random_lengths_up_to_4k(num_heads, num_kv_heads, head_dim, page_size, dtype):
    """Batch 16 with random lengths up to 4096 tokens (long contexts take the split-K path)."""
    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.integers(0, 4097, 16)]
    lengths[:3] = [4096, 0, page_size - 1]
    pages_per_seq = 4096 // page_size
    _, arrays = make_case(11, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          page_size=page_size, pages_per_seq=pages_per_seq, lengths=lengths, dtype=dtype)
    expected = paged_decode_attention_reference(**arrays)
    got = paged_decode_attention(**arrays, interpret=True)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               atol=tol, rtol=tol)


def test_kernel_splits_without_pages():
    """8 splits over a 3-page table (1 page per block): splits 3-7 never get a page,
    and short sequences leave even the first splits empty."""
    lengths = [0, 1, 16, 17, 40, 48]
    exact, arrays = make_case(4, num_heads=14, num_kv_heads=2, head_dim=64, page_size=16,
                              pages_per_seq=3, lengths=lengths, dtype=jnp.float32)
    expected = dense_attention(exact["q"], exact["k_pages"], exact["v_pages"], lengths,
                               np.asarray(arrays["block_tables"]))
    got = paged_decode_attention(**arrays, interpret=True, pages_per_block=1, num_splits=8)
    assert_close(got, expected, jnp.float32)


def test_block_table_entries_past_length_are_ignored():
    """Allocators leave unused table slots as -1 or stale ids; neither path may
    read through them."""
    lengths = [0, 1, 16, 17, 40, 48]
    _, arrays = make_case(4, num_heads=14, num_kv_heads=2, head_dim=64, page_size=16,
                          pages_per_seq=3, lengths=lengths, dtype=jnp.float32)
    table = np.asarray(arrays["block_tables"]).copy()
    for seq, length in enumerate(lengths):
        table[seq, -(-length // 16):] = [-1, 1 << 30, 7][seq % 3]
    garbage = dict(arrays, block_tables=jnp.asarray(table))
    expected = np.asarray(paged_decode_attention_reference(**arrays))
    np.testing.assert_allclose(
        np.asarray(paged_decode_attention_reference(**garbage)), expected, atol=1e-6)
    got = paged_decode_attention(**garbage, interpret=True, pages_per_block=1, num_splits=8)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_kernel_all_empty_and_overlong_lengths():
    """Length 0 everywhere gives exact zeros; a length past the table is clamped to it."""
    _, arrays = make_case(5, num_heads=14, num_kv_heads=2, head_dim=64, page_size=16,
                          pages_per_seq=3, lengths=[0, 0, 48, 48], dtype=jnp.float32)
    for num_splits in (1, 2):
        call = lambda lengths: paged_decode_attention(  # noqa: E731
            **dict(arrays, lengths=jnp.asarray(lengths, jnp.int32)),
            interpret=True, pages_per_block=1, num_splits=num_splits)
        np.testing.assert_array_equal(np.asarray(call([0, 0, 0, 0])), 0.0)
        full = np.asarray(call([0, 0, 48, 48]))
        np.testing.assert_allclose(np.asarray(call([0, 0, 48, 1000])), full, atol=1e-6)


def test_kernel_inside_jit():
    _, arrays = make_case(6, num_heads=8, num_kv_heads=1, head_dim=64, page_size=16,
                          pages_per_seq=3, lengths=[7, 48, 33], dtype=jnp.float32)

    @jax.jit
    def step(q, k_pages, v_pages, lengths, block_tables):
        out = paged_decode_attention(2.0 * q, k_pages, v_pages, lengths, block_tables,
                                     interpret=True, num_splits=2, pages_per_block=1)
        return out.sum(axis=-1)

    expected = paged_decode_attention_reference(**dict(arrays, q=2.0 * arrays["q"])).sum(-1)
    np.testing.assert_allclose(np.asarray(step(**arrays)), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_kernel_under_shard_map_over_kv_heads(num_splits):
    """Tensor parallel layout: q sharded on heads, pages on KV heads; each device
    runs the kernel on its whole GQA groups (Qwen2.5-0.5B: 14 q / 2 KV over tp=2)."""
    tp = 2
    mesh = jax.make_mesh((tp,), ("tp",), axis_types=(jax.sharding.AxisType.Explicit,))
    _, arrays = make_case(7, num_heads=14, num_kv_heads=2, head_dim=64, page_size=16,
                          pages_per_seq=3, lengths=[0, 1, 17, 48], dtype=jnp.float32)
    specs = dict(q=P(None, "tp", None), k_pages=P("tp"), v_pages=P("tp"), lengths=P(),
                 block_tables=P())
    sharded = {n: jax.device_put(a, NamedSharding(mesh, specs[n])) for n, a in arrays.items()}

    def local(q, k_pages, v_pages, lengths, block_tables):
        assert q.shape[1] == 7 and k_pages.shape[0] == 1  # one whole group per device
        return paged_decode_attention(q, k_pages, v_pages, lengths, block_tables,
                                      interpret=True, num_splits=num_splits)

    attend = jax.jit(jax.shard_map(
        local, mesh=mesh,
        in_specs=tuple(specs[n] for n in ("q", "k_pages", "v_pages", "lengths", "block_tables")),
        out_specs=P(None, "tp", None), check_vma=False))
    got = attend(*(sharded[n] for n in ("q", "k_pages", "v_pages", "lengths", "block_tables")))
    assert got.sharding.spec == P(None, "tp", None)
    expected = paged_decode_attention_reference(**arrays)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,num_kv_heads,max_tokens,block_tokens,expected", [
    (32, 1, 2048, 128, 8),      # 32 programs: split to 256-token pieces
    (128, 1, 4096, 128, 4),     # 128 programs x 4 = 512
    (8, 1, 32768, 128, 64),     # few long sequences: many splits
    (1, 1, 2048, 128, 8),       # capped by the 256-token minimum split
    (256, 2, 4096, 128, 1),     # batch x heads already fills the GPU
    (32, 1, 256, 128, 1),       # short context: one split
])
def test_default_num_splits(batch, num_kv_heads, max_tokens, block_tokens, expected):
    assert default_num_splits(batch, num_kv_heads, max_tokens, block_tokens) == expected


def test_plan_launch_drops_statically_empty_splits():
    # 144 pages = 18 blocks of 8; 64 sequences want 8 splits, i.e. 3 blocks each,
    # which 6 splits already cover.
    assert plan_launch(batch=64, num_kv_heads=1, page_size=16, pages_per_seq=144,
                       itemsize=2) == (8, 6, 3)
    # float32 halves the default block; an explicit num_splits is kept as given.
    assert plan_launch(batch=64, num_kv_heads=1, page_size=16, pages_per_seq=144,
                       itemsize=4, num_splits=40) == (4, 40, 1)


@pytest.mark.parametrize("platform,device_kind", [
    ("cuda", "NVIDIA H100 80GB HBM3"),
    ("rocm", "gfx942"),  # MI300X
])
def test_kernel_lowers_to_triton_without_a_gpu(platform, device_kind):
    """jax's Python-side Triton lowering of both kernels, for CUDA and ROCm, on
    this CPU-only machine (an abstract device names the target). It rejects what
    Triton cannot express (non-power-of-2 tiles, unsupported primitives) long
    before a GPU session would; compiling the Triton IR itself needs the GPU
    plugin's Triton."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1,
                                         platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                     abstract_device=device)
    shapes = (jax.ShapeDtypeStruct((4, 16, 128), jnp.bfloat16),
              jax.ShapeDtypeStruct((2, 70, 16, 128), jnp.bfloat16),
              jax.ShapeDtypeStruct((2, 70, 16, 128), jnp.bfloat16),
              jax.ShapeDtypeStruct((4,), jnp.int32),
              jax.ShapeDtypeStruct((4, 16), jnp.int32))
    target = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
    attend = jax.jit(functools.partial(paged_decode_attention, num_splits=4))
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            attend, platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*shapes)
    module = exported.mlir_module()
    assert module.count(target) == 2, "expected the decode kernel and the combine kernel"
    assert 'name = "paged_decode_g8_p8_s4"' in module
    assert 'name = "paged_decode_combine_s4"' in module
    assert "num_warps = 4" in module and "num_stages = 2" in module


@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_with_fp8_pages_matches_reference(num_splits):
    """fp8 pages with a scale per token and head: the kernel's scaled scores and probabilities
    equal the reference on the dequantized pages (interpret mode)."""
    from qwenjax.kv_cache import fp8_bits_to, quantize_tokens

    pages_per_seq, page_size = 6, 16
    lengths = ragged_lengths(page_size, pages_per_seq)
    _, arrays = make_case(3, num_heads=14, num_kv_heads=2, head_dim=64, page_size=page_size,
                          pages_per_seq=pages_per_seq, lengths=lengths, dtype=jnp.float32)
    # Keys an order of magnitude apart per token, as Qwen's biased keys are.
    arrays["k_pages"] = arrays["k_pages"] * jnp.linspace(1, 40, arrays["k_pages"].shape[2])[:, None]
    k_values, k_scales = quantize_tokens(jnp.nan_to_num(arrays["k_pages"]))
    v_values, v_scales = quantize_tokens(jnp.nan_to_num(arrays["v_pages"]))
    quantized = dict(arrays, k_pages=k_values, v_pages=v_values, k_scales=k_scales, v_scales=v_scales)
    expected = np.asarray(paged_decode_attention_reference(**quantized))
    got = paged_decode_attention(**quantized, interpret=True, num_splits=num_splits)
    assert_close(got, expected, jnp.float32)
    # The reference on dequantized fp32 pages is the same function.
    dequantized = dict(arrays, k_pages=fp8_bits_to(k_values, jnp.float32) * k_scales[..., None],
                       v_pages=fp8_bits_to(v_values, jnp.float32) * v_scales[..., None])
    assert_close(paged_decode_attention_reference(**dequantized), expected, jnp.float32)
    # Pages as float8_e4m3fn (rather than qwenjax's uint8 bits) read the same.
    as_fp8 = dict(quantized, k_pages=jax.lax.bitcast_convert_type(k_values, jnp.float8_e4m3fn),
                  v_pages=jax.lax.bitcast_convert_type(v_values, jnp.float8_e4m3fn))
    assert_close(paged_decode_attention(**as_fp8, interpret=True, num_splits=num_splits), expected,
                 jnp.float32)
    with pytest.raises(ValueError, match="k_scales and v_scales come together"):
        paged_decode_attention(**dict(quantized, v_scales=None), interpret=True)


@pytest.mark.parametrize("pages_dtype", [jnp.uint8, jnp.float8_e4m3fn])
def test_fp8_kernel_lowers_to_triton_without_a_gpu(pages_dtype):
    """The fp8 variant (e4m3 tiles, as bytes or fp8, converted in the kernel; per-token scales
    gathered like the page ids) passes jax's Triton lowering for CUDA and ROCm too."""
    target = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
    shapes = (jax.ShapeDtypeStruct((4, 16, 128), jnp.bfloat16),
              jax.ShapeDtypeStruct((2, 70, 16, 128), pages_dtype),
              jax.ShapeDtypeStruct((2, 70, 16, 128), pages_dtype),
              jax.ShapeDtypeStruct((4,), jnp.int32),
              jax.ShapeDtypeStruct((4, 16), jnp.int32),
              jax.ShapeDtypeStruct((2, 70, 16), jnp.float32),
              jax.ShapeDtypeStruct((2, 70, 16), jnp.float32))

    def attend(q, k, v, lengths, tables, k_scales, v_scales):
        return paged_decode_attention(q, k, v, lengths, tables, k_scales=k_scales,
                                      v_scales=v_scales, num_splits=4)

    for platform, kind in (("cuda", "NVIDIA H100 80GB HBM3"), ("rocm", "gfx942")):
        device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
        mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                         abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            exported = jax.export.export(
                jax.jit(attend), platforms=[platform],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*shapes)
        assert 'name = "paged_decode_g8_p8_s4_fp8"' in exported.mlir_module()


def test_kernel_rejects_bad_shapes():
    _, arrays = make_case(8, num_heads=4, num_kv_heads=2, head_dim=64, page_size=16,
                          pages_per_seq=2, lengths=[3], dtype=jnp.float32)
    with pytest.raises(ValueError, match="page_size=12"):
        paged_decode_attention(**dict(arrays, k_pages=arrays["k_pages"][:, :, :12],
                                      v_pages=arrays["v_pages"][:, :, :12]), interpret=True)
    with pytest.raises(ValueError, match="num_heads=3"):
        paged_decode_attention(**dict(arrays, q=arrays["q"][:, :3]), interpret=True)
    with pytest.raises(ValueError, match="pages_per_block=3"):
        paged_decode_attention(**arrays, interpret=True, pages_per_block=3)
    with pytest.raises(ValueError, match="lengths must be int32"):
        paged_decode_attention(**dict(arrays, lengths=arrays["lengths"].astype(jnp.float32)),
                               interpret=True)


def test_bench_attention_smoke(tmp_path, monkeypatch):
    """The GPU benchmark script runs end to end on CPU (interpret mode, tiny sizes),
    and every implementation it times agrees with the reference."""
    spec = importlib.util.spec_from_file_location("bench_attention",
                                                  REPO / "scripts" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look themselves up there
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--smoke", "--cases", "smoke_b2_ctx40", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["hbm_read_tbps"] > 0
    impls = {r["impl"] for r in result["results"]}
    assert {"xla"} < impls and any(i.startswith("ours") for i in impls)
    for row in result["results"]:
        assert "error" not in row, row
        assert row["us_per_call"] > 0 and row["kv_bytes_per_call"] == 2 * 40 * 2 * row[
            "kv_heads"] * 64 * 2
        assert row["max_abs_err"] < 2e-2, row
