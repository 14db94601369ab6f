"""vLLM's ``prompt_logprobs``: per prompt token, its logprob under the proxy-tuned distribution, its rank and the
top k, keyed by token id (a completions choice carries them, a chat answer at its top level); not in a stream."""

from __future__ import annotations

import math

import httpx
import pytest

from tests.server.live import MODEL, LiveServer, make_settings

PROMPT = "The quick brown fox jumps over the lazy dog"


def _tokens(http, prompt: str) -> list[int]:
    return http.post("/tokenize", json={"model": MODEL, "prompt": prompt}).json()["tokens"]


def _check_entries(entries: list, prompt: list[int], k: int) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for token, entry in zip(prompt[1:], entries[1:]):
        own = entry[str(token)]
        assert own["logprob"] <= 0 and own["rank"] >= 1 and isinstance(own["decoded_token"], str)
        top = sorted((v for key, v in entry.items() if v["rank"] <= k), key=lambda v: v["rank"])
        assert [v["rank"] for v in top] == list(range(1, k + 1))  # the k likeliest, ranked 1..k
        assert all(a["logprob"] >= b["logprob"] for a, b in zip(top, top[1:]))
        # The token itself is one of them exactly when its rank is within k; else it is the one extra entry.
        assert len(entry) == (k if own["rank"] <= k else k + 1)
        assert sum(math.exp(v["logprob"]) for v in top) <= 1 + 1e-5


def test_completions_carry_each_prompt_tokens_logprob_rank_and_top_k(http):
    prompt = _tokens(http, PROMPT)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    answer = http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    _check_entries(choice["prompt_logprobs"], prompt, 3)
    assert choice["logprobs"] is None  # generated-token logprobs were not asked for
    assert any(entry[str(t)]["rank"] > 3 for t, entry in zip(prompt[1:], choice["prompt_logprobs"][1:]))

    # The same numbers as echo with logprobs (one scoring pass serves both).
    echoed = http.post("/v1/completions", json={**body, "prompt_logprobs": None, "echo": True, "logprobs": 1,
                                                 "max_tokens": 0}).json()["choices"][0]["logprobs"]
    for token, entry, logprob in zip(prompt[1:], choice["prompt_logprobs"][1:], echoed["token_logprobs"][1:]):
        assert abs(entry[str(token)]["logprob"] - logprob) < 1e-5


def test_zero_gives_each_prompt_token_alone_and_echo_keeps_its_own_k(http):
    prompt = _tokens(http, PROMPT)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 0}
    entries = http.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and [list(e) for e in entries[1:]] == [[str(t)] for t in prompt[1:]]

    both = http.post("/v1/completions", json={**body, "prompt_logprobs": 4, "echo": True, "logprobs": 1}).json()
    choice = both["choices"][0]
    _check_entries(choice["prompt_logprobs"], prompt, 4)
    assert all(top is None or len(top) == 1 for top in choice["logprobs"]["top_logprobs"])  # echo's k, not 4


def test_chat_answers_carry_them_at_the_top_level(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 2, "prompt_logprobs": 2}
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    entries = payload["prompt_logprobs"]
    assert len(entries) == payload["usage"]["prompt_tokens"] and entries[0] is None
    assert all(min(v["rank"] for v in e.values()) == 1 for e in entries[1:])
    assert "prompt_logprobs" not in payload["choices"][0]


def test_the_openai_sdk_sends_and_reads_them_through_extra_body(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1,
                                           extra_body={"prompt_logprobs": 1})
    entries = completion.choices[0].model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == completion.usage.prompt_tokens


@pytest.mark.parametrize(("extra", "message"), [
    ({"stream": True}, "prompt_logprobs are not available when stream is true"),
    ({"prompt_logprobs": 21}, "prompt_logprobs must be between 0 and 20, got 21"),
    ({"prompt_logprobs": -1}, "prompt_logprobs must be between 0 and 20, got -1 (-1, the whole vocabulary, needs "
                              "the server's --max-logprobs -1)"),
])
def test_a_stream_or_a_k_out_of_range_is_a_400_naming_the_field(http, extra, message):
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        answer = http.post(path, json={"model": MODEL, "max_tokens": 1, "prompt_logprobs": 1, **body, **extra})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "prompt_logprobs" and error["message"] == message


def test_a_chat_format_expert_cannot_score_the_prompt_and_says_so(agent_http):
    """Its template moves the positions: its position p is not the base's, so there is no one distribution."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 1}
    answer = agent_http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert "prompt logprobs (prompt_logprobs, or echo with logprobs) score the prompt's own tokens" in message
    assert "the expert model uses its chat format" in message and "score with the base alone" in message


def test_the_whole_vocabulary_under_max_logprobs_minus_one(tiny_family):
    """vLLM's ``--max-logprobs -1``: a request asks for every token's logprob with -1 (chat's top_logprobs,
    prompt_logprobs); a cap of 5 is a 400 past it, naming chat's field."""
    from proxy_engine.engine_process import async_engine_for

    for limit in (-1, 5):
        settings = make_settings(tiny_family, limits={"max_logprobs": limit})
        server = LiveServer(async_engine_for(settings.engine), settings).start()
        try:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                        "logprobs": True, "top_logprobs": -1, "prompt_logprobs": -1}
                answer = http.post("/v1/chat/completions", json=chat)
                if limit == 5:
                    assert answer.status_code == 400 and answer.json()["error"]["param"] == "top_logprobs"
                    too_many = http.post("/v1/chat/completions", json={**chat, "top_logprobs": 6})
                    assert too_many.json()["error"]["param"] == "top_logprobs"
                    assert http.post("/v1/chat/completions", json={**chat, "top_logprobs": 5,
                                                                   "prompt_logprobs": 5}).status_code == 200
                    continue
                assert answer.status_code == 200, answer.text
                body = answer.json()
                tokens = body["choices"][0]["logprobs"]["content"]
                assert all(len(t["top_logprobs"]) == 512 for t in tokens)  # the tiny family's vocabulary
                probabilities = sum(math.exp(top["logprob"]) for top in tokens[0]["top_logprobs"])
                assert abs(probabilities - 1) < 1e-3
                prompt = body["prompt_logprobs"]
                assert prompt[0] is None and all(len(entry) >= 512 for entry in prompt[1:])
                completion = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1,
                                                                "logprobs": -1}).json()
                assert len(completion["choices"][0]["logprobs"]["top_logprobs"][0]) >= 511  # texts may collide
        finally:
            server.stop()
