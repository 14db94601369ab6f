"""``thinking_token_budget``: the count of thinking tokens, and the closing tag forced once it is spent."""

from __future__ import annotations

import pytest

from proxy_engine.request import SamplingParams, ThinkingTags
from proxy_engine.thinking_budget import SETTLE_TOKENS, ThinkingBudget
from tests.engine.conftest import make_engine, run_to_end, submit

THINK = ThinkingTags(("<think>",), ("</think>",))
OPENED = ThinkingTags(("<think>",), ("</think>",), opened=True)
CLOSE = (7, 8)  # the closing tag's tokens, as a tokenizer might split it


def _run(budget: ThinkingBudget, pieces: list[str]) -> list[int | None]:
    """What the budget forces before each token, writing ``pieces`` (or the forced token, written as "#")."""
    text, forced = "", []
    for tokens, piece in enumerate(pieces, start=1):
        forced.append(budget.forced())
        text += "#" if budget.forced() is not None else piece
        budget.observe(text, tokens)
    return forced


def test_a_block_opened_in_the_prompt_is_closed_after_the_budget():
    assert _run(ThinkingBudget(3, OPENED, CLOSE), list("abcdefg")) == [None, None, None, 7, 8, None, None]


def test_a_budget_of_zero_closes_the_block_at_once():
    assert _run(ThinkingBudget(0, OPENED, CLOSE), list("abcd")) == [7, 8, None, None]


def test_the_count_starts_where_the_model_opens_the_block():
    pieces = ["Hi ", "<th", "ink>", "a", "b", "c", "d", "e"]  # the tag in two tokens
    assert _run(ThinkingBudget(2, THINK, CLOSE), pieces) == [None, None, None, None, None, 7, 8, None]
    # never opened: nothing is forced
    assert _run(ThinkingBudget(0, THINK, CLOSE), list("abcdef")) == [None] * 6


def test_a_block_closed_in_budget_is_left_alone():
    pieces = ["<think>", "a", "</thi", "nk>", "x", "y", "z"]
    assert _run(ThinkingBudget(4, THINK, CLOSE), pieces) == [None] * 7
    # a tag in the same token as other text counts alike
    assert _run(ThinkingBudget(2, OPENED, CLOSE), ["a</think>b", "c", "d"]) == [None] * 3


def test_every_spelling_of_a_tag_counts():
    granite = ThinkingTags(("Here is my thought process:", "Here's my thought process:"),
                           ("Here is my response:", "Here's my response:"))
    pieces = ["Here's my thought process:", " a", " b", " Here's my response:", " c", " d"]
    assert _run(ThinkingBudget(3, granite, CLOSE), pieces) == [None] * 6
    assert _run(ThinkingBudget(1, granite, CLOSE), pieces) == [None, None, 7, 8, None, None]


def _settling(budget: ThinkingBudget, settled: list[bool]) -> list[int | None]:
    forced = []
    for tokens, whole in enumerate(settled, start=1):
        forced.append(budget.forced())
        budget.observe("x" * tokens, tokens, whole)
    return forced


def test_the_tag_waits_for_a_character_written_in_byte_tokens_to_end():
    """Spent on a token that ends inside a character: the tag comes once the character is whole, or after
    SETTLE_TOKENS more tokens (a run of bytes that never makes one)."""
    assert _settling(ThinkingBudget(2, OPENED, CLOSE), [True, False, False, True, True, True]) == [
        None, None, None, None, 7, 8]
    assert _settling(ThinkingBudget(2, OPENED, CLOSE), [False] * 8) == [None] * (2 + SETTLE_TOKENS) + [7, 8]


@pytest.fixture()
def engine(plain_models, tiny_family):
    return make_engine(plain_models, tiny_family, chat_expert=False)


def test_the_engine_forces_the_closing_tag_after_the_budget(engine):
    """Greedy, a block opened in the prompt: the first 3 tokens are the model's own, then the closing tag's tokens
    exactly, then the model again; a budget never reached changes nothing."""
    close_ids = engine.models[0].tokenizer.encode("</think>", add_special_tokens=False)
    free = dict(temperature=0, max_tokens=12, ignore_eos=True)
    submit(engine, "free", "Let me think", **free)
    submit(engine, "budget", "Let me think", **free, thinking_token_budget=3, thinking_tags=OPENED)
    submit(engine, "large", "Let me think", **free, thinking_token_budget=50, thinking_tags=OPENED)
    results = run_to_end(engine)
    own, capped, large = (results[(r, 0)]["tokens"] for r in ("free", "budget", "large"))
    assert capped[:3] == own[:3] and capped[3:3 + len(close_ids)] == close_ids
    assert len(capped) == 12 and large == own
    assert results[("budget", 0)]["text"].count("</think>") >= 1


def test_the_engine_counts_from_where_the_model_opens_the_block(engine):
    """The model's own first two tokens taken as the opening tag: two more of its tokens, then the closing tag."""
    free = dict(temperature=0.8, seed=5, max_tokens=16, ignore_eos=True)
    submit(engine, "free", "Let me think", **free)
    own = run_to_end(engine)[("free", 0)]
    opening = engine.models[0].tokenizer.decode(own["tokens"][:2])
    tags = ThinkingTags((opening,), ("</think>",))
    submit(engine, "budget", "Let me think", **free, thinking_token_budget=2, thinking_tags=tags)
    capped = run_to_end(engine)[("budget", 0)]["tokens"]
    close_ids = engine.models[0].tokenizer.encode("</think>", add_special_tokens=False)
    assert capped[:4] == own["tokens"][:4] and capped[4:4 + len(close_ids)] == close_ids  # seeded: same draws


def test_a_budget_needs_tags():
    with pytest.raises(ValueError, match="needs to know where thinking ends"):
        SamplingParams(thinking_token_budget=5).validate(100, 1)
    with pytest.raises(ValueError, match="thinking_token_budget must be a count of tokens"):
        SamplingParams(thinking_token_budget=-1, thinking_tags=THINK).validate(100, 1)


def test_a_budget_and_an_output_constraint_do_not_mix():
    from proxy_engine.request import StructuredOutput

    params = SamplingParams(thinking_token_budget=5, thinking_tags=THINK, structured=StructuredOutput("choice", ["a"]))
    with pytest.raises(ValueError, match="cannot be combined with an output constraint"):
        params.validate(100, 1)
