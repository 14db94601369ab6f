"""``--device`` puts every model on one device (vLLM's flag); ``--enforce-eager`` (and its variable) turns CUDA
graphs off; the executor each model gets follows its device and these knobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy_engine.config import RuntimeConfig
from proxy_engine.executor import choose_executor
from proxy_engine.executor.static_cache import SlotPlan
from server.cli import resolve_settings
from server.settings import ConfigError
from tests.engine.test_kv_cache import _random_model

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml")


def _devices(settings) -> list:
    engine = settings.engine
    return [engine.base.device] + [m.device for p in engine.experts for m in (p.expert, p.anti_expert)]


def test_one_flag_puts_every_model_on_the_device():
    settings, _ = resolve_settings(["--config", DEMO, "--device", "cuda"])
    assert _devices(settings) == ["cuda", "cuda", "cuda"]  # the file said cpu for each
    settings, _ = resolve_settings(["--device", "cuda:0"])  # the built-in demo, no file
    assert _devices(settings) == ["cuda:0", "cuda:0", "cuda:0"]


def test_a_per_model_device_flag_still_wins_for_its_model():
    settings, _ = resolve_settings(["--config", DEMO, "--device", "cuda:0", "--expert-device", "cuda:1",
                                    "--anti-expert-device", "cuda:1"])
    assert _devices(settings) == ["cuda:0", "cuda:1", "cuda:1"]


def test_a_bad_device_is_one_line_naming_the_flag():
    with pytest.raises(ConfigError, match="--device tpu"):
        resolve_settings(["--config", DEMO, "--device", "tpu"])


def test_enforce_eager_flag_and_variable(monkeypatch):
    settings, _ = resolve_settings(["--config", DEMO])
    assert settings.engine.runtime.enforce_eager is False
    settings, _ = resolve_settings(["--config", DEMO, "--enforce-eager"])
    assert settings.engine.runtime.enforce_eager is True
    monkeypatch.setenv("PROXY_SERVE_ENFORCE_EAGER", "1")
    assert RuntimeConfig().enforce_eager is True
    monkeypatch.setenv("PROXY_SERVE_DECODE_EXECUTOR", "transformers")
    assert RuntimeConfig().decode_executor == "transformers"


def test_executor_selection_follows_device_and_knobs():
    import torch

    model = _random_model("llama")
    plan = SlotPlan(2, 64, 0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_executor(model, cpu, RuntimeConfig(), plan) == "fast"  # the CPU backend
    assert choose_executor(model, cuda, RuntimeConfig(), plan) == "static"  # the CUDA backend (graphs)
    assert choose_executor(model, cuda, RuntimeConfig(enforce_eager=True), plan) == "static"  # same step, eager
    assert choose_executor(model, cuda, RuntimeConfig(), None) == "fast"  # no memory for static buffers
    assert choose_executor(model, cpu, RuntimeConfig(decode_executor="static"), plan) == "static"
    assert choose_executor(model, cuda, RuntimeConfig(fast_decode=False), plan) == "transformers"
    assert choose_executor(model, cuda, RuntimeConfig(decode_executor="transformers"), plan) == "transformers"
    model.config.layer_types = ["full_attention", "chunked_attention"]  # neither decoder knows it: the fallback
    assert choose_executor(model, cuda, RuntimeConfig(), plan) == "transformers"
