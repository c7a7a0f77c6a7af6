"""``qwenjax run-batch`` (server/batch.py): OpenAI batch files answered offline.

On the real Qwen2.5-Coder-0.5B (the session's served engine), a batch line's answer equals the
HTTP API's answer to the same body (ids and timestamps aside), refusals come back as the HTTP
status and error body, and lines that are not requests get an error naming the problem, all in
input order. The command itself runs on a tiny checkpoint.
"""
from __future__ import annotations

import io
import json

import pytest

from server import batch
from server_harness import Servers, http

GREEDY = {"temperature": 0, "max_tokens": 12}


def _line(custom_id, url, body, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def _stable(body):
    """A response body without what differs between two answers of the same request: ids,
    timestamps and prefix-cache hits, at any depth."""
    if isinstance(body, dict):
        return {k: _stable(v) for k, v in body.items()
                if k not in ("id", "created", "created_at", "cached_tokens")}
    return [_stable(v) for v in body] if isinstance(body, list) else body


def _assert_close(got, expected, where: str) -> None:
    """Equal, floats (logprobs, embeddings) to 1e-3: the batch and the HTTP request run in
    different steps (other rows, a prefix-cache hit), which moves the last float bits."""
    if isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-3), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(expected), where
        for key in expected:
            _assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            _assert_close(a, b, f"{where}[{i}]")
    else:
        assert got == expected, where


@pytest.mark.parametrize("text", [
    "not json", "[1, 2]", '{"custom_id": "x", "url": "/v1/models", "body": {}}',
    '{"custom_id": "", "url": "/v1/completions", "body": {}}',
    '{"custom_id": "x", "url": "/v1/completions", "body": []}',
    '{"custom_id": "x", "url": "/v1/completions", "body": {}, "extra": 1}',
    '{"custom_id": "x", "method": "PUT", "url": "/v1/completions", "body": {}}',
    '{"custom_id": "x", "url": "/v1/completions", "body": {"stream": true}}',
])
def test_lines_that_are_not_requests_are_named(text):
    with pytest.raises(batch.LineError) as caught:
        batch.parse_line(text, set())
    assert str(caught.value) and caught.value.code


def test_parse_line_and_duplicates():
    seen = set()
    line = _line("q1", "/v1/chat/completions", {"messages": []})
    assert batch.parse_line(line, seen) == ("q1", "/v1/chat/completions", {"messages": []})
    with pytest.raises(batch.LineError, match="earlier line") as caught:
        batch.parse_line(line, seen)
    assert caught.value.code == "duplicate_custom_id"


def test_batch_answers_equal_the_http_api(server_loop, served_engine_thread):
    servers = Servers(server_loop, served_engine_thread, port=0, metrics_port=None, http_port=0)
    try:
        base = f"http://127.0.0.1:{servers.start().http_port}"
        requests = [
            ("chat", "/v1/chat/completions",
             {"messages": [{"role": "user", "content": "Write a Python hello world."}], **GREEDY}),
            ("completion", "/v1/completions",
             {"prompt": ["def add(a, b):", "# sort a list\n"], "logprobs": 2, **GREEDY}),
            ("embedding", "/v1/embeddings", {"input": ["hello", "world"]}),
            ("responses", "/v1/responses", {"input": "Say hi.", "temperature": 0,
                                            "max_output_tokens": 8}),
            ("too-long", "/v1/completions", {"prompt": "x", "max_tokens": 100_000}),
            ("unknown-model", "/v1/completions", {"model": "nope", "prompt": "x"}),
        ]
        lines = [_line(*r) for r in requests]
        lines[3:3] = ["", "{broken", _line("chat", "/v1/completions", {"prompt": "x"})]
        sink = io.StringIO()
        summary = server_loop.run(batch.run_batch(served_engine_thread, lines, sink,
                                                  max_concurrency=3), timeout=300)
        out = [json.loads(line) for line in sink.getvalue().splitlines()]
        assert (summary.total, summary.succeeded, summary.failed) == (8, 4, 4)
        assert [o["custom_id"] for o in out] == ["chat", "completion", "embedding", None, "chat",
                                                 "responses", "too-long", "unknown-model"]
        assert out[3]["error"]["code"] == "invalid_json" and out[3]["response"] is None
        assert out[4]["error"]["code"] == "duplicate_custom_id"
        answers = {o["custom_id"]: o for o in out if o["response"] is not None}
        for custom_id, url, body in requests:
            status, expected = http(base, url, body)
            response = answers[custom_id]["response"]
            assert answers[custom_id]["error"] is None and answers[custom_id]["id"].startswith("batch_req_")
            assert response["status_code"] == status, (custom_id, response)
            if status == 200:
                _assert_close(_stable(response["body"]), _stable(expected), custom_id)
                assert response["request_id"] == response["body"].get("id", response["request_id"])
            else:
                assert response["body"] == expected, custom_id
        assert answers["too-long"]["response"]["status_code"] == 400
        assert answers["unknown-model"]["response"]["status_code"] == 404
        assert answers["chat"]["response"]["body"]["choices"][0]["message"]["content"]
    finally:
        servers.stop_all()


def test_run_batch_command(tmp_path, monkeypatch, capsys):
    """The CLI: files or stdin/stdout, the engine built from the flags (here a tiny checkpoint,
    compiled as it goes), exit 0 with refusals in the output."""
    from qwenjax import cli
    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax.loading import load_model
    from server import cli as server_cli
    from tiny import tiny_config, write_hf_checkpoint

    write_hf_checkpoint(tiny_config(vocab_size=128, max_position_embeddings=256), tmp_path / "m")
    built = []

    def build_engines(args):
        assert (args.model, args.max_num_seqs, args.max_model_len) == (str(tmp_path / "m"), 4, 128)
        built.append(Engine(load_model(args.model, dtype="float32"),
                            EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, prefill_chunk=16,
                                         max_prefill_seqs=2, max_model_len=128, num_pages=64),
                            warm_up=False))
        return built[-1:]

    monkeypatch.setattr(server_cli, "build_engines", build_engines)
    body = {"prompt": [1, 2, 3, 4, 5], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    lines = [_line("a", "/v1/completions", body),
             _line("b", "/v1/embeddings", {"input": [[5, 6, 7]]}),
             _line("c", "/v1/completions", {**body, "max_tokens": 1000})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    flags = ["--model", str(tmp_path / "m"), "--max-num-seqs", "4", "--max-model-len", "128"]
    assert cli.main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                     *flags]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["a", "b", "c"]
    assert [o["response"]["status_code"] for o in out] == [200, 200, 400]
    usage = out[0]["response"]["body"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, 6)
    assert len(out[1]["response"]["body"]["data"][0]["embedding"]) == built[0].lm.config.hidden_size
    assert "max context of 128" in out[2]["response"]["body"]["error"]["message"]

    # stdin → stdout: the same greedy tokens (the engine is built anew).
    monkeypatch.setattr("sys.stdin", io.StringIO(lines[0] + "\n"))
    capsys.readouterr()
    assert cli.main(["run-batch", "-i", "-", "-o", "-", *flags]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["response"]["body"]["choices"] == out[0]["response"]["body"]["choices"]

    # Missing input: refused before any model is built.
    assert cli.main(["run-batch", "-i", str(tmp_path / "none.jsonl"), "-o", "-", *flags]) == 2
    assert len(built) == 2
