"""``qwenjax serve`` (and ``python -m server``): load a model, warm it up, serve gRPC until SIGTERM.

Start-up order: listen first (health NOT_SERVING), load and compile on a thread of
its own, then health SERVING. SIGTERM or SIGINT: refuse new calls (UNAVAILABLE),
health NOT_SERVING, let in-flight requests finish within --drain-timeout, exit 0.

Multi-host (--coordinator/--num-processes/--process-id, docs/multihost.md): every process
loads its shards of the model over the one global mesh; process 0 serves gRPC and runs the
scheduler, the others only mirror its steps and exit 0 when it stops.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import signal
import sys
import threading
from typing import Sequence
import time

from qwenjax.cli import (ExtendSizes, add_model_arguments, parse_max_model_len, parse_sizes,
                         parse_token_count)
from qwenjax.reasoning import REASONING_PARSERS  # no jax: parsing the command line stays quick

log = logging.getLogger("qwenjax.server")

TOKEN_ENV = "QWENJAX_API_TOKEN"


# Flags of `vllm serve` / `sglang.launch_server` that ask for what qwenjax does anyway (or has
# no use for): accepted so that their command lines run unchanged, and logged at start-up.
NO_OP_FLAGS = {
    "--trust-remote-code": "Qwen2 is built in: no code from the checkpoint runs",
    "--enforce-eager": "there are no CUDA graphs: XLA compiles each step shape once",
    "--disable-cuda-graph": "as --enforce-eager",
    "--enable-torch-compile": "XLA compiles every step",
    "--enable-chunked-prefill": "prefill is always chunked (--prefill-chunk)",
    "--disable-log-stats": "no periodic stats log; Prometheus metrics are served instead",
    "--disable-log-requests": "requests are logged only with --enable-log-requests",
    "--disable-custom-all-reduce": "XLA inserts the collectives",
    "--enable-metrics": "Prometheus /metrics is always served (on --http-port and --metrics-port)",
    "--enable-lora": "adapters load with --lora-modules or at run time (--max-loras slots)",
    "--async-scheduling": "scheduling is asynchronous by default (--no-async-scheduling: off)",
    "--disable-uvicorn-access-log": "there is no access log",
    "--disable-fastapi-docs": "there are no /docs pages",
    "--enable-server-load-tracking": "GET /load always answers",
    "--enable-prompt-tokens-details": "usage always has prompt_tokens_details.cached_tokens",
    "--disable-frontend-multiprocessing": "the HTTP API runs in the server's process",
}


# The same for flags that take a value: accepted with any value, logged with it.
NO_OP_VALUE_FLAGS = {
    "--device": "the platform is JAX's: the GPUs (CUDA or ROCm) when its plugin is installed, "
                "else the CPU (JAX_PLATFORMS=cpu forces it)",
    "--task": "the checkpoint decides: a causal LM generates and embeds, a sequence-"
              "classification or reward checkpoint classifies and scores",
    "--runner": "as --task",
    "--root-path": "routes are served at /; a proxy in front strips its prefix",
    "--swap-space": "preempted requests recompute their K/V (--kv-offloading-size keeps evicted "
                    "prefix pages in host memory)",
    "--uvicorn-log-level": "there is no access log; --log-level sets the server's level",
    "--guided-decoding-backend": "llguidance is the structured-outputs backend",
    "--grammar-backend": "as --guided-decoding-backend",
    "--attention-backend": "decode attention is qwenjax's Pallas kernel on GPUs, XLA elsewhere",
    "--cuda-graph-max-bs": "there are no CUDA graphs: XLA compiles each step shape once",
    "--max-seq-len-to-capture": "as --cuda-graph-max-bs",
    "--distributed-executor-backend": "processes join through jax.distributed (--coordinator)",
    "--tokenizer-mode": "the tokenizer is tokenizer.json's (the fast one)",
}


class _NoOpValue(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        flags = list(getattr(namespace, "no_op_flags", None) or [])
        flags.append(f"{self.option_strings[0]} {values}")
        namespace.no_op_flags = flags


def _no_op_reason(entry: str) -> str:
    flag = entry.split(" ", 1)[0]
    return NO_OP_FLAGS.get(flag) or NO_OP_VALUE_FLAGS[flag]


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p, multihost=True)
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    net.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    net.add_argument("--http-port", type=int, default=8000,
                     help="OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                          "/v1/models, …) on --host (0: off)")
    net.add_argument("--metrics-port", type=int, default=9400,
                     help="Prometheus /metrics HTTP port on --host (0: off)")
    net.add_argument("--metrics-aliases", type=parse_metrics_aliases, default=("vllm", "sglang"),
                     metavar="vllm,sglang|none",
                     help="/metrics also serves the core series under vLLM's (vllm:*) and SGLang's "
                          "(sglang:*) names with their model_name label, for their dashboards and "
                          "autoscalers (docs/operations.md); none: qwenjax:* alone")
    net.add_argument("--max-queue", type=int, default=256,
                     help="requests admitted but without a first token before RESOURCE_EXHAUSTED "
                          "(0: no limit)")
    net.add_argument("--max-queued-tokens", type=int, default=262_144,
                     help="prompt tokens of those requests before RESOURCE_EXHAUSTED (0: no limit)")
    net.add_argument("--max-request-bytes", type=int, default=4 << 20,
                     help="larger requests get INVALID_ARGUMENT")
    net.add_argument("--api-token", "--api-key", dest="api_token", nargs="+", action="extend",
                     default=None, metavar="TOKEN",
                     help=f"require 'authorization: Bearer TOKEN' on Inference calls; several "
                          f"tokens (after one flag, as vLLM's, or repeated) are each accepted "
                          f"(default: ${TOKEN_ENV}, else vLLM's $VLLM_API_KEY; prefer a variable, "
                          f"arguments show up in ps)")
    net.add_argument("--tls-cert", "--ssl-certfile", dest="tls_cert", default=None,
                     help="PEM certificate chain (with --tls-key)")
    net.add_argument("--tls-key", "--ssl-keyfile", dest="tls_key", default=None,
                     help="PEM private key (with --tls-cert)")
    net.add_argument("--allowed-origins", type=parse_json_list, default=("*",), metavar="JSON",
                     help="origins whose browser pages may call the HTTP API (CORS), a JSON list "
                          "like '[\"https://ui.example\"]' (default: '[\"*\"]', every origin, as vLLM)")
    net.add_argument("--allowed-methods", type=parse_json_list, default=("*",), metavar="JSON",
                     help="HTTP methods those pages may use (default: '[\"*\"]')")
    net.add_argument("--allowed-headers", type=parse_json_list, default=("*",), metavar="JSON",
                     help="request headers those pages may send (default: '[\"*\"]')")
    net.add_argument("--allow-credentials", action="store_true",
                     help="let them send cookies and HTTP auth (the origin is echoed, not '*')")
    net.add_argument("--profiler-dir", default=None, metavar="DIR",
                     help="serve POST /start_profile and /stop_profile (vLLM's, SGLang's): a "
                          "jax.profiler trace of the server between the two, written under DIR "
                          "(default: $QWENJAX_PROFILER_DIR or vLLM's $VLLM_TORCH_PROFILER_DIR; "
                          "unset: no such routes)")
    net.add_argument("--drain-timeout", type=float, default=30.0,
                     help="seconds in-flight requests get to finish after SIGTERM")
    net.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error", "critical"],
                     type=str.lower, help="the server's logging level (default info)")
    net.add_argument("--step-timeout", "--watchdog-timeout", dest="step_timeout", type=float, default=300.0,
                     help="an engine step running longer (a hung device or collective) turns health "
                          "NOT_SERVING and logs the engine thread's stack; 0 = off (default 300)")


def add_engine_arguments(p: argparse.ArgumentParser, *, multihost: bool) -> None:
    """The model, engine, sampling-default and request-handling flags (serve and run-batch)."""
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as --model takes it (vLLM's `vllm serve MODEL` form)")
    model = p.add_argument_group("model")
    add_model_arguments(model)
    model.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                       help="dummy: random weights of the checkpoint's shapes (config.json only: "
                            "trials and benchmarks without the weights; vLLM's); default: read them")
    model.add_argument("--hf-overrides", "--json-model-override-args", dest="hf_overrides",
                       type=parse_json_object, default=None, metavar="JSON",
                       help="config.json keys to replace (vLLM's --hf-overrides, SGLang's "
                            "--json-model-override-args): the positions and RoPE ones, e.g. "
                            "'{\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0, "
                            "\"original_max_position_embeddings\": 32768}}' for Qwen2.5's 131k context")
    model.add_argument("--rope-scaling", type=parse_json_object, default=None, metavar="JSON",
                       help="vLLM's older form of --hf-overrides '{\"rope_scaling\": JSON}'")
    model.add_argument("--rope-theta", type=float, default=None,
                       help="vLLM's older form of --hf-overrides '{\"rope_theta\": X}'")
    model.add_argument("--tokenizer", "--tokenizer-path", dest="tokenizer", default=None, metavar="DIR",
                       help="a directory with tokenizer.json to use instead of the model's")
    model.add_argument("--mesh", default=None,
                       help="mesh config name under configs/meshes or a YAML path (instead of --tp): "
                            "its axes, and its dtype, page size, KV fraction and max_model_len as "
                            "defaults; required with more than one process")
    model.add_argument("--data-parallel-size", "-dp", "--dp-size", dest="data_parallel_size", type=int, default=1,
                       help="replicas of the model, each on its own tp × pp devices with its own "
                            "KV cache and engine; requests go to the least loaded (one host; "
                            "a --mesh config sets it with axes.dp)")

    if multihost:
        multi = p.add_argument_group("multi-host (docs/multihost.md)")
        multi.add_argument("--coordinator", "--dist-init-addr", dest="coordinator", default=None,
                           help="HOST:PORT of process 0's jax.distributed coordinator (default: "
                                "$QWENJAX_COORDINATOR)")
        multi.add_argument("--num-processes", "--nnodes", dest="num_processes", type=int, default=None,
                           help="processes in the mesh, one per host (default: $QWENJAX_NUM_PROCESSES)")
        multi.add_argument("--process-id", "--node-rank", dest="process_id", type=int, default=None,
                           help="this process's rank; 0 serves gRPC (default: $QWENJAX_PROCESS_ID)")
        multi.add_argument("--plan-port", type=int, default=None,
                           help="port on process 0's host for the step-plan channel (default: "
                                "$QWENJAX_PLAN_PORT, else the coordinator port + 1)")

    engine = p.add_argument_group("engine")
    engine.add_argument("--max-model-len", "--context-length", dest="max_model_len",
                        type=parse_max_model_len, default=None,
                        help="prompt + output tokens of one request at most: 32768, 32k (= 32000) "
                             "or 32K (= 32768); auto (or -1): the model's max context, lowered to "
                             "what the KV cache holds (default: the model's max context)")
    engine.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                        help="auto: KV cache in the model dtype; fp8: float8 (e4m3) with a scale "
                             "per token and head, about half the KV memory (docs/quantization.md)")
    engine.add_argument("--max-num-seqs", "--max-running-requests", dest="max_num_seqs", type=int,
                        default=64, help="requests decoding at once")
    engine.add_argument("--max-num-batched-tokens", type=parse_token_count, default=2048,
                        help="tokens per step (2048, 2k, 2K)")
    engine.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=None,
                        help="tokens per KV cache page (vLLM's --block-size, SGLang's --page-size; "
                             "default: the --mesh config's, else 16)")
    engine.add_argument("--seed", "--random-seed", dest="seed", type=int, default=None,
                        help="seed the seeds of requests that give none, so that a rerun of the same "
                             "requests samples the same tokens (default: drawn from the OS)")
    engine.add_argument("--prefill-chunk", "--chunked-prefill-size", dest="prefill_chunk",
                        type=parse_token_count, default=512,
                        help="prompt tokens of one request per step (SGLang's "
                             "--chunked-prefill-size; prefill is always chunked)")
    engine.add_argument("--max-prefill-seqs", type=int, default=4, help="prefill rows per step")
    engine.add_argument("--decode-buckets", "--cuda-graph-bs", dest="decode_buckets", nargs="+",
                        type=parse_sizes, action=ExtendSizes, default=None, metavar="N",
                        help="decode batch sizes compiled, each a step program a step's decode rows "
                             "are padded up to (SGLang's --cuda-graph-bs; e.g. 1 8 32 or 1,8,32; "
                             "--max-num-seqs is always one; default: powers of two). Fewer sizes "
                             "compile faster and pad more")
    engine.add_argument("--prefill-buckets", nargs="+", type=parse_sizes, action=ExtendSizes,
                        default=None, metavar="N",
                        help="packed prefill token counts compiled, likewise (the most a step "
                             "holds is always one; default: powers of two from 16)")
    engine.add_argument("--num-pages", type=int, default=None,
                        help="KV cache pages (default: from free device memory)")
    engine.add_argument("--max-total-tokens", type=parse_token_count, default=None,
                        help="KV cache tokens, SGLang's form of --num-pages (rounded up to whole "
                             "pages)")
    engine.add_argument("--compile-workers", type=int, default=None,
                        help="threads that compile or load step programs at start-up (default: one "
                             "per core; on a GPU, one while any program is missing from the cache)")
    engine.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", "--disable-radix-cache",
                        dest="enable_prefix_caching", action="store_false",
                        help="do not reuse the K/V of prompt prefixes computed for earlier requests")
    engine.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true",
                        help="reuse them (the default)")
    engine.add_argument("--kv-offloading-size", type=float, default=0.0, metavar="GiB",
                        help="host memory for KV pages the prefix cache evicts (vLLM's flag): a "
                             "prompt whose prefix was evicted gets its pages copied back instead "
                             "of recomputed (default 0: off)")
    engine.add_argument("--gpu-memory-utilization", "--kv-cache-fraction", "--mem-fraction-static",
                        dest="kv_cache_fraction", type=float, default=None, metavar="F",
                        help="share of each device's memory for weights, workspace and KV cache, in "
                             "(0, 1] (default: the --mesh config's, else 0.9); unused with --num-pages")
    engine.add_argument("--no-async-scheduling", "--disable-overlap-schedule",
                        dest="async_scheduling", action="store_false",
                        help="wait for each step's tokens before scheduling the next (default: the "
                             "next step is scheduled and dispatched while the device runs this one)")
    engine.add_argument("--scheduling-policy", "--schedule-policy", dest="scheduling_policy",
                        default="fcfs", choices=["fcfs", "priority"],
                        help="fcfs: arrival order; priority: GenerateRequest.priority, lower first, "
                             "and preemption takes the newest request of the lowest priority")
    engine.add_argument("--speculative-config", type=parse_json_object, default=None, metavar="JSON",
                        help="speculative decoding, as vLLM's: n-gram drafts from each request's context "
                             "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                             "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}', or a smaller draft "
                             "model with the same tokenizer '{\"model\": DIR, \"num_speculative_tokens\": 4}' "
                             "(default: off)")
    engine.add_argument("--pooler-config", "--override-pooler-config", dest="pooler_config",
                        type=parse_json_object, default=None, metavar="JSON",
                        help="how pooling requests pool, as vLLM's: '{\"pooling_type\": \"MEAN\"}' "
                             "(LAST, MEAN or CLS for embeddings and classification; ALL or STEP "
                             "for token tasks), \"step_tag_id\", \"normalize\" (default: the "
                             "checkpoint's: LAST; a sentence-transformers Pooling module's mode; "
                             "STEP at <extra_0> for a process reward model)")

    engine.add_argument("--lora-modules", "--lora-paths", dest="lora_modules", nargs="+", default=None,
                        metavar="NAME=DIR|JSON",
                        help="LoRA adapters (PEFT directories) served beside the base model, as "
                             "name=path or vLLM's JSON '{\"name\": …, \"path\": …}'; a request "
                             "picks one by name (HTTP: as its model; gRPC: lora)")
    engine.add_argument("--max-loras", "--max-loras-per-batch", dest="max_loras", type=int, default=None,
                        help="LoRA slots (adapters resident at once; each step computes all of "
                             "them). Default: one per --lora-modules adapter, or 1 with "
                             "--allow-runtime-lora-updating")
    engine.add_argument("--max-lora-rank", type=int, default=None,
                        help="the largest adapter rank the slots hold (default: the largest "
                             "--lora-modules adapter's, else 16)")
    engine.add_argument("--allow-weight-updates", action="store_true",
                        help="serve POST /update_weights_from_disk {\"model_path\": DIR} (SGLang's): "
                             "the weights of an HF checkpoint of the same architecture on the "
                             "server's disk (e.g. a trainer's latest step) served from the next "
                             "step, without a restart or a recompile; and POST /pause?mode=…, "
                             "/resume, GET /is_paused (vLLM's; SGLang's /pause_generation, "
                             "/continue_generation) to hold generation while a trainer syncs")
    engine.add_argument("--enable-sleep-mode", "--enable-memory-saver", dest="enable_sleep_mode",
                        action="store_true",
                        help="serve POST /sleep?level=1|2, POST /wake_up and GET /is_sleeping "
                             "(vLLM's): the device memory of the weights (level 1: kept in host "
                             "memory; 2: dropped, new ones by /update_weights_from_disk) and of "
                             "the KV cache handed back while idle; also SGLang's "
                             "/release_memory_occupation and /resume_memory_occupation (level 1)")
    engine.add_argument("--allow-runtime-lora-updating", action="store_true",
                        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (and "
                             "gRPC LoadLoRAAdapter/UnloadLoRAAdapter): adapters from the server's "
                             "disk, into free --max-loras slots (vLLM's "
                             "VLLM_ALLOW_RUNTIME_LORA_UPDATING)")
    engine.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                        help="a Jinja chat template (or a file holding one) instead of the "
                             "checkpoint's")
    engine.add_argument("--trust-request-chat-template", action="store_true",
                        help="let a chat request bring its own chat_template (its text; it runs "
                             "in Jinja's sandbox), as vLLM's flag; refused otherwise")
    sampling = p.add_argument_group("sampling defaults (for the fields a request leaves unset)")
    sampling.add_argument("--generation-config", default="auto", metavar="auto|builtin|DIR",
                          help="auto: the model's generation_config.json (temperature, top_k, top_p, "
                               "min_p, repetition_penalty, max_new_tokens); builtin: qwenjax's own "
                               "(temperature 1.0, no top-k/top-p, no penalty); DIR: the "
                               "generation_config.json in DIR (default: auto)")
    sampling.add_argument("--override-generation-config", type=parse_json_object, default=None,
                          metavar="JSON", help="generation_config keys applied on top, e.g. "
                                               "'{\"temperature\": 0.2, \"top_k\": 40}'")

    requests = p.add_argument_group("requests")
    requests.add_argument("--enable-log-requests", "--log-requests", dest="enable_log_requests",
                          action="store_true",
                          help="log each request as it is admitted (prompt token ids up to "
                               "--max-log-len, sampling parameters, adapter) and as it ends "
                               "(reason, TTFT, latency), as vLLM's (logger qwenjax.requests)")
    requests.add_argument("--max-log-len", type=int, default=64,
                          help="prompt token ids shown per logged request (default 64)")
    requests.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                          type=lambda name: name.replace("-", "_"),  # SGLang's deepseek-r1
                          help="split chat replies of reasoning models (QwQ-32B, "
                               "DeepSeek-R1-Distill-Qwen) into reasoning (before </think>) and "
                               "content, as vLLM's: HTTP message reasoning/reasoning_content, "
                               "Responses reasoning items, gRPC Complete.reasoning")
    requests.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                          help="model name(s) the HTTP API answers to; the first is reported (default: "
                               "the model directory's name)")
    requests.add_argument("--enable-auto-tool-choice", action="store_true",
                          help="accepted for vLLM's command lines: tool calls are always parsed")
    requests.add_argument("--tool-call-parser", default="hermes", choices=["hermes", "qwen25", "qwen"],
                          help="Qwen2.5's <tool_call> format, the only one: vLLM's hermes parser, "
                               "SGLang's qwen25")

    same = p.add_argument_group("accepted from vLLM and SGLang command lines, with no effect here")
    for flag, why in NO_OP_FLAGS.items():
        same.add_argument(flag, action="append_const", const=flag, dest="no_op_flags", help=why)
    for flag, why in NO_OP_VALUE_FLAGS.items():
        same.add_argument(flag, action=_NoOpValue, dest="no_op_flags", metavar="VALUE", help=why)


def parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"temperature\": 0.2}}', "
                                         f"got {text!r}")
    return value


def parse_metrics_aliases(text: str) -> tuple[str, ...]:
    from server.metrics import check_aliases

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if names == ("none",):
        return ()
    try:
        if not names:
            raise ValueError("no server named")
        return check_aliases(names)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}; expected a comma-separated list of them, or "
                                         f"none; got {text!r}") from None


def parse_json_list(text: str) -> tuple[str, ...]:
    """A JSON list of strings (vLLM's form for --allowed-origins, …)."""
    from server.cors import parse_list

    try:
        return parse_list(text, "the value")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the model over gRPC (streaming Generate, "
                                            "health, reflection, Prometheus metrics)")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def add_run_batch_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run-batch", help="answer an OpenAI batch file offline (JSONL requests to "
                          "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses), "
                          "as vLLM's run-batch")
    p.add_argument("-i", "--input-file", required=True,
                   help="the batch file: one request per line, OpenAI's batch format (- = stdin)")
    p.add_argument("-o", "--output-file", required=True,
                   help="the answers: one line per request, in input order (- = stdout)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at once (default: 2 × --max-num-seqs × replicas)")
    add_engine_arguments(p, multihost=False)
    p.set_defaults(func=cmd_run_batch)
    return p


def cmd_run_batch(args) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resolve_model_tag(args)
    if args.input_file != "-" and not pathlib.Path(args.input_file).is_file():
        raise FileNotFoundError(f"--input-file {args.input_file}: no such file")
    if args.output_file != "-" and not pathlib.Path(args.output_file).resolve().parent.is_dir():
        raise FileNotFoundError(f"--output-file {args.output_file}: its directory does not exist")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be ≥ 1, got {args.max_concurrency}")
    engines = build_engines(args)
    return asyncio.run(_run_batch(args, engines))


async def _run_batch(args, engines) -> int:
    from qwenjax.engine.async_engine import EngineThread
    from server.batch import read_lines, run_batch

    if len(engines) == 1:
        engine_thread = EngineThread(engines[0])
    else:
        from qwenjax.engine.replicas import EngineReplicas

        engine_thread = EngineReplicas([EngineThread(engine) for engine in engines])
    concurrency = args.max_concurrency or 2 * args.max_num_seqs * len(engines)
    try:
        with contextlib.ExitStack() as stack:
            sink = sys.stdout if args.output_file == "-" else \
                stack.enter_context(open(args.output_file, "w", encoding="utf-8"))
            summary = await run_batch(engine_thread, read_lines(args.input_file), sink,
                                      served_model_names=tuple(args.served_model_name or ()),
                                      reasoning_parser=args.reasoning_parser,
                                      max_concurrency=concurrency)
    finally:
        engine_thread.shutdown()
    log.info("run-batch: %d requests answered (%d succeeded, %d failed) in %.1f s → %s",
             summary.total, summary.succeeded, summary.failed, summary.seconds, args.output_file)
    return 0


def server_config(args):
    from server.app import ServerConfig
    from server.cors import CORS

    return ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port or None,
        http_port=args.http_port or None, served_model_names=tuple(args.served_model_name or ()),
        max_queue=args.max_queue, max_queued_tokens=args.max_queued_tokens,
        max_request_bytes=args.max_request_bytes,
        api_token=tuple(t for t in args.api_token or () if t) or os.environ.get(TOKEN_ENV)
        or os.environ.get("VLLM_API_KEY") or None,
        tls_cert=args.tls_cert, tls_key=args.tls_key, drain_timeout=args.drain_timeout,
        step_timeout=args.step_timeout,
        allow_runtime_lora_updating=getattr(args, "allow_runtime_lora_updating", False),
        reasoning_parser=getattr(args, "reasoning_parser", None),
        allow_weight_updates=getattr(args, "allow_weight_updates", False),
        enable_sleep_mode=getattr(args, "enable_sleep_mode", False),
        trust_request_chat_template=getattr(args, "trust_request_chat_template", False),
        enable_log_requests=args.enable_log_requests, max_log_len=args.max_log_len,
        cors=CORS(args.allowed_origins, args.allowed_methods, args.allowed_headers,
                  args.allow_credentials),
        profiler_dir=_profiler_dir(args.profiler_dir),
        metrics_aliases=args.metrics_aliases)


def _profiler_dir(given: str | None) -> str | None:
    from qwenjax.profiling import profiler_dir

    found = profiler_dir(given or None)
    return None if found is None else str(found)


def load_serving_model(args, mesh=None):
    """The model on --mesh (or --tp/--devices, or ``mesh``: one data-parallel replica's); every
    process of a multi-host mesh runs this."""
    import jax

    from qwenjax import multihost
    from qwenjax.loading import load_model

    dist = multihost.distributed()
    mesh_config = None
    if args.mesh is not None:
        from qwenjax.mesh_config import load_mesh_config

        if args.tp != 1 or args.pp != 1 or args.devices is not None:
            raise ValueError("--mesh sets the devices and the tp/pp degrees; drop --tp, --pp and --devices")
        mesh_config = load_mesh_config(args.mesh)
        multihost.check_mesh(mesh_config, dist)
        mesh = mesh if mesh is not None else mesh_config.jax_mesh()
    elif dist is not None and dist.num_processes > 1:
        raise ValueError(f"--num-processes {dist.num_processes} needs --mesh (a config whose hosts "
                         f"and devices cover all {jax.device_count()} devices)")
    start = time.perf_counter()
    dtype = args.dtype or (mesh_config.dtype if mesh_config is not None else None)
    from qwenjax.lora import parse_lora_modules

    lm = load_model(args.model, tp=args.tp, pp=args.pp, dtype=dtype,
                    devices=args.devices if mesh is None else None, mesh=mesh,
                    quantization=args.quantization,
                    lora_modules=parse_lora_modules(getattr(args, "lora_modules", None)),
                    max_loras=lora_slots(args), max_lora_rank=getattr(args, "max_lora_rank", None),
                    load_format=args.load_format, tokenizer=args.tokenizer,
                    hf_overrides=hf_overrides(args), revision=args.revision,
                    download_dir=args.download_dir)
    shape = ",".join(f"{k}={v}" for k, v in lm.mesh.shape.items())
    log.info("loaded %s (%s, mesh %s) in %.1fs", lm.source, lm.describe(), shape,
             time.perf_counter() - start)
    return lm, mesh_config


def hf_overrides(args) -> dict | None:
    """--hf-overrides, with vLLM's older --rope-scaling and --rope-theta folded in."""
    overrides = dict(args.hf_overrides or {})
    for key, value in (("rope_scaling", args.rope_scaling), ("rope_theta", args.rope_theta)):
        if value is not None:
            if key in overrides:
                raise ValueError(f"--{key.replace('_', '-')} and --hf-overrides both set {key}; give one")
            overrides[key] = value
    return overrides or None


def replica_meshes(args) -> list | None:
    """One mesh per data-parallel replica (``--data-parallel-size``, or a mesh config with
    dp > 1), each over its own tp × pp devices; None for a single replica."""
    import jax

    from qwenjax import multihost
    from qwenjax.loading import select_devices
    from qwenjax.parallel import make_mesh

    dp = getattr(args, "data_parallel_size", 1)
    if dp < 1:
        raise ValueError(f"--data-parallel-size must be ≥ 1, got {dp}")
    if args.mesh is not None:
        from qwenjax.mesh_config import load_mesh_config

        mesh_config = load_mesh_config(args.mesh)
        if mesh_config.dp == 1 and dp == 1:
            return None
        if dp not in (1, mesh_config.dp) or mesh_config.dp == 1:
            raise ValueError(f"--data-parallel-size {dp} and the mesh config's dp = "
                             f"{mesh_config.dp} disagree; set axes.dp in the config")
        dp, full = mesh_config.dp, mesh_config.jax_mesh()
        groups = [list(full.devices[r].flat) for r in range(dp)]
        tp, pp = mesh_config.tp, mesh_config.pp
    else:
        if dp == 1:
            return None
        tp, pp = args.tp, args.pp
        per = tp * pp
        devices = select_devices(args.devices) or jax.devices()[: dp * per]
        if len(devices) != dp * per:
            raise ValueError(f"--data-parallel-size {dp} × tp {tp} × pp {pp} needs {dp * per} "
                             f"devices; {len(devices)} are given or visible")
        groups = [devices[r * per:(r + 1) * per] for r in range(dp)]
    dist = multihost.distributed()
    if dist is not None and dist.num_processes > 1:
        raise ValueError("data-parallel replicas run in one process (one host); across hosts run "
                         "one server per replica")
    return [make_mesh(tp=tp, pp=pp, devices=group) for group in groups]


def lora_slots(args) -> int | None:
    """--max-loras, defaulting to one free slot when adapters may be loaded while serving."""
    slots = getattr(args, "max_loras", None)
    if slots is None and getattr(args, "allow_runtime_lora_updating", False):
        return max(1, len(getattr(args, "lora_modules", None) or ()))
    return slots


def check_lora_names(served: Sequence[str], adapters: Sequence[str]) -> None:
    """An adapter's name is what selects it (the HTTP API's ``model``): it may not also name the
    base model."""
    clash = sorted(set(served) & set(adapters))
    if clash:
        raise ValueError(f"--lora-modules: {', '.join(clash)} is also the served model's name; "
                         "name the adapter otherwise (or set --served-model-name)")


def build_engines(args) -> list:
    """The engines to serve: one, or one per data-parallel replica."""
    meshes = replica_meshes(args)
    if meshes is None:
        return [build_engine(args)]
    import concurrent.futures

    # Side by side: each replica loads and compiles on its own devices (XLA releases the
    # interpreter lock while it compiles), so N replicas start in about the time of one.
    log.info("building %d data-parallel replicas", len(meshes))
    with concurrent.futures.ThreadPoolExecutor(len(meshes), thread_name_prefix="qwenjax-replica") as pool:
        return list(pool.map(lambda mesh: build_engine(args, mesh), meshes))


def build_engine(args, mesh=None):
    import jax

    from qwenjax.engine.engine import Engine, EngineConfig, enable_compile_cache

    lm, mesh_config = load_serving_model(args, mesh)
    from server.servicer import model_name

    check_lora_names(args.served_model_name or [model_name(lm.source)], lm.lora_names)
    if args.chat_template is not None:
        if lm.tokenizer is None:
            raise ValueError("--chat-template: this model has no tokenizer")
        lm = dataclasses.replace(lm, tokenizer=lm.tokenizer.with_chat_template(args.chat_template))
    options = {}
    max_model_len = args.max_model_len
    if mesh_config is not None:
        options = dict(page_size=mesh_config.page_size, kv_cache_fraction=mesh_config.kv_cache_fraction)
        max_model_len = max_model_len or min(mesh_config.max_model_len, lm.config.max_context)
    if args.kv_cache_fraction is not None:
        options["kv_cache_fraction"] = args.kv_cache_fraction
    if args.page_size is not None:
        options["page_size"] = args.page_size
    log.info("compiling step shapes")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          prefill_chunk=args.prefill_chunk, max_prefill_seqs=args.max_prefill_seqs,
                          decode_buckets=args.decode_buckets, prefill_buckets=args.prefill_buckets,
                          max_model_len=max_model_len, num_pages=kv_pages(args, options),
                          enable_prefix_caching=args.enable_prefix_caching,
                          async_scheduling=args.async_scheduling, compile_workers=args.compile_workers,
                          generation_config=args.generation_config,
                          override_generation_config=args.override_generation_config,
                          speculative_config=args.speculative_config,
                          pooler_config=args.pooler_config,
                          scheduling_policy=args.scheduling_policy,
                          reasoning_parser=getattr(args, "reasoning_parser", None),
                          kv_offloading_size=args.kv_offloading_size, seed=args.seed,
                          kv_cache_dtype=args.kv_cache_dtype, **options)
    enable_compile_cache()
    cache = pathlib.Path(jax.config.jax_compilation_cache_dir)
    before = _cache_entries(cache)
    engine = Engine(lm, config, warm_up=True, progress=sys.stderr.isatty())
    written = _cache_entries(cache) - before
    # A restart with the same shapes and the persistent cache should write nothing: a warm start
    # (seconds); a cold one compiles every shape (minutes on a large model).
    log.info("%s start: compiled %d step shapes in %.1fs; %d new entries in the compile cache %s",
             "cold" if written else "warm", len(engine.runner.shapes()), engine.warm_up_seconds,
             written, cache)
    return engine


def kv_pages(args, options: dict) -> int | None:
    """--num-pages, or SGLang's --max-total-tokens in whole pages (None: from device memory)."""
    from qwenjax.engine.engine import EngineConfig

    if args.max_total_tokens is None:
        return args.num_pages
    if args.num_pages is not None:
        raise ValueError("--max-total-tokens and --num-pages both size the KV cache; give one")
    if args.max_total_tokens < 1:
        raise ValueError(f"--max-total-tokens must be ≥ 1, got {args.max_total_tokens}")
    page_size = options.get("page_size", EngineConfig.page_size)
    return -(-args.max_total_tokens // page_size)


def _cache_entries(directory: pathlib.Path) -> int:
    # Files only: qwenjax keeps its notes of compiled programs in a subdirectory.
    return sum(1 for p in directory.iterdir() if p.is_file()) if directory.is_dir() else 0


def serve_follower(args) -> int:
    """A process other than 0: load the shards, then run the leader's steps until it stops."""
    from qwenjax import multihost
    from qwenjax.engine.engine import enable_compile_cache

    enable_compile_cache()  # as the leader's Engine does: a warm restart compiles nothing
    lm, _ = load_serving_model(args)
    log.info("process %d: following the leader at %s", multihost.distributed().process_id,
             multihost.distributed().coordinator)
    return multihost.run_follower(lm)


async def _load_in_background(args):
    """Build the engines on a daemon thread, so a SIGTERM during a long load can still exit."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(setter, value):
        if not done.done():
            setter(value)

    def run():
        try:
            engines = build_engines(args)
        except BaseException as error:  # noqa: BLE001 - handed to the loop to report
            loop.call_soon_threadsafe(settle, done.set_exception, error)
        else:
            loop.call_soon_threadsafe(settle, done.set_result, engines)

    threading.Thread(target=run, name="qwenjax-load", daemon=True).start()
    return await done


async def serve(args) -> int:
    from qwenjax.engine.async_engine import EngineThread
    from server.app import InferenceServer

    server = InferenceServer(server_config(args))
    try:
        await server.start()
    except (OSError, ValueError) as error:  # a port taken, a bad TLS file: named by its flag
        log.error("cannot serve: %s", error)
        await server.stop()
        return 2
    log.info("listening on %s (health NOT_SERVING until the model is loaded and compiled)",
             server.address)
    if server.http_port:
        log.info("OpenAI-compatible API on %s://%s:%d/v1 (503 until the model is loaded)",
                 "https" if server.config.tls_cert else "http", server.config.host, server.http_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    loading = asyncio.ensure_future(_load_in_background(args))
    await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        log.info("stop requested while loading; exiting")
        loading.cancel()
        await server.stop()
        return 0
    try:
        engines = loading.result()
    except (ValueError, FileNotFoundError) as error:
        log.error("cannot serve: %s", error)
        stopped.cancel()
        await server.stop()
        return 2
    if len(engines) == 1:
        engine_thread = EngineThread(engines[0])
    else:
        from qwenjax.engine.replicas import EngineReplicas

        engine_thread = EngineReplicas([EngineThread(engine) for engine in engines])
    await server.attach(engine_thread)
    log.info("%s", server.describe())

    await stopped
    log.info("draining: %d requests in flight, up to %.0fs", server.gateway.in_flight,
             server.config.drain_timeout)
    if await server.drain():
        log.info("drained; stopping")
    else:
        log.warning("drain timeout: cancelling %d requests still running", server.gateway.in_flight)
    await server.stop(grace=1.0)
    engine_thread.shutdown()
    from qwenjax import multihost

    multihost.shutdown()  # multi-host: the other processes exit 0
    return 0


def resolve_model_tag(args) -> None:
    """``serve MODEL`` is ``serve --model MODEL``; both at once must agree. (And the flags
    accepted with no effect are logged.)"""
    for flag in getattr(args, "no_op_flags", None) or ():
        log.info("%s: accepted, no effect here (%s)", flag, _no_op_reason(flag))
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"the model is given twice, as {args.model_tag!r} and --model "
                             f"{args.model!r}; give one")
        args.model = args.model_tag
    if args.kv_cache_fraction is not None and not 0 < args.kv_cache_fraction <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {args.kv_cache_fraction}")


def cmd_serve(args) -> int:
    level = getattr(logging, args.log_level.upper())
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    resolve_model_tag(args)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key must be given together")
    from qwenjax import multihost

    dist = multihost.resolve(args.coordinator, args.num_processes, args.process_id, args.plan_port)
    if dist is not None:
        # Before anything touches the devices: jax then sees every process's devices.
        try:
            multihost.initialize(dist)
        except Exception as error:  # noqa: BLE001 - a timeout or refused connection, said plainly
            log.error("multi-host start-up failed (process %d of %d, coordinator %s): %s",
                      dist.process_id, dist.num_processes, dist.coordinator, error)
            return 1
        if not dist.is_leader:
            return serve_follower(args)
    return asyncio.run(serve(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"qwenjax serve: error: {error}", file=sys.stderr, flush=True)
        return 2
