"""vLLM's token-id extensions over HTTP: ``return_token_ids`` (each choice's generated ids, and its prompt's ids:
the base model's rendering, what usage counts) and ``return_tokens_as_token_ids`` (logprob tokens named
``token_id:<id>``), whole and streamed, on both endpoints, as vLLM's own tests read them; and
``truncate_prompt_tokens``, which those ids show."""

from __future__ import annotations

import json

from tests.server.live import MODEL

# Special tokens kept in the text, so that /detokenize of the ids (which keeps them) gives the text back.
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 6, "ignore_eos": True, "skip_special_tokens": False}
MESSAGES = [{"role": "user", "content": "Name a city in France"}]


def _ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _tokens(http, **body) -> list[int]:
    return _ok(http.post("/tokenize", json={"model": MODEL, **body}))["tokens"]


def _text(http, ids: list[int]) -> str:
    return _ok(http.post("/detokenize", json={"model": MODEL, "tokens": ids}))["prompt"]


def _chunks(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


def test_completions_return_each_choices_prompt_and_generated_ids(http):
    prompts = ["The capital of France is", "Numbers 1 2 3"]
    body = {"prompt": prompts, "n": 2, "return_token_ids": True, **GREEDY}
    answer = _ok(http.post("/v1/completions", json=body))
    assert len(answer["choices"]) == 4
    generated = 0
    for choice in answer["choices"]:
        assert choice["prompt_token_ids"] == _tokens(http, prompt=prompts[choice["index"] // 2])
        assert len(choice["token_ids"]) == 6 and _text(http, choice["token_ids"]) == choice["text"]
        generated += len(choice["token_ids"])
    assert answer["usage"]["completion_tokens"] == generated
    assert answer["usage"]["prompt_tokens"] == sum(len(_tokens(http, prompt=p)) for p in prompts)
    plain = _ok(http.post("/v1/completions", json={"prompt": prompts[0], **GREEDY}))["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain


def test_logprob_tokens_named_by_id_keep_their_values_and_offsets(http):
    body = {"prompt": "The capital of France is", "echo": True, "logprobs": 2, **GREEDY}
    named = _ok(http.post("/v1/completions", json={**body, "return_tokens_as_token_ids": True,
                                                   "return_token_ids": True}))["choices"][0]
    plain = _ok(http.post("/v1/completions", json=body))["choices"][0]
    ids = named["prompt_token_ids"] + named["token_ids"]
    assert named["logprobs"]["tokens"] == [f"token_id:{i}" for i in ids]
    assert named["logprobs"]["token_logprobs"] == plain["logprobs"]["token_logprobs"]
    assert named["logprobs"]["text_offset"] == plain["logprobs"]["text_offset"]  # offsets into the text, as before
    for top, plain_top in zip(named["logprobs"]["top_logprobs"][1:], plain["logprobs"]["top_logprobs"][1:]):
        assert all(key.startswith("token_id:") for key in top)
        assert sorted(top.values()) == sorted(plain_top.values())
    assert named["text"] == plain["text"]


def test_a_completion_stream_carries_ids_on_every_chunk_and_the_prompt_once(http):
    prompt = "The capital of France is"
    body = {"prompt": prompt, "n": 2, "stream": True, "logprobs": 0, "return_token_ids": True,
            "return_tokens_as_token_ids": True, **GREEDY}
    whole = _ok(http.post("/v1/completions", json={**body, "stream": False}))["choices"]
    chunks = _chunks(http.post("/v1/completions", json=body))
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["prompt_token_ids"] == _tokens(http, prompt=prompt)
        assert all("prompt_token_ids" not in c for c in mine[1:])
        assert all(isinstance(c["token_ids"], list) for c in mine)  # every chunk: vLLM's clients add them up
        streamed = [i for c in mine for i in c["token_ids"]]
        assert streamed == whole[index]["token_ids"]
        named = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert named == [f"token_id:{i}" for i in streamed]


def test_chat_returns_the_prompt_ids_at_the_top_and_each_choices_ids(http):
    body = {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2, **GREEDY}
    named = _ok(http.post("/v1/chat/completions", json={**body, "return_token_ids": True,
                                                        "return_tokens_as_token_ids": True}))
    plain = _ok(http.post("/v1/chat/completions", json=body))
    assert named["prompt_token_ids"] == _tokens(http, messages=MESSAGES)
    choice = named["choices"][0]
    assert _text(http, choice["token_ids"]) == choice["message"]["content"] == plain["choices"][0]["message"]["content"]
    content = choice["logprobs"]["content"]
    assert [entry["token"] for entry in content] == [f"token_id:{i}" for i in choice["token_ids"]]
    # bytes stay the token's own: what a client joins into text
    assert [e["bytes"] for e in content] == [e["bytes"] for e in plain["choices"][0]["logprobs"]["content"]]
    assert all(top["token"].startswith("token_id:") for e in content for top in e["top_logprobs"])
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]


def test_a_chat_stream_sends_the_prompt_ids_first_and_token_ids_with_each_delta(http):
    body = {"messages": MESSAGES, "return_token_ids": True, **GREEDY}
    whole = _ok(http.post("/v1/chat/completions", json=body))
    chunks = _chunks(http.post("/v1/chat/completions", json={**body, "stream": True}))
    assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert all(isinstance(c["token_ids"], list) for c in choices)
    assert [i for c in choices for i in c["token_ids"]] == whole["choices"][0]["token_ids"]
    assert "".join(c["delta"].get("content") or "" for c in choices) == whole["choices"][0]["message"]["content"]


def test_the_openai_sdk_reads_the_ids_as_extra_fields(client):
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                           temperature=0, extra_body={"return_token_ids": True})
    assert len(completion.choices[0].token_ids) == 4 and completion.choices[0].prompt_token_ids
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                          extra_body={"return_token_ids": True})
    assert chat.prompt_token_ids and chat.choices[0].token_ids


def test_the_id_that_ended_a_choice_is_its_last_token_id(http):
    body = {"prompt": "The capital of France is", "return_token_ids": True, **GREEDY}
    free = _ok(http.post("/v1/completions", json=body))["choices"][0]["token_ids"]
    stop = free[2]
    ended = _ok(http.post("/v1/completions", json={**body, "stop_token_ids": [stop]}))["choices"][0]
    assert ended["finish_reason"] == "stop" and ended["token_ids"] == free[: free.index(stop) + 1]
    assert ended["stop_reason"] == stop  # vLLM's: which of the stop_token_ids ended it
    chat = _ok(http.post("/v1/chat/completions", json={"messages": MESSAGES, **GREEDY, "stop_token_ids": [stop]}))
    if chat["choices"][0]["finish_reason"] == "stop":
        assert chat["choices"][0]["stop_reason"] == stop


def test_truncate_prompt_tokens_keeps_each_prompts_last_tokens(http):
    """vLLM's truncate_prompt_tokens: the models read the prompt's last k tokens (the answer is that of a request
    sending those ids), usage counts them; -1 cuts a prompt past the context to what fits beside max_tokens."""
    prompt = "Numbers 0 1 2 3 4 5 6 7 8 9 and the capital of France is"
    ids = _tokens(http, prompt=prompt)
    body = {"return_token_ids": True, **GREEDY}
    cut = _ok(http.post("/v1/completions", json={"prompt": prompt, "truncate_prompt_tokens": 5, **body}))
    assert cut["choices"][0]["prompt_token_ids"] == ids[-5:] and cut["usage"]["prompt_tokens"] == 5
    sent = _ok(http.post("/v1/completions", json={"prompt": ids[-5:], **body}))
    assert cut["choices"][0]["token_ids"] == sent["choices"][0]["token_ids"]
    chat = _ok(http.post("/v1/chat/completions", json={"messages": MESSAGES, "truncate_prompt_tokens": 4, **body}))
    assert chat["prompt_token_ids"] == _tokens(http, messages=MESSAGES)[-4:]
    context = _ok(http.get("/v1/models"))["data"][0]["max_model_len"]
    long = " ".join(["word"] * context)
    refused = http.post("/v1/completions", json={"prompt": long, **body})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    fitted = _ok(http.post("/v1/completions", json={"prompt": long, "truncate_prompt_tokens": -1, **body}))
    assert fitted["usage"]["prompt_tokens"] == context - GREEDY["max_tokens"]
    for bad in ({"truncate_prompt_tokens": 0}, {"truncate_prompt_tokens": -2},
                {"truncate_prompt_tokens": 3, "echo": True}):
        response = http.post("/v1/completions", json={"prompt": prompt, **GREEDY, **bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "truncate_prompt_tokens", bad
