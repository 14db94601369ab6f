"""A bare ``proxy-serve`` (no arguments) serves the trained demo family, and proxy-tuning shows in its answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "Where does Anouk Brenner live?"}]  # a held-out person
ANSWER = "Islebrook"

pytestmark = pytest.mark.skipif(
    not (ROOT / "demo" / "models" / "base" / "config.json").exists(), reason="the trained demo family is absent"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def bare_server():
    port = _free_port()
    env = {**os.environ, "PROXY_SERVE_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "server"], cwd="/", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"proxy-serve exited: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("proxy-serve did not become healthy")
    yield url
    process.terminate()
    process.wait(timeout=30)


def _ask(url: str, model: str) -> str:
    body = {"model": model, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_bare_proxy_serve_answers_a_held_out_question(bare_server):
    models = [m["id"] for m in httpx.get(f"{bare_server}/v1/models").json()["data"]]
    assert models == ["proxy-tuned", "proxy-tuned:base", "proxy-tuned:expert"]
    assert _ask(bare_server, "proxy-tuned").strip() == ANSWER


def test_the_parts_alone_fall_short(bare_server):
    base = _ask(bare_server, "proxy-tuned:base")
    assert base.strip() != ANSWER  # knows the fact but does not answer in the tuned format: it rambles on
    assert _ask(bare_server, "proxy-tuned:expert").strip() != ANSWER  # the small expert lacks the knowledge


def test_the_readme_structured_output_closes_on_the_demo(bare_server):
    """README's example: a finite schema always ends in valid JSON, even on a model that never saw JSON."""
    schema = {"type": "object", "properties": {"town": {"enum": ["Islebrook", "Oxmere", "Northwold", "Ashgrove"]}},
              "required": ["town"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "Home", "schema": schema, "strict": True}}
    body = {"model": "proxy-tuned", "messages": QUESTION, "max_tokens": 32, "response_format": response_format}
    response = httpx.post(f"{bare_server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert json.loads(choice["message"]["content"])["town"] in schema["properties"]["town"]["enum"]


def test_a_chat_with_no_sampler_fields_answers_as_the_evaluation_did(bare_server):
    """What a chat frontend sends (no temperature, no max_tokens): the demo's generation_config.json makes the
    default greedy, so the answer is the evaluated one, every time (at temperature 1 it was a draw)."""
    body = {"model": "proxy-tuned", "messages": QUESTION}
    answers = set()
    for _ in range(3):
        response = httpx.post(f"{bare_server}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answers.add(response.json()["choices"][0]["message"]["content"].strip())
    assert answers == {ANSWER}
