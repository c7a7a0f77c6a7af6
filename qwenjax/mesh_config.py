"""One box's mesh and hardware facts, read from ``configs/meshes/<name>.yaml``.

A mesh config says how a box's devices are split into the ``dp × tp × pp``
mesh and what the serving defaults are (dtype, context, KV fraction, page
size). Its ``hardware`` block carries the few numbers the planner's memory and
decode-time model needs; every YAML says in a comment where each one comes from.

Units: ``memory_gb`` is 1e9 bytes; ``hbm_read_tbps`` is TB/s and link
``bandwidth_gbps`` is GB/s — bytes, not bits (an InfiniBand "400 Gb/s" port is
50 GB/s here). This matches ``scripts/bench_decode.py --link-gbps``.

Validation errors name the file and the key (``configs/meshes/x.yaml: axes.tp
must be a positive int, got 0``) because a typo in a box config otherwise
surfaces as a wrong capacity far from its cause.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

MESH_DIR = Path(__file__).resolve().parent.parent / "configs" / "meshes"
MESH_DIR_ENV = "QWENJAX_MESH_DIR"
DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class Link:
    """A device's share of an interconnect."""

    bandwidth_gbps: float  # GB/s per direction, per device
    latency_us: float      # one small all-reduce (or hop) end to end, µs


@dataclasses.dataclass(frozen=True)
class Hardware:
    device: str                  # what the box holds, e.g. "NVIDIA H100 80GB HBM3 (SXM5)"
    memory_gb: float             # per device, 1e9 bytes
    hbm_read_tbps: float         # per device, TB/s
    intra_node: Link | None      # None only on single-device hosts
    inter_node: Link | None      # None only on single-host meshes

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    dp: int
    tp: int
    pp: int

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    name: str
    description: str
    hosts: int
    devices_per_host: int
    axes: MeshAxes
    dtype: str
    max_model_len: int
    kv_cache_fraction: float   # share of device memory for weights + workspace + KV cache
    page_size: int             # tokens per KV page
    hardware: Hardware
    source: str | None = None  # the file it came from

    @property
    def dp(self) -> int:
        return self.axes.dp

    @property
    def tp(self) -> int:
        return self.axes.tp

    @property
    def pp(self) -> int:
        return self.axes.pp

    @property
    def num_devices(self) -> int:
        return self.hosts * self.devices_per_host

    @property
    def tp_spans_hosts(self) -> bool:
        """A TP group larger than one host all-reduces over the inter-node link."""
        return self.tp > self.devices_per_host

    @property
    def collective_link(self) -> Link | None:
        return self.hardware.inter_node if self.tp_spans_hosts else self.hardware.intra_node

    def jax_mesh(self, devices=None):
        """The device mesh this config describes, over ``devices`` (default: all): ``(dp, tp)``,
        or ``(dp, pp, tp)`` with pipeline stages (devices in order, ``tp`` fastest, so a stage is
        a whole TP group and, on a multi-host box, stages follow hosts)."""
        from qwenjax.parallel import make_mesh

        return make_mesh(tp=self.tp, dp=self.dp, pp=self.pp, devices=devices)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "MeshConfig":
        path = Path(path)
        with open(path) as f:
            try:
                raw = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> "MeshConfig":
        return _Reader(source).mesh(raw)


# ---- validation -------------------------------------------------------------------------
_TOP_KEYS = ("name", "description", "hosts", "devices_per_host", "axes", "dtype",
             "max_model_len", "kv_cache_fraction", "page_size", "hardware")
_AXES_KEYS = ("dp", "tp", "pp")
_HARDWARE_KEYS = ("device", "memory_gb", "hbm_read_tbps", "intra_node", "inter_node")
_LINK_KEYS = ("bandwidth_gbps", "latency_us")


class _Reader:
    """Pulls typed values out of the parsed YAML, naming file and dotted key on failure."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, msg: str) -> None:
        raise ValueError(f"{self.source}: {msg}")

    def mapping(self, raw: Any, where: str, known: tuple[str, ...], required: tuple[str, ...]
                ) -> dict[str, Any]:
        label = where or "the file"
        if not isinstance(raw, dict):
            self.fail(f"{label} must be a mapping, got {type(raw).__name__}")
        prefix = f"{where}." if where else ""
        unknown = [k for k in raw if k not in known]
        if unknown:
            self.fail(f"unknown key(s) {', '.join(prefix + str(k) for k in unknown)} "
                      f"(known: {', '.join(prefix + k for k in known)})")
        missing = [k for k in required if k not in raw]
        if missing:
            self.fail(f"missing key(s) {', '.join(prefix + k for k in missing)}")
        return raw

    def pos_int(self, value: Any, key: str) -> int:
        # bool is an int subclass; `tp: true` is a typo, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(f"{key} must be a positive int, got {value!r}")
        return value

    def pos_number(self, value: Any, key: str, allow_zero: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or value < 0 or (value == 0 and not allow_zero):
            kind = "a non-negative number" if allow_zero else "a positive number"
            self.fail(f"{key} must be {kind}, got {value!r}")
        return float(value)

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{key} must be a non-empty string, got {value!r}")
        return value.strip()

    def link(self, raw: Any, key: str) -> Link:
        raw = self.mapping(raw, key, _LINK_KEYS, _LINK_KEYS)
        return Link(bandwidth_gbps=self.pos_number(raw["bandwidth_gbps"], f"{key}.bandwidth_gbps"),
                    latency_us=self.pos_number(raw["latency_us"], f"{key}.latency_us", allow_zero=True))

    def mesh(self, raw: Any) -> MeshConfig:
        raw = self.mapping(raw, "", _TOP_KEYS, _TOP_KEYS)
        name = self.text(raw["name"], "name")
        stem = Path(self.source).stem
        if self.source.endswith((".yaml", ".yml")) and name != stem:
            # load_mesh_config resolves names by file name; a different inner name would lie.
            self.fail(f"name is {name!r} but the file is {stem!r}; they must match")
        hosts = self.pos_int(raw["hosts"], "hosts")
        per_host = self.pos_int(raw["devices_per_host"], "devices_per_host")

        axes_raw = self.mapping(raw["axes"], "axes", _AXES_KEYS, _AXES_KEYS)
        axes = MeshAxes(*(self.pos_int(axes_raw[k], f"axes.{k}") for k in _AXES_KEYS))
        if axes.size != hosts * per_host:
            self.fail(f"axes dp×tp×pp = {axes.dp}×{axes.tp}×{axes.pp} = {axes.size} must equal "
                      f"hosts×devices_per_host = {hosts}×{per_host} = {hosts * per_host}")
        # A TP group must be a slice of one host or whole hosts, else one all-reduce
        # would mix link speeds in a way the planner does not model.
        if axes.tp <= per_host and per_host % axes.tp:
            self.fail(f"axes.tp = {axes.tp} must divide devices_per_host = {per_host}")
        if axes.tp > per_host and axes.tp % per_host:
            self.fail(f"axes.tp = {axes.tp} spans hosts, so it must be a multiple of "
                      f"devices_per_host = {per_host}")

        dtype = raw["dtype"]
        if dtype not in DTYPES:
            self.fail(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        fraction = raw["kv_cache_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            self.fail(f"kv_cache_fraction must be a number in (0, 1], got {fraction!r}")

        hw_raw = self.mapping(raw["hardware"], "hardware", _HARDWARE_KEYS,
                              ("device", "memory_gb", "hbm_read_tbps"))
        intra = hw_raw.get("intra_node")
        inter = hw_raw.get("inter_node")
        if per_host > 1 and intra is None:
            self.fail(f"hardware.intra_node is required with devices_per_host = {per_host}")
        if hosts > 1 and inter is None:
            self.fail(f"hardware.inter_node is required with hosts = {hosts}")
        hardware = Hardware(
            device=self.text(hw_raw["device"], "hardware.device"),
            memory_gb=self.pos_number(hw_raw["memory_gb"], "hardware.memory_gb"),
            hbm_read_tbps=self.pos_number(hw_raw["hbm_read_tbps"], "hardware.hbm_read_tbps"),
            intra_node=None if intra is None else self.link(intra, "hardware.intra_node"),
            inter_node=None if inter is None else self.link(inter, "hardware.inter_node"),
        )
        return MeshConfig(
            name=name,
            description=self.text(raw["description"], "description"),
            hosts=hosts,
            devices_per_host=per_host,
            axes=axes,
            dtype=dtype,
            max_model_len=self.pos_int(raw["max_model_len"], "max_model_len"),
            kv_cache_fraction=float(fraction),
            page_size=self.pos_int(raw["page_size"], "page_size"),
            hardware=hardware,
            source=None if self.source == "<dict>" else self.source,
        )


# ---- lookup -------------------------------------------------------------------------------
def mesh_dirs() -> list[Path]:
    """Where bare names are looked up: ``$QWENJAX_MESH_DIR`` (os.pathsep-separated) first,
    then the repository's ``configs/meshes``."""
    dirs = [Path(p) for p in os.environ.get(MESH_DIR_ENV, "").split(os.pathsep) if p]
    return dirs + [MESH_DIR]


def list_mesh_configs() -> list[str]:
    """Names loadable with ``load_mesh_config(name)``, sorted; an earlier directory shadows a later one."""
    names: set[str] = set()
    for d in mesh_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def load_mesh_config(name_or_path: str | os.PathLike) -> MeshConfig:
    """A mesh config from a YAML path, or from a bare name such as ``4xh100-80gb-tp4``."""
    text = str(name_or_path)
    path = Path(text)
    looks_like_path = path.suffix in (".yaml", ".yml") or os.sep in text or "/" in text
    if looks_like_path or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"mesh config {text!r}: no such file")
        return MeshConfig.from_yaml(path)
    for d in mesh_dirs():
        candidate = d / f"{text}.yaml"
        if candidate.is_file():
            return MeshConfig.from_yaml(candidate)
    searched = ", ".join(str(d) for d in mesh_dirs())
    raise FileNotFoundError(f"mesh config {text!r} not found in {searched}; "
                            f"known: {', '.join(list_mesh_configs()) or 'none'}")
