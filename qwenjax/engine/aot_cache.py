"""Compiled step programs kept on disk, so a warm start neither traces nor lowers them.

JAX's persistent compilation cache skips XLA's compile, but its key is a hash of the
lowered program, so every start still traces and lowers each shape bucket (~1.5 s per
shape for the 0.5B on CPU: most of a warm start). This cache keys a serialized
executable on what determines it without tracing anything: the program's name, the
abstract inputs (shapes, dtypes, shardings), the devices, the jax/jaxlib versions and
the source of qwenjax and pallas_kernels. Any change to those misses; a file that fails
to load is ignored and overwritten.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path

import jax

log = logging.getLogger(__name__)

FORMAT = 1


@functools.cache
def source_fingerprint() -> str:
    """sha256 over the Python sources the compiled programs come from."""
    import pallas_kernels
    import qwenjax

    digest = hashlib.sha256()
    for package in (qwenjax, pallas_kernels):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _describe(tree) -> str:
    leaves, treedef = jax.tree.flatten(tree)
    parts = [str(treedef)]
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        parts.append(f"{leaf.shape}:{leaf.dtype}:{sharding}")
    return "\n".join(parts)


class ExecutableCache:
    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def key(self, name: str, abstract_args, static: str = "") -> str:
        import jaxlib

        devices = jax.devices()
        material = "\n".join([
            f"format {FORMAT}", name, static, jax.__version__, jaxlib.__version__,
            jax.default_backend(), ",".join(f"{d.id}:{d.device_kind}" for d in devices),
            f"processes {jax.process_count()}", os.environ.get("XLA_FLAGS", ""),
            f"precision {jax.config.jax_default_matmul_precision}", f"x64 {jax.config.jax_enable_x64}",
            source_fingerprint(), _describe(abstract_args)])
        return hashlib.sha256(material.encode()).hexdigest()

    def load(self, key: str):
        """The compiled executable stored under ``key``, or None."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self.directory / f"{key}.exe"
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            compiled = deserialize_and_load(payload, in_tree, out_tree)
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception as error:  # noqa: BLE001 - a bad entry is a miss, never a failure
            log.warning("ignoring unreadable compiled program %s: %s", path.name, error)
            self.misses += 1
            return None
        self.hits += 1
        return compiled

    def store(self, key: str, compiled) -> bool:
        """Write ``compiled`` under ``key`` (atomically); False if this backend cannot
        serialize it."""
        from jax.experimental.serialize_executable import serialize

        try:
            payload = pickle.dumps(serialize(compiled))
        except Exception as error:  # noqa: BLE001 - some backends/programs do not serialize
            log.info("compiled program not cached on disk: %s", error)
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp, self.directory / f"{key}.exe")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True
