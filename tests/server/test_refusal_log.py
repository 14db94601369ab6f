"""Every request answered with an error leaves one line in the request log, whichever layer refused it: what an
operator reads when a frontend's chat or background task fails (the frontend may show nothing)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.refusal_log import error_message
from server.settings import load_settings
from tests.server.fake_engine import FakeEngine

KEY = "sk-refusal-log"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture()
def client():
    engine = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    settings = load_settings(overrides={"engine": engine, "api_keys": [KEY]}, environ=False)
    with TestClient(create_app(FakeEngine(), settings), base_url="http://localhost") as client:
        client.portal.call(asyncio.sleep, 0.05)  # let the background load finish
        yield client


def request_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "proxy_serve.requests" and r.levelname == "INFO"]


@pytest.mark.parametrize(("send", "line"), [
    (lambda c: c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"}),
     "refused POST /v1/chat/completions status=401 error='incorrect API key'"),
    (lambda c: c.post("/v1/chat/completions", json={**CHAT, "temperature": "hot"}, headers=AUTH),
     "refused POST /v1/chat/completions status=400 error='temperature: Input should be a valid number"),
    (lambda c: c.post("/v1/chat/completions", content=b"{", headers={**AUTH, "Content-Type": "application/json"}),
     "refused POST /v1/chat/completions status=400 error='malformed JSON body"),
    (lambda c: c.post("/v1/chat/completions", data={"a": "b"}, headers=AUTH),
     "refused POST /v1/chat/completions status=415 error=\"the request body must be JSON"),
    (lambda c: c.get("/v1/chat/completion", headers=AUTH),
     "refused GET /v1/chat/completion status=404 error='no such endpoint: GET /v1/chat/completion'"),
])
def test_a_refusal_before_the_route_is_logged_once(client, caplog, send, line):
    with caplog.at_level("INFO", logger="proxy_serve"):
        status = send(client).status_code
    lines = request_lines(caplog)
    assert status >= 400 and len(lines) == 1 and lines[0].startswith(line), lines


def test_the_routes_own_lines_are_not_doubled(client, caplog):
    """A generation route writes each request's line itself (id, model, status), refused or not."""
    with caplog.at_level("INFO", logger="proxy_serve"):
        assert client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=AUTH).status_code == 404
        assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as stream:
            assert stream.status_code == 200 and "[DONE]" in "".join(stream.iter_text())
        assert client.get("/v1/models", headers=AUTH).status_code == 200
    lines = request_lines(caplog)
    assert len(lines) == 3 and not [line for line in lines if line.startswith("refused")], lines
    assert "model=unknown status=404" in lines[0] and all("status=200" in line for line in lines[1:])


def test_error_message_reads_the_openai_shape_or_keeps_the_text():
    assert error_message(b'{"error": {"message": "too long", "type": "x"}}') == "too long"
    assert error_message(b"Internal Server Error") == "Internal Server Error"
    assert error_message(b'{"detail": "x"}') == '{"detail": "x"}'
    assert error_message(b'{"error": {"mess') == '{"error": {"mess'  # cut at MAX_ERROR_BYTES


def test_health_while_loading_is_a_state_not_a_refusal(caplog):
    """Probes poll /health every few seconds; its 503 "loading" would fill the log during a start."""
    gate = asyncio.Event()

    class SlowEngine(FakeEngine):
        async def start(self) -> None:
            await gate.wait()
            await super().start()

    engine = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    settings = load_settings(overrides={"engine": engine}, environ=False)
    with TestClient(create_app(SlowEngine(), settings), base_url="http://localhost") as client:
        with caplog.at_level("INFO", logger="proxy_serve"):
            assert client.get("/health").status_code == 503
            assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 503
        client.portal.call(gate.set)
    lines = request_lines(caplog)
    assert len(lines) == 1 and "status=503" in lines[0] and not lines[0].startswith("refused"), lines


def test_disable_log_requests_keeps_only_the_lines_of_requests_that_went_wrong(caplog):
    """vLLM's --disable-log-requests: no line for a request served, still one for a refusal."""
    engine = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    settings = load_settings(overrides={"engine": engine, "log_requests": False}, environ=False)
    with TestClient(create_app(FakeEngine(), settings), base_url="http://localhost") as client:
        client.portal.call(asyncio.sleep, 0.05)
        with caplog.at_level("INFO", logger="proxy_serve"):
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
            assert client.post("/v1/chat/completions", json={**CHAT, "temperature": "hot"}).status_code == 400
    lines = request_lines(caplog)
    assert len(lines) == 2 and "status=404" in lines[0] and "status=400" in lines[1], lines
