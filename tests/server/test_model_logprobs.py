"""The ``model_logprobs`` request field through HTTP (engine in its own process: the entries cross the process
boundary), streamed and not, its refusals, the model card's ``alpha``, and the playground's static files."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.live import API_KEY, MODEL

ROLES = ["base", "expert", "anti_expert", "proxy"]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0,
        "ignore_eos": True}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


def _check_entries(entries: list[dict], text: str, k: int) -> None:
    assert "".join(e["token"] for e in entries) == text
    for entry in entries:
        models = entry["models"]
        assert list(models) == ROLES
        assert all(len(m["top_logprobs"]) == k for m in models.values())
        assert entry["shift"] == pytest.approx(models["proxy"]["logprob"] - models["base"]["logprob"], abs=1e-6)
        assert models["proxy"]["top_logprobs"][0]["token_id"] == entry["token_id"]  # greedy
        for model in models.values():
            values = [t["logprob"] for t in model["top_logprobs"]]
            assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


def _streamed(http, path: str, body: dict) -> tuple[str, list[dict]]:
    text, entries = "", []
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            (choice,) = json.loads(line[6:])["choices"]
            text += (choice["delta"].get("content") or "") if "delta" in choice else choice["text"]
            entries += choice.get("model_logprobs") or []
    return text, entries


@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_every_model_per_token_streamed_or_not(http, path, body):
    answer = http.post(path, json={**body, "model_logprobs": 3}).json()
    (choice,) = answer["choices"]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    _check_entries(choice["model_logprobs"], text, 3)
    assert len(choice["model_logprobs"]) == answer["usage"]["completion_tokens"] == 6
    streamed_text, streamed = _streamed(http, path, {**body, "model_logprobs": 3})
    assert streamed_text == text
    assert streamed == choice["model_logprobs"]


def test_alpha_zero_shows_every_model_and_moves_nothing(http):
    answer = http.post("/v1/completions", json={**COMPLETION, "model_logprobs": 2, "alpha": 0}).json()
    base = http.post("/v1/completions", json={**COMPLETION, "model": f"{MODEL}:base"}).json()
    (choice,) = answer["choices"]
    assert choice["text"] == base["choices"][0]["text"]
    for entry in choice["model_logprobs"]:
        assert list(entry["models"]) == ROLES
        assert entry["shift"] == pytest.approx(0.0, abs=1e-5)


def test_absent_unless_asked(http):
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        (choice,) = http.post(path, json=body).json()["choices"]
        assert "model_logprobs" not in choice
        with http.stream("POST", path, json={**body, "stream": True}) as response:
            assert "model_logprobs" not in "".join(response.iter_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": f"{MODEL}:base"}, "proxy-tuned model"),
        ({"model": f"{MODEL}:expert"}, "proxy-tuned model"),
        ({"model_logprobs": 21}, "between 0 and 20"),
        ({"model_logprobs": -1}, "between 0 and 20"),
        ({"model_logprobs": "many"}, "model_logprobs"),
    ],
)
def test_refused_naming_the_field(http, change, message):
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        response = http.post(path, json={**body, "model_logprobs": 2, **change})
        assert response.status_code == 400
        error = response.json()["error"]
        assert "model_logprobs" in error["message"] and message in error["message"]
        if "model" in change:
            assert error["param"] == "model_logprobs"


def test_model_card_says_each_pair_alpha(http):
    cards = http.get("/v1/models").json()["data"]
    assert cards[0]["id"] == MODEL and cards[0]["alpha"] == [1.0]
    assert all("alpha" not in card for card in cards[1:])


def test_playground_files(http):
    page = http.get("/playground/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="./main.js">' in page.text
    for name, kind in (("main.js", "javascript"), ("api.js", "javascript"), ("analysis.js", "javascript"),
                       ("playground.css", "text/css")):
        response = http.get(f"/playground/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name
        assert "http://" not in response.text and "https://" not in response.text, name  # no CDN, nothing remote
    assert http.get("/playground", follow_redirects=False).status_code in (307, 308)
    assert http.get("/playground/missing.js").status_code == 404


def test_playground_page_is_public_but_its_api_calls_need_the_key(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        assert http.get("/playground/").status_code == 200
        assert http.get("/playground/main.js").status_code == 200
        assert http.get("/v1/models").status_code == 401
        keyed = http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert keyed.status_code == 200
        assert http.get("/playgroundx").status_code == 401  # only the page's own paths are open
