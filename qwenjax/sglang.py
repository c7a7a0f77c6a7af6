"""SGLang's offline engine, for code written against ``sglang.Engine``:

    import qwenjax.sglang as sgl
    llm = sgl.Engine(model_path="/models/Qwen2.5-7B-Instruct", tp_size=4)
    out = llm.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 16})
    out["text"], out["meta_info"]["finish_reason"]

``sampling_params`` takes SGLang's names (``max_new_tokens``, default 128; ``min_new_tokens``,
``no_stop_trim``, ``sampling_seed``, ``json_schema``/``regex``/``ebnf``, …), as the server's
native ``/generate`` does (server/sglang_api.py uses the translation here); a field qwenjax
does not have is refused by name. Answers are SGLang's dicts: ``{"text", "output_ids",
"meta_info"}``, a list for a batch of prompts or n > 1.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

from qwenjax.sampling import check_fields, is_int
from qwenjax.structured import StructuredOutputs

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 128  # SGLang's default max_new_tokens
# SGLang sampling_params name → SamplingParams field, for those that map one to one.
_SAMPLING = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
             "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
             "repetition_penalty": "repetition_penalty", "n": "n", "ignore_eos": "ignore_eos",
             "skip_special_tokens": "skip_special_tokens", "stop_token_ids": "stop_token_ids",
             "no_stop_trim": "include_stop_str_in_output", "sampling_seed": "seed"}
_STRUCTURED = {"json_schema": "json", "regex": "regex", "ebnf": "grammar",
               "structural_tag": "structural_tag"}
# Accepted, changing nothing here: how often a stream is flushed.
_IGNORED = ("stream_interval",)
SAMPLING_FIELDS = frozenset((*_SAMPLING, *_STRUCTURED, *_IGNORED, "stop", "stop_regex", "logit_bias",
                             "spaces_between_special_tokens"))


def sampling_fields(params: Any) -> dict[str, Any]:
    """SamplingParams fields of SGLang's ``sampling_params``; ValueError naming a bad one."""
    params = check_fields(params, SAMPLING_FIELDS, "sampling_params", "sampling_params")
    fields = {field: params[name] for name, field in _SAMPLING.items() if name in params}
    if fields.get("top_k") == -1:
        fields["top_k"] = 0
    for name in ("stop", "stop_regex"):
        stop = params.get(name)
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise ValueError(f"sampling_params.{name} must be a string or a list of strings")
            if stop:
                fields[name] = tuple(stop)
    if "stop_token_ids" in fields:
        ids = fields["stop_token_ids"]
        if not isinstance(ids, list) or not all(is_int(t) for t in ids):
            raise ValueError("sampling_params.stop_token_ids must be a list of token ids")
        fields["stop_token_ids"] = tuple(ids)
    if "logit_bias" in params:
        bias = params["logit_bias"]
        if not isinstance(bias, Mapping):
            raise ValueError("sampling_params.logit_bias must be an object of token id → bias")
        try:
            fields["logit_bias"] = {int(k): v for k, v in bias.items()}
        except ValueError:
            raise ValueError("sampling_params.logit_bias keys must be token ids") from None
    if params.get("spaces_between_special_tokens", True) is not True:
        raise ValueError("sampling_params.spaces_between_special_tokens: only true (Qwen2.5's "
                         "byte-level tokenizer has no spaces to add)")
    given = [name for name in _STRUCTURED if name in params]
    if len(given) > 1:
        raise ValueError(f"sampling_params: set one of {', '.join(given)}")
    if given:
        name = given[0]
        spec = params[name]
        if not isinstance(spec, str):
            raise ValueError(f"sampling_params.{name} must be a string")
        if name == "ebnf":
            spec = _ebnf_to_lark(spec)
        try:
            fields["structured_outputs"] = StructuredOutputs(**{_STRUCTURED[name]: spec})
        except ValueError as error:
            raise ValueError(f"sampling_params.{name}: {error}") from None
    return fields


def hidden_state_lists(output) -> list:
    """An output's ``hidden_states`` as SGLang's meta_info has them: the prompt's rows as one
    list of lists, then one list per generated token but the last."""
    rows, prompt_length = output.hidden_states.tolist(), len(output.prompt_token_ids)
    return [rows[:prompt_length], *rows[prompt_length:]]


def _ebnf_to_lark(grammar: str) -> str:
    """SGLang's EBNF (GBNF: ``root ::= …``) in llguidance's Lark dialect, which qwenjax's
    grammars use."""
    from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

    try:
        return gbnf_to_lark(grammar)
    except (GbnfToLarkError, ValueError, IndexError, KeyError) as error:
        raise ValueError(f"sampling_params.ebnf is not a grammar qwenjax reads: {error}") from None


def finish_reason(output, max_tokens: int) -> dict[str, Any] | None:
    """SGLang's meta_info.finish_reason of a sequence's output (None while it runs)."""
    reason = output.finish_reason
    if reason is None:
        return None
    if reason == "length":
        return {"type": "length", "length": max_tokens}
    if reason == "stop":
        return {"type": "stop", "matched": output.matched_stop}
    return {"type": "abort", "message": output.error or "the request was aborted"}



# SGLang's Engine (server) arguments under qwenjax's LLM names.
ENGINE_ARGUMENTS = {"model_path": "model", "tp_size": "tp", "pp_size": "pp",
                    "context_length": "max_model_len", "mem_fraction_static": "kv_cache_fraction",
                    "max_running_requests": "max_num_seqs", "random_seed": "seed",
                    "chunked_prefill_size": "prefill_chunk", "tokenizer_path": "tokenizer",
                    "max_loras_per_batch": "max_loras", "json_model_override_args": "hf_overrides",
                    "cuda_graph_bs": "decode_buckets"}
# Accepted, asking for nothing qwenjax does otherwise.
NO_OP_ARGUMENTS = frozenset(("log_level", "trust_remote_code", "disable_cuda_graph",
                             "enable_memory_saver", "attention_backend", "grammar_backend",
                             "enable_metrics", "cuda_graph_max_bs", "disable_overlap_schedule",
                             "enable_return_hidden_states"))


def _prompts(prompt, input_ids) -> tuple[list, bool]:
    """(prompts, whether a batch was given): text or token ids, one or a list."""
    if (prompt is None) == (input_ids is None):
        raise ValueError("give one of prompt (text) and input_ids")
    if prompt is not None:
        if isinstance(prompt, str):
            return [prompt], False
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return list(prompt), True
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if isinstance(input_ids, list) and input_ids and all(is_int(t) for t in input_ids):
        return [list(input_ids)], False
    if isinstance(input_ids, list) and input_ids and all(
            isinstance(p, list) and p and all(is_int(t) for t in p) for p in input_ids):
        return [list(p) for p in input_ids], True
    raise ValueError("input_ids must be a non-empty list of token ids, or a list of them")


def _per_prompt(value, count: int, name: str) -> list:
    values = value if isinstance(value, list) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} prompts")
    return values


def _lora_paths(value) -> dict[str, str]:
    """SGLang's lora_paths: a list (or one) of "name=path", a path (its own name), or
    ``{"lora_name", "lora_path"}``; or a mapping name → path."""
    if isinstance(value, Mapping) and "lora_path" not in value:
        return dict(value)
    modules = {}
    for item in [value] if isinstance(value, (str, Mapping)) else value:
        if isinstance(item, Mapping):
            name, path = item.get("lora_name"), item.get("lora_path")
        elif isinstance(item, str):
            name, _, path = item.partition("=") if "=" in item else (item, "", item)
        else:
            name = path = None
        if not name or not path:
            raise ValueError(f"lora_paths: {item!r} is neither NAME=PATH, a path, nor "
                             '{"lora_name": …, "lora_path": …}')
        modules[name] = path
    return modules


def _embedding(values, prompt_tokens: int) -> dict[str, Any]:
    """SGLang's answer to encode: ``{"embedding", "meta_info"}``."""
    return {"embedding": [float(v) for v in values],
            "meta_info": {"id": uuid.uuid4().hex, "prompt_tokens": prompt_tokens}}


@dataclasses.dataclass
class _Job:
    """One generate call: its prompts' token ids, SamplingParams, request ids and adapters, and
    how its answers are shaped."""

    ids: list[list[int]]
    params: list
    rids: list[str]
    loras: list
    prompt_only: list[bool]
    shape: dict[str, Any]
    batched: bool

    def requests(self) -> Iterator[tuple]:
        return zip(self.rids, self.ids, self.params, self.loras)

    def answer(self, engine: Engine, output, i: int) -> dict[str, Any]:
        return engine._answer(output, self.rids[i], self.params[i], self.prompt_only[i], self.shape)

    def answers(self, engine: Engine, sequences: list[list]):
        """The call's answer from each prompt's finished sequences: a dict, or a list of them
        (a batch of prompts, or n > 1)."""
        answers = [self.answer(engine, sequence, i)
                   for i, outputs in enumerate(sequences) for sequence in outputs]
        return answers if self.batched or self.params[0].n > 1 else answers[0]


async def _all_or_none(calls) -> list:
    """Each call's result; when one fails, the others are cancelled (their requests aborted)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


class _Driver:
    """Steps an LLM's engine on a worker thread while coroutines wait for their requests
    (``Engine.async_generate``). Requests are added and aborted between steps, on that thread."""

    def __init__(self, llm):
        self.llm = llm
        self.queues: dict[str, asyncio.Queue] = {}
        self.adds: list[tuple] = []
        self.aborts: list[str] = []
        self.task: asyncio.Task | None = None
        # One step at a time, even when an event loop closed under a step still running.
        self.lock = threading.Lock()

    def _submit(self, rid: str, ids, params, lora) -> asyncio.Queue:
        if rid in self.queues or rid in self.llm._owners:
            raise ValueError(f"rid {rid!r} is already running")
        queue = self.queues[rid] = asyncio.Queue()
        self.adds.append((rid, ids, params, lora))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._drive())
        return queue

    async def stream(self, rid: str, ids, params, lora) -> AsyncIterator:
        """The request's outputs as they come (with n > 1, every sequence's)."""
        queue, finished = self._submit(rid, ids, params, lora), False
        try:
            while not finished:
                output = await queue.get()
                if isinstance(output, BaseException):
                    raise output
                finished = output.finished
                yield output
        finally:
            if not finished and rid in self.queues:
                self.aborts.append(rid)

    async def final(self, rid: str, ids, params, lora) -> list:
        """The request's finished sequences, by index."""
        ends = {}
        async for output in self.stream(rid, ids, params, lora):
            if output.finish_reason is not None:
                ends[output.index] = output
        return [ends[i] for i in sorted(ends)]

    async def _drive(self):
        while self.queues:
            adds, self.adds, aborts, self.aborts = self.adds, [], self.aborts, []
            try:
                results = await asyncio.to_thread(self._step, adds, aborts, set(self.queues))
            except Exception as error:  # the engine failed: every waiting caller hears of it
                log.exception("engine step failed")
                results = [(rid, error) for rid in self.queues]
                self.adds = []  # (submitted during the step: failed with the rest)
                await asyncio.to_thread(self._abort, list(self.queues))
            for rid, result in results:
                queue = self.queues.get(rid)
                if queue is None:
                    continue
                queue.put_nowait(result)
                if isinstance(result, BaseException) or result.finished:
                    del self.queues[rid]
                    self.llm._owners.discard(rid)
                    if rid in self.aborts:  # a caller that left as it finished: nothing to stop
                        self.aborts.remove(rid)

    def _abort(self, rids: list[str]) -> None:
        with self.lock:
            for rid in rids:
                self.llm.engine.abort(rid)

    def _step(self, adds, aborts, waiting: set[str]) -> list[tuple]:
        with self.lock:
            return self._locked_step(adds, aborts, waiting)

    def _locked_step(self, adds, aborts, waiting: set[str]) -> list[tuple]:
        results = []
        for rid, ids, params, lora in adds:
            try:
                self.llm._add_owned(ids, params, rid, self.llm._lora(lora, None))
            except Exception as error:  # refused: its caller hears why
                results.append((rid, error))
        for rid in aborts:
            self.llm.engine.abort(rid)
        return results + [(output.request_id, output)
                          for output in self.llm._step(waiting.__contains__)]


class Engine:
    """SGLang's ``sglang.Engine`` over qwenjax's ``LLM``: ``Engine(model_path=..., tp_size=...)``
    takes SGLang's argument names (``context_length``, ``mem_fraction_static``,
    ``max_running_requests``, ``random_seed``, ``chunked_prefill_size``, ``page_size``,
    ``disable_radix_cache``, ``lora_paths``, ``dtype``, ``quantization``, ``kv_cache_dtype``,
    …) or LLM's own."""

    def __init__(self, **kwargs):
        from qwenjax.llm import LLM

        options: dict[str, Any] = {}
        for name, value in kwargs.items():
            if name in NO_OP_ARGUMENTS:
                continue
            if name == "disable_radix_cache":
                options["enable_prefix_caching"] = not value
            elif name == "lora_paths":
                options["lora_modules"] = _lora_paths(value)
            elif name == "json_model_override_args" and isinstance(value, str):
                try:
                    options["hf_overrides"] = json.loads(value)
                except json.JSONDecodeError as error:
                    raise ValueError(f"json_model_override_args is not JSON: {error}") from None
            else:
                options[ENGINE_ARGUMENTS.get(name, name)] = value
        self.llm = LLM(**options)
        self._driver: _Driver | None = None  # async_generate's, made on its first call

    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
                 lora_path: str | list[str | None] | None = None, stream: bool = False,
                 rid: str | list[str] | None = None, return_text_in_logprobs: bool = False,
                 return_hidden_states: bool = False):
        """SGLang's answers: for one prompt a dict ``{"text", "output_ids", "meta_info"}``
        (``meta_info``: ``id``, ``finish_reason`` as ``{"type": "stop", "matched": …}`` or
        ``{"type": "length", "length": …}``, ``prompt_tokens``, ``completion_tokens``,
        ``cached_tokens``, ``e2e_latency``; with ``return_logprob``, ``output_token_logprobs``
        as ``[logprob, token_id, text or None]``, ``output_top_logprobs`` and, from
        ``logprob_start_len``, ``input_token_logprobs``); a list of them for a list of prompts
        or n > 1 (prompt by prompt). ``stream``: one prompt's answers as it goes (``text``
        cumulative, as SGLang's). ``max_new_tokens`` 0 gives the prompt alone (nothing
        generated; with ``return_logprob``, its logprobs). ``return_hidden_states``: the last
        answer's ``meta_info["hidden_states"]`` holds the final-normed hidden states, SGLang's
        way: the prompt's rows as one list of lists, then one list per generated token but the
        last."""
        job = self._job(prompt, sampling_params, input_ids, stream, rid, lora_path,
                        dict(return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                             top_logprobs_num=top_logprobs_num,
                             return_text_in_logprobs=return_text_in_logprobs,
                             return_hidden_states=return_hidden_states))
        if stream:
            return self._stream(job)
        results = self.llm.generate(job.ids, job.params, use_tqdm=False, lora=job.loras)
        return job.answers(self, [result.outputs for result in results])

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None,
                             return_logprob: bool = False, logprob_start_len: int | None = None,
                             top_logprobs_num: int | None = None,
                             lora_path: str | list[str | None] | None = None, stream: bool = False,
                             rid: str | list[str] | None = None,
                             return_text_in_logprobs: bool = False,
                             return_hidden_states: bool = False):
        """``generate`` from a coroutine: ``await engine.async_generate(...)`` gives its answers;
        with ``stream``, an async iterator of them (``async for chunk in await
        engine.async_generate(..., stream=True)``), as SGLang's. Calls made at once share the
        engine's batches; the engine steps on a worker thread, so the event loop keeps running.
        Cancelling a caller, or leaving a stream early, aborts its request. (Not to be mixed
        with ``generate`` at the same time: both step the one engine.)"""
        job = self._job(prompt, sampling_params, input_ids, stream, rid, lora_path,
                        dict(return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                             top_logprobs_num=top_logprobs_num,
                             return_text_in_logprobs=return_text_in_logprobs,
                             return_hidden_states=return_hidden_states))
        if self._driver is None:
            self._driver = _Driver(self.llm)
        if stream:
            return self._async_stream(job)
        return job.answers(self, await _all_or_none(self._driver.final(*request)
                                                    for request in job.requests()))

    def _job(self, prompt, sampling_params, input_ids, stream: bool, rid, lora_path,
             answer: dict[str, Any]) -> _Job:
        """A generate call's prompts, SamplingParams and answer shape (``answer``: generate's
        return_* arguments); ValueError naming a bad argument."""
        start = time.monotonic()
        return_logprob, logprob_start_len = answer["return_logprob"], answer["logprob_start_len"]
        top_logprobs_num = answer["top_logprobs_num"]
        prompts, batched = _prompts(prompt, input_ids)
        count = len(prompts)
        ids = [self.llm._encode(p) for p in prompts]
        given = _per_prompt(sampling_params or {}, count, "sampling_params")
        fields = [sampling_fields(p) for p in given]
        prompt_only = [f.get("max_tokens") == 0 for f in fields]
        engine = self.llm.engine
        for f, p, only in zip(fields, ids, prompt_only):
            if only:
                if f.get("min_tokens"):
                    raise ValueError("sampling_params.min_new_tokens must be 0 with max_new_tokens 0")
                f["max_tokens"] = 1  # (the one token it runs with is left out of the answer)
            elif "max_tokens" not in f:
                f["max_tokens"] = max(1, min(MAX_NEW_TOKENS, engine.context_room(len(p))))
            if answer["return_hidden_states"]:
                f["return_hidden_states"] = True
            if return_logprob:
                f["logprobs"] = top_logprobs_num or 0
                if logprob_start_len is not None and logprob_start_len >= 0:
                    if logprob_start_len >= len(p):
                        raise ValueError(f"logprob_start_len ({logprob_start_len}) must be less "
                                         f"than the prompt's {len(p)} tokens")
                    f["prompt_logprobs"] = top_logprobs_num or 0
        # (A max_new_tokens past the room the prompt leaves is cut to it, as LLM.generate does;
        # finish_reason's length then says the cut one.)
        params = [self.llm._fitted(p, engine.sampling_params(f, len(p))) for f, p in zip(fields, ids)]
        rids = [r or uuid.uuid4().hex for r in _per_prompt(rid, count, "rid")]
        if len(set(rids)) != len(rids):
            raise ValueError("rid: each prompt of a batch needs its own")
        loras = _per_prompt(lora_path, count, "lora_path")
        shape = dict(return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                     top=bool(top_logprobs_num), with_text=answer["return_text_in_logprobs"],
                     start=start)
        if stream and count != 1:
            raise ValueError("stream takes one prompt")
        return _Job(ids, params, rids, loras, prompt_only, shape, batched)

    def _stream(self, job: _Job) -> Iterator[dict]:
        for output in self.llm.stream(job.ids[0], job.params[0], lora=job.loras[0]):
            yield job.answer(self, output, 0)

    async def _async_stream(self, job: _Job) -> AsyncIterator[dict]:
        async with contextlib.aclosing(self._driver.stream(*next(job.requests()))) as outputs:
            async for output in outputs:
                yield job.answer(self, output, 0)

    def _answer(self, output, rid: str, params, prompt_only: bool, shape) -> dict[str, Any]:
        tokenizer = self.llm.get_tokenizer()

        def entry(logprob, token_id):
            text = tokenizer.decode([token_id], skip_special_tokens=False) \
                if shape["with_text"] and tokenizer is not None else None
            return [logprob, token_id, text]

        done = output.finish_reason is not None
        meta = {"id": rid,
                "finish_reason": finish_reason(output, 0 if prompt_only else params.max_tokens),
                "prompt_tokens": len(output.prompt_token_ids),
                "completion_tokens": 0 if prompt_only else len(output.token_ids),
                "cached_tokens": output.num_cached_tokens,
                "e2e_latency": time.monotonic() - shape["start"] if done else None}
        if params.n > 1:
            meta["index"] = output.index  # which of the n samples (streams interleave them)
        if shape["return_logprob"]:
            generated = [] if prompt_only else (output.logprobs or [])
            meta["output_token_logprobs"] = [entry(lp.logprob, lp.token_id) for lp in generated]
            if shape["top"]:
                meta["output_top_logprobs"] = [[entry(v, t) for t, v in lp.top] for lp in generated]
            begin = shape["logprob_start_len"]
            if begin is not None and begin >= 0 and output.prompt_logprobs is not None:
                ids = output.prompt_token_ids
                scored = list(enumerate(output.prompt_logprobs))[begin:]
                meta["input_token_logprobs"] = [entry(None if lp is None else lp.logprob, ids[position])
                                                for position, lp in scored]
                if shape["top"]:
                    meta["input_top_logprobs"] = [None if lp is None else [entry(v, t) for t, v in lp.top]
                                                  for _, lp in scored]
        if output.hidden_states is not None:
            meta["hidden_states"] = hidden_state_lists(output)
        return {"text": "" if prompt_only else output.text,
                "output_ids": [] if prompt_only else list(output.token_ids), "meta_info": meta}

    def encode(self, prompt: str | list[str] | None = None,
               input_ids: list[int] | list[list[int]] | None = None):
        """SGLang's: ``{"embedding", "meta_info"}`` (a list for a list of prompts): the last
        token's normalized hidden state, as ``LLM.embed``."""
        prompts, batched = _prompts(prompt, input_ids)
        answers = [_embedding(out.outputs.embedding, len(out.prompt_token_ids))
                   for out in self.llm.embed(prompts, use_tqdm=False)]
        return answers if batched else answers[0]

    async def async_encode(self, prompt: str | list[str] | None = None,
                           input_ids: list[int] | list[list[int]] | None = None):
        """``encode`` from a coroutine, batched with the ``async_generate`` calls running."""
        from qwenjax.pooling import PoolingParams

        prompts, batched = _prompts(prompt, input_ids)
        ids = [self.llm._encode(p) for p in prompts]
        if self._driver is None:
            self._driver = _Driver(self.llm)
        ends = await _all_or_none(self._driver.final(uuid.uuid4().hex, p, PoolingParams(), None)
                                  for p in ids)
        answers = [_embedding(out.embedding, len(p)) for (out,), p in zip(ends, ids)]
        return answers if batched else answers[0]

    def flush_cache(self) -> bool:
        """Forget the cached prefixes (False while requests are unfinished)."""
        return self.llm.reset_prefix_cache()

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """The weights' and KV cache's device memory handed back while idle (the weights wait in
        host memory: ``LLM.sleep(1)``); whatever ``tags`` say, both go and return together."""
        self.llm.sleep(1)

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        self.llm.wake_up()

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None
                                 ) -> tuple[bool, str]:
        """Serve the weights of the checkpoint at ``model_path`` (same architecture) from now
        on; SGLang's answer ``(success, message)`` (the old weights stay on failure)."""
        try:
            self.llm.update_weights(model_path)
        except (ValueError, FileNotFoundError) as error:
            return False, str(error)
        return True, "Succeeded to update model weights."

    def shutdown(self) -> None:
        """Nothing to stop: the engine lives in this process (SGLang's runs in others)."""
