"""The Python API: ``LLM`` for scripts and notebooks, ``AsyncLLM`` for asyncio code.

    from qwenjax import LLM, SamplingParams
    llm = LLM()                                   # the default Qwen2.5-Coder-0.5B-Instruct
    for delta in llm.stream("Write a haiku about JAX."): print(delta.delta_text, end="")
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import uuid
from typing import AsyncIterator, Callable, Iterator, Mapping, Sequence, TypedDict, Union

import jax
from jax.sharding import Mesh

from qwenjax.engine.engine import Engine, EngineConfig
from qwenjax.engine.request import RequestOutput
from qwenjax.beam_search import BeamSearchOutput, BeamSearchParams
from qwenjax.loading import LoadedModel, load_model
from qwenjax.lora import LoRARequest
from qwenjax.sampling import RequestOutputKind, SamplingParams

log = logging.getLogger("qwenjax")


class TextPrompt(TypedDict):
    """vLLM's prompt dict for text: ``{"prompt": "..."}``."""

    prompt: str


class TokensPrompt(TypedDict):
    """vLLM's prompt dict for token ids: ``{"prompt_token_ids": [...]}``."""

    prompt_token_ids: list[int]


# A string, token ids, or vLLM's prompt dicts (TextPrompt, TokensPrompt).
Prompt = Union[str, Sequence[int], TextPrompt, TokensPrompt]
Message = dict
Conversation = Sequence[Message]


# vLLM's LLM(...) arguments that ask for what qwenjax does anyway, or that have no use here:
# accepted so that vLLM scripts run unchanged (the CLI accepts its flags the same way).
VLLM_NO_OP_ARGUMENTS = {
    "trust_remote_code": "Qwen2 is built in: no code from the checkpoint runs",
    "enforce_eager": "there are no CUDA graphs: XLA compiles each step shape once",
    "enable_chunked_prefill": "prefill is always chunked (prefill_chunk)",
    "disable_log_stats": "the engine logs no periodic stats",
    "disable_custom_all_reduce": "XLA inserts the collectives",
    "enable_lora": "adapters load with lora_modules, add_lora or a LoRARequest (max_loras slots)",
    "enable_sleep_mode": "sleep() and wake_up() always work",
    "swap_space": "preempted requests are recomputed; the host KV tier is cpu_kv_cache_gib",
    "max_logprobs": "logprobs and prompt_logprobs allow up to 20 alternatives",
    "tokenizer_mode": "the tokenizer is the checkpoint's tokenizer.json",
    "tokenizer_revision": "the tokenizer comes with the model (a separate --tokenizer Hub id: its main)",
    "max_seq_len_to_capture": "there are no CUDA graphs",
    "disable_async_output_proc": "output processing is part of the engine step",
    "compilation_config": "XLA compiles every step",
}


def _engine_config(max_model_len, max_num_seqs, kv_cache_fraction, kwargs) -> EngineConfig:
    return EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                        kv_cache_fraction=kv_cache_fraction, **kwargs)


def _alias(name: str, value, default, vllm_name: str, vllm_value):
    """``value``, or vLLM's spelling of the same argument when only that one was given."""
    if vllm_value is None:
        return value
    if value != default and value != vllm_value:
        raise ValueError(f"{name}={value!r} and {vllm_name}={vllm_value!r} name the same setting; "
                         "give one")
    return vllm_value


class _Base:
    def __init__(self, model: str | os.PathLike | None = None, *, tp: int = 1, pp: int = 1,
                 mesh: Mesh | None = None,
                 devices: Sequence[int] | None = None,
                 dtype: str | None = None, quantization: str | None = None,
                 chat_template: str | None = None,
                 lora_modules: dict[str, str | os.PathLike] | None = None,
                 max_loras: int | None = None, max_lora_rank: int | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 64,
                 kv_cache_fraction: float = 0.9, warm_up: bool | None = None, progress: bool = True,
                 tensor_parallel_size: int | None = None, pipeline_parallel_size: int | None = None,
                 gpu_memory_utilization: float | None = None, load_format: str = "auto",
                 tokenizer: str | os.PathLike | None = None,
                 hf_overrides: Mapping[str, object] | None = None, revision: str | None = None,
                 download_dir: str | os.PathLike | None = None, **engine_options):
        """``model``: HF checkpoint directory, Hugging Face Hub id already in the local Hub cache
        ("Qwen/Qwen2.5-7B-Instruct", at ``revision``, in ``download_dir`` or the default cache:
        nothing is downloaded), preset name (random weights), None for the default model, or an
        already loaded ``LoadedModel`` (its weights are shared, not copied).
        ``tp``/``pp``: tensor-parallel devices per stage and pipeline stages.
        ``load_format``: "auto", or "dummy" for random weights of the checkpoint's shapes (as
        vLLM's). ``tokenizer``: a directory with tokenizer.json to use instead of the model's.
        ``hf_overrides``: config.json keys to replace, the positions and RoPE ones (vLLM's), e.g.
        ``{"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings":
        32768}}`` for Qwen2.5's 131k context.
        ``chat_template``: a Jinja chat template (or a file holding one) to use instead of the
        checkpoint's.
        ``lora_modules``: {name: PEFT LoRA directory}: adapters served beside the base weights;
        ``generate(..., lora=name)`` picks one per call (qwenjax/lora.py). ``max_loras``: LoRA
        slots (default: one per adapter given; more leave room for ``add_lora`` later);
        ``max_lora_rank``: the largest rank they hold (default: the largest adapter's, or 16).
        ``quantization``: "fp8" stores the projection weights as float8 with per-channel scales
        (half of bf16's memory and decode bytes), "int8"/"int4" as integers with a scale and zero
        point per 128 inputs (a half/quarter); None keeps them in ``dtype``, unless the
        checkpoint is FP8, AWQ or GPTQ (it stays so; "awq"/"gptq" say the same).
        ``warm_up``: compile every shape bucket now; default on accelerators, off on CPU (where
        compiling ~50 programs takes minutes; each is then compiled on first use and cached).
        ``engine_options``: any other ``EngineConfig`` field (num_pages, page_size,
        max_num_batched_tokens, prefill_chunk, max_prefill_seqs, cpu_kv_cache_gib, compile_cache,
        kv_cache_dtype: "auto" or "fp8" (e4m3 pages with a scale per token and head),
        enable_prefix_caching: on by default, reuses the K/V of prompt prefixes seen before;
        async_scheduling: on by default, schedules the next step while the device runs this one;
        generation_config: "auto" (default) takes the sampling defaults of the model's
        generation_config.json, "builtin" ignores them; override_generation_config: a dict of
        generation_config keys applied on top; speculative_config: speculative decoding, off by
        default: n-gram drafts {"method": "ngram", "num_speculative_tokens": 4} or a draft
        model's {"model": DIR, "num_speculative_tokens": 4} (same tokenizer, e.g. the 0.5B);
        scheduling_policy: "fcfs" (default) or "priority", for the priority argument;
        reasoning_parser: "deepseek_r1" for reasoning models, whose structured outputs then
        start after </think>; split a reply with qwenjax.reasoning.split_reasoning; seed: the
        seeds of requests that give none are drawn from it, so reruns sample alike;
        pooler_config: how embed/classify/reward/encode pool, e.g. {"pooling_type": "MEAN"} or
        {"step_tag_id": ID}, default the checkpoint's own, qwenjax.pooling.PoolerConfig;
        decode_buckets / prefill_buckets: the decode batch sizes and packed prefill token counts
        compiled, e.g. [1, 8] (default: powers of two; the largest a step holds is added).
        vLLM's names work too: ``tensor_parallel_size`` (tp), ``pipeline_parallel_size`` (pp),
        ``gpu_memory_utilization`` (kv_cache_fraction)."""
        for name in sorted(set(engine_options) & set(VLLM_NO_OP_ARGUMENTS)):
            engine_options.pop(name)
            log.info("%s: accepted, no effect here (%s)", name, VLLM_NO_OP_ARGUMENTS[name])
        if "block_size" in engine_options:  # vLLM's name for the KV cache's page size
            engine_options["page_size"] = _alias("page_size", engine_options.get("page_size"), None,
                                                 "block_size", engine_options.pop("block_size"))
        tp = _alias("tp", tp, 1, "tensor_parallel_size", tensor_parallel_size)
        pp = _alias("pp", pp, 1, "pipeline_parallel_size", pipeline_parallel_size)
        kv_cache_fraction = _alias("kv_cache_fraction", kv_cache_fraction, 0.9,
                                   "gpu_memory_utilization", gpu_memory_utilization)
        if isinstance(model, LoadedModel):
            if hf_overrides:
                raise ValueError("hf_overrides: the model is already loaded; pass them to load_model")
            self.lm = model
        else:
            self.lm = load_model(model, tp=tp, pp=pp, dtype=dtype, mesh=mesh, devices=devices,
                                 quantization=quantization, lora_modules=lora_modules,
                                 max_loras=max_loras, max_lora_rank=max_lora_rank,
                                 load_format=load_format, tokenizer=tokenizer,
                                 hf_overrides=hf_overrides, revision=revision,
                                 download_dir=download_dir)
        if chat_template is not None:
            if self.lm.tokenizer is None:
                raise ValueError("chat_template: this model has no tokenizer")
            # A copy: a LoadedModel passed in keeps its own tokenizer.
            self.lm = dataclasses.replace(self.lm, tokenizer=self.lm.tokenizer.with_chat_template(chat_template))
        if warm_up is None:
            warm_up = jax.default_backend() != "cpu"
        self.engine = Engine(self.lm, _engine_config(max_model_len, max_num_seqs, kv_cache_fraction,
                                                     engine_options),
                             warm_up=warm_up, progress=progress)
        self.lm = self.engine.lm  # the engine's own (its LoRA slots change as adapters load)
        # An LLM and its llm_engine step one engine: the ids of the requests a caller is
        # waiting for (generate, stream, LLMEngine), and outputs of others' requests kept until
        # their owner steps (both shared).
        self._owners: set[str] = set()
        self._held: list[RequestOutput] = []

    def _step(self, owns: Callable[[str], bool]) -> list[RequestOutput]:
        """One engine step's outputs (and those held for us) of the requests ``owns`` names;
        those of requests someone else waits for are held for them, the rest (an abandoned
        stream's last output) dropped."""
        mine, others = [], {}
        for output in (*self._held, *self.engine.step()):
            if owns(output.request_id):
                mine.append(output)
            elif output.request_id in self._owners:
                # One held output per sequence: its latest state, with the deltas since.
                key = output.request_id, output.index
                others[key] = others[key].followed_by(output) if key in others else output
        self._held[:] = others.values()
        return mine

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **unused):
        """vLLM's: ``cls(**vars(engine_args))`` (``usage_context`` and the other keywords
        vLLM's takes are unused)."""
        return cls(**vars(engine_args))

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def get_tokenizer(self):
        """vLLM's: the model's tokenizer (qwenjax.tokenizer.Tokenizer; None for a preset with
        random weights)."""
        return self.lm.tokenizer

    def _token_text(self, token_id: int) -> str:
        return self.lm.tokenizer.decode([token_id], skip_special_tokens=False)

    def list_loras(self) -> tuple[str, ...]:
        """The LoRA adapters loaded now."""
        return self.engine.lora_names

    def _lora_request(self, lora: str | LoRARequest | None) -> LoRARequest | None:
        """What ``RequestOutput.lora_request`` reports (vLLM's): the LoRARequest the call was
        given; for an adapter given by name, a LoRARequest of that name and its load number
        (``lora_int_id``; the path is not kept). An adapter not loaded is refused, naming those
        that are."""
        if lora is None or isinstance(lora, LoRARequest):
            return lora
        self.engine.lora_slot(lora)
        return LoRARequest(lora, self.engine.loras.load_id(lora))

    def _lora(self, lora, lora_request) -> LoRARequest | None:
        """The adapter a call runs on (``_lora_request``); a ``LoRARequest`` not loaded yet is
        loaded now."""
        from qwenjax.lora import read_adapter

        lora = _one_lora(lora, lora_request)
        if isinstance(lora, LoRARequest) and lora.lora_name not in self.engine.lora_names:
            self.engine.add_lora(read_adapter(lora.lora_name, lora.lora_path))
        return self._lora_request(lora)

    def _add_owned(self, ids: list[int], params, request_id: str | None,
                   lora: LoRARequest | None, priority: int = 0) -> str:
        """Queue a request on the engine as one its caller steps for (``_step``'s owners)."""
        request_id = self.engine.add_request(ids, params, request_id=request_id, priority=priority,
                                             lora=lora.lora_name if lora is not None else None)
        self._owners.add(request_id)
        return request_id

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``params=None`` means: the model's generation_config.json sampling values
        (e.g. Qwen2.5-Instruct's temperature 0.7, top_p 0.8, top_k 20), else SamplingParams().
        Build variants with ``dataclasses.replace(llm.get_default_sampling_params(), ...)``.
        (With ``params=None`` max_tokens is also capped to the room each prompt leaves.)"""
        return self.engine.default_sampling_params()

    def _fitted(self, ids: list[int], params):
        """``params`` with max_tokens cut to the room ``ids`` leaves (vLLM's offline engine ends
        such a request at the context's end); unchanged where it fits or nothing fits."""
        room = self.engine.context_room(len(ids))
        if isinstance(params, SamplingParams) and room >= max(1, params.min_tokens) \
                and params.max_tokens is not None and params.max_tokens > room:
            return dataclasses.replace(params, max_tokens=room)
        return params  # (max_tokens None: the engine fills the room, Engine.filled)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, Mapping):
            return self._encode(_prompt_of(prompt))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _encode_chat(self, messages: Conversation, tools=None, add_generation_prompt: bool = True,
                     continue_final_message: bool = False, chat_template: str | None = None,
                     template_kwargs: Mapping | None = None) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (and no chat template)")
        return self.tokenizer.encode_chat(list(messages), add_generation_prompt, tools,
                                          continue_final_message, template_kwargs,
                                          chat_template=chat_template)

    def _chat_request(self, messages: Conversation, params: SamplingParams | None, tools,
                      tool_choice: str | None, add_generation_prompt: bool | None,
                      continue_final_message: bool, chat_template: str | None = None,
                      template_kwargs: Mapping | None = None) -> tuple[list[int], SamplingParams]:
        """A conversation's prompt ids and its params (the model's defaults when None; with
        tool_choice "required" or a tool's name, constrained to the call it asks for)."""
        from qwenjax.tool_calls import constraint_source, tool_choice_constraint

        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        ids = self._encode_chat(messages, tools, add_generation_prompt, continue_final_message,
                                chat_template, template_kwargs)
        params = params if params is not None else self.engine.default_sampling_params(len(ids))
        constraint = tool_choice_constraint(tools, tool_choice)
        if constraint is not None:
            if params.structured_outputs is not None:
                raise ValueError(f"{constraint_source(tool_choice)} constrains the output itself; "
                                 "leave SamplingParams.structured_outputs unset")
            params = dataclasses.replace(params, structured_outputs=constraint)
        return ids, params


def _engine_metrics(engine: Engine) -> list:
    """vLLM's ``get_metrics()`` list for ``engine`` (qwenjax/metrics.py)."""
    from qwenjax.metrics import engine_metrics

    scheduler = engine.scheduler
    return engine_metrics(
        engine.stats, num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
        num_preemptions=scheduler.num_preemptions,
        prefix_cache_stats=engine.prefix_cache.stats if engine.prefix_cache is not None else None,
        pages_used=engine.allocator.num_used, pages_total=engine.allocator.num_pages,
        spec_stats=engine.spec_stats if engine.scheduler_config.num_speculative_tokens else None)


def _check_beam_room(prompt_ids, params: BeamSearchParams, max_model_len: int) -> None:
    for ids in prompt_ids:
        if len(ids) + params.max_tokens > max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: "
                             f"over the max context of {max_model_len}")


def _check_tags(tags) -> None:
    unknown = sorted(set(tags or ()) - {"weights", "kv_cache"})
    if unknown:
        raise ValueError(f"wake_up tags are 'weights' and 'kv_cache', got {', '.join(unknown)}")


def _params(params, sampling_params):
    """``params``, or vLLM's keyword for it, ``sampling_params``."""
    if sampling_params is None:
        return params
    if params is not None:
        raise ValueError("give params or sampling_params (vLLM's name), not both")
    return sampling_params


def _one_lora(lora, lora_request):
    if lora is not None and lora_request is not None:
        raise ValueError("give lora or lora_request, not both")
    lora = lora if lora is not None else lora_request
    if lora is not None and not isinstance(lora, (str, LoRARequest)):
        raise TypeError(f"lora must be an adapter name or a LoRARequest, got {type(lora).__name__}")
    return lora


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _prompt_of(prompt: Mapping) -> str | list[int]:
    """The text or token ids of one of vLLM's prompt dicts."""
    unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
    if unknown:
        hint = " (set cache_salt in SamplingParams)" if "cache_salt" in unknown else \
            " (qwenjax serves text models)" if any("multi_modal" in k or k.startswith("mm_") for k in unknown) else ""
        raise ValueError(f"a prompt dict takes 'prompt' or 'prompt_token_ids'; it has "
                         f"{', '.join(map(repr, unknown))}{hint}")
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError("a prompt dict needs one of 'prompt' (text) and 'prompt_token_ids'")
    if "prompt" in prompt:
        if not isinstance(prompt["prompt"], str):
            raise ValueError(f"prompt must be a string, got {type(prompt['prompt']).__name__}")
        return prompt["prompt"]
    ids = prompt["prompt_token_ids"]
    if isinstance(ids, str) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("prompt_token_ids must be a list of ints")
    return list(ids)


def _truncating(params, truncate_prompt_tokens: int | None):
    """``params`` cut to the prompt's last ``truncate_prompt_tokens`` tokens, when given."""
    if truncate_prompt_tokens is None:
        return params
    if isinstance(params, (list, tuple)):  # one per prompt
        return [_truncating(p, truncate_prompt_tokens) for p in params]
    return dataclasses.replace(params, truncate_prompt_tokens=truncate_prompt_tokens)


def _as_conversations(messages) -> list[Conversation]:
    messages = list(messages)
    if messages and isinstance(messages[0], dict):
        return [messages]
    return messages


class LLM(_Base):
    """Synchronous batch generation and streaming over the continuous-batching engine."""

    _ids = itertools.count()
    _profile = None  # the folder start_profile traces into, until stop_profile

    @functools.cached_property
    def llm_engine(self) -> LLMEngine:
        """vLLM's ``llm.llm_engine``: an ``LLMEngine`` over this LLM's model and engine (its
        ``get_tokenizer()``, ``add_request``/``step()``, …). Requests added there are stepped
        there, ``generate``'s and ``stream``'s there (each keeps the other's outputs for it)."""
        return LLMEngine._over(self)

    def add_lora(self, name: str, path: str | os.PathLike) -> None:
        """Load the PEFT adapter at ``path`` as ``name`` into a free LoRA slot (the model needs
        ``max_loras`` slots to spare); ``generate(..., lora=name)`` then uses it."""
        from qwenjax.lora import read_adapter

        self.engine.add_lora(read_adapter(name, path))

    def remove_lora(self, name: str) -> None:
        """Unload adapter ``name``, freeing its slot for another."""
        self.engine.remove_lora(name)

    def sleep(self, level: int = 1) -> None:
        """Hand the device memory of the weights and KV cache back while idle (vLLM's sleep
        mode): level 1 keeps the weights in host memory, level 2 drops them (``update_weights``
        before ``wake_up``)."""
        self.engine.sleep(level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Take the device memory back. ``tags`` (vLLM's "weights", "kv_cache"): both are
        restored together here, so any tags mean all of them."""
        _check_tags(tags)
        self.engine.wake_up()

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prefixes (False while requests are unfinished)."""
        return self.engine.reset_prefix_cache()

    def get_metrics(self) -> list:
        """vLLM's ``LLM.get_metrics()``: the engine's counters and gauges since it started, as
        ``qwenjax.metrics.Counter``/``Gauge`` objects (``name``, ``labels``, ``value``) under
        vLLM's names: ``vllm:prompt_tokens``, ``vllm:generation_tokens``,
        ``vllm:request_success`` (one per ``finished_reason``: stop, length, abort, error),
        ``vllm:num_preemptions``, ``vllm:prefix_cache_queries``/``_hits`` (tokens),
        ``vllm:kv_cache_usage_perc`` (0-1), ``vllm:num_requests_running``/``_waiting``, and
        ``vllm:spec_decode_*`` with speculative decoding. Tokens and requests count per
        sequence (n > 1: n of them)."""
        return _engine_metrics(self.engine)

    def start_profile(self, profile_prefix: str | None = None, *,
                      profile_dir: str | os.PathLike | None = None) -> None:
        """vLLM's ``LLM.start_profile``: trace everything this process does until
        ``stop_profile()`` with ``jax.profiler`` (where vLLM's is torch's) into a new
        timestamped folder (after ``profile_prefix``) under ``profile_dir``, else
        $QWENJAX_PROFILER_DIR, else vLLM's $VLLM_TORCH_PROFILER_DIR (qwenjax/profiling.py)."""
        from qwenjax.profiling import PROFILER_DIR_VARIABLES, profiler_dir, start_trace, trace_folder

        directory = profiler_dir(profile_dir)
        if directory is None:
            raise ValueError("start_profile needs a directory for the trace: pass profile_dir, "
                             f"or set ${' or $'.join(PROFILER_DIR_VARIABLES)}")
        if self._profile is not None:
            raise ValueError(f"a profile is already being written to {self._profile}; "
                             "call stop_profile() first")
        folder = trace_folder(directory, profile_prefix)
        start_trace(folder)
        self._profile = folder

    def stop_profile(self) -> dict:
        """Stop the trace ``start_profile`` began (writing it takes seconds) and describe it:
        ``directory``, ``trace`` (the Perfetto file: ui.perfetto.dev), ``summary`` (where the
        device's time went: busy time, time per kind of work, the top kernels)."""
        from qwenjax.profiling import stop_trace

        if self._profile is None:
            raise ValueError("no profile is running; call start_profile() first")
        folder, self._profile = self._profile, None
        return stop_trace(folder)

    def _pool(self, prompts, params, use_tqdm: bool, lora, lora_request,
              truncate_prompt_tokens: int | None) -> list[RequestOutput]:
        """Each prompt's last output under PoolingParams ``params`` (cut to
        ``truncate_prompt_tokens`` when given)."""
        return self._run([self._encode(p) for p in _as_prompt_list(prompts)],
                         _truncating(params, truncate_prompt_tokens), use_tqdm,
                         lora=self._loras(lora, lora_request))

    def embed(self, prompts: Prompt | Sequence[Prompt], pooling_params=None, *,
              use_tqdm: bool = True, lora: str | LoRARequest | None = None,
              lora_request: LoRARequest | None = None,
              truncate_prompt_tokens: int | None = None) -> list:
        """The embedding of each prompt (vLLM's ``LLM.embed``): the final-normed hidden state of
        its last token, L2-normalized unless ``pooling_params`` (a ``PoolingParams``) says
        otherwise; batched with anything else the engine runs. Returns
        ``EmbeddingRequestOutput``s (``.outputs.embedding``; ``.finished``,
        ``.num_cached_tokens`` as vLLM's). ``truncate_prompt_tokens``: embed each prompt's last
        this-many tokens (-1: as many as the context holds); the other pooling calls take it
        too."""
        from qwenjax.pooling import EmbeddingRequestOutput, PoolingParams

        params = pooling_params if pooling_params is not None else PoolingParams()
        return [EmbeddingRequestOutput.of(o) for o in self._pool(
            prompts, params, use_tqdm, lora, lora_request, truncate_prompt_tokens)]

    def score(self, text_1: Prompt | Sequence[Prompt], text_2: Prompt | Sequence[Prompt], *,
              use_tqdm: bool = True, lora: str | LoRARequest | None = None,
              lora_request: LoRARequest | None = None,
              truncate_prompt_tokens: int | None = None) -> list:
        """vLLM's ``LLM.score`` on an embedding model: the cosine similarity of the embeddings of
        one ``text_1`` and each ``text_2``, or of two lists pairwise (each text cut to its last
        ``truncate_prompt_tokens`` tokens when given). Returns ``ScoringRequestOutput``s
        (``.outputs.score``; ``prompt_token_ids``: both texts' as embedded), one per pair."""
        from qwenjax.pooling import (PoolingParams, ScoringOutput, ScoringRequestOutput, cosine,
                                     score_pairs)

        first, second = _as_prompt_list(text_1), _as_prompt_list(text_2)
        pairs = score_pairs(len(first), len(second))
        outputs = self._pool(first + second, PoolingParams(), use_tqdm, lora, lora_request,
                             truncate_prompt_tokens)
        return [ScoringRequestOutput(f"{outputs[i].request_id}-{outputs[j].request_id}",
                                     outputs[i].prompt_token_ids + outputs[j].prompt_token_ids,
                                     ScoringOutput(cosine(outputs[i].embedding, outputs[j].embedding)),
                                     outputs[i].num_cached_tokens + outputs[j].num_cached_tokens,
                                     outputs[i].finished and outputs[j].finished)
                for i, j in pairs]

    def classify(self, prompts: Prompt | Sequence[Prompt], *, pooling_params=None,
                 use_tqdm: bool = True, lora: str | LoRARequest | None = None,
                 lora_request: LoRARequest | None = None,
                 truncate_prompt_tokens: int | None = None) -> list:
        """Class probabilities of each prompt on a classification checkpoint
        (``Qwen2ForSequenceClassification``; vLLM's ``LLM.classify``): the softmax of its score
        head on the last token. ``pooling_params``: a ``PoolingParams`` (its task is set to
        classify), e.g. ``use_activation=False`` for the raw logits. Returns
        ``ClassificationRequestOutput``s (``.outputs.probs``; the labels are ``llm.labels``)."""
        from qwenjax.pooling import ClassificationRequestOutput

        params = self.engine.pooling_params(pooling_params, "classify")
        return [ClassificationRequestOutput.of(o) for o in self._pool(
            prompts, params, use_tqdm, lora, lora_request, truncate_prompt_tokens)]

    def reward(self, prompts: Prompt | Sequence[Prompt], *, pooling_params=None,
               use_tqdm: bool = True, lora: str | LoRARequest | None = None,
               lora_request: LoRARequest | None = None,
               truncate_prompt_tokens: int | None = None) -> list:
        """The reward of each prompt on a reward checkpoint (``Qwen2ForRewardModel``, e.g.
        Qwen2.5-Math-RM-72B; vLLM's ``LLM.reward``): its score head on the last token.
        ``pooling_params`` as in ``classify`` (its task is set to reward). Returns
        ``PoolingRequestOutput``s (``.outputs.data``: the head's outputs, one for a scalar
        reward)."""
        from qwenjax.pooling import PoolingRequestOutput

        params = self.engine.pooling_params(pooling_params, "reward")
        return [PoolingRequestOutput.of(o) for o in self._pool(
            prompts, params, use_tqdm, lora, lora_request, truncate_prompt_tokens)]

    def encode(self, prompts: Prompt | Sequence[Prompt], pooling_params=None, *,
               pooling_task: str | None = None, use_tqdm: bool = True,
               lora: str | LoRARequest | None = None, lora_request: LoRARequest | None = None,
               truncate_prompt_tokens: int | None = None) -> list:
        """vLLM's ``LLM.encode``: each prompt's pooled output for ``pooling_task`` ("embed",
        "token_embed", "classify", "token_classify", "reward"; default ``pooling_params``'
        task, else the model's own: embed, classify or reward), e.g. "token_embed" for every
        prompt token's embedding or "reward" on a process reward model for each step's
        probabilities. Returns ``PoolingRequestOutput``s (``.outputs.data``: floats, or one
        list per pooled token)."""
        from qwenjax.pooling import PoolingRequestOutput

        params = self.engine.pooling_params(pooling_params, pooling_task)
        return [PoolingRequestOutput.of(o) for o in self._pool(
            prompts, params, use_tqdm, lora, lora_request, truncate_prompt_tokens)]

    @property
    def labels(self) -> tuple[str, ...]:
        """The class labels of a classification checkpoint (``id2label``); () otherwise."""
        head = self.engine.lm.score_head
        return head.labels if head is not None else ()

    def update_weights(self, path: str | os.PathLike) -> None:
        """Serve the weights of the HF checkpoint at ``path`` (same architecture, e.g. a
        trainer's latest step) from now on, without recompiling; the prefix cache is cleared.
        The new weights load beside the old ones (twice the weight memory at the peak)."""
        self.engine.update_weights(path)

    def _loras(self, lora, lora_request):
        """``_lora``, or (given a list: vLLM's one LoRARequest per prompt, None for the base
        model) one per prompt."""
        if not isinstance(lora, (list, tuple)) and not isinstance(lora_request, (list, tuple)):
            return self._lora(lora, lora_request)
        if lora is not None and lora_request is not None:
            raise ValueError("give lora or lora_request, not both")
        return [self._lora(one, None) for one in (lora if lora is not None else lora_request)]

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                 *, use_tqdm: bool = True, priority: int | Sequence[int] | None = None,
                 lora: str | LoRARequest | None = None,
                 lora_request: LoRARequest | None = None,
                 sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """One output per prompt, in prompt order. ``prompts``: a string, a list of strings, a list
        of token ids, or a list of token-id lists (or vLLM's ``{"prompt": …}`` /
        ``{"prompt_token_ids": …}`` dicts); ``params``: one SamplingParams or one per prompt. With
        ``n`` > 1 the prompt's output holds its n sequences as ``outputs`` (``.index`` 0 … n-1;
        its own fields are sequence 0's), as vLLM's. ``priority`` (one, or one per prompt; needs
        scheduling_policy="priority"): lower values are run first. ``lora``: the name of a
        loaded adapter (None: the base model), or a ``LoRARequest`` (vLLM's, also as
        ``lora_request``), loaded into a free slot on first use; or a list of them, one per
        prompt (vLLM's; several adapters in one batch). ``sampling_params``: vLLM's name for
        ``params``.

        As vLLM's offline engine, a ``max_tokens`` larger than the room a prompt leaves in the
        context is cut to that room (the output ends with "length"); only a prompt that fills
        the context by itself is refused. ``max_tokens=None`` (vLLM's) asks for all that room.
        Each output's ``lora_request`` is the adapter it ran on (vLLM's)."""
        return self._run([self._encode(p) for p in _as_prompt_list(prompts)],
                         _params(params, sampling_params), use_tqdm, priority,
                         self._loras(lora, lora_request), fit=True)

    def chat(self, messages: Conversation | Sequence[Conversation], params: SamplingParams | None = None,
             *, use_tqdm: bool = True, tools: Sequence[dict] | None = None,
             tool_choice: str | None = None, add_generation_prompt: bool | None = None,
             continue_final_message: bool = False,
             priority: int | Sequence[int] | None = None,
             lora: str | LoRARequest | None = None,
             lora_request: LoRARequest | None = None,
             sampling_params: SamplingParams | None = None,
             chat_template: str | None = None,
             chat_template_kwargs: Mapping | None = None) -> list[RequestOutput]:
        """``messages``: one conversation (a list of {"role", "content"} dicts) or a list of them.
        ``priority``, ``lora`` (``lora_request``) and ``sampling_params`` as in ``generate``.
        ``chat_template``: a Jinja template (or a file holding one) for this call instead of the
        model's; ``chat_template_kwargs``: more variables for the template (vLLM's).

        ``continue_final_message``: the last message is an assistant turn to go on writing (to
        start the answer yourself, e.g. with "{"); ``add_generation_prompt`` (default: unless
        continuing) opens a new assistant turn after the messages.

        ``tools``: OpenAI-style function definitions, offered through the chat template; read
        the calls in a reply with ``qwenjax.tool_calls.parse_tool_calls(output.text, tools)``.
        ``tool_choice``: "auto" (default), "none", "required" or a tool's name; the last two
        constrain the output (structured outputs) to a list of calls or that one call, and with
        "auto" a tool marked ``"strict": true`` holds the ``<tool_call>`` blocks to its schema."""
        conversations = _as_conversations(messages)
        params = _params(params, sampling_params)
        given = list(params) if isinstance(params, (list, tuple)) else [params] * len(conversations)
        if len(given) != len(conversations):
            raise ValueError(f"got {len(given)} SamplingParams for {len(conversations)} conversations")
        requests = [self._chat_request(c, p, tools, tool_choice, add_generation_prompt,
                                       continue_final_message, chat_template, chat_template_kwargs)
                    for c, p in zip(conversations, given)]
        return self._run([ids for ids, _ in requests], [p for _, p in requests], use_tqdm, priority,
                         self._loras(lora, lora_request), fit=True)

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams, *,
                    lora: str | LoRARequest | None = None,
                    lora_request: LoRARequest | None = None,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: per prompt, the ``params.beam_width`` best sequences
        (``.sequences``, best first: ``tokens`` with the prompt, ``token_ids`` and ``text`` of the
        output, ``cum_logprob``); qwenjax/beam_search.py. Each step runs every live beam as a
        one-token request; the prefix cache keeps their shared prefixes. ``use_tqdm``: vLLM's
        argument, accepted; the search shows no progress bar."""
        from qwenjax.beam_search import beam_search, step_params

        lora = self._lora(lora, lora_request)
        prompt_ids = [self._encode(p) for p in _as_prompt_list(prompts)]
        _check_beam_room(prompt_ids, params, self.engine.max_model_len)

        def top_logprobs(sequences, k):
            return [out.logprobs[0].top
                    for out in self._run(sequences, step_params(k), False, None, lora)]

        return beam_search(prompt_ids, params, top_logprobs, self.engine.eos_token_ids,
                           self.tokenizer)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *,
               chat: bool = False, lora: str | LoRARequest | None = None,
               lora_request: LoRARequest | None = None) -> Iterator[RequestOutput]:
        """Yield one output per new token: ``.delta_text`` is the new text, ``.text`` all of it
        (with ``n`` > 1, of sequence ``.index``). Leaving the loop early aborts the request."""
        ids = self._encode_chat(prompt) if chat else self._encode(prompt)
        lora = self._lora(lora, lora_request)
        request_id = self._add_owned(ids, params, f"stream-{next(self._ids)}", lora)
        finished = False
        try:
            while not finished:
                for output in self._step(request_id.__eq__):
                    finished = output.finished
                    output.lora_request = lora
                    yield output
        finally:
            self._owners.discard(request_id)
            if not finished:
                # Pages are freed now; the abort's final output is dropped by the next step().
                self.engine.abort(request_id)

    def _run(self, prompt_ids: list[list[int]], params, use_tqdm: bool,
             priority: int | Sequence[int] | None = None,
             lora: LoRARequest | None | list[LoRARequest | None] = None,
             fit: bool = False) -> list[RequestOutput]:
        """``lora``: the adapter (``_lora``; None: the base model), or one per prompt. ``fit``:
        cut each max_tokens to the room its prompt leaves in the context."""
        loras = list(lora) if isinstance(lora, list) else [lora] * len(prompt_ids)
        if len(loras) != len(prompt_ids):
            raise ValueError(f"got {len(loras)} LoRA requests for {len(prompt_ids)} prompts")
        names = [one.lora_name if one is not None else None for one in loras]
        for name in set(names):  # an unknown adapter fails before any request is admitted
            self.engine.lora_slot(name)
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompt_ids)
        if len(params_list) != len(prompt_ids):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompt_ids)} prompts")
        priorities = (list(priority) if isinstance(priority, (list, tuple))
                      else [priority or 0] * len(prompt_ids))
        if len(priorities) != len(prompt_ids):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompt_ids)} prompts")
        params_list = [p if p is not None else self.engine.default_sampling_params(len(ids))
                       for ids, p in zip(prompt_ids, params_list)]
        if fit:
            params_list = [self._fitted(ids, p) for ids, p in zip(prompt_ids, params_list)]
        for ids, p, rank in zip(prompt_ids, params_list, priorities):  # fail before any is admitted
            self.engine.validate(ids, p, rank)
        order = {}
        for i, (ids, p, rank) in enumerate(zip(prompt_ids, params_list, priorities)):
            order[self.engine.add_request(ids, p, request_id=f"gen-{next(self._ids)}", priority=rank,
                                          lora=names[i])] = i
        # results[prompt][index]: each sequence's last output.
        results: list[list[RequestOutput | None]] = [[None] * p.n for p in params_list]
        self._owners.update(order)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompt_ids), desc="generating", unit="req")
        try:
            remaining = len(order)
            while remaining:
                for output in self._step(order.__contains__):
                    if output.finish_reason is not None:
                        results[order[output.request_id]][output.index] = output
                    if output.finished:
                        remaining -= 1
                        if bar is not None:
                            bar.update(1)
        finally:
            self._owners.difference_update(order)
            if bar is not None:
                bar.close()
        for sequences, one in zip(results, loras):
            for output in sequences:
                output.lora_request = one
        if self.tokenizer is not None:  # vLLM's RequestOutput.prompt and Logprob.decoded_token
            decode = self._token_text
            for ids, sequences in zip(prompt_ids, results):
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
                for output in sequences:
                    output.prompt = text
                    for entry in (*(output.logprobs or ()), *(output.prompt_logprobs or ())):
                        if entry is not None:
                            entry.decode = decode
        # vLLM's shape: one result per prompt, its ``outputs`` the prompt's n sequences (n > 1: a
        # copy of sequence 0 holding all n, so that results line up with the prompts).
        return [_with_sequences(sequences) for sequences in results]


class _Done:
    """An awaitable that is already done: what a call that finished at once returns to code
    that may ``await`` it."""

    def __await__(self):
        return iter(())


def _with_sequences(sequences: list[RequestOutput]) -> RequestOutput:
    """One prompt's finished result: its only sequence, or (n > 1) sequence 0's with the n as
    ``outputs`` (and ``finished``: sequence 0 may have ended before the others)."""
    return sequences[0] if len(sequences) == 1 else dataclasses.replace(
        sequences[0], sequences=sequences, finished=True)


class _Shaped:
    """One request's outputs as vLLM's ``output_kind`` asks: each with the whole so far
    (CUMULATIVE), with only its new part (DELTA), or none until the request ends, then one
    holding its sequences (FINAL_ONLY; a pooling request's last output is its answer). With
    n > 1 the streamed kinds give each sequence's outputs apart (``.index``), as vLLM's do."""

    def __init__(self, params, lora_request: LoRARequest | None):
        self.kind = getattr(params, "output_kind", RequestOutputKind.CUMULATIVE)
        self.lora_request = lora_request
        self._finals: dict[int, RequestOutput] = {}

    def __call__(self, output: RequestOutput) -> RequestOutput | None:
        output.lora_request = self.lora_request
        if self.kind is RequestOutputKind.FINAL_ONLY:
            if output.finish_reason is not None or output.finished:
                self._finals[output.index] = output
            if not output.finished:
                return None
            return _with_sequences([self._finals[i] for i in sorted(self._finals)])
        return output.as_delta() if self.kind is RequestOutputKind.DELTA else output


class AsyncLLM(_Base):
    """``async for output in llm.generate(prompt, params): ...`` with the engine on its own thread.

    Many coroutines may generate at once; they are batched together. Cancelling a
    consumer (or breaking out of its loop) aborts its request and frees its pages.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from qwenjax.engine.async_engine import EngineThread

        self._thread = EngineThread(self.engine)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                 request_id: str | None = None, *, priority: int = 0,
                 lora: str | LoRARequest | None = None,
                 lora_request: LoRARequest | None = None,
                 sampling_params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """``lora`` (``lora_request``) and ``sampling_params`` as in ``LLM.generate``; the
        arguments in vLLM's order (prompt, sampling params, request id)."""
        ids = self._encode(prompt)
        params = _params(params, sampling_params)
        return self._generate(ids, params or self.engine.default_sampling_params(len(ids)),
                              request_id or uuid.uuid4().hex, priority, _one_lora(lora, lora_request))

    async def embed(self, prompt: Prompt, pooling_params=None, *, priority: int = 0,
                    lora: str | LoRARequest | None = None):
        """The embedding of one prompt (``LLM.embed``), batched with whatever else runs."""
        from qwenjax.pooling import EmbeddingRequestOutput, PoolingParams

        return EmbeddingRequestOutput.of(await self._pooled(prompt, pooling_params or PoolingParams(),
                                                            priority, lora))

    async def classify(self, prompt: Prompt, *, priority: int = 0,
                       lora: str | LoRARequest | None = None):
        """The class probabilities of one prompt on a classification checkpoint (``LLM.classify``)."""
        from qwenjax.pooling import ClassificationRequestOutput, PoolingParams

        return ClassificationRequestOutput.of(await self._pooled(prompt, PoolingParams(task="classify"),
                                                                 priority, lora))

    async def reward(self, prompt: Prompt, *, priority: int = 0,
                     lora: str | LoRARequest | None = None):
        """The reward of one prompt on a reward checkpoint (``LLM.reward``)."""
        from qwenjax.pooling import PoolingParams, PoolingRequestOutput

        return PoolingRequestOutput.of(await self._pooled(prompt, PoolingParams(task="reward"),
                                                          priority, lora))

    async def encode(self, prompt: Prompt, pooling_params=None, *, pooling_task: str | None = None,
                     priority: int = 0, lora: str | LoRARequest | None = None):
        """One prompt's pooled output for ``pooling_task`` (``LLM.encode``)."""
        from qwenjax.pooling import PoolingRequestOutput

        params = self.engine.pooling_params(pooling_params, pooling_task)
        return PoolingRequestOutput.of(await self._pooled(prompt, params, priority, lora))

    async def _pooled(self, prompt: Prompt, pooling, priority: int, lora):
        """The last output of a pooling request for ``prompt``."""
        async for output in self._generate(self._encode(prompt), pooling, uuid.uuid4().hex,
                                           priority, _one_lora(lora, None)):
            if output.finished:
                return output

    async def _generate(self, ids, params, request_id, priority, lora):
        name = await self._resolve_lora(lora)
        lora_request = self._lora_request(lora)
        shaped = _Shaped(params, lora_request)
        async with contextlib.aclosing(self._thread.generate(ids, params, request_id, priority,
                                                             name)) as outputs:
            async for output in outputs:
                output = shaped(output)
                if output is not None:
                    yield output

    def chat(self, messages: Conversation, params: SamplingParams | None = None, *,
             request_id: str | None = None, tools: Sequence[dict] | None = None,
             tool_choice: str | None = None, add_generation_prompt: bool | None = None,
             continue_final_message: bool = False, priority: int = 0,
             lora: str | LoRARequest | None = None,
             lora_request: LoRARequest | None = None,
             sampling_params: SamplingParams | None = None,
             chat_template: str | None = None,
             chat_template_kwargs: Mapping | None = None) -> AsyncIterator[RequestOutput]:
        """One conversation; the other arguments as in ``LLM.chat``."""
        ids, params = self._chat_request(messages, _params(params, sampling_params), tools,
                                         tool_choice, add_generation_prompt, continue_final_message,
                                         chat_template, chat_template_kwargs)
        return self._generate(ids, params, request_id or uuid.uuid4().hex, priority,
                              _one_lora(lora, lora_request))

    def abort(self, request_id: str | Sequence[str]) -> _Done:
        """Abort one request or several, at once; awaiting the result (vLLM's ``await
        engine.abort(...)``) works too."""
        for one in [request_id] if isinstance(request_id, str) else request_id:
            self._thread.abort(one)
        return _Done()

    async def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams, *,
                          lora: str | LoRARequest | None = None) -> list[BeamSearchOutput]:
        """``LLM.beam_search`` on the engine thread: each step's beams run as concurrent
        one-token requests, beside whatever else this AsyncLLM is generating."""
        from qwenjax.beam_search import BeamSearch, run_concurrently

        lora = await self._resolve_lora(lora)
        prompt_ids = [self._encode(p) for p in _as_prompt_list(prompts)]
        _check_beam_room(prompt_ids, params, self.engine.max_model_len)
        search = BeamSearch(prompt_ids, params, self.engine.eos_token_ids)
        step = search.step_params()

        async def top(ids):
            outputs = [o async for o in self._thread.generate(ids, step, uuid.uuid4().hex, 0, lora)]
            return outputs[-1].logprobs[0].top

        await run_concurrently(search, top)
        return search.decoded(self.tokenizer)

    async def _resolve_lora(self, lora) -> str | None:
        """The adapter name a call runs on; a ``LoRARequest`` not loaded yet is loaded now."""
        if isinstance(lora, LoRARequest):
            if lora.lora_name not in self.engine.lora_names:
                await self.add_lora(lora.lora_name, lora.lora_path)
            return lora.lora_name
        return lora

    async def add_lora(self, name: str, path: str | os.PathLike) -> None:
        """Load the PEFT adapter at ``path`` as ``name`` into a free LoRA slot while serving
        (the model needs ``max_loras`` slots to spare); requests may use it once this returns."""
        await self._thread.add_lora(name, path)

    async def remove_lora(self, name: str) -> None:
        """Unload adapter ``name`` (refused while a request still uses it)."""
        await self._thread.remove_lora(name)

    async def sleep(self, level: int = 1) -> None:
        """``LLM.sleep`` between two steps (refused while requests are unfinished)."""
        await self._thread.sleep(level)

    async def wake_up(self, tags: Sequence[str] | None = None) -> None:
        _check_tags(tags)
        await self._thread.wake_up()

    async def reset_prefix_cache(self) -> bool:
        return await self._thread.reset_prefix_cache()

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True,
                               wait_for_inflight_requests: bool | None = None) -> None:
        """vLLM's: no more steps until ``resume_generation()`` (e.g. while a trainer syncs
        weights); requests sent meanwhile wait. ``mode`` "abort" ends the unfinished requests
        now (their streams end with finish_reason "abort"), "wait" returns once they have
        finished, "keep" holds them to go on after the resume. ``clear_cache``: forget the prefix
        cache and the kept requests' K/V (they recompute on resume). ``Engine.pause``.
        ``wait_for_inflight_requests=True`` (vLLM's older switch) is mode "wait"."""
        await self._thread.pause("wait" if wait_for_inflight_requests else mode, clear_cache)

    async def resume_generation(self) -> None:
        await self._thread.resume()

    async def is_paused(self) -> bool:
        return self._thread.paused

    async def update_weights(self, path: str | os.PathLike) -> None:
        """Serve the weights of the HF checkpoint at ``path`` from the next step on: loaded
        while requests keep running, swapped in between two steps; running requests are then
        recomputed under them (``Engine.set_weights``)."""
        await self._thread.update_weights(path)

    def shutdown(self) -> None:
        self._thread.shutdown()


class EngineArgs:
    """vLLM's ``EngineArgs``/``AsyncEngineArgs``: the model and the arguments ``LLM(...)`` takes,
    for ``LLMEngine.from_engine_args`` (and ``LLM``'s, ``AsyncLLM``'s): ``EngineArgs(model=DIR,
    tensor_parallel_size=4, max_num_seqs=32)``. The arguments are attributes too."""

    def __init__(self, model: str | os.PathLike | None = None, **kwargs):
        self.model = model
        self.__dict__.update(kwargs)

    def __repr__(self) -> str:
        return f"EngineArgs({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


AsyncEngineArgs = EngineArgs
AsyncLLMEngine = AsyncLLM  # vLLM's older name (its v1 AsyncLLMEngine is AsyncLLM)


class LLMEngine(_Base):
    """vLLM's step-by-step engine: ``add_request`` as requests come, ``step()`` while
    ``has_unfinished_requests()``; each step returns the outputs it produced (as
    ``SamplingParams.output_kind`` asks: by default each unfinished sequence's whole output so
    far; with n > 1 each sequence's apart, ``.index`` naming it). The constructor takes what
    ``LLM(...)`` takes; ``LLMEngine.from_engine_args(EngineArgs(model=..., ...))`` as vLLM's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._outputs: dict[str, tuple[_Shaped, str | None]] = {}  # request id → its shaping, prompt

    @classmethod
    def _over(cls, llm: _Base) -> LLMEngine:
        """An LLMEngine over ``llm``'s model and engine (``LLM.llm_engine``)."""
        view = cls.__new__(cls)
        view.lm, view.engine, view._outputs = llm.lm, llm.engine, {}
        view._owners, view._held = llm._owners, llm._held
        return view

    def add_request(self, request_id: str, prompt: Prompt, params=None,
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                    priority: int = 0, **unused) -> str:
        """Queue ``prompt`` (text, token ids, or vLLM's prompt dicts) under ``request_id`` with
        ``params`` (SamplingParams, PoolingParams; None: the model's defaults). As in
        ``LLM.generate``, a max_tokens larger than the room the prompt leaves is cut to it.
        vLLM's tokenization_kwargs and trace_headers are accepted and unused; prompt_text is
        the outputs' ``prompt``; arrival_time is the time of this call."""
        unknown = sorted(set(unused) - {"tokenization_kwargs", "trace_headers", "prompt_text"})
        if unknown:
            raise TypeError(f"add_request() got unexpected keyword arguments {', '.join(unknown)}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        ids = self._encode(prompt)
        lora = self._lora(None, lora_request)
        if params is None:
            params = self.engine.default_sampling_params(len(ids))
        elif isinstance(params, SamplingParams):
            params = self._fitted(ids, params)
        text = unused.get("prompt_text") or (prompt if isinstance(prompt, str) else (
            self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None else None))
        self._add_owned(ids, params, request_id, lora, priority)
        self._outputs[request_id] = (_Shaped(params, lora), text)
        return request_id

    def step(self) -> list[RequestOutput]:
        """Run one engine step; the outputs of the requests added here that it produced."""
        results = []
        for output in self._step(self._outputs.__contains__):
            shaped, prompt = self._outputs[output.request_id]
            if output.finished:
                del self._outputs[output.request_id]
                self._owners.discard(output.request_id)
            output.prompt = prompt
            if self.tokenizer is not None:  # vLLM's Logprob.decoded_token
                for logprob in (*(output.delta_logprobs or ()), *(output.prompt_logprobs or ())):
                    if logprob is not None:
                        logprob.decode = self._token_text
            output = shaped(output)
            if output is not None:
                results.append(output)
        return results

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Abort requests now (their pages are freed); their last outputs (finish_reason
        "abort") come from the next ``step()``."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.engine.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self._outputs)

    def get_metrics(self) -> list:
        """As ``LLM.get_metrics()``."""
        return _engine_metrics(self.engine)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load the adapter now (vLLM's; ``add_request`` with a LoRARequest loads it too)."""
        self._lora(None, lora_request)
        return True

    def remove_lora(self, lora: str | LoRARequest) -> bool:
        self.engine.remove_lora(lora.lora_name if isinstance(lora, LoRARequest) else lora)
        return True

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()
