"""Convert a Qwen2 GGUF file into a Hugging Face layout directory, without torch.

Writes `model.safetensors` (float32, the exact dequantized values under HF names),
`config.json`, `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`,
everything taken from the GGUF's metadata.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from qwenjax.gguf_file import GgufTensor, read_gguf

# Bump when the written files change, so caches holding older conversions get rebuilt.
FORMAT_VERSION = 1

_ARCH = "qwen2"

# The pre-tokenizer regex of Qwen2's tokenizer (GGUF `tokenizer.ggml.pre` = "qwen2"): like
# GPT-4's cl100k pattern except that digits are split one by one.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp token types (gguf.TokenType): CONTROL tokens were special added tokens in the
# HF tokenizer, USER_DEFINED ones were added but not special.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}
_LAYER_MODULE_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """HF Qwen2 parameter name of a GGUF tensor. Qwen2 needs no Q/K row permutation (llama does)."""
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    match = _LAYER_TENSOR_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_MODULE_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Qwen2 HF counterpart")
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_MODULE_NAMES[module]}.{kind}"


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True
) -> pathlib.Path:
    """Write the HF-layout files for `gguf_path` into `out_dir` (created if missing); return it.

    Files are written in place: build into a fresh directory and move it into place when done
    if readers must never see a partial result (as `qwenjax.model_fetch` does).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf_file = read_gguf(gguf_path)
    if gguf_file.metadata.get("split.count", 1) > 1:
        raise ValueError(f"{gguf_path} is one part of a split GGUF; serve it directly "
                         "(`qwenjax serve` reads every part) or merge it with llama.cpp's gguf-split")
    write_metadata(gguf_file.metadata, out_dir, tensor_names={t.name for t in gguf_file.tensors})
    _write_weights(gguf_file.tensors, out_dir / "model.safetensors", progress=progress)
    return out_dir


def write_metadata(meta: Mapping[str, Any], out_dir: pathlib.Path, *, tensor_names: set[str]) -> None:
    """Write config.json, the tokenizer files and generation_config.json from the GGUF's
    metadata (``tensor_names``: every GGUF tensor of the model, all parts of a split one)."""
    architecture = _field(meta, "general.architecture")
    if architecture != _ARCH:
        raise ValueError(f"general.architecture is {architecture!r}; only {_ARCH!r} is supported")
    config = _hf_config(meta, tie_word_embeddings="output.weight" not in tensor_names)
    _write_json(out_dir / "config.json", config)
    _write_tokenizer_files(meta, out_dir, model_max_length=config["max_position_embeddings"])
    _write_json(out_dir / "generation_config.json", _generation_config(meta))


def _field(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF metadata key {key!r} is missing")
    return meta[key]


def _float32_value(value: float) -> float:
    # GGUF stores these as float32; the shortest decimal that round-trips through float32
    # gives 1e-06 rather than 9.999999974752427e-07.
    return float(str(np.float32(value)))


def _hf_config(meta: Mapping[str, Any], *, tie_word_embeddings: bool) -> dict[str, Any]:
    def arch(key: str) -> Any:
        return _field(meta, f"{_ARCH}.{key}")

    num_layers = arch("block_count")
    context_length = arch("context_length")
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": arch("embedding_length"),
        "intermediate_size": arch("feed_forward_length"),
        "num_hidden_layers": num_layers,
        "num_attention_heads": arch("attention.head_count"),
        "num_key_value_heads": arch("attention.head_count_kv"),
        "max_position_embeddings": context_length,
        "rope_theta": _float32_value(arch("rope.freq_base")),
        "rms_norm_eps": _float32_value(arch("attention.layer_norm_rms_epsilon")),
        "vocab_size": len(_field(meta, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": _field(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(meta, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "use_sliding_window": False,
        "sliding_window": context_length,
        "max_window_layers": num_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    scaling = meta.get(f"{_ARCH}.rope.scaling.type", "none")
    if scaling != "none":
        # llama.cpp writes Qwen's YaRN config.json entry as these three keys.
        if scaling != "yarn":
            raise ValueError(f"{_ARCH}.rope.scaling.type is {scaling!r}; only 'yarn' is supported")
        config["rope_scaling"] = {
            "type": "yarn",
            "factor": _float32_value(arch("rope.scaling.factor")),
            "original_max_position_embeddings": arch("rope.scaling.original_context_length"),
        }
    return config


def _generation_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    tokens = _field(meta, "tokenizer.ggml.tokens")
    eos_id = _field(meta, "tokenizer.ggml.eos_token_id")
    eos_ids = [eos_id]
    # Instruct models end a turn with <|im_end|> but may also emit the document separator
    # <|endoftext|>; Qwen's own generation_config stops on both.
    if "<|endoftext|>" in tokens and tokens.index("<|endoftext|>") != eos_id:
        eos_ids.append(tokens.index("<|endoftext|>"))
    return {
        "bos_token_id": _field(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids,
        "pad_token_id": _field(meta, "tokenizer.ggml.padding_token_id"),
    }


def build_tokenizer(meta: Mapping[str, Any]) -> HFTokenizer:
    """Byte-level BPE tokenizer equivalent to Qwen2's, from `tokenizer.ggml.*` metadata."""
    model = _field(meta, "tokenizer.ggml.model")
    pre = _field(meta, "tokenizer.ggml.pre")
    if (model, pre) != ("gpt2", "qwen2"):
        raise ValueError(
            f"tokenizer.ggml.model/pre are {model!r}/{pre!r}; only 'gpt2'/'qwen2' is supported"
        )
    tokens = _field(meta, "tokenizer.ggml.tokens")
    token_types = _field(meta, "tokenizer.ggml.token_type")
    merges = []
    for merge in _field(meta, "tokenizer.ggml.merges"):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise ValueError(f"tokenizer.ggml.merges entry {merge!r} is not two tokens")
        merges.append((pair[0], pair[1]))

    tokenizer = HFTokenizer(
        models.BPE(
            vocab={token: index for index, token in enumerate(tokens)},
            merges=merges,
            unk_token=None,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    # The GGUF records no normalizer, but transformers' Qwen2 tokenizer applies NFC; without it
    # only non-NFC input such as "Cafe\u0301" would tokenize differently.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    for index, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED):
            added = AddedToken(
                token, special=token_type == _TOKEN_TYPE_CONTROL, normalized=False
            )
            # Added in id order; each is already in the vocab, so it keeps its id.
            if token_type == _TOKEN_TYPE_CONTROL:
                tokenizer.add_special_tokens([added])
            else:
                tokenizer.add_tokens([added])
            if tokenizer.token_to_id(token) != index:
                raise ValueError(f"added token {token!r} got id {tokenizer.token_to_id(token)}, "
                                 f"expected {index}")
    return tokenizer


def _write_tokenizer_files(
    meta: Mapping[str, Any], out_dir: pathlib.Path, *, model_max_length: int
) -> None:
    tokenizer = build_tokenizer(meta)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    tokens = _field(meta, "tokenizer.ggml.tokens")
    token_types = _field(meta, "tokenizer.ggml.token_type")
    added_tokens_decoder = {
        str(index): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token_type == _TOKEN_TYPE_CONTROL,
        }
        for index, (token, token_type) in enumerate(zip(tokens, token_types))
        if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    }
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    tokenizer_config = {
        "add_bos_token": bool(add_bos),
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": None,
        "chat_template": _field(meta, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": tokens[_field(meta, "tokenizer.ggml.eos_token_id")],
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": tokens[_field(meta, "tokenizer.ggml.padding_token_id")],
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)


def _write_weights(tensors: list[GgufTensor], path: pathlib.Path, *, progress: bool) -> None:
    """Stream the dequantized tensors into a safetensors file, a block of rows at a time.

    safetensors' own writer needs every tensor alive at once (2.5 GB of float32 here; peak RSS
    ~3.6 GB). The format is a length-prefixed JSON header followed by raw little-endian data,
    so writing it directly keeps only one block in memory: peak RSS measured 1.1 GB, most of
    it the memory-mapped GGUF.
    """
    entries = []
    offset = 0
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for tensor in tensors:
        name = hf_tensor_name(tensor.name)
        shape = list(tensor.shape)
        nbytes = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        entries.append((tensor, name, shape))
        offset += nbytes
    if len(header) - 1 != len(entries):
        raise ValueError(f"{len(entries) - len(header) + 1} GGUF tensors map to duplicate HF names")

    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # 8-byte aligned data, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        for tensor, name, shape in tqdm(entries, desc="convert", unit="tensor", disable=not progress):
            rows = 0
            for values in dequantize_in_row_blocks(tensor):
                if list(values.shape[1:]) != shape[1:]:
                    raise ValueError(
                        f"GGUF tensor {tensor.name} dequantized to rows of shape "
                        f"{list(values.shape[1:])}, expected {shape[1:]}"
                    )
                out.write(values.data)
                rows += values.shape[0]
            if rows != shape[0]:
                raise ValueError(f"GGUF tensor {tensor.name} dequantized to {rows} rows, expected {shape[0]}")


def dequantize_in_row_blocks(tensor: GgufTensor, block_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """Yield the tensor's float32 values in blocks of whole rows, in row-major order.

    `tensor.data` has one leading index per HF row (quantized rows as raw bytes), so a slice
    of it dequantizes on its own. Blocking keeps dequantize's temporaries small: done whole,
    the 151936 x 896 embedding costs several times its 545 MB of output.
    """
    rows_per_block = max(1, block_bytes // (4 * math.prod(tensor.shape[1:])))
    for start in range(0, tensor.shape[0], rows_per_block):
        block = tensor.data[start : start + rows_per_block]
        yield np.ascontiguousarray(gguf.quants.dequantize(block, tensor.kind), dtype="<f4")


def _write_json(path: pathlib.Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
