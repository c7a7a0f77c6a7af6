"""Serving a GGUF file directly (qwenjax.gguf_model): config, tokenizer and weights from the file."""
from __future__ import annotations

import json
import os
import pathlib

import gguf
import jax
import numpy as np
import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.gguf_convert import convert_gguf_to_hf, hf_tensor_name
from qwenjax.gguf_file import read_gguf
from qwenjax.gguf_model import GgufCheckpoint, gguf_files, prepare
from qwenjax.loading import load_model

Q8, F16, F32 = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16,
                gguf.GGMLQuantizationType.F32)
HIDDEN, MLP, HEADS, KV_HEADS, LAYERS = 64, 96, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of a byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tensors(rng) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """GGUF name → (HF-shaped float32 values, stored type): Q8_0 and F16 projections, F32
    norms and biases, as a quantized GGUF mixes them."""
    vocab = 256 + len(SPECIALS) + 1  # one merge, "Ġt"
    kv = KV_HEADS * HEAD_DIM
    out = {"token_embd.weight": (rng.normal(size=(vocab, HIDDEN)), Q8),
           "output.weight": (rng.normal(size=(vocab, HIDDEN)), F16),
           "output_norm.weight": (1 + 0.1 * rng.normal(size=HIDDEN), F32)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        out |= {b + "attn_q.weight": (rng.normal(size=(HIDDEN, HIDDEN)), Q8),
                b + "attn_k.weight": (rng.normal(size=(kv, HIDDEN)), Q8),
                b + "attn_v.weight": (rng.normal(size=(kv, HIDDEN)), F16),
                b + "attn_q.bias": (rng.normal(size=HIDDEN), F32),
                b + "attn_k.bias": (rng.normal(size=kv), F32),
                b + "attn_v.bias": (rng.normal(size=kv), F32),
                b + "attn_output.weight": (rng.normal(size=(HIDDEN, HIDDEN)), Q8),
                b + "ffn_gate.weight": (rng.normal(size=(MLP, HIDDEN)), Q8),
                b + "ffn_up.weight": (rng.normal(size=(MLP, HIDDEN)), Q8),
                b + "ffn_down.weight": (rng.normal(size=(HIDDEN, MLP)), Q8),
                b + "attn_norm.weight": (1 + 0.1 * rng.normal(size=HIDDEN), F32),
                b + "ffn_norm.weight": (1 + 0.1 * rng.normal(size=HIDDEN), F32)}
    return {k: ((0.1 * v).astype(np.float32), t) for k, (v, t) in out.items()}


def write_gguf(path: pathlib.Path, *, split_max_tensors: int = 0, seed: int = 0):
    """A tiny random Qwen2 GGUF as llama.cpp's converter lays one out; returns its tensors."""
    tensors = _tensors(np.random.default_rng(seed))
    tokens = _byte_tokens() + SPECIALS + ["Ġt"]
    writer = gguf.GGUFWriter(path, "qwen2", split_max_tensors=split_max_tensors)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * len(SPECIALS) + [1])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(258)
    writer.add_pad_token_id(256)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, (values, kind) in tensors.items():
        if kind == F32:
            writer.add_tensor(name, values)
        elif kind == F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2-q8_0.gguf"
    return path, write_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_file_reads_as_gguf_reader_reads_it(tiny_gguf):
    path, _ = tiny_gguf
    ours, reader = read_gguf(path), gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == fields and "tokenizer.ggml.merges" in fields
    ours = {t.name: t for t in ours.tensors}
    theirs = reader.tensors
    assert list(ours) == [t.name for t in theirs]
    for t in theirs:
        assert ours[t.name].kind == t.tensor_type
        assert ours[t.name].shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        np.testing.assert_array_equal(ours[t.name].data, np.asarray(t.data))


def test_checkpoint_reads_dequantized_values_under_hf_names(tiny_gguf, cache):
    path, tensors = tiny_gguf
    ckpt = GgufCheckpoint(prepare(path))
    for name, (values, kind) in tensors.items():
        got = np.asarray(ckpt.tensor(hf_tensor_name(name)), np.float32)
        assert got.shape == values.shape
        # Q8_0 keeps ~1/127 of each 32-block's largest value; f16 ~1e-3 relative.
        tolerance = {Q8: 0.01 * np.abs(values).max(), F16: 1e-3, F32: 0}[kind]
        np.testing.assert_allclose(got, values, atol=tolerance, err_msg=name)


def test_directory_holds_the_metadata_and_is_reused(tiny_gguf, cache):
    path, _ = tiny_gguf
    directory = prepare(path)
    assert directory.name == "tiny-qwen2-q8_0"
    config = json.loads((directory / "config.json").read_text())
    assert (config["hidden_size"], config["num_key_value_heads"], config["vocab_size"]) == (HIDDEN, KV_HEADS, 260)
    assert config["tie_word_embeddings"] is False
    assert not list(directory.glob("*.safetensors"))  # the weights stay in the GGUF
    marker = directory / "gguf.json"
    before = marker.stat().st_mtime_ns
    assert prepare(path) == directory and marker.stat().st_mtime_ns == before
    # A changed file (new mtime) gets a directory of its own.
    os.utime(path, ns=(before + 10**9, path.stat().st_mtime_ns + 10**9))
    assert prepare(path) != directory


def test_loads_exactly_as_its_converted_hf_directory(tiny_gguf, cache, tmp_path):
    path, _ = tiny_gguf
    hf_dir = convert_gguf_to_hf(path, tmp_path / "hf", progress=False)
    direct, converted = (load_model(str(path), tp=2, dtype="float32"),
                         load_model(hf_dir, tp=2, dtype="float32"))
    assert direct.source == str(path) and pathlib.Path(direct.files).parent.parent == cache / "gguf"
    for a, b in zip(jax.tree.leaves(direct.weights), jax.tree.leaves(converted.weights), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    int8 = load_model(str(path), tp=2, dtype="float32", quantization="int8")
    assert int8.quantization == "int8"
    text = "the cat sat"
    assert direct.tokenizer.encode(text) == converted.tokenizer.encode(text)
    assert direct.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        converted.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_llm_generates_from_a_gguf_path(tiny_gguf, cache, tmp_path):
    path, _ = tiny_gguf
    hf_dir = convert_gguf_to_hf(path, tmp_path / "hf", progress=False)
    kwargs = dict(tp=1, dtype="float32", max_model_len=128, max_num_seqs=2, warm_up=False, progress=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    direct = LLM(str(path), **kwargs).generate(["the cat"], greedy)[0]
    converted = LLM(str(hf_dir), **kwargs).generate(["the cat"], greedy)[0]
    assert direct.token_ids == converted.token_ids and len(direct.token_ids) == 6


def test_orbax_checkpoint_from_a_gguf_restores_the_same_weights(tiny_gguf, cache, tmp_path):
    from qwenjax.orbax_checkpoint import convert_to_orbax

    path, _ = tiny_gguf
    out = convert_to_orbax(path, tmp_path / "ckpt", tp=2, dtype="float32", progress=False)
    restored, direct = load_model(str(out), tp=2), load_model(str(path), tp=2, dtype="float32")
    for a, b in zip(jax.tree.leaves(restored.weights), jax.tree.leaves(direct.weights), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.tokenizer.encode("the cat") == direct.tokenizer.encode("the cat")


def test_split_gguf_loads_from_any_part(cache, tmp_path):
    tensors = write_gguf(tmp_path / "tiny.gguf", split_max_tensors=10)
    parts = sorted(tmp_path.glob("tiny-*-of-*.gguf"))
    assert len(parts) > 2
    assert gguf_files(parts[1]) == parts
    names = {hf_tensor_name(n) for n in tensors}
    first, second = GgufCheckpoint(prepare(parts[0])), GgufCheckpoint(prepare(parts[-1]))
    assert set(first.names()) == set(second.names()) == names
    np.testing.assert_array_equal(first.tensor("model.layers.1.mlp.down_proj.weight"),
                                  second.tensor("model.layers.1.mlp.down_proj.weight"))
    parts[1].unlink()
    with pytest.raises(FileNotFoundError, match=parts[1].name):
        load_model(str(parts[0]), tp=1)


def test_missing_or_foreign_files_are_refused_by_name(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_model(str(tmp_path / "absent.gguf"), tp=1)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all, just text" * 4)
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(bad)


@pytest.mark.real_model
def test_real_gguf_tensors_equal_the_converted_checkpoint(real_model_dir, cache):
    """Q4_K, Q5_0, Q6_K and Q8_0 tensors of the real 0.5B read bit-equal to its conversion."""
    from qwenjax.model_fetch import DEFAULT_ASSET
    from qwenjax.weights import Checkpoint

    real = real_model_dir.parent.parent / "downloads" / DEFAULT_ASSET.gguf_name
    ckpt, converted = GgufCheckpoint(prepare(real)), Checkpoint(real_model_dir)
    kinds = {t.name: t.kind.name for t in read_gguf(real).tensors}
    picked = {}
    for name, kind in kinds.items():
        picked.setdefault(kind, name)
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"} <= set(picked)
    for kind, name in picked.items():  # (bit compare: assert_array_equal took 15 s on these)
        got, want = ckpt.tensor(hf_tensor_name(name)), converted.tensor(hf_tensor_name(name))
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, kind
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), kind


def test_plan_and_served_name_take_a_gguf(tiny_gguf, cache, capsys):
    from qwenjax.plan_cli import resolve_model
    from server.servicer import model_name

    path, _ = tiny_gguf
    config = resolve_model(str(path))
    assert (config.hidden_size, config.num_layers, config.vocab_size) == (HIDDEN, LAYERS, 260)
    assert model_name(str(path)) == "tiny-qwen2-q8_0.gguf"  # the file name, as for a directory
