"""The asyncio face: streams, abort from the loop, a crashed step loop ending every stream."""

from __future__ import annotations

import asyncio

import pytest

from proxy_engine.async_engine import AsyncEngine
from proxy_engine.request import EngineOverloadedError, FinishReason, PromptInput, SamplingParams
from tests.engine.conftest import engine_config


async def _collect(stream):
    outputs = [o async for o in stream]
    return outputs


async def test_streams_abort_and_crash(chat_family):
    engine = AsyncEngine(engine_config(chat_family, chat_expert=True, max_num_seqs=4))
    await engine.start()
    try:
        assert engine.ready
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2, seed=1)
        stream = await engine.add_request("a", PromptInput(text="Hello"), params)
        outputs = await _collect(stream)
        assert sorted(o.index for o in outputs if o.finished) == [0, 1]
        assert all(o.finish_reason is FinishReason.LENGTH for o in outputs if o.finished)
        with pytest.raises(ValueError):
            await engine.add_request("bad", PromptInput(text="x"), SamplingParams(temperature=-1))

        long = await engine.add_request("long", PromptInput(text="Hi"), SamplingParams(max_tokens=400, ignore_eos=True))
        first = await long.__aiter__().__anext__()
        assert not first.finished
        engine.abort("long")
        rest = await _collect(long)
        assert rest[-1].finish_reason is FinishReason.ABORT
        for _ in range(50):
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().running == 0

        # A crash of the loop itself (beyond the per-phase guards) ends every open stream with an error.
        def crash():
            raise SystemError("injected")

        engine.engine.step = crash
        doomed = await engine.add_request("doomed", PromptInput(text="Hi"), SamplingParams(max_tokens=50))
        outputs = await asyncio.wait_for(_collect(doomed), timeout=10)
        assert outputs[-1].finish_reason is FinishReason.ERROR and outputs[-1].error_code == "internal_error"
        assert not engine.ready
        with pytest.raises(EngineOverloadedError):
            await engine.add_request("later", PromptInput(text="Hi"), SamplingParams(max_tokens=5))
    finally:
        await engine.shutdown()


async def test_stats_walk_the_caches_only_on_the_step_thread(chat_family):
    """The server reads ``stats()`` on its own thread (/metrics, admission): the counts are read there, live, but
    the K/V fields (which walk caches a step grows and replaces) come from the step thread, after each step."""
    import threading

    engine = AsyncEngine(engine_config(chat_family, chat_expert=True, max_num_seqs=4))
    await engine.start()
    try:
        walked_on: set[str] = set()
        usage = engine.engine.kv_cache_usage

        def kv_cache_usage() -> float:
            walked_on.add(threading.current_thread().name)
            return usage()

        engine.engine.kv_cache_usage = kv_cache_usage
        stream = await engine.add_request("a", PromptInput(text="Once upon a time"),
                                          SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        seen = []
        async for output in stream:
            stats = engine.stats()
            seen.append((stats.running, stats.kv_cache_usage))
            if output.finished:
                break
        assert walked_on == {"proxy-engine-step"}
        assert any(running == 1 and usage > 0 for running, usage in seen)  # mid-request: live rows, K/V in use
        for _ in range(50):  # the counts are live; the K/V share is the step thread's after the last step
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().running == 0 and engine.stats().kv_cache_usage == 0.0
        assert engine.stats().generation_tokens_total == 30
    finally:
        await engine.shutdown()
