"""Prometheus metrics, in a registry owned by one app (no process-wide globals).

Queue sizes and token totals are read from ``engine.stats()`` when scraped, so they are never out of step
with the engine; latencies are observed by the server as outputs reach it.

Each series is exported twice: under ``proxy_serve_`` with this server's labels, and under vLLM's name
(``vllm:...{model_name}``), so that what reads a vLLM server (its Grafana dashboard, the Gateway API Inference
Extension's endpoint picker, KServe's and the production stack's autoscalers) reads this one unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy_engine.async_engine import EngineStats
from proxy_engine.request import RequestTimings, SamplingParams

PREFIX = "proxy_serve"
VLLM = "vllm:"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_N_BUCKETS = (1, 2, 5, 10, 20)
_TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


# The cache settings vLLM's cache_config_info carries, as this server has them (its labels), and the loaded
# max_model_len, from which its num_gpu_blocks label is worked out.
CacheConfig = Callable[[], tuple[dict[str, str], int]]


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None], model_name: str, adapters: bool,
                 cache_config: CacheConfig | None) -> None:
        self._stats = stats
        self._model_name = model_name
        self._adapters = adapters
        self._cache_config = cache_config

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        if stats is None:  # still loading
            return
        yield from _ours(stats)
        yield from _vllms(stats, self._model_name)
        if self._adapters:
            yield _lora_requests_info(stats)
        if self._cache_config is not None:
            yield _cache_config_info(*self._cache_config(), stats)


def _cache_config_info(labels: dict[str, str], max_model_len: int, stats: EngineStats) -> Metric:
    """vLLM's ``cache_config_info`` (value 1, the settings as labels), which the inference gateway's endpoint
    picker reads for the block size its prefix scorer hashes by and the KV capacity: ``num_gpu_blocks`` is the
    running batch's K/V at the limits (``max_num_seqs`` x ``max_model_len`` tokens, what ``kv_cache_usage_perc`` is a
    share of) in blocks."""
    labels = {**labels, "num_gpu_blocks": str(stats.max_num_seqs * max_model_len // int(labels["block_size"]))}
    gauge = GaugeMetricFamily(f"{VLLM}cache_config_info", "Information of the engine's cache config.",
                              labels=list(labels))
    gauge.add_metric(list(labels.values()), 1.0)
    return gauge


def _lora_requests_info(stats: EngineStats) -> Metric:
    """vLLM's ``lora_requests_info`` (with LoRA serving on), which the Gateway API Inference Extension's endpoint
    picker reads for adapter affinity: the adapters that running and queued requests name, comma-separated, and
    ``max_lora``, how many distinct ones a batch may hold (here any row may name its own: the batch's cap). Its
    value is the time of the reading, as vLLM's."""
    gauge = GaugeMetricFamily(f"{VLLM}lora_requests_info", "Running stats on LoRA requests.",
                              labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    gauge.add_metric([str(stats.max_num_seqs), ",".join(stats.running_adapters), ",".join(stats.waiting_adapters)],
                     time.time())
    return gauge


def _vllms(stats: EngineStats, model_name: str) -> Iterable[Metric]:
    """The engine's series under vLLM's names. Prefix-cache counters are the primary model's (the base's): its
    prompt is the one usage reports, and summing the models would count each prompt token up to three times."""
    labels, value = ["model_name"], [model_name]
    for name, count, doc in (
        # vLLM schedules a chunked prefill as a running request
        ("num_requests_running", stats.running + stats.prefilling, "Sequences decoding or being prefilled."),
        ("num_requests_waiting", stats.waiting, "Sequences queued, not yet prefilling."),
        ("kv_cache_usage_perc", stats.kv_cache_usage, "KV-cache usage, 0-1."),
    ):
        gauge = GaugeMetricFamily(f"{VLLM}{name}", doc, labels=labels)
        gauge.add_metric(value, count)
        yield gauge
    primary = next((c for c in stats.prefix_caches if c.model == "base"), None)
    for name, count, doc in (
        ("prompt_tokens", stats.prompt_tokens_total, "Prompt tokens processed."),
        ("generation_tokens", stats.generation_tokens_total, "Tokens generated."),
        ("num_preemptions", stats.preemptions_total, "Running sequences preempted."),
        ("prefix_cache_queries", primary.queries_total if primary else 0, "Prompt tokens looked up in the prefix "
         "cache (the primary model's)."),
        ("prefix_cache_hits", primary.hits_total if primary else 0, "Prompt tokens taken from the prefix cache "
         "(the primary model's)."),
    ):
        counter = CounterMetricFamily(f"{VLLM}{name}", doc, labels=labels)
        counter.add_metric(value, count)
        yield counter
    yield _step_tokens(f"{VLLM}iteration_tokens_total", stats, labels, value)


def _step_tokens(name: str, stats: EngineStats, labels: list[str], values: list[str]) -> Metric:
    """Tokens per engine step (prompts of the prefills it completed, plus the tokens it generated): how full the
    steps run, and by its count whether the engine steps at all. A histogram despite vLLM's ``_total``."""
    family = HistogramMetricFamily(name, "Tokens per engine step: prompt tokens of the prefills it completed "
                                   "plus tokens generated.", labels=labels)
    family.add_metric(values, stats.step_tokens.cumulative(), sum_value=stats.step_tokens.total)
    return family


def _ours(stats: EngineStats) -> Iterable[Metric]:
    """The engine's series under this server's names."""
    for name, value, doc in (
        ("num_requests_running", stats.running, "Sequences in the decode batch."),
        ("num_requests_prefilling", stats.prefilling, "Sequences whose prompts are being prefilled."),
        ("num_requests_waiting", stats.waiting, "Sequences queued, not yet prefilling."),
    ):
        yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
    yield CounterMetricFamily(
        f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", value=stats.prompt_tokens_total
    )
    yield CounterMetricFamily(
        f"{PREFIX}_generation_tokens", "Tokens generated.", value=stats.generation_tokens_total
    )
    yield CounterMetricFamily(
        f"{PREFIX}_num_preemptions",
        "Running sequences preempted (for more urgent ones, or out of memory); they resume by recomputation.",
        value=stats.preemptions_total,
    )
    yield _step_tokens(f"{PREFIX}_iteration_tokens", stats, [], [])
    yield from _cache_metrics(stats)


def _cache_metrics(stats: EngineStats) -> Iterable[Metric]:
    """KV-cache usage and each model's prefix-cache counters (the vLLM equivalents are in docs/server.md)."""
    yield GaugeMetricFamily(
        f"{PREFIX}_kv_cache_usage_perc",
        "KV cache of the running and prefilling sequences over its size at the limits (max_num_seqs x "
        "max_model_len), all models, or a device's caches over its K/V budget where that is fuller, 0-1.",
        value=stats.kv_cache_usage,
    )
    queries = CounterMetricFamily(
        f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the model's prefix cache.", labels=["model"]
    )
    hits = CounterMetricFamily(
        f"{PREFIX}_prefix_cache_hits", "Prompt tokens taken from the model's prefix cache.", labels=["model"]
    )
    usage = GaugeMetricFamily(
        f"{PREFIX}_prefix_cache_usage_perc", "The model's prefix cache over its budget, 0-1.", labels=["model"]
    )
    for cache in stats.prefix_caches:
        queries.add_metric([cache.model], cache.queries_total)
        hits.add_metric([cache.model], cache.hits_total)
        usage.add_metric([cache.model], cache.usage)
    yield from (queries, hits, usage)
    held = GaugeMetricFamily(f"{PREFIX}_kv_budget_used_bytes", "K/V bytes the device's growable caches hold "
                             "(buffers, headroom included).", labels=["device"])
    limit = GaugeMetricFamily(f"{PREFIX}_kv_budget_bytes", "The device's K/V budget (--kv-cache-memory): past it "
                              "streams are preempted and prefills wait.", labels=["device"])
    for budget in stats.kv_budgets:
        held.add_metric([budget.device], budget.used_bytes)
        limit.add_metric([budget.device], budget.limit_bytes)
    if stats.kv_budgets:
        yield from (held, limit)


class _Both:
    """One observation made under this server's name and under vLLM's."""

    def __init__(self, *histograms: Any) -> None:
        self.histograms = histograms

    def observe(self, value: float) -> None:
        for histogram in self.histograms:
            histogram.observe(value)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats | None], model_name: str = "proxy-tuned",
                 adapters: bool = False, cache_config: CacheConfig | None = None) -> None:
        """``adapters``: the server serves adapters by name (named pairs, ``--lora-modules``, runtime loading),
        which vLLM's LoRA metric reports on; ``cache_config``: the labels of vLLM's ``cache_config_info`` and the
        loaded ``max_model_len`` (read once the engine is loaded)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(stats, model_name, adapters, cache_config))
        self.model_name = model_name
        self.requests = Counter(
            f"{PREFIX}_requests", "Finished HTTP generation requests.", ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = self._latency(
            "time_to_first_token_seconds", "From arrival to the first generated token.", _LATENCY_BUCKETS)
        self.inter_token_latency = self._latency(
            "inter_token_latency_seconds", "Between successive tokens of one sequence.", _TOKEN_BUCKETS)
        self.e2e_latency = self._latency(
            "e2e_request_latency_seconds", "From arrival to the last token.", _LATENCY_BUCKETS)
        # Where each finished choice's time went, in the engine (vLLM's per-request histograms; a choice of n is a
        # request of its own there).
        self.queue_time = self._latency(
            "request_queue_time_seconds", "From its arrival at the engine to its first prefill.", _LATENCY_BUCKETS)
        self.prefill_time = self._latency(
            "request_prefill_time_seconds", "From its first prefill to its first token.", _LATENCY_BUCKETS)
        self.decode_time = self._latency(
            "request_decode_time_seconds", "From its first token to its last.", _LATENCY_BUCKETS)
        self.inference_time = self._latency(
            "request_inference_time_seconds", "From its first prefill to its last token.", _LATENCY_BUCKETS)
        self.time_per_output_token = self._latency(
            "request_time_per_output_token_seconds", "Its decode time over its tokens after the first.",
            _TOKEN_BUCKETS)
        # vLLM's per-request counts, labelled with the served name.
        vllm = ["model_name"]
        self.vllm_request_success = Counter(
            f"{VLLM}request_success", "Requests finished, by the finish reason of their first choice.",
            ["model_name", "finished_reason"], registry=self.registry)
        self.vllm_request_prompt_tokens = Histogram(
            f"{VLLM}request_prompt_tokens", "Prompt tokens of each finished request.", vllm,
            buckets=_TOKEN_COUNT_BUCKETS, registry=self.registry).labels(model_name)
        self.vllm_request_generation_tokens = Histogram(
            f"{VLLM}request_generation_tokens", "Generated tokens of each finished request (all choices).", vllm,
            buckets=_TOKEN_COUNT_BUCKETS, registry=self.registry).labels(model_name)
        self.vllm_max_generation_tokens = Histogram(
            f"{VLLM}request_max_num_generation_tokens", "The most tokens one choice of each finished request "
            "generated.", vllm, buckets=_TOKEN_COUNT_BUCKETS, registry=self.registry).labels(model_name)
        self.vllm_params_n = Histogram(
            f"{VLLM}request_params_n", "The n of each finished request.", vllm, buckets=_N_BUCKETS,
            registry=self.registry).labels(model_name)
        self.vllm_params_max_tokens = Histogram(
            f"{VLLM}request_params_max_tokens", "The max_tokens of each finished request that set one.", vllm,
            buckets=_TOKEN_COUNT_BUCKETS, registry=self.registry).labels(model_name)

    def _latency(self, name: str, doc: str, buckets: tuple[float, ...]) -> _Both:
        """A histogram under this server's name and under vLLM's (labelled with the served name)."""
        ours = Histogram(f"{PREFIX}_{name}", doc, buckets=buckets, registry=self.registry)
        theirs = Histogram(f"{VLLM}{name}", doc, ["model_name"], buckets=buckets, registry=self.registry)
        return _Both(ours, theirs.labels(self.model_name))

    def request_finished(self, finish_reason: str, prompt_tokens: int, generation_tokens: int,
                         max_generation_tokens: int = 0, params: SamplingParams | None = None) -> None:
        """A request that ran to its end (vLLM counts only those): its finish reason, token counts and what it asked
        for."""
        self.vllm_request_success.labels(self.model_name, finish_reason).inc()
        self.vllm_request_prompt_tokens.observe(prompt_tokens)
        self.vllm_request_generation_tokens.observe(generation_tokens)
        self.vllm_max_generation_tokens.observe(max_generation_tokens)
        if params is not None:
            self.vllm_params_n.observe(params.n)
            if params.max_tokens is not None:
                self.vllm_params_max_tokens.observe(params.max_tokens)

    def choice_timed(self, timings: RequestTimings, completion_tokens: int) -> None:
        """A choice that ran to its end: where its time went in the engine."""
        self.queue_time.observe(timings.queued_s)
        self.prefill_time.observe(timings.prefill_s)
        self.decode_time.observe(timings.decode_s)
        self.inference_time.observe(timings.inference_s)
        if completion_tokens > 1:
            self.time_per_output_token.observe(timings.decode_s / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping for one request (all of its choices)."""

    def __init__(self, metrics: ServerMetrics, arrival: float | None = None) -> None:
        self.metrics = metrics
        self.arrival = arrival if arrival is not None else time.perf_counter()
        self.first_token_at: float | None = None
        self._last_token_at: dict[int, float] = {}

    def tokens(self, index: int, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.time_to_first_token.observe(now - self.arrival)
        last = self._last_token_at.get(index)
        if last is not None:
            per_token = (now - last) / count
            for _ in range(count):
                self.metrics.inter_token_latency.observe(per_token)
        self._last_token_at[index] = now

    def finish(self, observe: bool = True) -> float:
        elapsed = time.perf_counter() - self.arrival
        if observe:
            self.metrics.e2e_latency.observe(elapsed)
        return elapsed
