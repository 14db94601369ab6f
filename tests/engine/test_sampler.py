"""sampler: greedy and seeded draws, top-k / top-p / min-p, penalties, bias, bans, top logprobs."""

from __future__ import annotations

import math

import torch

from proxy_engine.sampler import (
    apply_logit_bias,
    apply_penalties,
    ban_tokens,
    draw,
    filter_top_k_top_p_min_p,
    top_logprobs,
)


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert draw(logits, torch.tensor([True, True]), [None, None]).tolist() == [1, 0]
    draws = []
    for _ in range(2):
        g = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
        draws.append([draw(logits, torch.tensor([False, False]), g).tolist() for _ in range(20)])
    assert draws[0] == draws[1]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw(logits, torch.tensor([False]), [g]) for _ in range(3000)])
    counts = torch.bincount(draws.flatten(), minlength=3)
    assert abs(counts[0].item() / 3000 - 0.7) < 0.04


def test_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    out = filter_top_k_top_p_min_p(
        logits, torch.tensor([2, 0, 0, 0]), torch.tensor([1.0, 0.8, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.4, 0.0])
    )
    keep = torch.isfinite(out)
    assert keep[0].tolist() == [True, True, False, False]  # top_k 2
    assert keep[1].tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert keep[2].tolist() == [True, True, False, False]  # min_p 0.4 * 0.5 = 0.2 > 0.15
    assert keep[3].all()
    torch.testing.assert_close(out[3], logits[3])


def test_top_p_keeps_the_top_token_always():
    logits = torch.tensor([[1.0, 0.0]])
    out = filter_top_k_top_p_min_p(logits, torch.tensor([0]), torch.tensor([1e-6]), torch.tensor([0.0]))
    assert torch.isfinite(out[0, 0]) and not torch.isfinite(out[0, 1])


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    prompt = torch.tensor([[False, False, True, False]])
    out = apply_penalties(logits, counts, prompt, torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([2.0]))
    # token 0: 2/2 - 0.25*2 - 0.5; token 1: -2*2 - 0.25 - 0.5; token 2 (prompt only): 1/2; token 3 untouched
    torch.testing.assert_close(out, torch.tensor([[0.0, -4.75, 0.5, 1.0]]))


def test_logit_bias_and_bans():
    logits = torch.zeros(2, 4)
    apply_logit_bias(logits, [{1: 5.0}, None])
    ban_tokens(logits, [[], [0, 3]])
    assert logits[0].tolist() == [0.0, 5.0, 0.0, 0.0]
    assert logits[1, 0] == -math.inf and logits[1, 3] == -math.inf


def test_top_logprobs_are_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    chosen, values, ids = top_logprobs(logits, torch.tensor([0]), 2)
    expected = torch.log_softmax(logits, -1)
    assert ids.tolist() == [[2, 1]]
    torch.testing.assert_close(values, expected[:, [2, 1]])
    torch.testing.assert_close(chosen, expected[:, 0])
