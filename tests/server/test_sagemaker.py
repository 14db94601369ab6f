"""SageMaker's paths, as vLLM's and TGI's containers serve them: ``POST /invocations`` answers the API its body
speaks (a chat completion, a completion, TGI's generate), and ``GET /ping`` is the health probe."""

from __future__ import annotations

from tests.server.live import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
COMPLETION = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}


def _ok(response) -> dict | list:
    assert response.status_code == 200, response.text
    return response.json()


def test_the_body_picks_the_api(http):
    chat = _ok(http.post("/invocations", json=CHAT))
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == _ok(http.post("/v1/chat/completions", json=CHAT))["choices"][0]["message"]
    completion = _ok(http.post("/invocations", json=COMPLETION))
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == _ok(http.post("/v1/completions", json=COMPLETION))["choices"][0]["text"]
    tgi = {"inputs": COMPLETION["prompt"], "parameters": {"max_new_tokens": 6}}
    assert _ok(http.post("/invocations", json=tgi)) == _ok(http.post("/", json=tgi))  # TGI's [{generated_text}]
    with http.stream("POST", "/invocations", json={**CHAT, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert [line for line in response.iter_lines() if line][-1] == "data: [DONE]"
    assert http.get("/ping").status_code == 200


def test_refusals_are_in_the_shape_of_the_api_the_body_speaks(http):
    empty = http.post("/invocations", json={"max_tokens": 3})
    assert empty.status_code == 400 and "messages" in empty.json()["error"]["message"]
    chat = http.post("/invocations", json={**CHAT, "messages": []})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    tgi = http.post("/invocations", json={"inputs": "x", "parameters": {"temperature": -1}})
    assert tgi.status_code == 422 and tgi.json()["error_type"] == "validation"
    assert http.post("/invocations", json=[1]).status_code == 400
