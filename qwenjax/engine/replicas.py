"""Data parallelism: several engines, each on its own devices, serving one stream of requests.

Each replica is a whole engine — its weights on its ``tp × pp`` devices, its KV cache, its
scheduler and its thread (``EngineThread``). ``EngineReplicas`` has the same interface as one
``EngineThread``, so the server runs over either: a new request goes to the replica with the
fewest requests in flight (ties go by a hash of the prompt's first tokens, so prompts that
share a system prompt tend to meet their cached prefix on the same replica); an abort finds
the replica running it; LoRA adapters are loaded into, and unloaded from, every replica.

Why engines and not one SPMD program over a ``dp`` mesh axis: a replica's batch, page pool
and prefix cache are its own, and one scheduler per replica keeps each program the
single-replica one. The engines' host work shares the interpreter lock; each replica's step
dispatch returns at once and its device work runs beside the others'.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import AsyncIterator, Sequence

from qwenjax.engine.async_engine import EngineThread
from qwenjax.engine.engine import Engine
from qwenjax.engine.request import RequestOutput
from qwenjax.sampling import SamplingParams

# Prompt tokens whose hash breaks ties between equally loaded replicas.
_AFFINITY_TOKENS = 64


class EngineReplicas:
    def __init__(self, threads: Sequence[EngineThread]):
        if not threads:
            raise ValueError("EngineReplicas needs at least one engine")
        self.threads = list(threads)
        self._load = [0] * len(self.threads)      # requests in flight per replica
        self._owner: dict[str, int] = {}          # request id → its replica

    @property
    def engine(self) -> Engine:
        """Replica 0's engine: the facts every replica shares (tokenizer, limits, defaults)."""
        return self.threads[0].engine

    @property
    def engines(self) -> list[Engine]:
        return [thread.engine for thread in self.threads]

    @property
    def step_seconds(self) -> float:
        return max(thread.step_seconds for thread in self.threads)

    def stack(self) -> str:
        slowest = max(self.threads, key=lambda thread: thread.step_seconds)
        return slowest.stack()

    def pick(self, prompt_ids: Sequence[int], lora: str | None = None) -> int:
        """The replica a new request goes to: the least loaded of those holding ``lora``."""
        candidates = [i for i, thread in enumerate(self.threads)
                      if lora is None or lora in thread.engine.lora_names]
        if not candidates:
            candidates = list(range(len(self.threads)))  # refused there, by name
        least = min(self._load[i] for i in candidates)
        tied = [i for i in candidates if self._load[i] == least]
        if len(tied) == 1:
            return tied[0]
        head = ",".join(map(str, prompt_ids[:_AFFINITY_TOKENS])).encode()
        return tied[int.from_bytes(hashlib.blake2b(head, digest_size=4).digest(), "little") % len(tied)]

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str,
                       priority: int = 0, lora: str | None = None) -> AsyncIterator[RequestOutput]:
        replica = self.pick(prompt_ids, lora)
        self._load[replica] += 1
        self._owner[request_id] = replica
        try:
            stream = self.threads[replica].generate(prompt_ids, params, request_id, priority, lora)
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    yield output
        finally:
            self._load[replica] -= 1
            if self._owner.get(request_id) == replica:
                del self._owner[request_id]

    def abort(self, request_id: str) -> None:
        replica = self._owner.get(request_id)
        if replica is not None:
            self.threads[replica].abort(request_id)

    async def add_lora(self, name: str, path) -> None:
        """Into every replica (read from disk once); a replica that refuses undoes the others."""
        from qwenjax.lora import read_adapter

        adapter = await asyncio.to_thread(read_adapter, name, path)
        done = []
        try:
            for thread in self.threads:
                await thread.call(Engine.add_lora, adapter)
                done.append(thread)
        except BaseException:
            for thread in done:
                await thread.call(Engine.remove_lora, name)
            raise

    async def sleep(self, level: int = 1) -> None:
        """Every replica (a replica with requests left refuses, and the ones before it wake)."""
        done = []
        try:
            for thread in self.threads:
                await thread.sleep(level)
                done.append(thread)
        except BaseException:
            for thread in done:
                await thread.wake_up()
            raise

    async def wake_up(self) -> None:
        for thread in self.threads:
            await thread.wake_up()

    async def reset_prefix_cache(self) -> bool:
        return all([await thread.reset_prefix_cache() for thread in self.threads])

    @property
    def paused(self) -> bool:
        return all(thread.paused for thread in self.threads)

    async def pause(self, mode: str = "abort", clear_cache: bool = True) -> None:
        """Every replica at once (a waiting pause waits for all of them)."""
        await asyncio.gather(*(thread.pause(mode, clear_cache) for thread in self.threads))

    async def resume(self) -> None:
        for thread in self.threads:
            await thread.resume()

    async def update_weights(self, path) -> None:
        """Every replica's weights loaded first (side by side), then swapped in: a checkpoint
        that does not load leaves all of them on the old weights."""
        loaded = await asyncio.gather(*(asyncio.to_thread(t.engine.load_weights, path)
                                        for t in self.threads))
        for thread, weights in zip(self.threads, loaded):
            await thread.call(Engine.set_weights, weights)

    async def remove_lora(self, name: str) -> None:
        """From every replica. A replica still running a request on it keeps it (and says so);
        new requests on it then go only to the replicas that still hold it."""
        refused = []
        for i, thread in enumerate(self.threads):
            if name not in thread.engine.lora_names:
                continue
            try:
                await thread.call(Engine.remove_lora, name)
            except ValueError as error:
                refused.append(f"replica {i}: {error}")
        if refused:
            raise ValueError("; ".join(refused))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        for thread in self.threads:
            thread.shutdown(timeout)
