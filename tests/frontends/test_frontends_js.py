"""The real JS clients of chat frontends against a live server: the ``openai`` Node SDK (LibreChat's older
client, and the browser code of SDK-based frontends) and LangChain's ``ChatOpenAI`` configured as LibreChat's
agents endpoint configures it (``tests/frontends/js/clients.mjs``, versions pinned in its package-lock.json).

Skipped when ``node``/``npm`` are missing or the packages cannot be installed (``npm ci`` into
``tests/frontends/js/node_modules`` on the first run, a few seconds with the npm registry reachable)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.frontends.calls import API_KEY, BASE_MODEL, EXPERT_MODEL, MODEL

JS_DIR = Path(__file__).resolve().parent / "js"
PACKAGES = ("openai", "@langchain/openai", "@langchain/core")


def _node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return int(version.lstrip("v").split(".")[0])


@pytest.fixture(scope="session")
def js_clients() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed")
    if _node_major(node) < 20:
        pytest.skip("the pinned openai SDK needs Node 20 or later")
    if not all((JS_DIR / "node_modules" / name / "package.json").is_file() for name in PACKAGES):
        try:
            subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS_DIR, check=True,
                           capture_output=True, text=True, timeout=300)
        except subprocess.CalledProcessError as error:
            pytest.skip(f"npm ci failed (no registry?): {error.stderr.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci took over 5 minutes")
    return node


@pytest.fixture(scope="session")
def seen(js_clients, frontend_server) -> dict:
    result = subprocess.run([js_clients, "clients.mjs", f"{frontend_server.url}/v1", API_KEY], cwd=JS_DIR,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"clients.mjs failed:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_model_list(seen):
    assert seen["models"] == [MODEL, BASE_MODEL, EXPERT_MODEL]


def test_chat_completion_stream_helper_accepts_the_stream(seen):
    """finalChatCompletion() throws on a choice without role or finish_reason; it got both, and usage."""
    helper = seen["helper"]
    assert helper["role"] == "assistant" and helper["finish_reason"] == "length"
    assert helper["content"] == helper["text"] and helper["text"]
    assert helper["usage"]["completion_tokens"] == 8


def test_raw_stream_chunks(seen):
    chunks = seen["chunks"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("length") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1 and all(c["model"] == MODEL for c in chunks)


def test_title(seen):
    assert seen["title"]["model"] == EXPERT_MODEL
    assert isinstance(seen["title"]["content"], str) and seen["title"]["usage"]["completion_tokens"] <= 16


def test_errors_are_the_sdk_error_classes(seen):
    assert seen["wrongKey"]["name"] == "AuthenticationError" and seen["wrongKey"]["code"] == "invalid_api_key"
    assert seen["unknownModel"]["name"] == "NotFoundError" and seen["unknownModel"]["code"] == "model_not_found"
    assert seen["badPart"]["name"] == "BadRequestError" and "image_url" in seen["badPart"]["message"]


def test_langchain_as_librechat_configures_it(seen):
    assert seen["langchainStream"]["text"]
    assert seen["langchainStream"]["usage"]["output_tokens"] == 8  # from the include_usage chunk
    assert isinstance(seen["langchainTitle"]["content"], str)
    assert seen["langchainTitle"]["usage"]["output_tokens"] <= 8


def test_add_params_alpha_zero_is_the_base(seen):
    assert seen["alpha"]["proxyAlpha0"] == seen["alpha"]["base"]
