"""Open WebUI 0.12.4's chat page, in Debian's chromium, against the real-base demo (``configs/demo-real.yaml``: the
real SmolLM2-135M-Instruct steered by the pair in demo/real, an 8k context), with every Open WebUI setting at its
default: its chat sends its built-in tool definitions with no ``tool_choice`` and no sampler fields, and its title,
tags and follow-up tasks run on the chat's own model.

It signs in, picks the proxy-tuned model, asks the demo question and waits for the answer; then it reads the
server's request log: the chat and every background task answered 200, and the chat's shape is the one
docs/frontends.md describes. ``make test-openwebui`` installs Open WebUI into its own virtual environment (outside
this one: it pins its own torch, FastAPI and pydantic) and runs this file; elsewhere it is skipped unless
``OPENWEBUI_VENV`` names such an environment. ``OPENWEBUI_SCREENSHOT=<path>`` keeps a screenshot of the answer.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.harness import ServerProcess, free_port
from tests.browser.request_log import LoggedRequest, read_refusals, read_requests
from tests.browser.requirements import CHROMIUM, browser_missing, skip_unless_ready

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ["OPENWEBUI_VENV"]) if os.environ.get("OPENWEBUI_VENV") else None
OPEN_WEBUI = VENV / "bin" / "open-webui" if VENV else None
CONFIG = ROOT / "configs" / "demo-real.yaml"
MODEL = "proxy-real"  # served_model_name in CONFIG
KEY = "sk-openwebui-e2e"
QUESTION = "Where does Anouk Brenner live?"
ANSWER = "Islebrook"
ADMIN = {"name": "E2E Admin", "email": "admin@example.com", "password": "e2e-password"}
TASKS = 3  # title, tags and follow-ups: Open WebUI's defaults, each a request of its own after the reply
TIMEOUT_S = 300  # two shared CPU cores: Open WebUI's start alone takes about a minute

# `make test-openwebui` sets it: there a missing piece is a failure, not a skip.
REQUIRED = bool(os.environ.get("PROXY_SERVE_REQUIRE_OPENWEBUI"))


def _missing() -> str | None:
    if OPEN_WEBUI is None:
        return "OPENWEBUI_VENV is not set (make test-openwebui installs Open WebUI and sets it)"
    if not OPEN_WEBUI.exists():
        return f"no Open WebUI at {OPEN_WEBUI} (make test-openwebui installs it)"
    if (missing := browser_missing()) is not None:
        return missing
    if not (ROOT / ".cache" / "smollm2-135m-instruct" / "config.json").exists():
        return "the real base is not set up (make real-base)"
    return None


MISSING = _missing()
pytestmark = skip_unless_ready(MISSING, REQUIRED, "make test-openwebui")
if MISSING is None:
    from playwright import sync_api


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openwebui")


@pytest.fixture(scope="module")
def proxy_server(logs):
    """The real-base demo behind a key, logging each request's shape (debug level)."""
    port = free_port()
    command = [sys.executable, "-m", "server", "--config", str(CONFIG), "--host", "127.0.0.1", "--port", str(port),
               "--api-key", KEY, "--log-level", "debug"]
    server = ServerProcess(name="proxy-serve", command=command, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                           port=port, log_path=logs / "proxy-serve.log")
    server.start(timeout_s=TIMEOUT_S)
    yield server
    server.stop(grace_s=30)


def open_webui_env(proxy_url: str, data_dir: Path) -> dict[str, str]:
    """The connection to our server, and what keeps Open WebUI off the network; nothing that changes a chat."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    return {
        **inherited,
        "DATA_DIR": str(data_dir),
        "OPENAI_API_BASE_URL": f"{proxy_url}/v1",
        "OPENAI_API_KEY": KEY,
        "ENABLE_OLLAMA_API": "false",  # no Ollama here: its model list would time out on every refresh
        "WEBUI_SECRET_KEY": secrets.token_hex(32),
        # Offline: its embedding model (documents, RAG; not chat) is then reported missing once at start-up.
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
        "SCARF_NO_ANALYTICS": "true",
        "DO_NOT_TRACK": "true",
        "ANONYMIZED_TELEMETRY": "false",
    }


@pytest.fixture(scope="module")
def open_webui(proxy_server, logs):
    port = free_port()
    data = logs / "data"
    data.mkdir()
    server = ServerProcess(name="open-webui", command=[str(OPEN_WEBUI), "serve", "--host", "127.0.0.1", "--port",
                                                       str(port)],
                           env=open_webui_env(proxy_server.url, data), port=port, log_path=logs / "open-webui.log",
                           cwd=logs)
    server.start(timeout_s=TIMEOUT_S)
    # The first account is the admin (what its start page asks for on a new install).
    signup = httpx.post(f"{server.url}/api/v1/auths/signup", json=ADMIN, timeout=60)
    assert signup.status_code == 200 and signup.json()["role"] == "admin", signup.text
    yield server
    server.stop(grace_s=30)


@pytest.fixture(scope="module")
def page(open_webui):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root: no sandbox
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.set_default_timeout(TIMEOUT_S * 1000)
        yield page
        browser.close()


def sign_in(page, url: str) -> None:
    page.goto(f"{url}/auth")
    page.fill("input[name=email]", ADMIN["email"])
    page.fill("input[name=password]", ADMIN["password"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("#chat-input")
    # A new account first sees the release notes, over the chat.
    notes = page.get_by_role("button", name="Okay, Let's Go!")
    try:
        notes.wait_for(timeout=10_000)
    except sync_api.TimeoutError:
        return
    notes.click()


def ask(page, question: str) -> str:
    """Pick the proxy-tuned model, send ``question`` and return the reply once Open WebUI marks it done."""
    page.click("#model-selector-model-button")
    page.get_by_role("option", name=f"Select {MODEL} model", exact=True).click()
    sync_api.expect(page.locator("#model-selector-model-button")).to_have_text(MODEL)
    page.click("#chat-input")
    page.keyboard.type(question)
    page.keyboard.press("Enter")
    reply = page.locator("#response-content-container").last
    sync_api.expect(reply).not_to_be_empty()
    # The action bar (regenerate, ...) appears under a reply once its stream ended.
    page.get_by_role("button", name="Regenerate").last.wait_for()
    return reply.inner_text()


def settled_requests(server: ServerProcess, count: int) -> list[LoggedRequest]:
    """Wait until the server logged ``count`` requests and each of them ended; the background tasks come after
    the reply, so the page alone cannot say when they are over."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        requests = read_requests(server.log_path.read_text())
        if len(requests) >= count and all(r.status is not None for r in requests):
            return requests
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} finished requests in {server.log_path}, got: {requests}")
        time.sleep(0.5)


def test_open_webui_default_chat_answers_the_demo_question(page, open_webui, proxy_server):
    started = time.monotonic()
    sign_in(page, open_webui.url)
    reply = ask(page, QUESTION)
    answered_s = time.monotonic() - started
    requests = settled_requests(proxy_server, 1 + TASKS)
    log = proxy_server.log_path.read_text()
    screenshot = os.environ.get("OPENWEBUI_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot)
    print(f"\nOpen WebUI reply after {answered_s:.1f}s: {reply!r}; requests settled after "
          f"{time.monotonic() - started:.1f}s:")
    for request in requests:
        print(f"  {request.status} {request.model} {request.shape}")

    assert ANSWER in reply
    # Every call answered: the chat and each background task (a failed task shows only in Open WebUI's own log).
    assert [r.status for r in requests] == ["200"] * len(requests), requests
    assert not read_refusals(log)
    assert {r.model for r in requests} == {MODEL}  # no task model is set: the tasks run on the chat's model

    # The chat as docs/frontends.md describes Open WebUI's default: tools, no tool_choice, no sampler fields. The
    # server left the tools out (this family has no tool-call format) and sampled as generation_config.json says.
    (chat,) = [r for r in requests if r.tools]
    assert chat.keys == ["messages", "model", "stream", "tools"] and "tool_choice=-" in (chat.shape or "")
    assert "tool(s) under tool_choice auto were left out" in log
    assert f"{MODEL}: max_tokens=256, temperature=0.0 (from demo/real/expert/generation_config.json)" in log
    assert len([r for r in requests if not r.tools]) >= TASKS
