"""Sampling defaults from a checkpoint's ``generation_config.json``, as vLLM's ``--generation-config``.

Model authors publish the sampling their model was tuned for (Qwen2.5-72B-Instruct:
temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05). A request that leaves
a field unset gets the model's value; a field the request sets always wins. The
choices, named as in vLLM:

* ``"auto"`` (default) — the model directory's ``generation_config.json``;
* ``"builtin"`` — qwenjax's own defaults (``SamplingParams()``: temperature 1.0, no
  top-k/top-p, no penalty), the file is ignored (vLLM calls this ``"vllm"``);
* a directory path — the ``generation_config.json`` inside it.

Only sampling fields are taken: temperature, top_k, top_p, min_p, repetition_penalty
and max_new_tokens (→ ``max_tokens``). As in vLLM, ``do_sample`` is not read: a file
with ``do_sample: false`` and a temperature still samples at that temperature.
Stop ids come from the same file through the tokenizer (``eos_token_id``), whatever
the choice here.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

from qwenjax.sampling import SamplingParams

FILE_NAME = "generation_config.json"

# generation_config.json key → SamplingParams field.
_FIELDS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def read_sampling_defaults(directory: str | pathlib.Path) -> dict[str, Any]:
    """The sampling fields of ``directory/generation_config.json`` ({} without the file).

    Raises ValueError naming the file and the field when a value is out of range.
    """
    path = pathlib.Path(directory) / FILE_NAME
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    defaults = {field: config[key] for key, field in _FIELDS.items() if config.get(key) is not None}
    return _checked(defaults, str(path))


def sampling_defaults(model_dir: str | pathlib.Path | None, choice: str = "auto",
                      overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults a request's unset sampling fields take.

    ``model_dir``: the checkpoint directory (None for random-weight presets: no file).
    ``choice``: "auto", "builtin" or a directory holding a generation_config.json.
    ``overrides``: generation_config-style keys ({"temperature": 0.2}) applied on top, as
    vLLM's ``--override-generation-config``.
    """
    if choice == "auto":
        defaults = read_sampling_defaults(model_dir) if model_dir is not None else {}
    elif choice in ("builtin", "vllm"):  # "vllm": vLLM's name for the same choice
        defaults = {}
    else:
        directory = pathlib.Path(choice)
        if not (directory / FILE_NAME).is_file():
            raise ValueError(f"generation_config {choice!r} is neither 'auto', 'builtin' ('vllm') nor a "
                             f"directory holding {FILE_NAME}")
        defaults = read_sampling_defaults(directory)
    if overrides:
        unknown = sorted(set(overrides) - set(_FIELDS))
        if unknown:
            raise ValueError(f"override_generation_config has {', '.join(map(repr, unknown))}; "
                             f"the keys it takes are {', '.join(_FIELDS)}")
        defaults.update(_checked({_FIELDS[k]: v for k, v in overrides.items()},
                                 "override_generation_config"))
    return defaults


def apply_defaults(defaults: Mapping[str, Any], fields: Mapping[str, Any] | None = None, *,
                   room: int | None = None) -> SamplingParams:
    """``SamplingParams`` from the ``fields`` a request set, the unset ones from ``defaults``.

    ``room``: how many tokens the request can still generate (max context + 1 − prompt
    length). An unset max_tokens is capped to it, as vLLM does, so that leaving the field
    unset never gets a long prompt refused; a max_tokens the request set is kept and checked.
    """
    fields = dict(fields or {})
    merged = {**defaults, **fields}
    if room is not None and "max_tokens" not in fields:
        merged["max_tokens"] = max(1, min(merged.get("max_tokens", SamplingParams.max_tokens), room))
    return SamplingParams(**merged)


def describe(defaults: Mapping[str, Any]) -> str:
    if not defaults:
        return "qwenjax built-in sampling defaults"
    return "sampling defaults " + ", ".join(f"{k}={v}" for k, v in sorted(defaults.items()))


def _checked(defaults: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        params = SamplingParams(**defaults)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    # As SamplingParams stores them: ints for top_k and max_tokens, floats elsewhere.
    return {name: getattr(params, name) for name in defaults}
