"""Which requests run this step and how many tokens each. Pure Python: no JAX here.

Every running request has ``num_pending`` tokens whose K/V are not yet computed:
the rest of its prompt (prefill, done in chunks) or its last sampled token
(decode, 1). Each step the scheduler walks running requests oldest first, then
waiting ones in arrival order (FCFS), granting each up to ``prefill_chunk``
tokens within ``max_num_batched_tokens``. A request granted exactly one token
goes to the decode part of the step, others to the prefill part. When the page
pool runs dry, the newest running request is preempted: its pages are freed and
it waits again at the head of the queue, to be recomputed later. With the
"priority" policy (vLLM's), both queues are kept in (priority, arrival) order
instead: lower ``Request.priority`` values are admitted and scheduled first, and
the preempted request is the newest of the lowest priority.

With a ``PrefixCache``, a request being admitted first takes the longest run of
its full pages that is already cached (sharing those pages) and is granted
tokens only from there; before each step is scheduled (and when a request
finishes), the pages a request has filled since are added to the cache. Freed
pages keep their contents until the pool needs them, so a preempted request
usually finds its own pages again. The sequences of a parallel-sampling request
(``n`` > 1) wait in the queue while their first sequence computes the prompt's
full pages, then find them cached: the prompt is prefilled once, not n times
(SGLang does the same).

Async scheduling: the engine schedules step N+1 while step N runs, before N's
sampled tokens are back. A request's token in flight counts in its length
(``Request.num_tokens``), so it is scheduled as a decode row whose input the
device reads from N's outputs; a request whose in-flight tokens reach its
``max_tokens`` gets no row; a request is admitted only once nothing of it is in
flight; pages are indexed in the prefix cache only once their tokens are known.

Speculative decoding (``num_speculative_tokens`` > 0): a decoding request that
speculates gets n-gram drafts (its ``speculative.NgramIndex``) and becomes a prefill
chunk of its last token and the drafts, while a prefill row, budget and free pages
allow; its ``num_computed`` then counts the drafts only once they are accepted. With a
draft model (``drafter``), such a chunk reserves room for k drafts as it is scheduled,
and the drafter proposes them for all those chunks at once when the rest is scheduled.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Sequence

from qwenjax.engine.prefix_cache import PrefixCache
from qwenjax.engine.request import Request, RequestStatus
from qwenjax.engine.speculative import NgramIndex
from qwenjax.kv_cache import PageAllocator


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64               # running requests (decode rows) at most
    max_num_batched_tokens: int = 2048   # tokens in one step at most
    prefill_chunk: int = 512             # tokens of one request in one step at most
    max_prefill_seqs: int = 4            # prefill rows in one step at most
    page_size: int = 16
    max_model_len: int = 4096
    # Speculative decoding with n-gram drafts (qwenjax.engine.speculative); 0: off.
    num_speculative_tokens: int = 0
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    spec_disable_by_batch_size: int = 0  # no drafts while more requests run (0: always draft)
    # "fcfs": arrival order; "priority": lower Request.priority first, then arrival (vLLM's).
    policy: str = "fcfs"
    # The sizes a step's parts are padded to, one compiled program per pair (as vLLM's CUDA
    # graph capture sizes): decode rows, and packed prefill tokens. Empty: powers of two (from
    # 16 tokens). The largest a step can hold is always one of them (ModelRunner adds it).
    decode_buckets: tuple[int, ...] = ()
    prefill_buckets: tuple[int, ...] = ()

    def __post_init__(self):
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.policy!r}")
        for name in ("num_speculative_tokens", "spec_disable_by_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int ≥ 0, got {value!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk", "max_prefill_seqs",
                     "page_size", "max_model_len", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.prefill_chunk > self.max_num_batched_tokens:
            raise ValueError(f"prefill_chunk ({self.prefill_chunk}) cannot exceed max_num_batched_tokens "
                             f"({self.max_num_batched_tokens})")
        for name, limit, what in (("decode_buckets", self.max_num_seqs, "max_num_seqs"),
                                  ("prefill_buckets", self.max_prefill_tokens,
                                   "the prefill tokens a step holds (min(max_num_batched_tokens, "
                                   "max_prefill_seqs × prefill_chunk))")):
            sizes = getattr(self, name)
            if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
                raise ValueError(f"{name} must be a list of sizes, got {sizes!r}")
            for size in sizes:
                if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= limit:
                    raise ValueError(f"{name}: each size must be an int from 1 to {what} = {limit}, "
                                     f"got {size!r}")
            object.__setattr__(self, name, tuple(sorted(set(sizes))))  # (a JSON list, from a leader)

    @property
    def max_prefill_tokens(self) -> int:
        """Packed prefill tokens one step holds at most."""
        return min(self.max_num_batched_tokens, self.max_prefill_seqs * self.prefill_chunk)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)


@dataclasses.dataclass
class ScheduledChunk:
    request: Request
    start: int       # first token of the chunk (== request.num_computed when scheduled)
    num_tokens: int  # tokens computed, the draft included
    # Speculative decoding: drafted tokens after the request's last one, checked this step.
    draft: tuple[int, ...] = ()

    @property
    def num_real(self) -> int:
        """The chunk's tokens of the sequence itself (not drafted)."""
        return self.num_tokens - len(self.draft)

    @property
    def completes(self) -> bool:
        """After this chunk every known token is computed, so the step samples a new one."""
        return self.start + self.num_real == self.request.num_tokens

    def token_ids(self) -> list[int]:
        return self.request.tokens(self.start, self.start + self.num_real) + list(self.draft)


@dataclasses.dataclass
class SchedulerOutput:
    decode: list[ScheduledChunk]
    prefill: list[ScheduledChunk]
    preempted: list[Request]

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decode + self.prefill

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


# A draft model's proposer (qwenjax.engine.draft_model.DraftModel.propose): up to k draft
# tokens for each (request, k), in one batched call.
Drafter = Callable[[Sequence[tuple[Request, int]]], list[list[int]]]


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator,
                 prefix_cache: PrefixCache | None = None, drafter: Drafter | None = None):
        self.config = config
        self.allocator = allocator
        self.prefix_cache = prefix_cache
        self.drafter = drafter  # None: n-gram drafts
        self.host_cache = None  # a host-memory tier under the prefix cache (use_host_cache)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # requests sent back to the queue, losing their K/V
        # Engine.pause: while ``paused`` nothing is scheduled; while ``holding`` (a pause that
        # waits for the requests before it) requests added go to ``held``, out of the queue.
        self.paused = False
        self.holding = False
        self.held: list[Request] = []

    def use_host_cache(self, store) -> None:
        """Keep the pages the prefix cache evicts in ``store`` (a host_cache.HostKVStore) and
        restore them at admission."""
        if self.prefix_cache is None:
            raise ValueError("a host KV tier needs prefix caching")
        self.host_cache = store
        self.prefix_cache.on_offload = store.offload

    # ---- admission and removal ------------------------------------------------------------
    def add(self, request: Request) -> None:
        if self.holding:
            self.held.append(request)
        else:
            self._put(self.waiting, request)

    def release_held(self) -> None:
        """Stop holding: the requests held go into the queue, in the order they came."""
        held, self.held, self.holding = self.held, [], False
        for request in held:
            self._put(self.waiting, request)

    def _put(self, queue, request: Request, front: bool = False) -> None:
        """Into ``queue`` (waiting or running): at its end, or its front (a preempted request,
        first come first served); with the priority policy, in (priority, arrival) order."""
        if self.config.policy != "priority":
            if front:
                queue.appendleft(request)
            else:
                queue.append(request)
            return
        rank = (request.priority, request.arrival_time)
        for i, other in enumerate(queue):
            if rank < (other.priority, other.arrival_time):
                queue.insert(i, request)
                return
        queue.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.held)

    @property
    def schedulable(self) -> bool:
        """Whether ``schedule()`` may find work: requests queued or running, and not paused."""
        return not self.paused and bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """Free the request's pages and drop it, whether running or still waiting."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            (self.held if request in self.held else self.waiting).remove(request)
        if reason == "error" and self.prefix_cache is not None:
            self.prefix_cache.forget_pages(request.pages)  # what it wrote may be bad
        else:
            self._cache_full_pages(request)  # its last tokens may have come back just now
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _release(self, request: Request) -> None:
        # Last page first: the LRU then evicts the tail of a prefix before its head.
        self.allocator.free(reversed(request.pages))
        request.pages = []
        request.num_computed = 0
        request.cache_entries = []
        request.cache_broken = False
        request.draft_state = None  # the draft cache's pages went with the others

    def reset_prefix_cache(self) -> None:
        """The K/V pools were rebuilt: no cached page holds what it did."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        if self.host_cache is not None:
            self.host_cache.clear()

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._put(self.waiting, request, front=True)

    def preempt_all(self) -> None:
        """Send every running request back to the queue (its K/V are lost, e.g. after a failed step)."""
        for request in reversed(list(self.running)):
            self._preempt(request)

    # ---- one step ---------------------------------------------------------------------------
    def _grant(self, pending: int, budget: int) -> int:
        """Tokens a request with ``pending`` uncomputed tokens gets this step."""
        return min(pending, budget, self.config.prefill_chunk)

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        out = SchedulerOutput(decode=[], prefill=[], preempted=[])
        if self.paused:
            return out
        budget = cfg.max_num_batched_tokens
        reserved: list[tuple[ScheduledChunk, int]] = []  # (chunk, k) awaiting the draft model

        for request in self.running:  # pages filled, with their tokens back, since the last step
            self._cache_full_pages(request)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_inflight and (request.num_output_tokens >= request.params.max_tokens
                                         or request.needs_known_outputs):
                # Its last token is in flight and it finishes when that comes back, or its
                # sampling needs that token on the host (a grammar, bad words; the engine reads
                # such steps back before scheduling, so this is a safety net): it waits for it.
                i += 1
                continue
            n = self._grant(request.num_pending, budget)
            if n > 1 and len(out.prefill) >= cfg.max_prefill_seqs:
                i += 1  # no prefill row left this step; it continues next step
                continue
            draft, room = (), 0
            if n == 1 and len(out.prefill) < cfg.max_prefill_seqs:
                room = self._draft_room(request, budget)
                if room and self.drafter is None:
                    draft, room = self._ngram_draft(request, room), 0
            if (draft or room) and (cfg.pages_for(request.num_computed + 1 + len(draft) + room)
                                    - len(request.pages) > self.allocator.num_free):
                draft, room = (), 0  # a draft never preempts anyone
            n += len(draft) + room
            need = cfg.pages_for(request.num_computed + n) - len(request.pages)
            while need > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # it was the newest, so nothing after it is left to schedule
            request.pages += self.allocator.alloc(need)
            chunk = ScheduledChunk(request, request.num_computed, n, draft)
            (out.decode if n == 1 else out.prefill).append(chunk)
            if room:
                reserved.append((chunk, room))
            budget -= n
            i += 1
        if reserved:
            self._model_drafts(out, reserved)

        # New (or preempted) requests only when nothing had to be preempted this step.
        i = 0
        while (i < len(self.waiting) and budget > 0 and not out.preempted
               and len(self.running) < cfg.max_num_seqs):
            request = self.waiting[i]
            if request.num_inflight:
                break  # preempted with a token in flight: admitted once it is back
            if self._waits_for_leader(request):
                i += 1  # sequence 0 computes its prompt's pages (a step or few); others go first
                continue
            hits = self._cached_prefix(request)
            restored = self._host_prefix(request, hits)
            cached = (len(hits) + len(restored)) * cfg.page_size
            n = self._grant(request.num_tokens - cached, budget)
            if n > 1 and len(out.prefill) >= cfg.max_prefill_seqs:
                break
            need = cfg.pages_for(cached + n) - len(hits)
            # Holding a cached page nobody holds takes it out of the free pool too.
            if need + sum(self.allocator.is_free(e.page) for e in hits) > self.allocator.num_free:
                break
            del self.waiting[i]
            request.status = RequestStatus.RUNNING
            for entry in hits:
                self.allocator.reuse(entry.page)
            request.pages = [e.page for e in hits] + self.allocator.alloc(need)
            request.cache_entries = hits
            if restored:
                self._restore(request, len(hits), restored)
            request.num_computed = cached
            if request.num_cached_tokens is None:  # its first admission
                request.num_cached_tokens = cached
                request.first_scheduled_time = time.monotonic()
            if self.prefix_cache is not None:
                self.prefix_cache.stats.queries += request.num_tokens
                self.prefix_cache.stats.hits += cached
            self._put(self.running, request)  # priority: in rank order, the last preempted first
            chunk = ScheduledChunk(request, cached, n)
            (out.decode if n == 1 else out.prefill).append(chunk)
            budget -= n
        return out

    @property
    def drafting(self) -> bool:
        """Speculative decoding is on and not paused by the number of running requests. Drafts
        come from a request's latest tokens, so meanwhile the engine reads each step back
        before scheduling the next; while paused, steps overlap again (async scheduling)."""
        cfg = self.config
        return cfg.num_speculative_tokens > 0 and not 0 < cfg.spec_disable_by_batch_size < len(self.running)

    def _draft_room(self, request: Request, budget: int) -> int:
        """Drafts a decoding request that speculates may check this step: as many as the
        budget, its max_tokens and max_model_len leave room for (the step yields up to one
        more token); 0: none."""
        cfg = self.config
        if not request.speculate or request.num_inflight or not self.drafting:
            return 0
        return max(0, min(cfg.num_speculative_tokens, budget - 1, cfg.prefill_chunk - 1,
                          request.params.max_tokens - request.num_output_tokens - 1,
                          cfg.max_model_len - request.num_tokens))

    @staticmethod
    def _checkable(request: Request, draft: Sequence[int]) -> tuple[int, ...]:
        if draft and request.matcher is not None:  # only what the grammar can take is checked
            draft = draft[: request.matcher.accepted_prefix(list(draft))]
        return tuple(draft)

    def _ngram_draft(self, request: Request, k: int) -> tuple[int, ...]:
        return self._checkable(request, self._ngrams(request, request.num_tokens).propose(k))

    def _model_drafts(self, out: SchedulerOutput, reserved: list[tuple[ScheduledChunk, int]]) -> None:
        """The draft model's tokens for the chunks that reserved room for them (their pages
        are allocated); a chunk left without drafts is a decode row again."""
        proposals = self.drafter([(chunk.request, k) for chunk, k in reserved])
        for (chunk, k), proposal in zip(reserved, proposals):
            chunk.draft = self._checkable(chunk.request, proposal[:k])
            chunk.num_tokens = 1 + len(chunk.draft)
            if not chunk.draft:
                out.prefill.remove(chunk)
                out.decode.append(chunk)

    def _ngrams(self, request: Request, upto: int) -> NgramIndex:
        """The request's n-gram index, holding its first ``upto`` tokens (all known)."""
        if request.ngrams is None:
            cfg = self.config
            request.ngrams = NgramIndex(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
        index = request.ngrams  # its tokens only grow: outputs are never taken back
        if upto > len(index.tokens):
            index.tokens += request.tokens(len(index.tokens), upto)
        return index

    def _waits_for_leader(self, request: Request) -> bool:
        """A parallel-sampling sequence waits while its first sequence (running) has not yet
        computed the prompt's full pages, which it would otherwise compute again."""
        leader = request.leader
        if leader is None or self.prefix_cache is None or leader.status is not RequestStatus.RUNNING:
            return False
        ps = self.config.page_size
        return leader.num_computed < (len(request.prompt_ids) - 1) // ps * ps

    def _findable_pages(self, request: Request) -> int:
        """Leading full pages a request may find cached: at least one token is left to compute,
        since the step that computes the last one also yields the next token."""
        max_pages = (request.num_tokens - 1) // self.config.page_size
        if request.prompt_logprobs is not None:
            # Positions whose prompt logprobs are still to come must be computed, not found.
            max_pages = min(max_pages, (len(request.prompt_logprobs) - 1) // self.config.page_size)
        if request.pool is not None:  # so must the positions a pooling request still pools
            max_pages = min(max_pages, request.pool.cacheable // self.config.page_size)
        return max_pages

    def _cached_prefix(self, request: Request) -> list:
        """Cache entries of the request's leading full pages (``_findable_pages`` at most)."""
        if self.prefix_cache is None:
            return []
        return self.prefix_cache.match(request.tokens(0, request.num_tokens),
                                       self._findable_pages(request), request.cache_salt)

    def _host_prefix(self, request: Request, hits: list) -> list:
        """The host tier's pages of the request's full pages after its device ``hits``."""
        if self.host_cache is None:
            return []
        ps, max_pages = self.config.page_size, self._findable_pages(request)
        if max_pages <= len(hits):
            return []
        tokens = request.tokens(0, max_pages * ps)
        digests = self.prefix_cache.digests(tokens, hits[-1] if hits else None, len(hits),
                                            max_pages - len(hits), request.cache_salt)
        return self.host_cache.match(digests)

    def _restore(self, request: Request, first: int, payloads: list) -> None:
        """Copy the host tier's ``payloads`` into the request's pages from ``first`` on, and
        index them as the device's own."""
        ps = self.config.page_size
        pages = request.pages[first: first + len(payloads)]
        self.host_cache.restore(pages, payloads)
        entries = request.cache_entries
        for i, page in enumerate(pages, start=first):
            entry = self.prefix_cache.insert(entries[-1] if entries else None,
                                             request.tokens(i * ps, (i + 1) * ps), page,
                                             request.cache_salt)
            if entry is None:
                request.cache_broken = True
                break
            entries.append(entry)

    def step_dispatched(self, out: SchedulerOutput) -> None:
        """The step is on its way: its tokens have K/V in the cache for every later step (the
        device runs steps in order)."""
        for chunk in out.prefill:  # drafting later: index a long prompt as its chunks go by
            if chunk.request.speculate and not chunk.draft:
                self._ngrams(chunk.request, chunk.start + chunk.num_real).update()
        for chunk in out.chunks:
            if chunk.request.status is RequestStatus.RUNNING:
                # A draft's K/V count once its tokens are accepted (Engine._collect).
                chunk.request.num_computed = chunk.start + chunk.num_real

    def _cache_full_pages(self, request: Request) -> None:
        """Index the pages the request has filled, and whose tokens are known, since it was
        last here: at the start of each schedule() (before anything is admitted or preempted)
        and when it finishes."""
        cache = self.prefix_cache
        if cache is None or request.cache_broken:
            return
        ps, entries = self.config.page_size, request.cache_entries
        while len(entries) < min(request.num_computed, request.num_known) // ps:
            i = len(entries)
            entry = cache.insert(entries[-1] if entries else None,
                                 request.tokens(i * ps, (i + 1) * ps), request.pages[i],
                                 request.cache_salt)
            if entry is None:  # its prefix left the cache: nothing after it can be found
                request.cache_broken = True
                return
            entries.append(entry)

    def check(self) -> None:
        """Allocator invariants with the pages each request holds (tests, debugging)."""
        owners = {id(r): r.pages for r in self.running}
        for r in (*self.waiting, *self.held):
            assert not r.pages, f"waiting request {r.request_id} holds pages"
            assert not r.cache_entries, f"waiting request {r.request_id} holds cache entries"
        self.allocator.check(owners)
        if self.prefix_cache is not None:
            self.prefix_cache.check()
