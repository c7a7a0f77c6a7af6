"""Multi-host serving: two processes × 4 CPU devices form one 8-device mesh over
``jax.distributed`` (gloo collectives), and must produce the single-process tokens.

The leader runs the real engine path (``LLM`` → Engine → ModelRunner, steps sent over
the plan channel); the follower is the real ``python -m server --process-id 1`` CLI.
The full ``serve`` leader (gRPC) is not run here (its warm-up compiles every shape);
docs/multihost.md says how it was checked by hand.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qwenjax import multihost
from qwenjax.engine.step_plan import StepPlan
from qwenjax.sampling import SamplingParams, SamplingRow, build_sampling_batch

from tiny import tiny_config, write_hf_checkpoint

REPO = Path(__file__).resolve().parent.parent
# Three requests batched together: one packed prefill step (0 decode rows, 16 tokens), then
# decode steps of 4 rows — two step programs to compile, which keeps CI time down.
PROMPTS = [[5, 17, 33, 8], [3, 4, 5, 6, 7], [100, 9, 81, 4, 200, 13]]
MAX_TOKENS = 8
ENGINE_OPTIONS = dict(max_num_seqs=4, max_prefill_seqs=4, prefill_chunk=16, max_num_batched_tokens=16,
                      max_model_len=64, num_pages=32, compile_cache=False)
MESH_YAML = """\
name: cpu-2x4
description: two processes of 4 fake CPU devices, one TP8 group (tests)
hosts: 2
devices_per_host: 4
axes: {dp: 1, tp: 8, pp: 1}
dtype: float32
max_model_len: 128
kv_cache_fraction: 0.5
page_size: 16
hardware:
  device: host CPU (fake XLA device)
  memory_gb: 4
  hbm_read_tbps: 0.005
  intra_node: {bandwidth_gbps: 5, latency_us: 20}
  inter_node: {bandwidth_gbps: 1, latency_us: 50}
"""

# The leader: the engine path (LLM) on the mesh the follower's --mesh builds.
LEADER = textwrap.dedent("""
    import json, sys, time
    from qwenjax import multihost
    model, mesh_file, coordinator, plan_port, out, mode = sys.argv[1:]
    multihost.initialize(multihost.resolve(coordinator, 2, 0, int(plan_port)))
    from qwenjax.llm import LLM
    from qwenjax.loading import load_model
    from qwenjax.mesh_config import load_mesh_config
    from qwenjax.sampling import SamplingParams
    lm = load_model(model, mesh=load_mesh_config(mesh_file).jax_mesh())
    llm = LLM(lm, progress=False, **json.loads(sys.stdin.readline()))
    prompts = json.loads(sys.stdin.readline())
    params = SamplingParams(max_tokens=int(sys.stdin.readline()), temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    with open(out, "w") as f:
        json.dump([o.token_ids for o in outputs], f)
    print("READY", flush=True)
    if mode == "wait":
        time.sleep(120)
""")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env() -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(REPO))
    for key in (multihost.COORDINATOR_ENV, multihost.NUM_PROCESSES_ENV, multihost.PROCESS_ID_ENV,
                multihost.PLAN_PORT_ENV):
        env.pop(key, None)
    return env


class Pair:
    """A leader (engine script) and a follower (``python -m server``) on localhost."""

    def __init__(self, tmp: Path, model_dir: Path, mode: str, prompts, max_tokens: int):
        coordinator_port, plan_port = _free_ports(2)
        mesh_file = tmp / "cpu-2x4.yaml"
        mesh_file.write_text(MESH_YAML)
        (tmp / "leader.py").write_text(LEADER)
        self.out = tmp / "tokens.json"
        coordinator = f"127.0.0.1:{coordinator_port}"
        self.leader = subprocess.Popen(
            [sys.executable, str(tmp / "leader.py"), str(model_dir), str(mesh_file), coordinator,
             str(plan_port), str(self.out), mode],
            cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.leader.stdin.write("\n".join(json.dumps(x) for x in (ENGINE_OPTIONS, prompts, max_tokens)) + "\n")
        self.leader.stdin.close()
        self.leader.stdin = None
        self.follower = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", str(model_dir), "--mesh", str(mesh_file),
             "--coordinator", coordinator, "--num-processes", "2", "--process-id", "1",
             "--plan-port", str(plan_port)],
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self, proc, timeout: float):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = proc.communicate()
            pytest.fail(f"process did not exit within {timeout}s\nstdout:\n{out}\nstderr:\n{err[-3000:]}")
        return proc.returncode, out, err

    def kill(self):
        for proc in (self.leader, self.follower):
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny checkpoint whose greedy tokens depend on the prompt: with HF's init (std 0.02)
    every prompt decodes to the same few tokens, so a follower running wrong inputs would go
    unnoticed; matrices scaled ×20 make each process's shards matter."""
    from safetensors.numpy import load_file, save_file

    directory = tmp_path_factory.mktemp("tiny-multihost")
    write_hf_checkpoint(tiny_config(), directory, seed=3)
    path = directory / "model.safetensors"
    tensors = {k: v * 20 if v.ndim == 2 else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, tiny_model):
    """The two-process run (leader exits normally at the end), plus the 8-device reference."""
    pair = Pair(tmp_path_factory.mktemp("pair"), tiny_model, "exit", PROMPTS, MAX_TOKENS)
    try:
        # The single-process reference runs while the pair starts up.
        from qwenjax.llm import LLM
        from qwenjax.parallel import make_mesh

        llm = LLM(str(tiny_model), mesh=make_mesh(tp=8), progress=False, **ENGINE_OPTIONS)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        reference = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        leader = pair.wait(pair.leader, 240)
        follower = pair.wait(pair.follower, 60)
    finally:
        pair.kill()
    return pair, reference, leader, follower


def test_two_processes_match_one_process(pair_run):
    pair, reference, (rc, out, err), _ = pair_run
    assert rc == 0, err[-3000:]
    tokens = json.loads(pair.out.read_text())
    assert len(tokens) == len(PROMPTS) and all(len(t) == MAX_TOKENS for t in tokens)
    assert len({tuple(t) for t in reference}) == len(PROMPTS)  # the model is not blind to its input
    assert tokens == reference


def test_leader_exit_stops_follower_cleanly(pair_run):
    _, _, (leader_rc, _, leader_err), (rc, out, err) = pair_run
    assert leader_rc == 0, leader_err[-3000:]
    assert rc == 0, err[-3000:]
    assert "the leader said stop" in err


def _kill_one_side(tmp_path, tiny_model, victim: str) -> tuple[int, str, float]:
    """Set up a pair with nothing to generate, SIGKILL ``victim`` ("leader" or "follower") and
    wait for the other: its exit code, its stderr and how long it took to exit."""
    pair = Pair(tmp_path, tiny_model, "wait", [], 1)
    survivor = pair.follower if victim == "leader" else pair.leader
    try:
        line = pair.leader.stdout.readline()
        assert line.strip() == "READY", pair.leader.communicate(timeout=30)[1][-3000:]
        getattr(pair, victim).send_signal(signal.SIGKILL)
        start = time.monotonic()
        rc, _, err = pair.wait(survivor, 30)
        return rc, err, time.monotonic() - start
    finally:
        pair.kill()


def test_follower_death_fails_leader(tmp_path, tiny_model):
    rc, err, elapsed = _kill_one_side(tmp_path, tiny_model, "follower")
    assert rc == multihost.FAILURE_EXIT_CODE
    assert "follower process 1 disconnected" in err, err[-3000:]
    assert elapsed < 15


def test_leader_death_fails_follower(tmp_path, tiny_model):
    rc, err, elapsed = _kill_one_side(tmp_path, tiny_model, "leader")
    assert rc == multihost.FAILURE_EXIT_CODE, err[-3000:]
    assert "the leader (process 0) disconnected without a stop message" in err, err[-3000:]
    assert elapsed < 15


# ---- in-process checks of the pieces -------------------------------------------------------
def test_resolve_flags_win_and_errors_name_the_field():
    env = {multihost.COORDINATOR_ENV: "10.0.0.1:1234", multihost.NUM_PROCESSES_ENV: "2",
           multihost.PROCESS_ID_ENV: "1"}
    d = multihost.resolve(environ=env)
    assert (d.coordinator, d.num_processes, d.process_id, d.plan_port) == ("10.0.0.1:1234", 2, 1, 1235)
    d = multihost.resolve("h:99", None, 0, 7000, environ=env)
    assert (d.coordinator, d.num_processes, d.process_id, d.plan_port) == ("h:99", 2, 0, 7000)
    assert d.is_leader and d.host == "h"
    assert multihost.resolve(environ={}) is None
    with pytest.raises(ValueError, match="missing --num-processes, --process-id"):
        multihost.resolve("h:1", environ={})
    with pytest.raises(ValueError, match="--process-id must be in \\[0, 2\\), got 2"):
        multihost.resolve("h:1", 2, 2, environ={})
    with pytest.raises(ValueError, match="--coordinator must be HOST:PORT"):
        multihost.resolve("nohost", 2, 0, environ={})
    with pytest.raises(ValueError, match="QWENJAX_NUM_PROCESSES must be an integer"):
        multihost.resolve(environ={**env, multihost.NUM_PROCESSES_ENV: "two"})


def test_step_plan_round_trips_through_the_wire_format():
    batch = build_sampling_batch([SamplingRow(SamplingParams(temperature=0.7, top_k=5, seed=1), 9, 2)], 4)
    tables = np.zeros((4, 64), np.int32)
    tables[:3, :2] = [[1, 2], [3, 0], [4, 5]]  # a block table: zeros past the pages in use
    decode = tuple(np.arange(4, dtype=np.int32).reshape(shape) for shape in ((4, 1), (4, 1), (4,))) + (
        tables, np.array([0, 1, 0, 2], np.int32))  # the last: each row's LoRA slot
    src = np.array([-1, 2, -1, 0], np.int32)  # rows 1 and 3 take their tokens on the device
    plan = StepPlan(4, 0, decode, None, batch, num_top=20, src=src,
                    score_index=np.array([1, 3], np.int32), score_target=np.array([7, 9], np.int32),
                    score_top=20, drafted=np.array([5, 6, 0, 0], np.int32))
    meta, arrays = plan.to_message()
    assert arrays["decode.3"].shape == (4, 2) and meta["widths"]["decode.3"] == 64  # sent trimmed
    a, b = socket.socketpair()
    with a, b:
        a.sendall(multihost.encode("step", meta, arrays))
        kind, meta, arrays = multihost.receive(b)
    back = StepPlan.from_message(meta, arrays)
    assert kind == "step" and back.prefill is None and (back.decode_rows, back.num_top) == (4, 20)
    for x, y in zip(decode + (src, plan.score_index, plan.score_target, plan.drafted),
                    back.decode + (back.src, back.score_index, back.score_target, back.drafted)):
        np.testing.assert_array_equal(x, y)
    assert back.score_top == 20
    for name in ("temperature", "top_k", "seeds", "penalty_in_prompt"):
        x, y = getattr(batch, name), getattr(back.sampling, name)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="object arrays"):
        multihost.encode("step", arrays={"x": np.array([{}], dtype=object)})


def _channel(peer_timeout=10.0):
    """A leader and one follower in this process, failures recorded instead of exiting."""
    (port,) = _free_ports(1)
    failures = {"leader": [], "follower": []}
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("leader", multihost.Leader(
        port, 2, bind="127.0.0.1", accept_timeout=20, peer_timeout=peer_timeout,
        on_failure=failures["leader"].append)))
    thread.start()
    follower = multihost.Follower("127.0.0.1", port, 1, connect_timeout=20, peer_timeout=peer_timeout,
                                  on_failure=failures["follower"].append)
    thread.join(20)
    return box["leader"], follower, failures


def _eventually(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_channel_stop_and_failures():
    leader, follower, failures = _channel()
    leader.send("reset")
    assert follower.receive(timeout=5)[0] == "reset"
    follower.send("warm")
    waiter = threading.Thread(target=leader.wait_warm)
    waiter.start()
    waiter.join(10)
    assert not waiter.is_alive()
    leader.stop()
    assert follower.receive(timeout=5)[0] == "stop"
    follower.close()
    assert not failures["leader"] and not failures["follower"]

    # A follower that goes away: the leader's failure names it, in bounded time.
    leader, follower, failures = _channel()
    follower.close()
    assert _eventually(lambda: failures["leader"])
    assert failures["leader"][0].startswith("follower process 1 disconnected")

    # A leader that closes without a stop message: the follower says so.
    leader, follower, failures = _channel()
    leader._closing.set()
    for sock in leader._peers.values():
        sock.close()
    assert _eventually(lambda: failures["follower"])
    assert "the leader (process 0) disconnected without a stop message" in failures["follower"][0]

    # A follower that falls silent (a host gone without closing its socket): heartbeat timeout.
    leader, follower, failures = _channel(peer_timeout=1.5)
    follower._done.set()  # stops its heartbeats, keeps the socket open
    assert _eventually(lambda: failures["leader"], timeout=10)
    assert "sent no heartbeat for 2s" in failures["leader"][0]
    follower.close()


class _FakeRunner:
    """Stands in for the follower's ModelRunner: the follower loop's control flow is under test."""

    def __init__(self, lm, config, num_pages, eos_token_ids, kv_cache_dtype="auto"):
        self.resets = 0

    def run(self, plan):
        if plan.decode_rows == 2:
            raise RuntimeError("device fault")
        return plan.decode_rows

    def reset_cache(self):
        self.resets += 1


def _plan_message(rows: int):
    batch = build_sampling_batch([SamplingRow(SamplingParams(temperature=0.0), 0, 0)] * rows, rows)
    decode = (np.zeros((rows, 1), np.int32),) * 2 + (np.ones(rows, np.int32), np.zeros((rows, 4), np.int32),
                                                      np.zeros(rows, np.int32))
    return StepPlan(rows, 0, decode, None, batch, num_top=0, src=np.full(rows, -1, np.int32)).to_message()


def _follow(follower, **kwargs):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", multihost.run_follower(
        None, follower, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def test_follower_failure_protocol(monkeypatch):
    from qwenjax.engine import runner as runner_module

    monkeypatch.setattr(runner_module, "ModelRunner", _FakeRunner)
    setup = {"scheduler": {}, "num_pages": 4, "eos_token_ids": [2], "kv_cache_dtype": "auto"}
    monkeypatch.setattr("qwenjax.engine.scheduler.SchedulerConfig", lambda **kw: None)

    # A step that fails on this follower and then on the leader: the leader's reset brings the
    # follower back; a step after a local failure without a reset means the processes disagree.
    leader, follower, failures = _channel()
    thread, result = _follow(follower)
    leader.send("setup", setup)
    leader.send("step", *_plan_message(2))
    leader.send("reset")
    leader.send("step", *_plan_message(4))
    leader.send("step", *_plan_message(2))
    leader.send("step", *_plan_message(4))
    thread.join(10)
    assert result["code"] == multihost.FAILURE_EXIT_CODE
    assert failures["follower"] == ["sent 'step' after a step that failed here (RuntimeError: device "
                                    "fault); the processes no longer agree"]
    follower.close()

    # A step that failed on the leader alone: the follower is stuck waiting for it (its
    # collectives never complete). The leader's reset then waits unread; the watchdog tells the
    # leader why and gives up, and the leader stops too.
    stuck, release = threading.Event(), threading.Event()

    def wait_step(outputs):
        stuck.set()
        release.wait(30)

    monkeypatch.setattr(multihost, "_wait_step", wait_step)
    leader, follower, failures = _channel()
    thread, result = _follow(follower, reset_wait=1.0)
    leader.send("setup", setup)
    leader.send("step", *_plan_message(4))
    leader.send("step", *_plan_message(4))  # waits for the first one: forever
    assert stuck.wait(10)
    time.sleep(1.5)
    assert not failures["follower"]  # a long step alone is no failure
    leader.send("reset")
    assert _eventually(lambda: failures["follower"] and failures["leader"], timeout=10)
    assert failures["follower"][0].startswith("step 2 cannot finish: the leader reset the cache")
    assert failures["follower"][0].endswith("; this follower stops")
    assert failures["leader"][0].startswith("follower process 1 stopped: step 2 cannot finish")
    release.set()  # here the process would have exited; let the loop finish instead
    follower._messages.put(("stop", {}, {}))
    thread.join(10)
    assert result["code"] == 0
    follower.close()


def test_check_mesh_names_the_mismatch():
    import dataclasses

    from qwenjax.mesh_config import load_mesh_config

    cpu8 = load_mesh_config("cpu-8")
    multihost.check_mesh(cpu8, None)  # 1 process, 8 devices: fits
    two_hosts = dataclasses.replace(cpu8, hosts=2, devices_per_host=4)
    with pytest.raises(ValueError, match="hosts = 2 but 1 process\\(es\\) run"):
        multihost.check_mesh(two_hosts, None)
    with pytest.raises(ValueError, match="hosts×devices_per_host = 16 but jax sees 8 device"):
        multihost.check_mesh(dataclasses.replace(cpu8, devices_per_host=16), None)
