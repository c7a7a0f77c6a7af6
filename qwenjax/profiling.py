"""``jax.profiler`` traces into a directory, one timestamped folder per trace: what
``LLM.start_profile()``/``stop_profile()`` write (vLLM's, whose torch traces go to
``$VLLM_TORCH_PROFILER_DIR``) and what the server's ``/start_profile``, ``/stop_profile``
write (server/profiling.py). A trace holds the host's and the device's work; open its
``*.trace.json.gz`` in ui.perfetto.dev (TensorBoard reads the folder).
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import re

# Where traces go when no directory is given: qwenjax's variable, else vLLM's.
PROFILER_DIR_VARIABLES = ("QWENJAX_PROFILER_DIR", "VLLM_TORCH_PROFILER_DIR")

_NAME = re.compile(r"[A-Za-z0-9._-]+")


def profiler_dir(given: str | os.PathLike | None = None) -> pathlib.Path | None:
    """``given``, else $QWENJAX_PROFILER_DIR, else vLLM's $VLLM_TORCH_PROFILER_DIR; None when
    none is set."""
    if given is not None:
        return pathlib.Path(given)
    for variable in PROFILER_DIR_VARIABLES:
        if os.environ.get(variable):
            return pathlib.Path(os.environ[variable])
    return None


def check_prefix(prefix, field: str = "profile_prefix") -> None:
    """A prefix names a folder inside the profile directory, never a path elsewhere."""
    if prefix is not None and (not isinstance(prefix, str) or not _NAME.fullmatch(prefix or "x")):
        raise ValueError(f"{field} must be letters, digits, '.', '_' or '-', got {prefix!r}")


def trace_folder(directory: str | os.PathLike, prefix: str | None = None) -> pathlib.Path:
    """A new folder name under ``directory``: the time (to the microsecond), after ``prefix``."""
    check_prefix(prefix)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return pathlib.Path(directory) / (f"{prefix}-{stamp}" if prefix else stamp)


def start_trace(folder: pathlib.Path) -> None:
    """Trace everything this process does from now on into ``folder`` (one trace at a time per
    process: jax.profiler's rule)."""
    import jax

    folder.mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(str(folder), create_perfetto_trace=True)


def stop_trace(folder: pathlib.Path, memory: bool = False) -> dict:
    """Stop the trace running into ``folder`` (writing its files takes seconds) and describe it:
    ``directory``, ``trace`` (the Perfetto file; None if none was written), ``summary`` (where
    the device's time went, ``qwenjax.benchmarking.summarize_trace``; None when nothing ran on
    it) and, with ``memory``, ``memory_profile``: what the device holds now, by allocation
    (pprof)."""
    import jax

    from qwenjax.benchmarking import summarize_trace

    jax.profiler.stop_trace()
    traces = sorted(folder.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    answer = {"status": "stopped", "directory": str(folder),
              "trace": str(traces[-1]) if traces else None, "summary": None}
    if memory:
        path = folder / "device_memory.prof"
        jax.profiler.save_device_memory_profile(str(path))
        answer["memory_profile"] = str(path)
    if traces:
        try:
            answer["summary"] = summarize_trace(traces[-1], top=10)
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # nothing ran on the device meanwhile
    return answer
