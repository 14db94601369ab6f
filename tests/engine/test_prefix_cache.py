"""Prefix caching: a later prompt reuses the K/V of an earlier one's full blocks, in each model, with outputs
equal to those of an engine without the cache (tokens, and logprobs to float tolerance)."""

from __future__ import annotations

import asyncio
import types

import pytest
import torch

from proxy_engine.config import PrefixCacheConfig
from proxy_engine.device_memory import free_bytes
from proxy_engine.engine import ProxyEngine
from proxy_engine.prefix_cache import (
    FREE_MEMORY_SHARE,
    PrefixCache,
    budget_bytes,
    unsupported_reason,
)
from proxy_engine.request import FinishReason, PromptInput, SamplingParams
from tests.engine.conftest import engine_config, submit

SYSTEM = "You are a careful assistant who answers questions about the capitals of Europe. " * 3


def chat(*turns: str) -> list[dict]:
    """A conversation with the shared system prompt: user, assistant, user, ..."""
    roles = ["user", "assistant"]
    return [{"role": "system", "content": SYSTEM}] + [
        {"role": roles[i % 2], "content": text} for i, text in enumerate(turns)
    ]


def build(models, family, *, enabled: bool = True, block_size: int = 8, fraction: float = 0.25, **limits):
    config = engine_config(family, chat_expert=True, **limits)
    config.prefix_cache = PrefixCacheConfig(enabled=enabled, block_size=block_size, memory_fraction=fraction)
    return ProxyEngine(models, config)


def collect(engine: ProxyEngine, max_steps: int = 1000) -> dict[tuple[str, int], dict]:
    """Step until idle: per (request, choice) the tokens, each token's logprob and the prompt logprobs."""
    results: dict[tuple[str, int], dict] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for output in engine.step():
            entry = results.setdefault(
                (output.request_id, output.index), {"tokens": [], "logprobs": [], "prompt": None, "finish": None}
            )
            entry["tokens"] += output.new_token_ids
            entry["logprobs"] += [lp.logprob for lp in output.logprobs or []]
            if output.prompt_logprobs is not None:
                entry["prompt"] = [lp.logprob for lp in output.prompt_logprobs]
            if output.finished:
                entry["finish"] = output.finish_reason
    return results


def assert_same(cached: dict, uncached: dict) -> None:
    assert cached.keys() == uncached.keys()
    for key in uncached:
        assert cached[key]["tokens"] == uncached[key]["tokens"], key
        assert cached[key]["finish"] == uncached[key]["finish"], key
        assert cached[key]["logprobs"] == pytest.approx(uncached[key]["logprobs"], abs=1e-4), key
        if uncached[key]["prompt"] is not None:
            assert cached[key]["prompt"][1:] == pytest.approx(uncached[key]["prompt"][1:], abs=1e-4), key


def hits(engine: ProxyEngine) -> list[int]:
    return [runner.prefix_cache.hits_total for runner in engine.runners]


GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)


# --- the cache alone ------------------------------------------------------------------------------------------
def _kv(tokens: int, value: float = 0.0, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer K and V ``[2 heads, tokens, 4]`` whose column c holds value + c (to check what comes back)."""
    column = torch.arange(tokens, dtype=torch.float32)[None, :, None].expand(2, tokens, 4) + value
    return [(column.clone() + layer, -column.clone() - layer) for layer in range(layers)]


def _span(kv):
    return lambda start, end: [(k[:, start:end], v[:, start:end]) for k, v in kv]


BLOCK_BYTES = 2 * 2 * 4 * 4 * 4 * 2  # K and V, 2 layers, 2 heads, 4 tokens, head_dim 4, float32


def test_blocks_come_back_for_the_longest_shared_full_block_prefix():
    cache = PrefixCache(block_size=4, budget_bytes=100 * BLOCK_BYTES)
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks
    assert cache.insert(prompt, _span(_kv(11))) == 2
    assert cache.num_blocks == 2 and cache.nbytes == 2 * BLOCK_BYTES
    assert len(cache.match(prompt)) == 2
    assert len(cache.match(prompt[:8] + [1, 2, 3, 4])) == 2
    assert len(cache.match(prompt[:6] + [1, 2, 3, 4])) == 1  # differs inside the second block
    assert cache.match([5] + prompt[1:]) == []  # a block is keyed by everything before it, not its own tokens
    assert len(cache.match(prompt, limit=7)) == 1  # at most 7 tokens: one full block
    k, v = cache.read(cache.match(prompt), layer=1, tokens=6)
    assert torch.equal(k, _kv(11)[1][0][:, :6]) and torch.equal(v, _kv(11)[1][1][:, :6])
    # Inserting again adds nothing; a longer prompt adds only its new blocks, from the uncached span.
    spans = []
    assert cache.insert(prompt, lambda a, b: spans.append((a, b))) == 0 and spans == []
    longer = prompt + [7, 7, 7, 7, 7]
    assert cache.insert(longer, lambda a, b: spans.append((a, b)) or _span(_kv(16))(a, b)) == 2
    assert spans == [(8, 16)] and cache.num_blocks == 4


def test_a_salted_prompt_shares_blocks_only_with_the_same_salt():
    """vLLM's cache_salt: the salt is the first block's parent, so the whole chain is apart per salt."""
    cache = PrefixCache(block_size=4, budget_bytes=100 * BLOCK_BYTES)
    prompt = list(range(100, 112))
    assert cache.insert(prompt, _span(_kv(12)), salt="tenant-a") == 3
    assert cache.match(prompt) == [] and cache.match(prompt, salt="tenant-b") == []
    assert len(cache.match(prompt, salt="tenant-a")) == 3
    assert cache.insert(prompt, _span(_kv(12))) == 3 and cache.num_blocks == 6  # unsalted: its own chain
    cache.pool.evict(0, sparing=cache, keep=0)
    assert cache.num_blocks == 0 and cache.nbytes == 0


def test_least_recently_used_blocks_go_first_and_chains_shrink_from_their_end():
    cache = PrefixCache(block_size=4, budget_bytes=5 * BLOCK_BYTES)
    a, b, c = [list(range(s, s + 8)) for s in (0, 100, 200)]
    cache.insert(a, _span(_kv(8, 1000)))
    cache.insert(b[:4], _span(_kv(8, 2000)))  # b's head first (a system prompt), then the rest of b
    cache.insert(b, _span(_kv(8, 2000)))
    cache.touch(cache.match(a))  # a is used again: b is now the least recent
    cache.insert(c, _span(_kv(8, 3000)))  # 6 blocks > 5: one goes, and it is b's last
    assert cache.nbytes <= cache.budget_bytes and cache.num_blocks == 5
    assert len(cache.match(a)) == 2 and len(cache.match(c)) == 2
    assert len(cache.match(b)) == 1  # b's head is kept: a chain is never cut from its start
    assert cache.evictions_total == 1
    cache.touch(cache.match(b))
    cache.touch(cache.match(a))
    cache.insert(list(range(300, 304)), _span(_kv(4)))  # c is the least recent now: its last block goes
    assert len(cache.match(c)) == 1 and cache.num_blocks == 5 and cache.evictions_total == 2
    # Every chain still reads back its own values.
    for prompt, value in ((a, 1000), (b, 2000), (c, 3000)):
        for layer in (0, 1):
            tokens = 4 * len(cache.match(prompt)) - 1
            k, v = cache.read(cache.match(prompt), layer, tokens)
            expected = _kv(8, value)[layer]
            assert torch.equal(k, expected[0][:, :tokens]) and torch.equal(v, expected[1][:, :tokens])


def test_caches_sharing_a_pool_hold_one_budget_and_evict_the_least_recent_block_among_them():
    """A LoRA adapter's cache draws on its host's budget: the oldest block goes, whichever cache holds it."""
    host = PrefixCache(block_size=4, budget_bytes=4 * BLOCK_BYTES, name="anti_expert")
    adapter = PrefixCache(block_size=4, budget_bytes=0, name="expert_1", pool=host.pool)
    assert adapter.budget_bytes == host.budget_bytes == 4 * BLOCK_BYTES
    a, b, c = [list(range(s, s + 8)) for s in (0, 100, 200)]
    host.insert(a, _span(_kv(8, 1000)))
    adapter.insert(b, _span(_kv(8, 2000)))  # the pool is full: 2 + 2 blocks
    host.touch(host.match(a))  # the host's chain is used again: the adapter's is the least recent
    host.insert(c, _span(_kv(8, 3000)))  # two blocks more: both of the adapter's go, last first
    assert adapter.num_blocks == 0 and adapter.evictions_total == 2 and host.evictions_total == 0
    assert host.pool.nbytes == host.nbytes == 4 * BLOCK_BYTES
    assert adapter.insert(b, _span(_kv(8, 2000))) == 2  # and back: the host's least recent chain (a) gives way
    assert len(host.match(a)) == 0 and len(host.match(c)) == 2 and len(adapter.match(b)) == 2
    k, _ = adapter.read(adapter.match(b), layer=1, tokens=8)
    assert torch.equal(k, _kv(8, 2000)[1][0])
    # A prompt as long as the whole pool keeps the chain it extends and takes the rest from the others.
    assert adapter.insert(b + [7] * 8, _span(_kv(16, 2000))) == 2
    assert host.num_blocks == 0 and adapter.num_blocks == 4 and host.pool.nbytes <= host.budget_bytes
    # An adapter unloaded: its blocks are freed and it leaves the pool.
    adapter.close()
    assert adapter.num_blocks == 0 and host.pool.members == [host] and host.pool.nbytes == 0


def test_a_prompt_longer_than_the_budget_keeps_its_head():
    cache = PrefixCache(block_size=4, budget_bytes=3 * BLOCK_BYTES)
    prompt = list(range(40))
    assert cache.insert(prompt, _span(_kv(40))) == 3
    assert len(cache.match(prompt)) == 3 and cache.nbytes == 3 * BLOCK_BYTES
    assert PrefixCache(block_size=4, budget_bytes=0).insert(prompt, _span(_kv(40))) == 0


def test_the_budget_is_a_share_of_the_kv_at_the_limits_capped_by_free_memory():
    assert budget_bytes(1000, 0.25, torch.device("meta")) == 250  # free memory unknown: the share alone
    free = free_bytes(torch.device("cpu"))
    assert free is not None and free > 0
    assert budget_bytes(1000, 0.25, torch.device("cpu")) == 250
    assert budget_bytes(10 * free, 1.0, torch.device("cpu")) <= free * FREE_MEMORY_SHARE


def test_the_budget_on_a_gpu_stays_within_gpu_memory_utilization(monkeypatch):
    from proxy_engine import device_memory

    monkeypatch.setattr(device_memory, "free_bytes", lambda device: 10_000)
    monkeypatch.setattr(device_memory, "total_bytes", lambda device: 40_000)
    gpu = torch.device("cuda", 0)
    assert budget_bytes(10**9, 1.0, gpu) == int(10_000 * FREE_MEMORY_SHARE)
    assert budget_bytes(10**9, 1.0, gpu, utilization=0.9) == int(6_000 * FREE_MEMORY_SHARE)  # 36,000 - 30,000


def test_models_whose_state_is_not_per_token_kv_are_refused():
    def model(**config):
        return types.SimpleNamespace(config=types.SimpleNamespace(**config))

    # Windows are masks over caches that keep every column: reuse is exact (the test below).
    assert unsupported_reason(model(sliding_window=4096)) is None
    assert unsupported_reason(model(layer_types=["full_attention", "sliding_attention"], sliding_window=6)) is None
    assert "mamba" in unsupported_reason(model(layer_types=["full_attention", "mamba"]))
    assert "linear_attention" in unsupported_reason(model(layer_types=["linear_attention", "full_attention"]))
    assert unsupported_reason(model(layer_types=["full_attention"])) is None
    assert unsupported_reason(model(is_encoder_decoder=True)) == "not a decoder-only model"


# --- in the engine --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(chat_family, chat_models):
    return chat_models


def test_a_shared_system_prompt_is_reused_by_every_model_with_the_uncached_output(chat_family, models):
    cached, plain = build(models, chat_family), build(models, chat_family, enabled=False)
    for engine in (cached, plain):
        submit(engine, "first", chat("What is the capital of France?"), **GREEDY)
    first = collect(cached)
    assert hits(cached) == [0, 0, 0] and all(r.prefix_cache.num_blocks > 0 for r in cached.runners)
    assert_same(first, collect(plain))
    # Each model sees its own rendering (the chat expert its template, the others the plain transcript), and
    # each finds the shared system prompt in its own cache.
    assert len({tuple(s) for s in (cached.render(_input(chat("x"))), _expert_ids(cached, chat("x")))}) == 2
    for engine in (cached, plain):
        submit(engine, "second", chat("And the capital of Italy, if you please?"), **GREEDY)
    second = collect(cached)
    assert all(h >= 3 * 8 for h in hits(cached))
    assert_same(second, collect(plain))


def test_requests_with_another_salt_reuse_nothing_and_get_the_same_output(chat_family, models):
    cached, plain = build(models, chat_family), build(models, chat_family, enabled=False)
    prompt = chat("What is the capital of France?")

    def run(engine, request_id, salt):
        engine.add(engine.make_sequences(request_id, PromptInput(messages=prompt, cache_salt=salt),
                                         SamplingParams(**GREEDY)))
        return collect(engine)

    reference = run(plain, "ref", None)
    run(cached, "a1", "a")
    assert hits(cached) == [0, 0, 0]
    for salt in ("b", None):  # another tenant, and an unsalted request: cold
        assert_same(run(cached, f"{salt}", salt), {(f"{salt}", 0): reference[("ref", 0)]})
        assert hits(cached) == [0, 0, 0]
    run(cached, "a2", "a")  # the same salt again: a hit
    assert all(h > 0 for h in hits(cached))


def test_a_chats_next_turn_reuses_the_first(chat_family, models):
    cached, plain = build(models, chat_family), build(models, chat_family, enabled=False)
    turn1 = chat("What is the capital of France?")
    submit(cached, "t1", turn1, **GREEDY)
    collect(cached)
    turn2 = chat("What is the capital of France?", "Paris.", "And of Spain?")
    for engine in (cached, plain):
        submit(engine, "t2", turn2, **GREEDY)
    assert_same(collect(cached), collect(plain))
    base_prompt = len(cached.render(_input(turn1)))
    assert cached.runners[0].prefix_cache.hits_total >= base_prompt - 2 * 8  # all but a block or two of turn 1


def test_mixed_alphas_n_choices_and_a_cold_row_in_one_batch(chat_family, models):
    """Rows of one job with different hits (one cold), alpha 0 (the base alone), and n > 1 sharing one row."""
    cached, plain = build(models, chat_family), build(models, chat_family, enabled=False)
    submit(cached, "warm", chat("Tell me about Berlin."), **GREEDY)
    collect(cached)
    requests = [
        ("a", chat("Tell me about Berlin, and Bonn too."), dict(GREEDY, alpha=0.5)),
        ("b", chat("Tell me about Berlin."), dict(GREEDY, alpha=0.0)),
        ("c", "An unrelated plain prompt with no shared prefix at all, just text.", dict(GREEDY, alpha=1.5)),
        ("d", chat("Tell me about Vienna."), dict(temperature=1.0, seed=7, n=3, max_tokens=8, ignore_eos=True,
                                                    logprobs=2)),
    ]
    for engine in (cached, plain):
        for request_id, prompt, params in requests:
            submit(engine, request_id, prompt, **params)
    assert_same(collect(cached), collect(plain))
    assert cached.runners[0].prefix_cache.hits_total > 0


def test_a_warm_prompt_arriving_with_a_cold_one_still_reads_its_prefix(chat_family, models):
    """Admitted together, the warm prompt would start where the cold one does and read nothing from the cache;
    the warm one is prefilled in a group of its own, so its usage counts the cached tokens, and both answer as
    with no cache at all."""
    cached, plain = build(models, chat_family), build(models, chat_family, enabled=False)
    submit(cached, "warm-up", chat("Tell me about Berlin."), **GREEDY)
    collect(cached)
    # Longer than the warm prompt: left-padded beside it, the cold row starts at column 0.
    cold = "An unrelated plain prompt with no shared prefix at all, and longer than the other one. " * 4
    usage: dict[str, int] = {}
    for engine in (cached, plain):
        submit(engine, "cold", cold, **GREEDY)
        submit(engine, "warm", chat("Tell me about Berlin, please."), **GREEDY)
    results: dict = {}
    while cached.has_work():
        for output in cached.step():
            if output.cached_tokens is not None:
                usage[output.request_id] = output.cached_tokens
            entry = results.setdefault((output.request_id, output.index),
                                       {"tokens": [], "logprobs": [], "prompt": None, "finish": None})
            entry["tokens"] += output.new_token_ids
            entry["logprobs"] += [lp.logprob for lp in output.logprobs or []]
            if output.finished:
                entry["finish"] = output.finish_reason
    assert_same(results, collect(plain))
    assert usage["cold"] == 0 and usage["warm"] >= 3 * 8  # the shared system prompt, from the cache


def test_a_scoring_request_computes_every_position_and_still_fills_the_cache(tiny_family, plain_models):
    def engine(enabled: bool) -> ProxyEngine:
        config = engine_config(tiny_family)
        config.prefix_cache = PrefixCacheConfig(enabled=enabled, block_size=4)
        return ProxyEngine(plain_models, config)

    cached, plain = engine(True), engine(False)
    prompt = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    submit(cached, "warm", prompt, **GREEDY)
    collect(cached)
    before = hits(cached)
    for e in (cached, plain):
        submit(e, "score", prompt, temperature=0, max_tokens=2, prompt_logprobs=2, ignore_eos=True)
        # The same prompt unscored, in the same batch: it shares the scored row, which computes every position.
        submit(e, "same", prompt, **GREEDY)
    result = collect(cached)
    assert hits(cached) == before  # nothing skipped for the scored prompt
    assert_same(result, collect(plain))
    # A scoring request's prompt is cached for the requests after it.
    fresh = engine(True)
    submit(fresh, "score", prompt, temperature=0, max_tokens=0, prompt_logprobs=1)
    collect(fresh)
    assert all(r.prefix_cache.num_blocks > 0 for r in fresh.runners)
    submit(fresh, "after", prompt + " Berlin is", **GREEDY)
    collect(fresh)
    assert all(h > 0 for h in hits(fresh))


@pytest.fixture(scope="module")
def plain_models(tiny_family):
    from proxy_engine.loader import load_models

    return load_models(engine_config(tiny_family))


def test_abort_mid_prefill_leaves_the_cache_as_it_was(chat_family, models):
    cached, plain = build(models, chat_family, max_num_batched_tokens=16), build(models, chat_family, enabled=False)
    submit(cached, "warm", chat("What is the capital of France?"), **GREEDY)
    collect(cached)
    blocks = [r.prefix_cache.num_blocks for r in cached.runners]
    long_question = chat("Please list every capital of every country of Europe, in order, with a fact about each.")
    submit(cached, "doomed", long_question, **GREEDY)
    cached.step()
    cached.step()
    assert cached.prefill is not None and not cached.prefill.complete  # still prefilling
    cached.abort("doomed")
    aborted = collect(cached)
    assert aborted[("doomed", 0)]["finish"] is FinishReason.ABORT
    assert [r.prefix_cache.num_blocks for r in cached.runners] == blocks
    assert all(r.num_rows == 0 for r in cached.runners)
    # The cache still serves what it held, and the next request's output is the uncached one.
    for engine in (cached, plain):
        submit(engine, "next", long_question, **GREEDY)
    assert_same(collect(cached), collect(plain))


def test_the_cache_stays_within_its_budget(chat_family, models):
    # About three blocks per model: every request's prompt (3-4 blocks) pushes the earlier ones out.
    engine = build(models, chat_family, fraction=0.012, max_num_seqs=4, max_model_len=512)
    budgets = [r.prefix_cache.budget_bytes for r in engine.runners]
    for i in range(6):
        submit(engine, f"r{i}", f"Request number {i} talks about something else entirely: {'word ' * (20 + i)}",
               **GREEDY)
        collect(engine)
        assert all(r.prefix_cache.nbytes <= budget for r, budget in zip(engine.runners, budgets))
    assert all(r.prefix_cache.evictions_total > 0 and r.prefix_cache.num_blocks > 0 for r in engine.runners)


def test_prefix_caching_can_be_turned_off(chat_family, models):
    engine = build(models, chat_family, enabled=False)
    assert all(r.prefix_cache is None for r in engine.runners)


def test_kv_cache_usage_is_a_fraction_of_the_budget(chat_family, models):
    engine = build(models, chat_family)
    assert engine.kv_cache_usage() == 0.0
    submit(engine, "r", chat("What is the capital of France?"), temperature=0, max_tokens=20, ignore_eos=True)
    engine.step()
    engine.step()
    usage = engine.kv_cache_usage()
    assert 0.0 < usage < 1.0
    collect(engine)
    assert engine.kv_cache_usage() == 0.0


def _input(messages):
    from proxy_engine.request import PromptInput

    return PromptInput(messages=messages)


def _expert_ids(engine: ProxyEngine, messages) -> list[int]:
    return engine.models[1].renderer.render(_input(messages))


async def test_the_engines_stats_report_each_models_queries_and_hits(chat_family):
    from proxy_engine.async_engine import AsyncEngine
    from proxy_engine.request import SamplingParams

    engine = AsyncEngine(engine_config(chat_family, chat_expert=True))
    await engine.start()
    try:
        for request_id in ("one", "two"):
            stream = await engine.add_request(
                request_id, _input(chat(f"Question {request_id}?")), SamplingParams(temperature=0, max_tokens=2)
            )
            [output async for output in stream]
        stats = engine.stats()
        assert [cache.model for cache in stats.prefix_caches] == ["base", "expert", "anti_expert"]
        for cache in stats.prefix_caches:
            assert cache.queries_total > cache.hits_total > 0 and 0 < cache.usage < 1
        for _ in range(100):  # a finished sequence's rows are freed at the engine's next step
            if engine.stats().kv_cache_usage == 0.0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().kv_cache_usage == 0.0
    finally:
        await engine.shutdown()


def test_a_failure_to_cache_a_prompt_fails_no_request(chat_family, models, monkeypatch):
    cached, plain = build(models, chat_family), build(models, chat_family, enabled=False)

    def out_of_memory(self, tokens, layers_kv, salt=None):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(PrefixCache, "insert", out_of_memory)
    for engine in (cached, plain):
        submit(engine, "r", chat("What is the capital of France?"), **GREEDY)
    assert_same(collect(cached), collect(plain))
    assert all(r.prefix_cache.num_blocks == 0 for r in cached.runners)


def test_a_cached_prefix_that_cannot_be_copied_in_is_computed_instead(chat_family, models, monkeypatch):
    from proxy_engine.kv_cache import PaddedKVCache

    cached, plain = build(models, chat_family), build(models, chat_family, enabled=False)
    submit(cached, "warm", chat("What is the capital of France?"), **GREEDY)
    collect(cached)

    def out_of_memory(self, *args):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(PaddedKVCache, "preload", out_of_memory)
    before = hits(cached)
    for engine in (cached, plain):
        submit(engine, "r", chat("What is the capital of Spain?"), **GREEDY)
    assert_same(collect(cached), collect(plain))
    assert hits(cached) == before  # nothing was reused, and nothing is counted as a hit


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_models_reuse_a_prefix_longer_than_their_window(name, tmp_path):
    """Windowed layers (Mistral's window of 8, Gemma-2 / -3's local layers of 6 next to global ones): the caches
    keep every column and the masks carry the window, so a 40-token cached prefix gives the tokens and logprobs
    of an engine without the cache, on the fast decode path and through transformers' forward alike."""
    from proxy_engine.config import RuntimeConfig
    from tests.conformance.families import build as build_family

    family = build_family(name, tmp_path / name)
    models = None
    for executor in ("fast", "transformers"):
        models, outputs = with_and_without_prefix_cache(family, models, RuntimeConfig(decode_executor=executor))
        assert unsupported_reason(models[0].model) is None
        assert_same(*outputs)


def with_and_without_prefix_cache(family, models=None, runtime=None):
    """``(models, [cached, uncached])``: two requests sharing a 40-token prefix, on an engine with the prefix cache
    (asserted to reuse at least 32 tokens in every model) and on one without; ``models`` are loaded when None."""
    from proxy_engine.loader import load_models
    from tests.conformance.conftest import engine_config as family_config

    shared = "Numbers 0 1 2 3 4 5 6 7 8 9 10 and the capital of France is Paris, of Italy Rome, of Spain"
    outputs = []
    for enabled in (True, False):
        config = family_config(family, max_num_seqs=4)
        config.prefix_cache = PrefixCacheConfig(enabled=enabled, block_size=8)
        if runtime is not None:
            config.runtime = runtime
        models = models or load_models(config)
        engine = ProxyEngine(models, config)
        if runtime is not None:
            assert {r.executor for r in engine.runners} == {runtime.decode_executor}
        results = {}
        for request_id, tail in (("first", " Madrid."), ("second", " and of Portugal")):
            engine.add(engine.make_sequences(request_id, PromptInput(text=shared + tail), SamplingParams(**GREEDY)))
            results.update(collect(engine))
        outputs.append(results)
        if enabled:
            assert all(h >= 32 for h in hits(engine)), hits(engine)  # past any window, in every model
    return models, outputs
