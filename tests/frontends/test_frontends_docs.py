"""docs/frontends.md's examples work as written: the librechat.yaml endpoint and the Open WebUI variables name
models the server lists, and the requests they lead to are accepted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.frontends.calls import LANGCHAIN_HEADERS, LIBRECHAT_AGENTS_TITLE, MODEL, bearer, openai_node_events

DOC = Path(__file__).resolve().parents[2] / "docs" / "frontends.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.DOTALL)


def _listed(http) -> list[str]:
    return [m["id"] for m in http.get("/v1/models", headers=bearer({})).json()["data"]]


def test_librechat_endpoint(http):
    (config,) = [yaml.safe_load(block) for block in _blocks("yaml") if "endpoints:" in block]
    (endpoint,) = config["endpoints"]["custom"]
    assert endpoint["baseURL"].endswith("/v1") and endpoint["apiKey"].startswith("${")
    assert endpoint["models"]["fetch"] is True
    listed = _listed(http)
    assert set(endpoint["models"]["default"]) <= set(listed)
    assert endpoint["titleConvo"] is True and endpoint["titleMethod"] == "completion"
    assert endpoint["titleModel"] in listed

    # A chat and a title as LibreChat sends them with this endpoint: addParams as top-level fields.
    chat = {"model": endpoint["models"]["default"][0], "stream": True, "stream_options": {"include_usage": True},
            **endpoint["addParams"], "max_tokens": 6, "messages": [{"role": "user", "content": "hi"}]}
    with http.stream("POST", "/v1/chat/completions", content=json.dumps(chat),
                     headers=bearer(LANGCHAIN_HEADERS)) as response:
        assert response.status_code == 200
        chunks, done = openai_node_events("".join(response.iter_text()))
    assert done and chunks[-1]["usage"]["completion_tokens"] == 6
    title = {**LIBRECHAT_AGENTS_TITLE, **endpoint["addParams"], "model": endpoint["titleModel"], "max_tokens": 8}
    response = http.post("/v1/chat/completions", content=json.dumps(title), headers=bearer(LANGCHAIN_HEADERS))
    assert response.status_code == 200 and response.json()["model"] == endpoint["titleModel"]


def test_open_webui_variables(http):
    (block,) = [b for b in _blocks("sh") if "OPENAI_API_BASE_URL" in b]
    env = dict(re.findall(r"^([A-Z_]+)=(\S+)", block, re.MULTILINE))
    assert env["OPENAI_API_BASE_URL"].endswith("/v1")
    assert env["ENABLE_OLLAMA_API"] == "false"
    assert env["TASK_MODEL_EXTERNAL"] in _listed(http)
    assert env["TASK_MODEL_EXTERNAL"] != MODEL  # tasks go to the small expert, not the proxy-tuned model
