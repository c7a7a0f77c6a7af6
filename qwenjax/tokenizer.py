"""Text <-> token ids and chat prompts for an HF-layout model directory, without transformers."""
from __future__ import annotations

import collections
import json
import numbers
import os
import pathlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

# The roles the Qwen2 chat template renders; it silently drops any other role, so catch
# typos here instead.
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_COMPILED_TEMPLATES = 32  # per-call chat templates kept compiled (the most recently used)


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2, Qwen2) writes each byte as one printable character: printable
    Latin-1 bytes as themselves, the other 68 as U+0100 onwards. Character → byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


_BYTE_OF_CHAR = _byte_level_alphabet()


FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
# What apply_chat_template itself passes to a chat template.
_TEMPLATE_VARIABLES = frozenset(("messages", "add_generation_prompt", "bos_token", "eos_token", "tools"))
# transformers' tokenization options that this tokenizer does not implement: accepted only at
# their no-op values (None / False / {}), so a call written for transformers fails loudly
# instead of having its padding or truncation silently ignored.
_UNSUPPORTED_OPTIONS = frozenset((
    "padding", "truncation", "max_length", "return_tensors", "text_pair", "stride",
    "return_assistant_tokens_mask", "sanitize_control_tokens", "tokenizer_kwargs",
))


class BatchEncoding(dict):
    """What transformers' ``tokenizer(text)`` returns for unpadded input: a dict with
    "input_ids" and "attention_mask" whose keys also read as attributes (``.input_ids``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}") from None


class Tokenizer:
    """A `tokenizers` tokenizer plus the special ids and chat template from the model directory."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        unk_token: str | None = None,
        extra_special_tokens: Sequence[str] = (),
    ):
        self._tokenizer = tokenizer
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._eos_token_ids = tuple(eos_token_ids)
        self._pad_token_id = pad_token_id
        self._unk_token = unk_token
        self._extra_special_tokens = tuple(extra_special_tokens)
        self._chat_template = _compile_chat_template(chat_template) if chat_template else None
        # apply_chat_template(chat_template=...) sources → compiled, so a per-request template
        # compiles once (shared with copies from with_chat_template: keyed by the source); the
        # most recently used few, since a server's requests may each bring their own.
        self._compiled_templates: collections.OrderedDict[str, jinja2.Template] = collections.OrderedDict()
        self._templates_lock = threading.Lock()  # the server renders on more than one thread

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and (if present) generation_config.json."""
        path = pathlib.Path(path)
        tokenizer = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json") or {}
        generation_config = _read_json(path / "generation_config.json") or {}

        def token_id(field: str) -> int | None:
            token = _token_content(config.get(field))
            if token is None:
                return None
            index = tokenizer.token_to_id(token)
            if index is None:
                raise ValueError(f"tokenizer_config.json {field} {token!r} is not in the vocabulary")
            return index

        # generation_config.json lists every id that ends a reply (Qwen instruct: <|im_end|>
        # and <|endoftext|>); tokenizer_config.json names only one.
        eos_token_ids = generation_config.get("eos_token_id")
        if eos_token_ids is None:
            eos_token_ids = [index for index in [token_id("eos_token")] if index is not None]
        elif isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        pad_token_id = token_id("pad_token")
        if pad_token_id is None:
            pad_token_id = generation_config.get("pad_token_id")

        # transformers 5 saves the template beside the config; older saves keep it inside.
        template_file = path / "chat_template.jinja"
        chat_template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(
                f"tokenizer_config.json chat_template is a {type(chat_template).__name__}; "
                "only a single template string is supported"
            )
        # transformers 5 names them extra_special_tokens (a dict for multimodal models), older
        # saves additional_special_tokens; both count in all_special_ids.
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        if isinstance(extra, Mapping):
            extra = list(extra.values())
        return cls(
            tokenizer,
            chat_template=chat_template,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
            unk_token=_token_content(config.get("unk_token")),
            extra_special_tokens=[_token_content(token) for token in extra],
        )

    def with_chat_template(self, template: str) -> Tokenizer:
        """This tokenizer with another chat template (vLLM's ``--chat-template``): ``template``
        is a Jinja template, or the path of a file holding one."""
        source = resolve_chat_template(template)
        copy = object.__new__(Tokenizer)
        copy.__dict__.update(self.__dict__)
        copy._chat_template = _compile_chat_template(source)
        return copy

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (transformers'
        vocab_size leaves added tokens out; for Qwen2.5's tokenizer.json, whose vocabulary
        already holds them, both are the same)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        """The full vocabulary size, added tokens included (transformers' ``len(tokenizer)``)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    # The special tokens as transformers names them. Qwen2's tokenizer_config.json sets no
    # bos_token and no unk_token, so those are None (generation_config.json's bos_token_id is
    # for generation, not for the tokenizer).
    @property
    def eos_token_id(self) -> int | None:
        """The first id that ends a reply (transformers: the id of tokenizer_config.json's
        eos_token; the same for Qwen2.5, whose generation_config.json lists it first)."""
        return self._eos_token_ids[0] if self._eos_token_ids else None

    @property
    def eos_token(self) -> str | None:
        return self._token_text(self.eos_token_id)

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self._bos_token)

    @property
    def pad_token(self) -> str | None:
        return self._token_text(self._pad_token_id)

    @property
    def unk_token(self) -> str | None:
        return self._unk_token

    @property
    def unk_token_id(self) -> int | None:
        return self._token_id(self._unk_token)

    @property
    def all_special_tokens(self) -> list[str]:
        """As transformers lists them: bos, eos, unk, pad (those set), then tokenizer_config.json's
        extra/additional special tokens, each once. Not every token decode skips: that is every
        added token marked special in tokenizer.json."""
        named = (self.bos_token, self._eos_token, self._unk_token, self.pad_token)
        return list(dict.fromkeys(t for t in (*named, *self._extra_special_tokens) if t is not None))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        """Token text → id, added tokens included."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int], skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        """The vocabulary entry of one id (a str), or of each id in a list (a list); None for an
        id outside the vocabulary. Entries are byte-level text ("Ġworld" for " world"), as in
        transformers. ``skip_special_tokens`` leaves out the ids in ``all_special_ids``."""
        if isinstance(ids, numbers.Integral):
            return self._tokenizer.id_to_token(int(ids))
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skipped]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """The id of one vocabulary entry (an int), or of each in a list (a list); an unknown
        entry gives ``unk_token_id`` (None for Qwen2), as in transformers."""
        if isinstance(tokens, str):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(token) for token in tokens]

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what other tokenizer libraries load)."""
        return self._tokenizer.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text such as "<|im_start|>" maps to its special id.
        ``add_special_tokens``: whether tokenizer.json's post-processor may add tokens, as in
        transformers. Qwen2's (ByteLevel) adds none — no BOS, no EOS — so True and False give
        the same ids."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True,
                 **options: Any) -> BatchEncoding:
        """transformers' ``tokenizer(text)``: {"input_ids", "attention_mask"} for one text (lists
        of ids and of ones) or for a list of texts (a list of such lists), unpadded. Padding,
        truncation and tensors are not implemented; asking for them raises ValueError."""
        _refuse_unsupported_options("tokenizer(...)", options)
        if options:
            raise TypeError(f"tokenizer(...) got unexpected keyword arguments {sorted(options)}")
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens=add_special_tokens)
            return BatchEncoding(input_ids=ids, attention_mask=[1] * len(ids))
        if not isinstance(text, Sequence) or not all(isinstance(t, str) for t in text):
            raise ValueError(f"text must be a str or a list of str, got {type(text).__name__}")
        batch = [e.ids for e in self._tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)]
        return BatchEncoding(input_ids=batch, attention_mask=[[1] * len(ids) for ids in batch])

    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (one id or a list). ``skip_special_tokens`` defaults to True here,
        while transformers' decode defaults to False: callers across qwenjax rely on this
        default, so pass it explicitly where transformers' behaviour is wanted. Skipped are the
        added tokens tokenizer.json marks special (<|im_end|>, <|im_start|>, …), not
        <tool_call> and the other non-special added tokens."""
        if isinstance(ids, numbers.Integral):
            ids = [ids]
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """``decode`` of each sequence, with transformers' default: special tokens kept (unlike
        ``decode``'s default here)."""
        return self._tokenizer.decode_batch([list(ids) for ids in sequences],
                                            skip_special_tokens=skip_special_tokens)

    def special_token_id(self, text: str) -> int | None:
        """The id of a token whose text is ``text`` (e.g. "<|fim_prefix|>"), if the vocabulary has it."""
        return self._tokenizer.token_to_id(text)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (b"" for an id outside the vocabulary). A
        byte-level BPE token may hold part of a UTF-8 character, which ``decode`` of that token
        alone cannot show; special tokens are their text."""
        piece = self._tokenizer.id_to_token(int(token_id))
        if piece is None:
            return b""
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        except KeyError:  # not byte-level text (an added token with other characters)
            return piece.encode()

    def encode_fill_in_the_middle(self, prefix: str | Sequence[int], suffix: str) -> list[int]:
        """The prompt that asks a Qwen2.5(-Coder) model for the text between ``prefix`` (text or
        token ids) and ``suffix``: <|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>, the
        format code editors send and Qwen2.5-Coder was trained on."""
        ids = [self.special_token_id(t) for t in FIM_TOKENS]
        if None in ids:
            raise ValueError("suffix needs a tokenizer with the fill-in-the-middle tokens "
                             f"{', '.join(FIM_TOKENS)}; this model's has none")
        head = list(prefix) if not isinstance(prefix, str) else self.encode(prefix, add_special_tokens=False)
        return [ids[0], *head, ids[1], *self.encode(suffix, add_special_tokens=False), ids[2]]

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None, continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None, *, tokenize: bool | None = None,
        return_dict: bool = False, chat_template: str | None = None,
        conversation: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any,
    ) -> str | list[int] | BatchEncoding | list[str] | list[list[int]]:
        """Render `messages` ({"role": ..., "content": ...} dicts; an assistant turn may carry
        OpenAI-style "tool_calls") into the model's prompt text, offering `tools` (OpenAI-style
        function definitions) when given. `continue_final_message`: the last message is an
        assistant turn the model goes on writing (no end-of-turn after it, no new turn).
        `template_kwargs`, or more keyword arguments as transformers takes them: more variables
        for the template (vLLM's `chat_template_kwargs`, e.g. {"enable_thinking": False} for
        templates that read it; Qwen2.5's reads none). `chat_template`: render with this
        template (its text or a file holding it) instead of the tokenizer's.

        The keywords of transformers' apply_chat_template work as there (`conversation=` for
        `messages`; a list of conversations gives a list of results): `tokenize=True` gives the
        token ids (with `return_dict=True`, {"input_ids", "attention_mask"}), `tokenize=False`
        the text. Two defaults differ, kept for qwenjax's callers: without `tokenize` the text
        is returned (transformers: ids, as a dict since transformers 5), and
        `add_generation_prompt` is True (transformers: False). The second positional argument
        is `add_generation_prompt` (transformers': `tools`)."""
        if conversation is not None:
            if messages is not None:
                raise TypeError("apply_chat_template: pass messages or conversation, not both")
            messages = conversation
        if isinstance(add_generation_prompt, (Sequence, Mapping)):
            raise TypeError(f"add_generation_prompt must be a bool, got {type(add_generation_prompt).__name__} "
                            "(the second positional argument here; pass tools=... by name)")
        _refuse_unsupported_options("apply_chat_template", kwargs)
        variables = {**(template_kwargs or {}), **kwargs}
        reserved = sorted(set(variables) & _TEMPLATE_VARIABLES)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)} (set by the "
                             "request itself)")
        template = self._chat_template if chat_template is None else self._compiled(chat_template)
        if template is None:
            raise ValueError("this tokenizer has no chat_template")
        batched = (isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)) and bool(messages)
                   and all(isinstance(m, Sequence) and not isinstance(m, (str, bytes)) for m in messages))
        texts = [self._render(template, one, add_generation_prompt, tools, continue_final_message, variables)
                 for one in (messages if batched else [messages])]
        if not tokenize:
            return texts if batched else texts[0]
        encoded = self(texts if batched else texts[0], add_special_tokens=False)
        return encoded if return_dict else encoded["input_ids"]

    def _render(
        self, template: jinja2.Template, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None, continue_final_message: bool, variables: Mapping[str, Any],
    ) -> str:
        _check_messages(messages)
        if continue_final_message:
            last = messages[-1]
            if last.get("role") != "assistant" or not last.get("content"):
                raise ValueError("continue_final_message needs the last message to be an "
                                 "assistant turn with content")
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt exclude each "
                                 "other: the model continues the last turn instead of starting one")
        text = template.render(
            messages=[_template_message(message) for message in messages],
            add_generation_prompt=add_generation_prompt,
            # transformers leaves unset special tokens undefined, which renders as "".
            bos_token=self._bos_token or "",
            eos_token=self._eos_token or "",
            tools=check_tools(tools) if tools else None,
            **variables,
        )
        if continue_final_message:  # cut what the template put after the final content
            text = text[: text.rindex(messages[-1]["content"]) + len(messages[-1]["content"])]
        return text

    def _compiled(self, chat_template: str) -> jinja2.Template:
        with self._templates_lock:
            compiled = self._compiled_templates.get(chat_template)
            if compiled is not None:
                self._compiled_templates.move_to_end(chat_template)
                return compiled
        compiled = _compile_chat_template(resolve_chat_template(chat_template))
        with self._templates_lock:
            self._compiled_templates[chat_template] = compiled
            while len(self._compiled_templates) > MAX_COMPILED_TEMPLATES:
                self._compiled_templates.popitem(last=False)
        return compiled

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None, continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None, chat_template: str | None = None,
    ) -> list[int]:
        """Token ids of the rendered chat (``apply_chat_template(..., tokenize=True)``)."""
        return self.apply_chat_template(messages, add_generation_prompt, tools, continue_final_message,
                                        template_kwargs, tokenize=True, chat_template=chat_template)

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tokenizer.id_to_token(token_id)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def _convert_token_to_id(self, token: str) -> int | None:
        index = self._tokenizer.token_to_id(token)
        return self.unk_token_id if index is None else index


def _refuse_unsupported_options(where: str, options: dict[str, Any]) -> None:
    """Drop transformers' tokenization options given at their no-op values from ``options``;
    raise ValueError naming any asked for."""
    for name in sorted(set(options) & _UNSUPPORTED_OPTIONS):
        value = options.pop(name)
        if value not in (None, False) and value != {}:
            raise ValueError(f"{where}: {name}={value!r} is not supported by qwenjax's tokenizer "
                             "(unpadded, untruncated Python lists only)")


def resolve_chat_template(template: str) -> str:
    """A chat template given as a file path or as the template itself → its source; checked
    to compile (errors name the line)."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("chat_template must be a Jinja template or the path of a file holding one")
    path = pathlib.Path(template)
    looks_like_template = "{{" in template or "{%" in template
    if not looks_like_template:
        try:
            is_file = path.is_file()
        except OSError:  # a name too long for a path
            is_file = False
        if not is_file:
            raise ValueError(f"chat_template {template[:80]!r} is neither a file nor a Jinja "
                             "template ({{ … }} / {% … %})")
        template = path.read_text()
    try:
        _compile_chat_template(template)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ValueError(f"chat_template does not compile: {error.message} (line {error.lineno})") from None
    return template


def _compile_chat_template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's built-in tojson escapes HTML characters ("<" -> "\u003c"); chat templates
        # expect plain JSON, as transformers renders it.
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    # The environment transformers renders chat templates in; templates rely on the
    # trim/lstrip whitespace rules and on loop controls.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{index}].role is {role!r}; expected one of {CHAT_ROLES}")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ValueError(f"messages[{index}].tool_calls: only an assistant turn calls tools")
            if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
                raise ValueError(f"messages[{index}].tool_calls must be a list")
            for j, call in enumerate(calls):
                _tool_call_parts(call, f"messages[{index}].tool_calls[{j}]")
        content = message.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise ValueError(
                f"messages[{index}].content must be a str, got {type(content).__name__}"
            )


def _tool_call_parts(call: Any, where: str) -> tuple[str, Any]:
    """(name, arguments as a JSON value) of an OpenAI-style tool call
    ({"function": {"name", "arguments"}} or {"name", "arguments"}; arguments a JSON string or
    already an object), raising ValueError naming ``where``."""
    if not isinstance(call, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(call).__name__}")
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name must be a non-empty str")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}.arguments is not JSON: {error}") from None
    return name, arguments


def _template_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """The message as chat templates expect it: tool call arguments as JSON values (templates
    serialize them with tojson), not the JSON text the OpenAI API sends."""
    message = dict(message)
    if message.get("tool_calls"):
        message["tool_calls"] = [
            {"type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments in (_tool_call_parts(c, "tool_call") for c in message["tool_calls"])
        ]
    return message


def check_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style tool definitions ({"type": "function", "function": {"name", "description",
    "parameters"}}; a bare {"name", ...} is taken as the function), as templates render them."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of dicts, got {type(tools).__name__}")
    checked = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] must be a dict, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}].type must be \"function\", got {tool.get('type')!r}")
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) \
                or not function["name"]:
            raise ValueError(f"tools[{i}].function.name must be a non-empty str")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        checked.append({"type": "function", "function": {k: v for k, v in function.items()}})
    return checked


def _token_content(value: Any) -> str | None:
    # Older tokenizer_config.json files store special tokens as AddedToken dicts.
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text())
