"""The engine's cache and queue numbers on /metrics, under the names documented in docs/server.md."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy_engine.async_engine import EngineStats, KVBudgetStats, PrefixCacheStats
from server.metrics import ServerMetrics


def samples(stats: EngineStats) -> dict[tuple[str, tuple], float]:
    text = ServerMetrics(lambda: stats).render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


BASE = PrefixCacheStats(model="base", queries_total=900, hits_total=600, usage=0.5)
EXPERT = PrefixCacheStats(model="expert", queries_total=950, hits_total=608, usage=0.125)


def _busy(*caches: PrefixCacheStats) -> EngineStats:
    return EngineStats(running=3, waiting=2, prefilling=1, prompt_tokens_total=900, generation_tokens_total=40,
                       preemptions_total=7, kv_cache_usage=0.25, prefix_caches=caches)


def test_queue_kv_usage_and_prefix_cache_counters_per_model():
    got = samples(_busy(BASE, EXPERT))
    assert got[("proxy_serve_num_requests_running", ())] == 3
    assert got[("proxy_serve_num_requests_waiting", ())] == 2
    assert got[("proxy_serve_kv_cache_usage_perc", ())] == 0.25
    assert got[("proxy_serve_num_preemptions_total", ())] == 7
    assert got[("proxy_serve_prefix_cache_queries_total", (("model", "base"),))] == 900
    assert got[("proxy_serve_prefix_cache_hits_total", (("model", "base"),))] == 600
    assert got[("proxy_serve_prefix_cache_hits_total", (("model", "expert"),))] == 608
    assert got[("proxy_serve_prefix_cache_usage_perc", (("model", "expert"),))] == 0.125


def test_the_same_series_under_vllms_names():
    """What reads a vLLM server (its dashboard, the inference gateway's endpoint picker, autoscalers) finds its
    series: vLLM counts a prefilling request as running, and its prefix-cache counters are the primary model's."""
    stats = _busy(EXPERT, BASE)  # the base's counters, wherever it is listed
    text = ServerMetrics(lambda: stats, "my-model").render().decode()
    got = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
           for family in text_string_to_metric_families(text) for sample in family.samples}
    named = (("model_name", "my-model"),)
    assert got[("vllm:num_requests_running", named)] == 4
    assert got[("vllm:num_requests_waiting", named)] == 2
    assert got[("vllm:kv_cache_usage_perc", named)] == 0.25
    assert got[("vllm:prompt_tokens_total", named)] == 900
    assert got[("vllm:generation_tokens_total", named)] == 40
    assert got[("vllm:num_preemptions_total", named)] == 7
    assert got[("vllm:prefix_cache_queries_total", named)] == 900
    assert got[("vllm:prefix_cache_hits_total", named)] == 600
    assert "# TYPE vllm:num_requests_waiting gauge" in text  # the exposition a Prometheus scrape reads


def test_vllms_lora_gauge_names_the_adapters_of_running_and_queued_requests():
    """vLLM's lora_requests_info, which the inference gateway's endpoint picker reads for adapter affinity: only
    where adapters are served by name, as vLLM shows it only with --enable-lora."""
    stats = EngineStats(max_num_seqs=64, running_adapters=("sql", "support"), waiting_adapters=("legal",))
    text = ServerMetrics(lambda: stats, adapters=True).render().decode()
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info"]
    [sample] = family.samples
    assert family.type == "gauge" and sample.labels == {
        "max_lora": "64", "running_lora_adapters": "sql,support", "waiting_lora_adapters": "legal"}
    assert sample.value > 1.7e9  # the time of the reading, as vLLM's
    assert not any(name == "vllm:lora_requests_info" for name, _ in samples(stats))


def test_vllms_cache_config_info_carries_the_block_size_and_the_kv_capacity_in_blocks():
    config = {"block_size": "16", "cache_dtype": "auto", "enable_prefix_caching": "True",
              "gpu_memory_utilization": "0.9"}
    text = ServerMetrics(lambda: EngineStats(max_num_seqs=8), cache_config=lambda: (config, 4096)).render().decode()
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "vllm:cache_config_info"]
    assert family.samples[0].value == 1.0 and family.samples[0].labels == {
        "block_size": "16", "cache_dtype": "auto", "enable_prefix_caching": "True", "gpu_memory_utilization": "0.9",
        "num_gpu_blocks": str(8 * 4096 // 16)}
    assert "vllm:cache_config_info" not in ServerMetrics(lambda: EngineStats()).render().decode()


def test_where_each_choices_time_went_under_vllms_names():
    from proxy_engine.request import RequestTimings

    metrics = ServerMetrics(lambda: EngineStats(), "my-model")
    metrics.choice_timed(RequestTimings(queued_s=0.5, prefill_s=0.25, decode_s=2.0), completion_tokens=5)
    metrics.choice_timed(RequestTimings(queued_s=0.0, prefill_s=0.25, decode_s=0.0), completion_tokens=1)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    named = (("model_name", "my-model"),)
    for name, total in (("request_queue_time_seconds", 0.5), ("request_prefill_time_seconds", 0.5),
                        ("request_decode_time_seconds", 2.0), ("request_inference_time_seconds", 2.5)):
        assert got[(f"vllm:{name}_count", named)] == 2 and got[(f"vllm:{name}_sum", named)] == total, name
        assert got[(f"proxy_serve_{name}_sum", ())] == total
    # Per output token after the first: a one-token choice has none.
    assert got[("vllm:request_time_per_output_token_seconds_count", named)] == 1
    assert got[("vllm:request_time_per_output_token_seconds_sum", named)] == 0.5


def test_what_each_finished_request_asked_for_under_vllms_names():
    from proxy_engine.request import SamplingParams

    metrics = ServerMetrics(lambda: EngineStats(), "my-model")
    metrics.request_finished("stop", 10, 12, 7, SamplingParams(n=2, max_tokens=64))
    metrics.request_finished("length", 10, 3, 3, SamplingParams(n=1))  # no max_tokens: not observed
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    named = (("model_name", "my-model"),)
    assert got[("vllm:request_params_n_sum", named)] == 3 and got[("vllm:request_params_n_count", named)] == 2
    assert got[("vllm:request_params_max_tokens_sum", named)] == 64
    assert got[("vllm:request_params_max_tokens_count", named)] == 1
    assert got[("vllm:request_max_num_generation_tokens_sum", named)] == 10
    assert got[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "my-model")))] == 1


def test_without_a_prefix_cache_the_counters_are_absent_and_usage_is_zero():
    got = samples(EngineStats())
    assert got[("proxy_serve_kv_cache_usage_perc", ())] == 0.0
    assert not any(name.startswith(("proxy_serve_prefix_cache", "proxy_serve_kv_budget")) for name, _ in got)


def test_each_devices_kv_budget_and_what_its_caches_hold():
    got = samples(EngineStats(kv_budgets=(KVBudgetStats("cpu", 3 * 2**20, 8 * 2**30),)))
    assert got[("proxy_serve_kv_budget_used_bytes", (("device", "cpu"),))] == 3 * 2**20
    assert got[("proxy_serve_kv_budget_bytes", (("device", "cpu"),))] == 8 * 2**30


def _value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    raise AssertionError(f"{name} {labels} not on /metrics")


def test_a_chats_next_turn_shows_as_prefix_cache_hits_on_metrics(http):
    """Through HTTP on a real engine: the second turn of a conversation is served from each model's cache."""
    system = {"role": "system", "content": "You answer in one short sentence about European capitals. " * 4}
    before = http.get("/metrics").text
    hits_before = {m: _value(before, "proxy_serve_prefix_cache_hits_total", {"model": m})
                   for m in ("base", "expert", "anti_expert")}
    first = [system, {"role": "user", "content": "What is the capital of France?"}]
    reply = http.post("/v1/chat/completions", json={"messages": first, "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200
    answer = reply.json()["choices"][0]["message"]["content"]
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Spain?"}]
    assert http.post("/v1/chat/completions", json={"messages": second, "max_tokens": 4}).status_code == 200
    after = http.get("/metrics").text
    for model, hits in hits_before.items():
        assert _value(after, "proxy_serve_prefix_cache_hits_total", {"model": model}) >= hits + 32, model
    assert 0.0 <= _value(after, "proxy_serve_kv_cache_usage_perc") <= 1.0
    # vLLM's cache_config_info, as the inference gateway reads it: the block size and the KV capacity in blocks.
    [config] = [f for f in text_string_to_metric_families(after) if f.name == "vllm:cache_config_info"]
    labels = config.samples[0].labels
    info = http.get("/v1/models").json()["data"][0]
    assert labels["block_size"] == "16" and labels["enable_prefix_caching"] == "True"
    assert "gpu_memory_utilization" not in labels  # none set: the CPU's default
    assert int(labels["num_gpu_blocks"]) == 32 * info["max_model_len"] // 16  # the default max_num_seqs
    # The two chats, each a choice timed in the engine.
    timed = _value(after, "vllm:request_queue_time_seconds_count", {"model_name": "proxy-tuned"}) - \
        _value(before, "vllm:request_queue_time_seconds_count", {"model_name": "proxy-tuned"})
    assert timed == 2 and _value(after, "vllm:request_inference_time_seconds_sum", {"model_name": "proxy-tuned"}) > 0
    asked = _value(after, "vllm:request_params_max_tokens_sum", {"model_name": "proxy-tuned"}) - \
        _value(before, "vllm:request_params_max_tokens_sum", {"model_name": "proxy-tuned"})
    assert asked == 4 + 4  # both chats' max_tokens
    assert config.samples[0].value == 1.0


def test_vllms_tokens_per_step_histogram():
    """vLLM's iteration_tokens_total is a histogram (despite its name) over vLLM's buckets; its count tells a
    watchdog whether the engine steps at all."""
    from proxy_engine.step_tokens import StepTokens

    histogram = StepTokens()
    for tokens in (3, 3, 40, 600):
        histogram.observe(tokens)
    text = ServerMetrics(lambda: EngineStats(step_tokens=histogram.reading()), "m").render().decode()
    assert "# TYPE vllm:iteration_tokens_total histogram" in text
    got = samples(EngineStats(step_tokens=histogram.reading()))
    named = (("model_name", "proxy-tuned"),)
    assert got[("vllm:iteration_tokens_total_count", named)] == 4
    assert got[("vllm:iteration_tokens_total_sum", named)] == 646
    assert got[("vllm:iteration_tokens_total_bucket", (("le", "8.0"), *named))] == 2
    assert got[("vllm:iteration_tokens_total_bucket", (("le", "64.0"), *named))] == 3
    assert got[("vllm:iteration_tokens_total_bucket", (("le", "+Inf"), *named))] == 4
    assert got[("proxy_serve_iteration_tokens_count", ())] == 4
