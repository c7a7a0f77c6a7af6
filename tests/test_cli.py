"""The qwenjax command line, in process (conftest provides 8 fake CPU devices)."""
import pytest

from qwenjax.cli import main


@pytest.mark.real_model
def test_fetch_model_prints_the_directory(real_model_dir, capsys):
    assert main(["fetch-model", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(real_model_dir)


@pytest.mark.real_model
def test_generate_chat_at_tp4_prints_only_the_answer(real_model_dir, capsys):
    # vLLM's name for --tp
    assert main(["generate", "--tensor-parallel-size", "4", "--chat", "--max-tokens", "16", "--max-model-len", "256",
                 "What is the capital of France?"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "The capital of France is Paris.\n"
    assert "tp=4" in captured.err and "finish reason: stop" in captured.err


@pytest.mark.real_model
def test_generate_with_a_choice_constraint(real_model_dir, capsys):
    """Also with fp8 weights and an fp8 KV cache from the command line."""
    assert main(["generate", "--chat", "--max-tokens", "8", "--max-model-len", "256", "-q", "fp8",
                 "--kv-cache-dtype", "fp8", "--choice", "Yes", "--choice", "No",
                 "Is Paris in France?"]) == 0
    out = capsys.readouterr()
    assert out.out in ("Yes\n", "No\n") and "fp8 weights" in out.err
    assert main(["generate", "--regex", "a+", "--choice", "b", "hi"]) == 2
    assert "exactly one of" in capsys.readouterr().err


def test_quantization_choices_agree_with_the_library():
    from qwenjax.cli import QUANTIZATION_CHOICES
    from qwenjax.quantization import QUANTIZATION_CHOICES as library

    assert QUANTIZATION_CHOICES == library


def test_errors_name_the_problem(capsys):
    assert main(["generate", "--model", "/nonexistent", "hi"]) == 2
    assert "neither a preset nor a directory with config.json" in capsys.readouterr().err
    assert main(["generate", "--model", "qwen2.5-0.5b", "hi"]) == 2
    assert "random-weight presets have no tokenizer" in capsys.readouterr().err


def test_serve_takes_vllm_style_arguments(capsys, monkeypatch):
    """`qwenjax serve MODEL -tp 2 --api-key K --gpu-memory-utilization F`, as `vllm serve` takes them."""
    import argparse

    from server.cli import add_serve_arguments, main as serve_main, resolve_model_tag, server_config

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["/models/Qwen2.5-7B-Instruct", "-tp", "2", "--api-key", "k",
                              "--gpu-memory-utilization", "0.8", "--no-enable-prefix-caching", "-q", "fp8",
                              "--kv-cache-dtype", "fp8", "--chat-template", "t.jinja",
                              "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                              "--served-model-name", "qwen", "Qwen/Qwen2.5-7B-Instruct"])
    resolve_model_tag(args)
    assert (args.model, args.tp, args.kv_cache_fraction, args.enable_prefix_caching, args.quantization) == (
        "/models/Qwen2.5-7B-Instruct", 2, 0.8, False, "fp8")
    assert args.kv_cache_dtype == "fp8" and args.chat_template == "t.jinja"
    config = server_config(args)
    assert config.api_token == ("k",) and config.http_port == 8000
    assert config.served_model_names == ("qwen", "Qwen/Qwen2.5-7B-Instruct")
    # vLLM's variable for the key (a deployment passing it so must not run without auth).
    monkeypatch.delenv("QWENJAX_API_TOKEN", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert server_config(parser.parse_args(["m"])).api_token == "from-env"
    assert serve_main(["a", "--model", "b"]) == 2
    assert "given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # vLLM's other tool-call parsers are for other models
        parser.parse_args(["m", "--tool-call-parser", "mistral"])
    assert "invalid choice: 'mistral'" in capsys.readouterr().err
    assert serve_main(["--gpu-memory-utilization", "1.5"]) == 2
    assert "--gpu-memory-utilization must be in (0, 1]" in capsys.readouterr().err


def test_serve_takes_sglang_style_arguments():
    """`python -m sglang.launch_server --model-path M --tp-size 2 …` flags, under qwenjax serve."""
    import argparse

    from server.cli import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model-path", "/m", "--tp-size", "2", "--dp-size", "2",
                              "--context-length", "4096", "--mem-fraction-static", "0.8",
                              "--max-running-requests", "32", "--disable-radix-cache",
                              "--lora-paths", "a=/l", "--max-loras-per-batch", "2", "--log-requests",
                              "--reasoning-parser", "deepseek-r1", "--tool-call-parser", "qwen25",
                              "--cuda-graph-bs", "1", "8,16", "--prefill-buckets", "256"])
    assert (args.model, args.tp, args.data_parallel_size, args.max_model_len, args.kv_cache_fraction,
            args.max_num_seqs, args.enable_prefix_caching, args.lora_modules, args.max_loras,
            args.enable_log_requests, args.reasoning_parser, args.decode_buckets,
            args.prefill_buckets) == (
        "/m", 2, 2, 4096, 0.8, 32, False, ["a=/l"], 2, True, "deepseek_r1", [1, 8, 16], [256])
    assert parser.parse_args(["m"]).decode_buckets is None
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--decode-buckets", "eight"])


def test_common_vllm_flags_run_unchanged(caplog):
    """A typical `vllm serve` line for Qwen2.5: dtype spellings, block size, seed, and flags
    that ask for what qwenjax does anyway (accepted and logged)."""
    import argparse
    import logging

    from server.cli import add_serve_arguments, resolve_model_tag

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["Qwen2.5-7B-Instruct", "--trust-remote-code", "--dtype", "half",
                              "--block-size", "32", "--seed", "7", "--enforce-eager",
                              "--enable-chunked-prefill", "--disable-log-requests", "--enable-metrics",
                              "--enable-lora", "--async-scheduling"])
    with caplog.at_level(logging.INFO, logger="qwenjax.server"):
        resolve_model_tag(args)
    assert (args.dtype, args.page_size, args.seed) == ("float16", 32, 7)
    assert args.no_op_flags == ["--trust-remote-code", "--enforce-eager", "--enable-chunked-prefill",
                                "--disable-log-requests", "--enable-metrics", "--enable-lora",
                                "--async-scheduling"]
    assert args.async_scheduling  # the default, which --async-scheduling asks for
    assert "--trust-remote-code: accepted, no effect here" in caplog.text
    assert parser.parse_args(["--dtype", "auto"]).dtype is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int3"])


def test_token_counts_take_vllms_human_readable_forms(capsys):
    import argparse

    from qwenjax.cli import parse_max_model_len, parse_token_count

    assert [parse_token_count(t) for t in ("4096", "32k", "32K", "25.6k", "1M", "2m", "4.02k",
                                           "1.001m")] == [
        4096, 32000, 32768, 25600, 1 << 20, 2_000_000, 4020, 1_001_000]  # exact, not float
    assert parse_max_model_len("auto") == parse_max_model_len("-1") == -1
    for bad in ("1.5K", "k", "12x", "0.5", "", "infk", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="whole number of tokens"):
            parse_token_count(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="positive token count or auto"):
        parse_max_model_len("0")
    with pytest.raises(SystemExit):
        main(["serve", "--max-model-len", "lots"])
    assert "--max-model-len" in capsys.readouterr().err


def test_sglang_flag_spellings_and_value_flags_with_no_effect(caplog, capsys):
    """SGLang's names for qwenjax's settings, and flags whose value changes nothing here
    (accepted and logged with the value); an unknown flag is refused, never read as a prefix of
    one of ours (SGLang's --device vs --devices)."""
    import argparse
    import logging

    from server.cli import add_serve_arguments, kv_pages, resolve_model_tag, server_config

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_serve_arguments(parser)
    args = parser.parse_args(["--model-path", "/m", "--disable-overlap-schedule", "--watchdog-timeout",
                              "60", "--chunked-prefill-size", "1k", "--max-total-tokens", "1000",
                              "--schedule-policy", "priority", "--log-level", "WARNING",
                              "--device", "cuda", "--task", "generate", "--root-path", "/api",
                              "--context-length", "8K"])
    assert (args.async_scheduling, args.step_timeout, args.prefill_chunk, args.scheduling_policy,
            args.log_level, args.max_model_len) == (False, 60.0, 1000, "priority", "warning", 8192)
    assert kv_pages(args, {}) == 63 and kv_pages(args, {"page_size": 8}) == 125  # whole pages
    with caplog.at_level(logging.INFO, logger="qwenjax.server"):
        resolve_model_tag(args)
    assert args.no_op_flags == ["--device cuda", "--task generate", "--root-path /api"]
    multinode = parser.parse_args(["m", "--dist-init-addr", "10.0.0.1:5000", "--nnodes", "2",
                                   "--node-rank", "1", "--attention-backend", "fa3",
                                   "--grammar-backend", "xgrammar"])  # SGLang's two-node line
    assert (multinode.coordinator, multinode.num_processes, multinode.process_id) == ("10.0.0.1:5000", 2, 1)
    assert multinode.no_op_flags == ["--attention-backend fa3", "--grammar-backend xgrammar"]
    assert "--device cuda: accepted, no effect here (the platform is JAX's" in caplog.text
    with pytest.raises(ValueError, match="--max-total-tokens and --num-pages"):
        kv_pages(parser.parse_args(["--max-total-tokens", "64", "--num-pages", "4"]), {})
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule-policy", "lpm"])
    # Several keys (vLLM's --api-key repeated): any of them is accepted.
    config = server_config(parser.parse_args(["m", "--api-key", "a", "--api-key", "b"]))
    assert config.api_token == ("a", "b")
    assert server_config(parser.parse_args(["m", "--api-key", "a", "b"])).api_token == ("a", "b")
    from qwenjax.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dev", "0"])  # no prefix matching
    assert "unrecognized arguments: --dev" in capsys.readouterr().err


def test_config_overrides_in_vllms_and_sglangs_spellings():
    import argparse

    from server.cli import add_serve_arguments, hf_overrides

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    yarn = '{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}'
    for flags in (["--hf-overrides", '{"rope_scaling": %s}' % yarn],
                  ["--json-model-override-args", '{"rope_scaling": %s}' % yarn],
                  ["--rope-scaling", yarn]):
        assert hf_overrides(parser.parse_args(["m", *flags]))["rope_scaling"]["factor"] == 4.0
    both = parser.parse_args(["m", "--rope-scaling", yarn, "--rope-theta", "5e5"])
    assert hf_overrides(both)["rope_theta"] == 5e5 and hf_overrides(parser.parse_args(["m"])) is None
    with pytest.raises(ValueError, match="--rope-theta and --hf-overrides both set rope_theta"):
        hf_overrides(parser.parse_args(["m", "--rope-theta", "1", "--hf-overrides", '{"rope_theta": 2}']))


def test_lora_modules_take_vllms_and_sglangs_json_form():
    from qwenjax.lora import parse_lora_modules

    assert parse_lora_modules(['{"name": "sql", "path": "/a", "base_model_name": "qwen"}',
                               "chat=/b", '{"lora_name": "x", "lora_path": "/c", "pinned": true}']) == {
        "sql": "/a", "chat": "/b", "x": "/c"}
    for bad in ('{"name": "sql"}', '{"name": "a", "path": "/p", "rank": 8}', "{not json", "sql"):
        with pytest.raises(ValueError, match="--lora-modules"):
            parse_lora_modules([bad])


def test_metrics_aliases_flag(capsys):
    import argparse

    from server.cli import add_serve_arguments, server_config

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert server_config(parser.parse_args(["m"])).metrics_aliases == ("vllm", "sglang")
    assert server_config(parser.parse_args(["m", "--metrics-aliases", "vllm"])).metrics_aliases == ("vllm",)
    assert parser.parse_args(["m", "--metrics-aliases", "none"]).metrics_aliases == ()
    # Each once: a series declared twice would fail every scrape.
    assert parser.parse_args(["m", "--metrics-aliases", "vllm,vllm"]).metrics_aliases == ("vllm",)
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--metrics-aliases", "tgi"])
    assert "--metrics-aliases" in capsys.readouterr().err


def test_serve_lora_slot_arguments():
    import argparse

    from server.cli import add_serve_arguments, lora_slots, server_config

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["/m", "--allow-runtime-lora-updating"])
    assert lora_slots(args) == 1 and server_config(args).allow_runtime_lora_updating
    args = parser.parse_args(["/m", "--lora-modules", "a=/a", "b=/b", "--max-loras", "4",
                              "--max-lora-rank", "64"])
    assert lora_slots(args) == 4 and args.max_lora_rank == 64
    assert not server_config(args).allow_runtime_lora_updating
    assert lora_slots(parser.parse_args(["/m"])) is None
