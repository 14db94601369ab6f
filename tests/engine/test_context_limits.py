"""The context left: max_tokens that do not fit are refused (never clamped), a missing one fills the context."""

from __future__ import annotations

import pytest

from proxy_engine.request import ContextLengthError, PromptInput, SamplingParams
from tests.engine.conftest import make_engine


def test_missing_max_tokens_means_up_to_the_context_left(chat_models, chat_family):
    engine = make_engine(chat_models, chat_family, max_model_len=64)
    (sequence,) = engine.make_sequences("r", PromptInput(token_ids=[5] * 20), SamplingParams())
    longest = max(len(ids) for ids in sequence.prompts.values())  # the chat expert's templated prompt
    assert sequence.max_tokens == 64 - longest


def test_max_tokens_past_the_context_left_is_refused_not_clamped(chat_models, chat_family):
    engine = make_engine(chat_models, chat_family, max_model_len=64)
    with pytest.raises(ContextLengthError, match=r"However, you requested \d+ tokens \(\d+ in the prompt as the "
                                                 r"\w+ model sees it, 60 in max_tokens\)") as caught:
        engine.make_sequences("r", PromptInput(token_ids=[5] * 20), SamplingParams(max_tokens=60))
    assert caught.value.param == "max_tokens"
    with pytest.raises(ContextLengthError):
        engine.make_sequences("r", PromptInput(token_ids=[5] * 20), SamplingParams(max_tokens=10**12))


def test_a_prompt_that_leaves_no_room_is_refused_naming_the_prompt(chat_models, chat_family):
    engine = make_engine(chat_models, chat_family, chat_expert=False, max_model_len=32)
    with pytest.raises(ContextLengthError, match="leaves no room for a completion") as caught:
        engine.make_sequences("r", PromptInput(token_ids=[5] * 32), SamplingParams())
    assert caught.value.param == "prompt"


def test_a_default_max_tokens_caps_the_context_left_and_never_refuses(chat_models, chat_family):
    """The model's max_new_tokens (a request that sent no max_tokens) is a cap: fewer when the context has
    more room, the context left when it has less, never a 400 for a number the client did not send."""
    engine = make_engine(chat_models, chat_family, max_model_len=64)
    prompt = PromptInput(token_ids=[5] * 20)
    (sequence,) = engine.make_sequences("a", prompt, SamplingParams(default_max_tokens=7))
    assert sequence.max_tokens == 7
    (sequence,) = engine.make_sequences("b", prompt, SamplingParams(default_max_tokens=10_000))
    longest = max(len(ids) for ids in sequence.prompts.values())
    assert sequence.max_tokens == 64 - longest
    (sequence,) = engine.make_sequences("c", prompt, SamplingParams(max_tokens=9, default_max_tokens=3))
    assert sequence.max_tokens == 9  # the request's own max_tokens wins
