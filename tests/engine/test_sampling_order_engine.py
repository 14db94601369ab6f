"""The sampling order through the engine: distributions shaped with logit_bias on the combined logits, many
seeded draws (the pure functions are tests/engine/test_sampling_order.py)."""

from __future__ import annotations

import math
from collections import Counter

from proxy_engine.request import PromptInput, SamplingParams
from tests.engine.conftest import make_engine


def _shaped_draws(engine, probs: list[float], requests: int = 40, **params) -> Counter:
    """Bias four tokens so the combined distribution is ``probs`` (the rest ~e-13), then sample the first token
    of ``requests`` x 16 seeded choices."""
    seen = []
    engine.logits_hook = lambda sequences, logits: seen.append(logits[0].clone())
    engine.add(engine.make_sequences("probe", PromptInput(text="Shape"), SamplingParams(max_tokens=1,
                                                                                          temperature=0.0)))
    while engine.has_work():
        engine.step()
    engine.logits_hook = None
    tokens = [10, 20, 30, 40, 50][: len(probs)]
    bias = {t: 30.0 + math.log(p) - float(seen[0][t]) for t, p in zip(tokens, probs)}
    for r in range(requests):
        engine.add(engine.make_sequences(f"s{r}", PromptInput(text="Shape"), SamplingParams(
            max_tokens=1, n=16, seed=1000 * r, logit_bias=bias, **params)))
    counts: Counter = Counter()
    while engine.has_work():
        for output in engine.step():
            if output.new_token_ids:
                counts[tokens.index(output.new_token_ids[0]) if output.new_token_ids[0] in tokens else -1] += 1
    return counts


def _engine(models, family):
    return make_engine(models, family, max_waiting=1024, max_num_seqs=256)


def test_engine_scales_by_temperature_before_top_p(chat_models, chat_family):
    counts = _shaped_draws(_engine(chat_models, chat_family), [0.5, 0.3, 0.15, 0.05], temperature=0.5,
                           top_p=0.9)
    assert set(counts) == {0, 1}  # filtering before scaling kept the third token (mass before it: 0.8)
    assert 0.68 < counts[0] / sum(counts.values()) < 0.79


def test_engine_measures_top_p_on_what_top_k_kept(chat_models, chat_family):
    counts = _shaped_draws(_engine(chat_models, chat_family), [0.5, 0.2, 0.1, 0.1, 0.1], top_k=3, top_p=0.8)
    assert set(counts) == {0, 1}


def test_engine_applies_typical_p(chat_models, chat_family):
    """p = [.4, .2, .2, .2] with typical_p 0.5: the likeliest token is the least typical, and never drawn."""
    counts = _shaped_draws(_engine(chat_models, chat_family), [0.4, 0.2, 0.2, 0.2], requests=10, temperature=1.0,
                           typical_p=0.5)
    assert set(counts) == {1, 2, 3}
