"""What changes in a serving engine between two steps, outside any request: its optional
parts (a draft model, the prefix cache's host tier), LoRA adapters loaded and unloaded, a
pause (no steps while a trainer syncs), new weights (a trainer's latest step), and sleep mode
(device memory handed back while idle).

``LiveState`` is a part of ``Engine`` (its base class), kept apart from the request loop in
engine.py; every method runs on the engine's thread between two ``step()`` calls.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from qwenjax.loading import LoadedModel

# Engine.pause's modes, as vLLM names them (SGLang's "retract" is "keep" clearing the cache;
# its "in_place" is "keep" without).
PAUSE_MODES = ("abort", "wait", "keep")


def check_pause(mode: Any, clear_cache: Any) -> None:
    """Engine.pause's arguments, or ValueError naming the one that does not fit."""
    if mode not in PAUSE_MODES:
        raise ValueError(f"pause mode must be one of {', '.join(PAUSE_MODES)}; got {mode!r}")
    if not isinstance(clear_cache, bool):
        raise ValueError(f"clear_cache must be true or false, got {clear_cache!r}")


class LiveState:
    """Engine methods that change its device state between steps (see the module's doc)."""

    # ---- optional parts, set up at start ------------------------------------------------
    def _use_host_cache(self, gib: float) -> None:
        import jax

        from qwenjax.engine.host_cache import HostKVStore

        if not self.config.enable_prefix_caching:
            raise ValueError("kv_offloading_size needs prefix caching (the host tier holds what "
                             "the prefix cache evicts)")
        if self.lm.layout.pp > 1 or jax.process_count() > 1:
            raise ValueError("kv_offloading_size: the host KV tier runs with pp = 1 on one host")
        page_bytes = sum(a.nbytes for a in jax.tree.leaves(self.runner.cache)) // self.runner.num_pages
        capacity = int(gib * 2**30 // page_bytes)
        if capacity < 1:
            raise ValueError(f"kv_offloading_size {gib} GiB holds no page of {page_bytes} bytes")
        self.scheduler.use_host_cache(HostKVStore(capacity, self.runner.read_pages,
                                                  self.runner.write_pages))

    def _load_draft_model(self, model) -> LoadedModel:
        """The draft model of ``speculative_config.model`` on this engine's mesh, in its dtype."""
        from qwenjax import multihost
        from qwenjax.loading import load_model

        if self.lm.layout.pp > 1:
            raise ValueError("speculative_config.model: a draft model needs pp = 1 (pipeline "
                             "stages would each need the draft's layers); use method 'ngram'")
        if multihost.leader() is not None:
            raise ValueError("speculative_config.model: a draft model is not supported across "
                             "hosts yet; use method 'ngram'")
        draft = load_model(model, mesh=self.lm.mesh, dtype=self.lm.dtype)
        if (draft.tokenizer is not None and self.lm.tokenizer is not None
                and draft.tokenizer.vocab_size != self.lm.tokenizer.vocab_size):
            raise ValueError(f"speculative_config.model {str(model)!r} has a tokenizer of "
                             f"{draft.tokenizer.vocab_size} tokens, the served model one of "
                             f"{self.lm.tokenizer.vocab_size}: a draft model must share the "
                             "served model's tokenizer")
        return draft

    # ---- LoRA adapters ------------------------------------------------------------------
    def lora_slot(self, name: str | None) -> int:
        """The weight slot of LoRA adapter ``name`` (0 for None: the base model)."""
        return 0 if name is None else self.loras.slot(name)

    @property
    def lora_names(self) -> tuple[str, ...]:
        """The LoRA adapters loaded now (at start and since)."""
        return self.loras.names

    def add_lora(self, adapter) -> None:
        """Load ``adapter`` (a ``lora.Adapter``, from ``lora.read_adapter``) into a free slot
        between steps. Its arrays are written into the resident stacks, whose shapes do not
        change: nothing recompiles. Raises ValueError (a taken name, no free slot, a rank
        above max_lora_rank, shapes not the model's)."""
        import jax

        from qwenjax.lora import check_adapter, slot_arrays, write_slot

        if jax.process_count() > 1:
            raise ValueError("adapters are loaded while serving on one host only; on several "
                             "hosts give them at start (lora_modules)")
        if self.lm.weights.lora is None:
            raise ValueError("this model has no LoRA slots; load it with max_loras ≥ 1 "
                             "(--max-loras) to add adapters while serving")
        check_adapter(adapter, self.lm.layout)
        arrays = slot_arrays(adapter, self.lm.layout, self.loras.rank)
        slot = self.loras.add(adapter.name)
        try:
            lora = write_slot(self.lm.weights.lora, slot, arrays)
        except BaseException:
            self.loras.remove(adapter.name)
            raise
        self.lm.weights = dataclasses.replace(self.lm.weights, lora=lora)

    def remove_lora(self, name: str) -> None:
        """Unload adapter ``name``; refused while a request still runs or waits on it. Its slot
        is reused by the next load (which overwrites it whole)."""
        users = sum(1 for r in self._requests.values() if r.lora_name == name)
        self.loras.slot(name)  # raises for a name that is not loaded
        if users:
            raise ValueError(f"lora {name!r} has {users} request(s) running or waiting; unload it "
                             "once they finish")
        self.loras.remove(name)

    # ---- new weights while serving ------------------------------------------------------
    def load_weights(self, model) -> Any:
        """The weights of checkpoint ``model`` (an HF directory of this model's architecture, e.g.
        a trainer's latest step) laid out as this engine's, in its dtype and quantization;
        ValueError/FileNotFoundError name what does not fit. Only reads and places new arrays,
        so it may run off the engine thread while steps go on (``set_weights`` swaps them in)."""
        import jax

        from qwenjax.config import ModelConfig
        from qwenjax.hub_cache import local_model_dir
        from qwenjax.weights import checkpoint_layout, load_checkpoint, resolve_dtype

        if jax.process_count() > 1:
            raise ValueError("weights are updated while serving on one host only")
        if self.lm.score_head is not None:
            raise ValueError("new weights for a classification or reward model (its score head) "
                             "are not supported; restart the server on the new checkpoint")
        directory = local_model_dir(model)  # (a Hub id: its snapshot in the local Hub cache)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"model_path {str(model)!r} is not a checkpoint directory "
                                    "(no config.json)")
        lm = self.lm
        config = dataclasses.replace(ModelConfig.from_hf(directory), name=lm.config.name)
        if config != lm.config:
            differ = [f.name for f in dataclasses.fields(config)
                      if getattr(config, f.name) != getattr(lm.config, f.name)]
            raise ValueError(f"model_path {str(model)!r} is not the served model's architecture: "
                             f"its config differs in {', '.join(differ)}")
        layout = checkpoint_layout(config, directory, lm.layout.heads.tp, lm.layout.pp, lm.quantization)
        if layout != lm.layout:
            raise ValueError(f"model_path {str(model)!r} loads as {layout.quantization or 'dense'} "
                             f"weights; the engine serves {lm.quantization or 'dense'} ones")
        return load_checkpoint(directory, layout, lm.mesh, resolve_dtype(lm.dtype))

    def set_weights(self, weights) -> None:
        """Serve ``weights`` (``load_weights``') from the next step on; same shapes and shardings,
        so nothing recompiles. Every running request is recomputed under them (none mixes K/V of
        both) and the prefix cache is cleared; tokens already sent stay as they are. A step in
        flight finishes with the old weights."""
        import jax

        weights = dataclasses.replace(weights, lora=self.lm.weights.lora)  # adapters stay
        old, new = jax.tree.structure(self.lm.weights), jax.tree.structure(weights)
        if old != new:
            raise ValueError("the new weights are not laid out as the served ones")
        self.lm.weights = weights
        self._host_weights = None  # asleep: wake_up keeps these, not the ones slept with
        self.scheduler.preempt_all()
        self.scheduler.reset_prefix_cache()
        self.weights_version += 1

    def update_weights(self, model) -> None:
        """``set_weights(load_weights(model))`` (SGLang's update_weights_from_disk). The new
        weights load beside the old ones, so the peak is twice the weight memory; a load that
        fails leaves the engine serving the old ones."""
        self.set_weights(self.load_weights(model))

    # ---- pause: no steps while a trainer syncs its weights ------------------------------
    @property
    def paused(self) -> bool:
        return self.scheduler.paused

    @property
    def pausing(self) -> bool:
        """A ``pause("wait")`` is waiting for the requests before it to finish."""
        return self.scheduler.holding

    def pause(self, mode: str = "abort", clear_cache: bool = True) -> None:
        """Stop generating until ``resume()`` (vLLM's and SGLang's pause_generation, e.g. while
        a trainer writes new weights): nothing more is scheduled; the step in flight finishes;
        requests added meanwhile wait. ``mode``: "abort" ends every unfinished request now (its
        final output holds what it generated, finish_reason "abort"); "keep" holds them where
        they are, to go on after ``resume()``; "wait" lets them finish first (requests added
        meanwhile wait), and ``paused`` turns True once they have. ``clear_cache``: forget the
        prefix cache, and the K/V of the requests kept, which recompute on resume (under new
        weights if ``set_weights`` came meanwhile, which recomputes them anyway)."""
        check_pause(mode, clear_cache)
        scheduler = self.scheduler
        if mode == "abort":
            for request in [*scheduler.running, *scheduler.waiting, *scheduler.held]:
                self._abort_sequence(request)
        self._clear_on_pause = clear_cache or (self.pausing and self._clear_on_pause)
        if mode == "wait" and not scheduler.paused:
            scheduler.holding = True
            self._pause_once_drained()
        else:
            self._pause_now()

    def _pause_once_drained(self) -> None:
        """A waiting pause takes effect once nothing it waits for is left, nor in flight."""
        scheduler = self.scheduler
        if not (scheduler.running or scheduler.waiting or self._inflight is not None):
            self._pause_now()

    def _pause_now(self) -> None:
        scheduler = self.scheduler
        scheduler.paused = True
        scheduler.release_held()  # (they wait in the queue, which is paused)
        if self._clear_on_pause:
            scheduler.preempt_all()
            scheduler.reset_prefix_cache()
        self._clear_on_pause = False

    def resume(self) -> None:
        """Generate again: requests kept by a pause go on, queued ones are admitted. Ends a
        ``pause("wait")`` still waiting, too (it never takes effect)."""
        self.scheduler.paused = False
        self.scheduler.release_held()
        self._clear_on_pause = False

    # ---- sleep mode: the device memory handed back while idle ---------------------------
    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix page (vLLM's reset_prefix_cache), e.g. between benchmark
        runs; False (nothing done) while requests are unfinished, whose pages may be cached."""
        if self.has_unfinished() or self._inflight is not None:
            return False
        self.scheduler.reset_prefix_cache()
        return True

    def sleep(self, level: int = 1) -> None:
        """Free the device memory of the weights and the KV cache while idle (vLLM's sleep mode,
        e.g. for a trainer sharing the GPUs): level 1 keeps the weights in host memory for
        ``wake_up``; level 2 drops them (give new ones with ``update_weights``/``set_weights``
        before waking). LoRA adapters are kept in host memory at both levels; a draft model stays
        on the devices. The compiled programs stay: waking recompiles nothing. Refused while
        requests are unfinished."""
        import jax

        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        if self.sleeping:
            raise ValueError(f"the engine is already asleep (level {self.sleeping})")
        if self.has_unfinished() or self._inflight is not None:
            raise ValueError("sleep: requests are still running; wait for them or abort them first")
        if jax.process_count() > 1:
            raise ValueError("sleep mode runs on one host only")
        if level == 2 and self.lm.score_head is not None:
            raise ValueError("sleep level 2 drops the weights for new ones, which a classification "
                             "or reward model does not take; use level 1")
        weights = self.lm.weights
        self._shardings = jax.tree.map(lambda a: a.sharding, weights)
        lora = None if weights.lora is None else jax.device_get(weights.lora)
        self._host_weights = jax.device_get(weights) if level == 1 else None
        self._host_lora = lora
        for array in jax.tree.leaves((weights, self.runner.cache)):
            array.delete()
        self.runner.cache = None
        self.scheduler.reset_prefix_cache()
        self.sleeping = level

    def wake_up(self) -> None:
        """Weights and a fresh KV cache back on the devices; requests may come again."""
        import jax

        if not self.sleeping:
            return
        if self._host_weights is not None:
            self.lm.weights = jax.device_put(self._host_weights, self._shardings)
        elif any(a.is_deleted() for a in jax.tree.leaves(self.lm.weights)):
            raise ValueError("the engine slept at level 2 (its weights dropped): give it new ones "
                             "with update_weights before waking it")
        if self._host_lora is not None:
            self.lm.weights = dataclasses.replace(
                self.lm.weights, lora=jax.device_put(self._host_lora, self._shardings.lora))
        self.runner.reset_cache()
        self._host_weights = self._host_lora = self._shardings = None
        self.sleeping = 0
