"""LoRA adapters: the model with an adapter equals the checkpoint with the adapter merged into
its weights (the oracle), row by row in mixed batches, through the engine and the APIs."""
import asyncio
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kv_cache import KVCache
from qwenjax.loading import load_model
from qwenjax.lora import parse_lora_modules, read_adapter
from qwenjax.model import PackedChunks, StepBatch
from tiny import tiny_config, write_hf_checkpoint

CONFIG = tiny_config(num_layers=2, vocab_size=256)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(directory, base_dir, rank: int, alpha: float, seed: int, targets=TARGETS,
                  merged_dir=None):
    """A random PEFT LoRA for the tiny checkpoint in ``base_dir``; with ``merged_dir``, also the
    checkpoint with W + alpha / rank · B·A merged in (what the adapter must be equivalent to)."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    base = load_file(base_dir / "model.safetensors")
    tensors, merged = {}, dict(base)
    for i in range(CONFIG.num_layers):
        for projection in targets:
            group = "mlp" if projection in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"model.layers.{i}.{group}.{projection}.weight"
            out_dim, in_dim = base[name].shape
            a = (rng.standard_normal((rank, in_dim)) * 0.2).astype(np.float32)
            b = (rng.standard_normal((out_dim, rank)) * 0.2).astype(np.float32)
            prefix = f"base_model.model.model.layers.{i}.{group}.{projection}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
            merged[name] = base[name] + (alpha / rank) * b @ a
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=list(targets), bias="none",
        base_model_name_or_path="tiny")))
    if merged_dir is not None:
        merged_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            if (base_dir / name).exists():
                shutil.copy(base_dir / name, merged_dir / name)
        save_file(merged, merged_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = root / "base"
    write_hf_checkpoint(CONFIG, base)
    # Two adapters of different ranks; the second adapts attention only.
    write_adapter(root / "a", base, rank=4, alpha=8, seed=1, merged_dir=root / "merged_a")
    write_adapter(root / "b", base, rank=2, alpha=2, seed=2, targets=TARGETS[:4],
                  merged_dir=root / "merged_b")
    return root


def _logits(lm, tokens, lora_ids):
    rows, n = tokens.shape
    cache = KVCache.create(num_layers=CONFIG.num_layers, kv_heads=lm.layout.heads.kv_heads,
                           head_dim=CONFIG.head_dim, num_pages=2 * rows, page_size=16,
                           dtype=jnp.float32, mesh=lm.mesh)
    batch = StepBatch(jnp.asarray(tokens), jnp.tile(jnp.arange(n, dtype=jnp.int32), (rows, 1)),
                      jnp.full((rows,), n, jnp.int32), jnp.arange(2 * rows, dtype=jnp.int32).reshape(rows, 2),
                      jnp.asarray(lora_ids, jnp.int32))
    return np.asarray(jax.jit(lm.model.forward)(lm.weights, cache, batch)[0])


@pytest.mark.parametrize("tp", [1, 4])
def test_each_row_equals_the_merged_checkpoint(checkpoints, tp):
    """One batch, rows on adapter a, none, adapter b: each row's logits equal the model whose
    weights have that adapter merged (tp 4: KV heads replicated, q heads padded)."""
    lm = load_model(checkpoints / "base", tp=tp, dtype="float32",
                    lora_modules={"a": checkpoints / "a", "b": checkpoints / "b"})
    assert lm.lora_names == ("a", "b") and lm.weights.lora[0].qkv_a.shape[0] == 3
    tokens = np.random.default_rng(0).integers(0, 250, (3, 12)).astype(np.int32)
    got = _logits(lm, tokens, [1, 0, 2])
    for row, reference in ((0, "merged_a"), (1, "base"), (2, "merged_b")):
        oracle = load_model(checkpoints / reference, tp=tp, dtype="float32")
        want = _logits(oracle, tokens[row:row + 1], [0])
        np.testing.assert_allclose(got[row], want[0], rtol=2e-4, atol=2e-4)
    # The adapter changes the output (the test could fail): a's row differs from the base's.
    assert np.abs(got[0] - _logits(lm, tokens[:1], [0])[0]).max() > 1e-2


def test_packed_prefill_tokens_take_their_rows_adapter(checkpoints):
    lm = load_model(checkpoints / "base", tp=2, dtype="float32",
                    lora_modules={"a": checkpoints / "a"})
    tokens = np.random.default_rng(1).integers(0, 250, (2, 8)).astype(np.int32)
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    chunk = PackedChunks(
        tokens=i32(tokens.reshape(-1)), positions=i32(np.tile(np.arange(8), 2)),
        token_rows=i32(np.repeat([0, 1], 8)), token_cols=i32(np.tile(np.arange(8), 2)),
        row_tokens=i32(np.arange(16).reshape(2, 8)), row_positions=i32(np.tile(np.arange(8), (2, 1))),
        seq_lens=i32([8, 8]), block_tables=i32([[0], [1]]), last_token=i32([7, 15]),
        lora_ids=i32([1] * 8 + [0] * 8))
    cache = KVCache.create(num_layers=2, kv_heads=lm.layout.heads.kv_heads, head_dim=CONFIG.head_dim,
                           num_pages=2, page_size=8, dtype=jnp.float32, mesh=lm.mesh)
    last, _ = jax.jit(lm.model.last_logits)(lm.weights, cache, chunk)
    merged = load_model(checkpoints / "merged_a", tp=2, dtype="float32")
    np.testing.assert_allclose(np.asarray(last[0]), _logits(merged, tokens[:1], [0])[0, -1],
                               rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(last[1]), _logits(lm, tokens[1:], [0])[0, -1],
                               rtol=2e-4, atol=2e-4)


def test_engine_generates_with_the_adapter_each_request_names(checkpoints):
    """Greedy requests on a, b and the base in one engine (batched, chunked prefill, prefix
    cache) equal the merged checkpoints' own engines; the prefix cache keeps adapters apart."""
    from qwenjax import LLM, SamplingParams

    options = dict(max_model_len=128, max_num_seqs=4, max_prefill_seqs=2, prefill_chunk=16,
                   decode_buckets=(4,), prefill_buckets=(32,), warm_up=False, progress=False)
    llm = LLM(str(checkpoints / "base"), dtype="float32",
              lora_modules={"a": str(checkpoints / "a"), "b": str(checkpoints / "b")}, **options)
    prompt = list(np.random.default_rng(3).integers(0, 250, 20))
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    outs = {name: llm.generate([prompt], greedy, lora=name, use_tqdm=False)[0].token_ids
            for name in ("a", "b", None)}
    for name, directory in (("a", "merged_a"), ("b", "merged_b"), (None, "base")):
        oracle = LLM(str(checkpoints / directory), dtype="float32", **options)
        assert oracle.generate([prompt], greedy, use_tqdm=False)[0].token_ids == outs[name], name
    assert len({tuple(v) for v in outs.values()}) == 3  # the adapters change the output
    # The same prompt again on adapter a: served from its own cached pages, same tokens.
    again = llm.generate([prompt], greedy, lora="a", use_tqdm=False)[0]
    assert again.token_ids == outs["a"] and again.num_cached_tokens == 16
    # vLLM's one adapter per prompt, in one batch.
    mixed = llm.generate([prompt] * 3, greedy, lora=["b", None, "a"], use_tqdm=False)
    assert [o.token_ids for o in mixed] == [outs["b"], outs[None], outs["a"]]
    assert [o.lora_request and o.lora_request.lora_name for o in mixed] == ["b", None, "a"]
    with pytest.raises(ValueError, match="2 LoRA requests for 3 prompts"):
        llm.generate([prompt] * 3, greedy, lora=["a", "b"], use_tqdm=False)
    with pytest.raises(ValueError, match="lora 'c' is not loaded"):
        llm.generate([prompt] * 2, greedy, lora=["a", "c"], use_tqdm=False)
    assert llm.engine.num_unfinished == 0  # refused before any was admitted
    with pytest.raises(ValueError, match="lora 'c' is not loaded; adapters: 'a', 'b'"):
        llm.generate([prompt], greedy, lora="c")


def test_adapters_load_and_unload_while_serving(checkpoints):
    """Slots allocated at load (max_loras, max_lora_rank) take adapters later: the outputs
    equal the merged checkpoints', the stacks keep their shapes and shardings (no recompile),
    a name reloaded from another directory does not reuse the old adapter's cached pages, and
    every refusal names its reason."""
    from qwenjax import LLM, SamplingParams

    options = dict(max_model_len=128, max_num_seqs=4, max_prefill_seqs=2, prefill_chunk=16,
                   decode_buckets=(4,), prefill_buckets=(32,), warm_up=False, progress=False)
    llm = LLM(str(checkpoints / "base"), dtype="float32", max_loras=2, max_lora_rank=4, **options)
    assert llm.list_loras() == () and llm.lm.weights.lora[0].qkv_a.shape[0] == 3
    before = [(x.shape, x.sharding) for x in jax.tree.leaves(llm.lm.weights.lora)]
    prompt = list(np.random.default_rng(3).integers(0, 250, 20))
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    oracles = {d: LLM(str(checkpoints / d), dtype="float32", **options).generate(
        [prompt], greedy, use_tqdm=False)[0].token_ids for d in ("merged_a", "merged_b")}

    llm.add_lora("x", checkpoints / "a")
    assert llm.list_loras() == ("x",)
    after = [(x.shape, x.sharding) for x in jax.tree.leaves(llm.lm.weights.lora)]
    assert after == before and float(jnp.abs(llm.lm.weights.lora[0].qkv_a[1]).max()) > 0
    first = llm.generate([prompt], greedy, lora="x", use_tqdm=False)[0]
    assert first.token_ids == oracles["merged_a"]
    assert llm.generate([prompt], greedy, lora="x", use_tqdm=False)[0].num_cached_tokens == 16

    llm.add_lora("b", checkpoints / "b")
    with pytest.raises(ValueError, match="all 2 LoRA slots are taken"):
        llm.add_lora("c", checkpoints / "b")
    with pytest.raises(ValueError, match="lora 'b' is already loaded"):
        llm.add_lora("b", checkpoints / "b")
    llm.remove_lora("x")
    with pytest.raises(ValueError, match="lora 'x' is not loaded; adapters: 'b'"):
        llm.generate([prompt], greedy, lora="x")
    # The name again, other weights: computed afresh (no cached page of the old "x").
    llm.add_lora("x", checkpoints / "b")
    again = llm.generate([prompt], greedy, lora="x", use_tqdm=False)[0]
    assert again.token_ids == oracles["merged_b"] and again.num_cached_tokens == 0
    # A request still on an adapter keeps it loaded.
    request_id = llm.engine.add_request(prompt, greedy, lora="b")
    with pytest.raises(ValueError, match="lora 'b' has 1 request"):
        llm.remove_lora("b")
    llm.engine.abort(request_id)
    llm.remove_lora("b")
    wide = checkpoints / "wide"
    write_adapter(wide, checkpoints / "base", rank=8, alpha=8, seed=4)
    with pytest.raises(ValueError, match="rank 8; the slots hold rank ≤ 4"):
        llm.add_lora("wide", wide)
    assert llm.list_loras() == ("x",)
    plain = LLM(str(checkpoints / "base"), dtype="float32", **options)
    with pytest.raises(ValueError, match="this model has no LoRA slots"):
        plain.add_lora("a", checkpoints / "a")
    # vLLM's LoRARequest: loaded on first use, then found by name; AsyncLLM alike (its own
    # engine over the same loaded model: its slots are its own).
    from qwenjax import AsyncLLM, LoRARequest

    request = LoRARequest("sql", 1, str(checkpoints / "a"))
    out = llm.generate([prompt], greedy, lora_request=request, use_tqdm=False)[0]
    assert out.token_ids == oracles["merged_a"]
    assert out.lora_request is request  # vLLM's RequestOutput.lora_request
    assert llm.list_loras() == ("x", "sql")  # slot order: "x" took slot 1 again
    named = llm.generate([prompt], greedy, lora="sql", use_tqdm=False)[0].lora_request
    assert (named.lora_name, named.lora_int_id) == ("sql", llm.engine.loras.load_id("sql"))
    assert llm.generate([prompt], greedy, use_tqdm=False)[0].lora_request is None
    assert {o.lora_request.lora_name for o in llm.stream(prompt, greedy, lora="x")} == {"x"}
    with pytest.raises(ValueError, match="lora or lora_request, not both"):
        llm.generate([prompt], greedy, lora="x", lora_request=request)
    served = AsyncLLM(llm.lm, **options)

    on_b = LoRARequest("b", 2, str(checkpoints / "b"))

    async def stream():
        return [o async for o in served.generate(prompt, greedy, lora=on_b)][-1]

    try:
        last = asyncio.run(stream())
        assert last.token_ids == oracles["merged_b"] and last.lora_request is on_b
    finally:
        served.shutdown()


def test_adapters_that_cannot_be_applied_are_refused(tmp_path, checkpoints):
    from server.cli import check_lora_names

    check_lora_names(["qwen"], ["sql", "chat"])
    with pytest.raises(ValueError, match="qwen is also the served model's name"):
        check_lora_names(["qwen", "q2"], ["qwen"])
    assert parse_lora_modules(["x=/a", "y=/b"]) == {"x": "/a", "y": "/b"}
    with pytest.raises(ValueError, match="name=path"):
        parse_lora_modules(["nopath"])
    with pytest.raises(ValueError, match="twice"):
        parse_lora_modules(["x=/a", "x=/b"])
    shutil.copytree(checkpoints / "a", tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora"):
        read_adapter("dora", tmp_path / "dora")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_adapter("none", tmp_path)
    wider = tiny_config(num_layers=2, vocab_size=256, intermediate_size=128)
    write_hf_checkpoint(wider, tmp_path / "wider")
    with pytest.raises(ValueError, match=r"layer 0 \w+_proj maps (64 → 96|96 → 64); the model.s maps"):
        load_model(tmp_path / "wider", dtype="float32", lora_modules={"a": checkpoints / "a"})
    with pytest.raises(ValueError, match="pp = 1"):
        load_model(checkpoints / "base", pp=2, dtype="float32", lora_modules={"a": checkpoints / "a"})


def test_servers_pick_the_adapter_by_model_name_and_lora_field(checkpoints, server_loop):
    """HTTP: ``model`` names an adapter (listed by /v1/models with its parent); gRPC: the lora
    field. Both give the merged checkpoint's greedy tokens; an unknown adapter is 404/NOT_FOUND."""
    import urllib.request

    import grpc

    from qwenjax import LLM, SamplingParams
    from qwenjax.engine.async_engine import EngineThread
    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax_proto.v1 import inference_pb2 as pb
    from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc
    from server_harness import Servers, collect, greedy

    config = EngineConfig(max_model_len=128, max_num_seqs=2, max_prefill_seqs=1, prefill_chunk=32,
                          num_pages=32)
    lm = load_model(checkpoints / "base", dtype="float32", lora_modules={"a": checkpoints / "a"},
                    max_loras=2)
    thread = EngineThread(Engine(lm, config, warm_up=False, progress=False))
    servers = Servers(server_loop, thread, port=0, metrics_port=None, http_port=0,
                      allow_runtime_lora_updating=True)
    try:
        server = servers.start()
        prompt = [int(t) for t in np.random.default_rng(5).integers(0, 250, 12)]
        oracle = LLM(str(checkpoints / "merged_a"), dtype="float32", max_model_len=128,
                     max_num_seqs=2, warm_up=False, progress=False)
        want = oracle.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6),
                               use_tqdm=False)[0].token_ids
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            ids, _, _ = collect(stub.Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt), sampling=greedy(6), lora="a"), timeout=120))
            assert ids == want
            assert list(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).lora_adapters) == ["a"]
            with pytest.raises(grpc.RpcError) as error:
                collect(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                                         sampling=greedy(2), lora="zz"), timeout=60))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND

        base = f"http://127.0.0.1:{server.http_port}"
        with urllib.request.urlopen(base + "/v1/models", timeout=30) as response:
            models = json.loads(response.read())["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("a", "base")]
        def complete(model):
            body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                               "logprobs": 0}).encode()
            request = urllib.request.Request(base + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())

        with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
        # vLLM's LoRA info series (the Gateway API inference extension routes by it).
        assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",' \
               'waiting_lora_adapters=""}' in metrics
        reply, plain = complete("a"), complete("base")
        assert reply["model"] == "a" and reply["usage"]["completion_tokens"] == 6
        # The adapter ran (this tiny model has no tokenizer, so compare the logprobs).
        assert reply["choices"][0]["logprobs"]["token_logprobs"] != \
            plain["choices"][0]["logprobs"]["token_logprobs"]
        assert complete("a")["choices"][0]["logprobs"] == reply["choices"][0]["logprobs"]

        # Loading and unloading while serving: HTTP as vLLM's routes, gRPC as its own RPCs.
        def post(path, body, server_port=server.http_port):
            request = urllib.request.Request(f"http://127.0.0.1:{server_port}{path}",
                                             data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())["error"]["message"]

        assert post("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(checkpoints / "b")}) \
            == (200, "Success: LoRA adapter 'b' added successfully.")
        assert complete("b")["model"] == "b"
        assert complete("b")["choices"][0]["logprobs"] != plain["choices"][0]["logprobs"]
        status, message = post("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "x"})
        assert status == 400 and "already loaded" in message
        status, message = post("/v1/load_lora_adapter", {"lora_name": "c",
                                                         "lora_path": str(checkpoints / "nowhere")})
        assert status == 404 and "adapter_config.json" in message
        status, message = post("/v1/load_lora_adapter", {"lora_name": "base", "lora_path": "x"})
        assert status == 400 and "the served model's name" in message
        assert post("/v1/load_lora_adapter", {"lora_name": "c"})[0] == 400
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            reply = stub.UnloadLoRAAdapter(pb.UnloadLoRAAdapterRequest(lora_name="b"), timeout=30)
            assert list(reply.lora_adapters) == ["a"]
            with pytest.raises(grpc.RpcError) as error:
                stub.UnloadLoRAAdapter(pb.UnloadLoRAAdapterRequest(lora_name="b"), timeout=30)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            reply = stub.LoadLoRAAdapter(pb.LoadLoRAAdapterRequest(
                lora_name="b2", lora_path=str(checkpoints / "b")), timeout=60)
            assert list(reply.lora_adapters) == ["a", "b2"]
            ids, _, _ = collect(stub.Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt), sampling=greedy(6), lora="b2"), timeout=120))
            assert len(ids) == 6
        assert post("/v1/unload_lora_adapter", {"lora_name": "b2"}) == \
            (200, "Success: LoRA adapter 'b2' removed successfully.")
        # Off unless the server was started with it: no HTTP route, PERMISSION_DENIED on gRPC.
        locked = servers.start(allow_runtime_lora_updating=False)
        assert post("/v1/load_lora_adapter", {"lora_name": "d", "lora_path": "x"},
                    locked.http_port)[0] == 404
        with grpc.insecure_channel(locked.address) as channel:
            with pytest.raises(grpc.RpcError) as error:
                pb_grpc.InferenceStub(channel).LoadLoRAAdapter(pb.LoadLoRAAdapterRequest(
                    lora_name="d", lora_path=str(checkpoints / "b")), timeout=30)
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        servers.stop_all()
        thread.shutdown()
