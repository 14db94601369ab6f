"""vLLM's request extensions over HTTP. The chat prompt controls: a continued assistant message (a prefill of the
answer), no generation prompt, template variables, on /v1/chat/completions and /tokenize (the test family's models
all read chat as the plain transcript, so a continued chat is exactly a completion of the transcript's text). And
the output constraints allowed_token_ids and bad_words."""

from __future__ import annotations

import json

from tests.server.live import MODEL

PARTIAL = [{"role": "user", "content": "Name a city in France"}, {"role": "assistant", "content": "The city of"}]
TRANSCRIPT = "User: Name a city in France\nAssistant: The city of"


def _tokens(http, **body) -> list[int]:
    response = http.post("/tokenize", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_a_continued_message_is_the_prompt_a_completion_of_its_text_would_be(http):
    assert _tokens(http, messages=PARTIAL, continue_final_message=True) == _tokens(http, prompt=TRANSCRIPT)
    # vLLM's clients send add_generation_prompt false with it; the same prompt.
    assert _tokens(http, messages=PARTIAL, continue_final_message=True, add_generation_prompt=False) == _tokens(
        http, prompt=TRANSCRIPT)
    assert _tokens(http, messages=PARTIAL[:1], add_generation_prompt=False) == _tokens(
        http, prompt="User: Name a city in France\n")
    # chat_template_kwargs reach chat templates only: the transcript reads none.
    assert _tokens(http, messages=PARTIAL, chat_template_kwargs={"enable_thinking": False}) == _tokens(
        http, messages=PARTIAL)


def test_tokenize_returns_each_tokens_vocabulary_piece_when_asked(http, tiny_family):
    """vLLM's ``return_token_strs``: the pieces as the tokenizer stores them (a byte-level BPE's ``Ġ`` kept)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_family.base)
    answer = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello there, world",
                                          "return_token_strs": True}).json()
    assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"])
    assert "token_strs" not in http.post("/tokenize", json={"model": MODEL, "prompt": "Hello"}).json()


def test_a_continued_chat_answers_with_the_continuation_only(http):
    greedy = {"model": MODEL, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    chat = http.post("/v1/chat/completions", json={"messages": PARTIAL, "continue_final_message": True, **greedy})
    completion = http.post("/v1/completions", json={"prompt": TRANSCRIPT, **greedy})
    assert chat.status_code == 200 and completion.status_code == 200, chat.text
    content = chat.json()["choices"][0]["message"]["content"]
    assert content and content == completion.json()["choices"][0]["text"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [chat.json()["usage"][k] for k in counts] == [completion.json()["usage"][k] for k in counts]
    # The completion's prompt is the chat's rendering, read back from the prefix cache in whole blocks.
    assert completion.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    streamed = http.post("/v1/chat/completions", json={"messages": PARTIAL, "continue_final_message": True,
                                                       "stream": True, **greedy})
    deltas = [line for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(json.loads(d[6:])["choices"][0]["delta"].get("content") or "" for d in deltas) == (
        content)


def test_contradictory_controls_are_400_naming_the_field(http):
    cases = [
        ({"messages": PARTIAL, "continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt"),
        ({"messages": PARTIAL[:1], "continue_final_message": True}, "continue_final_message"),
        ({"messages": PARTIAL, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs"),
    ]
    for body, param in cases:
        for path in ("/v1/chat/completions", "/tokenize"):
            response = http.post(path, json={"model": MODEL, "max_tokens": 2, **body})
            assert response.status_code == 400, (path, body, response.text)
            assert response.json()["error"]["param"] == param


def test_allowed_token_ids_and_bad_words_are_honoured(http):
    """vLLM's two output constraints reach the engine (tests/engine/test_bad_words.py has the rules)."""
    only = _tokens(http, prompt=" Paris")[-1]
    body = {"model": MODEL, "prompt": "Name a city:", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    answer = http.post("/v1/completions", json={**body, "allowed_token_ids": [only]})
    expected = http.post("/detokenize", json={"model": MODEL, "tokens": [only] * 3}).json()["prompt"]
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == expected
    free = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    first = free.split()[0]
    banned = http.post("/v1/completions", json={**body, "bad_words": [first]}).json()["choices"][0]["text"]
    assert banned != free
    for bad in ({"allowed_token_ids": []}, {"bad_words": [""]}, {"bad_words": "x"}):
        response = http.post("/v1/completions", json={**body, **bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == next(iter(bad))


def test_chat_echo_puts_the_continued_message_before_the_answer(http):
    """vLLM's chat ``echo``: the last message, when it is the assistant's, starts each choice's content (whole and
    in the first streamed chunk); after a user's message there is nothing to echo."""
    greedy = {"model": MODEL, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "continue_final_message": True}
    plain = http.post("/v1/chat/completions", json={"messages": PARTIAL, **greedy}).json()
    echoed = http.post("/v1/chat/completions", json={"messages": PARTIAL, "echo": True, **greedy}).json()
    continuation = plain["choices"][0]["message"]["content"]
    assert echoed["choices"][0]["message"]["content"] == "The city of" + continuation
    assert echoed["usage"] == plain["usage"]
    streamed = http.post("/v1/chat/completions", json={"messages": PARTIAL, "echo": True, "stream": True, "n": 2,
                                                       **greedy})
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    firsts = [c["choices"][0]["delta"] for c in chunks[:2]]
    assert firsts == [{"role": "assistant", "content": "The city of"}] * 2
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == 0)
    assert text == "The city of" + continuation
    ask = {"model": MODEL, "messages": PARTIAL[:1], "max_tokens": 4, "temperature": 0}
    assert http.post("/v1/chat/completions", json={**ask, "echo": True}).json()["choices"][0]["message"] == (
        http.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"])


def test_priority_is_a_400_naming_it_unless_the_server_schedules_by_priority(http):
    """vLLM's rule: a priority other than 0 needs --scheduling-policy priority (tests/engine: the order it gives)."""
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    refused = http.post("/v1/chat/completions", json={**ask, "priority": 3})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"
    assert "--scheduling-policy priority" in refused.json()["error"]["message"]
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                              "priority": 0}).status_code == 200
