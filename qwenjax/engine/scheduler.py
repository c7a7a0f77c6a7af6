"""Which requests run this step and how many tokens each. Pure Python: no JAX here.

Every running request has ``num_pending`` tokens whose K/V are not yet computed:
the rest of its prompt (prefill, done in chunks) or its last sampled token
(decode, 1). Each step the scheduler walks running requests oldest first, then
waiting ones in arrival order (FCFS), granting each up to ``prefill_chunk``
tokens within ``max_num_batched_tokens``. A request granted exactly one token
goes to the decode part of the step, others to the prefill part. When the page
pool runs dry, the newest running request is preempted: its pages are freed and
it waits again at the head of the queue, to be recomputed later.
"""
from __future__ import annotations

import collections
import dataclasses

from qwenjax.engine.request import Request, RequestStatus
from qwenjax.kv_cache import PageAllocator


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64               # running requests (decode rows) at most
    max_num_batched_tokens: int = 2048   # tokens in one step at most
    prefill_chunk: int = 512             # tokens of one request in one step at most
    max_prefill_seqs: int = 4            # prefill rows in one step at most
    page_size: int = 16
    max_model_len: int = 4096

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk", "max_prefill_seqs",
                     "page_size", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.prefill_chunk > self.max_num_batched_tokens:
            raise ValueError(f"prefill_chunk ({self.prefill_chunk}) cannot exceed max_num_batched_tokens "
                             f"({self.max_num_batched_tokens})")

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)


@dataclasses.dataclass
class ScheduledChunk:
    request: Request
    start: int       # first token of the chunk (== request.num_computed when scheduled)
    num_tokens: int

    @property
    def completes(self) -> bool:
        """After this chunk every known token is computed, so the step samples a new one."""
        return self.start + self.num_tokens == self.request.num_tokens


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


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []

    # ---- admission and removal ------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """Free the request's pages and drop it, whether running or still waiting."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _release(self, request: Request) -> None:
        self.allocator.free(request.pages)
        request.pages = []
        request.num_computed = 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def preempt_all(self) -> None:
        """Send every running request back to the queue (its K/V are lost, e.g. after a failed step)."""
        for request in reversed(list(self.running)):
            self._preempt(request)

    # ---- one step ---------------------------------------------------------------------------
    def _grant(self, request: Request, budget: int) -> int:
        return min(request.num_pending, budget, self.config.prefill_chunk)

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        out = SchedulerOutput(decode=[], prefill=[], preempted=[])
        budget = cfg.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._grant(request, budget)
            if n > 1 and len(out.prefill) >= cfg.max_prefill_seqs:
                i += 1  # no prefill row left this step; it continues next step
                continue
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
            chunk = ScheduledChunk(request, request.num_computed, n)
            (out.decode if n == 1 else out.prefill).append(chunk)
            budget -= n
            i += 1

        # New (or preempted) requests only when nothing had to be preempted this step.
        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < cfg.max_num_seqs):
            request = self.waiting[0]
            n = self._grant(request, budget)
            if n > 1 and len(out.prefill) >= cfg.max_prefill_seqs:
                break
            need = cfg.pages_for(n)
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.pages = self.allocator.alloc(need)
            self.running.append(request)
            chunk = ScheduledChunk(request, 0, n)
            (out.decode if n == 1 else out.prefill).append(chunk)
            budget -= n
        return out

    def update_from_output(self, out: SchedulerOutput) -> None:
        """The step ran: the scheduled tokens now have K/V in the cache."""
        for chunk in out.chunks:
            if chunk.request.status is RequestStatus.RUNNING:
                chunk.request.num_computed = chunk.start + chunk.num_tokens

    def check(self) -> None:
        """Allocator invariants with the pages each request holds (tests, debugging)."""
        owners = {id(r): r.pages for r in self.running}
        for r in self.waiting:
            assert not r.pages, f"waiting request {r.request_id} holds pages"
        self.allocator.check(owners)
