"""The K/V budget of the growable caches (kv_budget.py, --kv-cache-memory): growth past it is a recoverable
out-of-memory error raised before anything is allocated, the engine preempts or defers to stay within it, and a
context one sequence cannot fill is shortened (or refused, when the deployer set it)."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from proxy_engine import kv_budget
from proxy_engine.config import RuntimeConfig
from proxy_engine.device_memory import host_available_bytes, out_of_memory
from proxy_engine.engine import ProxyEngine
from proxy_engine.kv_budget import (
    KVBudgetExceeded,
    KVMemoryBudget,
    budget_for,
    fitted_max_lens,
    longest_sequence,
)
from proxy_engine.kv_cache import PaddedKVCache, SlotKVCache, buffer_bytes, lone_sequence_bytes
from proxy_engine.memory import GiB
from tests.engine.conftest import engine_config, run_to_end, submit

CPU = torch.device("cpu")
HEADS, DIM = 2, 4
COLUMN = 2 * HEADS * DIM * 4  # K and V bytes of one row's column in one layer (float32)


def _kv(rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, HEADS, width, DIM), torch.randn(rows, HEADS, width, DIM)


def _job(rows: int, width: int, budget: KVMemoryBudget | None, layers: int = 2) -> PaddedKVCache:
    job = PaddedKVCache(layers, budget)
    for layer in job.layers:
        layer.update(*_kv(rows, width))
    return job


def test_budget_counts_the_caches_it_tracks_until_they_are_dropped():
    budget = KVMemoryBudget(10**9, CPU, "test")
    job = _job(3, 10, budget)  # doubled to 64 columns
    assert budget.in_use() == job.nbytes() == 2 * 3 * 64 * COLUMN
    del job
    gc.collect()
    assert budget.in_use() == 0


def test_growth_past_the_budget_is_an_out_of_memory_error_raised_before_allocating():
    budget = KVMemoryBudget(3 * 64 * COLUMN - 1, CPU, "test budget")  # not even one layer
    job = PaddedKVCache(2, budget)
    with pytest.raises(KVBudgetExceeded, match=r"over its .* GiB K/V budget \(test budget\)") as raised:
        job.layers[0].update(*_kv(3, 64))
    assert out_of_memory(raised.value)  # the engine recovers from it as from any out-of-memory error
    assert job.layers[0].k_buf is None and budget.in_use() == 0


def test_a_prefill_job_drops_the_doubling_headroom_where_the_budget_cannot_hold_it():
    budget = KVMemoryBudget(2 * 70 * 128 * COLUMN, CPU, "test")  # not 2 layers x 70 rows x 256 doubled columns
    job = PaddedKVCache(2, budget)
    for layer in job.layers:
        layer.update(*_kv(70, 100))  # 128 columns (doubled from 64)
    for layer in job.layers:
        layer.update(*_kv(70, 20))  # 120 columns: fits without regrowth
    assert job.layers[0].k_buf.shape[2] == 128
    budget.limit = 2 * 70 * 192 * COLUMN  # room for 192 columns, not the doubling's 256
    for layer in job.layers:
        layer.update(*_kv(70, 30))  # 150 columns
    assert [layer.k_buf.shape[2] for layer in job.layers] == [192, 192] and job.length == 150


def _slot_cache(budget: KVMemoryBudget | None, rows: int, width: int) -> SlotKVCache:
    cache = SlotKVCache(2, budget)
    source = _job(rows, width, None)
    cache.add(source, list(range(rows)), [0] * rows)
    return cache


def test_slot_cache_headroom_only_where_the_budget_holds_it():
    free = _slot_cache(None, 5, 100)
    assert (free.slots, free.capacity) == (8, 128)  # a quarter of headroom, rounded up
    tight_budget = KVMemoryBudget(2 * 5 * 128 * COLUMN, CPU, "test")
    tight = _slot_cache(tight_budget, 5, 100)
    assert (tight.slots, tight.capacity) == (5, 128)
    assert tight_budget.in_use() == tight.nbytes() <= tight_budget.limit
    # Decoding past the capacity: the next step's regrowth is planned as begin_decode will do it.
    tight.state.lengths = [128] * 5
    assert tight.next_step_bytes(0) is None
    assert tight.next_step_bytes(2 * 5 * 64 * COLUMN) == 2 * 5 * 64 * COLUMN  # 192 columns, no headroom
    with pytest.raises(KVBudgetExceeded):
        tight.begin_decode(CPU)
    assert (tight.slots, tight.capacity) == (5, 128)  # nothing was allocated
    tight_budget.limit = 2 * 5 * 192 * COLUMN
    tight.begin_decode(CPU)
    assert (tight.slots, tight.capacity) == (5, 192) and tight_budget.in_use() <= tight_budget.limit


def test_a_regrowth_under_the_budget_drops_the_slots_of_rows_that_left():
    budget = KVMemoryBudget(2 * 8 * 64 * COLUMN, CPU, "test")
    cache = _slot_cache(budget, 6, 40)
    assert (cache.slots, cache.capacity) == (8, 64)
    cache.remove([4, 5])
    cache.state.lengths = [64] * 4
    before = cache.nbytes()
    cache.begin_decode(CPU)  # 8 x 128 would not fit; 4 x 128 does
    assert (cache.slots, cache.capacity) == (4, 128) and budget.in_use() <= budget.limit
    assert cache.nbytes() == buffer_bytes(cache.layers) == before  # memoised, and counted again after a regrowth


def test_longest_sequence_and_fitted_context():
    per_token = [1000, 200, 200]
    assert lone_sequence_bytes(100, 1000) == 1000 * (128 + 128)
    need = sum(lone_sequence_bytes(500, p) for p in per_token)
    assert longest_sequence(need, per_token, [4096] * 3) == 511  # 500 rounds up to 512 columns; 511 + 1 too
    assert longest_sequence(10**12, per_token, [4096, 2048, 2048]) == 4096
    budgets = {"cpu": KVMemoryBudget(need, CPU, "test budget")}
    assert fitted_max_lens(budgets, ["cpu"] * 3, per_token, [4096] * 3, False) == [511] * 3
    assert fitted_max_lens({"cpu": None}, ["cpu"] * 3, per_token, [4096] * 3, False) == [4096] * 3
    with pytest.raises(ValueError, match="raise --kv-cache-memory or lower --max-model-len"):
        fitted_max_lens(budgets, ["cpu"] * 3, per_token, [4096] * 3, True)  # the deployer asked for 4096
    with pytest.raises(ValueError, match=r"\(0 tokens fit\)"):
        fitted_max_lens({"cpu": KVMemoryBudget(10, CPU, "x")}, ["cpu"] * 3, per_token, [4096] * 3, False)


def test_budget_for_each_device(monkeypatch):
    monkeypatch.delenv(kv_budget.CPU_SPACE_ENV, raising=False)
    assert budget_for(torch.device("cuda:0"), None) is None  # a GPU's allocator raises a recoverable error itself
    assert budget_for(torch.device("cuda:0"), 5 * GiB).limit == 5 * GiB
    assert budget_for(CPU, 3 * GiB).limit == 3 * GiB
    monkeypatch.setattr(kv_budget, "free_bytes", lambda device: 10 * GiB)
    auto = budget_for(CPU, None)
    assert auto.limit == int(10 * GiB * kv_budget.AUTO_CPU_SHARE) and "--kv-cache-memory" in auto.source
    monkeypatch.setenv(kv_budget.CPU_SPACE_ENV, "2")  # vLLM's CPU backend's variable, in GiB
    assert budget_for(CPU, None).limit == 2 * GiB
    monkeypatch.setenv(kv_budget.CPU_SPACE_ENV, "0")  # vLLM: choose for me
    assert budget_for(CPU, None).limit == auto.limit


def test_host_memory_is_memavailable_within_a_containers_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:          500000 kB\nMemAvailable:    8000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert host_available_bytes(meminfo, cgroup) == 8_000_000 * 1024  # no cgroup files: the host's figure
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("1000\n")
    assert host_available_bytes(meminfo, cgroup) == 8_000_000 * 1024
    (cgroup / "memory.max").write_text(f"{4 * GiB}\n")  # docker run --memory 4g
    (cgroup / "memory.current").write_text(f"{3 * GiB}\n")
    assert host_available_bytes(meminfo, cgroup) == GiB


def _budgeted(models, family, limit: int, **limits) -> ProxyEngine:
    config = engine_config(family, chat_expert=True, **limits)
    return ProxyEngine(models, config.model_copy(update={"runtime": RuntimeConfig(kv_cache_memory=limit)}))


def _lone_need(engine: ProxyEngine, tokens: int) -> int:
    return sum(lone_sequence_bytes(tokens, per) for per in engine.kv_bytes_per_token)


def test_a_load_over_the_budget_is_served_within_it_with_the_tokens_of_an_unbounded_run(
        chat_family, chat_models, caplog):
    """Eight sampled streams whose K/V together is several times the budget: prefills wait and decode steps
    preempt, the caches never hold more than the budget, and every stream ends as it does with no budget."""
    prompts = {f"r{i}": ("The quick brown fox " * (1 + i % 3), dict(max_tokens=70 + 5 * i, temperature=1.0,
                                                                      seed=i, ignore_eos=True)) for i in range(8)}

    def serve(engine: ProxyEngine) -> tuple[dict, int]:
        for request_id, (prompt, params) in prompts.items():
            submit(engine, request_id, prompt, **params)
        results, peak = {}, 0
        for _ in range(3000):
            if not engine.has_work():
                break
            for output in engine.step():
                entry = results.setdefault(output.request_id, {"tokens": [], "error": None})
                entry["tokens"] += output.new_token_ids
                entry["error"] = entry["error"] or output.error
            budget = engine.kv_memory["cpu"]
            peak = max(peak, budget.in_use() if budget is not None else 0)
        return results, peak

    free, _ = serve(_budgeted(chat_models, chat_family, 10**12))
    probe = _budgeted(chat_models, chat_family, 10**12)
    limit = 3 * _lone_need(probe, 100)  # about five of the eight streams at their longest
    with caplog.at_level(logging.WARNING, logger="proxy_engine.engine"):
        engine = _budgeted(chat_models, chat_family, limit)
        bounded, peak = serve(engine)
    assert all(entry["error"] is None for entry in bounded.values())
    assert bounded == free
    assert 0 < peak <= limit
    assert engine.scheduler.preemptions_total > 0 or "queued again" in caplog.text
    assert "K/V" in caplog.text


def test_the_context_is_shortened_to_what_one_sequence_can_fill(chat_family, chat_models):
    probe = _budgeted(chat_models, chat_family, 10**12)
    engine = _budgeted(chat_models, chat_family, _lone_need(probe, 300))
    assert 300 <= engine.max_model_len < probe.max_model_len
    with pytest.raises(Exception, match="maximum context length"):
        submit(engine, "long", list(range(5, 5 + engine.max_model_len + 1)), max_tokens=1)
    with pytest.raises(ValueError, match="raise --kv-cache-memory or lower --max-model-len"):
        _budgeted(chat_models, chat_family, _lone_need(probe, 300), max_model_len=probe.max_model_len)
    submit(engine, "fits", "Hello there", max_tokens=5, temperature=0)
    assert run_to_end(engine)[("fits", 0)]["error"] is None


def test_decode_steps_preempt_the_latest_streams_to_stay_within_the_budget(chat_family, chat_models, caplog):
    """Four long streams admitted together outgrow the budget as they decode: the latest to arrive are
    preempted one at a time (not the whole batch), resume by recomputation, and end as they do unbounded."""
    params = {f"s{i}": dict(max_tokens=200, temperature=1.0, seed=10 + i, ignore_eos=True) for i in range(4)}

    def serve(engine: ProxyEngine) -> tuple[dict, int]:
        for request_id, sampling in params.items():
            submit(engine, request_id, "Once upon a time", **sampling)
        peak, results = 0, {}
        for _ in range(3000):
            if not engine.has_work():
                break
            for output in engine.step():
                results.setdefault(output.request_id, []).extend(output.new_token_ids)
                assert output.error is None, output.error
            peak = max(peak, engine.kv_memory["cpu"].in_use())
        return results, peak

    free, _ = serve(_budgeted(chat_models, chat_family, 10**12))
    probe = _budgeted(chat_models, chat_family, 10**12)
    limit = sum(640 * per for per in probe.kv_bytes_per_token)  # 4 rows x 128 columns, not 4 x 192
    with caplog.at_level(logging.WARNING, logger="proxy_engine.engine"):
        engine = _budgeted(chat_models, chat_family, limit)
        bounded, peak = serve(engine)
    assert bounded == free and all(len(tokens) == 200 for tokens in bounded.values())
    assert peak <= limit
    preempted = [r.getMessage() for r in caplog.records if "cannot hold the next decode step" in r.getMessage()]
    assert preempted and all("preempted 1 sequence(s)" in line for line in preempted)
    assert "(s3)" in preempted[0]  # the latest to arrive goes first
    assert engine.scheduler.preemptions_total == len(preempted)


def test_the_engine_reports_each_budget_and_its_use(chat_family, chat_models):
    from proxy_engine.async_engine import engine_stats

    engine = _budgeted(chat_models, chat_family, 10**9)
    submit(engine, "r", "Hello", max_tokens=3, temperature=0)
    engine.step()
    (cpu,) = engine_stats(engine).kv_budgets
    assert cpu.device == "cpu" and cpu.limit_bytes == 10**9 and 0 < cpu.used_bytes == engine.kv_memory["cpu"].in_use()


def test_a_cache_that_took_headroom_gives_it_back_to_anothers_bare_need():
    """At a hand-over the base's slot cache may take its headroom first; the pair's caches then need only their
    rows, and the budget has the base give back what its rows do not use rather than fail the request."""
    budget = KVMemoryBudget(2 * (4 * 64 + 32) * COLUMN, CPU, "test")
    base = _slot_cache(budget, 1, 40)
    assert (base.slots, base.capacity) == (4, 64)  # headroom: it fitted when the base grew
    row = base.layers[1].k_buf[0, :, :40].clone()
    pair = _slot_cache(budget, 1, 40)  # its bare need (1 x 64) does not fit beside the base's headroom
    assert (base.slots, base.capacity) == (1, 64) and (pair.slots, pair.capacity) == (1, 64)
    assert budget.in_use() <= budget.limit
    assert torch.equal(base.layers[1].k_buf[0, :, :40], row)  # the base's row moved with its buffers


def test_trimming_never_grows_a_cache():
    budget = KVMemoryBudget(10**9, CPU, "test")
    cache = _slot_cache(budget, 6, 40)  # 8 slots x 64 columns
    cache.remove([4, 5])
    cache.state.lengths = [64] * 4  # the next step needs a 65th column: trimming must not allocate it
    before = cache.nbytes()
    budget.trim()
    assert (cache.slots, cache.capacity) == (4, 64) and cache.nbytes() == before // 2
    budget.trim()  # nothing more to give back
    assert (cache.slots, cache.capacity) == (4, 64)


def test_kv_cache_usage_reads_the_budget_where_it_binds_first(chat_family, chat_models):
    """Autoscalers read vLLM's kv_cache_usage_perc: under a budget far below the limits' worst case it must say
    the cache is full when the budget is, not what share of max_num_seqs x max_model_len is live."""
    probe = _budgeted(chat_models, chat_family, 10**12)
    engine = _budgeted(chat_models, chat_family, _lone_need(probe, 300))
    assert engine.kv_cache_usage() == 0.0
    submit(engine, "r", "Once upon a time", max_tokens=100, temperature=0, ignore_eos=True)
    for _ in range(3):
        engine.step()
    budget = engine.kv_memory["cpu"]
    assert engine.kv_cache_usage() == pytest.approx(budget.in_use() / budget.limit)
    assert engine.kv_cache_usage() > 10 * engine._live_kv_share()
    run_to_end(engine)
    assert engine.kv_cache_usage() == 0.0


def test_the_budget_is_read_safely_from_another_thread_while_the_engine_steps(chat_family, chat_models):
    """With the engine in the server's process, /metrics and admission read engine_stats (the budget's bytes in
    use) on the server's thread while the step thread adds caches and replaces their buffers: never an error."""
    import sys
    import threading

    from proxy_engine.async_engine import engine_stats

    engine = _budgeted(chat_models, chat_family, 10**9)
    for i in range(6):
        submit(engine, f"r{i}", "Once upon a time " * (1 + i), max_tokens=40, temperature=0, ignore_eos=True)
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                engine_stats(engine)
            except BaseException as error:  # noqa: BLE001 - the test reports it
                errors.append(error)
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    reader = threading.Thread(target=read)
    reader.start()
    try:
        run_to_end(engine)
    finally:
        done.set()
        reader.join()
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    assert engine.kv_memory["cpu"].in_use() == 0
