"""Adding rows to the caches is all or nothing, across the three models and across one model's layers.

A failure while a prefilled group joins the running batch (out of memory in the third model, or in one layer's
buffer regrowth) fails that group only: no model keeps a row the others lack, and the running requests decode
on exactly as they would have.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from proxy_engine.request import FinishReason
from proxy_engine.runner import ModelRunner
from tests.engine.conftest import make_engine, run_to_end, submit


def _rows_match_running(engine) -> bool:
    return all(
        sorted(runner.seq_ids) == sorted(s.seq_id for s in engine.running if index in s.prompts)
        for index, runner in enumerate(engine.runners)
    )


def _steady_tokens(chat_family, chat_models) -> list[int]:
    engine = make_engine(chat_models, chat_family)
    submit(engine, "steady", "The steady stream", max_tokens=12, temperature=0, ignore_eos=True)
    return run_to_end(engine)[("steady", 0)]["tokens"]


def test_a_failure_in_the_third_model_leaves_no_stale_rows(chat_family, chat_models):
    expected = _steady_tokens(chat_family, chat_models)
    engine = make_engine(chat_models, chat_family)
    submit(engine, "steady", "The steady stream", max_tokens=12, temperature=0, ignore_eos=True)
    for _ in range(3):
        engine.step()
    assert [s.request_id for s in engine.running] == ["steady"]

    third = engine.runners[2]
    real_add_rows = third.add_rows

    def broken(job, keep=None):
        third.add_rows = real_add_rows  # once
        raise RuntimeError("injected: a fault copying the new rows")  # (out of memory is retried: test_engine)

    third.add_rows = broken
    submit(engine, "doomed", "A newcomer", max_tokens=5, temperature=0, n=2)
    results: dict = {}
    checked = False
    for _ in range(200):
        if not engine.has_work():
            break
        for output in engine.step():
            entry = results.setdefault((output.request_id, output.index), {"tokens": [], "finish": None})
            entry["tokens"] += output.new_token_ids
            if output.finished:
                entry["finish"] = output.finish_reason
        if results.get(("doomed", 0), {}).get("finish") is not None and not checked:
            # Right after the failure, before any later step could tidy up: no runner holds a doomed row.
            doomed = {s.seq_id for s in engine.scheduler.active() if s.request_id == "doomed"}
            assert not any(doomed & set(r.seq_ids) for r in engine.runners)
            assert _rows_match_running(engine)
            checked = True
    assert checked
    assert results[("doomed", 0)]["finish"] is FinishReason.ERROR and results[("doomed", 1)]["finish"] is \
        FinishReason.ERROR
    assert results[("steady", 0)]["finish"] is FinishReason.LENGTH
    steady = results[("steady", 0)]["tokens"]
    assert len(steady) + 3 >= 12 and expected[-len(steady):] == steady  # unaffected: the tokens it had alone
    # And the engine serves the next request in full.
    submit(engine, "after", "Another one", max_tokens=4, temperature=0, ignore_eos=True)
    after = run_to_end(engine)
    assert after[("after", 0)]["finish"] is FinishReason.LENGTH and len(after[("after", 0)]["tokens"]) == 4


def _join(runner: ModelRunner, seq_ids: list[int], prompts: list[list[int]]) -> None:
    job = runner.start_prefill(seq_ids, prompts)
    while not job.complete:
        runner.prefill_step(job, 64)
    runner.add_rows(job)


def test_a_buffer_regrowth_that_fails_in_one_layer_leaves_the_cache_usable(tiny_family, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_family.base, dtype=torch.float32).eval()
    runner = ModelRunner(model, 512, 1, "base")
    _join(runner, [0], [[5, 6, 7]])
    reference = runner.decode(torch.tensor([8])).clone()

    second = runner.cache.layers[1]
    real_allocate = second.allocate

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("injected: layer 1 cannot grow")

    monkeypatch.setattr(second, "allocate", out_of_memory)
    many = [[9 + i, 10, 11] for i in range(8)]  # more rows than the slots: the buffers must grow
    job = runner.start_prefill(list(range(1, 9)), many)
    while not job.complete:
        runner.prefill_step(job, 64)
    try:
        runner.add_rows(job)
        raise AssertionError("the injected failure did not happen")
    except torch.OutOfMemoryError:
        pass
    assert runner.seq_ids == [0] and runner.cache.lengths == [4]
    assert runner.cache.slots == second.k_buf.shape[0]  # the smallest layer's

    monkeypatch.setattr(second, "allocate", real_allocate)
    runner.add_rows(job)  # now it fits, and every row decodes as it would alone
    assert runner.seq_ids == list(range(9))
    logits = runner.decode(torch.tensor([12] * 9))
    with torch.no_grad():
        alone = model(torch.tensor([[5, 6, 7, 8, 12]])).logits[0, -1].float()
    torch.testing.assert_close(logits[0], alone, atol=1e-4, rtol=1e-4)
    assert reference.shape[-1] == logits.shape[-1]
