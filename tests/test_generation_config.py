"""Sampling defaults from generation_config.json: the unset fields of a request take the model's values."""
import dataclasses
import json

import pytest

from qwenjax.generation_config import read_sampling_defaults, sampling_defaults
from qwenjax.sampling import SamplingParams

# Qwen2.5-72B-Instruct's generation_config.json.
QWEN_INSTRUCT = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                 "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                 "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}
QWEN_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def _write(directory, config):
    (directory / "generation_config.json").write_text(json.dumps(config))
    return directory


def test_the_sampling_fields_are_read_and_the_rest_ignored(tmp_path):
    assert read_sampling_defaults(_write(tmp_path, QWEN_INSTRUCT)) == QWEN_DEFAULTS
    assert read_sampling_defaults(tmp_path / "missing") == {}
    _write(tmp_path, {"max_new_tokens": 512, "min_p": 0.05, "top_k": None})
    defaults = read_sampling_defaults(tmp_path)
    assert defaults == {"max_tokens": 512, "min_p": 0.05}
    assert isinstance(defaults["max_tokens"], int)


def test_choices_and_overrides(tmp_path):
    model, other = tmp_path / "model", tmp_path / "other"
    model.mkdir(), other.mkdir()
    _write(model, QWEN_INSTRUCT), _write(other, {"temperature": 0.3})
    assert sampling_defaults(model, "auto") == QWEN_DEFAULTS
    assert sampling_defaults(None, "auto") == {}  # a random-weight preset has no file
    assert sampling_defaults(model, "builtin") == {} == sampling_defaults(model, "vllm")  # vLLM's name
    assert sampling_defaults(model, str(other)) == {"temperature": 0.3}
    assert sampling_defaults(model, "auto", {"temperature": 0.0, "max_new_tokens": 64}) == {
        **QWEN_DEFAULTS, "temperature": 0.0, "max_tokens": 64}
    assert sampling_defaults(model, "builtin", {"top_k": 5}) == {"top_k": 5}


def test_bad_values_name_the_file_and_the_field(tmp_path):
    _write(tmp_path, {"top_p": 1.5})
    with pytest.raises(ValueError, match=r"generation_config.json: top_p must be in \(0, 1\], got 1.5"):
        read_sampling_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        read_sampling_defaults(tmp_path)
    with pytest.raises(ValueError, match="override_generation_config has 'temprature'; the keys it "
                                         "takes are temperature, top_k"):
        sampling_defaults(None, "auto", {"temprature": 0.5})
    with pytest.raises(ValueError, match="override_generation_config: temperature must be"):
        sampling_defaults(None, "auto", {"temperature": -1})
    with pytest.raises(ValueError, match="neither 'auto', 'builtin' \\('vllm'\\) nor a directory"):
        sampling_defaults(None, str(tmp_path / "nowhere"))


def test_engine_server_and_llm_use_the_checkpoints_defaults(tmp_path):
    from qwenjax import LLM
    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax.loading import load_model
    from qwenjax_proto.v1 import inference_pb2 as pb
    from server.convert import sampling_fields
    from server.servicer import model_info
    from tiny import tiny_config, write_hf_checkpoint

    write_hf_checkpoint(tiny_config(max_position_embeddings=256), tmp_path)
    _write(tmp_path, {**QWEN_INSTRUCT, "max_new_tokens": 100})
    lm = load_model(tmp_path, tp=1, dtype="float32")
    small = dict(max_num_seqs=2, max_num_batched_tokens=64, prefill_chunk=32, max_model_len=128,
                 num_pages=32, page_size=8)
    engine = Engine(lm, EngineConfig(**small), warm_up=False)
    expected = SamplingParams(**QWEN_DEFAULTS, max_tokens=100)

    assert engine.default_sampling_params() == expected
    assert dict(model_info(engine).sampling_defaults) == pytest.approx({**QWEN_DEFAULTS, "max_tokens": 100})
    # A request without params: the model's values; the default max_tokens shrinks to the room
    # a long prompt leaves (128 + 1 - 60) instead of getting the request refused.
    request_id = engine.add_request([1] * 60)
    assert engine._requests[request_id].params == dataclasses.replace(expected, max_tokens=69)
    assert engine._requests[engine.add_request([1] * 3)].params == expected

    # The server: fields set on the wire win (temperature=0 is set: greedy beats the model's
    # 0.7), a max_tokens set on the wire is kept and refused when it does not fit.
    fields = sampling_fields(pb.SamplingParams(temperature=0.0, stop=["x"]))
    assert engine.sampling_params(fields, 3) == dataclasses.replace(expected, temperature=0.0, stop=("x",))
    assert engine.sampling_params(sampling_fields(pb.SamplingParams()), 3) == expected
    assert sampling_fields(pb.SamplingParams(include_stop_str_in_output=True, logit_bias={3: 1.5},
                                             allowed_token_ids=[3, 4])) == {
        "include_stop_str_in_output": True, "logit_bias": {3: 1.5}, "allowed_token_ids": (3, 4)}
    too_long = engine.sampling_params(sampling_fields(pb.SamplingParams(max_tokens=100)), 60)
    with pytest.raises(ValueError, match="prompt has 60 tokens and max_tokens is 100"):
        engine.validate([1] * 60, too_long)
    with pytest.raises(ValueError, match="top_k must be"):
        engine.sampling_params(sampling_fields(pb.SamplingParams(top_k=-7)), 3)

    builtin = Engine(lm, EngineConfig(**small, generation_config="builtin"), warm_up=False)
    assert builtin.default_sampling_params() == SamplingParams()
    assert dict(model_info(builtin).sampling_defaults) == {}

    llm = LLM(lm, max_model_len=128, max_num_seqs=2, num_pages=32, page_size=8, warm_up=False,
              override_generation_config={"temperature": 0.0})
    assert llm.get_default_sampling_params() == dataclasses.replace(expected, temperature=0.0)


def test_serve_flags_parse_and_refuse_bad_json(capsys):
    import argparse

    from server.cli import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--generation-config", "builtin",
                              "--override-generation-config", '{"temperature": 0.2}'])
    assert (args.generation_config, args.override_generation_config) == ("builtin", {"temperature": 0.2})
    assert parser.parse_args([]).generation_config == "auto"
    for bad in ("{temperature: 0.2}", "[0.2]"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--override-generation-config", bad])
    assert "expected a JSON object" in capsys.readouterr().err
