"""Open WebUI's calls (recorded from Open WebUI 0.12.4 driving a live server, see docs/frontends.md), replayed
against a real server: the model list, a streamed chat as the browser sends it (built-in tool definitions, no
sampler fields, no ``max_tokens``) and with advanced parameters, and the background tasks (title, tags)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.protocol import ChatCompletionRequest
from tests.frontends.calls import (
    API_KEY,
    BASE_MODEL,
    EXPERT_MODEL,
    MAX_MODEL_LEN,
    MODEL,
    OPEN_WEBUI_CHAT,
    OPEN_WEBUI_CHAT_WITH_PARAMS,
    OPEN_WEBUI_HEADERS,
    OPEN_WEBUI_POST_HEADERS,
    OPEN_WEBUI_TAGS,
    OPEN_WEBUI_TITLE,
    bearer,
    fill_context,
    open_webui_events,
)


def _post(http, body: dict) -> tuple[int, dict[str, str], str]:
    """Sends ``body`` as Open WebUI does (``json.dumps`` with its default separators)."""
    payload = json.dumps(body).encode()
    with http.stream("POST", "/v1/chat/completions", content=payload, headers=bearer(OPEN_WEBUI_POST_HEADERS)) as r:
        return r.status_code, dict(r.headers), "".join(r.iter_text())


def test_model_list(http):
    """Connections -> OpenAI API: GET {url}/models with the key; every ``data[].id`` becomes a model."""
    response = http.get("/v1/models", headers=bearer(OPEN_WEBUI_HEADERS))
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [MODEL, BASE_MODEL, EXPERT_MODEL]
    for card in listing["data"]:
        assert card["object"] == "model" and isinstance(card["created"], int) and card["owned_by"]


def test_model_list_without_the_key_is_refused(http):
    response = http.get("/v1/models", headers=OPEN_WEBUI_HEADERS)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_streamed_chat_from_the_browser(http):
    """The default chat, with the model's builtin_tools capability off (no tool definitions): the reply streams
    until the context is full."""
    chat = {k: v for k, v in OPEN_WEBUI_CHAT.items() if k != "tools"}
    body = fill_context(http, chat)
    status, headers, text = _post(http, body)
    assert status == 200, text
    assert headers["content-type"].startswith("text/event-stream")
    chunks, done = open_webui_events(text)
    assert done
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finals == ["length"]  # no max_tokens: it ran to the end of the context
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks)
    assert all("usage" not in c for c in chunks)  # not asked for


def test_native_tools_are_left_out_for_a_family_with_no_tool_call_format(http, monkeypatch, caplog):
    """Open WebUI's default chat carries its built-in tool definitions and no tool_choice. This family's templates
    render no tools (it was never tuned to call them): the chat is answered without them, with a warning in the
    log, instead of a 400 for a context the tools alone would overflow (docs/frontends.md)."""
    import server.tools

    monkeypatch.setattr(server.tools, "_warned_no_format", False)
    assert len(OPEN_WEBUI_CHAT["tools"]) > 1 and "tool_choice" not in OPEN_WEBUI_CHAT
    with caplog.at_level("WARNING", logger="proxy_serve"):
        status, _, text = _post(http, fill_context(http, OPEN_WEBUI_CHAT))
    assert status == 200, text
    chunks, done = open_webui_events(text)
    assert done and "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks)
    warned = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{len(OPEN_WEBUI_CHAT['tools'])} tool(s) under tool_choice auto")


def test_streamed_chat_with_advanced_params_and_usage(http):
    status, _, text = _post(http, OPEN_WEBUI_CHAT_WITH_PARAMS)
    assert status == 200, text
    chunks, done = open_webui_events(text)
    assert done
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= OPEN_WEBUI_CHAT_WITH_PARAMS["max_tokens"]
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_title_task_past_the_context_is_refused_naming_the_lengths(http):
    """The title task sends ``max_tokens`` 1000: past this test server's 256-token context it is a 400 naming
    prompt and max_tokens, as vLLM answers (a real model's context holds it)."""
    status, _, text = _post(http, OPEN_WEBUI_TITLE)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert error["param"] == "max_tokens" and "1000 in max_tokens" in error["message"]


@pytest.mark.parametrize("task", [OPEN_WEBUI_TAGS], ids=["tags"])
def test_background_task(http, task):
    """Tags (no ``max_tokens``: up to the context left)."""
    body = fill_context(http, task)
    status, headers, text = _post(http, body)
    assert status == 200, text
    assert headers["content-type"].startswith("application/json")
    completion = json.loads(text)
    (choice,) = completion["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = completion["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= MAX_MODEL_LEN


def test_task_model_can_be_the_small_expert(http):
    """The recommended set-up: Settings -> Interface -> task model = NAME:expert."""
    body = fill_context(http, {**OPEN_WEBUI_TAGS, "model": EXPERT_MODEL})
    status, _, text = _post(http, body)
    assert status == 200, text
    assert json.loads(text)["model"] == EXPERT_MODEL


RECORDED = [json.loads(line) for line in
            (Path(__file__).resolve().parent / "recorded" / "open-webui-0.12.4.jsonl").read_text().splitlines()]
RECORDED_POSTS = [call for call in RECORDED if call["method"] == "POST"]


@pytest.mark.parametrize("call", RECORDED_POSTS, ids=lambda c: c["body"]["messages"][-1]["content"][:24])
def test_every_recorded_body_converts(call):
    """Each body Open WebUI sent in the recorded session (tools, pass-through fields and all) is accepted."""
    assert call["path"] == "/v1/chat/completions"
    request = ChatCompletionRequest.model_validate(call["body"])
    prompt = request.prompt_input()
    assert prompt.messages and prompt.messages[-1]["role"] == "user"
    request.sampling_params().validate(vocab_size=512, num_pairs=1)


@pytest.mark.parametrize("call", [c for c in RECORDED_POSTS if c["body"].get("stream")], ids=["tools", "params"])
def test_recorded_chats_replayed_verbatim(http, call):
    """The recorded streamed chats (both bound their length), sent byte for byte with the recorded headers. The
    one with Open WebUI's 28 tool definitions is answered without them: this family has no tool-call format."""
    headers = {**call["headers"], "authorization": f"Bearer {API_KEY}"}
    payload = json.dumps(call["body"]).encode()
    with http.stream("POST", call["path"], content=payload, headers=headers) as response:
        assert response.status_code == 200
        chunks, done = open_webui_events("".join(response.iter_text()))
    assert done
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] in ("stop", "length")
    if call["body"].get("stream_options", {}).get("include_usage"):
        assert chunks[-1]["usage"]["completion_tokens"] <= call["body"]["max_tokens"]
