"""vLLM's ``--served-model-name`` with several names: the first is the model id, the others aliases of it (and of
its parts), listed on /v1/models; answers and metrics name the model by its id, as vLLM's by its first name."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fastapi.testclient import TestClient

from proxy_engine.request import Serves, Target
from server.app import create_app
from server.cli import resolve_settings
from server.settings import ConfigError, load_settings
from tests.server.fake_engine import FakeEngine

ENGINE = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}, "name": "code"}]}


@pytest.fixture()
def served(caplog):
    caplog.set_level(logging.INFO, logger="proxy_serve")  # the start-up lines
    fake = FakeEngine()
    settings = load_settings(overrides={"engine": ENGINE, "served_model_name": ["llama", "meta-llama/Llama-3-8B"],
                                        "allow_runtime_lora_updating": True}, environ=False)
    with TestClient(create_app(fake, settings), base_url="http://localhost") as client:
        client.portal.call(asyncio.sleep, 0.05)  # the background load
        yield fake, client


def test_the_flag_takes_several_names_as_vllms_does():
    settings, _ = resolve_settings(["--served-model-name", "llama", "meta-llama/Llama-3-8B", "--base", "b"])
    assert settings.served_model_name == "llama" and settings.served_model_aliases == ["meta-llama/Llama-3-8B"]
    one, _ = resolve_settings(["--served-model-name", "llama", "--base", "b"])
    assert one.served_model_name == "llama" and one.served_model_aliases == []
    twice = load_settings(overrides={"engine": ENGINE, "served_model_aliases": ["x", "x"]}, environ=False)
    assert twice.served_model_aliases == ["x"]


@pytest.mark.parametrize(("names", "message"), [
    (["llama", "llama"], "is the model id itself"),
    (["llama", "other:base"], "must not"),
    (["llama", "two words"], "must not"),
    ([], "at least one name"),
    (["llama", "code"], "expert pair 'code' has the name"),  # the alias would hide the pair named code
    (["code"], "expert pair 'code' has the name"),
])
def test_bad_aliases_are_configuration_errors(names, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_settings(overrides={"engine": ENGINE, "served_model_name": names}, environ=False)


def test_models_lists_every_name_and_an_alias_serves_as_the_id(served):
    fake, client = served
    cards = client.get("/v1/models").json()["data"]
    ids = [card["id"] for card in cards]
    assert ids[:2] == ["llama", "meta-llama/Llama-3-8B"] and "llama:base" in ids
    assert "meta-llama/Llama-3-8B:base" not in ids  # the parts are listed under the id only
    assert cards[1] == {**cards[0], "id": "meta-llama/Llama-3-8B", "display_name": "meta-llama/Llama-3-8B"}
    assert client.get("/v1/models/meta-llama/Llama-3-8B").json()["id"] == "meta-llama/Llama-3-8B"
    assert client.get("/v1/models/meta-llama/Llama-3-8B:base").json()["parent"] == "llama"
    for model, target in (("meta-llama/Llama-3-8B", Target.PROXY), ("meta-llama/Llama-3-8B:base", Target.BASE),
                          ("meta-llama/Llama-3-8B:code:expert", Target(Serves.EXPERT, 0))):
        answer = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == model.replace("meta-llama/Llama-3-8B", "llama")  # vLLM's first name
        assert fake.requests[-1][3] == target
    chat = client.post("/v1/chat/completions", json={"model": "meta-llama/Llama-3-8B", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["model"] == "llama"
    missing = client.post("/v1/completions", json={"model": "meta-llama/Llama-3-70B", "prompt": "hi"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_no_adapter_may_take_an_alias_and_the_log_names_them(served, caplog):
    _, client = served
    assert any("also as meta-llama/Llama-3-8B" in record.getMessage() for record in caplog.get_records("setup"))
    refused = client.post("/v1/load_lora_adapter", json={"lora_name": "meta-llama/Llama-3-8B", "lora_path": "x"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora_name"
