"""Prompt logprobs (``echo`` with ``logprobs``, vLLM's ``prompt_logprobs``): the combined distribution's
log-probability and rank of every prompt token, equal to a naive full forward of each model, whatever the chunking,
padding and batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from proxy_engine.intake import check_scorable
from proxy_engine.prompt_scores import PromptScores
from proxy_engine.request import FinishReason, PromptInput, SamplingParams, Target
from tests.engine.conftest import make_engine, submit


@torch.no_grad()
def naive_prompt_logprobs(models, prompt: list[int], weights: list[float], vocab: int
                          ) -> tuple[torch.Tensor, list[int]]:
    """``[len(prompt) - 1]``: log p(prompt[p + 1] | prompt[: p + 1]) under the combined logits, no cache, and
    each token's rank (1 + how many tokens score strictly higher)."""
    combined = torch.zeros(len(prompt), vocab, dtype=torch.float64)
    for model, weight in zip(models, weights):
        if weight:
            combined += weight * model.model(torch.tensor([prompt])).logits[0, :, :vocab].double()
    logprobs = torch.log_softmax(combined, -1)[:-1]
    chosen = logprobs.gather(-1, torch.tensor(prompt[1:])[:, None])
    return chosen.squeeze(-1).float(), ((logprobs > chosen).sum(-1) + 1).tolist()


def test_prompt_logprobs_match_a_naive_forward(tiny_family, plain_models, monkeypatch):
    # A small budget chunks every prefill; alpha 0 leaves the small models with fewer rows than the base, and
    # prompts of different lengths pad differently: the jobs are kept aligned on the prompts' right edge.
    engine = make_engine(plain_models, tiny_family, chat_expert=False, max_num_batched_tokens=16)
    held = []
    add = PromptScores.add

    def recording(self, *args):
        add(self, *args)
        held.append(self.window.shape[0])

    monkeypatch.setattr(PromptScores, "add", recording)
    requests = {
        "long": ("The quick brown fox jumps over the lazy dog and keeps on running far away", {"alpha": 1.0}),
        "short": ("Paris is the capital", {"alpha": 0.5}),
        "base": ("Numbers 0 1 2 3 4 5 6 7", {"alpha": 0.0}),
        "alone": ("Question: what is it", {"target": Target.BASE}),
    }
    sequences = {}
    for request_id, (prompt, extra) in requests.items():
        (sequences[request_id],) = submit(engine, request_id, prompt, temperature=0, max_tokens=2,
                                          prompt_logprobs=3, **extra)
    firsts = {}
    while engine.has_work():
        for output in engine.step():
            if output.prompt_logprobs is not None:
                assert output.request_id not in firsts
                firsts[output.request_id] = output
    vocab = engine.vocab_size
    for request_id, sequence in sequences.items():
        prompt = sequence.prompts[0]
        entries = firsts[request_id].prompt_logprobs
        assert [e.token_id for e in entries] == prompt
        assert entries[0].logprob is None and entries[0].top == []
        want, ranks = naive_prompt_logprobs(plain_models, prompt, sequence.weights, vocab)
        got = torch.tensor([e.logprob for e in entries[1:]])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert [e.rank for e in entries[1:]] == ranks and entries[0].rank is None
        assert max(ranks) > 3  # some prompt token lies outside the top 3: its rank is not read off the top list
        for entry in entries[1:]:
            assert len(entry.top) == 3 and entry.top[0].logprob >= entry.top[-1].logprob
            assert entry.logprob <= entry.top[0].logprob + 1e-6
    assert all(s.finish_reason is FinishReason.LENGTH and len(s.output_ids) == 2 for s in sequences.values())
    # Every model reaches a position in the same step: never more than one chunk (16 columns here) held.
    assert held and max(held) <= 16


def test_scored_prefills_keep_the_jobs_aligned_on_the_right_edge():
    """With prompt scores in a group, each job gets the columns that leave it as many to go as the others:
    a wide job (a longer prompt of another sequence) starts first, the narrow ones join as they line up."""
    from types import SimpleNamespace

    from proxy_engine.prefill import PrefillGroup

    def job(rows: int, width: int, done: int = 0):
        return SimpleNamespace(ids=torch.zeros(rows, width), done=done)

    group = SimpleNamespace(jobs={0: job(4, 40), 1: job(1, 12), 2: job(1, 30)})
    assert PrefillGroup._aligned_columns(group, 32) == {0: 8, 1: 0, 2: 0}  # 32 // 4 rows = 8 columns a step
    steps = 0
    while any(j.done < j.ids.shape[1] for j in group.jobs.values()):
        for index, columns in PrefillGroup._aligned_columns(group, 32).items():
            group.jobs[index].done += columns
        steps += 1
        left = [j.ids.shape[1] - j.done for j in group.jobs.values() if j.done]
        assert len(set(left)) == 1, left  # every started job has as many columns to go as the others
    assert steps == 5  # the widest job's pace: 40 columns, 8 a step


def test_max_tokens_zero_scores_the_prompt_only(tiny_family, plain_models):
    engine = make_engine(plain_models, tiny_family, chat_expert=False)
    submit(engine, "score", "The quick brown fox", max_tokens=0, prompt_logprobs=0, n=2)
    submit(engine, "other", "Hello there", temperature=0, max_tokens=3, ignore_eos=True)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    scored = [o for o in outputs if o.request_id == "score"]
    assert len(scored) == 2 and {o.index for o in scored} == {0, 1}
    for output in scored:
        assert output.finish_reason is FinishReason.LENGTH and output.new_token_ids == [] and output.text_delta == ""
        assert output.completion_tokens == 0 and output.prompt_tokens == len(output.prompt_logprobs)
        assert all(e.top == [] for e in output.prompt_logprobs)
    assert scored[0].prompt_logprobs is scored[1].prompt_logprobs  # the two choices share one scoring
    assert sum(len(o.new_token_ids) for o in outputs if o.request_id == "other") == 3
    assert not engine.running and not any(r.num_rows for r in engine.runners)


def test_prompt_logprobs_need_every_model_on_plain_text(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)  # the expert reads its chat template
    with pytest.raises(ValueError, match="expert model uses its chat format"):
        engine.make_sequences("r", PromptInput(text="Hi"), SamplingParams(max_tokens=1, prompt_logprobs=1))
    # The base alone reads plain text: fine.
    engine.make_sequences("r", PromptInput(text="Hi"), SamplingParams(max_tokens=1, prompt_logprobs=1), Target.BASE)
    # A chat-format base cannot score, and the remedy is its own prompt_format
    chat_base = dataclasses.replace(chat_models[0], renderer=chat_models[1].renderer)
    with pytest.raises(ValueError, match="the base model uses its chat format .* serve the base with prompt_format"):
        check_scorable({0: [1, 2]}, [chat_base])
    with pytest.raises(ValueError, match="prompt_logprobs must be between 0 and 20"):
        SamplingParams(prompt_logprobs=21).validate(100, 1)
    with pytest.raises(ValueError, match="max_tokens must be at least 0"):
        SamplingParams(max_tokens=-1).validate(100, 1)


def test_prompt_scores_hold_only_the_positions_between_the_models():
    """Chunks arrive per model at different rates; the result equals the one-shot computation and the buffer
    never holds more than the lead of the fastest model."""
    torch.manual_seed(0)
    prompt = [(3 * i) % 7 for i in range(12)]
    logits = {0: torch.randn(12, 7), 1: torch.randn(12, 7), 2: torch.randn(12, 7)}
    weights = {0: 1.0, 1: 0.7, 2: -0.7}
    scores = PromptScores(prompt, [0, 1, 2], 2, 7, torch.device("cpu"))
    pad = {0: 3, 1: 0, 2: 0}  # model 0's job is padded by 3 columns (a longer prompt in its batch)
    chunk = {0: 5, 1: 4, 2: 2}
    done = dict.fromkeys(logits, 0)
    widest = 0
    while any(done[m] < 12 + pad[m] for m in logits):
        for m in logits:
            if done[m] >= 12 + pad[m]:
                continue
            columns = min(chunk[m], 12 + pad[m] - done[m])
            padded = torch.cat([torch.full((pad[m], 7), float("nan")), logits[m]])  # padding never read
            scores.add(m, done[m] - pad[m], padded[done[m] : done[m] + columns], weights[m])
            done[m] += columns
            lead = max(scores.reached.values()) - min(scores.reached.values())
            assert scores.window.shape[0] == lead  # what the slowest model has yet to reach, no more
            widest = max(widest, lead)
    assert scores.complete and 0 < widest < len(prompt) - 1
    combined = sum(weights[m] * logits[m] for m in logits)
    want = torch.log_softmax(combined, -1)[:-1].gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(scores.chosen), want, atol=1e-5, rtol=0)
    assert scores.top_ids == torch.log_softmax(combined, -1)[:-1].topk(2).indices.tolist()


def test_a_prompt_may_fill_the_context_when_only_scored(tiny_family, plain_models):
    """Harnesses score windows of exactly the model's length: with max_tokens 0 nothing follows the prompt."""
    engine = make_engine(plain_models, tiny_family, chat_expert=False, max_model_len=32)
    window = [(7 * i) % 500 + 3 for i in range(32)]
    submit(engine, "full", window, max_tokens=0, prompt_logprobs=0)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    (output,) = outputs
    assert output.finish_reason is FinishReason.LENGTH and len(output.prompt_logprobs) == 32
    # The cause is prompt plus max_tokens, and the message names both (lm-evaluation-harness sends max_tokens 1).
    with pytest.raises(ValueError, match=r"32 tokens\. However, you requested 33 tokens \(32 in the prompt .*"
                                         r"1 in max_tokens\)"):
        submit(engine, "one more", window, max_tokens=1)
    with pytest.raises(ValueError, match="maximum context length is 32 tokens, but the prompt is 33 tokens"):
        submit(engine, "too long", [*window, 5], max_tokens=0, prompt_logprobs=0)
