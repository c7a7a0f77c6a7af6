"""Test set-up: 8 fake CPU devices, float32 matmuls at full precision.

XLA_FLAGS must be set before JAX is imported anywhere, so this runs first.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# CPU unless the caller chose (scripts/gpu_session.sh sets it empty to run tests/test_gpu.py on a GPU).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def real_model_dir():
    """HF-layout directory of the real Qwen2.5-Coder-0.5B-Instruct (built once into the cache)."""
    from qwenjax.model_fetch import fetch_default_model

    return fetch_default_model(progress=False)


@pytest.fixture(scope="session")
def tokenizer(real_model_dir):
    """The real model's tokenizer (tokenizer.json + chat template)."""
    from qwenjax.tokenizer import Tokenizer

    return Tokenizer.from_dir(real_model_dir)


# The real-model engine of the server tests (test_server.py, test_server_openai.py): loaded and
# warmed up once, served by several servers on one event loop thread.
@pytest.fixture(scope="session")
def served_model(real_model_dir):
    from server_harness import SERVER_DTYPE, SERVER_ENGINE

    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax.loading import load_model

    lm = load_model(real_model_dir, tp=1, dtype=SERVER_DTYPE)
    engine = Engine(lm, EngineConfig(**SERVER_ENGINE), warm_up=True, progress=False)
    return lm, engine


@pytest.fixture(scope="session")
def server_loop():
    from server_harness import LoopThread

    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def served_engine_thread(served_model):
    from qwenjax.engine.async_engine import EngineThread

    thread = EngineThread(served_model[1])
    yield thread
    thread.shutdown()


# $QWENJAX_TEST_RSS_LOG=FILE: after each test module, a line "<module> <RSS MB> <peak RSS MB>"
# (to find the modules that grow the suite's memory; CI's machine has 24 GB).
_RSS_LOG = os.environ.get("QWENJAX_TEST_RSS_LOG")


def _rss_mb() -> tuple[int, int]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value
    return tuple(int(fields.get(k, "0 kB").split()[0]) // 1024 for k in ("VmRSS", "VmHWM"))


def _release_memory() -> None:
    """What a finished test module leaves: its engines and models (cycles, so gc), the programs
    jit compiled for them, and the freed heap glibc keeps (without this the suite's peak RSS
    reached 22.6 GB of CI's 24)."""
    import ctypes
    import gc

    gc.collect()
    jax.clear_caches()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


@pytest.fixture(scope="module", autouse=True)
def _log_rss(request):
    yield
    _release_memory()
    if _RSS_LOG:
        rss, peak = _rss_mb()
        with open(_RSS_LOG, "a") as f:
            f.write(f"{request.module.__name__} {rss} {peak}\n")
