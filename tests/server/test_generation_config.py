"""The model's generation_config.json gives the defaults of the fields a request omits (chat, completions,
Responses); the request's own fields always win; ``--generation-config vllm`` turns them off. Driven by a scripted
engine that records the parameters each request reached the engine with."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from fastapi.testclient import TestClient

from proxy_engine.request import Target
from server.app import create_app
from server.cli import build_parser, overrides_from_args
from server.settings import load_settings
from tests.server.fake_engine import FakeEngine

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
EXPERT = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
          "repetition_penalty": 1.1, "max_new_tokens": 6}
BASE = {"do_sample": False}


def _family(tmp_path):
    paths = {}
    for name, generation in (("base", BASE), ("expert", EXPERT), ("anti", None)):
        directory = tmp_path / name
        directory.mkdir()
        if generation is not None:
            (directory / "generation_config.json").write_text(json.dumps(generation))
        paths[name] = str(directory)
    return {"base": {"path": paths["base"]},
            "experts": [{"expert": {"path": paths["expert"]}, "anti_expert": {"path": paths["anti"]}}]}


@pytest.fixture()
def served(tmp_path, caplog):
    clients = []

    def serve(**engine_settings):
        fake = FakeEngine()
        settings = load_settings(overrides={"engine": {**_family(tmp_path), **engine_settings}}, environ=False)
        with caplog.at_level(logging.INFO, logger="proxy_serve"):
            client = TestClient(create_app(fake, settings), base_url="http://localhost").__enter__()
        clients.append(client)
        client.portal.call(asyncio.sleep, 0.05)  # the background load
        return fake, client

    yield serve
    for client in clients:
        client.__exit__(None, None, None)


def _params(fake: FakeEngine, client: TestClient, path: str, body: dict):
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return fake.requests[-1][2], fake.requests[-1][3]


def test_a_chat_without_sampler_fields_gets_the_experts_recommendations(served, caplog):
    fake, client = served()
    params, target = _params(fake, client, "/v1/chat/completions", CHAT)
    assert target is Target.PROXY
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
        0.6, 0.9, 20, 0.05, 1.1)
    assert params.max_tokens is None and params.default_max_tokens == 6  # a cap on the context left
    started = [r.getMessage() for r in caplog.records if "sampling defaults" in r.getMessage()]
    assert any("proxy-tuned: temperature=0.6" in line and "expert/generation_config.json" in line for line in started)


def test_the_requests_own_fields_always_win(served):
    fake, client = served()
    body = {**CHAT, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
            "max_tokens": 3}
    params, _ = _params(fake, client, "/v1/chat/completions", body)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
        1.0, 1.0, 0, 0.0, 1.0)
    assert params.max_tokens == 3 and params.default_max_tokens is None


def test_base_reads_the_bases_file_and_completions_keep_16_tokens(served):
    fake, client = served()
    params, target = _params(fake, client, "/v1/chat/completions", {**CHAT, "model": "proxy-tuned:base"})
    assert target is Target.BASE and params.temperature == 0.0 and params.top_p == 1.0
    params, _ = _params(fake, client, "/v1/completions", {"prompt": "x"})
    assert params.temperature == 0.6 and params.max_tokens == 16  # OpenAI's completions default stays


def test_the_responses_api_gets_them_too(served):
    fake, client = served()
    params, _ = _params(fake, client, "/v1/responses", {"input": "hi"})
    assert params.temperature == 0.6 and params.top_k == 20 and params.default_max_tokens == 6


def test_generation_config_vllm_turns_them_off(served):
    args = build_parser().parse_args(["--generation-config", "vllm"])
    fake, client = served(**overrides_from_args(args)["engine"])
    params, _ = _params(fake, client, "/v1/chat/completions", CHAT)
    assert (params.temperature, params.top_p, params.top_k, params.default_max_tokens) == (1.0, 1.0, 0, None)
