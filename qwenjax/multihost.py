"""Multi-host SPMD serving: one mesh over several processes, one scheduler.

Every process runs ``jax.distributed.initialize`` and loads its own shards of the
weights (``make_array_from_callback`` reads only addressable shards). Process 0,
the *leader*, runs the engine (scheduler, gRPC); every step it sends the step's
plan (``step_plan.StepPlan``: the packed numpy arrays and the sampling batch) to the
*followers*, which run the same compiled programs in the same order with the same
shapes. Collectives inside the programs then pair up, and only the leader reads
the (replicated) sampled tokens back.

The plan channel is a TCP connection of its own from each follower to the leader
(``--plan-port``, default the coordinator port + 1). Messages are length-prefixed
frames: one JSON header, then the arrays as ``.npy`` bytes loaded with
``allow_pickle=False`` — nothing executable crosses the wire.

Failures end processes rather than hang them (a peer that is gone leaves the others
blocked inside a collective that can never finish):

- a follower that disconnects or misses heartbeats for ``peer_timeout`` seconds makes
  the leader exit with status 1 and ``follower process N ...`` on stderr;
- a leader that disconnects or goes silent makes each follower exit with status 1 and
  ``the leader (process 0) ...``;
- a step that fails on the leader alone, after its plan was sent, leaves the followers
  inside its collectives for good; the leader then resets the cache, and a follower whose
  loop has not taken that reset within ``RESET_WAIT_SECONDS`` tells the leader why
  (``fatal``) and exits with status 1, and the leader with it;
- a clean leader shutdown (``shutdown()``, also run at exit) sends ``stop``; followers
  then return 0.
"""
from __future__ import annotations

import atexit
import dataclasses
import io
import json
import logging
import os
import queue
import socket
import struct
import sys
import threading
import time
from typing import Callable, Mapping

import numpy as np

log = logging.getLogger(__name__)

COORDINATOR_ENV = "QWENJAX_COORDINATOR"
NUM_PROCESSES_ENV = "QWENJAX_NUM_PROCESSES"
PROCESS_ID_ENV = "QWENJAX_PROCESS_ID"
PLAN_PORT_ENV = "QWENJAX_PLAN_PORT"

HEARTBEAT_SECONDS = 1.0
PEER_TIMEOUT_SECONDS = 30.0      # silence after which a peer counts as gone
CONNECT_TIMEOUT_SECONDS = 300.0  # followers joining the plan channel after initialize
FAILURE_EXIT_CODE = 1
_MAX_FRAME = 1 << 31             # one header or array; a plan is a few MB at most


# ---- configuration ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Distributed:
    coordinator: str      # HOST:PORT of process 0's jax coordinator
    num_processes: int
    process_id: int
    plan_port: int        # the leader's plan channel port, on the coordinator's host

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @property
    def host(self) -> str:
        return self.coordinator.rsplit(":", 1)[0]


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, plan_port: int | None = None,
            environ: Mapping[str, str] = os.environ) -> Distributed | None:
    """Flags first, then ``QWENJAX_COORDINATOR`` / ``_NUM_PROCESSES`` / ``_PROCESS_ID`` /
    ``_PLAN_PORT``. None when nothing is set (a single-process run)."""
    coordinator = coordinator or environ.get(COORDINATOR_ENV) or None
    if num_processes is None and environ.get(NUM_PROCESSES_ENV):
        num_processes = _int(environ[NUM_PROCESSES_ENV], NUM_PROCESSES_ENV)
    if process_id is None and environ.get(PROCESS_ID_ENV):
        process_id = _int(environ[PROCESS_ID_ENV], PROCESS_ID_ENV)
    if plan_port is None and environ.get(PLAN_PORT_ENV):
        plan_port = _int(environ[PLAN_PORT_ENV], PLAN_PORT_ENV)
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if all(v is None for v in given.values()):
        if plan_port is not None:
            raise ValueError("--plan-port is set but --coordinator, --num-processes and --process-id are not")
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"multi-host serving needs {', '.join(given)}; missing {', '.join(missing)} "
                         f"(or ${COORDINATOR_ENV}, ${NUM_PROCESSES_ENV}, ${PROCESS_ID_ENV})")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be ≥ 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    if plan_port is None:
        plan_port = int(port) + 1
    if not 0 < plan_port < 65536:
        raise ValueError(f"--plan-port must be in [1, 65535], got {plan_port}")
    return Distributed(coordinator, num_processes, process_id, plan_port)


# ---- wire format --------------------------------------------------------------------------
def _npy_bytes(array: np.ndarray) -> bytes:
    if array.dtype.hasobject:
        raise ValueError(f"object arrays cannot be sent (dtype {array.dtype})")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode(kind: str, meta: Mapping | None = None, arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """One message: a JSON header frame, then one ``.npy`` frame per array (names in the header)."""
    arrays = dict(arrays or {})
    header = json.dumps({"kind": kind, "meta": dict(meta or {}), "arrays": list(arrays)}).encode()
    frames = [header] + [_npy_bytes(a) for a in arrays.values()]
    return b"".join(struct.pack("<Q", len(f)) + f for f in frames)


class PeerGone(ConnectionError):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise PeerGone("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket) -> bytes:
    (n,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if n > _MAX_FRAME:
        raise ValueError(f"frame of {n} bytes exceeds the limit of {_MAX_FRAME}")
    return _recv_exact(sock, n)


def receive(sock: socket.socket) -> tuple[str, dict, dict[str, np.ndarray]]:
    header = json.loads(_recv_frame(sock))
    arrays = {}
    for name in header["arrays"]:
        arrays[name] = np.load(io.BytesIO(_recv_frame(sock)), allow_pickle=False)
    return header["kind"], header["meta"], arrays


def _die(message: str) -> None:
    """The default failure action: say why on stderr and end the process now (a thread
    stuck in a collective whose peer is gone would otherwise never return)."""
    log.critical("%s", message)
    print(f"qwenjax multihost: fatal: {message}", file=sys.stderr, flush=True)
    os._exit(FAILURE_EXIT_CODE)


# ---- the leader's end ----------------------------------------------------------------------
class Leader:
    """Process 0's plan channel: accepts every follower, then sends them each step's plan."""

    def __init__(self, port: int, num_processes: int, *, bind: str = "0.0.0.0",
                 accept_timeout: float = CONNECT_TIMEOUT_SECONDS,
                 peer_timeout: float = PEER_TIMEOUT_SECONDS,
                 on_failure: Callable[[str], None] = _die):
        self.on_failure = on_failure
        self.peer_timeout = peer_timeout
        self._lock = threading.Lock()
        self._closing = threading.Event()   # no more sends, no more failure reports
        self._stopping = threading.Event()  # stop sent: followers closing is expected
        self._peers: dict[int, socket.socket] = {}
        self._warm: set[int] = set()
        self._warm_changed = threading.Condition()
        listener = socket.create_server((bind, port), reuse_port=False)
        listener.settimeout(1.0)
        deadline = time.monotonic() + accept_timeout
        try:
            while len(self._peers) < num_processes - 1:
                if time.monotonic() > deadline:
                    waiting = sorted(set(range(1, num_processes)) - set(self._peers))
                    raise TimeoutError(f"follower process(es) {waiting} did not join the plan channel "
                                       f"on port {port} within {accept_timeout:.0f}s")
                try:
                    sock, address = listener.accept()
                except socket.timeout:
                    continue
                sock.settimeout(peer_timeout)
                try:
                    kind, meta, _ = receive(sock)
                    pid = int(meta["process_id"])
                    if kind != "hello" or not 0 < pid < num_processes or pid in self._peers:
                        raise ValueError(f"unexpected hello {kind!r} {meta!r}")
                except (OSError, ValueError, KeyError) as error:
                    log.warning("refused a plan-channel connection from %s: %s", address, error)
                    sock.close()
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._peers[pid] = sock
        finally:
            listener.close()
        for pid, sock in self._peers.items():
            threading.Thread(target=self._watch, args=(pid, sock), daemon=True,
                             name=f"qwenjax-watch-{pid}").start()
        threading.Thread(target=self._heartbeat, daemon=True, name="qwenjax-heartbeat").start()
        log.info("plan channel: %d follower(s) joined", len(self._peers))

    @property
    def num_followers(self) -> int:
        return len(self._peers)

    def _fail(self, pid: int, what: str) -> None:
        if self._closing.is_set() or self._stopping.is_set():
            return
        self._closing.set()
        self.on_failure(f"follower process {pid} {what}; the mesh cannot run without it, so the "
                        f"leader (process 0) stops")

    def _watch(self, pid: int, sock: socket.socket) -> None:
        """Followers send heartbeats, ``warm`` after a warm-up and ``fatal`` before they give up;
        silence or a closed socket means the follower is gone."""
        try:
            while not self._closing.is_set():
                kind, meta, _ = receive(sock)
                if kind == "warm":
                    with self._warm_changed:
                        self._warm.add(pid)
                        self._warm_changed.notify_all()
                elif kind == "fatal":
                    self._fail(pid, f"stopped: {meta.get('why')}")
                    return
        except socket.timeout:
            self._fail(pid, f"sent no heartbeat for {self.peer_timeout:.0f}s")
        except (OSError, ValueError) as error:
            self._fail(pid, f"disconnected ({error})")

    def _heartbeat(self) -> None:
        while not self._closing.wait(HEARTBEAT_SECONDS):
            self.send("ping")

    def send(self, kind: str, meta: Mapping | None = None,
             arrays: Mapping[str, np.ndarray] | None = None) -> None:
        data = encode(kind, meta, arrays)
        with self._lock:
            for pid, sock in self._peers.items():
                if self._closing.is_set():
                    return
                try:
                    sock.sendall(data)
                except OSError as error:
                    self._fail(pid, f"disconnected ({error})")

    def wait_warm(self) -> None:
        """Block until every follower has finished the warm-up sent to it (a follower that dies
        meanwhile ends this process through ``on_failure``)."""
        with self._warm_changed:
            self._warm_changed.wait_for(lambda: len(self._warm) == len(self._peers) or self._closing.is_set())
            self._warm.clear()

    def stop(self) -> None:
        """Tell every follower to exit cleanly, then close the channel."""
        if self._closing.is_set():
            return
        self._stopping.set()
        self.send("stop")
        self._closing.set()
        with self._lock:
            for sock in self._peers.values():
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass


# ---- a follower's end ---------------------------------------------------------------------
class Follower:
    """A follower's plan channel: messages from the leader arrive on ``receive()``."""

    def __init__(self, host: str, port: int, process_id: int, *,
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
                 peer_timeout: float = PEER_TIMEOUT_SECONDS,
                 on_failure: Callable[[str], None] = _die):
        self.on_failure = on_failure
        self.peer_timeout = peer_timeout
        self._messages: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._reset_since: float | None = None  # a cache reset arrived, not yet taken by the loop
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=5.0)
                break
            except OSError as error:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cannot reach the leader's plan channel at {host}:{port} "
                                       f"within {connect_timeout:.0f}s: {error}") from None
                time.sleep(0.2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(encode("hello", {"process_id": process_id}))
        sock.settimeout(peer_timeout)
        self._sock = sock
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True, name="qwenjax-plan-reader").start()
        threading.Thread(target=self._heartbeat, daemon=True, name="qwenjax-heartbeat").start()

    def _fail(self, what: str) -> None:
        if not self._done.is_set():
            self._done.set()
            self.on_failure(f"the leader (process 0) {what}; this follower stops")

    def _read(self) -> None:
        try:
            while True:
                kind, meta, arrays = receive(self._sock)
                if kind == "ping":
                    continue
                if kind == "reset" and self._reset_since is None:
                    self._reset_since = time.monotonic()
                self._messages.put((kind, meta, arrays))
                if kind == "stop":
                    self._done.set()
                    return
        except socket.timeout:
            self._fail(f"sent nothing for {self.peer_timeout:.0f}s")
        except (OSError, ValueError) as error:
            self._fail(f"disconnected without a stop message ({error})")

    def _heartbeat(self) -> None:
        while not self._done.wait(HEARTBEAT_SECONDS):
            try:
                with self._send_lock:
                    self._sock.sendall(encode("ping"))
            except OSError:
                return  # the reader reports why

    def receive(self, timeout: float | None = None) -> tuple[str, dict, dict[str, np.ndarray]]:
        message = self._messages.get(timeout=timeout)
        if message[0] == "reset":
            self._reset_since = None
        return message

    def reset_waiting(self) -> float:
        """Seconds a cache reset from the leader has waited for ``receive()`` (0: none waits)."""
        since = self._reset_since
        return 0.0 if since is None else time.monotonic() - since

    def send(self, kind: str, meta: Mapping | None = None) -> None:
        """Tell the leader something (``warm``: the warm-up it sent is done; ``fatal``: why
        this follower is about to exit)."""
        with self._send_lock:
            self._sock.sendall(encode(kind, meta))

    def close(self) -> None:
        self._done.set()
        try:
            self._sock.close()
        except OSError:
            pass


# ---- process-wide state ---------------------------------------------------------------------
_state: dict[str, object] = {}


def initialize(dist: Distributed, *, connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
               peer_timeout: float = PEER_TIMEOUT_SECONDS) -> None:
    """``jax.distributed.initialize`` (before anything touches devices), then the plan channel."""
    import jax

    if _state:
        raise RuntimeError("qwenjax.multihost.initialize was already called")
    # On CPU, cross-process collectives go over gloo (jax 0.10's default; set it for older ones).
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # an option this jax no longer has; its default then applies
        pass
    jax.distributed.initialize(dist.coordinator, dist.num_processes, dist.process_id,
                               initialization_timeout=int(connect_timeout))
    _state["dist"] = dist
    if dist.num_processes == 1:
        return
    if dist.is_leader:
        _state["leader"] = Leader(dist.plan_port, dist.num_processes, accept_timeout=connect_timeout,
                                  peer_timeout=peer_timeout)
        atexit.register(shutdown)
    else:
        _state["follower"] = Follower(dist.host, dist.plan_port, dist.process_id,
                                      connect_timeout=connect_timeout, peer_timeout=peer_timeout)


def distributed() -> Distributed | None:
    return _state.get("dist")


def leader() -> Leader | None:
    """Process 0's plan channel when running multi-host, else None."""
    return _state.get("leader")


def shutdown() -> None:
    """On the leader: stop the followers (they exit 0). Safe to call twice."""
    channel = _state.get("leader")
    if channel is not None:
        channel.stop()


def check_mesh(mesh_config, dist: Distributed | None) -> None:
    """A mesh config's hosts and devices must match the processes and devices jax sees."""
    import jax

    processes = dist.num_processes if dist is not None else 1
    where = mesh_config.source or mesh_config.name
    if mesh_config.hosts != processes:
        raise ValueError(f"{where}: hosts = {mesh_config.hosts} but {processes} process(es) run "
                         f"(--num-processes)")
    if mesh_config.num_devices != jax.device_count():
        raise ValueError(f"{where}: hosts×devices_per_host = {mesh_config.num_devices} but jax sees "
                         f"{jax.device_count()} device(s) over {processes} process(es)")


# ---- the follower loop ----------------------------------------------------------------------
STEP_FAILURE_WAIT_SECONDS = 30.0
# A step still running this long after the leader reset the cache is one the leader abandoned.
RESET_WAIT_SECONDS = 60.0


def _wait_step(outputs) -> None:
    import jax

    jax.block_until_ready(outputs)


def _watch_abandoned_steps(channel: Follower, busy: dict, done: threading.Event,
                           reset_wait: float) -> None:
    """End a follower stuck in a step the leader abandoned.

    A step that fails on the leader alone after its plan went out leaves this process inside
    the step's collectives, waiting for devices that will never join; no message can get it out.
    The leader's cache reset that follows is the sign: a reset that waits ``reset_wait`` seconds
    while the loop is still inside a step means the loop will never come back.
    """
    while not done.wait(min(1.0, reset_wait / 4)):
        step = busy.get("step")
        waited = channel.reset_waiting()
        if step is not None and waited > reset_wait:
            why = (f"step {step} cannot finish: the leader reset the cache {waited:.0f}s ago (the "
                   f"step failed there), so this process waits in collectives that never complete")
            try:
                channel.send("fatal", {"why": why})
            except OSError:
                pass  # the leader is gone too
            channel.on_failure(f"{why}; this follower stops")
            return


def run_follower(lm, channel: Follower | None = None, *, reset_wait: float = RESET_WAIT_SECONDS) -> int:
    """Mirror the leader's runner until it says stop: set-up, warm-up, steps, cache resets.

    Returns 0 after a clean stop. A step that fails here must fail on the leader too (it then
    resets the cache); if the leader goes on instead, the processes disagree and this one exits.
    A step that failed on the leader alone never finishes here: see ``_watch_abandoned_steps``.
    """
    channel = channel or _state.get("follower")
    if channel is None:
        raise RuntimeError("run_follower needs a follower process (multihost.initialize with process_id > 0)")
    busy = {"step": None}  # the step the loop is inside, for the watchdog
    done = threading.Event()
    threading.Thread(target=_watch_abandoned_steps, args=(channel, busy, done, reset_wait),
                     daemon=True, name="qwenjax-step-watchdog").start()
    try:
        return _follow(lm, channel, busy)
    finally:
        done.set()


def _follow(lm, channel: Follower, busy: dict) -> int:
    import jax

    from qwenjax.engine.runner import ModelRunner
    from qwenjax.engine.step_plan import StepPlan
    from qwenjax.engine.scheduler import SchedulerConfig

    runner = None
    failed = None
    previous = None  # the last step's sampled outputs, waited for after the next is dispatched
    steps = 0
    while True:
        try:
            kind, meta, arrays = channel.receive(timeout=STEP_FAILURE_WAIT_SECONDS if failed else None)
        except queue.Empty:
            channel.on_failure(f"sent no cache reset within {STEP_FAILURE_WAIT_SECONDS:.0f}s of a step "
                               f"that failed here ({failed})")
            return FAILURE_EXIT_CODE
        if failed is not None and kind != "reset":
            channel.on_failure(f"sent {kind!r} after a step that failed here ({failed}); the processes "
                               "no longer agree")
            return FAILURE_EXIT_CODE
        if kind == "stop":
            log.info("the leader said stop")
            channel.close()
            if jax.process_count() > 1:
                jax.distributed.shutdown()
            return 0
        if kind == "setup":
            runner = ModelRunner(lm, SchedulerConfig(**meta["scheduler"]), meta["num_pages"],
                                 meta["eos_token_ids"], kv_cache_dtype=meta["kv_cache_dtype"])
        elif runner is None:
            channel.on_failure(f"sent {kind!r} before setup")
            return FAILURE_EXIT_CODE
        elif kind == "warm_up":
            runner.warm_up(progress=False, workers=meta.get("workers"))
            channel.send("warm")
        elif kind == "reset":
            runner.reset_cache()
            failed = previous = None
        elif kind == "step":
            steps += 1
            busy["step"] = steps
            try:
                sampled = runner.run(StepPlan.from_message(meta, arrays))
                # Wait for the step before this one only (the leader, scheduling asynchronously,
                # dispatches a step before it reads the one before back): this device then
                # never idles while the next step is unpacked and dispatched here.
                if previous is not None:
                    _wait_step(previous)
                previous = sampled
            except Exception as error:  # noqa: BLE001 - the leader decides; see above
                log.exception("step failed on this follower")
                failed = f"{type(error).__name__}: {error}"
                previous = None
            finally:
                busy["step"] = None
        else:
            channel.on_failure(f"sent an unknown message {kind!r}")
            return FAILURE_EXIT_CODE
