"""The engine's combined logits equal a naive, uncached, unbatched reference, step by step."""

from __future__ import annotations

import torch

from proxy_engine.request import Serves, Target
from tests.engine.conftest import make_engine, submit
from tests.engine.reference import NaiveProxy


def test_per_step_logits_match_naive_reference(chat_family, chat_models):
    # A small prefill budget forces chunked prefill; requests arrive at different steps with mixed alphas.
    engine = make_engine(chat_models, chat_family, max_num_batched_tokens=16, max_num_seqs=8)
    recorded: dict[int, list[torch.Tensor]] = {}

    def record(sequences, combined):
        for row, sequence in enumerate(sequences):
            recorded.setdefault(sequence.seq_id, []).append(combined[row].detach().clone())

    engine.logits_hook = record
    common = dict(temperature=0, max_tokens=7, ignore_eos=True)
    schedule = {
        0: [("a", "The quick brown fox jumps over the lazy dog and keeps running", {"alpha": 1.0}),
            ("b", "Paris is", {"alpha": 0.0})],
        2: [("c", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
             {"alpha": 0.5})],
        4: [("d", "Numbers 0 1 2", {"alpha": 2.0}), ("e", "def add(a, b):", {"target": Target.EXPERT})],
        5: [("f", "Question: what", {"target": Target.BASE})],
    }
    sequences = []
    step = 0
    while step < 200 and (engine.has_work() or step <= max(schedule)):
        for request_id, prompt, extra in schedule.get(step, []):
            sequences += submit(engine, request_id, prompt, **{**common, **extra})
        engine.step()
        step += 1

    reference = NaiveProxy([str(chat_family.base), str(chat_family.expert), str(chat_family.anti_expert)], 512)
    assert {s.request_id for s in sequences} == set("abcdef")
    # Each model saw its own prompt: the chat expert's is longer than the base's.
    a = next(s for s in sequences if s.request_id == "a")
    assert len(a.prompts[1]) > len(a.prompts[0]) == len(a.prompts[2])
    b = next(s for s in sequences if s.request_id == "b")
    assert sorted(b.prompts) == [0], "alpha 0 must not run the small models"
    for sequence in sequences:
        prompts = [sequence.prompts.get(i) for i in range(3)]
        tokens, logits = reference.greedy(prompts, sequence.weights, len(sequence.output_ids))
        assert sequence.output_ids == tokens, sequence.request_id
        assert len(recorded[sequence.seq_id]) == len(logits)
        for got, want in zip(recorded[sequence.seq_id], logits):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_runner_rows_follow_running_sequences(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    submit(engine, "x", "one two three", temperature=0, max_tokens=30, ignore_eos=True, alpha=1.0)
    submit(engine, "y", "four", temperature=0, max_tokens=3, ignore_eos=True, alpha=0.0)
    for _ in range(6):
        engine.step()
    # y finished after 3 tokens; x still runs in all three models.
    assert [s.request_id for s in engine.running] == ["x"]
    assert [r.num_rows for r in engine.runners] == [1, 1, 1]


def test_two_expert_pairs_match_the_formula(tiny_family, chat_family):
    """s = s_base + a1 (e1 - a1) + a2 (e2 - a2), with per-request alphas (one of them 0)."""
    from proxy_engine.config import EngineConfig, ExpertPairConfig, ModelConfig
    from proxy_engine.engine import ProxyEngine
    from proxy_engine.loader import load_models

    def pair(family, alpha):
        return ExpertPairConfig(expert=ModelConfig(path=str(family.expert)),
                                anti_expert=ModelConfig(path=str(family.anti_expert)), alpha=alpha)

    config = EngineConfig(base=ModelConfig(path=str(tiny_family.base)),
                          experts=[pair(tiny_family, 1.0), pair(chat_family, 0.5)])
    engine = ProxyEngine(load_models(config), config)
    recorded: dict[int, list[torch.Tensor]] = {}
    engine.logits_hook = lambda seqs, combined: [
        recorded.setdefault(s.seq_id, []).append(combined[i].clone()) for i, s in enumerate(seqs)
    ]
    sequences = submit(engine, "default", "The quick brown", temperature=0, max_tokens=5, ignore_eos=True)
    sequences += submit(engine, "custom", "Paris is", temperature=0, max_tokens=5, ignore_eos=True, alpha=[0.0, 2.0])
    # A named pair's model ids (Target.pair): the second pair alone at its default, and its expert alone.
    sequences += submit(engine, "pair", "One two", Target(Serves.PROXY, 1), temperature=0, max_tokens=5,
                        ignore_eos=True)
    sequences += submit(engine, "pair-expert", "One two", Target(Serves.EXPERT, 1), temperature=0, max_tokens=5,
                        ignore_eos=True)
    while engine.has_work():
        engine.step()
    assert sequences[0].weights == [1.0, 1.0, -1.0, 0.5, -0.5]
    assert sorted(sequences[1].prompts) == [0, 3, 4]
    assert sequences[2].weights == [1.0, 0.0, 0.0, 0.5, -0.5] and sorted(sequences[2].prompts) == [0, 3, 4]
    assert sequences[3].weights == [0.0, 0.0, 0.0, 1.0, 0.0] and sorted(sequences[3].prompts) == [3]
    paths = [tiny_family.base, tiny_family.expert, tiny_family.anti_expert, chat_family.expert, chat_family.anti_expert]
    reference = NaiveProxy([str(p) for p in paths], 512)
    for sequence in sequences:
        prompts = [sequence.prompts.get(i) for i in range(5)]
        tokens, logits = reference.greedy(prompts, sequence.weights, len(sequence.output_ids))
        assert sequence.output_ids == tokens
        for got, want in zip(recorded[sequence.seq_id], logits):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_identical_prompts_are_prefilled_once(chat_family, chat_models):
    """The n choices of a request, and another request with the same prompt, share one prefill row per model;
    each still gets its own slot and decodes exactly as the reference does."""
    engine = make_engine(chat_models, chat_family, max_num_batched_tokens=16)
    prompt = "The quick brown fox jumps over the lazy dog"
    sequences = submit(engine, "n3", prompt, temperature=0, max_tokens=5, ignore_eos=True, n=3)
    sequences += submit(engine, "same", prompt, temperature=0, max_tokens=5, ignore_eos=True)
    sequences += submit(engine, "other", "Paris is", temperature=0, max_tokens=5, ignore_eos=True)
    groups = []
    while engine.has_work():
        engine.step()
        if engine.prefill is not None and (not groups or engine.prefill is not groups[-1]):
            groups.append(engine.prefill)
    # The four sequences of one prompt were admitted together and share one row in each model's job.
    first = groups[0]
    assert [s.request_id for s in first.sequences][:4] == ["n3", "n3", "n3", "same"]
    assert all(job.row_of[:4] == [0, 0, 0, 0] for job in first.jobs.values())
    assert all(job.ids.shape[0] == len(set(job.row_of)) for group in groups for job in group.jobs.values())
    reference = NaiveProxy([str(chat_family.base), str(chat_family.expert), str(chat_family.anti_expert)], 512)
    for sequence in sequences:
        tokens, _ = reference.greedy([sequence.prompts.get(i) for i in range(3)], sequence.weights, 5)
        assert sequence.output_ids == tokens, sequence.request_id
