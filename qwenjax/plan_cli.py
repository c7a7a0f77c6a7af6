"""``qwenjax plan``: per-device memory, KV capacity and modeled decode speed of a model on a box.

Registered on the main parser by ``add_plan_parser(sub)``. Nothing is loaded onto
a device: the plan is arithmetic over the model's parameter declaration.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qwenjax.config import PRESETS, ModelConfig, is_preset, preset
from qwenjax.cli import QUANTIZATION_CHOICES


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="will a model fit on a mesh: per-device weights, KV capacity, modeled ms/token",
        description="Per-device weights and KV cache of a model on a mesh config, whether it "
                    "fits, and a modeled batch-1 decode time split into HBM, collective and "
                    "pipeline parts (docs/meshes.md).")
    p.add_argument("--model", required=True,
                   help=f"preset ({', '.join(PRESETS)}), an HF checkpoint directory / config.json, or a GGUF file")
    p.add_argument("--mesh", required=True,
                   help="mesh config name under configs/meshes (or $QWENJAX_MESH_DIR), or a YAML path")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="tokens per sequence (default: the mesh's max_model_len, capped at the model's)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences per step, sizes the workspace (default 256)")
    p.add_argument("--context", type=int, default=None,
                   help="KV tokens read by the modeled decode step (default 2048)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="weight and KV dtype (default: the mesh's)")
    p.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_CHOICES,
                   help="fp8, int4 or int8 projection weights (default: none, or the "
                        "checkpoint's own FP8/AWQ/GPTQ)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="fp8: KV cache in e4m3 with a scale per token and head")
    p.add_argument("--speculative-model", default=None, metavar="MODEL",
                   help="a draft model (preset or checkpoint directory) for speculative decoding: "
                        "its weights and KV cache counted on the same devices")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    return p


def resolve_model(name_or_path: str) -> ModelConfig:
    if is_preset(name_or_path):
        return preset(name_or_path)
    path = Path(name_or_path)
    if path.suffix == ".gguf" and path.is_file():
        from qwenjax.gguf_model import prepare

        return ModelConfig.from_hf(prepare(path))  # the GGUF's metadata as config.json
    if path.is_dir() and (path / "config.json").is_file() or path.is_file():
        return ModelConfig.from_hf(path)
    raise ValueError(f"--model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
                     "nor a checkpoint directory with config.json nor a GGUF file")


def cmd_plan(args) -> int:
    from qwenjax.mesh_config import load_mesh_config
    from qwenjax.planner import DEFAULT_CONTEXT, plan

    config = resolve_model(args.model)
    from qwenjax.quantization import DEFAULT_GROUP_SIZE, effective_scheme

    quantization, group_size = args.quantization, DEFAULT_GROUP_SIZE
    if Path(args.model).is_dir():
        from qwenjax.weights import checkpoint_layout

        layout = checkpoint_layout(config, args.model, 1, quantization=quantization)
        quantization, group_size = layout.quantization, layout.group_size
    else:
        quantization = effective_scheme(quantization, None)
    mesh = load_mesh_config(args.mesh)
    result = plan(config, mesh, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  dtype=args.dtype, quantization=quantization, kv_cache_dtype=args.kv_cache_dtype,
                  context=DEFAULT_CONTEXT if args.context is None else args.context,
                  group_size=group_size,
                  draft=None if args.speculative_model is None else resolve_model(args.speculative_model))
    print(result.to_json() if args.json else result.format())
    # A plan that does not fit is an answer, not a failure of the command.
    return 0
