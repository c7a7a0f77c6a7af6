"""Prefix caching: find full KV pages that an earlier request already computed.

A full page of ``page_size`` tokens is identified by its tokens *and everything
before them*: its K/V depend on the whole prefix. Each cached page is an
``Entry`` whose key is a hash chain, ``hash(parent's key, this page's tokens)``,
rooted at the engine's identity (model, dtype, mesh). The hash only picks the
bucket to look in; a hit is confirmed by comparing the tokens and that the
parent is the very entry matched one page earlier, so a hash collision can
never hand a request pages of other tokens.

A request with a ``cache_salt`` (vLLM's, for tenants who must not learn from
cache timing what others sent) chains its pages below a root of that salt: it
shares pages only with requests of the same salt, and none with unsalted ones.

The pages themselves stay with the ``PageAllocator``: a request that hits a
cached page shares it (reference count); when the last holder frees it, the
page keeps its contents and waits in the allocator's LRU of evictable pages
until the pool needs it, and only then does its entry leave the index (with the
entries chained below it, which nothing can reach any more).

With a host tier (``on_offload``, qwenjax/engine/host_cache.py), an entry that leaves
the index that way is handed over first, with those below it, for their pages to be
copied to host memory. Off the device the prefixes are named by ``digest``: a
cryptographic hash chain over the same tokens (and salt and identity), safe to look
up without the parent entries a device hit is confirmed by.

Pure Python, no JAX.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Hashable, Sequence

import numpy as np

from qwenjax.kv_cache import PageAllocator

HashFn = Callable[[int, tuple[int, ...]], int]


def default_hash(parent: int, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


def chain_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The digest of a page of ``tokens`` after the prefix whose digest is ``parent``."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=20).digest()


@dataclasses.dataclass(eq=False)
class Entry:
    key: int
    parent: "Entry | None"
    tokens: tuple[int, ...]
    page: int
    children: list["Entry"] = dataclasses.field(default_factory=list)
    live: bool = True
    digest: bytes = b""  # the prefix's chain_digest (what a host tier names it by)


@dataclasses.dataclass
class PrefixCacheStats:
    queries: int = 0   # tokens looked up (each admission, preempted requests again)
    hits: int = 0      # of those, tokens found cached
    evictions: int = 0  # cached pages given new contents


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, identity: Hashable = "",
                 hash_fn: HashFn = default_hash):
        self.allocator = allocator
        self.page_size = page_size
        self.hash_fn = hash_fn
        self.root_key = hash_fn(0, (hash(identity),))
        self._buckets: dict[int, list[Entry]] = {}
        self._by_page: dict[int, Entry] = {}
        self._salts: dict[str, Entry] = {}  # salt → the root its requests' pages chain below
        self.stats = PrefixCacheStats()
        self.root_digest = hashlib.blake2b(repr(identity).encode(), digest_size=20).digest()
        # A host tier's intake: called with the (digest, page) of every entry that leaves the
        # index by eviction (and those chained below it), before the page gets new contents.
        self.on_offload: Callable[[list[tuple[bytes, int]]], None] | None = None
        allocator.on_evict = self._evicted

    def __len__(self) -> int:
        return len(self._by_page)

    # ---- lookup ---------------------------------------------------------------------------
    def _key(self, parent: Entry | None, tokens: tuple[int, ...]) -> int:
        return self.hash_fn(parent.key if parent else self.root_key, tokens)

    def _find(self, key: int, parent: Entry | None, tokens: tuple[int, ...]) -> Entry | None:
        for entry in self._buckets.get(key, ()):
            if entry.parent is parent and entry.tokens == tokens:
                return entry
        return None

    def _salt_root(self, salt: str | None, create: bool = False) -> Entry | None:
        """The root entry of ``salt`` (None: the unsalted root, which has no entry). A root holds
        no page; it lives while pages chain below it."""
        if salt is None:
            return None
        root = self._salts.get(salt)
        if root is None and create:
            root = self._salts[salt] = Entry(self.hash_fn(self.root_key, (hash(salt),)), None, (), -1,
                                             digest=self.salt_digest(salt))
        return root

    def salt_digest(self, salt: str | None) -> bytes:
        if salt is None:
            return self.root_digest
        return hashlib.blake2b(self.root_digest + salt.encode(), digest_size=20).digest()

    def digests(self, tokens: Sequence[int], after: "Entry | None", first: int, count: int,
                salt: str | None = None) -> list[bytes]:
        """The digests of ``tokens``' full pages first … first + count - 1, the page before
        ``first`` being ``after``'s (None: ``first`` is 0)."""
        digest = after.digest if after is not None else self.salt_digest(salt)
        ps, out = self.page_size, []
        for i in range(first, first + count):
            digest = chain_digest(digest, tokens[i * ps:(i + 1) * ps])
            out.append(digest)
        return out

    def match(self, tokens: Sequence[int], max_pages: int, salt: str | None = None) -> list[Entry]:
        """The cached entries of the longest run of ``tokens``' full pages, at most ``max_pages``
        (among those of requests with the same ``salt``). Does not take the pages: call
        ``allocator.reuse`` on them to hold them."""
        found: list[Entry] = []
        parent = self._salt_root(salt)
        if salt is not None and parent is None:
            return found
        ps = self.page_size
        for i in range(min(max_pages, len(tokens) // ps)):
            page_tokens = tuple(tokens[i * ps:(i + 1) * ps])
            entry = self._find(self._key(parent, page_tokens), parent, page_tokens)
            if entry is None:
                break
            found.append(entry)
            parent = entry
        return found

    # ---- insertion ------------------------------------------------------------------------
    def insert(self, parent: Entry | None, tokens: Sequence[int], page: int,
               salt: str | None = None) -> Entry | None:
        """Index ``page``, which holds the K/V of ``tokens`` after ``parent``'s prefix (None:
        the request's first page, indexed under its ``salt``).

        Returns the entry now standing for this prefix: an equal one already indexed (then
        ``page`` stays a private page of its request), or the new one. Returns None when
        ``parent`` has left the index: nothing after it can be found, so nothing is added.
        """
        if parent is not None and not parent.live:
            return None
        if parent is None and salt is not None:
            parent = self._salt_root(salt, create=True)
        tokens = tuple(tokens)
        key = self._key(parent, tokens)
        existing = self._find(key, parent, tokens)
        if existing is not None:
            return existing
        if page in self._by_page:  # the page already stands for another prefix: keep that
            return None
        digest = chain_digest(parent.digest if parent is not None else self.root_digest, tokens)
        entry = Entry(key, parent, tokens, page, digest=digest)
        self._buckets.setdefault(key, []).append(entry)
        self._by_page[page] = entry
        if parent is not None:
            parent.children.append(entry)
        self.allocator.mark_cached(page)
        return entry

    # ---- removal --------------------------------------------------------------------------
    def _evicted(self, page: int) -> None:
        """The allocator is reusing ``page`` for new contents."""
        entry = self._by_page.get(page)
        if entry is not None:
            self.stats.evictions += 1
            if self.on_offload is not None:
                leaving, stack = [], [entry]
                while stack:
                    e = stack.pop()
                    if e.live:
                        leaving.append((e.digest, e.page))
                        stack.extend(e.children)
                self.on_offload(leaving)
            self._remove(entry)

    def _remove(self, entry: Entry) -> None:
        stack = [entry]
        while stack:
            e = stack.pop()
            if not e.live:
                continue
            e.live = False
            bucket = self._buckets[e.key]
            bucket.remove(e)
            if not bucket:
                del self._buckets[e.key]
            del self._by_page[e.page]
            self.allocator.unmark_cached(e.page)
            stack.extend(e.children)
            e.children = []
        parent = entry.parent
        if parent is not None and parent.live:
            parent.children.remove(entry)
            if parent.page == -1 and not parent.children:  # a salt's root with nothing below
                self._salts = {k: v for k, v in self._salts.items() if v is not parent}

    def forget_pages(self, pages: Sequence[int]) -> None:
        """Drop the entries of these pages and everything chained below them (e.g. their
        contents are suspect after the request that wrote them failed)."""
        for page in pages:
            entry = self._by_page.get(page)
            if entry is not None:
                self._remove(entry)

    def clear(self) -> None:
        """Forget everything (the pools were rebuilt, so no page holds what it did)."""
        for entry in list(self._by_page.values()):
            if entry.live:
                self._remove(entry)
        self._salts.clear()

    def check(self) -> None:
        for page, entry in self._by_page.items():
            assert entry.live and entry.page == page, f"page {page}: bad entry"
            assert entry in self._buckets[entry.key], f"page {page}: entry missing from its bucket"
            assert self.allocator.is_cached(page), f"page {page}: indexed but not marked cached"
            assert entry.parent is None or entry.parent.live, f"page {page}: parent left the index"
        for salt, root in self._salts.items():
            assert root.children, f"salt {salt!r}: a root with no pages below it was kept"
        assert sum(map(len, self._buckets.values())) == len(self._by_page), "bucket/page mismatch"
