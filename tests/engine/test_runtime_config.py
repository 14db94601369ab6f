"""RuntimeConfig: the engine's process-level knobs, from the config or their PROXY_SERVE_* variables."""

from __future__ import annotations

import io
import json

import pytest
from pydantic import ValidationError

from proxy_engine.config import (
    CPU_THREADS_ENV,
    ENGINE_PROCESS_ENV,
    FAST_DECODE_ENV,
    PACKED_WEIGHTS_ENV,
    EngineConfig,
    ModelConfig,
    RuntimeConfig,
)
from proxy_engine.cpu_tuning import cpu_threads


@pytest.fixture(autouse=True)
def _no_knobs_set(monkeypatch):
    for name in (CPU_THREADS_ENV, FAST_DECODE_ENV, PACKED_WEIGHTS_ENV, ENGINE_PROCESS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_and_values_from_the_config():
    assert RuntimeConfig() == RuntimeConfig(cpu_threads=None, fast_decode=True, packed_weights=None,
                                            engine_process=True)
    assert RuntimeConfig(cpu_threads=3, fast_decode=False).cpu_threads == 3


def test_the_environment_sets_and_wins(monkeypatch):
    monkeypatch.setenv(CPU_THREADS_ENV, "2")
    monkeypatch.setenv(FAST_DECODE_ENV, "0")
    monkeypatch.setenv(PACKED_WEIGHTS_ENV, "1")
    runtime = EngineConfig(base=ModelConfig(path="m"), runtime={"cpu_threads": 7}).runtime
    assert (runtime.cpu_threads, runtime.fast_decode, runtime.packed_weights) == (2, False, True)
    monkeypatch.setenv(ENGINE_PROCESS_ENV, "1")
    assert RuntimeConfig(engine_process=False).engine_process is True


def test_a_bad_variable_names_the_field(monkeypatch):
    monkeypatch.setenv(CPU_THREADS_ENV, "many")
    with pytest.raises(ValidationError, match="cpu_threads"):
        RuntimeConfig()


def test_cpu_threads_policy(monkeypatch):
    assert cpu_threads(RuntimeConfig(cpu_threads=3)) == 3
    assert cpu_threads(RuntimeConfig()) >= 1  # one core fewer than this process may use, at least one
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert cpu_threads(RuntimeConfig()) is None  # the deployer's OpenMP setting is left alone


def test_check_shows_the_knobs(tiny_family):
    from server.check import check
    from server.settings import ServerSettings

    out = io.StringIO()
    settings = ServerSettings(engine=EngineConfig(base=ModelConfig(path=str(tiny_family.base)),
                                                  runtime={"cpu_threads": 1}))
    assert check(settings, out=out, err=io.StringIO()) == 0
    shown = json.loads(out.getvalue()[: out.getvalue().index("\n}\n") + 2])  # the settings, then the plan
    assert shown["engine"]["runtime"] == {"cpu_threads": 1, "fast_decode": True, "packed_weights": None,
                                         "engine_process": True, "enforce_eager": False, "decode_executor": "auto",
                                         "lora_mode": "auto", "gpu_memory_utilization": None, "kv_cache_memory": None}
