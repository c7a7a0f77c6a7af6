"""Serve a Qwen2 GGUF file as it is: ``qwenjax serve model.gguf``, ``LLM("model.gguf")``.

The config, tokenizer and generation config are rebuilt from the GGUF's metadata into a small
directory in the cache (``<cache>/gguf/<key>/``, keyed by the files' paths, sizes and times),
so everything that reads an HF directory reads it; ``gguf.json`` in it names the GGUF files the
weights come from. The weights are never written out: each tensor is dequantized (the
``gguf`` package's numpy code) when the loader first asks for it and sharded onto the devices
in the model's dtype, so a Q4_K_M file serves at bf16 quality and size (``--quantization
int8/int4/fp8`` quantizes it again on load). Dequantizing a Q4_K_M mix runs at ~200 M
weights/s on 2 cores (more with more cores: blocks of rows go to a thread pool): 3 s for the
0.5B, about 40 s for a 7B; ``qwenjax convert FILE.gguf DIR`` writes a float32 HF directory
once instead.

A model split by llama.cpp's ``gguf-split`` (``name-00001-of-00003.gguf``) loads from any of
its files.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import tempfile

import gguf
import numpy as np

from qwenjax import gguf_convert
from qwenjax.cache import cache_dir
from qwenjax.gguf_file import GgufTensor, PLAIN_TYPES, read_gguf
from qwenjax.weights import Checkpoint

SIDECAR_FILE = "gguf.json"
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def gguf_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The files of the model ``path`` belongs to: itself, or every part of a split model."""
    path = pathlib.Path(path).absolute()
    match = _SPLIT_RE.match(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    if count < 1:
        raise ValueError(f"{path}: a split GGUF name must count at least one part")
    files = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path.name} is part 1..{count} of a split GGUF, but "
                                f"{', '.join(missing)} is missing beside it")
    return files


def prepare(path: str | os.PathLike, root: pathlib.Path | None = None) -> pathlib.Path:
    """The cache directory holding ``path``'s config, tokenizer and ``gguf.json``; built from
    its metadata the first time (and again when a file's size or time changes)."""
    files = gguf_files(path)
    identity = {"files": [str(f) for f in files],
                "sizes": [f.stat().st_size for f in files],
                "mtimes_ns": [f.stat().st_mtime_ns for f in files],
                "format": gguf_convert.FORMAT_VERSION}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    # <cache>/gguf/<key>/<model>: the last part names the model (ModelConfig.name).
    directory = (root or cache_dir()) / "gguf" / key / _SPLIT_RE.sub(r"\g<stem>", files[0].name).removesuffix(".gguf")
    if _read_json(directory / SIDECAR_FILE) == identity:
        return directory
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}.tmp-"))
    try:
        os.chmod(work, 0o755)
        first = read_gguf(files[0])
        parts = first.metadata.get("split.count", 1)
        if parts != len(files):
            raise ValueError(f"{files[0]}: split.count says {parts} parts, the file name {len(files)}")
        names = {t.name for f in files for t in read_gguf(f).tensors}
        gguf_convert.write_metadata(first.metadata, work, tensor_names=names)
        # Written last: its presence marks a finished directory.
        (work / SIDECAR_FILE).write_text(json.dumps(identity, indent=2) + "\n")
        try:
            os.replace(work, directory)
        except OSError:
            # Another process finished first (os.replace cannot overwrite a non-empty
            # directory), or a stale build is in the way.
            if _read_json(directory / SIDECAR_FILE) != identity:
                stale = pathlib.Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}.stale-"))
                os.replace(directory, stale / "old")
                os.replace(work, directory)
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return directory


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def sidecar_of(directory: str | os.PathLike) -> dict | None:
    """``gguf.json`` of a directory ``prepare`` built; None for any other directory."""
    return _read_json(pathlib.Path(directory) / SIDECAR_FILE)


class GgufCheckpoint(Checkpoint):
    """``Checkpoint``'s reads over GGUF tensors under their HF names.

    A quantized tensor is dequantized whole to float32 on its first read and kept among the
    last few read (the fused QKV reads q, k and v head by head, for every device), so each
    tensor is dequantized once per load."""

    def __init__(self, directory: str | os.PathLike, keep: int = 4):
        self.directory = pathlib.Path(directory)
        self.quantization = None
        sidecar = sidecar_of(directory)
        if sidecar is None:
            raise FileNotFoundError(f"{directory} has no {SIDECAR_FILE}")
        self._gguf: dict[str, GgufTensor] = {}
        for f in sidecar["files"]:
            for tensor in read_gguf(f).tensors:
                name = gguf_convert.hf_tensor_name(tensor.name)
                if name in self._gguf:
                    raise ValueError(f"{f}: tensor {tensor.name} appears twice in the GGUF files")
                self._gguf[name] = tensor
        self._tensors = {name: (None, t.kind.name, t.shape, 0) for name, t in self._gguf.items()}
        self._kept: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._keep = keep
        self._pool = concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))

    def _raw(self, name: str) -> np.ndarray:
        self._tensor_info(name)  # KeyError naming the tensor
        tensor = self._gguf[name]
        if tensor.kind in PLAIN_TYPES:
            return tensor.data
        if name in self._kept:
            self._kept.move_to_end(name)
            return self._kept[name]
        values = np.empty(tensor.shape, np.float32)
        rows = max(1, (8 << 20) // (4 * math.prod(tensor.shape[1:])))  # 8 MB of floats a block

        def dequantize(start: int) -> None:
            values[start: start + rows] = gguf.quants.dequantize(tensor.data[start: start + rows], tensor.kind)

        # numpy lets go of the GIL in dequantize's array work: 1.2× on 2 cores, more on a GPU host.
        list(self._pool.map(dequantize, range(0, tensor.shape[0], rows)))
        self._kept[name] = values
        while len(self._kept) > self._keep:
            self._kept.popitem(last=False)
        return values

    def close(self) -> None:
        self._kept.clear()
        self._gguf.clear()
        self._pool.shutdown()
