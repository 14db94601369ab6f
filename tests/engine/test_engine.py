"""Engine behaviour: batch-invariant seeds, abort, vocabulary checks, limits, faults."""

from __future__ import annotations

import pytest
import torch

from proxy_engine.families import TINY_SMALL, build_model, build_tokenizer
from proxy_engine.loader import load_models
from proxy_engine.request import FieldError, FinishReason, PromptInput, Target
from tests.engine.conftest import engine_config, make_engine, run_to_end, submit


def test_seeded_output_does_not_depend_on_the_batch(chat_family, chat_models):
    params = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = make_engine(chat_models, chat_family)
    submit(alone, "r", "Paris is the capital", **params)
    solo = run_to_end(alone)[("r", 0)]["tokens"]

    busy = make_engine(chat_models, chat_family, max_num_batched_tokens=24)
    submit(busy, "noise1", "The quick brown fox jumps", temperature=1.0, max_tokens=20, ignore_eos=True)
    busy.step()
    submit(busy, "r", "Paris is the capital", **params)
    submit(busy, "noise2", "def add(a, b):", temperature=0.7, max_tokens=5, ignore_eos=True, alpha=0.0)
    results = run_to_end(busy)
    assert results[("r", 0)]["tokens"] == solo


def test_n_choices_differ_and_are_reproducible(chat_family, chat_models):
    outs = []
    for _ in range(2):
        engine = make_engine(chat_models, chat_family)
        submit(engine, "r", "Hello", n=3, seed=5, temperature=1.0, max_tokens=10, ignore_eos=True)
        outs.append(run_to_end(engine))
    assert outs[0] == outs[1]
    tokens = [outs[0][("r", i)]["tokens"] for i in range(3)]
    assert len({tuple(t) for t in tokens}) > 1


def test_abort_frees_rows_in_every_model_and_others_continue(chat_family, chat_models):
    params = dict(temperature=0, max_tokens=15, ignore_eos=True)
    reference = make_engine(chat_models, chat_family)
    submit(reference, "keep", "The quick brown fox", **params)
    expected = run_to_end(reference)[("keep", 0)]["tokens"]

    engine = make_engine(chat_models, chat_family)
    submit(engine, "keep", "The quick brown fox", **params)
    submit(engine, "drop", "Paris is the capital of", **params)
    kept: list[int] = []
    for _ in range(5):
        kept += [t for o in engine.step() if o.request_id == "keep" for t in o.new_token_ids]
    assert [r.num_rows for r in engine.runners] == [2, 2, 2]
    engine.abort("drop")
    outputs = engine.step()
    dropped = [o for o in outputs if o.request_id == "drop"]
    assert len(dropped) == 1 and dropped[0].finish_reason is FinishReason.ABORT
    assert [r.num_rows for r in engine.runners] == [1, 1, 1]
    assert all(r.seq_ids == [engine.running[0].seq_id] for r in engine.runners)
    kept += [t for o in outputs if o.request_id == "keep" for t in o.new_token_ids]
    rest = run_to_end(engine)[("keep", 0)]
    assert rest["finish"] is FinishReason.LENGTH
    assert kept + rest["tokens"] == expected
    assert [r.num_rows for r in engine.runners] == [0, 0, 0]


def test_a_finished_choice_says_where_its_time_went(chat_family, chat_models):
    """Queue, prefill and decode time per choice (vLLM's per-request histograms): with one row, the second
    request waits in the queue for the whole of the first."""
    import time

    engine = make_engine(chat_models, chat_family, max_num_seqs=1)
    started = time.monotonic()
    submit(engine, "first", "Hello", temperature=0, max_tokens=5, ignore_eos=True)
    submit(engine, "second", "Hello", temperature=0, max_tokens=5, ignore_eos=True)
    timings, finished_at = {}, {}
    while engine.has_work():
        for output in engine.step():
            assert (output.timings is not None) == output.finished
            if output.finished:
                timings[output.request_id], finished_at[output.request_id] = output.timings, time.monotonic()
    first, second = timings["first"], timings["second"]
    for name, t in timings.items():
        assert t.queued_s >= 0 and t.prefill_s > 0 and t.decode_s > 0, name
        assert t.inference_s == t.prefill_s + t.decode_s
        assert t.queued_s + t.inference_s <= finished_at[name] - started
    assert second.queued_s >= first.prefill_s + first.decode_s > first.queued_s


def test_abort_of_a_waiting_request(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family, max_num_seqs=1)
    submit(engine, "first", "Hello", temperature=0, max_tokens=5, ignore_eos=True)
    submit(engine, "second", "Hello", temperature=0, max_tokens=5, ignore_eos=True)
    engine.step()
    engine.abort("second")
    results = run_to_end(engine)
    assert results[("second", 0)]["finish"] is FinishReason.ABORT and results[("second", 0)]["tokens"] == []
    assert results[("first", 0)]["finish"] is FinishReason.LENGTH


def test_priority_policy_serves_the_waiting_in_priority_order(chat_family, chat_models):
    """One slot: the first request runs; of those that wait, the lowest priority value goes next, then arrival."""
    engine = make_engine(chat_models, chat_family, max_num_seqs=1, scheduling_policy="priority")
    greedy = dict(temperature=0, max_tokens=3, ignore_eos=True)
    submit(engine, "first", "Hello", priority=-5, **greedy)
    finished = [o.request_id for o in engine.step() if o.finished]  # "first" takes the slot (none preempts it)
    for request_id, priority in [("late", 2), ("urgent", -1), ("soon", 2)]:
        submit(engine, request_id, "Hello", priority=priority, **greedy)
    for _ in range(100):
        if not engine.has_work():
            break
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["first", "urgent", "late", "soon"]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=77)],
                         ids=["greedy", "seeded"])
def test_a_preempted_sequence_resumes_with_the_tokens_it_would_have_had(tiny_family, plain_models, sampling):
    """One slot, priority policy: an urgent request takes the slot of a running one, which goes back to the queue
    and, once readmitted, recomputes its K/V (prompt + output so far) and goes on as if never interrupted."""
    params = dict(max_tokens=12, ignore_eos=True, prompt_logprobs=1, **sampling)
    alone = make_engine(plain_models, tiny_family, chat_expert=False, max_num_seqs=1, scheduling_policy="priority")
    submit(alone, "slow", "The quick brown fox", priority=5, **params)
    expected = run_to_end(alone)[("slow", 0)]

    engine = make_engine(plain_models, tiny_family, chat_expert=False, max_num_seqs=1, scheduling_policy="priority")
    submit(engine, "slow", "The quick brown fox", priority=5, **params)
    before: list = []
    for _ in range(4):  # its prefill, then three decode steps
        before += [o for o in engine.step() if o.request_id == "slow"]
    assert len([t for o in before for t in o.new_token_ids]) == 4
    submit(engine, "urgent", "Hello", priority=-1, temperature=0, max_tokens=3, ignore_eos=True)
    finished: list[str] = []
    after: list = []
    for _ in range(100):
        if not engine.has_work():
            break
        for output in engine.step():
            if output.request_id == "slow":
                after.append(output)
            if output.finished:
                finished.append(output.request_id)
    assert finished == ["urgent", "slow"] and engine.preemptions_total == 1
    outputs = before + after
    assert [t for o in outputs for t in o.new_token_ids] == expected["tokens"]
    assert "".join(o.text_delta for o in outputs) == expected["text"]
    assert outputs[-1].completion_tokens == 12 and outputs[-1].finish_reason is FinishReason.LENGTH
    assert sum(o.prompt_logprobs is not None for o in outputs) == 1  # scored at its first prefill only
    assert engine.prompt_tokens_total == alone.prompt_tokens_total + len(engine.render(PromptInput(text="Hello")))
    assert [r.num_rows for r in engine.runners] == [0, 0, 0]


def test_a_priority_needs_the_priority_policy(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    with pytest.raises(FieldError, match="--scheduling-policy priority") as refused:
        submit(engine, "r", "Hello", priority=1)
    assert refused.value.param == "priority"
    submit(engine, "r", "Hello", priority=0, max_tokens=1)  # the default is accepted under fcfs


def test_vocabulary_mismatch_refuses_to_start(tmp_path, tiny_family):
    other = build_tokenizer(vocab_size=300, corpus=["zebra quartz jukebox", "völlig anders gelernt"])
    build_model(tmp_path / "stranger", other, TINY_SMALL, seed=9)
    config = engine_config(tiny_family)
    config.experts[0].expert.path = str(tmp_path / "stranger")
    message = r"do not share one vocabulary.*expert differs from base \(512 vs \d+ tokens\): id \d+ is"
    with pytest.raises(ValueError, match=message):
        load_models(config)


def test_extra_tokens_past_the_shared_vocabulary_are_cut(tmp_path, tiny_family):
    """Like CodeLlama's infilling tokens: a tokenizer with more tokens after the shared ids still serves."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_family.base)
    tokenizer.add_tokens(["<PRE>", "<SUF>"], special_tokens=True)
    build_model(tmp_path / "wider", tokenizer, TINY_SMALL, seed=4)
    config = engine_config(tiny_family)
    config.experts[0].expert.path = str(tmp_path / "wider")
    models = load_models(config)
    assert {m.vocab_size for m in models} == {512}
    from proxy_engine.engine import ProxyEngine

    engine = ProxyEngine(models, config)
    submit(engine, "r", "Hello", temperature=0, max_tokens=4, ignore_eos=True)
    assert all(t < 512 for t in run_to_end(engine)[("r", 0)]["tokens"])


def test_padded_logit_rows_are_cut_and_narrow_rows_refused(tmp_path, chat_family, chat_models, tiny_family):
    expert = next(m for m in chat_models if m.role == "expert")
    assert expert.logits_width == 576
    engine = make_engine(chat_models, chat_family)
    submit(engine, "r", "Hello", temperature=0, max_tokens=3, ignore_eos=True)
    assert all(t < 512 for t in run_to_end(engine)[("r", 0)]["tokens"])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_family.base)
    build_model(tmp_path / "narrow", tokenizer, TINY_SMALL, seed=3, extra_vocab=-12)
    config = engine_config(tiny_family)
    config.experts[0].anti_expert.path = str(tmp_path / "narrow")
    with pytest.raises(ValueError, match="500 logit rows, fewer than the 512"):
        load_models(config)


def test_prompt_past_the_context_is_a_clear_error(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    with pytest.raises(ValueError, match=r"maximum context length is 512 tokens, but the prompt is \d+ tokens"):
        submit(engine, "r", "word " * 600)


def test_max_tokens_bounded_by_context_left(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family, max_model_len=64)
    sequences = submit(engine, "r", "one two three four five", temperature=0, ignore_eos=True)
    longest_prompt = max(len(p) for p in sequences[0].prompts.values())
    assert sequences[0].max_tokens == 64 - longest_prompt
    result = run_to_end(engine)[("r", 0)]
    assert result["finish"] is FinishReason.LENGTH and len(result["tokens"]) == 64 - longest_prompt


def test_stop_token_ids_min_tokens_and_ignore_eos(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    submit(engine, "probe", "Hello", temperature=0, max_tokens=6, ignore_eos=True)
    probe = run_to_end(engine)[("probe", 0)]["tokens"]
    stop_id = probe[2]
    engine = make_engine(chat_models, chat_family)
    submit(engine, "stop", "Hello", temperature=0, max_tokens=6, ignore_eos=True, stop_token_ids=[stop_id])
    result = run_to_end(engine)[("stop", 0)]
    assert result["finish"] is FinishReason.STOP and result["tokens"][-1] == stop_id
    assert result["stop_reason"] == stop_id  # vLLM's: which stop id ended it
    assert len(result["tokens"]) == probe.index(stop_id) + 1
    engine = make_engine(chat_models, chat_family)
    submit(engine, "min", "Hello", temperature=0, max_tokens=6, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=6)
    result = run_to_end(engine)[("min", 0)]
    assert result["finish"] is FinishReason.LENGTH and stop_id not in result["tokens"]
    assert result["stop_reason"] is None
    engine = make_engine(chat_models, chat_family)
    eos = sorted(engine.eos_ids)[0]
    submit(engine, "eos", "Hello", temperature=0, max_tokens=6, allowed_token_ids=[eos])
    result = run_to_end(engine)[("eos", 0)]
    assert result["finish"] is FinishReason.STOP and result["tokens"] == [eos]
    assert result["stop_reason"] is None  # an end-of-sequence token is no stop *reason* (vLLM's)


def test_final_text_is_the_decoding_of_the_tokens(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    submit(engine, "r", "Café 東京", temperature=1.0, seed=3, max_tokens=25, ignore_eos=True)
    result = run_to_end(engine)[("r", 0)]
    assert result["text"] == engine.tokenizer.decode(result["tokens"], skip_special_tokens=True)


def _greedy_hello(chat_family, chat_models) -> str:
    """The 12-token greedy answer to "Hello": stop strings are cut from it."""
    engine = make_engine(chat_models, chat_family)
    submit(engine, "probe", "Hello", temperature=0, max_tokens=12, ignore_eos=True)
    return run_to_end(engine)[("probe", 0)]["text"]


def test_stop_string_ends_and_is_cut(chat_family, chat_models):
    text = _greedy_hello(chat_family, chat_models)
    stop = text[5:8]
    engine = make_engine(chat_models, chat_family)
    submit(engine, "r", "Hello", temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    result = run_to_end(engine)[("r", 0)]
    assert result["finish"] is FinishReason.STOP and result["stop_reason"] == stop
    assert result["text"] == text[: text.index(stop)]


def test_logprobs_of_the_combined_distribution(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    captured = []
    engine.logits_hook = lambda seqs, combined: captured.append(torch.log_softmax(combined[0], -1))
    submit(engine, "r", "Hello", temperature=0, max_tokens=3, ignore_eos=True, logprobs=3)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    for output, expected in zip(outputs, captured):
        (entry,) = output.logprobs
        assert abs(entry.logprob - expected[entry.token_id].item()) < 1e-5
        assert [t.token_id for t in entry.top] == expected.topk(3).indices.tolist()
        assert entry.top[0].token_id == entry.token_id  # greedy picks the top token


def test_expert_alone_runs_only_the_expert(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    sequences = submit(engine, "r", "Hello", target=Target.EXPERT, temperature=0, max_tokens=3, ignore_eos=True)
    assert sorted(sequences[0].prompts) == [1]
    engine.step()
    engine.step()
    assert [r.num_rows for r in engine.runners] == [0, 1, 0]


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    submit(engine, "victim", "Hello", temperature=0, max_tokens=30, ignore_eos=True)
    engine.step()
    engine.step()

    def explode(phase, sequences):
        if phase == "decode":
            raise RuntimeError("CUDA out of memory (injected)")

    engine.fault_hook = explode
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("victim", FinishReason.ERROR)]
    assert outputs[0].error.startswith("out of memory during decode (RuntimeError): the request does not fit")
    assert [r.num_rows for r in engine.runners] == [0, 0, 0]
    engine.fault_hook = None
    submit(engine, "after", "Hello", temperature=0, max_tokens=4, ignore_eos=True)
    assert run_to_end(engine)[("after", 0)]["finish"] is FinishReason.LENGTH


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "1073741824 bytes")], ids=["cuda", "cpu"])
def test_out_of_memory_in_a_decode_step_preempts_the_batch_which_resumes_losing_nothing(
        chat_family, chat_models, monkeypatch, error):
    """The third model runs out of memory after the first two have grown their K/V for the step: every row goes,
    the four sequences resume (by recomputation) two at a time, and each ends with the tokens of a run that never
    failed."""
    requests = {"a": dict(temperature=0), "b": dict(temperature=1.0, seed=3), "c": dict(temperature=0),
                "d": dict(temperature=0.8, top_k=20, seed=9)}
    prompts = {"a": "Hello", "b": "The quick brown fox", "c": "Paris is", "d": "def add(a, b):"}

    def run(engine, fail_at: int | None) -> dict:
        for request_id, sampling in requests.items():
            submit(engine, request_id, prompts[request_id], max_tokens=10, ignore_eos=True, **sampling)
        results: dict = {}
        widest_after = 0
        for step in range(200):
            if not engine.has_work():
                break
            if step == fail_at:
                runner = engine.runners[2]
                decode = runner.decode

                def fail_once(tokens, runner=runner, decode=decode):
                    monkeypatch.setattr(runner, "decode", decode)
                    raise error

                monkeypatch.setattr(runner, "decode", fail_once)
            outputs = engine.step()
            if step == fail_at:  # the first two are readmitted in the same step
                assert engine.preemptions_total == 4 and engine.scheduler.memory_cap == 2
                assert [r.num_rows for r in engine.runners] == [2, 2, 2]
            if fail_at is not None and step >= fail_at:
                widest_after = max(widest_after, len(engine.running) + engine.num_prefilling)
            for output in outputs:
                results[output.request_id] = results.get(output.request_id, []) + output.new_token_ids
                assert output.error is None
        return results, widest_after

    expected, _ = run(make_engine(chat_models, chat_family), None)
    got, widest = run(make_engine(chat_models, chat_family), 3)
    assert got == expected and all(len(tokens) == 10 for tokens in got.values())
    assert widest == 2  # the cap held (it grows back by one every MEMORY_GROW_STEPS good steps)


OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _serve(engine, requests: dict[str, tuple[str, dict]], fault=None) -> tuple[dict, list[str]]:
    """Each choice's tokens, finish reason and prompt tokens; ``fault(engine, step)`` may break something (or
    submit more) before a step."""
    for request_id, (prompt, sampling) in requests.items():
        submit(engine, request_id, prompt, **sampling)
    results: dict = {}
    for step in range(300):
        if not engine.has_work():
            break
        if fault is not None:
            fault(engine, step)
        for output in engine.step():
            entry = results.setdefault((output.request_id, output.index), {"tokens": [], "finish": None,
                                                                            "usage": None})
            entry["tokens"] += output.new_token_ids
            if output.finished:
                entry["finish"], entry["usage"] = output.finish_reason, output.prompt_tokens
                assert output.error is None, output.error
        assert all(sorted(r.seq_ids) == sorted(s.seq_id for s in engine.running if i in s.prompts)
                   for i, r in enumerate(engine.runners))
    return results


def test_out_of_memory_handing_a_prefill_over_defers_it_until_the_running_batch_makes_room(
        chat_family, chat_models, monkeypatch):
    """The third model cannot take a newcomer's rows beside a running stream: the newcomer (n=2, sampled with a
    seed) goes back to the queue and, once the stream has finished, is prefilled again and ends with the tokens
    and usage of a run that never failed; the stream never notices."""
    late = dict(max_tokens=6, temperature=1.0, seed=5, n=2, ignore_eos=True)

    def run(fail: bool):
        engine = make_engine(chat_models, chat_family)
        third = engine.runners[2]

        def arrive(engine, step):
            if step != 2:
                return
            submit(engine, "late", "A newcomer arrives", **late)  # its prefill completes in this step
            if fail:
                add_rows = third.add_rows

                def fail_once(job, keep=None):
                    monkeypatch.setattr(third, "add_rows", add_rows)
                    raise OOM

                monkeypatch.setattr(third, "add_rows", fail_once)

        steady = {"steady": ("The steady stream", dict(max_tokens=12, temperature=0, ignore_eos=True))}
        return _serve(engine, steady, arrive), engine

    expected, clean = run(fail=False)
    got, engine = run(fail=True)
    assert got == expected and [len(got[("late", i)]["tokens"]) for i in (0, 1)] == [6, 6]
    assert clean.scheduler.memory_cap is None and engine.scheduler.memory_cap == 1
    assert engine.preemptions_total == 0 and engine.prompt_tokens_total == clean.prompt_tokens_total


def test_out_of_memory_in_a_prefill_with_nothing_running_splits_the_group(chat_family, chat_models, monkeypatch):
    """Two prompts admitted together run out of memory in a prefill chunk: they are prefilled one at a time and
    end as they would have; one prompt alone that runs out of memory fails, as nothing smaller would fit."""
    requests = {name: (prompt, dict(max_tokens=5, temperature=0, ignore_eos=True))
                for name, prompt in (("a", "Hello there"), ("b", "Paris is"))}
    expected = _serve(make_engine(chat_models, chat_family), requests)
    engine = make_engine(chat_models, chat_family)
    base = engine.runners[0]
    widest = []

    def fault(engine, step):
        widest.append(engine.scheduler.in_batch)
        if step == 0:
            prefill_step = base.prefill_step

            def fail_once(*args, **kwargs):
                monkeypatch.setattr(base, "prefill_step", prefill_step)
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 "
                                   "bytes")

            monkeypatch.setattr(base, "prefill_step", fail_once)

    assert _serve(engine, requests, fault) == expected
    assert engine.scheduler.memory_cap == 1 and max(widest[2:]) == 1
    lone = make_engine(chat_models, chat_family)
    monkeypatch.setattr(lone.runners[0], "prefill_step", lambda *args, **kwargs: (_ for _ in ()).throw(OOM))
    submit(lone, "alone", "Hello", max_tokens=3)
    outputs = lone.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("alone", FinishReason.ERROR)]
    assert outputs[0].error.startswith("out of memory during prefill (OutOfMemoryError): the request does not fit")


def test_waiting_queue_bound(chat_family, chat_models):
    from proxy_engine.request import EngineOverloadedError

    engine = make_engine(chat_models, chat_family, max_num_seqs=1, max_waiting=1)
    submit(engine, "a", "Hello", max_tokens=5)
    submit(engine, "b", "Hello", max_tokens=5)
    with pytest.raises(EngineOverloadedError):
        submit(engine, "c", "Hello", max_tokens=5)


def test_a_sampling_fault_fails_only_its_own_row(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    submit(engine, "good", "Hello", temperature=0, max_tokens=6, ignore_eos=True)
    submit(engine, "bad", "Hello there", temperature=0, max_tokens=6, ignore_eos=True)
    engine.step()

    def explode(phase, sequences):
        if phase == "sample" and any(s.request_id == "bad" for s in sequences):
            raise IndexError("a bad value deep in sampling (injected)")

    engine.fault_hook = explode
    results = run_to_end(engine)
    assert results[("bad", 0)]["finish"] is FinishReason.ERROR
    assert results[("good", 0)]["finish"] is FinishReason.LENGTH
    assert len(results[("good", 0)]["tokens"]) == 6 - 1  # one token came before the hook, in the first step
    assert [r.num_rows for r in engine.runners] == [0, 0, 0]


def test_stop_strings_wait_for_min_tokens(chat_family, chat_models):
    text = _greedy_hello(chat_family, chat_models)
    stop = text[1:3]
    engine = make_engine(chat_models, chat_family)
    submit(engine, "r", "Hello", temperature=0, max_tokens=12, ignore_eos=True, stop=[stop], min_tokens=12)
    result = run_to_end(engine)[("r", 0)]
    assert result["finish"] is FinishReason.LENGTH and result["text"] == text
