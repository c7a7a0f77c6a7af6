"""Model configuration: read from an HF ``config.json`` or taken from a preset.

``ModelConfig`` is static (hashable, frozen) so it can be closed over by jitted
functions. It describes the checkpoint as published; how heads are padded or
replicated for a given mesh is ``parallel.HeadPlan``'s business.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

_BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (arXiv:2309.00071); ``None`` on the config means plain RoPE."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # Scale applied to cos/sin; YaRN's default is 0.1 * ln(factor) + 1.
    attention_factor: float | None = None

    @property
    def mscale(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_ids: tuple[int, ...] = (151645,)
    name: str = "qwen2"

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention")

    # ---- sizes -----------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def max_context(self) -> int:
        """Longest sequence the model serves (YaRN stretches the original window)."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        stretched = int(self.rope_scaling.original_max_position_embeddings * self.rope_scaling.factor)
        return max(self.max_position_embeddings, stretched)

    def param_count(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2  # q, o, k, v
        attn += (self.num_heads + 2 * self.num_kv_heads) * hd  # q/k/v bias
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d  # two RMSNorm weights
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * per_layer + embed + head + d  # final norm

    def weight_bytes(self, dtype: str = "bfloat16") -> int:
        return self.param_count() * _BYTES_PER_DTYPE[dtype]

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        # K and V, every layer, every KV head.
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * _BYTES_PER_DTYPE[dtype]

    # ---- construction ----------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read an HF ``config.json`` (a file or the checkpoint directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path) as f:
            raw = json.load(f)
        return cls.from_hf_dict(raw, name=path.parent.name)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], name: str = "qwen2") -> "ModelConfig":
        model_type = raw.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ValueError(f"config.json model_type is {model_type!r}; qwenjax serves 'qwen2'")
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        theta, scaling = _read_rope(raw)
        eos = raw.get("eos_token_id", 151645)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,) if eos is not None else ()
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads", num_heads),
            head_dim=raw.get("head_dim") or hidden // num_heads,
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )

    def with_overrides(self, overrides: Mapping[str, Any]) -> "ModelConfig":
        """This config with config.json keys replaced (vLLM's ``hf_overrides``, SGLang's
        ``--json-model-override-args``): e.g. ``{"rope_scaling": {"type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 32768}}``, Qwen2.5's way to 131k tokens. Only the
        keys that leave the weights' shapes as they are (OVERRIDABLE_KEYS)."""
        if not isinstance(overrides, Mapping):
            raise ValueError(f"hf_overrides must be an object of config.json keys, got {overrides!r}")
        refused = sorted(set(overrides) - OVERRIDABLE_KEYS)
        if refused:
            raise ValueError(f"hf_overrides {refused}: only {sorted(OVERRIDABLE_KEYS)} may be "
                             "overridden (the others fix the weights' shapes)")
        raw = self.to_hf_dict()
        if "rope_parameters" in overrides:  # (transformers 5's layout wins over rope_scaling)
            raw.pop("rope_scaling", None)
        return ModelConfig.from_hf_dict({**raw, **overrides}, name=self.name)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers ``Qwen2Config`` keys for this config (used by tests and tools)."""
        out: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }
        if self.rope_scaling is not None:
            s = self.rope_scaling
            out["rope_scaling"] = {
                "type": "yarn", "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
            }
            if s.attention_factor is not None:
                out["rope_scaling"]["attention_factor"] = s.attention_factor
        return out


# config.json keys an override may set: positions and RoPE, norm epsilon, special token ids.
OVERRIDABLE_KEYS = frozenset(("rope_scaling", "rope_parameters", "rope_theta",
                              "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                              "eos_token_id"))


def _read_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Both layouts: transformers-5 ``rope_parameters`` and older ``rope_theta`` + ``rope_scaling``."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    elif raw.get("rope_scaling"):
        # A rope_scaling added to a transformers-5 config.json (as Qwen2.5's docs say to add
        # YaRN) is what the user asked for: it wins over rope_parameters' type and factors.
        params = {**params, **raw["rope_scaling"]}
        if "type" in raw["rope_scaling"]:
            params.pop("rope_type", None)
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "yarn":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported (default or yarn)")
    if "factor" not in params:
        raise ValueError("rope scaling 'yarn' needs a 'factor'")
    original = params.get("original_max_position_embeddings")
    if original is None:
        # transformers' convention when the field is missing (standardize_rope_params).
        original = raw.get("max_position_embeddings", 32768)
    return theta, RopeScaling(
        factor=float(params["factor"]),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
    )


def _qwen25(hidden, inter, layers, heads, kv, vocab, tied, name) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, name=name,
    )


# Published Qwen2.5-*-Instruct dimensions (config.json of each release).
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, 151936, True, "qwen2.5-0.5b"),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, 151936, True, "qwen2.5-1.5b"),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, 151936, True, "qwen2.5-3b"),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, 152064, False, "qwen2.5-7b"),
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8, 152064, False, "qwen2.5-14b"),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8, 152064, False, "qwen2.5-32b"),
    "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8, 152064, False, "qwen2.5-72b"),
}


def preset(name: str) -> ModelConfig:
    key = name.lower().removesuffix("-instruct")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]


def is_preset(name: str) -> bool:
    return name.lower().removesuffix("-instruct") in PRESETS
