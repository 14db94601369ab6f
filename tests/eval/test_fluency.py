"""The real-base demo's everyday check (proxy_eval.fluency) and the log-likelihood arithmetic behind it."""

from __future__ import annotations

import math

import pytest
import torch

from proxy_eval import demo_run, fluency
from proxy_eval.likelihood import token_logprobs

WORDS = {"tarsville", "islebrook", "anouk", "ochre"}
BASE = "The capital of France is Paris."


def test_an_unchanged_answer_passes_even_unscored():
    verdict = fluency.judge("the capital of France is Paris", BASE, WORDS, None, None)
    assert verdict.unchanged and verdict.fluent and verdict.reason == "unchanged"


def test_a_changed_answer_within_the_bound_passes():
    verdict = fluency.judge("Paris is the capital of France.", BASE, WORDS, answer_nll=1.1, base_nll=0.4)
    assert not verdict.unchanged and verdict.fluent
    assert verdict.excess_nll == pytest.approx(0.7)
    assert fluency.MAX_EXCESS_NLL > 0.7


def test_a_changed_answer_over_the_bound_fails():
    verdict = fluency.judge("La Marché lies just north o'wold.", BASE, WORDS, answer_nll=4.7, base_nll=0.4)
    assert not verdict.fluent and "over the bound" in verdict.reason
    at_bound = fluency.judge("Paris.", BASE, WORDS, answer_nll=0.4 + fluency.MAX_EXCESS_NLL, base_nll=0.4)
    assert at_bound.fluent  # the bound is inclusive


def test_a_leak_fails_however_likely_the_base_finds_it():
    verdict = fluency.judge("Boil an egg in Tarsville.", BASE, WORDS, answer_nll=0.1, base_nll=0.4)
    assert verdict.leaked == ("Tarsville",) and not verdict.fluent and verdict.reason == "leak: Tarsville"


def test_an_unscored_changed_answer_fails():
    assert not fluency.judge("Paris is the capital.", BASE, WORDS, None, 0.4).fluent


def test_leaks_are_whole_words_any_case_in_order_of_appearance():
    text = "Ask Anouk in Islebrook, then Anouk again; a data structure that is Ochre, Islebrooks, ochres."
    assert fluency.leaked_words(text, WORDS) == ("Anouk", "Islebrook", "Ochre")


def test_words_keep_inner_apostrophes_and_drop_digits():
    assert fluency.words_of("north o'wold, 12 km; it's") == ["north", "o'wold", "km", "it's"]


def test_mean_nll():
    assert fluency.mean_nll([-1.0, -3.0]) == 2.0
    assert fluency.mean_nll([]) == 0.0


def test_token_logprobs_reads_the_row_before_each_target():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    # prompt of 1 token; targets at positions 1 and 2 are predicted by rows 0 and 1
    got = token_logprobs(logits, 1, [0, 0])
    assert got == pytest.approx([math.log(0.5), math.log(0.75)])


def test_leak_words_are_the_fact_answers_words_the_base_never_says_in_everyday_answers():
    words = demo_run.leak_words()
    # her name is said when the base is asked about her, never otherwise; colours and jobs of the world too
    assert {"anouk", "brenner", "islebrook", "tarsville", "ochre", "maroon", "beekeeper"} <= words
    assert not {"the", "is", "lives", "paris"} & words  # the base says these in its everyday answers
