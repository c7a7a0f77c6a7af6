"""``qwenjax`` command line: fetch-model, convert, generate, plan, serve, run-batch.

Only results go to stdout (generated text, a directory); progress and logs go to stderr.
"""
from __future__ import annotations

import argparse
import decimal
import pathlib
import sys
import time


# quantization.QUANTIZATION_CHOICES, spelled out so that parsing the command line imports
# no jax (tests/test_cli.py checks that the two agree).
QUANTIZATION_CHOICES = ("fp8", "int4", "int8", "awq", "gptq", "awq_marlin", "gptq_marlin")
QUANTIZATION_HELP = ("fp8: projection weights in float8_e4m3fn with per-channel scales (half the "
                     "bytes of bf16); int4/int8: integers with a scale and zero point per 128 "
                     "input channels, rounded to nearest (a quarter/half the bytes); awq/gptq "
                     "(or vLLM's *_marlin): the checkpoint's own AWQ/GPTQ codes. Activations stay "
                     "in --dtype. Default: none, except that an FP8/AWQ/GPTQ checkpoint stays so")


def add_model_arguments(p) -> None:
    """--model, --tp, --pp, --devices, --dtype, --quantization (generate and serve)."""
    p.add_argument("--model", "--model-path", dest="model", default=None,
                   help="HF checkpoint directory, Hugging Face Hub id already in the local Hub "
                        "cache (Qwen/Qwen2.5-7B-Instruct: nothing is downloaded), orbax "
                        "checkpoint (qwenjax convert) or preset name (qwen2.5-0.5b … qwen2.5-72b, "
                        "random weights); default: the fetched Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--revision", default=None,
                   help="with a Hub id: the branch, tag or commit of it to read from the cache "
                        "(default main)")
    p.add_argument("--download-dir", default=None, metavar="DIR",
                   help="the Hugging Face Hub cache to find Hub ids in (vLLM's; default "
                        "$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)")
    # vLLM's names (--tensor-parallel-size, -tp, …) and SGLang's (--model-path, --tp-size, …) work
    # too, so their command lines carry over.
    p.add_argument("--tp", "--tensor-parallel-size", "-tp", "--tp-size", dest="tp", type=int, default=1,
                   help="tensor-parallel degree (devices per stage)")
    p.add_argument("--pp", "--pipeline-parallel-size", "-pp", "--pp-size", dest="pp", type=int, default=1,
                   help="pipeline stages (contiguous layer ranges, each on --tp devices; tp × pp in all)")
    p.add_argument("--devices", type=parse_devices, default=None,
                   help="comma-separated device indices, e.g. 2,3 (two servers can share a box on "
                        "disjoint devices); default: the first tp × pp")
    p.add_argument("--dtype", default=None, type=parse_dtype, metavar="DTYPE",
                   help="bfloat16, float16 (or half), float32 (or float), auto: the --mesh "
                        "config's (serve), else an orbax checkpoint's own, else bfloat16 on GPUs "
                        "and float32 on CPU (faster there); auto is the default")
    p.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_CHOICES,
                   help=QUANTIZATION_HELP)


DTYPE_NAMES = {"auto": None, "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
               "half": "float16", "fp16": "float16", "float32": "float32", "float": "float32",
               "fp32": "float32"}


def parse_dtype(text: str) -> str | None:
    """--dtype, in vLLM's spellings too (auto: None, half, float)."""
    if text not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; use one of "
                                         f"{', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[text]


def parse_devices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--devices takes comma-separated indices like 0,1; got {text!r}")


_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_token_count(text: str) -> int:
    """A token count as vLLM's flags take it: ``32768``, ``32k`` (decimal: 32000, fractions
    allowed: ``25.6k``), ``32K`` (binary: 32768)."""
    number, unit = (text[:-1], _UNITS[text[-1]]) if text[-1:] in _UNITS else (text, 1)
    try:  # Decimal: "4.02k" is exactly 4020 (a float product is not)
        value = decimal.Decimal(number) * unit if unit in (10**3, 10**6, 10**9) else int(number) * unit
    except (ValueError, decimal.InvalidOperation):
        value = None
    if value is None or not decimal.Decimal(value).is_finite() or value != int(value):
        raise argparse.ArgumentTypeError(
            f"expected a whole number of tokens like 32768, 32k (= 32000) or 32K (= 32768), got {text!r}")
    return int(value)


def parse_sizes(text: str) -> list[int]:
    """Sizes as a list flag takes them, each word one or several: ``8``, ``1,8,32``."""
    try:
        return [int(word) for word in text.split(",") if word.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 8 or 1,8,32, got {text!r}") from None


class ExtendSizes(argparse.Action):
    """``nargs="+"`` with ``type=parse_sizes``: every word's sizes in one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        sizes = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, sizes + [size for word in values for size in word])


def parse_max_model_len(text: str) -> int:
    """--max-model-len: a token count, or ``auto``/-1 (vLLM's): the model's max context, lowered
    to what the KV cache holds."""
    if text.strip().lower() in ("auto", "-1"):
        return -1
    value = parse_token_count(text.strip())
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive token count or auto, got {text!r}")
    return value


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_fetch_model(args) -> int:
    from qwenjax.model_fetch import fetch_default_model

    print(fetch_default_model(progress=not args.quiet))
    return 0


def cmd_convert(args) -> int:
    orbax_form = [f"--{name}" for name in ("model", "mesh", "out", "dtype", "quantization")
                  if getattr(args, name) is not None]
    if args.gguf is not None or args.out_dir is not None:
        if orbax_form:
            raise ValueError(f"give either GGUF OUT (GGUF → HF directory) or --model/--mesh/--out "
                             f"(orbax checkpoint), not both; got positional arguments and "
                             f"{', '.join(orbax_form)}")
        if args.out_dir is None:
            raise ValueError("convert GGUF OUT: the output directory OUT is missing")
        from qwenjax.gguf_convert import convert_gguf_to_hf

        convert_gguf_to_hf(args.gguf, args.out_dir, progress=True)
        print(args.out_dir)
        return 0
    missing = [f"--{name}" for name in ("model", "mesh", "out") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"convert to an orbax checkpoint needs --model, --mesh and --out; missing "
                         f"{', '.join(missing)} (or give GGUF OUT to make an HF directory)")
    from qwenjax.mesh_config import load_mesh_config
    from qwenjax.orbax_checkpoint import convert_to_orbax

    mesh_config = load_mesh_config(args.mesh)
    dtype = args.dtype or mesh_config.dtype
    start = time.perf_counter()
    out = convert_to_orbax(args.model, args.out, tp=mesh_config.tp, dtype=dtype, progress=True,
                           quantization=args.quantization)
    _log(f"wrote {args.model} for {mesh_config.name} (tp={mesh_config.tp}, {dtype}) in "
         f"{time.perf_counter() - start:.1f}s")
    print(out)
    return 0


def _structured_outputs(args):
    """StructuredOutputs from --json-schema / --regex / --choice, or None."""
    given = {name: value for name, value in (("json", args.json_schema), ("regex", args.regex),
                                             ("choice", args.choice)) if value is not None}
    if not given:
        return None
    from qwenjax.structured import StructuredOutputs

    if isinstance(given.get("json"), str) and given["json"].startswith("@"):
        given["json"] = pathlib.Path(given["json"][1:]).read_text()
    return StructuredOutputs(**given)


def cmd_generate(args) -> int:
    from qwenjax.llm import LLM
    from qwenjax.loading import device_summary
    from qwenjax.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                            structured_outputs=_structured_outputs(args))
    from qwenjax.loading import names_preset

    if names_preset(args.model):
        raise ValueError(f"--model {args.model}: random-weight presets have no tokenizer; "
                         "pass an HF checkpoint directory to generate text")
    start = time.perf_counter()
    # One request: a single decode row and prefill row; compile lazily what the request uses.
    llm = LLM(args.model, tp=args.tp, pp=args.pp, devices=args.devices, dtype=args.dtype,
              quantization=args.quantization, chat_template=args.chat_template,
              kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
              max_num_seqs=1, max_prefill_seqs=1, warm_up=False,
              revision=args.revision, download_dir=args.download_dir)
    _log(f"loaded {llm.lm.source} ({llm.lm.describe()}, tp={args.tp}, pp={args.pp}) on {device_summary()} "
         f"in {time.perf_counter() - start:.1f}s")
    if llm.tokenizer is None:
        raise ValueError(f"--model {args.model}: the checkpoint has no tokenizer.json")
    start = time.perf_counter()
    output = None
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    for output in llm.stream(prompt, params, chat=args.chat):
        print(output.delta_text, end="", flush=True)
    print()
    elapsed = time.perf_counter() - start
    _log(f"{len(output.prompt_token_ids)} prompt + {len(output.token_ids)} generated tokens in "
         f"{elapsed:.2f}s (includes compilation); finish reason: {output.finish_reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an unknown flag of another server's command line (SGLang's --device)
    # must be refused, not taken for a prefix of one of ours (--devices).
    parser = argparse.ArgumentParser(prog="qwenjax", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=lambda **kw: argparse.ArgumentParser(allow_abbrev=False, **kw))

    p = sub.add_parser("fetch-model", help="build the default Qwen2.5-Coder-0.5B-Instruct into the "
                                           "cache and print its directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser(
        "convert", help="GGUF OUT: a Qwen2 GGUF file → an HF checkpoint directory; "
                        "--model --mesh --out: an HF directory or GGUF → a sharded orbax checkpoint "
                        "laid out for the mesh's tp",
        usage="qwenjax convert GGUF OUT\n       qwenjax convert --model DIR|GGUF --mesh MESH "
              "--out CKPT [--dtype DTYPE] [-q fp8]")
    p.add_argument("gguf", nargs="?", default=None, help="GGUF file (HF directory form)")
    p.add_argument("out_dir", nargs="?", default=None, metavar="out",
                   help="HF directory to write (HF directory form)")
    p.add_argument("--model", default=None, help="HF checkpoint directory or GGUF file to convert")
    p.add_argument("--mesh", default=None, help="mesh config name or YAML path (configs/meshes): "
                                                "its tp fixes the layout, its dtype the default dtype")
    p.add_argument("--out", default=None, help="orbax checkpoint directory to write (new or empty)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="dtype to store (default: the mesh config's)")
    p.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_CHOICES,
                   help="store quantized projection weights: " + QUANTIZATION_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate for one prompt, streaming only the text to stdout")
    add_model_arguments(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=parse_max_model_len, default=4096,
                   help="longest prompt + output the engine sizes its KV cache for")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT as a user message with the "
                                                       "model's chat template")
    p.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="with --chat: this Jinja chat template instead of the checkpoint's")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="fp8: KV cache in e4m3 with a scale per token and head")
    structure = p.add_argument_group("structured output (one of)")
    structure.add_argument("--json-schema", default=None,
                           help="the output follows this JSON schema (JSON text, or @FILE)")
    structure.add_argument("--regex", default=None, help="the output matches this regex")
    structure.add_argument("--choice", action="append", default=None,
                           help="the output is one of these strings (repeatable)")
    p.add_argument("prompt")
    p.set_defaults(func=cmd_generate)

    from qwenjax.plan_cli import add_plan_parser
    from server.cli import add_run_batch_parser, add_serve_parser

    add_plan_parser(sub)
    add_serve_parser(sub)
    add_run_batch_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        _log(f"qwenjax {args.command}: error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
