"""vLLM's runtime LoRA endpoints (server/lora_adapters.py): an adapter loaded while serving is an expert pair over a
running checkpoint, served under its name (bare, as vLLM serves it, and as ``NAME:LORA``), with the model ids
configured at start-up unchanged; unloading it takes its ids away. Off by default, as in vLLM."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from proxy_engine.adapter import adapter_pair
from proxy_engine.config import EngineConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.model_files import has_chat_template
from proxy_engine.request import PromptInput, SamplingParams, Serves, Target
from server.cli import resolve_settings
from server.settings import ConfigError, load_settings
from tests.engine.conftest import run_to_end
from tests.engine.test_adapter import _save_lora
from tests.server.live import MODEL, make_settings, serving
from tests.server.test_fuzzed_requests import VALUES

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def lora(tiny_family, tmp_path_factory):
    return _save_lora(tiny_family.anti_expert, tmp_path_factory.mktemp("route-lora"))


@pytest.fixture(scope="module")
def served(tiny_family):
    with serving(make_settings(tiny_family, allow_runtime_lora_updating=True)) as live:  # the engine process
        yield live


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def http(served):
    return served[1]


def _expected(family, lora, target: Target) -> str:
    """What the same pair configured at start-up (out of the default combination) answers."""
    pair = {"expert": {"path": str(lora)}, "anti_expert": {"path": str(family.anti_expert)}, "name": "sql",
            "in_default": False}
    config = EngineConfig(base={"path": str(family.base)}, experts=[
        {"expert": {"path": str(family.expert)}, "anti_expert": {"path": str(family.anti_expert)}}, pair])
    engine = ProxyEngine(load_models(config), config)
    engine.add(engine.make_sequences("r", PromptInput(text=PROMPT),
                                     SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), target))
    return run_to_end(engine)[("r", 0)]["text"]


def _lora_info(http) -> dict[str, str]:
    families = text_string_to_metric_families(http.get("/metrics").text)
    [sample] = next(family for family in families if family.name == "vllm:lora_requests_info").samples
    assert int(sample.labels["max_lora"]) > 1 and sample.value > 1.7e9  # the batch's cap; the time it was read
    return sample.labels


def _running_adapters_seen_during(http, body: dict) -> set[str]:
    """The running_lora_adapters values /metrics showed while ``body`` was being answered (scraped all along: a
    tiny model's request is over in a fraction of a second, so one scrape could miss it)."""
    import threading

    seen: set[str] = set()
    done = threading.Event()

    def scrape() -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=30) as own:
            while not done.is_set():
                seen.add(_lora_info(own)["running_lora_adapters"])

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        assert http.post("/v1/completions", json=body).status_code == 200
    finally:
        done.set()
        scraper.join(30)
    return seen


def _text(http, model: str) -> str:
    response = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                   "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_a_loaded_adapter_serves_under_its_name_and_leaves_the_rest_as_it_was(server, http, tiny_family, lora):
    before = _text(http, MODEL)
    ids_before = [card["id"] for card in http.get("/v1/models").json()["data"]]
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(lora)})
    assert response.status_code == 200, response.text
    assert response.text == "Success: LoRA adapter 'sql' added successfully."
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert list(cards) == [*ids_before, f"{MODEL}:sql", f"{MODEL}:sql:expert"]
    assert cards[f"{MODEL}:sql:expert"]["root"] == str(lora) and cards[f"{MODEL}:sql"]["parent"] == MODEL
    assert cards[MODEL]["alpha"] == [1.0] and cards[f"{MODEL}:sql"]["alpha"] == [1.0]
    assert http.get("/v1/models/sql").json() == {**cards[f"{MODEL}:sql"], "id": "sql"}  # the SDK's retrieve
    assert _text(http, MODEL) == before  # the default combination is as configured
    steered = _expected(tiny_family, lora, Target(Serves.PROXY, 1))
    assert _text(http, "sql") == _text(http, f"{MODEL}:sql") == steered  # the bare name, as vLLM serves a LoRA
    assert _text(http, f"{MODEL}:sql:expert") == _expected(tiny_family, lora, Target(Serves.EXPERT, 1))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    chat = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.model == "sql" and chat.choices[0].message.content is not None
    # vLLM's LoRA gauge names the adapters of running requests (the inference gateway routes by it).
    assert _lora_info(http)["running_lora_adapters"] == ""
    assert "sql" in _running_adapters_seen_during(http, {"model": "sql", "prompt": PROMPT, "max_tokens": 400,
                                                         "ignore_eos": True, "n": 4})

    again = http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(lora)})
    assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
    replaced = http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(lora),
                                                          "load_inplace": True})
    assert replaced.status_code == 200, replaced.text
    assert _text(http, "sql") == steered

    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'sql' removed successfully."
    assert [card["id"] for card in http.get("/v1/models").json()["data"]] == ids_before
    missing = http.post("/v1/completions", json={"model": "sql", "prompt": PROMPT, "max_tokens": 2})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    twice = http.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert twice.status_code == 404 and twice.json()["error"]["message"] == "The lora adapter 'sql' cannot be found."
    assert _text(http, MODEL) == before


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere/adapter"}, 404, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "a b", "lora_path": "LORA"}, 400, "lora_name"),
    ("/v1/load_lora_adapter", {"lora_name": "base", "lora_path": "LORA"}, 400, "lora_name"),
    ("/v1/load_lora_adapter", {"lora_name": MODEL, "lora_path": "LORA"}, 400, "lora_name"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "LORA", "anti_expert": "/elsewhere"}, 400,
     "anti_expert"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "LORA", "rank": 8}, 400, "rank"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ("/v1/unload_lora_adapter", {"lora_int_id": 3}, 400, "lora_name"),
])
def test_bad_requests_say_what_is_wrong(http, lora, path, body, status, param):
    body = {key: str(lora) if value == "LORA" else value for key, value in body.items()}
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    assert http.get("/health").status_code == 200


def test_off_by_default_as_in_vllm(live):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            response = http.post(path, json={"lora_name": "x", "lora_path": "/tmp"})
            assert response.status_code == 404
            assert "--allow-runtime-lora-updating" in response.json()["error"]["message"]
        assert "/v1/load_lora_adapter" not in http.get("/openapi.json").json()["paths"]


def test_vllms_environment_variable_and_the_flag_turn_it_on(monkeypatch, tiny_family):
    paths = ["--base", str(tiny_family.base), "--expert", str(tiny_family.expert), "--anti-expert",
             str(tiny_family.anti_expert)]
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    assert not resolve_settings(paths)[0].allow_runtime_lora_updating
    assert resolve_settings([*paths, "--allow-runtime-lora-updating"])[0].allow_runtime_lora_updating
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    assert resolve_settings(paths)[0].allow_runtime_lora_updating


def test_which_checkpoint_an_adapter_runs_over(tiny_family, chat_family, lora, tmp_path):
    """The request's anti_expert, else the running checkpoint the adapter names, else the configuration's only
    anti-expert, else (no pair) the base; with several and no way to tell, a 400 asking."""
    def engine(*antis) -> EngineConfig:
        return load_settings(overrides={"engine": {"base": {"path": str(tiny_family.base)}, "experts": [
            {"expert": {"path": str(tiny_family.expert)}, "anti_expert": {"path": str(anti)}} for anti in antis]}},
            environ=False).engine

    def anti(config: EngineConfig, adapter, named=None) -> str:
        return adapter_pair(config, "x", adapter, anti_expert=named).anti_expert.path

    one = engine(tiny_family.anti_expert)
    assert anti(one, lora) == str(tiny_family.anti_expert)  # named in adapter_config.json
    assert anti(one, lora, str(tiny_family.base)) == str(tiny_family.base)
    base_lora = _save_lora(tiny_family.base, tmp_path / "base-lora")
    assert anti(one, base_lora) == str(tiny_family.base)
    bare = load_settings(overrides={"engine": {"base": {"path": str(tiny_family.base)}}}, environ=False).engine
    foreign = _save_lora(chat_family.anti_expert, tmp_path / "foreign")  # says it was trained over another model
    settings = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": "org/other"}))
    assert anti(bare, foreign) == str(tiny_family.base)
    assert anti(one, foreign) == str(tiny_family.anti_expert)
    with pytest.raises(ValueError, match="name the checkpoint it runs over"):
        anti(engine(tiny_family.anti_expert, chat_family.anti_expert), foreign)
    with pytest.raises(ValueError, match="not a checkpoint this server runs"):
        anti(one, lora, "/elsewhere")
    # As the configured experts read (chat here), where the adapter's model has a chat template to read it with.
    chatty = load_settings(overrides={"engine": {"base": {"path": str(tiny_family.base)}, "experts": [
        {"expert": {"path": str(chat_family.expert), "prompt_format": "chat"},
         "anti_expert": {"path": str(tiny_family.anti_expert)}}]}}, environ=False).engine
    assert not has_chat_template(tiny_family.anti_expert)
    assert adapter_pair(chatty, "x", lora).expert.prompt_format == "plain"
    instruct = _save_lora(tiny_family.anti_expert, tmp_path / "instruct", with_tokenizer=True)
    assert adapter_pair(chatty, "x", instruct).expert.prompt_format == "chat"
    assert adapter_pair(one, "x", instruct).expert.prompt_format == "plain"
    pair = adapter_pair(one, "x", lora, alpha=0.5, prompt_format="chat")
    assert (pair.alpha, pair.expert.prompt_format, pair.in_default, pair.expert.adapter) == (0.5, "chat", False,
                                                                                             str(lora))


def test_lora_modules_serve_adapters_from_the_start(tiny_family, lora, tmp_path):
    """vLLM's --lora-modules: NAME=PATH or JSON, one or more after the flag; each a pair out of the default
    combination, over the checkpoint the adapter was trained over."""
    paths = ["--base", str(tiny_family.base), "--expert", str(tiny_family.expert), "--anti-expert",
             str(tiny_family.anti_expert)]
    settings, _ = resolve_settings([*paths, "--lora-modules", f"sql={lora}",
                                    json.dumps({"name": "chat", "path": str(lora), "base_model_name": MODEL})])
    pairs = settings.engine.experts
    anti = str(tiny_family.anti_expert)
    assert [(p.name, p.in_default, p.expert.adapter, p.anti_expert.path) for p in pairs[1:]] == [
        ("sql", False, str(lora), anti), ("chat", False, str(lora), anti)]
    assert settings.engine.default_pairs == [0]
    assert f"{MODEL}:sql" in settings.model_ids and f"{MODEL}:chat:expert" in settings.model_ids
    again = type(settings).model_validate(settings.model_dump())  # validated again: the pairs are not added twice
    assert len(again.engine.experts) == 3
    for bad, message in [("sql", "is not NAME=PATH"), (f"sql={tmp_path}", "is not a PEFT adapter"),
                         ("{\"name\": 1}", "not JSON with a name and a path"), (f"a b={lora}", "lora_modules: a b")]:
        with pytest.raises(ConfigError, match=message):
            resolve_settings([*paths, "--lora-modules", bad])


def test_a_load_that_fails_in_the_engine_says_why(lora):
    """Out of memory for the adapter's buffers, say (the engine leaves itself as it was: tests/engine)."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.server.fake_engine import FakeEngine

    class NoMemory(FakeEngine):
        async def add_pair(self, pair, replace=False):
            raise RuntimeError("CUDA out of memory")

    models = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    settings = load_settings(overrides={"engine": models, "allow_runtime_lora_updating": True}, environ=False)
    with TestClient(create_app(NoMemory(), settings), base_url="http://localhost") as http:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(lora),
                                                            "anti_expert": "a"})
        assert response.status_code == 500 and "CUDA out of memory" in response.json()["error"]["message"]


def test_a_request_racing_an_unload_is_a_404_not_a_500():
    """Resolved while the adapter was loaded, rendered after it went: the engine's PairNotFoundError."""
    from fastapi.testclient import TestClient

    from proxy_engine.request import PairNotFoundError
    from server.app import create_app
    from tests.server.fake_engine import FakeEngine

    class Unloaded(FakeEngine):
        async def add_request(self, *args, **kwargs):
            raise PairNotFoundError("the expert pair this request names (pair 1) has been removed")

    models = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    app = create_app(Unloaded(), load_settings(overrides={"engine": models}, environ=False))
    with TestClient(app, base_url="http://localhost") as http:
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]),
       body=st.dictionaries(st.sampled_from(["lora_name", "lora_path", "load_inplace", "alpha", "anti_expert",
                                             "prompt_format", "lora_int_id"]),
                            VALUES | st.sampled_from(["sql", "/tmp", ".", "LORA"]), max_size=5))
def test_random_bodies_are_answered_or_refused_never_a_500(http, lora, path, body):
    body = {key: str(lora) if value == "LORA" else value for key, value in body.items()}
    # json.dumps escapes a lone surrogate: valid JSON text that no UTF-8 string can hold
    response = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert isinstance(response.json()["error"]["message"], str)
    if response.status_code == 200 and path.endswith("load_lora_adapter"):  # a real adapter under a random name
        http.post("/v1/unload_lora_adapter", json={"lora_name": body["lora_name"]})
    assert http.get("/health").status_code == 200


def _loaded(server) -> set[str]:
    """The adapters the engine holds now (an evicted one is listed on /v1/models all the same)."""
    return {pair.name for pair in server.ctx.settings.engine.experts if pair.name is not None and not pair.in_default}


def test_the_resolver_loads_an_adapter_a_request_names(tiny_family, lora, tmp_path, monkeypatch):
    """vLLM's filesystem resolver: a request for a model the server does not serve loads DIR/NAME as the adapter
    NAME and is answered by it, once, however many ask at the same time; what the directory lacks stays a 404. With
    max_cpu_loras, one more adapter unloads the least recently used."""
    import shutil
    import threading

    resolver = tmp_path / "adapters"
    for name in ("sql", "story", "third"):
        shutil.copytree(lora, resolver / name)
    (resolver / "empty").mkdir()
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(resolver))
    paths = ["--base", str(tiny_family.base), "--expert", str(tiny_family.expert), "--anti-expert",
             str(tiny_family.anti_expert)]
    assert resolve_settings(paths)[0].lora_resolver_dir == str(resolver)  # vLLM's variable, or --lora-resolver-dir
    monkeypatch.delenv("VLLM_LORA_RESOLVER_CACHE_DIR")
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_settings([*paths, "--lora-resolver-dir", str(tmp_path / "nowhere")])

    assert resolve_settings([*paths, "--max-cpu-loras", "2"])[0].max_cpu_loras == 2

    with serving(make_settings(tiny_family, lora_resolver_dir=str(resolver), max_cpu_loras=2)) as (server, http):
        assert _lora_info(http)["running_lora_adapters"] == ""  # adapters may come: vLLM's LoRA gauge is there
        assert _text(http, "sql") == _expected(tiny_family, lora, Target(Serves.PROXY, 1))
        ids = [card["id"] for card in http.get("/v1/models").json()["data"]]
        assert f"{MODEL}:sql" in ids and f"{MODEL}:story" not in ids
        answers: list[int] = []

        def ask() -> None:
            answers.append(http.post("/v1/chat/completions", json={
                "model": "story", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}).status_code)

        racing = [threading.Thread(target=ask) for _ in range(3)]
        for thread in racing:
            thread.start()
        for thread in racing:
            thread.join(60)
        assert answers == [200, 200, 200]
        ids = [card["id"] for card in http.get("/v1/models").json()["data"]]
        assert ids.count(f"{MODEL}:story") == 1
        _text(http, f"{MODEL}:sql")  # used again: "story" is now the least recently used
        assert _text(http, "third")
        assert _loaded(server) == {"sql", "third"}
        ids = [card["id"] for card in http.get("/v1/models").json()["data"]]
        assert f"{MODEL}:story" in ids and f"{MODEL}:story:expert" in ids  # evicted, listed still (as vLLM lists it)
        assert _text(http, "story")  # and back, in place of the least recently used again ("sql")
        assert _loaded(server) == {"third", "story"}
        for unknown in ("empty", "nope", "../adapters/sql", ".hidden"):
            response = http.post("/v1/completions", json={"model": unknown, "prompt": PROMPT, "max_tokens": 2})
            assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", unknown


def test_max_cpu_loras_bounds_the_adapters_held_not_those_served(tiny_family, lora, tmp_path, monkeypatch):
    """vLLM's --max-cpu-loras is a cache: an adapter evicted from it stays registered and listed, and its next request
    loads it again (also one evicted between being resolved and reaching the engine: sent again, not a 404). A load
    that fails evicts nothing; unloading an evicted adapter forgets it."""
    import asyncio
    import shutil
    import threading
    from concurrent.futures import ThreadPoolExecutor

    other = _save_lora(tiny_family.anti_expert, tmp_path / "other", seed=1)
    broken = tmp_path / "broken"
    shutil.copytree(lora, broken)
    for weights in broken.glob("adapter_model.*"):
        weights.write_bytes(b"not a tensor file")
    settings = make_settings(tiny_family, allow_runtime_lora_updating=True, max_cpu_loras=1)
    with serving(settings) as (server, http):
        for name, path in (("a", lora), ("b", other)):
            loaded = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            assert loaded.status_code == 200
        assert _loaded(server) == {"b"}
        ids = [card["id"] for card in http.get("/v1/models").json()["data"]]
        assert {f"{MODEL}:a", f"{MODEL}:a:expert", f"{MODEL}:b", f"{MODEL}:b:expert"} <= set(ids)
        card = http.get("/v1/models/a").json()
        assert card["id"] == "a" and card["parent"] == MODEL and card["alpha"] == [1.0]
        assert http.get(f"/v1/models/{MODEL}:a:expert").json()["root"] == str(lora)
        assert _loaded(server) == {"b"}  # a card is read without loading the adapter

        assert _text(http, "a") == _expected(tiny_family, lora, Target(Serves.PROXY, 1))  # loaded again, as it was
        assert _loaded(server) == {"a"}
        for name, path in (("a", lora), ("b", other)):  # registered, loaded or not: load_inplace replaces
            again = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]

        failed = http.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(broken)})
        assert failed.status_code == 400 and failed.json()["error"]["param"] == "lora_path"
        assert "cannot be read" in failed.json()["error"]["message"] and _loaded(server) == {"a"}  # nothing evicted

        def ask(model: str) -> int:
            return http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 3}).status_code

        # "a" is resolved, then held back before the engine while "b" loads and evicts it: sent again, not a 404
        submit, held = server.ctx.submit, threading.Event()

        async def held_back(request_id, prompt, params, target, salt=None):
            if not held.is_set() and server.ctx.settings.engine.experts[target.pair].name == "a":
                held.set()
                await asyncio.sleep(1.0)
            return await submit(request_id, prompt, params, target, salt)

        monkeypatch.setattr(server.ctx, "submit", held_back)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, "a")
            assert held.wait(30)
            assert ask("b") == 200 and _loaded(server) == {"b"}
            assert first.result() == 200 and _loaded(server) == {"a"}
        monkeypatch.undo()

        dormant = ({"a", "b"} - _loaded(server)).pop()
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": dormant}).status_code == 200
        assert ask(dormant) == 404 and http.get(f"/v1/models/{dormant}").status_code == 404
        assert f"{MODEL}:{dormant}" not in [card["id"] for card in http.get("/v1/models").json()["data"]]
        assert http.get("/health").status_code == 200
