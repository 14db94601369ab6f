"""The API through the official ``openai`` SDK: what real clients see."""

from __future__ import annotations

import pytest

from tests.server.live import MODEL

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason is not None:
                assert choice.index not in reasons, "two final chunks for one choice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def test_models_lists_proxy_then_base_then_expert(client):
    ids = [model.id for model in client.models.list().data]
    assert ids == [MODEL, f"{MODEL}:base", f"{MODEL}:expert"]
    assert client.models.retrieve(f"{MODEL}:base").id == f"{MODEL}:base"


def test_completion(client):
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, **GREEDY)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.model == MODEL
    choice = response.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + 5


def test_chat(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_completion_tokens=6, **GREEDY
    )
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 6


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_text_equals_non_streamed_greedy(client, endpoint):
    if endpoint == "completions":
        def call(**kw):
            return client.completions.create(model=MODEL, prompt="Numbers 0 1 2", max_tokens=16, **GREEDY, **kw)
    else:
        def call(**kw):
            return client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Count: 0 1 2"}], max_tokens=16, **GREEDY, **kw
            )
    whole = call()
    texts, reasons, usage = _stream_text(call(stream=True, stream_options={"include_usage": True}))
    expected = whole.choices[0].text if endpoint == "completions" else whole.choices[0].message.content
    assert texts[0] == expected
    assert reasons == {0: whole.choices[0].finish_reason}
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()


def test_n_choices_with_seed_are_reproducible(client):
    def call(**kw):
        return client.completions.create(model=MODEL, prompt="The quick", max_tokens=8, n=3, temperature=1.0,
                                         seed=1234, extra_body={"ignore_eos": True}, **kw)

    first, second = call(), call()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == 3 * 8
    texts, reasons, usage = _stream_text(call(stream=True, stream_options={"include_usage": True}))
    assert texts == {c.index: c.text for c in first.choices}
    assert set(reasons) == {0, 1, 2}
    assert usage.completion_tokens == 24


def test_chat_n_streamed(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=5, seed=3,
        stream=True, extra_body={"ignore_eos": True},
    )
    texts, reasons, _ = _stream_text(stream)
    assert set(texts) == {0, 1} and reasons == {0: "length", 1: "length"}


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(client, stream):
    full = client.completions.create(model=MODEL, prompt="Paris is the", max_tokens=24, **GREEDY).choices[0].text
    visible = full.strip()
    assert len(visible) >= 4, f"the tiny model said too little to test stop strings: {full!r}"
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    expected = full[: full.find(stop)]
    kwargs = {"model": MODEL, "prompt": "Paris is the", "max_tokens": 24, "stop": [stop, "\u2603never"], **GREEDY}
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        texts, reasons, _ = _stream_text(iter(chunks))
        assert texts[0] == expected and reasons[0] == "stop"
        assert [c.choices[0].stop_reason for c in chunks if c.choices[0].finish_reason] == [stop]
    else:
        response = client.completions.create(**kwargs)
        assert response.choices[0].text == expected and response.choices[0].finish_reason == "stop"
        assert response.choices[0].stop_reason == stop  # vLLM's: the stop string that ended it


def test_completion_logprobs(client):
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, logprobs=2, **GREEDY)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(value <= 0 for value in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # Greedy: the chosen token is the most likely one.
    for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token_lp == pytest.approx(max(top.values()), abs=1e-4)


def test_chat_logprobs(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, logprobs=True, top_logprobs=3,
        **GREEDY,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes and all(0 <= b < 256 for b in entry.bytes)
        assert all(top.bytes for top in entry.top_logprobs)
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, logprobs=True, stream=True, **GREEDY
    )
    tokens = [e.token for chunk in streamed for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert tokens == [e.token for e in content]
    # The raw bytes, a partial character included, add up to the text (byte tokens are not U+FFFD each).
    raw = bytes(b for entry in content for b in entry.bytes)
    assert raw.decode("utf-8", errors="replace") == response.choices[0].message.content
    # Each token is the text it added (docs/text.md): a byte that only begins a character adds "", the one
    # that completes it carries the character, so the tokens join to the content.
    assert "".join(e.token for e in content) == response.choices[0].message.content


def test_alpha_zero_is_the_base_alone(client):
    kwargs = {"prompt": "Rome is", "max_tokens": 10, "temperature": 0}
    by_alpha = client.completions.create(model=MODEL, extra_body={"alpha": 0, "ignore_eos": True}, **kwargs)
    by_name = client.completions.create(model=f"{MODEL}:base", extra_body={"ignore_eos": True}, **kwargs)
    assert by_alpha.choices[0].text == by_name.choices[0].text


def test_echo_and_text_parts(client):
    response = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, echo=True, **GREEDY)
    assert response.choices[0].text.startswith("Echo me")
    parts = client.chat.completions.create(
        model=MODEL, max_tokens=4, **GREEDY,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}],
    )
    joined = client.chat.completions.create(
        model=MODEL, max_tokens=4, **GREEDY, messages=[{"role": "user", "content": "hello\nthere"}]
    )
    assert parts.choices[0].message.content == joined.choices[0].message.content


def test_unknown_fields_and_nulls_are_accepted(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}],
        max_tokens=2, user="someone", presence_penalty=0.1, frequency_penalty=0.1,
        logit_bias={"5": -100}, extra_body={"mirostat_tau": 5, "typical_p": 1, "top_k": 20, "min_p": 0.05,
                                            "repetition_penalty": 1.1, "min_tokens": 1, "top_a": None},
    )
    assert response.choices[0].finish_reason in ("stop", "length")


def test_echo_with_logprobs_scores_the_prompt_like_a_harness(client, http):
    """What lm-evaluation-harness sends for loglikelihood tasks: token ids, echo, logprobs, max_tokens 0 or 1.
    Each prompt token's logprob equals the logprob the same model gives that token when it generates it after
    the same prefix (forced with logit_bias, which logprobs do not see)."""
    prompt = http.post("/tokenize", json={"model": MODEL, "prompt": "The capital of France"}).json()["tokens"]
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert scored.usage.prompt_tokens == len(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(top) == 1 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for i in (1, len(prompt) - 1):
        forced = client.completions.create(model=MODEL, prompt=prompt[:i], max_tokens=1, logprobs=1, temperature=0,
                                           logit_bias={str(prompt[i]): 100}, extra_body={"ignore_eos": True})
        assert forced.choices[0].logprobs.tokens == [lp.tokens[i]]
        assert abs(forced.choices[0].logprobs.token_logprobs[0] - lp.token_logprobs[i]) < 1e-4
        assert forced.choices[0].logprobs.top_logprobs[0] == pytest.approx(lp.top_logprobs[i], abs=1e-4)
    # The base alone scores the same prompt differently (the experts shift it), and max_tokens 1 adds a token.
    base = client.completions.create(model=f"{MODEL}:base", prompt=prompt, max_tokens=0, echo=True, logprobs=0,
                                     temperature=0).choices[0].logprobs
    assert base.token_logprobs[1:] != pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    one = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1, **GREEDY)
    assert one.choices[0].logprobs.token_logprobs[1 : len(prompt)] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert len(one.choices[0].logprobs.tokens) == len(prompt) + 1


def test_echo_with_logprobs_streams_the_prompt_first(client):
    kwargs = dict(model=MODEL, prompt="Echo me please", max_tokens=3, echo=True, logprobs=2, **GREEDY)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    first = chunks[0].choices[0]
    assert first.text == "Echo me please" and first.logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == whole.logprobs.tokens
    with pytest.raises(Exception, match="at least 1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)


def test_several_prompts_in_one_request(client):
    """Prompt i's n choices are numbered from i * n, each as the prompt alone would answer; usage adds up."""
    prompts = ["Paris is the", "The quick brown", "Numbers 1 2 3"]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, echo=True, **GREEDY)
    assert [c.index for c in batch.choices] == list(range(6))
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, **GREEDY) for p in prompts]
    for k, choice in enumerate(batch.choices):
        answer = alone[k // 2]
        assert choice.text == prompts[k // 2] + answer.choices[0].text
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    # Token-id prompts, streamed: every choice ends once, with its own text.
    ids = [[5, 6, 7], [8, 9]]
    texts, reasons, usage = _stream_text(client.completions.create(
        model=MODEL, prompt=ids, max_tokens=4, stream=True, stream_options={"include_usage": True}, **GREEDY))
    whole = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, **GREEDY)
    assert texts == {c.index: c.text for c in whole.choices} and set(reasons) == {0, 1}
    assert usage.total_tokens == whole.usage.total_tokens
