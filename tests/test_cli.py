"""The qwenjax command line, in process (conftest provides 8 fake CPU devices)."""
import pytest

from qwenjax.cli import main


@pytest.mark.real_model
def test_fetch_model_prints_the_directory(real_model_dir, capsys):
    assert main(["fetch-model", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(real_model_dir)


@pytest.mark.real_model
def test_generate_chat_at_tp4_prints_only_the_answer(real_model_dir, capsys):
    assert main(["generate", "--tp", "4", "--chat", "--max-tokens", "16", "--max-model-len", "256",
                 "What is the capital of France?"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "The capital of France is Paris.\n"
    assert "tp=4" in captured.err and "finish reason: stop" in captured.err


@pytest.mark.real_model
def test_generate_with_a_choice_constraint(real_model_dir, capsys):
    assert main(["generate", "--chat", "--max-tokens", "8", "--max-model-len", "256",
                 "--choice", "Yes", "--choice", "No", "Is Paris in France?"]) == 0
    assert capsys.readouterr().out in ("Yes\n", "No\n")
    assert main(["generate", "--regex", "a+", "--choice", "b", "hi"]) == 2
    assert "exactly one of" in capsys.readouterr().err


def test_errors_name_the_problem(capsys):
    assert main(["generate", "--model", "/nonexistent", "hi"]) == 2
    assert "neither a preset nor a directory with config.json" in capsys.readouterr().err
    assert main(["generate", "--model", "qwen2.5-0.5b", "hi"]) == 2
    assert "random-weight presets have no tokenizer" in capsys.readouterr().err
