"""The engine loop: schedule → run the step → sample → stops → detokenize → emit.

Single-threaded: ``step()`` does one iteration and returns the outputs of every
request that advanced. ``LLM`` drives it in a loop; ``AsyncLLM`` and the server
run it on a thread of its own.

Async scheduling (``EngineConfig.async_scheduling``, on by default): ``step()``
schedules and dispatches step N+1 before it reads step N's tokens back, so the
host's work (scheduling, packing, stop checks, detokenizing) runs while the
device computes. Step N+1 feeds each decoding request the token N sampled for
it straight from device memory (and counts it in the request's penalty table
there). What this costs: a request that stops on a token (EOS, a stop string)
has one more row computed and thrown away. The tokens are the same either way:
sampling keys depend on the request's seed and token index only. A request whose
next sampling needs its latest token on the host (a grammar, a multi-token bad word)
makes step() read the step in flight back before it schedules: while such requests
run, steps go synchronously. So does speculative decoding (``speculative_config``):
the drafts come from each request's latest tokens.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import pathlib
import random
import time
from typing import Any, Mapping, Sequence

from qwenjax.engine.live_state import LiveState
from qwenjax.engine.prefix_cache import PrefixCache
from qwenjax.engine.request import (GrowingPrefix, Request, RequestMetrics, RequestOutput,
                                    RequestStatus, TokenLogprob)
from qwenjax.engine.runner import InFlight, ModelRunner, SampledToken
from qwenjax.engine.scheduler import Scheduler, SchedulerConfig
from qwenjax.engine.speculative import SpeculativeConfig
from qwenjax.generation_config import apply_defaults, sampling_defaults
from qwenjax.kv_cache import (PageAllocator, check_kv_cache_dtype, page_bytes_per_device,
                              pages_for_memory)
from qwenjax.loading import LoadedModel
from qwenjax.metrics import EngineStats
from qwenjax.sampling import MAX_SEED, SamplingParams

log = logging.getLogger(__name__)

# What a pooling (embedding) request samples: one greedy token with its last prompt token's
# hidden state, dropped (the step computes that row anyway).
POOLING_SAMPLING = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def _is_pooling(params) -> bool:
    from qwenjax.pooling import PoolingParams

    return isinstance(params, PoolingParams)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk: int = 512
    max_prefill_seqs: int = 4
    page_size: int = 16
    # Default: the model's max context. -1 (vLLM's "auto"): that, lowered to what the KV cache
    # holds when one sequence of it would not fit.
    max_model_len: int | None = None
    num_pages: int | None = None          # default: from kv_cache_fraction of device memory
    kv_cache_fraction: float = 0.9
    # "auto": KV pages in the model's dtype; "fp8" (vLLM's --kv-cache-dtype fp8): float8 values
    # with a scale per token and head, ~half the KV memory and decode KV reads (kv_cache.py).
    kv_cache_dtype: str = "auto"
    # CPU devices report no memory limit and share the host's: the KV cache takes this much of
    # it in all (over all of this process's devices, as vLLM's VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: float = 1.0
    compile_cache: bool = True            # JAX's persistent compilation cache in the qwenjax cache dir
    compile_workers: int | None = None    # warm-up compile threads (default: runner.compile_workers)
    enable_prefix_caching: bool = True    # reuse K/V pages of prompt prefixes computed before
    async_scheduling: bool = True         # schedule step N+1 while step N runs (see above)
    # Defaults for the sampling fields a request leaves unset (qwenjax.generation_config):
    # "auto" = the model's generation_config.json, "builtin" = SamplingParams(), or a directory.
    generation_config: str = "auto"
    override_generation_config: Mapping[str, Any] | None = None  # e.g. {"temperature": 0.2}
    # Speculative decoding, as vLLM's: n-gram drafts {"method": "ngram",
    # "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
    # "disable_by_batch_size": None}, or a draft model's {"model": DIR,
    # "num_speculative_tokens": k}; None: off.
    speculative_config: SpeculativeConfig | Mapping[str, Any] | None = None
    # "fcfs" (arrival order) or "priority": add_request's priority, lower first; preemption
    # takes the newest request of the lowest priority (vLLM's --scheduling-policy).
    scheduling_policy: str = "fcfs"
    # GiB of host memory for KV pages the prefix cache evicts (vLLM's kv_offloading_size): a
    # prefix found there is copied back instead of recomputed (engine/host_cache.py). 0: off.
    kv_offloading_size: float = 0.0
    # A reasoning model's parser (qwenjax.reasoning, vLLM's --reasoning-parser): a request's
    # structured outputs constrain its output only after the reasoning closes (</think>).
    reasoning_parser: str | None = None
    # Seeds the seeds drawn for requests that give none (vLLM's --seed): the same requests in
    # the same order then sample the same tokens run after run. None: drawn from the OS.
    seed: int | None = None
    # How pooling requests pool (vLLM's --pooler-config, qwenjax.pooling.PoolerConfig.override):
    # e.g. {"pooling_type": "MEAN"}; None: the checkpoint's own (LAST; a sentence-transformers
    # Pooling module's mode; STEP at <extra_0> for a process reward model).
    pooler_config: Mapping[str, Any] | str | None = None
    # The step shapes compiled (as vLLM's cudagraph_capture_sizes, SGLang's --cuda-graph-bs):
    # decode batch sizes and packed prefill token counts a step is padded up to, one program per
    # pair. None: powers of two (prefill from 16 tokens). Fewer sizes compile faster and pad
    # more; max_num_seqs and the most prefill tokens a step holds are always among them.
    decode_buckets: Sequence[int] | None = None
    prefill_buckets: Sequence[int] | None = None


@dataclasses.dataclass
class SpecDecodeStats:
    """Speculative decoding so far: steps of a request that checked drafts, tokens drafted,
    drafts accepted (each accepted draft is a token gained over plain decoding)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclasses.dataclass
class _Tracking:
    """Host-side output state of one request."""

    detokenizer: object | None
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] | None
    text: str = ""


def enable_compile_cache() -> None:
    import jax

    from qwenjax.cache import cache_dir

    if jax.config.jax_compilation_cache_dir is None:  # keep a directory the user chose
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    # Cache every step program, not only the slow ones: a warm start should compile nothing.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class Engine(LiveState):
    """The engine loop (this module's doc); LoRA adapters, new weights and sleep mode are in
    ``LiveState`` (engine/live_state.py)."""

    def __init__(self, lm: LoadedModel, config: EngineConfig = EngineConfig(), *,
                 warm_up: bool = True, progress: bool = True):
        replicas = dict(lm.mesh.shape).get("dp", 1)
        if replicas > 1:
            # One engine schedules one replica's batch and page pool; over a dp axis every
            # replica would compute the same batch. Replicas are separate servers.
            raise ValueError(f"the mesh has dp={replicas}: one engine serves one replica; serve "
                             "replicas with --data-parallel-size (qwenjax.engine.replicas: one "
                             "engine per replica) or as separate servers (docs/deployment.md)")
        # Its own LoadedModel (the arrays shared): adding a LoRA adapter replaces this engine's
        # weights tree, never that of another engine over the same model.
        self.lm = lm = dataclasses.replace(lm)
        self.tokenizer = lm.tokenizer
        fit_to_cache = config.max_model_len == -1
        max_model_len = lm.config.max_context if fit_to_cache else \
            config.max_model_len or lm.config.max_context
        if max_model_len > lm.config.max_context:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max context "
                             f"of {lm.config.max_context}")
        speculative = SpeculativeConfig.parse(config.speculative_config)
        spec_fields = {} if speculative is None else dict(
            num_speculative_tokens=speculative.num_speculative_tokens,
            prompt_lookup_min=speculative.prompt_lookup_min,
            prompt_lookup_max=speculative.prompt_lookup_max,
            spec_disable_by_batch_size=speculative.disable_by_batch_size or 0)
        kv_cache_dtype = check_kv_cache_dtype(config.kv_cache_dtype)
        from qwenjax.reasoning import check_reasoning_parser

        check_reasoning_parser(config.reasoning_parser)
        self.draft_lm = None if speculative is None or speculative.model is None else \
            self._load_draft_model(speculative.model)
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            prefill_chunk=min(config.prefill_chunk, config.max_num_batched_tokens),
            max_prefill_seqs=config.max_prefill_seqs, page_size=config.page_size,
            max_model_len=max_model_len, policy=config.scheduling_policy,
            decode_buckets=config.decode_buckets or (), prefill_buckets=config.prefill_buckets or (),
            **spec_fields)
        self.spec_stats = SpecDecodeStats()
        self.stats = EngineStats()  # tokens and finished sequences (LLM.get_metrics)
        self.config = config
        if config.seed is not None and (not isinstance(config.seed, int) or isinstance(config.seed, bool)):
            raise ValueError(f"seed must be an int or None, got {config.seed!r}")
        # Seeds of requests without one: from the OS, or from config.seed.
        self._seeds = random.SystemRandom() if config.seed is None else random.Random(config.seed)
        files = None if lm.files is None else pathlib.Path(lm.files)  # None: a preset, random weights
        self.sampling_defaults = sampling_defaults(files, config.generation_config,
                                                   config.override_generation_config)
        from qwenjax.pooling import PoolerConfig

        self.pooler = PoolerConfig.for_checkpoint(files, self.head_kind).override(config.pooler_config)
        if config.compile_cache:
            enable_compile_cache()
        num_pages = config.num_pages or self._pages_from_memory(config)
        needed = self.scheduler_config.pages_for(max_model_len)
        if fit_to_cache and num_pages < needed:
            max_model_len = num_pages * self.scheduler_config.page_size
            log.info("max_model_len auto: %d tokens, what %d KV pages hold (the model's max "
                     "context is %d)", max_model_len, num_pages, lm.config.max_context)
            self.scheduler_config = dataclasses.replace(self.scheduler_config,
                                                        max_model_len=max_model_len)
            needed = num_pages
        if num_pages < needed:
            raise ValueError(f"the KV cache has {num_pages} pages but one sequence of max_model_len "
                             f"{max_model_len} needs {needed}; lower max_model_len or add pages")
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = None
        if config.enable_prefix_caching:
            # Pages are only ever shared inside this engine, whose model, dtype and mesh are
            # fixed; the identity still roots the hash chain so that keys never mix.
            identity = (str(lm.source), str(lm.dtype), lm.quantization, kv_cache_dtype,
                        tuple(lm.mesh.shape.items()))
            self.prefix_cache = PrefixCache(self.allocator, config.page_size, identity)
        self.drafter = None
        if self.draft_lm is not None:
            from qwenjax.engine.draft_model import DraftModel

            self.drafter = DraftModel(
                self.draft_lm, vocab_size=lm.config.vocab_size,
                num_speculative_tokens=speculative.num_speculative_tokens, num_pages=num_pages,
                page_size=config.page_size, pages_per_seq=needed, max_rows=config.max_prefill_seqs)
        self.scheduler = Scheduler(self.scheduler_config, self.allocator, self.prefix_cache,
                                   drafter=None if self.drafter is None else self.drafter.propose)
        eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else lm.config.eos_token_ids
        self.eos_token_ids = tuple(eos)
        from qwenjax import multihost

        # Multi-host process 0: the runner sends every step to the other processes.
        self.runner = ModelRunner(lm, self.scheduler_config, num_pages, self.eos_token_ids,
                                  mirror=multihost.leader(), kv_cache_dtype=kv_cache_dtype)
        if config.kv_offloading_size:
            self._use_host_cache(config.kv_offloading_size)
        self._requests: dict[str, Request] = {}
        self._groups: dict[str, list[str]] = {}  # n > 1: request id → its unfinished sequences' ids
        self._tracking: dict[str, _Tracking] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self._inflight: InFlight | None = None     # the step dispatched and not yet read back
        self._ids = itertools.count()
        self.num_steps = 0  # steps dispatched to the devices so far
        from qwenjax.lora import LoRASlots

        self.loras = LoRASlots(lm.max_loras + 1, lm.max_lora_rank, lm.lora_names)
        self._grammars = None  # qwenjax.structured.GrammarCompiler, built on first use
        self.weights_version = 0  # set_weights calls so far
        self.sleeping = 0  # sleep mode: 0 awake, else the level it sleeps at
        self._clear_on_pause = False  # pause(clear_cache=True) not yet in effect (mode "wait")
        self._host_weights = self._host_lora = self._shardings = None
        self.warm_up_seconds = (self.runner.warm_up(progress=progress, workers=config.compile_workers)
                                if warm_up else 0.0)
        if warm_up and self.drafter is not None:
            start = time.perf_counter()
            self.drafter.warm_up()
            self.warm_up_seconds += time.perf_counter() - start

    def context_room(self, num_prompt_tokens: int) -> int:
        """The most tokens a prompt of this length leaves room to generate (the last sampled
        token needs no K/V, hence the + 1)."""
        return self.max_model_len + 1 - num_prompt_tokens

    def default_sampling_params(self, num_prompt_tokens: int | None = None) -> SamplingParams:
        """What a request without SamplingParams gets: the model's defaults (EngineConfig's
        generation_config), max_tokens capped to the room a prompt of this length leaves."""
        return self.sampling_params({}, num_prompt_tokens)

    def sampling_params(self, fields: Mapping[str, Any],
                        num_prompt_tokens: int | None = None) -> SamplingParams:
        """SamplingParams with the ``fields`` a request set and the model's defaults for the
        rest; raises ValueError naming a bad field."""
        k = fields.get("truncate_prompt_tokens")
        if num_prompt_tokens is not None and isinstance(k, int) and not isinstance(k, bool):
            # (A k of the wrong type is refused by SamplingParams, naming the field.)
            num_prompt_tokens = min(num_prompt_tokens, self._truncation(k))
        room = None if num_prompt_tokens is None else self.context_room(num_prompt_tokens)
        params = apply_defaults(self.sampling_defaults, fields, room=room)
        return params if num_prompt_tokens is None else self.filled(params, num_prompt_tokens)

    def filled(self, params, num_prompt_tokens: int):
        """``params`` with max_tokens None (vLLM's "as many as the context allows") set to the
        room a prompt of this length leaves (at least 1: a prompt with no room is refused by
        ``validate`` naming its length); anything else unchanged."""
        if isinstance(params, SamplingParams) and params.max_tokens is None:
            return dataclasses.replace(params, max_tokens=max(1, self.context_room(num_prompt_tokens)))
        return params

    def _truncation(self, k) -> int:
        """The prompt length truncate_prompt_tokens keeps (-1: the max context)."""
        return self.max_model_len if k == -1 else k

    def truncated(self, prompt_ids: Sequence[int], params) -> Sequence[int]:
        """The prompt as the request runs it: its last ``truncate_prompt_tokens`` tokens, if
        set (SamplingParams or PoolingParams)."""
        k = getattr(params, "truncate_prompt_tokens", None)
        return prompt_ids if k is None else list(prompt_ids)[-self._truncation(k):]

    def _pages_from_memory(self, config: EngineConfig) -> int:
        c = self.lm.config
        # With pp stages each device holds the pools of its stage's layer slots only.
        page_bytes = page_bytes_per_device(
            num_layers=self.lm.layout.layers_per_stage, kv_heads_per_device=self.lm.layout.heads.kv_heads // self.lm.layout.heads.tp,
            head_dim=c.head_dim, page_size=config.page_size, dtype=self.lm.weights.final_norm.dtype,
            kv_cache_dtype=config.kv_cache_dtype)
        # This process's devices (multi-host: the others' stats are not visible here; the page
        # count is then sent to them with the runner's set-up).
        devices = list(self.lm.mesh.local_devices)
        if self.draft_lm is not None:  # the draft model's cache has a page for every page
            from qwenjax.engine.draft_model import DraftModel

            page_bytes += DraftModel.page_bytes(self.draft_lm, config.page_size)
        if devices[0].platform == "cpu":
            return max(1, int(config.cpu_kv_cache_gib * 2**30 // (page_bytes * len(devices))))
        return pages_for_memory(memory_fraction=config.kv_cache_fraction, page_bytes=page_bytes,
                                devices=devices)

    # ---- requests --------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    @property
    def head_kind(self) -> str | None:
        """The served checkpoint's score head ("classify", "reward", "process_reward"); None
        for a causal LM."""
        head = self.lm.score_head
        return head.kind if head is not None else None

    def pooling_params(self, params=None, task: str | None = None):
        """``params`` (a PoolingParams, default normalized) for ``task`` when given; with neither
        given, the served model's own task: embed, classify or reward."""
        from qwenjax.pooling import PoolingParams

        if params is None:
            kind = self.head_kind
            params = PoolingParams(task="embed" if kind is None else
                                   "classify" if kind == "classify" else "reward")
        elif not isinstance(params, PoolingParams):
            raise ValueError(f"pooling_params must be PoolingParams, got {type(params).__name__}")
        return params if task is None else dataclasses.replace(params, task=task)

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams, priority: int = 0) -> None:
        """Raise ValueError naming the problem; nothing is admitted. (The prompt is checked as it
        would run: cut to ``truncate_prompt_tokens`` when that is set.)"""
        prompt_ids = self.truncated(prompt_ids, params)
        kind = self.head_kind
        if _is_pooling(params):
            params.check(self.lm.config.hidden_size, kind, self.pooler)
            params = POOLING_SAMPLING
        elif kind is not None:
            task = self.pooling_params().task
            raise ValueError(f"this checkpoint is a {kind} model (a score head, no LM head): "
                             f"it does not generate; ask it to {task} (LLM.{task}, HTTP "
                             "/classify or /pooling)")
        if self.sleeping:
            raise ValueError("the engine is asleep (sleep mode); wake it up first")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, numbers.Integral) or isinstance(priority, bool):
            raise ValueError(f"priority must be an int, got {priority!r}")
        if priority != 0 and self.scheduler_config.policy != "priority":
            raise ValueError(f"priority is {priority}, but the engine schedules first come, first "
                             f"served; start it with scheduling_policy='priority'")
        if len(prompt_ids) == 0:
            raise ValueError("prompt is empty: at least one token is needed")
        vocab = self.lm.config.vocab_size
        for i, t in enumerate(prompt_ids):
            if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token {i} is {t!r}; token ids must be ints in [0, {vocab})")
        for field, t in params.token_ids_named():
            if t >= vocab:
                raise ValueError(f"{field} has {t}; token ids must be < {vocab}")
        self._matcher(params)  # a grammar that does not compile (compiled grammars are cached)
        if getattr(params, "thinking_token_budget", None) is not None \
                and (self.config.reasoning_parser is None or self.tokenizer is None):
            raise ValueError("thinking_token_budget limits a reasoning model's thinking: serve it "
                             "with a reasoning parser (reasoning_parser='deepseek_r1', "
                             "--reasoning-parser deepseek_r1)")
        # As in vLLM, the last sampled token is returned but never fed back, so it needs no KV
        # slot: a prompt of exactly max_model_len tokens may still sample one token.
        n, limit = len(prompt_ids), self.max_model_len
        if n > limit:
            raise ValueError(f"prompt has {n} tokens; max context is {limit}")
        # max_tokens None fills the room the prompt leaves (``filled``); min_tokens must fit it.
        field = "max_tokens" if params.max_tokens is not None else "min_tokens"
        wanted = getattr(params, field)
        if n + wanted - 1 > limit:
            raise ValueError(f"prompt has {n} tokens and {field} is {wanted}: "
                             f"{n + wanted} exceeds the max context of {limit} + 1 "
                             f"(the last sampled token needs no KV slot)")

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    lora: str | None = None, pooling=None) -> str:
        """Queue a request; ``priority`` (scheduling_policy "priority"): lower runs first;
        ``lora``: the name of a loaded LoRA adapter (None: the base model). ``params`` may be
        a PoolingParams: an embedding request (``add_pooling_request``)."""
        if _is_pooling(params):
            return self.add_pooling_request(prompt_ids, params, request_id, priority, lora)
        lora_slot = self.lora_slot(lora)
        lora_load = self.loras.load_id(lora) if lora is not None else 0
        params = params if params is not None else self.default_sampling_params(len(prompt_ids))
        prompt_ids = self.truncated(prompt_ids, params)
        self.validate(prompt_ids, pooling if pooling is not None else params, priority)
        params = self.filled(params, len(prompt_ids))
        bad_words_ids = self._bad_words_ids(params.bad_words)
        matcher = self._matcher(params)  # compiled now: a bad grammar is refused before admission
        prompt_ids = [int(t) for t in prompt_ids]
        # The reply opens with reasoning, where a grammar waits and a thinking budget counts.
        reasoning = (self.config.reasoning_parser is not None
                     and (matcher is not None or params.thinking_token_budget is not None)
                     and not self._reasoning_closed(prompt_ids))
        if matcher is not None and reasoning:
            from qwenjax.reasoning import END

            matcher = matcher.after_reasoning(END, self.tokenizer.token_bytes)
        budget = None
        if params.thinking_token_budget is not None and reasoning:
            from qwenjax.reasoning import END, ThinkingBudget

            budget = ThinkingBudget(params.thinking_token_budget,
                                    tuple(self.tokenizer.encode(END, add_special_tokens=False)),
                                    self.tokenizer.token_bytes)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if params.n == 1:
            ids = [request_id]
        else:
            # Parallel sampling, as in vLLM: n independent sequences of the prompt, each a request
            # of its own inside the engine (prefix caching shares the prompt's pages once they
            # are computed); a seeded request's sequence i uses seed + i.
            ids = [f"{request_id}#{i}" for i in range(params.n)]
        for used in (request_id, *ids):
            if used in self._requests or used in self._groups:
                raise ValueError(f"request_id {used!r} is already in use")
        if params.n == 1:
            self._add(request_id, prompt_ids, params, bad_words_ids=bad_words_ids, matcher=matcher,
                      priority=int(priority), lora_name=lora, lora_slot=lora_slot,
                      lora_load=lora_load, pooling=pooling, thinking_budget=budget)
            return request_id
        self._groups[request_id] = ids
        leader = None
        for i, child_id in enumerate(ids):
            seed = None if params.seed is None else (params.seed + i) % MAX_SEED
            # The prompt's logprobs are the same for every sequence: sequence 0 computes them.
            child = dataclasses.replace(params, n=1, seed=seed,
                                        prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            request = self._add(child_id, prompt_ids, child, parent_id=request_id, index=i,
                                leader=leader, bad_words_ids=bad_words_ids,
                                matcher=matcher.copy() if matcher is not None else None,
                                priority=int(priority), lora_name=lora, lora_slot=lora_slot,
                                lora_load=lora_load,
                                thinking_budget=None if budget is None else dataclasses.replace(budget))
            leader = leader or request
        return request_id

    def add_pooling_request(self, prompt_ids: Sequence[int], pooling=None,
                            request_id: str | None = None, priority: int = 0,
                            lora: str | None = None) -> str:
        """Queue a request for the embedding of ``prompt_ids`` (qwenjax/pooling.py): its last
        output carries ``embedding``; ``pooling``: a PoolingParams (default: normalized).
        (``add_request`` with PoolingParams for its params does the same.)"""
        from qwenjax.pooling import PoolingParams

        pooling = pooling if pooling is not None else PoolingParams()
        if not isinstance(pooling, PoolingParams):
            raise ValueError(f"pooling must be PoolingParams, got {type(pooling).__name__}")
        pooling.check(self.lm.config.hidden_size, self.head_kind, self.pooler)
        prompt_ids = self.truncated(prompt_ids, pooling)
        return self.add_request(prompt_ids, POOLING_SAMPLING, request_id, priority, lora,
                                pooling=pooling)

    def _matcher(self, params: SamplingParams):
        """A grammar matcher for a request with structured_outputs (None without)."""
        if params.structured_outputs is None:
            return None
        if self.tokenizer is None:
            raise ValueError("structured_outputs needs the model's tokenizer, and this model has none")
        if self._grammars is None:
            from qwenjax.structured import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer.to_json(), self.lm.config.vocab_size,
                                             self.eos_token_ids)
        return self._grammars.matcher(params.structured_outputs)

    def _reasoning_closed(self, prompt_ids: Sequence[int], window: int = 8) -> bool:
        """Whether the prompt itself closed the reasoning its reply would open: it ends with
        </think> (and whitespace), as an assistant turn continued after its reasoning or a
        template that turns thinking off does. (A tag quoted earlier in the prompt counts not.)"""
        from qwenjax.reasoning import END

        tail = b"".join(self.tokenizer.token_bytes(t) for t in prompt_ids[-window:])
        return tail.rstrip().endswith(END.encode())

    def _bad_words_ids(self, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Each bad word as token ids, as vLLM encodes them: the word, and the word after a
        space when that starts with another token and is as long (the word inside a sentence)."""
        if not words:
            return ()
        if self.tokenizer is None:
            raise ValueError("bad_words needs the model's tokenizer, and this model has none")
        found: list[tuple[int, ...]] = []
        for word in words:
            bare = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            found.append(bare)
            if spaced[0] != bare[0] and len(spaced) == len(bare):
                found.append(spaced)
        return tuple(dict.fromkeys(found))

    def _add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, **fields) -> Request:
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        now = time.monotonic()
        speculate = self.scheduler_config.num_speculative_tokens > 0
        request = Request(request_id, list(prompt_ids), params, seed, now, speculate=speculate, **fields)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        if request.thinking_budget is not None:
            request.speculate = False  # (accepted drafts would run past the forced tokens)
        if request.pooling is not None:
            from qwenjax.pooling import PoolState

            request.pool = PoolState(*request.pooling.rows(self.pooler, self.head_kind),
                                     request.prompt_ids)
        elif getattr(params, "return_hidden_states", False):
            from qwenjax.pooling import HiddenStates

            request.pool = HiddenStates(request.prompt_ids)
            request.speculate = False  # (a rejected draft's rows would be taken as the sequence's)
        detokenizer = None
        if self.tokenizer is not None and getattr(params, "detokenize", True):
            from qwenjax.detokenizer import IncrementalDetokenizer

            detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_ids,
                                                 skip_special_tokens=params.skip_special_tokens,
                                                 stop=params.stop, stop_regex=params.stop_regex,
                                                 include_stop=params.include_stop_str_in_output)
        self._requests[request_id] = request
        self._tracking[request_id] = _Tracking(detokenizer, RequestMetrics(now),
                                               [] if params.logprobs is not None else None)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Stop a request (every sequence of it) now and free its pages; its final outputs come
        from the next step()."""
        found = False
        for sequence_id in list(self._groups.get(request_id, [request_id])):
            request = self._requests.get(sequence_id)
            if request is None or request.finished:
                continue
            self._abort_sequence(request)
            found = True
        return found

    def _abort_sequence(self, request: Request) -> None:
        """End one unfinished sequence now; its final output comes from the next step()."""
        self.scheduler.finish(request, "abort")
        self._pending.append(self._finish_output(request, "abort", None, "", []))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def wants_step(self) -> bool:
        """Whether ``step()`` has work: outputs to hand out, a step to read back, or requests
        to schedule (none while paused)."""
        return bool(self._pending) or self._inflight is not None or self.scheduler.schedulable

    @property
    def num_unfinished(self) -> int:
        scheduler = self.scheduler
        return len(scheduler.waiting) + len(scheduler.running) + len(scheduler.held)

    # ---- one iteration ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Dispatch the next step, then read back and process the one before it (async
        scheduling); or dispatch one step and wait for it."""
        outputs, self._pending = self._pending, []
        previous, self._inflight = self._inflight, None
        if previous is not None and self._read_back_first(previous):
            outputs += self._collect(previous)
            previous = None
        out = self.scheduler.schedule()
        if self.drafter is not None and self.scheduler.drafting:
            # The draft model computes the same prompt chunks (dispatched first, run alongside).
            self.drafter.catch_up([(c.request, c.start + c.num_real) for c in out.prefill
                                   if c.request.speculate and not c.draft])
        if not out.empty:
            try:
                dispatched = self.runner.dispatch(out)
            except Exception as error:  # a failed step fails only its own requests
                log.exception("step failed")
                if previous is not None:
                    outputs += self._collect(previous)
                return outputs + self._fail_step(out, error)
            self.scheduler.step_dispatched(out)
            self.num_steps += 1
            self.stats.step_tokens[out.num_tokens] += 1
            for row, chunk in dispatched.placed:
                chunk.request.num_inflight += 1
                chunk.request.inflight_row = row
            self._inflight = dispatched
        if previous is not None:
            outputs += self._collect(previous)
        if self._inflight is not None and not self.config.async_scheduling:
            dispatched, self._inflight = self._inflight, None
            outputs += self._collect(dispatched)
        elif self._inflight is not None and all(c.request.finished for c in self._inflight.out.chunks):
            self._settle(self._inflight)  # only rows of requests that stopped meanwhile
            self._inflight = None
        if self.scheduler.holding:
            self._pause_once_drained()
        return outputs

    def _read_back_first(self, step: InFlight) -> bool:
        """Whether the step in flight must be read back before the next is scheduled (that
        step then runs synchronously) rather than leave its requests out of every other step:
        a grammar or a multi-token bad word needs the token on the host before its request
        samples again; drafts come from a request's latest tokens; and a step that checked
        drafts yields an unknown number of tokens per request."""
        drafting = self.scheduler.drafting
        return any((c.request.needs_known_outputs or c.draft or (c.request.speculate and drafting))
                   and not c.request.finished for _, c in step.placed)

    @staticmethod
    def _settle(step: InFlight) -> None:
        """Its sampled tokens are read back, or never will be: they are no longer in flight."""
        for _, chunk in step.placed:
            chunk.request.num_inflight -= 1

    def _collect(self, step: InFlight) -> list[RequestOutput]:
        """Read a dispatched step's tokens back and advance its requests."""
        try:
            sampled, scored = self.runner.collect(step)
        except Exception as error:  # the step failed on the device
            log.exception("step failed")
            self._settle(step)
            if self._inflight is not None:  # it ran on this step's outputs: gone too
                self._settle(self._inflight)
                self._inflight = None
            return self._fail_step(step.out, error)
        self._settle(step)
        for request, position, entry in scored:
            # In order, once each: a request preempted meanwhile may score a position again.
            if not request.finished and position == len(request.prompt_logprobs) - 1:
                request.prompt_logprobs.append(entry)
        now = time.monotonic()
        outputs = []
        by_chunk: dict[int, list[SampledToken]] = {}  # a drafting chunk yields several tokens
        for token in sampled:
            by_chunk.setdefault(id(token.chunk), []).append(token)
        for tokens in by_chunk.values():
            chunk = tokens[0].chunk
            if chunk.request.finished:
                continue  # aborted, or stopped while this row was in flight
            if chunk.draft:
                self.spec_stats.num_drafts += 1
                self.spec_stats.num_draft_tokens += len(chunk.draft)
                self.spec_stats.num_accepted_tokens += len(tokens) - 1
            bad = [t for t in tokens if not t.finite]
            outputs.append(self._fail_row(bad[0]) if bad else self._advance(tokens, now))
        return outputs

    def _fail_row(self, token: SampledToken) -> RequestOutput:
        """Non-finite logits: fail this request alone (its pages go back); its NaN K/V stay in
        freed pages, which attention never reads past a sequence's length."""
        request = token.chunk.request
        log.error("request %s: non-finite logits at position %d; failing it", request.request_id,
                  request.num_known)
        return self._fail_request(request, f"non-finite logits (NaN/inf) at position {request.num_known}")

    def _fail_request(self, request: Request, error: str) -> RequestOutput:
        self.scheduler.finish(request, "error")
        result = self._finish_output(request, "error", None, "", [])
        result.error = error
        return result

    def _advance(self, tokens: list[SampledToken], now: float) -> RequestOutput:
        """Append a request's new tokens (one, or with speculative decoding up to k + 1) in
        order, checking the stops after each; the tokens after a stop are dropped."""
        chunk = tokens[0].chunk
        request = chunk.request
        params, track = request.params, self._tracking[request.request_id]
        if track.metrics.first_token_time is None:  # the prompt is computed
            track.metrics.first_token_time = now
            self.stats.prompt_tokens += len(request.prompt_ids)
        reason, matched, delta, delta_ids, new_logprobs = None, None, "", [], []
        for token in tokens:
            request.output_ids.append(token.token_id)
            delta_ids.append(token.token_id)
            if track.logprobs is not None:
                new_logprobs.append(TokenLogprob(token.token_id, token.logprob, token.top))
            if token.token_id in params.stop_token_ids:
                reason, matched = "stop", token.token_id
            elif not params.ignore_eos and token.token_id in self.eos_token_ids:
                reason, matched = "stop", token.token_id
            elif track.detokenizer is not None:
                delta += track.detokenizer.add([token.token_id])
                if track.detokenizer.stopped:
                    reason, matched = "stop", track.detokenizer.matched_stop
            if request.thinking_budget is not None:
                request.thinking_budget.take(token.token_id)
            if reason is None and request.matcher is not None:
                if not request.matcher.advance(token.token_id):  # the mask allowed it: a bug if so
                    return self._fail_request(request, f"the grammar refused token {token.token_id}: "
                                                       f"{request.matcher.error}")
                if request.matcher.done:  # the grammar is complete: only EOS could follow
                    reason = "stop"
            if reason is None and (len(request.output_ids) >= params.max_tokens
                                   or request.num_known > self.max_model_len):
                reason = "length"
            if reason is not None:
                break
        if track.logprobs is not None:
            track.logprobs.extend(new_logprobs)
        if request.pooling is None:  # (a pooling request's token is dropped)
            self.stats.generation_tokens += len(delta_ids)
        if reason is None:
            # Accepted drafts: their K/V, computed in this step, now hold the sequence's tokens.
            request.num_computed += len(delta_ids) - 1
            track.text += delta
            return self._output(request, delta, delta_ids, new_logprobs, False)
        self.scheduler.finish(request, reason)
        return self._finish_output(request, reason, matched, delta, delta_ids, new_logprobs)

    def _finish_output(self, request: Request, reason: str, matched, delta: str,
                       delta_ids: list[int], delta_logprobs=None) -> RequestOutput:
        track = self._tracking.pop(request.request_id)
        self._requests.pop(request.request_id, None)
        last = True  # of the whole request: n = 1, or the last of its n sequences to end
        if request.parent_id is not None:
            remaining = self._groups[request.parent_id]
            remaining.remove(request.request_id)
            last = not remaining
            if last:
                del self._groups[request.parent_id]
        detokenizer = track.detokenizer
        if detokenizer is not None and not detokenizer.stopped:
            # Release text held back for possible stop strings; settling it can still find one.
            delta += detokenizer.finish()
            if detokenizer.stopped and reason in ("stop", "length"):
                reason, matched = "stop", detokenizer.matched_stop
        track.text += delta
        track.metrics.finish_time = time.monotonic()
        track.metrics.first_scheduled_time = request.first_scheduled_time
        out = self._output(request, delta, delta_ids, delta_logprobs or [], last, track)
        out.finish_reason, out.matched_stop = reason, matched
        out.stopped_at_eos = reason == "stop" and isinstance(matched, int) \
            and matched in self.eos_token_ids
        if request.pool is not None and request.pooling is None:  # return_hidden_states
            out.hidden_states = request.pool.first(request.num_known - 1)
        if request.pooling is not None and request.embedding is not None:
            # An embedding, not a generation: the token sampled with it is dropped.
            out.embedding = request.pooling.apply(request.embedding, self.lm.config.hidden_size,
                                                  self.head_kind, self.pooler)
            out.text, out.delta_text, out.token_ids, out.delta_token_ids = "", "", [], []
            out.finish_reason, out.matched_stop = "stop", None
        self.stats.finished[out.finish_reason] += 1
        return out

    def _output(self, request: Request, delta: str, delta_ids: list[int], delta_logprobs,
                finished: bool, track: _Tracking | None = None) -> RequestOutput:
        track = track or self._tracking[request.request_id]
        return RequestOutput(
            request_id=request.parent_id or request.request_id, index=request.index,
            prompt_token_ids=request.prompt_ids, text=track.text,
            token_ids=GrowingPrefix(request.output_ids, len(request.output_ids)),
            delta_text=delta, delta_token_ids=delta_ids, finished=finished,
            logprobs=None if track.logprobs is None
            else GrowingPrefix(track.logprobs, len(track.logprobs)),
            delta_logprobs=delta_logprobs if track.logprobs is not None else None,
            prompt_logprobs=request.prompt_logprobs if request.prompt_logprobs_done else None,
            num_cached_tokens=request.num_cached_tokens or 0, metrics=track.metrics)

    def _fail_step(self, out, error: Exception) -> list[RequestOutput]:
        """Fail the step's requests; the donated KV pools may be gone, so rebuild them and let
        every other running request recompute."""
        failed = []
        for chunk in out.chunks:
            request = chunk.request
            if request.status is RequestStatus.FINISHED:
                continue
            self.scheduler.finish(request, "error")
            result = self._finish_output(request, "error", None, "", [])
            result.error = f"{type(error).__name__}: {error}"
            failed.append(result)
        self.scheduler.preempt_all()
        self.runner.reset_cache()
        self.scheduler.reset_prefix_cache()
        return failed

    def check(self) -> None:
        self.scheduler.check()
