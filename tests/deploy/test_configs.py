"""Every file in configs/ validates, fits the GPUs its comments promise, and states its memory correctly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from proxy_engine.config import EngineConfig
from proxy_engine.memory import GiB
from proxy_engine.placement import plan_placement

from .conftest import REPO
from .known_models import KNOWN_MODELS

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SERVER_KEYS = {"served_model_name", "host", "port", "api_keys", "allowed_origins", "engine"}
GPUS_RE = re.compile(r"^# gpus: (\d+)(?: x (\d+)GiB)?$", re.MULTILINE)
# "#   base    Llama-2-70b-hf       68.98e9 params x 2 B = 128.5 GiB ..."
SIZE_RE = re.compile(r"^#\s+(base|expert|anti)\s+\S+\s+([\d.]+)e9 params x (\d) B =\s+([\d.]+) GiB", re.MULTILINE)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def models_of(engine: dict) -> list[tuple[str, dict]]:
    out = [("base", engine["base"])]
    for pair in engine.get("experts", []):
        out += [("expert", pair["expert"]), ("anti", pair["anti_expert"])]
    return out


def test_the_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo-cpu.yaml", "llama2-70b-chat.yaml", "llama3.1-70b-instruct.yaml", "qwen2.5-72b-instruct.yaml",
            "codellama-python-on-llama2-70b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    data = load(path)
    assert set(data) <= SERVER_KEYS, f"unknown top-level keys {set(data) - SERVER_KEYS}"
    assert "engine" in data
    config = EngineConfig.model_validate(data["engine"])
    assert config.experts, "a proxy-tuning config names at least one expert pair"
    assert isinstance(data.get("port", 8000), int)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_as_server_settings(path):
    settings = pytest.importorskip("server.settings")
    parsed = settings.ServerSettings(**load(path))
    assert parsed.engine.base.path == load(path)["engine"]["base"]["path"]


CPU_CONFIGS = [p for p in CONFIGS if "\n# gpus: 0\n" in p.read_text()]  # the demos


@pytest.mark.parametrize("path", [p for p in CONFIGS if p not in CPU_CONFIGS], ids=lambda p: p.name)
def test_gpu_config_fits_the_gpus_it_names(path, tmp_path):
    text = path.read_text()
    match = GPUS_RE.search(text)
    assert match and match.group(2), "a GPU config says '# gpus: N x MGiB'"
    count, per_gpu = int(match.group(1)), int(match.group(2))
    data = load(path)
    for _, model in models_of(data["engine"]):
        cfg, _ = KNOWN_MODELS[model["path"]]
        local = tmp_path / model["path"].replace("/", "--")
        local.mkdir(exist_ok=True)
        (local / "config.json").write_text(json.dumps(cfg))
        (local / "model.safetensors").write_bytes(b"")
        model["path"] = str(local)
        if model.get("prompt_format") == "chat":
            model["chat_template"] = "{{ messages }}"  # the real tokenizers ship one; the fake dirs do not
    plan = plan_placement(
        EngineConfig.model_validate(data["engine"]), device_count=count,
        gpu_memory={i: per_gpu * GiB for i in range(count)},
    )
    assert plan.errors == []
    assert plan.warnings == []  # weights and KV at the configured limits both fit
    used = {d for m in plan.models for d in m.devices}
    assert used == {f"cuda:{i}" for i in range(count)}, "the config uses exactly the GPUs it asks for"
    # the sizes stated in the comments are the estimator's
    stated = SIZE_RE.findall(text)
    assert len(stated) == len(plan.models)
    for (role, params_e9, bytes_per, gib), model_plan in zip(stated, plan.models):
        assert model_plan.role.startswith(role)
        assert float(params_e9) == pytest.approx(model_plan.memory.parameters / 1e9, abs=0.006)
        assert int(bytes_per) == 2
        assert float(gib) == pytest.approx(model_plan.memory.weight_bytes / GiB, abs=0.06)


def test_demo_config_runs_on_the_cpu_with_a_chat_expert(tiny_family):
    data = load(REPO / "configs" / "demo-cpu.yaml")
    assert GPUS_RE.search((REPO / "configs" / "demo-cpu.yaml").read_text()).group(1) == "0"
    engine = data["engine"]
    assert [m["path"] for _, m in models_of(engine)] == [
        "demo/models/base", "demo/models/expert", "demo/models/anti_expert"]
    assert [m.get("prompt_format", "plain") for _, m in models_of(engine)] == ["plain", "chat", "plain"]
    assert all(m.get("device", "cpu") == "cpu" for _, m in models_of(engine))
    # the same shape of family (a chat-template expert) plans cleanly on the CPU
    for (_, model), path in zip(models_of(engine), (tiny_family.base, tiny_family.expert, tiny_family.anti_expert)):
        model["path"] = str(path)
    plan = plan_placement(EngineConfig.model_validate(engine), device_count=0)
    assert plan.ok, plan.errors


def test_demo_family_is_in_the_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the demo paths are relative to the repository root (/app in the image)
    roles = ("base", "expert", "anti_expert")
    missing = [p for p in roles if not (REPO / "demo" / "models" / p / "config.json").exists()]
    if missing:
        pytest.skip(f"demo/models/{{{','.join(missing)}}} not committed yet (scripts/train_demo.py writes them)")
    plan = plan_placement(EngineConfig.model_validate(load(REPO / "configs" / "demo-cpu.yaml")["engine"]),
                          device_count=0)
    assert plan.ok, plan.errors
