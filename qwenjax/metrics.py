"""The engine's counters, and vLLM's ``LLM.get_metrics()`` over them: a list of small metric
objects (vLLM's ``vllm.v1.metrics.reader`` shapes: ``Counter``, ``Gauge``, ``Histogram``, each
with ``name`` and ``labels``) under vLLM's names (``vllm:prompt_tokens``, ``vllm:kv_cache_usage_perc``, …),
the names the server's ``/metrics`` gives the same series (server/metrics.py, METRIC_ALIASES).

The counters count from the engine's start: vLLM's offline counters do too.
"""
from __future__ import annotations

import collections
import dataclasses

from prometheus_client.utils import floatToGoString

# How a sequence can end (RequestOutput.finish_reason); vLLM's request_success has a series
# for each, under its label finished_reason.
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclasses.dataclass
class EngineStats:
    """What the engine has run so far, counted per sequence (a request with n > 1 is n
    sequences, as vLLM v1 counts its child requests)."""

    prompt_tokens: int = 0  # prompt tokens of sequences whose prompt was computed (once each,
    #                         however often preemption makes it compute them again)
    generation_tokens: int = 0  # tokens generated (a pooling request's dropped token is not)
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    #                                 sequences ended, by finish reason
    step_tokens: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    #                                    steps dispatched, by the tokens each computed (vLLM's
    #                                    iteration_tokens_total)


# vLLM's buckets for the tokens of a step (its iteration_tokens_total).
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def cumulative_buckets(counts: collections.Counter, bounds) -> list[tuple[str, int]]:
    """Prometheus histogram buckets of the values tallied in ``counts`` (value → how often):
    (upper bound as Prometheus writes it: "16.0", how many are ≤ it), "+Inf" last."""
    buckets = [(floatToGoString(bound), sum(n for value, n in counts.items() if value <= bound))
               for bound in bounds]
    return buckets + [("+Inf", sum(counts.values()))]


@dataclasses.dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclasses.dataclass
class Counter(Metric):
    """A count since the engine started."""

    value: int


@dataclasses.dataclass
class Gauge(Metric):
    """A value of this moment."""

    value: float


@dataclasses.dataclass
class Histogram(Metric):
    """Observations since the engine started: ``count``, ``sum``, and ``buckets`` (upper
    bound → how many observations are ≤ it, cumulative as Prometheus's, +Inf last)."""

    count: int
    sum: float
    buckets: dict[str, int]


def engine_metrics(stats: EngineStats, *, num_running: int, num_waiting: int,
                   num_preemptions: int, prefix_cache_stats, pages_used: int, pages_total: int,
                   spec_stats=None) -> list[Metric]:
    """vLLM's metric list from the engine's tallies: ``prefix_cache_stats`` (queries, hits;
    None when prefix caching is off: nothing is looked up), ``spec_stats`` (num_drafts,
    num_draft_tokens, num_accepted_tokens; None without speculative decoding)."""
    metrics: list[Metric] = [
        Gauge("vllm:num_requests_running", {}, float(num_running)),
        Gauge("vllm:num_requests_waiting", {}, float(num_waiting)),
        Gauge("vllm:kv_cache_usage_perc", {}, pages_used / pages_total if pages_total else 0.0),
        Counter("vllm:prompt_tokens", {}, stats.prompt_tokens),
        Counter("vllm:generation_tokens", {}, stats.generation_tokens),
        *(Counter("vllm:request_success", {"finished_reason": reason}, stats.finished[reason])
          for reason in FINISH_REASONS),
        Counter("vllm:num_preemptions", {}, num_preemptions),
        Counter("vllm:prefix_cache_queries", {},
                prefix_cache_stats.queries if prefix_cache_stats is not None else 0),
        Counter("vllm:prefix_cache_hits", {},
                prefix_cache_stats.hits if prefix_cache_stats is not None else 0),
    ]
    metrics.append(Histogram("vllm:iteration_tokens_total", {}, sum(stats.step_tokens.values()),
                             float(sum(k * n for k, n in stats.step_tokens.items())),
                             dict(cumulative_buckets(stats.step_tokens, STEP_TOKEN_BUCKETS))))
    if spec_stats is not None:
        metrics += [Counter(f"vllm:spec_decode_{field}", {}, getattr(spec_stats, field))
                    for field in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")]
    return metrics
