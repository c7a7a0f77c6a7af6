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
