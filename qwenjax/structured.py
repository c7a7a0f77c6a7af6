"""Structured outputs (vLLM's ``structured_outputs``): output constrained by a JSON schema, a
regex, a list of choices or a Lark grammar.

The grammar engine is llguidance (one of vLLM's backends; a small Rust wheel with no
dependencies), imported only when a request asks for structure. Each constrained sequence
has a matcher that follows its output tokens on the host and gives, before each of its
sampling steps, the bitmask of the tokens the grammar allows next (``vocab / 32`` int32
words); the sampler sets every other logit to -inf on the device.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

MAX_CHOICES = 256
MAX_SPEC_CHARS = 65536  # of a schema, regex or grammar


def _fail(field: str, requirement: str, value: Any) -> ValueError:
    return ValueError(f"structured_outputs.{field} must be {requirement}, got {value!r:.80}")


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one constraint: ``json`` (a JSON schema, as a dict or its text), ``regex``,
    ``choice`` (the output is one of these strings), ``grammar`` (Lark, llguidance's
    dialect), ``json_object`` (any JSON object) or ``structural_tag``.

    ``structural_tag`` (vLLM's and SGLang's, as a dict or its JSON text): free text in which
    each of the ``triggers`` starts a tagged segment, ``{"structures": [{"begin": …,
    "schema": {…}, "end": …}, …], "triggers": […]}``: the segment is one structure's
    ``begin`` (which starts with a trigger), then JSON following its ``schema``, then its
    ``end``. Tool calls inside a free reply, e.g. Qwen2.5's ``<tool_call>\n{"name": "f",
    "arguments": `` … ``}\n</tool_call>``.

    The options of vLLM's ``StructuredOutputsParams`` (``qwenjax.StructuredOutputsParams``
    and ``GuidedDecodingParams`` are this class) apply to ``json`` and ``json_object`` and
    are ignored with the other constraints, as in vLLM:

    * ``disable_any_whitespace``: compact JSON, no whitespace between its tokens
      (llguidance's ``whitespace_flexible: false``).
    * ``whitespace_pattern``: the regex whitespace between JSON tokens must match (llguidance's
      option of that name); it takes precedence over ``disable_any_whitespace``.
    * ``disable_additional_properties``: every object schema with ``properties`` or
      ``patternProperties`` and no ``additionalProperties`` gets ``additionalProperties: false``
      (JSON Schema's default allows any other property).
    * ``disable_fallback``: accepted with no effect: llguidance is the only backend, so there
      is nothing to fall back to and a grammar it cannot compile is refused either way.

    Options given in the schema's own ``x-guidance`` object win over these two whitespace
    options (llguidance applies them as defaults, as vLLM's guidance backend does).
    """

    json: Mapping[str, Any] | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False
    disable_fallback: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: Mapping[str, Any] | str | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        given = [name for name in ("json", "regex", "choice", "grammar", "structural_tag")
                 if getattr(self, name) is not None]
        if self.json_object is None:  # vLLM's field is Optional[bool]
            set_("json_object", False)
        for name in ("json_object", "disable_any_whitespace", "disable_fallback",
                     "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "a bool", getattr(self, name))
        if self.whitespace_pattern is not None and (
                not isinstance(self.whitespace_pattern, str)
                or not 1 <= len(self.whitespace_pattern) <= MAX_SPEC_CHARS):
            raise _fail("whitespace_pattern", f"None or a regex of 1 to {MAX_SPEC_CHARS} chars",
                        self.whitespace_pattern)
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, "
                             f"grammar, json_object, structural_tag; got {given or 'none'}")
        if self.structural_tag is not None:
            set_("structural_tag", _check_structural_tag(self.structural_tag))
        if isinstance(self.json, str):
            try:
                set_("json", json.loads(self.json))
            except json.JSONDecodeError as error:
                raise _fail("json", "a JSON schema", f"text that is not JSON ({error})") from None
        if self.json is not None and not isinstance(self.json, Mapping):
            raise _fail("json", "a JSON schema (an object)", self.json)
        if self.json is not None and len(json.dumps(self.json)) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.json must be at most {MAX_SPEC_CHARS} chars as JSON")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _fail(name, "a non-empty string", value)
            if value is not None and len(value) > MAX_SPEC_CHARS:
                raise ValueError(f"structured_outputs.{name} must be at most {MAX_SPEC_CHARS} "
                                 f"chars, got {len(value)}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, Sequence):
                raise _fail("choice", "a sequence of strings", self.choice)
            if not 1 <= len(self.choice) <= MAX_CHOICES:
                raise _fail("choice", f"1 to {MAX_CHOICES} strings", f"{len(self.choice)} of them")
            for c in self.choice:
                if not isinstance(c, str) or not c:
                    raise _fail("choice", "non-empty strings", c)
            set_("choice", tuple(self.choice))

    def grammar_text(self, special_tokens: Sequence[str] = ()) -> str:
        """The constraint as an llguidance grammar. ``special_tokens``: the texts of the
        tokenizer's added tokens (``<tool_call>``, …), which a structural tag's strings name
        as tokens rather than spell."""
        import llguidance

        if self.structural_tag is not None:
            return llguidance.LLMatcher.grammar_from_lark(
                _structural_tag_lark(self.structural_tag, special_tokens))
        if self.json is not None or self.json_object:
            schema = dict(self.json) if self.json is not None else {"type": "object"}
            if self.disable_additional_properties:
                schema = _without_additional_properties(schema)
            options = {"whitespace_flexible": not self.disable_any_whitespace}
            if self.whitespace_pattern is not None:
                # Checked on its own: in the schema's grammar its error would name the schema.
                error = llguidance.LLMatcher.validate_grammar(
                    llguidance.LLMatcher.grammar_from_regex(self.whitespace_pattern))
                if error:
                    raise _fail("whitespace_pattern", "a regex", f"{self.whitespace_pattern!r} "
                                f"({error.strip().splitlines()[-1]})")
                options["whitespace_pattern"] = self.whitespace_pattern
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:  # Lark string literals take JSON's escapes
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice))
        return llguidance.LLMatcher.grammar_from_lark(self.grammar)


MAX_STRUCTURES = 64


def _check_structural_tag(tag: Mapping[str, Any] | str) -> dict:
    """vLLM's structural tag as {"structures": ((begin, schema, end), …), "triggers": (…)}."""
    if isinstance(tag, str):
        if len(tag) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.structural_tag must be at most {MAX_SPEC_CHARS} "
                             f"chars, got {len(tag)}")
        try:
            tag = json.loads(tag)
        except json.JSONDecodeError as error:
            raise _fail("structural_tag", "a JSON object", f"text that is not JSON ({error})") from None
    if not isinstance(tag, Mapping):
        raise _fail("structural_tag", 'an object {"structures": [...], "triggers": [...]}', tag)
    if "format" in tag:
        raise ValueError("structured_outputs.structural_tag: the \"format\" form (xgrammar's "
                         "structural tag v2) is not supported; give \"structures\" and \"triggers\"")
    unknown = sorted(set(tag) - {"type", "structures", "triggers"})
    if unknown:
        raise ValueError(f"structured_outputs.structural_tag has unknown key(s) {', '.join(unknown)}; "
                         "its keys are structures, triggers")
    triggers, structures = tag.get("triggers"), tag.get("structures")
    if not isinstance(triggers, Sequence) or isinstance(triggers, str) or not triggers \
            or not all(isinstance(t, str) and t for t in triggers):
        raise _fail("structural_tag.triggers", "a non-empty list of non-empty strings", triggers)
    if not isinstance(structures, Sequence) or isinstance(structures, str) \
            or not 1 <= len(structures) <= MAX_STRUCTURES:
        raise _fail("structural_tag.structures", f"a list of 1 to {MAX_STRUCTURES} objects",
                    structures)
    checked = []
    for i, structure in enumerate(structures):
        where = f"structural_tag.structures[{i}]"
        if not isinstance(structure, Mapping) or set(structure) - {"begin", "schema", "end"}:
            raise _fail(where, 'an object {"begin": str, "schema": {...}, "end": str}', structure)
        begin, schema, end = structure.get("begin"), structure.get("schema", {}), structure.get("end")
        if not isinstance(begin, str) or not isinstance(end, str):
            raise _fail(where, "an object whose begin and end are strings", structure)
        if not isinstance(schema, Mapping):
            raise _fail(f"{where}.schema", "a JSON schema (an object)", schema)
        if not any(begin.startswith(t) for t in triggers):
            raise _fail(f"{where}.begin", f"a string starting with one of the triggers {list(triggers)}",
                        begin)
        checked.append((begin, dict(schema), end))
    return {"structures": tuple(checked), "triggers": tuple(triggers)}


def _lark_string(text: str, special_tokens: Sequence[str]) -> str:
    """``text`` as Lark items: the added tokens it holds named as tokens (``<tool_call>``: in
    llguidance a special token never matches spelled-out text), the rest as string literals."""
    specials = sorted((t for t in special_tokens if t and t in text), key=len, reverse=True)
    items, start, i = [], 0, 0
    while i < len(text):
        token = next((t for t in specials if text.startswith(t, i)), None)
        if token is None:
            i += 1
            continue
        if start < i:
            items.append(json.dumps(text[start:i], ensure_ascii=False))
        items.append(token)
        i = start = i + len(token)
    if start < len(text):
        items.append(json.dumps(text[start:], ensure_ascii=False))
    return " ".join(items)


def _structural_tag_lark(tag: Mapping[str, Any], special_tokens: Sequence[str]) -> str:
    """Free text, and per trigger a tagged segment: the trigger ends the text (a lazy match:
    its first occurrence), then the rest of one of that trigger's structures."""
    segments, rules = [], ["TEXT: /(.|\\n)*/"]
    for i, trigger in enumerate(tag["triggers"]):
        bodies = [" ".join(item for item in (_lark_string(begin[len(trigger):], special_tokens),
                                             "%json " + json.dumps(schema),
                                             _lark_string(end, special_tokens)) if item)
                  for begin, schema, end in tag["structures"] if begin.startswith(trigger)]
        if not bodies:
            continue
        segments.append(f"seg_{i}")
        trigger_items = _lark_string(trigger, special_tokens)
        if any(t in trigger for t in special_tokens if t):
            # A special token cannot occur in TEXT, so it ends TEXT by itself (and may not sit
            # in a lazy terminal).
            rules.append(f"seg_{i}: TEXT {trigger_items} (" + " | ".join(f"({b})" for b in bodies) + ")")
        else:
            rules.append(f"trig_{i}[lazy]: TEXT {trigger_items}")
            rules.append(f"seg_{i}: trig_{i} (" + " | ".join(f"({b})" for b in bodies) + ")")
    return "\n".join(["start: (" + " | ".join(segments) + ")* TEXT", *rules])


# JSON Schema keywords whose value maps names to subschemas, and those whose value is a
# subschema or a list of them. Only these are walked: a property *named* "properties", or an
# "enum" / "const" / "default" value that looks like a schema, is data and stays as it is.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("additionalProperties", "unevaluatedProperties", "propertyNames", "items",
               "prefixItems", "additionalItems", "unevaluatedItems", "contains", "not", "if",
               "then", "else", "allOf", "anyOf", "oneOf")


def _without_additional_properties(schema: Any) -> Any:
    """A copy of ``schema`` in which every object schema listing ``properties`` or
    ``patternProperties`` and saying nothing of ``additionalProperties`` forbids other
    properties (vLLM's disable_additional_properties)."""
    if isinstance(schema, list):
        return [_without_additional_properties(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema  # true / false schemas
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: _without_additional_properties(s) for name, s in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), (Mapping, list)):
            out[key] = _without_additional_properties(out[key])
    if "additionalProperties" not in out and any(
            isinstance(out.get(key), Mapping) for key in ("properties", "patternProperties")):
        out["additionalProperties"] = False
    return out


class GrammarCompiler:
    """Per model: the llguidance view of its tokenizer (built on first use, ~1 s)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = 64):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer = None
        # Grammar text → a matcher in its start state: requests repeating a schema (the usual
        # case) copy it instead of compiling it again. Least recently used first.
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the server validates on its own thread, beside the engine's
        # The added tokens' texts (<tool_call>, <|im_end|>, …): a structural tag names them.
        self.special_tokens = tuple(t["content"] for t in json.loads(tokenizer_json).get("added_tokens", ())
                                    if t.get("content"))

    def _llg_tokenizer(self):
        try:
            import llguidance
        except ImportError:
            raise ValueError("structured_outputs needs the llguidance package "
                             "(pip install llguidance)") from None
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                     eos_token=self._eos)
        return self._tokenizer

    def matcher(self, spec: StructuredOutputs) -> "Matcher":
        """A fresh matcher for one sequence; raises ValueError naming what is wrong with it."""
        tokenizer = self._llg_tokenizer()
        import llguidance

        try:
            grammar = spec.grammar_text(self.special_tokens)
        except ValueError as error:  # llguidance's own errors do not say where they come from
            message = str(error)
            raise ValueError(message if message.startswith("structured_outputs.")
                             else f"structured_outputs: {message}") from None
        with self._lock:
            matcher = self._compiled.get(grammar)
            if matcher is not None:
                self._compiled.move_to_end(grammar)
        if matcher is None:
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if matcher.is_error():
                field = next(n for n in ("json", "regex", "choice", "grammar", "json_object",
                                         "structural_tag") if getattr(spec, n) not in (None, False))
                raise ValueError(f"structured_outputs.{field} does not compile: "
                                 f"{matcher.get_error().strip()[:500]}")
            with self._lock:
                self._compiled[grammar] = matcher
                while len(self._compiled) > self._cache_size:
                    self._compiled.popitem(last=False)
        return Matcher(matcher.deep_copy(), self.vocab_size)


_executor = None  # llguidance.LLExecutor, made on first use


def mask_words(vocab_size: int) -> int:
    """Int32 words of a token bitmask over ``vocab_size`` ids."""
    return (vocab_size + 31) // 32


def only_token_mask(token_id: int, vocab_size: int) -> np.ndarray:
    """The bitmask that allows ``token_id`` alone (a forced token)."""
    words = np.zeros(mask_words(vocab_size), np.uint32)
    words[token_id // 32] = np.uint32(1) << np.uint32(token_id % 32)
    return words.view(np.int32)


@dataclasses.dataclass
class _Thinking:
    """A reasoning model's output before its grammar starts: the grammar waits until the output
    holds ``end`` (``</think>``), read through ``token_bytes``; ``tail`` is what may begin it."""

    end: bytes
    token_bytes: Callable[[int], bytes]
    tail: bytes = b""

    def take(self, token_id: int) -> bool:
        """Follow one token; True once the end has come."""
        text = self.tail + self.token_bytes(token_id)
        if self.end in text:
            return True
        self.tail = text[-(len(self.end) - 1):]
        return False

    def ends_at(self, tokens: Sequence[int]) -> int | None:
        """The index of the token in ``tokens`` that completes the end, if one does (state
        unchanged)."""
        probe = dataclasses.replace(self)
        return next((i for i, t in enumerate(tokens) if probe.take(t)), None)


class Matcher:
    """One sequence's place in its grammar. ``after_reasoning``: the grammar starts once the
    output has closed its reasoning (vLLM's structured outputs with a reasoning parser); until
    then every token is allowed."""

    def __init__(self, matcher, vocab_size: int, thinking: _Thinking | None = None):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._words = mask_words(vocab_size)
        self._thinking = thinking

    def after_reasoning(self, end: str, token_bytes: Callable[[int], bytes]) -> "Matcher":
        """This matcher (in its start state) with its grammar held until the output holds
        ``end``, e.g. "</think>"."""
        return Matcher(self._matcher, self._vocab_size, _Thinking(end.encode(), token_bytes))

    @property
    def thinking(self) -> bool:
        return self._thinking is not None

    def _all_tokens(self) -> np.ndarray:
        return np.full((self._words,), -1, np.int32)

    def bitmask(self) -> np.ndarray:
        """[vocab / 32] int32: bit j of word w set = token 32w + j may come next."""
        if self._thinking is not None:
            return self._all_tokens()
        # llguidance may add a word past the vocabulary; its bits name no token.
        return np.frombuffer(self._matcher.compute_bitmask(), np.int32)[: self._words]

    def copy(self) -> "Matcher":
        """An independent matcher in the same state (each of n sequences needs its own)."""
        thinking = None if self._thinking is None else dataclasses.replace(self._thinking)
        return Matcher(self._matcher.deep_copy(), self._vocab_size, thinking)

    def advance(self, token_id: int) -> bool:
        """Take the sampled token; False if the grammar refuses it (then the matcher is dead)."""
        if self._thinking is not None:
            if self._thinking.take(token_id):
                self._thinking = None  # the grammar starts with the next token
            return True
        return bool(self._matcher.consume_token(token_id))

    def accepted_prefix(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens``, in order, the grammar takes from here (state unchanged):
        the part of a speculative draft worth checking."""
        if self._thinking is not None:
            end = self._thinking.ends_at(tokens)
            if end is None:
                return len(tokens)
            return end + 1 + int(self._matcher.validate_tokens(list(tokens[end + 1:])))
        return int(self._matcher.validate_tokens(list(tokens)))

    def draft_bitmasks(self, draft: Sequence[int]) -> np.ndarray:
        """[len(draft) + 1, vocab / 32]: the mask before each drafted token and the one after
        the last, for a draft the grammar takes whole (``accepted_prefix``); state unchanged."""
        if self._thinking is not None:
            end = self._thinking.ends_at(draft)
            free = len(draft) + 1 if end is None else end + 1  # positions still unconstrained
            masks = [self._all_tokens()] * free
            if end is not None:
                masks += list(Matcher(self._matcher, self._vocab_size).draft_bitmasks(draft[end + 1:]))
            return np.stack(masks)
        masks = [self.bitmask()]
        for token in draft:
            if not self._matcher.consume_token(token):
                raise ValueError(f"the grammar refuses drafted token {token}: {self.error}")
            masks.append(self.bitmask())
        self._matcher.rollback(len(draft))
        return np.stack(masks)

    @staticmethod
    def bitmasks(matchers: Sequence["Matcher"]) -> np.ndarray:
        """[len(matchers), vocab / 32] int32: each matcher's ``bitmask()``, computed side by side
        on llguidance's threads (a step's constrained rows at once)."""
        global _executor
        import llguidance

        if _executor is None:
            _executor = llguidance.LLExecutor()
        width = matchers[0]._words  # the executor takes exactly vocab / 32 words a mask
        out = np.zeros((len(matchers), width), np.int32)
        out[[i for i, m in enumerate(matchers) if m.thinking]] = -1  # reasoning: any token
        grammars = [(m._matcher, i) for i, m in enumerate(matchers) if not m.thinking]
        if grammars:
            _executor.unsafe_compute_mask_ptr(grammars, out.ctypes.data, width * 4, len(matchers))
        return out

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self._thinking is None and bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        return self._matcher.get_error()
