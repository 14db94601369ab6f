"""Web exposure: strict JSON, the ``Host`` allow-list (DNS rebinding), the key before the body, ``/docs`` behind
the key, OpenAI-shaped refusals from CORS and from uvicorn itself, connection limits and read timeouts, and
the start-up warning for an open port without a key."""

from __future__ import annotations

import json
import logging
import socket

import httpx
import pytest

from tests.reliability.support import error_of, serve
from tests.server.live import API_KEY, MODEL, ORIGIN

BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def open_server(tiny_family):
    """No key: localhost names only; tight read timeouts and connection limit for the protocol tests."""
    live, _ = serve(tiny_family, header_timeout_s=1, body_timeout_s=1, limit_concurrency=4,
                    allowed_origins=[ORIGIN])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def keyed_server(tiny_family):
    live, _ = serve(tiny_family, api_keys=[API_KEY])
    yield live
    live.stop()


def post(url: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", content=content, headers=headers or {}, timeout=60)


# ------------------------------------------------------------------------------------------- strict JSON
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_must_say_it_is_json(open_server, content_type):
    """A web page can POST text/plain (or a form) to any origin without a CORS preflight: refused, 415."""
    headers = {"content-type": content_type} if content_type else {}
    response = post(open_server.url, json.dumps(BODY).encode(), headers)
    error = error_of(response, 415)
    assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_json_content_types_are_served(open_server, content_type):
    response = post(open_server.url, json.dumps(BODY).encode(), {"content-type": content_type})
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------------------ Host allow-list
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.5:8000"])
def test_without_a_key_only_localhost_names_are_served(open_server, host):
    """DNS rebinding: a page at evil.example re-pointed at 127.0.0.1 sends ``Host: evil.example``."""
    response = httpx.get(f"{open_server.url}/v1/models", headers={"host": host}, timeout=30)
    error = error_of(response, 403)
    assert error["code"] == "host_not_allowed" and "allowed_hosts" in error["message"]
    assert post(open_server.url, json.dumps(BODY).encode(),
                {"host": host, "content-type": "application/json"}).status_code == 403


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000", "LOCALHOST",
                                  "app.localhost:3000"])
def test_localhost_names_are_served(open_server, host):
    assert httpx.get(f"{open_server.url}/v1/models", headers={"host": host}, timeout=30).status_code == 200


def test_probes_answer_whatever_the_host(open_server):
    """Kubernetes probes and Prometheus reach a pod by its IP address."""
    for path in ("/health", "/metrics"):
        assert httpx.get(f"{open_server.url}{path}", headers={"host": "10.1.2.3:8000"}, timeout=30).status_code == 200


def test_with_a_key_any_host_is_served(keyed_server):
    response = httpx.get(f"{keyed_server.url}/v1/models", timeout=30,
                         headers={"host": "proxy.internal:8000", "authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200


def test_allowed_hosts_is_configurable(tiny_family):
    live, _ = serve(tiny_family, allowed_hosts=["api.example", "*.corp.example"])
    try:
        ok = [httpx.get(f"{live.url}/v1/models", headers={"host": h}, timeout=30).status_code
              for h in ("api.example", "api.example:443", "gpu.corp.example")]
        refused = httpx.get(f"{live.url}/v1/models", headers={"host": "localhost"}, timeout=30)
    finally:
        live.stop()
    assert ok == [200, 200, 200]
    error_of(refused, 403)


# ------------------------------------------------------------------------------------------------ the key
@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"prompt": 5}', b""])
def test_the_key_is_checked_before_the_body(keyed_server, raw):
    """401 whatever the body: a client without the key learns nothing about what a body should hold."""
    error = error_of(post(keyed_server.url, raw, {"content-type": "application/json"}), 401)
    assert error["code"] == "invalid_api_key"
    with_key = post(keyed_server.url, raw, {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})
    assert with_key.status_code == 400


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc", "/v1/models"])
def test_docs_and_schema_need_the_key(keyed_server, path):
    error_of(httpx.get(f"{keyed_server.url}{path}", timeout=30), 401)
    with_key = httpx.get(f"{keyed_server.url}{path}", headers={"authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert with_key.status_code == 200


def test_probes_need_no_key(keyed_server):
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{keyed_server.url}{path}", timeout=30).status_code == 200


# -------------------------------------------------------------------------- refusals from CORS and uvicorn
def test_a_refused_cors_preflight_is_openai_shaped(open_server):
    response = httpx.options(f"{open_server.url}/v1/completions", timeout=30, headers={
        "origin": "http://evil.example", "access-control-request-method": "POST"})
    error = error_of(response, 400)
    assert error["code"] == "cors_refused" and "origin" in error["message"]
    allowed = httpx.options(f"{open_server.url}/v1/completions", timeout=30, headers={
        "origin": ORIGIN, "access-control-request-method": "POST", "access-control-request-headers": "content-type"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN


def raw_exchange(port: int, data: bytes, *, read_timeout: float = 30.0) -> bytes:
    """Send raw bytes, read until the server closes (or ``read_timeout`` passes with nothing more)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    return received


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def shaped(body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_a_malformed_request_gets_an_openai_shaped_400_from_uvicorn(open_server):
    status, body = status_and_body(raw_exchange(open_server.port, b"GARBAGE\r\n\r\n"))
    assert status == 400 and shaped(body)["code"] == "invalid_http_request"


def test_a_head_past_max_header_bytes_is_refused(open_server):
    """h11 bounds what it buffers of a head still arriving (16 KiB by default): a client cannot make it hold
    more. (A longer head that arrives whole in one read is parsed; it is bounded by that read.)"""
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20_000
    status, body = status_and_body(raw_exchange(open_server.port, request))
    assert status == 400 and "max_header_bytes" in shaped(body)["message"]


def test_a_slow_head_is_cut_off(open_server):
    """Slowloris: a head that never completes is closed after ``header_timeout_s`` (1 s here), even while
    bytes keep trickling (uvicorn's keep-alive timer restarts with every byte)."""
    with socket.create_connection(("127.0.0.1", open_server.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        closed = False
        for _ in range(60):  # a byte every half second, for up to 30 s
            try:
                sock.sendall(b"X")
                sock.settimeout(0.5)
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    assert closed


def test_a_body_that_stops_arriving_is_a_408(open_server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    status, body = status_and_body(raw_exchange(open_server.port, head + b'{"prompt"'))
    assert status == 408 and "body_timeout_s" in shaped(body)["message"]


def test_past_the_connection_limit_uvicorn_answers_an_openai_shaped_503(open_server):
    idle = [socket.create_connection(("127.0.0.1", open_server.port), timeout=30) for _ in range(4)]
    try:
        raw = raw_exchange(open_server.port, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n", read_timeout=10)
    finally:
        for sock in idle:
            sock.close()
    status, body = status_and_body(raw)
    assert status == 503 and shaped(body)["code"] == "server_overloaded"


# ------------------------------------------------------------------------------------------ start-up warning
@pytest.mark.parametrize(("host", "keys", "loud"), [
    ("0.0.0.0", [], True), ("::", [], True), ("192.168.1.10", [], True), ("0.0.0.0", ["k"], False),
    ("127.0.0.1", [], False), ("localhost", [], False), ("::1", [], False),
])
def test_an_open_port_without_a_key_warns_loudly(tiny_family, caplog, host, keys, loud):
    from server.process import warn_if_exposed
    from tests.server.live import make_settings

    settings = make_settings(tiny_family, host=host, api_keys=keys)
    with caplog.at_level(logging.WARNING, logger="proxy_serve"):
        warn_if_exposed(settings)
    warned = [r for r in caplog.records if "NO API KEY" in r.getMessage()]
    assert bool(warned) == loud
