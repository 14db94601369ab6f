"""The raw event stream, line by line: framing, order, role-first deltas, null finish reasons, one final chunk
per choice, the usage chunk and ``[DONE]``."""

from __future__ import annotations

import json

import pytest

from tests.server.live import MODEL


def _events(http, path: str, body: dict) -> list[str]:
    """The ``data:`` payloads in order, checking the framing: each event is one ``data:`` line and a blank line."""
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    assert raw.endswith("data: [DONE]\n\n")
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    payloads = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, f"bad SSE framing: {block!r}"
        payloads.append(block[len("data: "):])
    assert payloads.count("[DONE]") == 1 and payloads[-1] == "[DONE]"
    return payloads[:-1]


def _check_order(chunks: list[dict], n: int, *, chat: bool, usage: bool) -> dict[int, str]:
    """Per choice: (chat) role first, content with null finish_reason, exactly one empty final chunk."""
    seen_role: set[int] = set()
    finished: dict[int, str] = {}
    text = {i: "" for i in range(n)}
    body_chunks = chunks[:-1] if usage else chunks
    for chunk in body_chunks:
        assert chunk["model"] == MODEL
        assert len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        index = choice["index"]
        assert index not in finished, "a chunk after the choice's final chunk"
        assert "finish_reason" in choice
        if chat:
            delta = choice["delta"]
            if index not in seen_role:
                assert delta == {"role": "assistant", "content": ""}, "the first delta must carry the role"
                assert choice["finish_reason"] is None
                seen_role.add(index)
                continue
            assert "role" not in delta
            piece = delta.get("content")
        else:
            piece = choice["text"]
        if choice["finish_reason"] is None:
            assert piece is not None
            text[index] += piece
        else:
            assert choice["finish_reason"] in ("stop", "length")
            assert not piece, "no content in the final chunk"
            finished[index] = choice["finish_reason"]
    assert set(finished) == set(range(n))
    if usage:
        last = chunks[-1]
        assert last["choices"] == []
        details = {"prompt_tokens_details", "completion_tokens_details"} if chat else {"prompt_tokens_details"}
        assert set(last["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"} | details
    else:
        assert all("usage" not in chunk or chunk["usage"] is None for chunk in chunks)
    return text


@pytest.mark.parametrize("usage", [True, False])
def test_chat_stream_events(http, usage):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "n": 2, "seed": 5,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": usage}}
    chunks = [json.loads(p) for p in _events(http, "/v1/chat/completions", body)]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    _check_order(chunks, 2, chat=True, usage=usage)
    if usage:
        assert chunks[-1]["usage"]["completion_tokens"] == 14
        assert all(c["usage"] is None for c in chunks[:-1])


def test_completion_stream_events(http):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 6, "stream": True, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    chunks = [json.loads(p) for p in _events(http, "/v1/completions", body)]
    assert {c["object"] for c in chunks} == {"text_completion"}
    text = _check_order(chunks, 1, chat=False, usage=True)
    whole = http.post("/v1/completions", json={**body, "stream": False}).json()
    assert text[0] == whole["choices"][0]["text"]
    assert chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_puts_the_counts_so_far_in_every_chunk(http, path):
    """vLLM's stream_options.continuous_usage_stats: every chunk's usage counts the tokens generated up to it,
    never going back, and the final usage chunk equals the non-streamed answer's."""
    prompt = {"prompt": "Hello"} if "chat" not in path else {"messages": [{"role": "user", "content": "hi"}]}
    body = {"model": MODEL, **prompt, "max_tokens": 6, "n": 2, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = [json.loads(p) for p in _events(http, path, body)]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 12
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] for c in chunks)
    content = [c for c in chunks if c["choices"] and (c["choices"][0].get("text") or
                                                       (c["choices"][0].get("delta") or {}).get("content"))]
    assert content and content[-1]["usage"]["completion_tokens"] > 0
    whole = http.post(path, json={**body, "stream": False}).json()
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    # Without include_usage it asks for nothing.
    body["stream_options"] = {"continuous_usage_stats": True}
    assert all(json.loads(p).get("usage") is None for p in _events(http, path, body))


def test_stream_with_logprobs_and_echo(http):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True, "ignore_eos": True,
            "temperature": 0, "echo": True}
    chunks = [json.loads(p) for p in _events(http, "/v1/completions", body)]
    assert chunks[0]["choices"][0]["text"] == "Hello"
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True, "ignore_eos": True, "logprobs": 1}
    chunks = [json.loads(p) for p in _events(http, "/v1/completions", body)]
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert len(tokens) == 4
