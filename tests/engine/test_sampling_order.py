"""The sampling order (transformers' warpers): temperature, then top-k, then top-p on what top-k kept
(renormalised), then min-p. Many seeded draws from shaped distributions: which tokens can appear, and
(loosely) how often."""

from __future__ import annotations

import math
from collections import Counter

import torch

from proxy_engine.sampler import apply_temperature, draw, filter_top_k_top_p_min_p

DRAWS = 3000


def _draws(probs: list[float], *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, vocab=16) -> Counter:
    """Sample ``DRAWS`` times (one seeded generator) from ``probs`` padded with near-zero tokens."""
    logits = torch.full((vocab,), -60.0)
    logits[: len(probs)] = torch.tensor([math.log(p) for p in probs])
    rows = logits.repeat(DRAWS, 1)
    scaled = apply_temperature(rows, torch.full((DRAWS,), float(temperature)))
    filtered = filter_top_k_top_p_min_p(
        scaled, torch.full((DRAWS,), top_k), torch.full((DRAWS,), float(top_p)), torch.full((DRAWS,), float(min_p))
    )
    generator = torch.Generator().manual_seed(1234)
    tokens = draw(filtered, torch.zeros(DRAWS, dtype=torch.bool), [generator] * DRAWS)
    return Counter(tokens.tolist())


def test_temperature_before_top_p():
    """p = [.5, .3, .15, .05], T 0.5: scaled, the nucleus of 0.9 is the first two tokens (0.69 + 0.25)."""
    counts = _draws([0.5, 0.3, 0.15, 0.05], temperature=0.5, top_p=0.9)
    assert set(counts) == {0, 1}
    share = counts[0] / DRAWS  # 0.25 / (0.25 + 0.09) = 0.735
    assert 0.69 < share < 0.78


def test_top_p_measured_on_what_top_k_kept():
    """p = [.5, .2, .1, .1, .1], top-k 3 renormalises to [.625, .25, .125]: top-p 0.8 keeps two."""
    counts = _draws([0.5, 0.2, 0.1, 0.1, 0.1], top_k=3, top_p=0.8)
    assert set(counts) == {0, 1}
    assert 0.66 < counts[0] / DRAWS < 0.76  # 0.5 / 0.7 = 0.714


def test_min_p_after_top_p_relative_to_the_top():
    counts = _draws([0.4, 0.3, 0.2, 0.06, 0.04], min_p=0.2)  # keeps p >= 0.08
    assert set(counts) == {0, 1, 2}
    counts = _draws([0.4, 0.3, 0.2, 0.06, 0.04], temperature=2.0, min_p=0.35)  # sqrt-flattened: >= 0.35 * top
    assert set(counts) == {0, 1, 2, 3}


def test_unfiltered_frequencies_follow_the_temperature():
    counts = _draws([0.6, 0.3, 0.1], temperature=1.0)
    assert set(counts) == {0, 1, 2}
    assert abs(counts[0] / DRAWS - 0.6) < 0.04 and abs(counts[2] / DRAWS - 0.1) < 0.03


def test_the_most_likely_token_always_stays():
    counts = _draws([0.5, 0.5], top_p=1e-6, top_k=1, min_p=1.0)
    assert set(counts) <= {0, 1} and len(counts) == 1


def test_a_generator_on_another_device_than_the_logits_is_used_there():
    """``draw`` moves a row to its generator's device (the engine places generators with the logits)."""
    logits = torch.tensor([[0.0, 0.0, -50.0]])
    generator = torch.Generator(device="cpu").manual_seed(0)
    token = draw(logits, torch.tensor([False]), [generator])
    assert int(token[0]) in (0, 1)



def test_typical_p_equals_transformers_warper():
    """Locally typical sampling keeps the same tokens as transformers' TypicalLogitsWarper, row by row, each row
    with its own mass (1: off), also after another filter has masked tokens."""
    from transformers.generation.logits_process import TypicalLogitsWarper

    from proxy_engine.sampler import filter_typical

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator) * 3
    logits[5, 10:] = float("-inf")  # a row another filter already cut
    masses = [0.2, 0.5, 0.9, 0.95, 1.0, 0.7]
    ours = filter_typical(logits.clone(), torch.tensor(masses))
    for row, mass in enumerate(masses):
        one = logits[row : row + 1].clone()
        expected = one if mass >= 1.0 else TypicalLogitsWarper(mass)(None, one)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected[0])), row
        kept = ~torch.isinf(ours[row])
        assert torch.equal(ours[row][kept], logits[row][kept])


def test_typical_p_prefers_the_typical_over_the_likely():
    """p = [.4, .2, .2, .2]: entropy 1.33 nats; the three 0.2 tokens (surprisal 1.61) are more typical than the
    0.4 one (0.92), so a mass of 0.5 keeps those three and never the likeliest token."""
    from proxy_engine.sampler import filter_typical

    logits = torch.tensor([[math.log(p) for p in (0.4, 0.2, 0.2, 0.2)]])
    kept = ~torch.isinf(filter_typical(logits, torch.tensor([0.5])))
    assert kept.tolist() == [[False, True, True, True]]
