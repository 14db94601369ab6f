"""What only a GPU can show: seeded sampling with generators on CUDA, models on two devices (the host reading a
device's logits, devices overlapping), CUDA graphs against eager decoding. The GPU tests are skipped without
CUDA (tests/conftest.py says why); ``test_models_on_the_cpu_match_the_reference`` runs the same body with every
model on the CPU, so the reference arithmetic is checked in every ``make test``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from proxy_engine.config import RuntimeConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.request import PromptInput, SamplingParams
from tests.conformance.conftest import engine_config
from tests.conformance.families import LLAMA3_TEMPLATE, SPECS, build, llama3_tokenizer
from tests.conformance.reference import NaiveProxy, per_model_prompts

gpu = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _run(engine: ProxyEngine, requests: dict[str, SamplingParams]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for request_id, params in requests.items():
        engine.add(engine.make_sequences(request_id, PromptInput(text=f"The capital of {request_id} is"), params))
    while engine.has_work():
        for output in engine.step():
            assert output.error is None, output.error
            out.setdefault(output.request_id, []).extend(output.new_token_ids)
    return out


def _engine(family, devices: list[str], runtime: RuntimeConfig | None = None) -> ProxyEngine:
    config = engine_config(family, max_num_seqs=8, max_model_len=256)
    config.base.device = devices[0]
    config.experts[0].expert.device = devices[1]
    config.experts[0].anti_expert.device = devices[2]
    if runtime is not None:
        config.runtime = runtime
    return ProxyEngine(load_models(config), config)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # Llama-3's family: a byte-level tokenizer (the GPU image has ``tokenizers`` but not ``sentencepiece``) and a
    # chat expert, so each model sees its own rendering of the prompt.
    return build("llama3", tmp_path_factory.mktemp("gpu") / "llama3")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    # Qwen3's per-head query / key norms in the static step (byte-level tokenizer too).
    return build("qwen3", tmp_path_factory.mktemp("gpu") / "qwen3")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    # Gemma-3's decoder (offset and sandwich norms, local + global layers with their own RoPE, a binding window)
    # in the static step; with Llama-3's byte-level tokenizer, which the GPU image can build (no sentencepiece).
    spec = replace(SPECS["gemma3"], name="gemma3-bpe", tokenizer=llama3_tokenizer, expert_template=LLAMA3_TEMPLATE,
                   end_tokens=["<|end_of_text|>", "<|eot_id|>"])
    return build(spec, tmp_path_factory.mktemp("gpu") / "gemma3")


def _matches_the_reference(family, devices: list[str]) -> None:
    """Greedy proxy-tuned tokens at two alphas equal the naive reference's, each model fed its own rendering
    of the prompt (the family's expert sees its chat template)."""
    engine = _engine(family, devices)
    got = _run(engine, {"France": GREEDY, "Germany": SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                                   alpha=0.5)})
    naive = NaiveProxy(family.paths(), engine.vocab_size)
    tokenizers = [m.tokenizer for m in engine.models]
    for request_id, alpha in (("France", 1.0), ("Germany", 0.5)):
        prompts = per_model_prompts(family, tokenizers, f"The capital of {request_id} is", None)
        expected, _ = naive.greedy(prompts, [1.0, alpha, -alpha], 10)
        assert got[request_id] == expected, (request_id, devices)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_models_on_the_cpu_match_the_reference(name, request):
    _matches_the_reference(request.getfixturevalue(name), ["cpu", "cpu", "cpu"])


@gpu
@pytest.mark.parametrize("devices", [["cuda:0"] * 3, ["cpu", "cuda:0", "cuda:0"], ["cuda:0", "cpu", "cpu"],
                                     ["cuda:0", "cuda:1", "cuda:1"]])
def test_models_on_devices_match_the_reference(llama, devices):
    if "cuda:1" in devices and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _matches_the_reference(llama, devices)


@gpu
def test_seeded_sampling_on_cuda_is_reproducible_and_batch_invariant(llama):
    engine = _engine(llama, ["cuda:0"] * 3)
    assert engine.running == [] and engine.device.type == "cuda"
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = _run(engine, {"France": sampled})
    crowd = _run(engine, {"France": sampled, **{f"x{i}": SamplingParams(max_tokens=12, temperature=1.0,
                                                                          ignore_eos=True) for i in range(5)}})
    assert alone["France"] == crowd["France"] and len(alone["France"]) == 12


@gpu
@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_other_families_on_cuda_match_the_reference(name, request):
    _matches_the_reference(request.getfixturevalue(name), ["cuda:0"] * 3)


@gpu
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_cuda_graphs_decode_as_eager_does(name, request):
    """The CUDA executor captures graphs at start-up; greedy and seeded requests give the same tokens with and
    without them (--enforce-eager), at batch sizes that fall in different buckets (rows padded)."""
    family = request.getfixturevalue(name)
    graphed = _engine(family, ["cuda:0"] * 3)
    eager = _engine(family, ["cuda:0"] * 3, RuntimeConfig(enforce_eager=True))
    assert all(r.executor == "static" for r in graphed.runners + eager.runners)
    assert all(r._static.graphed for r in graphed.runners)
    assert not any(r._static.graphed for r in eager.runners)
    requests = {"France": GREEDY, "Spain": SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True),
                **{f"c{i}": SamplingParams(max_tokens=6 + i, temperature=0.0, ignore_eos=True, alpha=0.5)
                   for i in range(3)}}
    assert _run(graphed, requests) == _run(eager, requests)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graphs_with_the_pair_on_a_second_gpu(llama):
    graphed = _engine(llama, ["cuda:0", "cuda:1", "cuda:1"])
    eager = _engine(llama, ["cuda:0", "cuda:1", "cuda:1"], RuntimeConfig(enforce_eager=True))
    assert all(r._static.graphed for r in graphed.runners)
    assert _run(graphed, {"France": GREEDY}) == _run(eager, {"France": GREEDY})
