"""A step's device-side inputs as plain numpy: what the runner's ``plan`` makes and ``run``
takes, and what multi-host serving sends from process 0 to the other processes."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np

from qwenjax.model import PackedChunks, StepBatch
from qwenjax.sampling import SamplingBatch

if TYPE_CHECKING:
    from qwenjax.engine.scheduler import ScheduledChunk

NOT_FED = -1  # src of a decode row whose input token the host packed itself


@dataclasses.dataclass
class StepPlan:
    """Everything the device side of one step needs, as plain numpy (sendable to other hosts)."""

    decode_rows: int                          # program key: decode bucket ...
    prefill_tokens: int                       # ... and packed prefill bucket
    decode: tuple[np.ndarray, ...] | None     # StepBatch fields
    prefill: tuple[np.ndarray, ...] | None    # PackedChunks fields
    sampling: SamplingBatch | None            # numpy fields; None: nothing to sample
    num_top: int = 0
    # [decode_rows]: the previous step's sampled row holding each decode row's input token, or
    # NOT_FED where ``decode``'s tokens hold it. None with no decode rows.
    src: np.ndarray | None = None
    # Prompt logprobs: the positions to score as indices into the step's flattened hidden states
    # (decode rows, then the packed prefill tokens), and the prompt token that follows each.
    score_index: np.ndarray | None = None
    score_target: np.ndarray | None = None
    score_top: int = 0
    # Speculative decoding: [max_prefill_seqs × k] indices into the packed prefill tokens whose
    # logits are also sampled (drafted positions); None without a prefill part or drafting.
    drafted: np.ndarray | None = None
    # Pooling requests (qwenjax.pooling): indices into the flattened hidden states of the rows
    # they take, padded to a power of two; and, for MEAN pooling, each flattened row's segment
    # (its request's sum, or ``pool_num_segments``: none). None when no request pools.
    pool_index: np.ndarray | None = None
    pool_segments: np.ndarray | None = None
    pool_num_segments: int = 0

    def to_message(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {"decode_rows": self.decode_rows, "prefill_tokens": self.prefill_tokens,
                "num_top": self.num_top, "has_decode": self.decode is not None,
                "has_prefill": self.prefill is not None, "has_sampling": self.sampling is not None,
                "score_top": self.score_top, "pool_num_segments": self.pool_num_segments}
        arrays = {} if self.src is None else {"src": self.src}
        if self.drafted is not None:
            arrays["drafted"] = self.drafted
        for name in ("pool_index", "pool_segments"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        if self.score_index is not None:
            arrays["score_index"], arrays["score_target"] = self.score_index, self.score_target
        for name, part in (("decode", self.decode), ("prefill", self.prefill)):
            for i, a in enumerate(part or ()):
                arrays[f"{name}.{i}"] = a
        if self.sampling is not None:
            for field in dataclasses.fields(SamplingBatch):
                arrays[f"sampling.{field.name}"] = getattr(self.sampling, field.name)
        # Block tables are max_model_len / page_size wide and mostly zero: send only up to the
        # last column holding anything (about 0.5 MB → a few KB per step at 32k context).
        meta["widths"] = {}
        for name, a in arrays.items():
            if a.ndim == 2 and a.shape[1] > 1:
                used = np.flatnonzero(a.any(axis=0))
                width = int(used[-1]) + 1 if used.size else 0
                if width < a.shape[1]:
                    meta["widths"][name] = a.shape[1]
                    arrays[name] = a[:, :width]
        return meta, arrays

    @classmethod
    def from_message(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "StepPlan":
        arrays = dict(arrays)
        for name, width in meta.get("widths", {}).items():
            a = arrays[name]
            full = np.zeros((a.shape[0], width), a.dtype)
            full[:, : a.shape[1]] = a
            arrays[name] = full

        def part(name, n):
            return tuple(arrays[f"{name}.{i}"] for i in range(n)) if meta[f"has_{name}"] else None

        sampling = None
        if meta["has_sampling"]:
            sampling = SamplingBatch(**{f.name: arrays[f"sampling.{f.name}"]
                                        for f in dataclasses.fields(SamplingBatch)})
        return cls(int(meta["decode_rows"]), int(meta["prefill_tokens"]),
                   part("decode", len(dataclasses.fields(StepBatch))),
                   part("prefill", len(dataclasses.fields(PackedChunks))),
                   sampling, int(meta["num_top"]), arrays.get("src"), arrays.get("score_index"),
                   arrays.get("score_target"), int(meta.get("score_top", 0)),
                   arrays.get("drafted"), arrays.get("pool_index"), arrays.get("pool_segments"),
                   int(meta.get("pool_num_segments", 0)))


# ---- packing a scheduled step into padded arrays ---------------------------------------
def pack_decode(chunks: Sequence[ScheduledChunk], rows: int, pages_per_seq: int) -> tuple:
    """The StepBatch arrays, and ``src``: for a row whose token is still on the device
    (sampled by the step before, not read back), that step's sampled row."""
    tokens = np.zeros((rows, 1), np.int32)
    positions = np.full((rows, 1), -1, np.int32)
    seq_lens = np.zeros((rows,), np.int32)
    tables = np.zeros((rows, pages_per_seq), np.int32)
    lora = np.zeros((rows,), np.int32)
    src = np.full((rows,), NOT_FED, np.int32)
    for i, c in enumerate(chunks):
        request = c.request
        lora[i] = request.lora_slot
        if c.start < request.num_known:
            tokens[i, 0] = request.tokens(c.start, c.start + 1)[0]
        else:  # the one token in flight, from the step dispatched just before this one
            assert request.num_inflight == 1 and request.inflight_row >= 0, request.request_id
            src[i] = request.inflight_row
        positions[i, 0] = c.start
        seq_lens[i] = c.start + 1
        tables[i, : len(request.pages)] = request.page_table()
    return (tokens, positions, seq_lens, tables, lora), src


def attention_slots(tokens: int, prefill_chunk: int) -> int:
    """Query slots per prefill row in attention's view of a step of ``tokens`` packed tokens:
    no chunk is longer than either (a 16-token step, e.g. drafts being checked, attends
    with 16 slots a row, not ``prefill_chunk``)."""
    return min(prefill_chunk, tokens)


def pack_prefill(chunks: Sequence[ScheduledChunk], total: int, rows: int, chunk_len: int,
             pages_per_seq: int) -> tuple | None:
    """The PackedChunks arrays of the prefill chunks, ``total`` tokens (a bucket) packed
    back to back, attention's view ``rows`` × ``chunk_len`` (``attention_slots``)."""
    if total == 0:
        return None
    tokens = np.zeros((total,), np.int32)
    positions = np.full((total,), -1, np.int32)
    token_rows = np.zeros((total,), np.int32)
    token_cols = np.zeros((total,), np.int32)
    row_tokens = np.full((rows, chunk_len), total, np.int32)  # index T = empty slot
    row_positions = np.full((rows, chunk_len), -1, np.int32)
    seq_lens = np.zeros((rows,), np.int32)
    tables = np.zeros((rows, pages_per_seq), np.int32)
    last_token = np.zeros((rows,), np.int32)
    lora = np.zeros((total,), np.int32)
    offset = 0
    for r, c in enumerate(chunks):
        n, span = c.num_tokens, slice(offset, offset + c.num_tokens)
        lora[span] = c.request.lora_slot
        tokens[span] = c.token_ids()
        positions[span] = np.arange(c.start, c.start + n)
        token_rows[span] = r
        token_cols[span] = np.arange(n)
        row_tokens[r, :n] = np.arange(offset, offset + n)
        row_positions[r, :n] = positions[span]
        seq_lens[r] = c.start + n
        tables[r, : len(c.request.pages)] = c.request.page_table()
        last_token[r] = offset + n - 1
        offset += n
    return (tokens, positions, token_rows, token_cols, row_tokens, row_positions, seq_lens, tables,
            last_token, lora)
