"""Named expert pairs: each serves under model ids of its own (``NAME:PAIR``, ``NAME:PAIR:expert``), which a chat
frontend's model picker chooses where an SDK would have to send ``alpha`` as a list."""

from __future__ import annotations

import openai
import pytest

from server.cli import resolve_settings
from server.settings import ConfigError, load_settings
from tests.engine.reference import NaiveProxy
from tests.server.live import MODEL, serving

IDS = [MODEL, f"{MODEL}:base", f"{MODEL}:expert", f"{MODEL}:plain", f"{MODEL}:plain:expert", f"{MODEL}:chat",
       f"{MODEL}:chat:expert"]


@pytest.fixture(scope="module")
def server(tiny_family, chat_family):
    def pair(family, name, alpha):
        return {"expert": {"path": str(family.expert)}, "anti_expert": {"path": str(family.anti_expert)},
                "name": name, "alpha": alpha}

    engine = {"base": {"path": str(tiny_family.base)},
              "experts": [pair(tiny_family, "plain", 1.0), pair(chat_family, "chat", 0.5)]}
    with serving(load_settings(overrides={"engine": engine}, environ=False)) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    return server[1]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0].url}/v1", api_key="none", max_retries=0)


def _text(http, model: str, **extra) -> str:
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, **extra}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_models_lists_each_named_pair_and_its_expert(http, chat_family):
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert list(cards) == IDS
    assert cards[MODEL]["alpha"] == [1.0, 0.5] and cards[f"{MODEL}:chat"]["alpha"] == [0.5]
    assert cards[f"{MODEL}:chat:expert"]["root"] == str(chat_family.expert)
    assert cards[MODEL]["parent"] is None and {cards[i]["parent"] for i in IDS[1:]} == {MODEL}  # vLLM's field
    assert http.get(f"/v1/models/{MODEL}:chat:expert").json()["id"] == f"{MODEL}:chat:expert"


def test_a_named_pair_is_the_base_steered_by_that_pair_alone(http):
    assert _text(http, f"{MODEL}:chat") == _text(http, MODEL, alpha=[0.0, 0.5])
    assert _text(http, f"{MODEL}:chat", alpha=2.0) == _text(http, MODEL, alpha=[0.0, 2.0])
    assert _text(http, f"{MODEL}:plain") == _text(http, MODEL, alpha=[1.0, 0.0])
    # The playground sends one alpha per pair from its sliders: the selected pair's counts.
    assert _text(http, f"{MODEL}:chat", alpha=[7.0, 2.0]) == _text(http, MODEL, alpha=[0.0, 2.0])


def test_a_named_pairs_expert_alone_is_that_expert(http, chat_family):
    model = f"{MODEL}:chat:expert"
    ids = http.post("/tokenize", json={"model": model, "prompt": "The capital of France is"}).json()["tokens"]
    reference = NaiveProxy([str(chat_family.expert)], 512)
    expected, _ = reference.greedy([ids], [1.0], 8)
    text = _text(http, model)
    detokenized = http.post("/detokenize", json={"model": model, "tokens": expected}).json()["prompt"]
    assert text == detokenized


def test_chat_and_streams_through_the_sdk(client):
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model=f"{MODEL}:chat", messages=messages, max_tokens=6, temperature=0)
    assert whole.model == f"{MODEL}:chat"
    stream = client.chat.completions.create(model=f"{MODEL}:chat", messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {f"{MODEL}:chat"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_an_unknown_pair_is_a_404_listing_the_ids(http):
    response = http.post("/v1/completions", json={"model": f"{MODEL}:nope", "prompt": "x", "max_tokens": 1})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and f"{MODEL}:chat:expert" in error["message"]


def test_a_named_pairs_alpha_of_the_wrong_length_is_a_400(http):
    response = http.post("/v1/completions", json={"model": f"{MODEL}:chat", "prompt": "x", "max_tokens": 1,
                                                  "alpha": [1.0, 2.0, 3.0]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "alpha"
    assert "serves one expert pair" in response.json()["error"]["message"]


def test_expert_name_flags_name_the_pairs_in_order():
    settings, _ = resolve_settings(["--base", "/b", "--expert", "/e1", "--expert", "/e2", "--anti-expert", "/a",
                                    "--expert-name", "code", "--expert-name", "chat"])
    assert [(p.expert.path, p.name) for p in settings.engine.experts] == [("/e1", "code"), ("/e2", "chat")]
    assert settings.model_ids == [MODEL, f"{MODEL}:base", f"{MODEL}:expert", f"{MODEL}:code", f"{MODEL}:code:expert",
                                  f"{MODEL}:chat", f"{MODEL}:chat:expert"]


@pytest.mark.parametrize(("names", "message"), [
    (["same", "same"], "given to several pairs"),
    (["base", "x"], "not base or expert"),
    (["has space", "x"], "letters, digits"),
])
def test_bad_pair_names_are_configuration_errors(names, message):
    argv = ["--base", "/b", "--expert", "/e1", "--expert", "/e2", "--anti-expert", "/a"]
    for name in names:
        argv += ["--expert-name", name]
    with pytest.raises(ConfigError, match=message):
        resolve_settings(argv)


def test_tgis_adapter_id_names_a_pair_as_tgi_names_a_lora_adapter(http, chat_family):
    """TGI's clients pick a LoRA adapter by ``adapter_id``: here a named pair, by its name or its expert's path."""
    def tgi(adapter_id: str) -> str:
        response = http.post("/generate", json={"inputs": "The capital of France is",
                                                "parameters": {"max_new_tokens": 8, "adapter_id": adapter_id}})
        assert response.status_code == 200, response.text
        return response.json()["generated_text"]

    body = {"model": f"{MODEL}:chat", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    expected = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert tgi("chat") == tgi(str(chat_family.expert)) == tgi(f"{MODEL}:chat") == expected
    refused = http.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
    assert refused.status_code == 422 and "chat" in refused.json()["error"]
