"""Score heads of Qwen2 classification and reward checkpoints (vLLM's ``LLM.classify`` and
``LLM.reward``, SGLang's ``/classify``).

Two architectures put a small head on the final-normed hidden state of the last token instead
of the LM head:

* ``Qwen2ForSequenceClassification`` (transformers): ``score.weight`` [num_labels, hidden], no
  bias; the class probabilities are the softmax of its logits (labels from ``id2label``);
* ``Qwen2ForRewardModel`` (Qwen2.5-Math-RM-72B): ``score.0`` Linear(hidden, hidden) with bias,
  ReLU, ``score.2`` Linear(hidden, num_labels) with bias; the reward is its raw output;
* ``Qwen2ForProcessRewardModel`` (Qwen2.5-Math-PRM-7B/72B): the same two layers with 2 labels,
  read at every step separator token; a step's reward is the softmax's second probability.

The backbone is an ordinary Qwen2 decoder and loads as one; such a checkpoint has no
``lm_head``, so the step's (unused) token logits come from the embedding table, as for tied
embeddings. The head's few matrices are replicated on every device and run on the step's
pooled rows (engine/runner.py), in float32.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ARCHITECTURES = {"Qwen2ForSequenceClassification": "classify", "Qwen2ForRewardModel": "reward",
                 "Qwen2ForProcessRewardModel": "process_reward"}


def head_kind(directory: str | os.PathLike) -> str | None:
    """"classify", "reward" or "process_reward" for a checkpoint with a score head (by ``architectures``), None
    for a causal LM."""
    path = Path(directory) / "config.json"
    return _kind(json.loads(path.read_text())) if path.is_file() else None


def _kind(raw: dict) -> str | None:
    kinds = {ARCHITECTURES[a] for a in raw.get("architectures") or () if a in ARCHITECTURES}
    return kinds.pop() if len(kinds) == 1 else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ScoreHead:
    """Linear layers (ReLU between them): ``weights[i]`` [out, in], ``biases[i]`` [out] or None."""

    weights: list[jax.Array]
    biases: list[jax.Array | None]
    kind: str = dataclasses.field(metadata=dict(static=True))
    labels: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def num_labels(self) -> int:
        return self.weights[-1].shape[0]

    def __call__(self, rows: jax.Array) -> jax.Array:
        """[N, hidden] float32 → [N, num_labels] float32."""
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i:
                rows = jax.nn.relu(rows)
            rows = jnp.einsum("ne,le->nl", rows, w.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)
            if b is not None:
                rows = rows + b.astype(jnp.float32)
        return rows


def load_score_head(directory: str | os.PathLike, hidden_size: int, mesh: Mesh) -> ScoreHead:
    """The score head of the checkpoint in ``directory`` (``head_kind`` is not None), replicated
    over ``mesh``; raises ValueError naming a missing or misshapen tensor."""
    from qwenjax.weights import Checkpoint

    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    kind = _kind(raw)
    ckpt = Checkpoint(directory)
    names = ["score.weight"] if kind == "classify" else ["score.0.weight", "score.2.weight"]
    weights, biases = [], []
    for name in names:
        if name not in ckpt:
            raise ValueError(f"{directory}: a {kind} checkpoint needs {name}; it is missing")
        weights.append(np.asarray(ckpt.tensor(name), np.float32))
        bias = name.replace(".weight", ".bias")
        biases.append(np.asarray(ckpt.tensor(bias), np.float32) if bias in ckpt else None)
    inputs = hidden_size
    for name, w in zip(names, weights):
        if w.ndim != 2 or w.shape[1] != inputs:
            raise ValueError(f"{directory}: {name} is {tuple(w.shape)}; expected [out, {inputs}]")
        inputs = w.shape[0]
    num_labels = weights[-1].shape[0]
    id2label = raw.get("id2label") or {}
    labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels))
    replicated = NamedSharding(mesh, PartitionSpec())
    put = lambda a: None if a is None else jax.device_put(a, replicated)  # noqa: E731
    return ScoreHead([put(w) for w in weights], [put(b) for b in biases], kind, labels)
