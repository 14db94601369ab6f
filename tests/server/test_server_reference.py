"""Greedy output through HTTP equals the naive uncached proxy-tuning reference."""

from __future__ import annotations

import pytest

from tests.server.live import MODEL
from tests.server.reference import NaiveProxy

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def naive(tiny_family) -> NaiveProxy:
    return NaiveProxy(tiny_family)


def _tokens(http, **body) -> list[int]:
    response = http.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


@pytest.mark.parametrize(
    ("model", "extra", "kwargs"),
    [
        (MODEL, {}, {"alpha": 1.0}),
        (MODEL, {"alpha": 0.5}, {"alpha": 0.5}),
        (MODEL, {"alpha": [2.0]}, {"alpha": 2.0}),
        (MODEL, {"alpha": 0}, {"alpha": 0.0}),
        (f"{MODEL}:base", {}, {"alpha": 0.0}),
        (f"{MODEL}:expert", {}, {"expert_only": True}),
    ],
    ids=["proxy-default", "alpha-0.5", "alpha-list", "alpha-0", "base", "expert"],
)
def test_completion_greedy_equals_reference(client, http, naive, model, extra, kwargs):
    prompt = "The capital of France is"
    response = client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "skip_special_tokens": True, **extra},
    )
    expected = naive.greedy(_tokens(http, prompt=prompt, model=model), MAX_TOKENS, **kwargs)
    assert response.choices[0].text == naive.text(expected)
    assert response.usage.completion_tokens == MAX_TOKENS


def test_chat_greedy_equals_reference(client, http, naive):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    expected = naive.greedy(_tokens(http, messages=messages), MAX_TOKENS)
    assert response.choices[0].message.content == naive.text(expected)


def test_token_id_prompt_equals_text_prompt(client, http, naive):
    ids = _tokens(http, prompt="def add(a, b):")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == naive.text(naive.greedy(ids, 8))
    assert by_ids.usage.prompt_tokens == len(ids)
