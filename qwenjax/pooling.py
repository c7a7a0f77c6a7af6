"""Pooling: embeddings, class probabilities and rewards from the served model (vLLM's
``LLM.embed``/``classify``/``reward``/``encode``, ``/v1/embeddings``, ``/pooling``).

A pooling request runs its prompt like any other (chunked prefill, batched with decoding
requests) and yields final-normed hidden states of its prompt instead of new tokens; on a
checkpoint with a score head (qwenjax/score_head.py) each pooled row also carries the head's
outputs. Which rows (vLLM's pooling types; ``PoolerConfig``):

* sequence tasks (one output per prompt: ``embed``, ``classify``, ``reward`` on an outcome
  reward model): the LAST prompt token (decoder embedders, classifiers, Qwen2.5-Math-RM), the
  MEAN of every prompt token (sentence-transformers' mean pooling), or the first (CLS);
* token tasks (one output per pooled token: ``token_embed``, ``token_classify``, ``reward`` on a
  process reward model such as Qwen2.5-Math-PRM): ALL prompt tokens, or STEP: the tokens equal to
  ``step_tag_id`` (a PRM's step separator, ``<extra_0>``).

Rows are taken on the device from each step's hidden states as the prompt's chunks compute
(``PoolState``; MEAN as one per-chunk sum), so a long prompt never holds all its rows on the
device. A request pooling more than its last token computes every prompt token: the prefix
cache may not supply the rows it still needs. The engine samples one token for a pooling
request too (the step computes that row anyway) and drops it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np


TASKS = ("embed", "classify", "reward", "token_embed", "token_classify")
SEQUENCE_POOLING = ("LAST", "MEAN", "CLS")
TOKEN_POOLING = ("ALL", "STEP")
# Qwen2.5-Math-PRM's step separator "<extra_0>" (vLLM's default step tag for it).
PRM_STEP_TAG_ID = 151651


@dataclasses.dataclass(frozen=True)
class PoolerConfig:
    """How the served model pools (vLLM's ``--pooler-config``): ``seq_pooling_type`` LAST, MEAN
    or CLS for sequence tasks, ``tok_pooling_type`` ALL or STEP (the tokens equal to
    ``step_tag_id``) for token tasks, ``normalize``: whether embeddings are L2-normalized when
    a request does not say."""

    seq_pooling_type: str = "LAST"
    tok_pooling_type: str = "ALL"
    step_tag_id: int | None = None
    normalize: bool = True

    def __post_init__(self):
        if self.seq_pooling_type not in SEQUENCE_POOLING:
            raise ValueError(f"seq_pooling_type must be one of {', '.join(SEQUENCE_POOLING)}, "
                             f"got {self.seq_pooling_type!r}")
        if self.tok_pooling_type not in TOKEN_POOLING:
            raise ValueError(f"tok_pooling_type must be one of {', '.join(TOKEN_POOLING)}, "
                             f"got {self.tok_pooling_type!r}")
        _check_token_id("step_tag_id", self.step_tag_id)
        if self.tok_pooling_type == "STEP" and self.step_tag_id is None:
            raise ValueError("pooling type STEP needs step_tag_id (the token that ends a step)")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")

    @classmethod
    def for_checkpoint(cls, directory, head_kind: str | None) -> "PoolerConfig":
        """The checkpoint's own pooling: STEP at ``<extra_0>`` for a process reward model,
        sentence-transformers' pooling mode (``modules.json`` → ``1_Pooling/config.json``) for
        an embedder that has one, else LAST / ALL."""
        if head_kind == "process_reward":
            return cls(tok_pooling_type="STEP", step_tag_id=PRM_STEP_TAG_ID)
        mode = _sentence_transformers_pooling(Path(directory)) if directory else None
        return cls(seq_pooling_type=mode) if mode else cls()

    def override(self, options: Mapping[str, Any] | str | None) -> "PoolerConfig":
        """This config with vLLM's ``--pooler-config`` JSON (or dict) applied: ``pooling_type``
        (any of LAST, MEAN, CLS, ALL, STEP), ``seq_pooling_type``, ``tok_pooling_type``,
        ``step_tag_id``, ``normalize``."""
        if options is None:
            return self
        if isinstance(options, str):
            try:
                options = json.loads(options)
            except json.JSONDecodeError as e:
                raise ValueError(f"pooler_config is not JSON: {e}") from None
        if not isinstance(options, Mapping):
            raise ValueError(f"pooler_config must be a JSON object, got {options!r}")
        known = ("pooling_type", "seq_pooling_type", "tok_pooling_type", "step_tag_id", "normalize")
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"pooler_config: unknown field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(known)}")
        changes = {k: v for k, v in options.items() if k != "pooling_type" and v is not None}
        kind = options.get("pooling_type")
        if kind is not None:
            kind = str(kind).upper()
            if kind not in SEQUENCE_POOLING + TOKEN_POOLING:
                raise ValueError(f"pooling_type must be one of "
                                 f"{', '.join(SEQUENCE_POOLING + TOKEN_POOLING)}, got {kind!r}")
            changes["seq_pooling_type" if kind in SEQUENCE_POOLING else "tok_pooling_type"] = kind
        for name in ("seq_pooling_type", "tok_pooling_type"):
            if isinstance(changes.get(name), str):
                changes[name] = changes[name].upper()
        return dataclasses.replace(self, **changes)


def _sentence_transformers_pooling(directory: Path) -> str | None:
    """LAST, MEAN or CLS from a sentence-transformers checkpoint's Pooling module; None when
    there is none (or it asks for a mode qwenjax does not have)."""
    try:
        modules = json.loads((directory / "modules.json").read_text())
        path = next(m["path"] for m in modules
                    if m.get("type") == "sentence_transformers.models.Pooling")
        config = json.loads((directory / path / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return None
    for key, mode in (("pooling_mode_lasttoken", "LAST"), ("pooling_mode_mean_tokens", "MEAN"),
                      ("pooling_mode_cls_token", "CLS")):
        if config.get(key):
            return mode
    return None


def _check_token_id(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{name} must be a token id (an int ≥ 0), got {value!r}")


# What each head kind's outputs mean: classifiers and process reward models give class logits
# (softmax), outcome reward models a raw reward.
_SOFTMAX_HEADS = ("classify", "process_reward")
_HEAD_NAMES = {"classify": "Qwen2ForSequenceClassification", "reward": "Qwen2ForRewardModel",
               "process_reward": "Qwen2ForProcessRewardModel"}


@dataclasses.dataclass(frozen=True)
class PoolingParams:
    """``task``: "embed" (the hidden state), "token_embed" (one per pooled token), or, on a
    checkpoint with a score head (qwenjax/score_head.py), "classify" (the softmax of a
    classifier's logits), "reward" (an outcome reward model's raw reward; a process reward
    model's step probabilities), "token_classify" (the head on every pooled token).
    ``normalize``: L2-normalize embeddings (None: the model's default, on). ``dimensions``: keep
    the first this-many embedding values (Matryoshka). ``use_activation``: softmax the head's
    outputs (None: for classifiers and process reward models). ``step_tag_id``: a token task
    pools only the tokens equal to it (None: the model's pooler config).
    ``truncate_prompt_tokens``: pool only the prompt's last k tokens (-1: the max context)."""

    normalize: bool | None = None
    dimensions: int | None = None
    task: str = "embed"
    use_activation: bool | None = None
    step_tag_id: int | None = None
    truncate_prompt_tokens: int | None = None

    @property
    def n(self) -> int:
        """One output per prompt (as SamplingParams.n = 1, for code that handles both)."""
        return 1

    def __post_init__(self):
        for name in ("normalize", "use_activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        d = self.dimensions
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"dimensions must be a positive int, got {d!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not self.task.endswith("embed") and d is not None:
            raise ValueError(f"dimensions applies to embeddings, not to task {self.task!r}")
        _check_token_id("step_tag_id", self.step_tag_id)
        k = self.truncate_prompt_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or (k < 1 and k != -1)):
            raise ValueError(f"truncate_prompt_tokens must be None, -1 (the max context) or an "
                             f"int ≥ 1, got {k!r}")

    def per_token(self, head_kind: str | None) -> bool:
        """Whether the answer has one entry per pooled token (a token task) or one per prompt."""
        return self.task.startswith("token_") or (self.task == "reward" and head_kind == "process_reward")

    def rows(self, config: PoolerConfig, head_kind: str | None) -> tuple[str, int | None]:
        """(pooling type, step tag) of this request on a model pooling as ``config``."""
        if not self.per_token(head_kind):
            return config.seq_pooling_type, None
        tag = self.step_tag_id if self.step_tag_id is not None else (
            config.step_tag_id if config.tok_pooling_type == "STEP" else None)
        return ("ALL", None) if tag is None else ("STEP", tag)

    def check(self, hidden_size: int, head_kind: str | None = None,
              config: PoolerConfig = PoolerConfig()) -> None:
        """Whether the served model can answer: ``head_kind`` is its score head's ("classify",
        "reward", "process_reward"; None: a causal LM)."""
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise ValueError(f"dimensions is {self.dimensions}; the model's embeddings have "
                             f"{hidden_size}")
        wants = {"classify": ("classify",), "reward": ("reward", "process_reward"),
                 "token_classify": tuple(_HEAD_NAMES)}.get(self.task)
        if wants is not None and head_kind not in wants:
            have = f"a {head_kind} head" if head_kind else "no score head (a causal LM)"
            raise ValueError(f"task {self.task!r} needs a checkpoint with a {self.task} head "
                             f"({' or '.join(_HEAD_NAMES[k] for k in wants)}); the served model "
                             f"has {have}")
        kind, _ = self.rows(config, head_kind)
        if kind == "MEAN" and not self.task.endswith("embed"):
            raise ValueError(f"MEAN pooling gives embeddings; task {self.task!r} reads the score "
                             "head on one token (pooling type LAST or CLS)")

    def apply(self, pooled: np.ndarray, hidden_size: int, head_kind: str | None = None,
              config: PoolerConfig = PoolerConfig()):
        """The answer from a request's pooled rows ([rows, hidden_size (+ head outputs)]): one
        list of floats for a sequence task, a list of them (one per pooled token) for a token
        task."""
        pooled = np.atleast_2d(np.asarray(pooled, np.float32))
        if self.task.endswith("embed"):
            values = pooled[:, :hidden_size][:, : self.dimensions].astype(np.float64)
            if (self.normalize if self.normalize is not None else config.normalize):
                values = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
        else:
            values = pooled[:, hidden_size:].astype(np.float64)
            softmax = self.use_activation
            if softmax is None:
                softmax = self.task == "classify" or head_kind in _SOFTMAX_HEADS
            if softmax and values.size:
                values = np.exp(values - values.max(axis=1, keepdims=True))
                values = values / values.sum(axis=1, keepdims=True)
        return values.tolist() if self.per_token(head_kind) else values[0].tolist()


class PoolState:
    """What one pooling request has pooled of its prompt so far (engine side): the runner takes
    each chunk's positions to pool (``take``) and hands back their rows (``add_rows``) or, for
    MEAN, their sum (``add_sum``); ``result`` once the prompt is computed."""

    def __init__(self, kind: str, step_tag_id: int | None, prompt_ids):
        self.kind, self.step_tag_id, self.prompt_ids = kind, step_tag_id, prompt_ids
        self.planned = 0  # positions before this are planned: their rows are on their way
        self.rows: list[np.ndarray] = []
        self.total: np.ndarray | None = None

    @property
    def mean(self) -> bool:
        return self.kind == "MEAN"

    def take(self, start: int, end: int) -> list[int]:
        """The positions of the computed chunk [start, end) to pool; each is taken once, even
        when a preempted request computes its prompt again."""
        n = len(self.prompt_ids)
        first, end = max(start, self.planned), min(end, n)
        if first >= end:
            return []
        self.planned = end
        if self.kind == "LAST":
            return [n - 1] if end == n else []
        if self.kind == "CLS":
            return [0] if first == 0 else []
        if self.kind == "STEP":
            return [p for p in range(first, end) if self.prompt_ids[p] == self.step_tag_id]
        return list(range(first, end))  # ALL, MEAN

    @property
    def cacheable(self) -> int:
        """Leading prompt positions the prefix cache may supply (their rows are not needed)."""
        if self.kind == "LAST" or (self.kind == "CLS" and self.planned):
            return len(self.prompt_ids)
        return self.planned

    def add_rows(self, rows: np.ndarray) -> None:
        self.rows.append(np.asarray(rows, np.float32))

    def add_sum(self, total: np.ndarray) -> None:
        total = np.asarray(total, np.float64)
        self.total = total if self.total is None else self.total + total

    def result(self) -> np.ndarray:
        """[rows, width] float32: the mean as one row, or the pooled rows in prompt order."""
        if self.mean:
            return (self.total / len(self.prompt_ids)).astype(np.float32)[None]
        return np.concatenate(self.rows) if self.rows else np.zeros((0, 0), np.float32)


class HiddenStates(PoolState):
    """A generation request's rows with ``return_hidden_states``: every position the model is
    fed (the prompt, then each generated token as the next step feeds it), each taken once."""

    def __init__(self, prompt_ids):
        super().__init__("ALL", None, prompt_ids)

    def take(self, start: int, end: int) -> list[int]:
        first, self.planned = max(start, self.planned), max(end, self.planned)
        return list(range(first, end))

    @property
    def cacheable(self) -> int:
        return self.planned

    def first(self, length: int) -> np.ndarray:
        """[length, hidden] float32: the rows of positions 0 … length − 1."""
        return self.result()[:length]


def score_pairs(num_first: int, num_second: int) -> list[tuple[int, int]]:
    """The (i, j) pairs vLLM's scoring takes, indexing first + second: one first text against
    each second one, or two lists of one length pairwise."""
    if num_first == 1:
        return [(0, 1 + j) for j in range(num_second)]
    if num_first == num_second:
        return [(i, num_first + i) for i in range(num_first)]
    raise ValueError(f"text_1 has {num_first} texts and text_2 {num_second}: give text_1 one "
                     "text, or both lists of one length (scored pairwise)")


def cosine(a, b) -> float:
    """The cosine similarity of two embeddings."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


@dataclasses.dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclasses.dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclasses.dataclass
class PoolingOutput:
    data: list[float]


@dataclasses.dataclass
class ScoringOutput:
    score: float


@dataclasses.dataclass
class ScoringRequestOutput:
    """``LLM.score``'s result for one pair (vLLM's: ``.outputs.score``)."""

    request_id: str
    prompt_token_ids: list[int]  # the two texts' ids, one after the other
    outputs: ScoringOutput
    num_cached_tokens: int = 0  # of both texts' prompts, found in the prefix cache
    finished: bool = True  # (vLLM's PoolingRequestOutput field: a result comes once both are)


@dataclasses.dataclass
class _PooledRequestOutput:
    """One prompt's result, vLLM's shape (``.outputs``, ``.num_cached_tokens``,
    ``.finished``), from a pooling request's last RequestOutput (``of``)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: Any
    num_cached_tokens: int = 0  # prompt tokens whose K/V the prefix cache supplied
    finished: bool = True  # a pooling result is whole when it is returned
    wrap: ClassVar[type]

    @classmethod
    def of(cls, output):
        return cls(output.request_id, output.prompt_token_ids, cls.wrap(output.embedding),
                   output.num_cached_tokens, output.finished)


class EmbeddingRequestOutput(_PooledRequestOutput):
    """``LLM.embed``'s result (``.outputs.embedding``)."""

    wrap = EmbeddingOutput


class ClassificationRequestOutput(_PooledRequestOutput):
    """``LLM.classify``'s result (``.outputs.probs``)."""

    wrap = ClassificationOutput


class PoolingRequestOutput(_PooledRequestOutput):
    """``LLM.reward``'s result (``.outputs.data``: the reward)."""

    wrap = PoolingOutput
