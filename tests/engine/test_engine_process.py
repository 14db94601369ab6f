"""The engine core in its own process: a stream, an abort, tokenize / detokenize, stats, a killed child."""

from __future__ import annotations

import asyncio

import pytest

from proxy_engine.async_engine import RequestStream
from proxy_engine.engine_process import EngineProcess, async_engine_for
from proxy_engine.request import ContextLengthError, EngineOverloadedError, FinishReason, PromptInput, SamplingParams
from tests.engine.conftest import engine_config


async def _collect(stream):
    return [o async for o in stream]


async def test_stream_abort_stats_and_a_killed_child(chat_family):
    config = engine_config(chat_family, chat_expert=True, max_num_seqs=4)
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"engine_process": True})})
    engine = async_engine_for(config)
    assert isinstance(engine, EngineProcess)
    await engine.start()
    try:
        assert engine.ready and engine.process.pid is not None
        # The stats arrive before any step: the running batch's cap (the server's admission counts with it).
        for _ in range(100):
            if engine.stats().max_num_seqs:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().max_num_seqs == 4
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2, seed=1)
        stream = await engine.add_request("a", PromptInput(text="Hello"), params)
        assert stream.prompt_tokens > 0
        outputs = await _collect(stream)
        assert sorted(o.index for o in outputs if o.finished) == [0, 1]
        assert all(o.finish_reason is FinishReason.LENGTH for o in outputs if o.finished)
        assert sum(len(o.new_token_ids) for o in outputs) == 12
        assert engine.stats().generation_tokens_total >= 12
        # Errors raised in the child reach the caller as the same exception types.
        with pytest.raises(ValueError):
            await engine.add_request("bad", PromptInput(text="x"), SamplingParams(temperature=-1))
        with pytest.raises(ContextLengthError) as refused:  # its own fields too: the server's 400 names param
            await engine.add_request("huge", PromptInput(text="x"), SamplingParams(max_tokens=10**12))
        assert refused.value.param == "max_tokens" and "huge" not in engine._streams
        ids = await asyncio.to_thread(engine.tokenize, PromptInput(text="Hello"))
        assert ids and engine.detokenize(ids[:3]) == engine.tokenizer.decode(ids[:3])

        long = await engine.add_request("long", PromptInput(text="Hi"), SamplingParams(max_tokens=400, ignore_eos=True))
        first = await long.__aiter__().__anext__()
        assert not first.finished
        engine.abort("long")
        rest = await asyncio.wait_for(_collect(long), timeout=30)
        assert rest[-1].finish_reason is FinishReason.ABORT
        for _ in range(100):
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().running == 0

        # The child dies mid-stream (a crash, the OOM killer): every open stream ends with an error.
        doomed = await engine.add_request("doomed", PromptInput(text="Hi"),
                                          SamplingParams(max_tokens=400, ignore_eos=True))
        await doomed.__aiter__().__anext__()
        engine.process.kill()
        outputs = await asyncio.wait_for(_collect(doomed), timeout=30)
        assert outputs[-1].finish_reason is FinishReason.ERROR and outputs[-1].error_code == "internal_error"
        assert "engine process exited" in outputs[-1].error
        assert not engine.ready and engine.fatal_error is not None
        with pytest.raises(EngineOverloadedError):
            await engine.add_request("later", PromptInput(text="Hi"), SamplingParams(max_tokens=5))
    finally:
        await engine.shutdown()


async def test_a_load_failure_is_reported(chat_family, tmp_path):
    config = engine_config(chat_family, chat_expert=True)
    config = config.model_copy(update={
        "base": config.base.model_copy(update={"path": str(tmp_path / "missing")}),
        "runtime": config.runtime.model_copy(update={"engine_process": True}),
    })
    engine = EngineProcess(config)
    with pytest.raises(RuntimeError):
        await engine.start()
    assert not engine.ready


def test_the_child_steps_on_the_thread_that_loaded_the_models(chat_family):
    """The step loop runs on the loading thread, the pipe is read on another: a step on a second thread starts a
    second OpenMP team, whose workers then sleep between parallel regions (bench/NOTES.md: 1.9x slower). The
    loop ends on ``stop`` after the request's outputs, and when the pipe closes."""
    import multiprocessing
    import threading

    from proxy_engine.engine import ProxyEngine
    from proxy_engine.engine_process import serve_child
    from proxy_engine.loader import load_models
    from proxy_engine.request import Target

    config = engine_config(chat_family, chat_expert=True)
    engine = ProxyEngine(load_models(config), config)
    step_threads: set[int] = set()
    original_step = engine.step

    def recorded_step():
        step_threads.add(threading.get_ident())
        return original_step()

    engine.step = recorded_step
    received: list[tuple] = []

    def api_side(conn, close_instead_of_stop: bool) -> None:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        conn.send(("add", 7, "r", [PromptInput(text="Hello")], params, Target.PROXY, None))
        finished = False
        while not finished:
            message = conn.recv()
            received.append(message)
            finished = message[0] == "step" and any(o.finished for o in message[1])
        if close_instead_of_stop:
            conn.close()
        else:
            conn.send(("stop",))

    for close_instead_of_stop in (False, True):
        received.clear()
        parent, child = multiprocessing.Pipe()
        driver = threading.Thread(target=api_side, args=(parent, close_instead_of_stop), daemon=True)
        driver.start()
        serve_child(child, engine, idle_wait_s=0.05)  # returns once stopped
        driver.join(10)
        assert not driver.is_alive()
        steps_with_outputs = [i for i, m in enumerate(received) if m[0] == "step" and m[1]]
        replies = [i for i, m in enumerate(received) if m[:3] == ("reply", 7, True)]
        assert replies and replies[0] < steps_with_outputs[0]  # queued before any of its outputs
        assert sum(len(o.new_token_ids) for i in steps_with_outputs for o in received[i][1]) == 4
        assert step_threads == {threading.get_ident()}


def _pickled_from_code_this_process_lacks(make) -> bytes:
    """Bytes that ``pickle.loads`` cannot read here: they name a class of a module that is gone (as when the engine
    process runs newer code than the API process)."""
    import pickle
    import sys
    import types

    module = types.ModuleType("proxy_engine_newer_code")
    exec("class NewError(ValueError):\n    pass\n", module.__dict__)
    module.NewError.__module__ = module.__name__
    sys.modules[module.__name__] = module
    try:
        return pickle.dumps(make(module.NewError))
    finally:
        del sys.modules[module.__name__]


async def test_a_message_from_other_code_fails_its_call_or_stops_the_engine_clearly(chat_family):
    """An error reply whose class this process lacks reaches its caller with its text; any other message that
    cannot be read ends every stream with a reason that says what happened, and stops the child."""
    import multiprocessing
    import threading
    from types import SimpleNamespace

    from proxy_engine.engine_process import _error_payload

    engine = EngineProcess(engine_config(chat_family, chat_expert=True))
    parent, child = multiprocessing.Pipe()
    killed = threading.Event()
    engine._conn, engine._loop = parent, asyncio.get_running_loop()
    engine.process = SimpleNamespace(kill=killed.set, join=lambda timeout=None: None, exitcode=None,
                                     is_alive=lambda: not killed.is_set())
    receiver = threading.Thread(target=engine._receive, daemon=True)
    receiver.start()
    stream = engine._streams["open"] = RequestStream("open", 1, prompt_tokens=1)
    call = engine._call("tokenize", PromptInput(text="x"))
    _, call_id, *_ = child.recv()
    payload = (_pickled_from_code_this_process_lacks(lambda cls: (cls, ("no such grammar",), {})),
               "NewError: no such grammar")
    child.send(("reply", call_id, False, payload))
    with pytest.raises(RuntimeError, match="NewError: no such grammar"):
        call.result(10)
    assert receiver.is_alive() and engine.fatal_error is None
    # The same error, readable, is rebuilt as its class with its fields.
    readable = ContextLengthError("too long", param="max_tokens")
    call = engine._call("tokenize", PromptInput(text="x"))
    _, call_id, *_ = child.recv()
    child.send(("reply", call_id, False, _error_payload(readable)))
    with pytest.raises(ContextLengthError) as rebuilt:
        call.result(10)
    assert rebuilt.value.param == "max_tokens"

    pending = engine._call("tokenize", PromptInput(text="x"))
    child.recv()
    child.send_bytes(_pickled_from_code_this_process_lacks(lambda cls: ("step", [cls("output")], None)))
    receiver.join(10)
    assert not receiver.is_alive() and killed.is_set()
    assert "cannot read" in str(engine.fatal_error) and "restart" in str(engine.fatal_error)
    with pytest.raises(EngineOverloadedError):
        pending.result(10)
    outputs = await asyncio.wait_for(_collect(stream), timeout=10)
    assert outputs[-1].finish_reason is FinishReason.ERROR and "cannot read" in outputs[-1].error
    assert not engine.ready
