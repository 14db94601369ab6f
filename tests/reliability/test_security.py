"""API keys compared in constant time and never logged; prompt text not logged by default; no request field
makes the server read (or write) a file."""

from __future__ import annotations

import hmac
import json
import logging
import sys
import threading
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from tests.reliability.support import error_of, idle, idle_client, raise_for_seed, served, stream
from tests.server.live import MODEL

KEY, OTHER_KEY, NEAR_MISS = "sk-live-0123456789abcdef", "sk-second-key-42", "sk-live-0123456789abcdeX"
SECRET_PROMPT = "my-private-diary-entry-7f3a"


@pytest.fixture(scope="module")
def server(tiny_family):
    with served(tiny_family, api_keys=[KEY, OTHER_KEY], log_level="debug") as live:
        yield live


@pytest.fixture()
def http(server):
    with idle_client(server, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def test_every_key_is_compared_as_a_fixed_size_digest(monkeypatch):
    """No early exit (every accepted key is compared) and equal lengths (SHA-256 digests): the time taken does
    not depend on which key came close or on how long the given key is."""
    from server import auth

    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    checker = auth.KeyChecker(["k1", "a-much-longer-second-key", "k3"])

    for token in ("k1", "k3", "x" * 500):
        calls.clear()
        try:
            checker.check(f"Bearer {token}")
        except Exception:  # noqa: BLE001 - the wrong key is refused; only the comparisons matter here
            pass
        assert calls == [(32, 32)] * 3


def _all_log_text(records: list[logging.LogRecord]) -> str:
    parts = []
    for record in records:
        parts.append(record.getMessage())
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


def test_keys_and_prompts_never_reach_the_log(server, http, caplog):
    """At debug level, through successes, refusals, a wrong key, a stream, a disconnect and an engine fault."""
    caplog.set_level(logging.DEBUG)
    with caplog.at_level(logging.DEBUG):
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": SECRET_PROMPT, "max_tokens": 3}
                         ).status_code == 200
        status, _ = stream(http, "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 3})
        assert status == 200
        error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": SECRET_PROMPT, "temperature": -1}), 400)
        raw = json.dumps({"model": MODEL, "prompt": SECRET_PROMPT + "\ud800"}).encode()  # a lone surrogate
        error_of(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)
        for headers in ({"Authorization": f"Bearer {NEAR_MISS}"}, {"Authorization": NEAR_MISS}, {}):
            error_of(httpx.post(f"{server.url}/v1/completions", headers=headers,
                                json={"model": MODEL, "prompt": SECRET_PROMPT}), 401)
        with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": SECRET_PROMPT, "stream": True,
                                                          "max_tokens": 200, "ignore_eos": True}) as response:
            next(response.iter_lines())  # then leave
        with server.hooks.on(raise_for_seed(5150, "decode", lambda: RuntimeError("boom"))):
            error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": SECRET_PROMPT, "seed": 5150,
                                                        "max_tokens": 5, "ignore_eos": True}), 500)
        assert idle(server)
        metrics = http.get("/metrics").text
    text = _all_log_text(caplog.records)
    assert "model=proxy-tuned status=200" in text and "status=400" in text and "status=error" in text
    for secret in (KEY, OTHER_KEY, NEAR_MISS, SECRET_PROMPT):
        assert secret not in text, secret
        assert secret not in metrics
    assert KEY not in repr(server.settings) and KEY not in server.settings.model_dump_json()


class FileWatch:
    """An audit hook recording every file the process opens whose path contains a marker (audit hooks cannot be
    removed, so this one does nothing unless a test is watching)."""

    markers: ClassVar[tuple[str, ...]] = ()
    opened: ClassVar[list[str]] = []
    installed: ClassVar[bool] = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.markers and event in ("open", "os.listdir", "os.scandir", "os.remove", "os.rename") and args:
            path = str(args[0])
            if any(marker in path for marker in cls.markers):
                cls.opened.append(f"{event} {path}")

    @classmethod
    def watch(cls, *markers: str) -> None:
        if not cls.installed:
            sys.addaudithook(cls.hook)
            cls.installed = True
        cls.opened = []
        cls.markers = markers


def test_no_request_field_reads_a_file(server, http, tiny_family, tmp_path):
    template = tmp_path / "evil-template.jinja"
    template.write_text("{{ 'OWNED' }}")
    model_dir = str(tiny_family.base)
    targets = [str(template), model_dir, f"{model_dir}/config.json", "/etc/passwd", "../../../etc/passwd"]
    FileWatch.watch(str(template), "config.json", "passwd", model_dir)
    lock = threading.Lock()
    try:
        with lock:
            for target in targets:
                user = [{"role": "user", "content": target}]
                error_of(http.post("/v1/completions", json={"model": target, "prompt": "x"}), 404)
                error = error_of(http.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": user, "chat_template": target}), 400)
                assert error["param"] == "chat_template"
                for extra in ({"user": target}, {"stop": [target]}, {"suffix": None, "echo": True},
                              {"chat_template_kwargs": {"path": target}}, {"tools": [{"path": target}]}):
                    body = {"model": MODEL, "prompt": target, "max_tokens": 2, **extra}
                    assert http.post("/v1/completions", json=body).status_code == 200
                assert http.post("/v1/chat/completions", json={"model": MODEL, "messages": user, "max_tokens": 2}
                                 ).status_code == 200
                # Template variables are values in the sandbox; the template itself cannot be swapped through them.
                assert http.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": user, "max_tokens": 2, "chat_template_kwargs": {"path": target}}
                                 ).status_code == 200
                assert error_of(http.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": user, "chat_template_kwargs": {"chat_template": target}}), 400
                                )["param"] == "chat_template_kwargs"
                error_of(http.get(f"/v1/models/{target}"), 404)
                error_of(http.post("/tokenize", json={"model": target, "prompt": "x"}), 404)
                assert http.post("/tokenize", json={"prompt": target}).status_code == 200
                error_of(http.post("/detokenize", json={"model": target, "tokens": [1]}), 404)
    finally:
        FileWatch.markers = ()
    assert FileWatch.opened == []


def test_the_watch_sees_an_open():
    """The audit hook above does catch the server's kind of file access (so its silence means something)."""
    FileWatch.watch("rel-watch-probe")
    try:
        Path(__file__).with_name("rel-watch-probe").exists()  # a stat is not an open
        try:
            Path("/nonexistent/rel-watch-probe").read_text()
        except OSError:
            pass
    finally:
        FileWatch.markers = ()
    assert FileWatch.opened == ["open /nonexistent/rel-watch-probe"]
