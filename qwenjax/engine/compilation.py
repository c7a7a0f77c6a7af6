"""Compiling the step programs at start-up: how many at once, and which the persistent
compilation cache already holds (a warm start may load them in parallel)."""
from __future__ import annotations

import hashlib
import io
import os
import pathlib
from typing import Sequence

import jax

# Notes, beside JAX's persistent compilation cache, of the programs a warm-up put into it.
_COMPILED_NOTES = "qwenjax-compiled"


def _program_note(lowered, cache_dir: str | None) -> pathlib.Path | None:
    """The file noting that this lowered program was compiled into the persistent cache before:
    a hash of its StableHLO, the jax version, the device kind and XLA_FLAGS (None: no cache)."""
    directory = cache_dir or jax.config.jax_compilation_cache_dir
    if not directory:
        return None
    try:
        module = io.BytesIO()
        lowered.compiler_ir("stablehlo").operation.write_bytecode(module)
    except Exception:  # noqa: BLE001 - an unknown program is compiled one at a time
        return None
    device = jax.devices()[0]
    digest = hashlib.sha256(module.getvalue())
    digest.update(f"{jax.__version__} {device.platform} {device.device_kind} "
                  f"{os.environ.get('XLA_FLAGS', '')}".encode())
    return pathlib.Path(directory) / _COMPILED_NOTES / digest.hexdigest()


def compile_workers(lowered: Sequence, *, platform: str | None = None,
                    cache_dir: str | None = None) -> int:
    """Threads for compiling ``lowered`` programs. On CPU, one per core. On an accelerator, one
    per core only when the persistent cache already holds every program (a warm start only
    loads them); a cold compile goes one program at a time, because XLA's autotuner times
    candidate kernels on the device, and programs compiling side by side would disturb it."""
    cores = os.cpu_count() or 1
    if (platform or jax.devices()[0].platform) == "cpu":
        return cores
    notes = [_program_note(program, cache_dir) for program in lowered]
    return cores if all(note is not None and note.exists() for note in notes) else 1


def remember_compiled(lowered: Sequence, *, platform: str | None = None,
                      cache_dir: str | None = None) -> None:
    """Note ``lowered`` programs as compiled into the persistent cache (see compile_workers;
    CPU compiles on every core anyway, so nothing is noted there)."""
    if (platform or jax.devices()[0].platform) == "cpu":
        return
    for program in lowered:
        note = _program_note(program, cache_dir)
        if note is not None:
            note.parent.mkdir(parents=True, exist_ok=True)
            note.touch()
