"""Paged KV cache: per-layer K and V page pools on device.

Pool layout ``[kv_heads, num_pages, page_size, head_dim]`` puts the KV-head axis
first so sharding it over ``tp`` keeps each device's attention local, and one
page of one head is a contiguous ``page_size × head_dim`` tile for the kernel.
With pipeline stages (a ``pp`` mesh axis) pool ``j`` is layer slot ``j`` of every
stage, ``[pp, kv_heads, num_pages, page_size, head_dim]`` sharded over ``pp``, so a
stage's KV lives only on its own devices (page ids are shared by all stages).

With ``kv_cache_dtype="fp8"`` each pool is ``QuantizedPages``: float8_e4m3fn values and one
float32 scale per token and KV head (``[kv_heads, num_pages, page_size]``), set when the
token is written: its largest |value| over head_dim / 448. A per-token scale needs no
calibration and no rescaling of tokens already in a page, and Qwen's keys (whose q/k biases
push some channels into the hundreds, beyond a fixed scale of 1) keep 3 mantissa bits
relative to their own magnitude. The scales add 4 bytes per head_dim bytes (3% at 128).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from qwenjax.parallel import DEFAULT_RULES, ShardingRules, mesh_pp, split_layers

POOL_AXES = ("kv_heads", "pages", "page_slot", "head_dim")
STAGED_POOL_AXES = ("stage",) + POOL_AXES
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype
FP8_DTYPE = jnp.float8_e4m3fn
_FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)


def check_kv_cache_dtype(name: str) -> str:
    # vLLM spells e4m3 out; it is the only fp8 format here (e5m2 keeps 2 mantissa bits).
    name = "fp8" if name == "fp8_e4m3" else name
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, fp8 (fp8_e4m3); got {name!r}")
    return name


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedPages:
    """One fp8 K or V pool: ``values * scales[..., None]`` are the cached vectors."""

    # uint8 holding float8_e4m3fn bits: XLA scatters fp8 by converting the whole pool to f16
    # and back (measured on CPU: 31 ms per layer and step for a 16 MB pool, 4000× the uint8
    # scatter), so the pool is stored as bytes and bitcast where it is read.
    values: jax.Array  # [kv_heads, num_pages, page_size, head_dim] uint8 (pp > 1: [pp, …])
    scales: jax.Array  # [kv_heads, num_pages, page_size] float32 (pp > 1: [pp, …])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape


def quantize_tokens(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[..., head_dim]`` → e4m3 values as uint8 bits and a float32 scale per vector (zero
    vectors: scale 1)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / _FP8_MAX, 1.0)
    values = jnp.clip(x / scale[..., None], -_FP8_MAX, _FP8_MAX).astype(FP8_DTYPE)
    return jax.lax.bitcast_convert_type(values, jnp.uint8), scale


def fp8_bits_to(values: jax.Array, dtype) -> jax.Array:
    """uint8 e4m3 bits → ``dtype``."""
    return jax.lax.bitcast_convert_type(values, FP8_DTYPE).astype(dtype)


def gather_pages(pages, block_tables: jax.Array, dtype=None) -> jax.Array:
    """``[kv_heads, num_pages, page_size, d]`` pool (or ``QuantizedPages``) → the pages of each
    sequence ``[kv_heads, batch, pages_per_seq * page_size, d]`` (dequantized into ``dtype``,
    default float32, for fp8 pools)."""
    if isinstance(pages, QuantizedPages):
        values = fp8_bits_to(_gather(pages.values, block_tables), dtype or jnp.float32)
        scales = _gather(pages.scales[..., None], block_tables).astype(values.dtype)
        return values * scales
    gathered = _gather(pages, block_tables)
    return gathered if dtype is None else gathered.astype(dtype)


def _gather(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    kv_heads, _, page_size, head_dim = pages.shape
    batch, pages_per_seq = block_tables.shape
    gathered = pages[:, block_tables]  # [kv_heads, batch, pages_per_seq, page_size, d]
    return gathered.reshape(kv_heads, batch, pages_per_seq * page_size, head_dim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    # Per layer [kv_heads, num_pages, page_size, head_dim] (or QuantizedPages); pp > 1: per slot [pp, …]
    k: list[jax.Array | QuantizedPages]
    v: list[jax.Array | QuantizedPages]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[-3]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[-2]

    @classmethod
    def create(cls, *, num_layers: int, kv_heads: int, head_dim: int, num_pages: int,
               page_size: int, dtype, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES,
               kv_cache_dtype: str = "auto") -> "KVCache":
        """Zeroed pools for ``num_layers`` model layers; on a mesh with a ``pp`` axis, one
        stage-stacked pool per layer slot (``Layout.layers_per_stage`` of them). ``dtype`` is
        the pools' dtype with ``kv_cache_dtype="auto"``; "fp8" makes ``QuantizedPages``."""
        pp = mesh_pp(mesh)
        shape = (kv_heads, num_pages, page_size, head_dim)
        axes = POOL_AXES
        if pp > 1:
            num_layers = split_layers(num_layers, pp)[0]
            shape, axes = (pp, *shape), STAGED_POOL_AXES
        sharding = rules.sharding(mesh, axes)
        if check_kv_cache_dtype(kv_cache_dtype) == "fp8":
            scale_sharding = rules.sharding(mesh, axes[:-1])
            zeros = jax.jit(lambda: QuantizedPages(jnp.zeros(shape, jnp.uint8),
                                                   jnp.ones(shape[:-1], jnp.float32)),
                            out_shardings=QuantizedPages(sharding, scale_sharding))
        else:
            zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(k=[zeros() for _ in range(num_layers)], v=[zeros() for _ in range(num_layers)])


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             positions: jax.Array, block_tables: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter a step's new keys/values ``[batch, chunk, kv_heads, head_dim]`` into their pages.

    Padding tokens (position < 0) are aimed one past the last page and dropped.
    Called inside the jitted step with the pools donated, so XLA updates them in
    place instead of copying the pool every step.
    """
    num_pages, page_size = k_pages.shape[1], k_pages.shape[2]
    safe_pos = jnp.maximum(positions, 0)
    page = jnp.take_along_axis(block_tables, safe_pos // page_size, axis=1)
    page = jnp.where(positions >= 0, page, num_pages).reshape(-1)
    slot = (safe_pos % page_size).reshape(-1)

    def scatter(pages, new):
        kv_heads, head_dim = new.shape[2], new.shape[3]
        new = new.reshape(-1, kv_heads, head_dim).swapaxes(0, 1)
        if isinstance(pages, QuantizedPages):
            values, scales = quantize_tokens(new)
            return QuantizedPages(pages.values.at[:, page, slot].set(values, mode="drop"),
                                  pages.scales.at[:, page, slot].set(scales, mode="drop"))
        return pages.at[:, page, slot].set(new.astype(pages.dtype), mode="drop")

    return scatter(k_pages, k), scatter(v_pages, v)


def page_bytes_per_device(*, num_layers: int, kv_heads_per_device: int, head_dim: int,
                          page_size: int, dtype, kv_cache_dtype: str = "auto") -> int:
    """Device memory one page costs across all layers' K and V pools."""
    return num_layers * 2 * kv_heads_per_device * page_size * kv_bytes_per_vector(
        head_dim, dtype, kv_cache_dtype)


def kv_bytes_per_vector(head_dim: int, dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes of one token's K (or V) for one KV head: fp8 values plus their float32 scale, or
    head_dim elements of ``dtype``."""
    if check_kv_cache_dtype(kv_cache_dtype) == "fp8":
        return head_dim + 4
    return head_dim * jnp.dtype(dtype).itemsize


def pages_for_memory(*, memory_fraction: float, page_bytes: int, devices: Iterable[jax.Device]) -> int:
    """How many pages fit in ``memory_fraction`` of each device's memory, after what is in use
    (call it once the weights are loaded). Like vLLM's ``gpu_memory_utilization``."""
    if not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"kv_cache_fraction must be in (0, 1], got {memory_fraction}")
    budgets = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            raise ValueError(f"{device.platform} device {device.id} reports no memory limit; "
                             "give the KV cache an explicit page count (num_pages)")
        budgets.append(stats["bytes_limit"] * memory_fraction - stats.get("bytes_in_use", 0))
    pages = int(min(budgets) // page_bytes)
    if pages < 1:
        raise ValueError(f"no device memory left for the KV cache at kv_cache_fraction={memory_fraction}: "
                         f"{min(budgets) / 2**30:.2f} GiB available, one page needs {page_bytes / 2**20:.2f} MiB")
    return pages


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    """Host-side owner of page ids: O(1) alloc/free with reference counts.

    A page is free exactly when its count is 0. Prefix sharing bumps a page's
    count (``share``/``reuse``) so a page several sequences read is returned to
    the pool only when the last of them frees it.

    A free page whose contents a prefix cache still indexes (``mark_cached``)
    waits in an LRU of evictable pages: ``alloc`` takes never-cached pages first,
    then the least recently freed cached ones, telling the cache through
    ``on_evict`` before the page gets new contents. ``reuse`` takes a cached page
    back, free or not.
    """

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be ≥ 1, got {num_pages}")
        self.num_pages = num_pages
        self._free = collections.OrderedDict.fromkeys(range(num_pages))
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._cached: set[int] = set()
        self._refs = [0] * num_pages
        self.on_evict: Callable[[int], None] | None = None

    @property
    def num_free(self) -> int:
        """Pages ``alloc`` can hand out (cached pages nobody holds included)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def can_alloc(self, n: int) -> bool:
        return n <= self.num_free

    def alloc(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfPages(f"asked for {n} pages, {self.num_free} of {self.num_pages} free")
        pages = []
        for _ in range(n):
            if self._free:
                page, _ = self._free.popitem(last=False)
            else:
                page, _ = self._evictable.popitem(last=False)
                self._cached.discard(page)
                if self.on_evict is not None:
                    self.on_evict(page)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def share(self, pages: Iterable[int]) -> None:
        for page in pages:
            if self._refs[page] == 0:
                raise ValueError(f"page {page} is free; only a page in use can be shared")
            self._refs[page] += 1

    def reuse(self, page: int) -> None:
        """Hold a cached page (a prefix-cache hit), taking it out of the LRU if nobody held it."""
        if page not in self._cached:
            raise ValueError(f"page {page} is not cached")
        if self._refs[page] == 0:
            del self._evictable[page]
        self._refs[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        for page in pages:
            if self._refs[page] == 0:
                raise ValueError(f"page {page} freed twice")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._cached:
                    self._evictable[page] = None  # most recently used end
                else:
                    self._free[page] = None

    # ---- prefix-cache marks -----------------------------------------------------------------
    def mark_cached(self, page: int) -> None:
        """A cache indexes this page's contents: keep them when it is freed, until evicted."""
        if self._refs[page] == 0:
            raise ValueError(f"page {page} is free; only a page in use can be cached")
        self._cached.add(page)

    def unmark_cached(self, page: int) -> None:
        """The cache dropped this page: a free one becomes a plain free page."""
        if page in self._cached:
            self._cached.discard(page)
            if page in self._evictable:
                del self._evictable[page]
                self._free[page] = None

    def is_cached(self, page: int) -> bool:
        return page in self._cached

    def is_free(self, page: int) -> bool:
        return self._refs[page] == 0

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def check(self, owners: Mapping[object, Iterable[int]] | None = None) -> None:
        """Raise AssertionError unless: free ⇔ count 0, a free page is in exactly one of the
        free list and the LRU, the LRU holds only cached pages, nothing is lost, and (given
        who holds which pages) each count equals its number of holders."""
        free, lru = set(self._free), set(self._evictable)
        assert not free & lru, f"pages {sorted(free & lru)[:5]} are both free and evictable"
        assert lru <= self._cached, "an evictable page is not cached"
        assert not free & self._cached, "a plain free page is marked cached"
        for page, count in enumerate(self._refs):
            assert count >= 0, f"page {page} has count {count}"
            assert (count == 0) == (page in free or page in lru), (
                f"page {page}: count {count}, free={page in free}, evictable={page in lru}")
        if owners is not None:
            held = collections.Counter(p for pages in owners.values() for p in pages)
            for page, count in enumerate(self._refs):
                assert held.get(page, 0) == count, f"page {page}: count {count}, held by {held.get(page, 0)}"
