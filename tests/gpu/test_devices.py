"""What only a GPU can show: seeded sampling with generators on CUDA, models on two devices (the host reading a
device's logits, devices overlapping). Skipped without CUDA (tests/conftest.py says why)."""

from __future__ import annotations

import pytest
import torch

from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.request import PromptInput, SamplingParams
from tests.conformance.conftest import engine_config
from tests.conformance.families import build
from tests.conformance.reference import NaiveProxy

pytestmark = pytest.mark.gpu


def _run(engine: ProxyEngine, requests: dict[str, SamplingParams]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for request_id, params in requests.items():
        engine.add(engine.make_sequences(request_id, PromptInput(text=f"The capital of {request_id} is"), params))
    while engine.has_work():
        for output in engine.step():
            assert output.error is None, output.error
            out.setdefault(output.request_id, []).extend(output.new_token_ids)
    return out


def _engine(family, devices: list[str]) -> ProxyEngine:
    config = engine_config(family)
    config.base.device = devices[0]
    config.experts[0].expert.device = devices[1]
    config.experts[0].anti_expert.device = devices[2]
    return ProxyEngine(load_models(config), config)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build("llama2", tmp_path_factory.mktemp("gpu") / "llama2")


def test_seeded_sampling_on_cuda_is_reproducible_and_batch_invariant(llama):
    engine = _engine(llama, ["cuda:0"] * 3)
    assert engine.running == [] and engine.device.type == "cuda"
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = _run(engine, {"France": sampled})
    crowd = _run(engine, {"France": sampled, **{f"x{i}": SamplingParams(max_tokens=12, temperature=1.0,
                                                                          ignore_eos=True) for i in range(5)}})
    assert alone["France"] == crowd["France"] and len(alone["France"]) == 12


@pytest.mark.parametrize("devices", [["cpu", "cuda:0", "cuda:0"], ["cuda:0", "cpu", "cpu"],
                                     ["cuda:0", "cuda:1", "cuda:1"]])
def test_models_on_two_devices_match_the_reference(llama, devices):
    if "cuda:1" in devices and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    engine = _engine(llama, devices)
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    got = _run(engine, {"France": greedy, "Germany": SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                                   alpha=0.5)})
    naive = NaiveProxy(llama.paths(), engine.vocab_size)
    for request_id, alpha in (("France", 1.0), ("Germany", 0.5)):
        prompt = engine.models[0].tokenizer(f"The capital of {request_id} is")["input_ids"]
        expected, _ = naive.greedy([prompt, prompt, prompt], [1.0, alpha, -alpha], 10)
        assert got[request_id] == expected
