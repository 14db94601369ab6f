"""The engine with the CUDA backend's executor (static buffers, the graph-safe step; eager on the CPU) gives
today's tokens, token for token, on the tiny families of the Llama-family architectures (Qwen3's query / key
norms included): greedy and seeded, requests arriving while others run, rows leaving at different lengths."""

from __future__ import annotations

import pytest

from proxy_engine.config import RuntimeConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.executor import buckets
from proxy_engine.loader import load_models
from proxy_engine.request import PromptInput, SamplingParams
from tests.conformance.conftest import engine_config
from tests.conformance.families import build

PROMPTS = ["The capital of France is", "def add(a, b):", "Hello", "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and"]


def _requests() -> list[tuple[int, str, SamplingParams]]:
    """(arrival step, prompt, params): greedy at two alphas, seeded sampling, different lengths."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        out.append((i * 3, prompt, SamplingParams(max_tokens=8 + 5 * i, temperature=0.0, ignore_eos=True,
                                                  alpha=0.5 if i % 2 else 1.0)))
        out.append((i * 3 + 1, prompt, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=i,
                                                      ignore_eos=True)))
    return out


def _run(engine: ProxyEngine) -> dict[str, list[int]]:
    pending = list(enumerate(_requests()))
    out: dict[str, list[int]] = {}
    for step in range(400):
        while pending and pending[0][1][0] <= step:
            index, (_, prompt, params) = pending.pop(0)
            engine.add(engine.make_sequences(f"r{index}", PromptInput(text=prompt), params))
        if not pending and not engine.has_work():
            break
        for output in engine.step():
            assert output.error is None, output.error
            out.setdefault(output.request_id, []).extend(output.new_token_ids)
    return out


@pytest.mark.parametrize("name", ["llama2", "qwen2.5", "qwen3", "gemma2", "gemma3"])
def test_static_executor_gives_todays_tokens(name, tmp_path, monkeypatch):
    monkeypatch.setattr(buckets, "MIN_SPAN", 16)  # prompts and outputs cross span buckets
    family = build(name, tmp_path / name)
    config = engine_config(family, max_num_seqs=6, max_model_len=160)
    models = load_models(config)
    today = ProxyEngine(models, config)
    static_config = config.model_copy(update={"runtime": RuntimeConfig(decode_executor="static")})
    static = ProxyEngine(models, static_config)
    assert [r.executor for r in today.runners] == ["fast"] * 3
    assert [r.executor for r in static.runners] == ["static"] * 3
    assert static.runners[0]._static.span_buckets == [16, 32, 64, 128, 160]
    assert static.runners[0].cache.slots == 6
    expected = _run(today)
    assert _run(static) == expected and len(expected) == 2 * len(PROMPTS)


def test_static_buffers_for_fewer_rows_than_max_num_seqs_cap_the_running_batch(tmp_path, monkeypatch):
    """Where a GPU's free memory holds static K/V for fewer than max_num_seqs full-length rows, the models keep
    their graphs and the running batch is capped at what the buffers hold (vLLM caps its concurrency by its KV
    pool the same way); every request still completes with today's tokens."""
    from proxy_engine.executor import selection
    from proxy_engine.prefix_cache import FREE_MEMORY_SHARE, kv_bytes_per_token

    monkeypatch.setattr(buckets, "MIN_SPAN", 16)
    family = build("llama2", tmp_path / "llama2")
    config = engine_config(family, max_num_seqs=6, max_model_len=160)
    models = load_models(config)
    expected = _run(ProxyEngine(models, config))
    per_token = [kv_bytes_per_token(m.model) for m in models]
    fraction = selection.KV_MEMORY_FRACTION - (FREE_MEMORY_SHARE if config.prefix_cache.enabled else 0.0)
    # Free memory for 2.5 full-length rows of every model (each model's share in proportion to its budget).
    free = int(2.5 * sum(per_token) * 160 / fraction)
    monkeypatch.setattr(selection, "free_bytes", lambda device, utilization=None: free)
    static = ProxyEngine(models, config.model_copy(update={"runtime": RuntimeConfig(decode_executor="static")}))
    assert [r.executor for r in static.runners] == ["static"] * 3
    assert [r.cache.slots for r in static.runners] == [2, 2, 2]
    assert static.limits.max_num_seqs == 2 and config.limits.max_num_seqs == 6
    assert static.kv_budgets == [per * 2 * 160 for per in per_token]  # the KV usage metric's denominator
    most = 0
    step = static.step

    def counted_step():
        nonlocal most
        outputs = step()
        most = max(most, static.scheduler.in_batch, len(static.running), *(r.num_rows for r in static.runners))
        return outputs

    monkeypatch.setattr(static, "step", counted_step)
    assert _run(static) == expected
    assert most == 2  # the cap was reached and never passed, by the scheduler's counts or the runners' rows
    # No runner ever held more rows than its slots: the buffers never regrew (which would drop the graphs).
    assert all(r.cache.generation == 0 and r.cache.slots == 2 for r in static.runners)
    # Models that decode on another executor plan no static buffers, so the same memory caps nothing.
    for runtime in (RuntimeConfig(), RuntimeConfig(decode_executor="transformers")):
        other = ProxyEngine(models, config.model_copy(update={"runtime": runtime}))
        assert "static" not in [r.executor for r in other.runners] and other.limits.max_num_seqs == 6


@pytest.mark.parametrize("window", [200, 8])
def test_sliding_windows_decode_on_the_fast_paths_with_transformers_tokens(tmp_path, window):
    """A Mistral window of 200 tokens that no sequence under max_model_len (160) can outgrow, and one of 8 that
    every request outgrows, decode on the fast and static paths with transformers' tokens, under continuous
    batching (rows of different lengths see their own windows)."""
    family = build("mistral", tmp_path / "mistral")
    config = engine_config(family, max_num_seqs=6, max_model_len=160)
    models = load_models(config)
    for m in models:
        m.model.config.sliding_window = window
    engines = {executor: ProxyEngine(models, config.model_copy(update={"runtime": RuntimeConfig(
        decode_executor=executor)})) for executor in ("transformers", "fast", "static")}
    assert {name: [r.executor for r in e.runners] for name, e in engines.items()} == {
        name: [name] * 3 for name in engines}
    expected = _run(engines["transformers"])
    assert _run(engines["fast"]) == expected and _run(engines["static"]) == expected
