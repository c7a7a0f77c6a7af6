"""OpenAI API JSON ↔ engine objects, for ``/v1/completions`` and ``/v1/chat/completions``.

Pure functions and small state machines; no HTTP, no event loop (``server.openai_api``
serves them). Field names, defaults and response shapes follow the OpenAI API; vLLM's extra
sampling fields (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, ``structured_outputs`` and its older ``guided_*`` names, …) are accepted
as vLLM accepts them, so a client written for a vLLM server works unchanged.

A field this server does not know is refused naming it, rather than ignored: ignoring a
sampling option the client relies on would produce output it did not ask for. A few fields
that change nothing here (``user``, ``store``, ``metadata``, …) are accepted and dropped.
``null`` means unset for every field. Every rejection is a ``ValueError`` naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from typing import Any, Mapping, Sequence

import regex

from qwenjax.engine.request import RequestOutput
from qwenjax.reasoning import ReasoningStream, held_back, split_reasoning
from qwenjax.sampling import check_fields, is_int  # noqa: F401 (check_fields: proto.check_fields)
from qwenjax.structured import StructuredOutputs
from qwenjax.tokenizer import check_tools
from qwenjax.tool_calls import TAG as _TAG
from qwenjax.tool_calls import (CallScanner, ToolCall, constraint_source, parse_tool_calls,
                                tool_choice_constraint)

MAX_PROMPTS = 256      # prompts of one /v1/completions request (each runs as its own request)
COMPLETION_MAX_TOKENS = 16  # /v1/completions' default max_tokens (OpenAI's and vLLM's)
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; a banned token's logprob is reported as this

# Request field → SamplingParams field, where the names differ.
_RENAMED = {"max_completion_tokens": "max_tokens"}
# Copied to SamplingParams unchanged (SamplingParams checks their types and ranges).
_SAMPLING = ("n", "max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty",
             "seed", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
             "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output", "bad_words",
             "allowed_token_ids", "prompt_logprobs", "truncate_prompt_tokens", "cache_salt",
             "thinking_token_budget")
# vLLM's older names for structured outputs.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
# Accepted and dropped: they change nothing about the output of this server.
# (prompt_cache_key: OpenAI's cache-routing hint; the prefix cache here needs none.)
_IGNORED = ("user", "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key")
_COMMON = (("model", "stream", "stream_options", "stop", "stop_regex", "logit_bias", "priority", "request_id",
            "structured_outputs", "max_tokens", "use_beam_search", "length_penalty",
            "return_token_ids", "return_tokens_as_token_ids")
           + _SAMPLING + tuple(_GUIDED) + _IGNORED)
# What beam search cannot honour (its beams follow the model's raw log-probabilities).
_NOT_WITH_BEAMS = ("logprobs", "top_logprobs", "prompt_logprobs", "stop", "stop_regex", "structured_outputs",
                   "logit_bias", "best_of", "response_format", *_GUIDED)
COMPLETION_FIELDS = frozenset(_COMMON + ("prompt", "echo", "logprobs", "best_of", "suffix"))
CHAT_FIELDS = frozenset(_COMMON + (
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools",
    "tool_choice", "parallel_tool_calls", "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
    "reasoning_effort", "chat_template"))
MAX_TEMPLATE_CHARS = 65536  # a request's own chat_template
# OpenAI's reasoning_effort values: handed to the chat template as vLLM does (a template that
# reads it, e.g. a reasoning model's, can act on it; Qwen2.5's reads none).
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


@dataclasses.dataclass
class ParsedRequest:
    """What a request asks for, checked: the prompt(s) and the SamplingParams fields it set."""

    fields: dict[str, Any]
    model: str | None = None
    stream: bool = False
    include_usage: bool = False     # stream_options.include_usage: a last chunk with the usage
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk
    priority: int = 0
    request_id: str = ""
    # vLLM's: the prompt's and each choice's token ids in the answer (RL trainers read them).
    return_token_ids: bool = False
    # vLLM's: logprobs name each token "token_id:ID" (exact where the text of a lone byte-level
    # token is not).
    tokens_as_ids: bool = False
    # /v1/completions
    prompts: list[str | list[int]] = dataclasses.field(default_factory=list)
    echo: bool = False
    prompt_only: bool = False       # echo with max_tokens 0: the prompt alone, nothing generated
    suffix: str | None = None       # fill in the middle: the text after the completion
    # /v1/chat/completions
    default_max_tokens: int | None = None  # an unset max_tokens (None: fill the context's room)
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True  # false: one call a reply at most
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_logprobs: bool = False
    template_kwargs: dict[str, Any] | None = None  # vLLM's chat_template_kwargs
    chat_template: str | None = None  # vLLM's: the request's own template (the server must trust it)
    # vLLM's use_beam_search: n beams, ranked by cum logprob / length ** length_penalty
    beam_search: bool = False
    length_penalty: float = 1.0
    # The server's --reasoning-parser (qwenjax.reasoning): replies split into reasoning and content.
    reasoning_parser: str | None = None

    @property
    def parses_tools(self) -> bool:
        """The reply is read for tool calls (tools offered, tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_calls(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a finished reply (qwenjax.tool_calls.parse_tool_calls)."""
        return parse_tool_calls(text, self.tools, self.parallel_tool_calls)


# --------------------------------------------------------------------------- request checks


def _expect(body: Mapping[str, Any], name: str, kind: type | tuple, what: str):
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise ValueError(f"{name} must be {what}, got {json.dumps(value)[:80]}")
    return value


def _sampling_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    # max_completion_tokens (OpenAI's newer name) wins over max_tokens when both are sent, as
    # in vLLM.
    fields = {_RENAMED.get(k, k): body[k] for k in (*_SAMPLING, *_RENAMED) if k in body}
    for name in ("stop", "stop_regex"):  # stop_regex: SGLang's, regular expressions
        stop = body.get(name)
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise ValueError(f"{name} must be a string or a list of strings, got {json.dumps(stop)[:80]}")
            if stop:
                fields[name] = tuple(stop)
    if "logit_bias" in body:
        bias = _expect(body, "logit_bias", dict, "an object of token id → bias")
        fields["logit_bias"] = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise ValueError(f"logit_bias key {key!r} is not a token id") from None
            fields["logit_bias"][token] = value
    guided = [k for k in _GUIDED if k in body]
    if "structured_outputs" in body:
        guided.append("structured_outputs")
    if len(guided) > 1:
        raise ValueError(f"set one of {', '.join(guided)}: each constrains the whole output")
    if guided:
        name = guided[0]
        spec = body[name] if name == "structured_outputs" else {_GUIDED[name]: body[name]}
        fields["structured_outputs"] = _structured(spec, name)
    return fields


def _structured(spec: Any, where: str) -> StructuredOutputs:
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be an object such as {{\"json\": {{...schema...}}}}")
    known = {f.name for f in dataclasses.fields(StructuredOutputs)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)}; its keys are "
                         f"{', '.join(sorted(known))}")
    try:
        return StructuredOutputs(**{k: v for k, v in spec.items() if v is not None})
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _common(body: Mapping[str, Any], request: ParsedRequest) -> None:
    request.model = _expect(body, "model", str, "a string")
    request.stream = bool(_expect(body, "stream", bool, "true or false"))
    options = _expect(body, "stream_options", dict, "an object") or {}
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        raise ValueError(f"stream_options has unknown key(s) {', '.join(unknown)}")
    if options and not request.stream:
        raise ValueError("stream_options needs stream: true")
    for key in ("include_usage", "continuous_usage_stats"):
        if not isinstance(options.get(key, False), bool):
            raise ValueError(f"stream_options.{key} must be true or false")
    request.continuous_usage = options.get("continuous_usage_stats", False)
    # Usage on every chunk implies the closing usage chunk too (the totals a client sums).
    request.include_usage = options.get("include_usage", False) or request.continuous_usage
    priority = body.get("priority", 0)
    if not is_int(priority):
        raise ValueError(f"priority must be an integer, got {json.dumps(priority)[:80]}")
    request.priority = int(priority)
    request.request_id = _expect(body, "request_id", str, "a string") or ""
    request.return_token_ids = bool(_expect(body, "return_token_ids", bool, "true or false"))
    request.tokens_as_ids = bool(_expect(body, "return_tokens_as_token_ids", bool, "true or false"))
    request.beam_search = bool(_expect(body, "use_beam_search", bool, "true or false"))
    if "length_penalty" in body:
        if not request.beam_search:
            raise ValueError("length_penalty needs use_beam_search: true")
        request.length_penalty = float(_expect(body, "length_penalty", (int, float), "a number"))
    if request.beam_search:
        from qwenjax.beam_search import MAX_BEAM_WIDTH

        for name in _NOT_WITH_BEAMS:
            if body.get(name) not in (None, False, [], {}):
                raise ValueError(f"{name} does not work with use_beam_search")
        width = body.get("n", 1)
        if not is_int(width) or not 1 <= width <= MAX_BEAM_WIDTH:
            raise ValueError(f"n (the beam width with use_beam_search) must be an int in "
                             f"[1, {MAX_BEAM_WIDTH}], got {json.dumps(width)[:80]}")
    if request.stream and body.get("prompt_logprobs") is not None:
        raise ValueError("prompt_logprobs needs stream: false (they come with the whole response)")


def _parse_common(body: Any, allowed: frozenset[str], endpoint: str
                  ) -> tuple[dict[str, Any], ParsedRequest]:
    """(the body without nulls, the request with the fields both endpoints share)."""
    body = check_fields(body, allowed, endpoint)
    request = ParsedRequest(fields=_sampling_fields(body))
    _common(body, request)
    return body, request


def parse_completion(body: Any) -> ParsedRequest:
    body, request = _parse_common(body, COMPLETION_FIELDS, "/v1/completions")
    fields = request.fields
    request.prompts = _prompts(body.get("prompt"))
    request.default_max_tokens = COMPLETION_MAX_TOKENS
    request.echo = bool(_expect(body, "echo", bool, "true or false"))
    if fields.get("max_tokens") == 0 and not isinstance(fields["max_tokens"], bool):
        # vLLM's prompt-only request (scoring harnesses send it): the prompt echoed with its
        # logprobs and nothing generated. It runs with one token, which the answer leaves out.
        if not request.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo: true, which "
                             "returns the prompt alone)")
        if fields.get("min_tokens"):
            raise ValueError("min_tokens must be 0 with max_tokens 0")
        request.prompt_only, fields["max_tokens"] = True, 1
    logprobs = body.get("logprobs")
    if logprobs is not None:
        fields["logprobs"] = logprobs  # an int (top alternatives per token), as OpenAI's legacy API
        if request.echo:  # the echoed prompt carries its logprobs too
            fields.setdefault("prompt_logprobs", logprobs)
    best_of = body.get("best_of")
    if best_of is not None and best_of != fields.get("n", 1):
        raise ValueError(f"best_of {json.dumps(best_of)} is not supported: only best_of equal to n "
                         "(every sampled sequence is returned)")
    request.suffix = _expect(body, "suffix", str, "a string") or None
    if request.suffix is not None and request.echo:
        raise ValueError("suffix and echo exclude each other: a fill-in-the-middle completion is "
                         "not a continuation of the prompt")
    return request


def _prompts(prompt: Any, name: str = "prompt") -> list[str | list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    shape = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    elif prompt is None:
        raise ValueError(f"{name} is required")
    else:
        raise ValueError(f"{name} must be {shape} (none of them empty)")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"{name} holds {len(prompts)} prompts; the limit is {MAX_PROMPTS}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"{name}[{i}] is empty" if len(prompts) > 1 else f"{name} is empty")
    return prompts


EMBEDDING_FIELDS = frozenset(("model", "input", "encoding_format", "dimensions", "user",
                              "normalize", "priority", "truncate_prompt_tokens"))


@dataclasses.dataclass
class EmbeddingRequest:
    inputs: list[str | list[int]]
    pooling: Any                    # qwenjax.pooling.PoolingParams
    model: str | None = None
    encoding_format: str = "float"  # or "base64": little-endian float32, as OpenAI's
    priority: int = 0
    truncate_prompt_tokens: int | None = None


# vLLM's /classify and /pooling on a classification or reward checkpoint.
SCORE_FIELDS = frozenset(("model", "input", "encoding_format", "user", "priority",
                          "truncate_prompt_tokens"))
# vLLM's /pooling: any pooling task (qwenjax.pooling.TASKS), "token_embed" and "token_classify"
# answering a list per pooled token.
POOLING_FIELDS = SCORE_FIELDS | {"task", "normalize", "dimensions", "use_activation"}


def parse_embeddings(body: Any, endpoint: str = "/v1/embeddings", task: str = "embed") -> EmbeddingRequest:
    """/v1/embeddings (OpenAI's, with vLLM's ``normalize``, ``priority`` and
    ``truncate_prompt_tokens``); with another ``task``, vLLM's /classify or /pooling on a
    checkpoint with a score head (qwenjax/score_head.py)."""
    from qwenjax.pooling import PoolingParams

    fields = (POOLING_FIELDS if endpoint == "/pooling" else
              EMBEDDING_FIELDS if task == "embed" else SCORE_FIELDS)
    body = check_fields(body, fields, endpoint)
    task = _expect(body, "task", str, "a pooling task") or task
    encoding = _expect(body, "encoding_format", str, "\"float\" or \"base64\"") or "float"
    if encoding not in ("float", "base64"):
        raise ValueError(f"encoding_format must be \"float\" or \"base64\", got {json.dumps(encoding)}")
    dimensions = _expect(body, "dimensions", int, "a positive integer")
    normalize = _expect(body, "normalize", bool, "true or false")
    truncate = _expect(body, "truncate_prompt_tokens", int, "a positive integer")
    if truncate is not None and truncate < 1:
        raise ValueError(f"truncate_prompt_tokens must be a positive integer, got {truncate}")
    return EmbeddingRequest(
        _prompts(body.get("input"), "input"),
        PoolingParams(normalize=normalize, dimensions=dimensions, task=task,
                      use_activation=_expect(body, "use_activation", bool, "true or false")),
        _expect(body, "model", str, "a string"), encoding,
        _expect(body, "priority", int, "an integer") or 0, truncate)


SCORE_PAIR_FIELDS = frozenset(("model", "text_1", "text_2", "user", "priority",
                               "truncate_prompt_tokens"))
RERANK_FIELDS = frozenset(("model", "query", "documents", "top_n", "return_documents", "user",
                           "priority", "truncate_prompt_tokens"))


def _texts(value: Any, name: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError(f"{name} must be a non-empty string or a non-empty list of them")
    if len(texts) > MAX_PROMPTS:
        raise ValueError(f"{name} has {len(texts)} texts; at most {MAX_PROMPTS}")
    return texts


def _embedding_request(body: Mapping[str, Any], texts: list[str]) -> EmbeddingRequest:
    from qwenjax.pooling import PoolingParams

    truncate = _expect(body, "truncate_prompt_tokens", int, "a positive integer")
    if truncate is not None and truncate < 1:
        raise ValueError(f"truncate_prompt_tokens must be a positive integer, got {truncate}")
    return EmbeddingRequest(texts, PoolingParams(), _expect(body, "model", str, "a string"),
                            priority=_expect(body, "priority", int, "an integer") or 0,
                            truncate_prompt_tokens=truncate)


def parse_score(body: Any) -> tuple[EmbeddingRequest, list[tuple[int, int]]]:
    """vLLM's /score on an embedding model: (the texts to embed, the (i, j) pairs to score):
    text_1 one text and text_2 one or more (1 against each), or two lists of one length (pairwise)."""
    from qwenjax.pooling import score_pairs

    body = check_fields(body, SCORE_PAIR_FIELDS, "/score")
    first, second = _texts(body.get("text_1"), "text_1"), _texts(body.get("text_2"), "text_2")
    return _embedding_request(body, first + second), score_pairs(len(first), len(second))


@dataclasses.dataclass
class RerankRequest:
    embedding: EmbeddingRequest  # the query, then the documents
    documents: list[str]
    top_n: int
    return_documents: bool = True


def parse_rerank(body: Any) -> RerankRequest:
    """The Jina/Cohere rerank API that vLLM serves (/rerank, /v1/rerank, /v2/rerank)."""
    body = check_fields(body, RERANK_FIELDS, "/rerank")
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise ValueError("query must be a non-empty string")
    documents = body.get("documents")
    if isinstance(documents, list):
        documents = [d.get("text") if isinstance(d, Mapping) else d for d in documents]
    documents = _texts(documents, "documents")
    top_n = _expect(body, "top_n", int, "a positive integer")
    if top_n is not None and top_n < 1:
        raise ValueError(f"top_n must be a positive integer, got {top_n}")
    returned = _expect(body, "return_documents", bool, "true or false")
    return RerankRequest(_embedding_request(body, [query] + documents), documents,
                         min(top_n or len(documents), len(documents)),
                         True if returned is None else returned)


def embedding_json(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        import base64

        import numpy as np

        return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()
    return values


def parse_chat(body: Any) -> ParsedRequest:
    body, request = _parse_common(body, CHAT_FIELDS, "/v1/chat/completions")
    fields = request.fields
    request.messages = _messages(body.get("messages"))
    request.chat_logprobs = bool(_expect(body, "logprobs", bool, "true or false"))
    top = body.get("top_logprobs")
    if top is not None and top != 0 and not request.chat_logprobs:  # 0 asks for nothing
        raise ValueError("top_logprobs needs logprobs: true")
    if top is not None and request.chat_logprobs:
        fields["logprobs"] = top
    elif request.chat_logprobs:
        fields["logprobs"] = 0
    fmt = _expect(body, "response_format", dict, "an object")
    if fmt is not None:
        constraint = _response_format(fmt)
        if constraint is not None:
            if "structured_outputs" in fields:
                raise ValueError("set response_format or structured outputs, not both")
            fields["structured_outputs"] = constraint
    tools = _expect(body, "tools", list, "a list of tools")
    request.tools = check_tools(tools) if tools else None
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping):  # {"type": "function", "function": {"name": ...}}
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, Mapping) \
                or not isinstance(function.get("name"), str):
            raise ValueError('tool_choice must be "none", "auto", "required" or {"type": '
                             '"function", "function": {"name": ...}}')
        choice = function["name"]
    elif choice is not None and not isinstance(choice, str):
        raise ValueError(f"tool_choice must be a string or an object, got {json.dumps(choice)[:80]}")
    request.tool_choice = choice or "auto"
    parallel = _expect(body, "parallel_tool_calls", bool, "true or false")
    request.parallel_tool_calls = parallel is not False
    constraint = tool_choice_constraint(request.tools, request.tool_choice, request.parallel_tool_calls)
    if constraint is not None:
        if "structured_outputs" in fields:
            raise ValueError(f"{constraint_source(request.tool_choice)} constrains the output "
                             "itself; leave response_format and structured outputs unset")
        fields["structured_outputs"] = constraint
    continuing = bool(_expect(body, "continue_final_message", bool, "true or false"))
    add = _expect(body, "add_generation_prompt", bool, "true or false")
    request.continue_final_message = continuing
    request.add_generation_prompt = (not continuing) if add is None else add
    request.template_kwargs = _expect(body, "chat_template_kwargs", dict, "an object")
    template = _expect(body, "chat_template", str, "a string (a Jinja template)")
    if template is not None and ("{{" not in template and "{%" not in template
                                 or len(template) > MAX_TEMPLATE_CHARS):
        # (A path is never read from a request: only a template's own text is taken.)
        raise ValueError(f"chat_template must be a Jinja template's text ({{{{ … }}}} / {{% … %}}) "
                         f"of at most {MAX_TEMPLATE_CHARS} chars")
    request.chat_template = template
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                             f"got {json.dumps(effort)[:80]}")
        request.template_kwargs = {"reasoning_effort": effort, **(request.template_kwargs or {})}
    return request


def _response_format(fmt: Mapping[str, Any]) -> StructuredOutputs | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise ValueError('response_format.json_schema must be an object {"name": ..., '
                             '"schema": {...}}')
        # A schema-less json_schema asks for any JSON object (OpenAI allows omitting schema).
        schema = spec.get("schema")
        return StructuredOutputs(json=schema) if schema else StructuredOutputs(json_object=True)
    if kind == "structural_tag":  # vLLM's and SGLang's: {"structures": [...], "triggers": [...]}
        try:
            return StructuredOutputs(structural_tag=fmt)
        except ValueError as error:
            raise ValueError(str(error).replace("structured_outputs.structural_tag",
                                                "response_format")) from None
    raise ValueError(f"response_format.type must be \"text\", \"json_object\", \"json_schema\" or "
                     f"\"structural_tag\", got {json.dumps(kind)}")


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _messages(messages: Any) -> list[dict]:
    """OpenAI chat messages as the chat template takes them: content parts joined into one
    string, "developer" read as "system" (OpenAI's newer name for it)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\": ..., \"content\": ...}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object")
        message = {k: v for k, v in message.items() if v is not None}
        if message.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}].role is {json.dumps(message.get('role'))[:40]}; "
                             f"expected one of {', '.join(_ROLES)}")
        if message.get("role") == "developer":
            message["role"] = "system"
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}] is a {kind!r} part; this model "
                                     "reads text only ({\"type\": \"text\", \"text\": ...})")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        elif content is None and message.get("role") == "assistant" and message.get("tool_calls"):
            message["content"] = None
        out.append(message)
    return out


# --------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def prompt_only_output(output: RequestOutput) -> RequestOutput:
    """The output of a prompt-only request (max_tokens 0: vLLM's echo, SGLang's
    max_new_tokens): it ran with one token, which is not an output; it ends with "length"."""
    none = lambda value: None if value is None else []  # noqa: E731
    return dataclasses.replace(
        output, text="", token_ids=[], delta_text="", delta_token_ids=[],
        logprobs=none(output.logprobs), delta_logprobs=none(output.delta_logprobs),
        finish_reason=output.finish_reason and "length", matched_stop=None)


class TokenText:
    """Token ids → the strings and bytes logprobs report. A byte-level BPE token may be part of
    a UTF-8 character: its ``bytes`` are exact and its text has U+FFFD for the partial bytes.
    ``as_ids`` (vLLM's return_tokens_as_token_ids): the string is "token_id:ID" instead (its
    bytes those of that string, as vLLM's); ``length`` still measures the token's own text."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _text(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            raw = self.tokenizer.token_bytes(token_id) if self.tokenizer is not None else b""
            found = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return found

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if self.as_ids:
            shown = f"token_id:{token_id}"
            return shown, list(shown.encode())
        return self._text(token_id)

    def length(self, token_id: int) -> int:
        """Characters of the token's text (where the next token's text_offset starts)."""
        return len(self._text(token_id)[0])


@dataclasses.dataclass(frozen=True)
class FirstToken:
    """An echoed prompt's first token, which has no logprob (null in the answer)."""

    token_id: int


def completion_logprobs(entries: Sequence, token_text: TokenText, offset: int) -> dict[str, list]:
    """The legacy completions logprobs object for ``entries`` (TokenLogprob, or FirstToken for
    the echoed prompt's first token), ``text_offset`` counted from ``offset``."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for lp in entries:
        if lp is None:
            continue
        text, _ = token_text(lp.token_id)
        tokens.append(text)
        if isinstance(lp, FirstToken):
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(_finite(lp.logprob))
            # The token itself and its top alternatives (vLLM's: logprobs 0 gives the token alone).
            top = {text: _finite(lp.logprob)}
            top.update((token_text(t)[0], _finite(v)) for t, v in lp.top)
            top_logprobs.append(top)
        offsets.append(offset)
        offset += token_text.length(lp.token_id)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_logprobs(entries: Sequence, token_text: TokenText) -> dict[str, list]:
    content = []
    for lp in entries:
        text, raw = token_text(lp.token_id)
        top = [{"token": token_text(t)[0], "logprob": _finite(v), "bytes": token_text(t)[1]}
               for t, v in lp.top]
        content.append({"token": text, "logprob": _finite(lp.logprob), "bytes": raw,
                        "top_logprobs": top})
    return {"content": content}


def prompt_logprobs_json(entries: Sequence | None, token_text: TokenText) -> list | None:
    """vLLM's prompt_logprobs: per prompt token (the first: null) a map of token id → its
    logprob and text, for the prompt's token and the top alternatives (these with their rank)."""
    if entries is None:
        return None
    out = []
    for lp in entries:
        if lp is None:
            out.append(None)
            continue
        ranked = {str(t): {"logprob": _finite(v), "rank": rank, "decoded_token": token_text(t)[0]}
                  for rank, (t, v) in enumerate(lp.top, 1)}
        chosen = ranked.pop(str(lp.token_id), None) or {
            "logprob": _finite(lp.logprob), "decoded_token": token_text(lp.token_id)[0]}
        out.append({str(lp.token_id): chosen, **ranked})
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    entry = {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
    return entry if index is None else {"index": index, **entry}


def call_piece_json(index: int, call: ToolCall | None, arguments: str) -> dict[str, Any]:
    """A streamed tool-call delta: a call's opening (its id and name) or more of its arguments."""
    if call is not None:
        return tool_call_json(call, index)  # no arguments yet
    return {"index": index, "function": {"arguments": arguments}}


def chat_message(text: str, request: ParsedRequest) -> tuple[dict[str, Any], bool]:
    """(the assistant message of a finished reply, whether it called tools). With a reasoning
    parser, the reasoning goes to ``reasoning`` and ``reasoning_content`` (vLLM's old name, which
    its clients still read) and tools are parsed from the content after it; content is None
    when the reply is all reasoning."""
    reasoning = None
    if request.reasoning_parser is not None:
        reasoning, text = split_reasoning(text)
    content, calls = request.tool_calls(text or "") if request.parses_tools else (text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if request.reasoning_parser is not None:
        message.update(reasoning=reasoning, reasoning_content=reasoning)
        if not content:
            message["content"] = None
    if calls:
        message["tool_calls"] = [tool_call_json(c) for c in calls]
    return message, bool(calls)


class ChatStream:
    """A streamed reply's deltas: reasoning (with a reasoning parser), then content with tool
    calls held back (``ToolCallStream``). ``feed`` returns (reasoning, content) to send now;
    ``finish`` (reasoning, content, calls) still to send once the reply is complete. With
    ``stream_calls``, ``call_pieces`` gives the calls piece by piece as they come."""

    def __init__(self, request: ParsedRequest, stream_calls: bool = False):
        self.reasoning = None if request.reasoning_parser is None else ReasoningStream()
        self.tools = ToolCallStream(request, stream_calls)

    def call_pieces(self) -> list[tuple[int, ToolCall | None, str]]:
        return self.tools.call_pieces()

    def feed(self, delta: str) -> tuple[str, str]:
        reasoning = ""
        if self.reasoning is not None:
            reasoning, delta = self.reasoning.feed(delta)
        return reasoning, self.tools.feed(delta)

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        reasoning, content = "", ""
        if self.reasoning is not None:
            reasoning, delta = self.reasoning.feed("", final=True)
            content = self.tools.feed(delta)
        rest, calls = self.tools.finish()
        return reasoning, content + rest, calls


def reasoning_delta(text: str) -> dict[str, str]:
    """A chat chunk's delta carrying reasoning, under both of vLLM's names."""
    return {"reasoning": text, "reasoning_content": text}


# How a bare JSON call opens (parse_tool_calls reads those too): an optional ```json fence, an
# optional list, then an object's first key. A reply held for it is released as soon as it
# cannot be one (code in a ```python fence, a list of numbers, plain text).
_BARE_CALL = regex.compile(r'(?:```(?:json)?\s*)?\[?\s*\{\s*"')


class ToolCallStream:
    """Streams a reply's content while holding back what may be a tool call.

    Content is sent as it comes, except a tail that could begin ``<tool_call>`` (or is
    whitespace, which a call would strip); from the tag on (or from the start, when the reply
    opens like a bare JSON call, ``{"``, ``[{"`` or a ```json fence around them, or when
    tool_choice forces a call) nothing more is sent until the end, where the calls are parsed
    from the whole text.

    With ``stream_calls``, the held-back calls come out as they are written too
    (``call_pieces``: qwenjax.tool_calls.CallScanner); ``finish`` still parses the whole text,
    and the calls past ``opened`` (those the scanner could not follow) are sent whole."""

    def __init__(self, request: ParsedRequest, stream_calls: bool = False):
        self.request = request
        self.enabled = request.parses_tools
        # "required" or a tool's name: the output is the call(s) as JSON, never content.
        self.blocked = self.enabled and request.tool_choice not in ("auto", "none")
        self.text = ""
        self.sent = 0
        self.bare_checked = False  # the reply's opening was read for a bare JSON call
        self.scanner = (CallScanner(request.tools, request.parallel_tool_calls)
                        if stream_calls and self.enabled else None)
        if self.blocked and self.scanner is not None:
            self.scanner.begin(tagged=False)

    @property
    def opened(self) -> int:
        """Calls already streamed piece by piece."""
        return len(self.scanner.calls) if self.scanner is not None else 0

    def call_pieces(self) -> list[tuple[int, ToolCall | None, str]]:
        """The calls' pieces the text fed since the last call adds (CallScanner.advance)."""
        return self.scanner.advance(self.text) if self.scanner is not None else []

    def feed(self, delta: str) -> str:
        """The content to send now."""
        self.text += delta
        if not self.enabled:
            self.sent = len(self.text)
            return delta
        if self.blocked:
            return ""
        stripped = self.text.lstrip()
        if not stripped:
            return ""
        if not self.bare_checked:
            opening = _BARE_CALL.match(stripped, partial=True)
            if opening is not None and opening.partial:
                return ""  # may still open a call: wait for more
            self.bare_checked = True
            if opening is not None:
                self.blocked = True
                if self.scanner is not None:
                    self.scanner.begin(tagged=False)
                return ""
        tag = self.text.find(_TAG, max(0, self.sent - len(_TAG)))
        if tag >= 0:
            end, self.blocked = tag, True
            if self.scanner is not None:
                self.scanner.begin(tagged=True, at=tag)
        else:
            end = len(self.text) - held_back(self.text, _TAG)
        # Whitespace waits for what follows: before a call it is not content (the non-streamed
        # reply strips it too).
        while end > self.sent and self.text[end - 1].isspace():
            end -= 1
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet sent, tool calls) once the reply is complete."""
        if not self.enabled:
            return "", []
        content, calls = self.request.tool_calls(self.text)
        if not calls:
            rest, self.sent = self.text[self.sent:], len(self.text)
            return rest, []
        # The content is the text before the first tag (none for a bare JSON call); send what
        # of it is still held back.
        tag = self.text.find(_TAG)
        head = self.text[:tag].rstrip() if tag >= 0 else ""
        return head[self.sent:], calls
