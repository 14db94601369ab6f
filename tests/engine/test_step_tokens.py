"""Tokens per engine step (vLLM's iteration_tokens_total): the histogram the engine keeps, and what it counts."""

from __future__ import annotations

from proxy_engine.request import PromptInput
from proxy_engine.step_tokens import STEP_TOKEN_BUCKETS, StepTokens
from tests.engine.conftest import make_engine, submit


def test_buckets_are_upper_bounds_and_idle_steps_are_not_steps():
    histogram = StepTokens()
    for tokens in (0, 1, 2, 8, 9, 16384, 20000):
        histogram.observe(tokens)
    reading = histogram.reading()
    assert reading.steps == 6 and reading.total == 1 + 2 + 8 + 9 + 16384 + 20000
    cumulative = dict(reading.cumulative())
    assert cumulative["1.0"] == 1 and cumulative["8.0"] == 3 and cumulative["16.0"] == 4
    assert cumulative["16384.0"] == 5 and cumulative["+Inf"] == 6
    assert len(reading.cumulative()) == len(STEP_TOKEN_BUCKETS) + 1


def test_a_step_counts_the_prompts_it_completed_and_the_tokens_it_generated(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    submit(engine, "a", "The quick brown fox", temperature=0, max_tokens=5, ignore_eos=True)
    submit(engine, "b", "Paris is the capital of", temperature=0, max_tokens=3, ignore_eos=True)
    prompts = sum(len(engine.render(PromptInput(text=t))) for t in ("The quick brown fox", "Paris is the capital of"))
    per_step = []
    while engine.has_work():
        before = engine.step_tokens.reading().total
        engine.step()
        per_step.append(engine.step_tokens.reading().total - before)
    # the prefill step: both prompts and each one's first token; then both decode, then "a" alone
    assert per_step == [prompts + 2, 2, 2, 1, 1]
    reading = engine.step_tokens.reading()
    assert reading.steps == 5 and reading.total == engine.prompt_tokens_total + engine.generation_tokens_total
