"""Data-parallel replicas: engines on disjoint devices behind one EngineReplicas answer as a
single engine does, spread the load, route aborts, and keep their LoRA adapters in step."""
import argparse
import asyncio

import numpy as np
import pytest

from qwenjax.engine.async_engine import EngineThread
from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.engine.replicas import EngineReplicas
from qwenjax.loading import load_model
from qwenjax.parallel import make_mesh
from qwenjax.sampling import SamplingParams
from test_lora import write_adapter
from tiny import tiny_config, write_hf_checkpoint

CONFIG = EngineConfig(max_model_len=128, max_num_seqs=4, max_prefill_seqs=2, prefill_chunk=32,
                      num_pages=48, decode_buckets=(4,), prefill_buckets=(64,))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    write_hf_checkpoint(tiny_config(num_layers=2, vocab_size=256), root / "base")
    write_adapter(root / "a", root / "base", rank=4, alpha=8, seed=1)
    return root


def _replicas(tiny, **load):
    import jax

    devices = jax.devices()
    threads = [EngineThread(Engine(load_model(tiny / "base", dtype="float32",
                                              mesh=make_mesh(tp=2, devices=devices[2 * r:2 * r + 2]),
                                              **load),
                                   CONFIG, warm_up=False, progress=False)) for r in range(2)]
    return EngineReplicas(threads)


async def _last(stream):
    return [output async for output in stream][-1]


def test_replicas_answer_as_one_engine_and_share_the_load(tiny):
    prompts = [list(map(int, np.random.default_rng(i).integers(0, 250, 10 + i))) for i in range(6)]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    single = EngineThread(Engine(load_model(tiny / "base", dtype="float32"), CONFIG,
                                 warm_up=False, progress=False))
    replicas = _replicas(tiny)
    chosen = []
    pick = replicas.pick
    replicas.pick = lambda ids, lora=None: chosen.append(pick(ids, lora)) or chosen[-1]

    async def run(server):
        return await asyncio.gather(*(_last(server.generate(p, greedy, f"r{i}"))
                                      for i, p in enumerate(prompts)))

    try:
        want = asyncio.run(run(single))
        got = asyncio.run(run(replicas))
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        # Six requests at once: three on each replica (the least loaded takes the next).
        assert sorted(chosen) == [0, 0, 0, 1, 1, 1]
        assert replicas._load == [0, 0] and replicas._owner == {}
        assert [e.lm.mesh.devices.flat[0].id for e in replicas.engines] == [0, 2]

        async def aborted():
            stream = replicas.generate(prompts[0], SamplingParams(max_tokens=100, ignore_eos=True),
                                       "long")
            first = await anext(stream)
            replicas.abort("long")
            return [first] + [o async for o in stream]

        outputs = asyncio.run(aborted())
        assert outputs[-1].finish_reason == "abort" and len(outputs[-1].token_ids) < 100
    finally:
        single.shutdown()
        replicas.shutdown()


def test_adapters_load_into_every_replica(tiny):
    replicas = _replicas(tiny, max_loras=1)
    prompt = list(map(int, np.random.default_rng(9).integers(0, 250, 12)))
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    try:
        asyncio.run(replicas.add_lora("a", tiny / "a"))
        assert [e.lora_names for e in replicas.engines] == [("a",), ("a",)]
        with pytest.raises(ValueError, match="already loaded"):
            asyncio.run(replicas.add_lora("a", tiny / "a"))
        # Each replica runs the adapter alike.
        outs = [asyncio.run(_last(replicas.threads[r].generate(prompt, greedy, f"x{r}", lora="a")))
                for r in range(2)]
        assert outs[0].token_ids == outs[1].token_ids

        async def unload_while_busy():
            stream = replicas.threads[0].generate(prompt, SamplingParams(max_tokens=100,
                                                                         ignore_eos=True), "busy",
                                                  lora="a")
            await anext(stream)
            with pytest.raises(ValueError, match="replica 0: lora 'a' has 1 request"):
                await replicas.remove_lora("a")
            # Replica 1 let it go: new requests on it go to replica 0, which still holds it.
            assert [e.lora_names for e in replicas.engines] == [("a",), ()]
            assert replicas.pick(prompt, "a") == 0
            replicas.threads[0].abort("busy")
            async for _ in stream:
                pass
            await replicas.remove_lora("a")

        asyncio.run(unload_while_busy())
        assert [e.lora_names for e in replicas.engines] == [(), ()]
    finally:
        replicas.shutdown()


def test_serve_builds_one_mesh_per_replica(tmp_path):
    from server.cli import add_serve_arguments, replica_meshes

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    meshes = replica_meshes(parser.parse_args(["m", "-dp", "2", "-tp", "2"]))
    assert [[d.id for d in m.devices.flat] for m in meshes] == [[0, 1], [2, 3]]
    assert replica_meshes(parser.parse_args(["m", "-tp", "2"])) is None
    meshes = replica_meshes(parser.parse_args(["m", "-dp", "2", "--devices", "7,6,5,4", "-tp", "2"]))
    assert [[d.id for d in m.devices.flat] for m in meshes] == [[7, 6], [5, 4]]
    with pytest.raises(ValueError, match="needs 6 devices; 4 are given"):
        replica_meshes(parser.parse_args(["m", "-dp", "3", "--devices", "0,1,2,3", "-tp", "2"]))
    # A mesh config with axes.dp = 2: one replica per slice of its device grid.
    config = (tmp_path / "dp2.yaml")
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "configs/meshes/cpu-8.yaml").read_text()
    config.write_text(text.replace("axes: {dp: 1, tp: 8, pp: 1}", "axes: {dp: 2, tp: 4, pp: 1}")
                      .replace("name: cpu-8", "name: dp2"))
    meshes = replica_meshes(parser.parse_args(["m", "--mesh", str(config)]))
    assert [dict(m.shape) for m in meshes] == [{"dp": 1, "tp": 4}] * 2
    assert {d.id for m in meshes for d in m.devices.flat} == set(range(8))
    with pytest.raises(ValueError, match="disagree"):
        replica_meshes(parser.parse_args(["m", "--mesh", str(config), "-dp", "4"]))


def test_a_server_over_replicas(tiny, server_loop):
    """The servers take EngineReplicas where they take one EngineThread: gRPC and HTTP answer,
    metrics sum the replicas, the start-up line names them."""
    import json
    import urllib.request

    import grpc

    from qwenjax_proto.v1 import inference_pb2 as pb
    from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc
    from server_harness import Servers, collect, greedy

    replicas = _replicas(tiny)
    servers = Servers(server_loop, replicas, port=0, metrics_port=None, http_port=0)
    try:
        server = servers.start()
        assert "× 2 replicas" in server.describe()
        prompt = list(map(int, np.random.default_rng(3).integers(0, 250, 12)))
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            ids, _, _ = collect(stub.Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt), sampling=greedy(5)), timeout=120))
            assert len(ids) == 5
        base = f"http://127.0.0.1:{server.http_port}"
        body = json.dumps({"prompt": prompt, "max_tokens": 5, "temperature": 0}).encode()
        request = urllib.request.Request(base + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 5
        with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert "qwenjax:kv_pages_total 96.0" in metrics  # 48 pages on each replica
    finally:
        servers.stop_all()
        replicas.shutdown()
