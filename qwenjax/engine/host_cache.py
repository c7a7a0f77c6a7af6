"""A host-memory tier under the prefix cache (vLLM's ``--kv-offloading-size``, SGLang's
hierarchical cache): KV pages the device pool evicts are copied to host memory, and a
request whose prefix is found there gets them copied back instead of recomputed.

- **Out.** When the allocator reuses a cached page, the prefix cache hands over its entry
  and those chained below it (``PrefixCache.on_offload``) before anything is written to the
  page: one gather program copies those pages out of every layer's pools, its result starts
  its way to the host, and the store keeps it under each page's digest. Copies still on
  their way are read into numpy on the next lookup (or when ``settle`` is called).
- **In.** At admission, after the pages found on the device, the scheduler asks for the
  digests of the request's next full pages (``match``); for the run found here it allocates
  pages, ``restore`` writes them with one scatter program (the pools donated, between two
  steps), and they enter the device index as if computed.
- **Bounded.** ``capacity`` pages, least recently used dropped first. A reset of the prefix
  cache (new weights, rebuilt pools) clears the store too.

Restored pages are bit-identical to the evicted ones, so outputs do not change; only the
prefill of the prefix is skipped.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np


@dataclasses.dataclass
class HostCacheStats:
    stored: int = 0     # pages copied to host memory
    restored: int = 0   # pages copied back to a device page (prefill skipped)
    dropped: int = 0    # pages dropped for room (least recently used)


@dataclasses.dataclass
class _OnItsWay:
    """A page whose copy to the host has started: row ``index`` of ``device``'s page axis."""

    device: Any
    index: int


class HostKVStore:
    """``read(pages)`` → a pytree of device arrays holding those pages (the page axis 1 of
    every leaf); ``write(pages, payload)`` writes such a pytree (numpy) into them."""

    def __init__(self, capacity: int, read: Callable[[list[int]], Any],
                 write: Callable[[list[int], Any], None]):
        if capacity < 1:
            raise ValueError(f"the host KV store needs room for a page at least, got {capacity}")
        self.capacity = capacity
        self._read, self._write = read, write
        # digest → one page's payload (a pytree of numpy arrays), or _OnItsWay.
        self._pages: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
        self._pending: list[tuple[Any, list[bytes]]] = []
        self.stats = HostCacheStats()

    def __len__(self) -> int:
        return len(self._pages)

    def offload(self, items: Sequence[tuple[bytes, int]]) -> None:
        """Copy these (digest, page) out now, before the pages get new contents."""
        items = [(d, p) for d, p in items if d not in self._pages]
        if not items:
            return
        device = self._read([p for _, p in items])
        import jax

        for leaf in jax.tree.leaves(device):
            leaf.copy_to_host_async()
        digests = [d for d, _ in items]
        self._pending.append((device, digests))
        for i, digest in enumerate(digests):
            self._pages[digest] = _OnItsWay(device, i)
        self.stats.stored += len(items)
        while len(self._pages) > self.capacity:
            self._pages.popitem(last=False)
            self.stats.dropped += 1

    def settle(self) -> None:
        """Read the copies still on their way into numpy (freeing their device buffers)."""
        import jax

        for device, digests in self._pending:
            host = jax.tree.map(np.asarray, device)
            for i, digest in enumerate(digests):
                if isinstance(self._pages.get(digest), _OnItsWay):
                    self._pages[digest] = jax.tree.map(lambda a: np.ascontiguousarray(a[:, i]), host)
        self._pending = []

    def match(self, digests: Sequence[bytes]) -> list[Any]:
        """The payloads of the longest leading run of ``digests`` held here."""
        self.settle()
        found = []
        for digest in digests:
            payload = self._pages.get(digest)
            if payload is None:
                break
            self._pages.move_to_end(digest)
            found.append(payload)
        return found

    def restore(self, pages: Sequence[int], payloads: Sequence[Any]) -> None:
        """Write ``payloads`` (from ``match``) into these device pages."""
        import jax

        if not pages:
            return
        stacked = jax.tree.map(lambda *leaves: np.stack(leaves, axis=1), *payloads)
        self._write(list(pages), stacked)
        self.stats.restored += len(pages)

    def clear(self) -> None:
        self._pages.clear()
        self._pending = []
