"""Prometheus metrics of one server, in a registry of its own (several servers can share a process).

Engine gauges are read when scraped rather than pushed from the engine thread: the
engine loop stays free of metrics code, and a scrape sees the state of that moment.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from qwenjax.metrics import STEP_TOKEN_BUCKETS, cumulative_buckets

# Seconds. TTFT on a loaded GPU server is tens of ms; on CPU or behind a long queue, seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
# Seconds per output token: a 72B decode step on a GPU is 10-50 ms; on a CPU, ~0.1-1 s.
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 131072)


class _EngineCounters:
    """Counters kept by the engine itself (one object's fields), read when scraped."""

    def __init__(self, engines: Callable[[], Sequence], stats: Callable[[object], object | None],
                 counters: tuple[tuple[str, str, str], ...]):
        """``stats``: an engine's tally object (None: none); ``counters``: (name, doc, field),
        summed over the engines (data-parallel replicas)."""
        self._engines, self._stats, self._counters = engines, stats, counters

    def describe(self):
        return self._families([])

    def collect(self):
        return self._families([s for s in map(self._stats, self._engines()) if s is not None])

    def _families(self, stats: list):
        for name, doc, field in self._counters:
            family = CounterMetricFamily(name, doc)
            family.add_metric([], sum(getattr(s, field) for s in stats))
            yield family


PREFIX_CACHE_COUNTERS = (
    ("qwenjax:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "queries"),
    ("qwenjax:prefix_cache_hits", "Prompt tokens found in the prefix cache", "hits"),
    ("qwenjax:prefix_cache_evictions", "Cached KV pages evicted for new contents", "evictions"))
HOST_CACHE_COUNTERS = (
    ("qwenjax:kv_offload_pages_stored", "Evicted KV pages copied to host memory (--kv-offloading-size)",
     "stored"),
    ("qwenjax:kv_offload_pages_restored", "KV pages copied back from host memory instead of "
     "recomputed", "restored"),
    ("qwenjax:kv_offload_pages_dropped", "KV pages dropped from host memory for room", "dropped"))
# vLLM's spec_decode names.
SPEC_DECODE_COUNTERS = (
    ("qwenjax:spec_decode_num_drafts", "Decode steps of a request that checked drafts", "num_drafts"),
    ("qwenjax:spec_decode_num_draft_tokens", "Draft tokens checked", "num_draft_tokens"),
    ("qwenjax:spec_decode_num_accepted_tokens", "Draft tokens accepted (each one a token gained "
     "over plain decoding)", "num_accepted_tokens"))


class _StepTokens:
    """The tokens each engine step computed, a histogram read from the engines' tallies when
    scraped (vLLM's iteration_tokens_total, with its buckets)."""

    NAME = "qwenjax:iteration_tokens"
    DOC = "Tokens computed per engine step (prompt chunks and decoded tokens)"

    def __init__(self, engines: Callable[[], Sequence]):
        self._engines = engines

    def describe(self):
        return [HistogramMetricFamily(self.NAME, self.DOC)]

    def collect(self):
        counts = collections.Counter()
        for engine in self._engines():
            # A copy first (one C call under the GIL): the engine thread adds keys meanwhile.
            counts.update(dict(engine.stats.step_tokens))
        family = HistogramMetricFamily(self.NAME, self.DOC)
        family.add_metric([], cumulative_buckets(counts, STEP_TOKEN_BUCKETS),
                          sum_value=float(sum(k * n for k, n in counts.items())))
        yield family


SCHEDULER_COUNTERS = (
    ("qwenjax:num_preemptions", "Running requests sent back to the queue for lack of KV pages "
     "(their K/V recomputed when they resume)", "num_preemptions"),)


# The core series again under the names vLLM's and SGLang's servers give them, so that their
# dashboards, alerts and autoscalers (KEDA, HPA adapters) read a qwenjax server unchanged: family
# name here → theirs (or several names). Every aliased series carries their ``model_name``
# label. What has no entry has no counterpart there. (qwenjax's time_per_output_token is a
# request's average, vLLM's request_time_per_output_token; the per-token gaps are
# inter_token_latency.)
METRIC_ALIASES: dict[str, dict[str, str | tuple[str, ...]]] = {
    "vllm": {
        "qwenjax:requests_running": "vllm:num_requests_running",
        "qwenjax:requests_waiting": "vllm:num_requests_waiting",
        "qwenjax:kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
        "qwenjax:prompt_tokens": "vllm:prompt_tokens",
        "qwenjax:generation_tokens": "vllm:generation_tokens",
        "qwenjax:requests": "vllm:request_success",
        "qwenjax:time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
        "qwenjax:e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
        "qwenjax:request_queue_time_seconds": "vllm:request_queue_time_seconds",
        "qwenjax:request_prefill_time_seconds": "vllm:request_prefill_time_seconds",
        "qwenjax:request_decode_time_seconds": "vllm:request_decode_time_seconds",
        "qwenjax:time_per_output_token_seconds": "vllm:request_time_per_output_token_seconds",
        # (vLLM's older name for its inter-token latency, still read by its dashboards, too.)
        "qwenjax:inter_token_latency_seconds": ("vllm:inter_token_latency_seconds",
                                                "vllm:time_per_output_token_seconds"),
        "qwenjax:request_prompt_tokens": "vllm:request_prompt_tokens",
        "qwenjax:request_generation_tokens": "vllm:request_generation_tokens",
        "qwenjax:num_preemptions": "vllm:num_preemptions",
        "qwenjax:prefix_cache_queries": "vllm:prefix_cache_queries",
        "qwenjax:prefix_cache_hits": "vllm:prefix_cache_hits",
        "qwenjax:spec_decode_num_drafts": "vllm:spec_decode_num_drafts",
        "qwenjax:spec_decode_num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
        "qwenjax:spec_decode_num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
        "qwenjax:iteration_tokens": "vllm:iteration_tokens_total",
    },
    "sglang": {
        "qwenjax:requests_running": "sglang:num_running_reqs",
        "qwenjax:requests_waiting": "sglang:num_queue_reqs",
        "qwenjax:kv_cache_usage_perc": "sglang:token_usage",
        "qwenjax:prompt_tokens": "sglang:prompt_tokens",
        "qwenjax:generation_tokens": "sglang:generation_tokens",
        "qwenjax:requests": "sglang:num_requests",
        "qwenjax:time_to_first_token_seconds": "sglang:time_to_first_token_seconds",
        "qwenjax:e2e_request_latency_seconds": "sglang:e2e_request_latency_seconds",
        "qwenjax:request_queue_time_seconds": "sglang:queue_time_seconds",
        "qwenjax:time_per_output_token_seconds": "sglang:time_per_output_token_seconds",
        "qwenjax:inter_token_latency_seconds": "sglang:inter_token_latency_seconds",
        "qwenjax:num_preemptions": "sglang:num_retracted_requests",
        "qwenjax:kv_tokens_used": "sglang:num_used_tokens",
        "qwenjax:prefix_cache_hit_rate": "sglang:cache_hit_rate",
        "qwenjax:generation_throughput": "sglang:gen_throughput",
    },
}
# Label names they spell otherwise.
ALIAS_LABELS: dict[str, dict[str, str]] = {"vllm": {"finish_reason": "finished_reason"}}


def check_aliases(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` of METRIC_ALIASES, each once (a series declared twice fails the whole scrape)."""
    unknown = sorted(set(names) - set(METRIC_ALIASES))
    if unknown:
        raise ValueError(f"metrics aliases {unknown} unknown; choose from {sorted(METRIC_ALIASES)}")
    return tuple(dict.fromkeys(names))


class _Aliased:
    """The series of ``source`` named in ``names``, renamed, with ``model_name`` added to their
    labels (nothing while ``model_name()`` is None: the model is still loading)."""

    def __init__(self, source: CollectorRegistry, names: Mapping[str, str | tuple[str, ...]],
                 labels: Mapping[str, str], model_name: Callable[[], str | None]):
        self._source, self._names, self._labels, self._model_name = source, names, labels, model_name

    def describe(self):
        return []  # names are checked in the core registry; these only mirror them

    def collect(self):
        model = self._model_name()
        if model is None:
            return
        for family in self._source.collect():
            names = self._names.get(family.name, ())
            for name in (names,) if isinstance(names, str) else names:
                alias = Metric(name, family.documentation, family.type)
                for sample in family.samples:
                    labels = {"model_name": model}
                    labels.update((self._labels.get(k, k), v) for k, v in sample.labels.items())
                    alias.add_sample(name + sample.name[len(family.name):], labels, sample.value,
                                     sample.timestamp, sample.exemplar)
                yield alias


class _VLLMInfo:
    """vLLM's info series that routers read besides the counters: ``vllm:cache_config_info``
    (the KV cache's shape: the Gateway API inference extension and llm-d score prefix reuse
    with its block_size and num_gpu_blocks) and, on a model with LoRA slots,
    ``vllm:lora_requests_info`` (the adapters of the running and waiting requests, for
    LoRA-aware routing; its value the time of the scrape, as vLLM's is the time of its update)."""

    def __init__(self, engines: Callable[[], Sequence]):
        self._engines = engines

    def describe(self):
        return []

    def collect(self):
        engines = self._engines()
        if not engines:
            return
        engine = engines[0]
        cache = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache "
                                  "(vLLM's labels)", labels=["block_size", "num_gpu_blocks",
                                                              "cache_dtype", "enable_prefix_caching",
                                                              "gpu_memory_utilization"])
        config = engine.config
        cache.add_metric([str(engine.scheduler_config.page_size),
                          str(sum(e.allocator.num_pages for e in engines)),
                          config.kv_cache_dtype, str(config.enable_prefix_caching),
                          str(config.kv_cache_fraction)], 1.0)
        yield cache
        if engine.loras.capacity == 0:
            return
        lora = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting LoRA adapters "
                                 "(vLLM's labels)", labels=["max_lora", "running_lora_adapters",
                                                            "waiting_lora_adapters"])

        def adapters(queue: str) -> str:
            # (A tuple first: the engine thread changes the queue meanwhile; copying it is
            # one step under the interpreter lock, iterating it is not.)
            names = {r.lora_name for e in engines for r in tuple(getattr(e.scheduler, queue))
                     if r.lora_name is not None}
            return ",".join(sorted(names))

        lora.add_metric([str(engine.loras.capacity), adapters("running"), adapters("waiting")],
                        time.time())
        yield lora


class _Everything:
    """A registry's series, served from another registry."""

    def __init__(self, source: CollectorRegistry):
        self._source = source

    def describe(self):
        return []

    def collect(self):
        return self._source.collect()


def _usage(engines: Sequence) -> float:
    total = sum(e.allocator.num_pages for e in engines)
    return sum(e.allocator.num_used for e in engines) / total if total else 0.0


def _hit_rate(engines: Sequence) -> float:
    stats = [e.prefix_cache.stats for e in engines if e.prefix_cache is not None]
    queries = sum(s.queries for s in stats)
    return sum(s.hits for s in stats) / queries if queries else 0.0


class _Throughput:
    """Tokens generated per second over the last ``window`` seconds or so, from the engines'
    running count read at each scrape (SGLang's gen_throughput: the rate over its last logging
    interval): against the last read at least ``window`` old, else the oldest (the first read
    gives 0)."""

    # Reads closer together than this give the last value again (one scrape reads the gauge
    # once for qwenjax:* and once for each alias, a moment apart).
    MIN_INTERVAL = 1.0

    def __init__(self, count: Callable[[], int], window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self._count, self._window, self._clock = count, window, clock
        self._reads: list[tuple[float, int]] = []
        self._rate = 0.0
        self._lock = threading.Lock()  # (two scrapers at once)

    def __call__(self) -> float:
        with self._lock:
            now = self._clock()
            if self._reads and now - self._reads[-1][0] < self.MIN_INTERVAL:
                return self._rate
            count = self._count()
            if self._reads and count < self._reads[-1][1]:
                self._reads.clear()  # the engines changed (a reload): start again
            self._reads.append((now, count))
            # Keep the reads of the window, and one before it (the baseline).
            while len(self._reads) > 2 and self._reads[1][0] <= now - self._window:
                self._reads.pop(0)
            then, before = self._reads[0]
            self._rate = (count - before) / (now - then) if now > then else 0.0
            return self._rate


class ServerMetrics:
    def __init__(self, engines: Callable[[], Sequence],
                 in_flight: Callable[[], int] | None = None,
                 model_name: Callable[[], str | None] = lambda: None,
                 aliases: Sequence[str] = ()):
        """``engines``: returns the served engines (several with data-parallel replicas; none
        while the model is loading); gauges and counters sum over them.
        ``in_flight``: Generate calls this server is running.
        ``aliases``: also serve the series under these servers' names (METRIC_ALIASES: "vllm",
        "sglang"), labelled with ``model_name()`` (the name the API reports; None while loading).
        """
        aliases = check_aliases(aliases)
        # The qwenjax:* series live in a registry of their own; ``registry`` (what /metrics
        # serves) holds them and their aliases.
        self.core = registry = CollectorRegistry()
        self.registry = CollectorRegistry()
        self.registry.register(_Everything(self.core))
        for server in aliases:
            self.registry.register(_Aliased(self.core, METRIC_ALIASES[server],
                                            ALIAS_LABELS.get(server, {}), model_name))
        if "vllm" in aliases:
            self.registry.register(_VLLMInfo(engines))
        self.requests = Counter(
            "qwenjax:requests_total", "Generate requests the engine ran, by how they ended "
            "(stop, length, abort = cancelled/deadline/Abort, error = failed step)",
            ["finish_reason"], registry=registry)
        self.rejected = Counter(
            "qwenjax:requests_rejected_total", "Generate requests refused before reaching the engine, "
            "by gRPC status", ["code"], registry=registry)
        self.prompt_tokens = Counter("qwenjax:prompt_tokens_total", "Prompt tokens of admitted requests",
                                     registry=registry)
        self.generation_tokens = Counter("qwenjax:generation_tokens_total",
                                         "Tokens generated and streamed to clients", registry=registry)
        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=registry)

        self.ttft = histogram("qwenjax:time_to_first_token_seconds", "Admission to first streamed "
                              "token", TTFT_BUCKETS)
        self.e2e = histogram("qwenjax:e2e_request_latency_seconds", "Admission to the end of the "
                             "request", E2E_BUCKETS)
        # Where a request's time goes, from the engine's clock (vLLM's request_*_time_seconds).
        self.queue_time = histogram("qwenjax:request_queue_time_seconds", "Engine: added to its "
                                    "first step (waiting behind others)", E2E_BUCKETS)
        self.prefill_time = histogram("qwenjax:request_prefill_time_seconds", "Engine: first step "
                                      "to first token (the prompt's chunks)", E2E_BUCKETS)
        self.decode_time = histogram("qwenjax:request_decode_time_seconds", "Engine: first token "
                                     "to the end", E2E_BUCKETS)
        self.tpot = histogram("qwenjax:time_per_output_token_seconds", "Engine: a sequence's "
                              "decode time over its tokens after the first", TPOT_BUCKETS)
        self.itl = histogram("qwenjax:inter_token_latency_seconds", "Streamed: the time between "
                             "a sequence's tokens as they reach the server's clients (a gap "
                             "bringing several tokens counts once, per token)", TPOT_BUCKETS)
        self.request_prompt_tokens = histogram("qwenjax:request_prompt_tokens", "Prompt tokens "
                                               "per finished request", TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("qwenjax:request_generation_tokens", "Generated "
                                                   "tokens per finished request (all its "
                                                   "sequences)", TOKEN_BUCKETS)

        def gauge(name: str, doc: str, read: Callable[[object], float]) -> None:
            Gauge(name, doc, registry=registry).set_function(
                lambda: float(sum(read(e) for e in engines())))

        gauge("qwenjax:requests_running", "Requests holding KV pages in the engine",
              lambda e: len(e.scheduler.running))
        gauge("qwenjax:requests_waiting", "Requests queued in the engine (new or preempted)",
              lambda e: len(e.scheduler.waiting))
        gauge("qwenjax:kv_pages_used", "KV cache pages in use", lambda e: e.allocator.num_used)
        gauge("qwenjax:kv_pages_total", "KV cache pages in the pool", lambda e: e.allocator.num_pages)
        Gauge("qwenjax:kv_cache_usage_perc", "Share of the KV cache pages in use, 0-1 (vLLM's "
              "name)", registry=registry).set_function(lambda: _usage(engines()))
        gauge("qwenjax:kv_tokens_used", "KV cache token slots in use (pages in use times the "
              "page size)", lambda e: e.allocator.num_used * e.scheduler_config.page_size)
        Gauge("qwenjax:prefix_cache_hit_rate", "Prompt tokens found in the prefix cache over those "
              "looked up, since the start, 0-1", registry=registry).set_function(
                  lambda: _hit_rate(engines()))
        Gauge("qwenjax:generation_throughput", "Tokens generated per second over the last minute "
              "or so (between scrapes)", registry=registry).set_function(_Throughput(
                  lambda: sum(e.stats.generation_tokens for e in engines())))
        gauge("qwenjax:kv_pages_cached_free", "Free KV pages still holding a cached prefix "
              "(reused on a hit, evicted LRU when the pool needs them)", lambda e: e.allocator.num_evictable)
        registry.register(_EngineCounters(
            engines, lambda e: e.prefix_cache.stats if e.prefix_cache is not None else None,
            PREFIX_CACHE_COUNTERS))
        registry.register(_EngineCounters(engines, lambda e: e.spec_stats, SPEC_DECODE_COUNTERS))
        registry.register(_EngineCounters(engines, lambda e: e.scheduler, SCHEDULER_COUNTERS))
        registry.register(_StepTokens(engines))
        registry.register(_EngineCounters(
            engines, lambda e: e.scheduler.host_cache.stats if e.scheduler.host_cache is not None
            else None, HOST_CACHE_COUNTERS))
        if in_flight is not None:
            Gauge("qwenjax:requests_in_flight", "Generate calls this server is handling (admitted, "
                  "not yet answered)", registry=registry).set_function(lambda: float(in_flight()))
        self._http = None

    def observe_finished(self, metrics, num_tokens: int) -> None:
        """A finished sequence's engine times (``RequestMetrics``) and its token count."""
        for histogram, seconds in ((self.queue_time, metrics.queue_time),
                                   (self.prefill_time, metrics.prefill_time),
                                   (self.decode_time, metrics.decode_time)):
            if seconds is not None:
                histogram.observe(max(seconds, 0.0))
        if metrics.decode_time is not None and num_tokens > 1:
            self.tpot.observe(max(metrics.decode_time, 0.0) / (num_tokens - 1))

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on a thread of prometheus-client's; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
