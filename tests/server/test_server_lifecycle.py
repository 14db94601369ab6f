"""Loading, draining, engine errors after the headers, metrics: driven by a scripted engine where a real one
cannot be made to misbehave on demand."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import warnings

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import load_settings
from tests.server.fake_engine import FakeEngine

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def _settings(**server):
    engine = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    return load_settings(overrides={"engine": engine, **server}, environ=False)


@pytest.fixture()
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture()
def app_client(fake):
    with TestClient(create_app(fake, _settings()), base_url="http://localhost") as client:
        client.portal.call(asyncio.sleep, 0.05)  # let the background load finish
        yield client


def test_engine_error_mid_stream_is_an_error_event_then_done(fake, app_client):
    fake.fail_at_token = 2
    with app_client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and "boom" in error["message"]
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert fake.aborted  # whatever was left of the request is dropped


def test_engine_error_without_streaming_is_500_with_request_id(fake, app_client):
    fake.fail_at_token = 1
    response = app_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
    assert response.status_code == 500
    error = response.json()["error"]
    request_id = response.headers["x-request-id"]
    assert request_id.startswith("cmpl-") and request_id in error["message"]
    assert error["type"] == "server_error" and "Traceback" not in response.text


def test_a_client_request_id_is_kept_in_ours_and_never_shared(app_client, caplog):
    """X-Request-Id from a client or its gateway appears in the id (body, header, log line) so that both logs
    meet; two requests sending the same one still get distinct ids (an abort reaches only its own request)."""
    ids = []
    for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})):
        for _ in range(2):
            with caplog.at_level(logging.INFO, logger="proxy_serve.requests"):
                response = app_client.post(path, json=body, headers={"X-Request-Id": "gw-7f3a:9/1"})
            assert response.status_code == 200
            ids.append(response.json()["id"])
            assert response.headers["x-request-id"] == ids[-1]
    assert [i.rsplit("-", 1)[0] for i in ids] == ["cmpl-gw-7f3a:9/1"] * 2 + ["chatcmpl-gw-7f3a:9/1"] * 2
    assert len(set(ids)) == 4 and all(len(i.rsplit("-", 1)[1]) == 8 for i in ids)
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "proxy_serve.requests")
    assert all(i in logged for i in ids)
    # One that could break a log line or a header, or is too long, is not kept.
    for sent in ("a b", "x" * 129, "id;rm", "\"q\"", ""):
        response = app_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                   headers={"X-Request-Id": sent})
        assert re.fullmatch(r"cmpl-[0-9a-f]{32}", response.json()["id"])


@pytest.mark.parametrize("stream", [True, False])
def test_a_dead_engine_fails_waiting_requests_instead_of_stalling(fake, app_client, monkeypatch, stream):
    import server.serving

    monkeypatch.setattr(server.serving, "ENGINE_CHECK_S", 0.05)
    fake.crash_at_token = 2
    if not stream:
        response = app_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert response.status_code == 500 and "engine stopped" in response.json()["error"]["message"]
        return
    with app_client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "engine stopped" in json.loads(events[-2])["error"]["message"]


def test_health_and_requests_while_loading_then_ready():
    gate = asyncio.Event()

    class SlowEngine(FakeEngine):
        async def start(self) -> None:
            await gate.wait()
            await super().start()

    engine = SlowEngine()
    with TestClient(create_app(engine, _settings()), base_url="http://localhost") as client:
        assert client.get("/health").status_code == 503 and client.get("/health").json()["status"] == "loading"
        assert client.get("/ping").status_code == 503  # vLLM's alias answers as /health does
        response = client.post("/v1/completions", json={"prompt": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "loading"
        assert "retry-after" in response.headers
        assert client.get("/v1/models").status_code == 200  # the list is known from the settings
        client.portal.call(gate.set)
        client.portal.call(asyncio.sleep, 0.05)
        assert client.get("/health").status_code == 200


def test_load_failure_is_reported():
    failures = []

    class BrokenEngine(FakeEngine):
        async def start(self) -> None:
            raise OSError("no such model directory: /nowhere")

    app = create_app(BrokenEngine(), _settings(), on_load_failure=failures.append)
    with TestClient(app, base_url="http://localhost") as client:
        client.portal.call(asyncio.sleep, 0.05)
        assert client.get("/health").json()["status"] == "failed"
    assert len(failures) == 1


def test_draining_refuses_new_requests(fake, app_client):
    app_client.app.state.ctx.drain()
    health = app_client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "draining"
    response = app_client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and response.json()["error"]["code"] == "draining"
    assert not fake._admitting  # the engine was told to stop admitting


def test_overloaded_engine_is_429(fake, app_client):
    fake.stop_admitting()  # the fake raises EngineOverloadedError from add_request
    response = app_client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 429 and response.headers["retry-after"] == "2"


def test_metrics_after_requests(app_client):
    app_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
    with app_client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        list(r.iter_lines())
    text = app_client.get("/metrics").text
    for name in ("proxy_serve_num_requests_running", "proxy_serve_num_requests_waiting",
                 "proxy_serve_prompt_tokens_total", "proxy_serve_generation_tokens_total",
                 "proxy_serve_time_to_first_token_seconds_count 2.0", "proxy_serve_inter_token_latency_seconds_count",
                 "proxy_serve_e2e_request_latency_seconds_count 2.0",
                 'proxy_serve_requests_total{endpoint="completions",model="proxy-tuned",status="200"} 2.0',
                 # vLLM's names, labelled with the served model name
                 'vllm:time_to_first_token_seconds_count{model_name="proxy-tuned"} 2.0',
                 'vllm:e2e_request_latency_seconds_count{model_name="proxy-tuned"} 2.0',
                 'vllm:inter_token_latency_seconds_count{model_name="proxy-tuned"}',
                 'vllm:request_success_total{finished_reason="length",model_name="proxy-tuned"} 2.0',
                 'vllm:request_prompt_tokens_count{model_name="proxy-tuned"} 2.0',
                 'vllm:request_generation_tokens_sum{model_name="proxy-tuned"} 7.0',
                 'vllm:num_requests_running{model_name="proxy-tuned"}'):
        assert name in text, name


def test_the_openapi_schema_builds_without_warnings(app_client):
    """What /docs reads: every route its own operation (a route under two methods once gave duplicate ids)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = app_client.get("/openapi.json").json()
    assert set(schema["paths"]["/ping"]) == {"get", "post"} and "/v1/chat/completions" in schema["paths"]


def test_tokenize_detokenize_and_version(app_client):
    tokens = app_client.post("/tokenize", json={"prompt": "abc"}).json()
    assert tokens["count"] == 3 and tokens["max_model_len"] == 64
    assert app_client.post("/detokenize", json={"tokens": [0, 1]}).json() == {"prompt": "ab"}
    assert app_client.post("/detokenize", json={"tokens": [1000]}).status_code == 400
    assert app_client.post("/tokenize", json={}).status_code == 400
    assert app_client.get("/version").json()["version"]


def test_request_log_line_has_no_prompt_unless_asked(fake, caplog):
    for log_prompts in (False, True):
        caplog.clear()
        app = create_app(FakeEngine(), _settings(log_prompts=log_prompts))
        with TestClient(app, base_url="http://localhost") as client:
            client.portal.call(asyncio.sleep, 0.05)
            with caplog.at_level("INFO", logger="proxy_serve"):
                response = client.post("/v1/completions", json={"prompt": "secret words", "max_tokens": 2})
                assert response.status_code == 200
        lines = [r.getMessage() for r in caplog.records if r.name == "proxy_serve.requests"]
        assert len(lines) == 1 and "completion_tokens=2" in lines[0] and "prompt_tokens=" in lines[0]
        assert ("secret words" in lines[0]) is log_prompts


def test_an_unexpected_error_is_a_500_a_browser_can_read(fake):
    """A bug (here: tokenize raising) answers the OpenAI-shaped 500 with the CORS headers, so a chat frontend
    shows the error instead of a CORS failure; the server keeps serving."""
    origin = "http://chat.example"
    settings = _settings(allowed_origins=[origin])
    with TestClient(create_app(fake, settings), raise_server_exceptions=False, base_url="http://localhost") as client:
        client.portal.call(asyncio.sleep, 0.05)

        def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        fake.tokenize = broken
        response = client.post("/tokenize", json={"prompt": "x"}, headers={"Origin": origin})
        assert response.status_code == 500
        assert response.headers["access-control-allow-origin"] == origin
        error = response.json()["error"]
        assert error["code"] == "internal_error" and response.headers["x-request-id"] in error["message"]
        assert "a bug" not in response.text and "Traceback" not in response.text
        del fake.tokenize
        assert client.post("/tokenize", json={"prompt": "x"}).status_code == 200


def test_each_requests_shape_is_logged_at_debug_level(fake, caplog):
    """What a frontend sends, without its content: keys (ignored ones too), messages, tools, prompt tokens."""
    tools = [{"type": "function", "function": {"name": f"t{i}"}} for i in range(3)]
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "tools": tools, "tool_choice": "none", "max_tokens": 2, "x_frontend_field": 1}
    with TestClient(create_app(fake, _settings()), base_url="http://localhost") as client:
        client.portal.call(asyncio.sleep, 0.05)
        with caplog.at_level("INFO", logger="proxy_serve"):
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert not [r for r in caplog.records if r.levelname == "DEBUG"]  # off at info: the body is not re-read
        with caplog.at_level("DEBUG", logger="proxy_serve"):
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
            assert client.post("/v1/completions", json={"prompt": ["a b"], "max_tokens": 1}).status_code == 200
            assert client.post("/v1/chat/completions", json={**chat, "model": "nope"}).status_code == 404
    shapes = [r.getMessage() for r in caplog.records if r.levelname == "DEBUG" and r.name == "proxy_serve.requests"]
    prompt_tokens = len(fake.tokenize(fake.requests[1][1]))
    assert prompt_tokens > 0
    assert shapes[0].startswith("chatcmpl-") and shapes[0].endswith(
        f" chat keys=max_tokens,messages,tool_choice,tools,x_frontend_field messages=2 tools=3 tool_choice=none "
        f"prompt_tokens={prompt_tokens}")
    assert shapes[1].startswith("cmpl-") and shapes[1].endswith(" completions keys=max_tokens,prompt prompt=1 "
                                                                "prompt_tokens=3")
    assert shapes[2].endswith("keys=max_tokens,messages,model,tool_choice,tools,x_frontend_field messages=2 tools=3 "
                              "tool_choice=none prompt_tokens=? (refused)")
    assert "hi" not in " ".join(shapes) and "be brief" not in " ".join(shapes)


def test_max_log_len_clips_the_logged_prompt(caplog):
    """vLLM's --max-log-len: with --log-prompts, each text (or token-id list) in the line holds at most N."""
    app = create_app(FakeEngine(), _settings(log_prompts=True, max_log_len=6))
    with TestClient(app, base_url="http://localhost") as client:
        client.portal.call(asyncio.sleep, 0.05)
        with caplog.at_level("INFO", logger="proxy_serve"):
            for body in ({"prompt": "secret words"}, {"prompt": list(range(40))},
                         {"messages": [{"role": "user", "content": "secret words"}]}):
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                assert client.post(path, json={**body, "max_tokens": 2}).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy_serve.requests"]
    assert len(lines) == 3
    assert "secret... (12 characters)" in lines[0] and "words" not in lines[0]
    assert lines[1].endswith("prompt=[0, 1, 2, 3, 4, 5, '... (40 ids)']")
    assert "'content': 'secret... (12 characters)'" in lines[2] and "words" not in lines[2]


def test_server_wide_vllm_switches(fake):
    """--disable-fastapi-docs: no /docs, /redoc or /openapi.json; --return-tokens-as-token-ids: logprob tokens
    named token_id:<id> unless the request says otherwise."""
    with TestClient(create_app(fake, _settings(fastapi_docs=False, return_tokens_as_token_ids=True)),
                    base_url="http://localhost") as client:
        client.portal.call(asyncio.sleep, 0.05)
        assert [client.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [404, 404, 404]
        body = {"prompt": "abc", "max_tokens": 2, "logprobs": 1}
        assert client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"] == \
            ["token_id:0", "token_id:1"]
        named = client.post("/v1/completions", json={**body, "return_tokens_as_token_ids": False}).json()
        assert named["choices"][0]["logprobs"]["tokens"] == ["w0 ", "w1 "]
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 1, "logprobs": True}).json()
        assert chat["choices"][0]["logprobs"]["content"][0]["token"] == "token_id:0"
    with TestClient(create_app(FakeEngine(), _settings()), base_url="http://localhost") as client:
        assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200
