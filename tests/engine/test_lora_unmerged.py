"""A LoRA expert served unmerged over its anti-expert's module (proxy_engine/lora.py): one copy of the small model,
and the expert's and anti-expert's rows through each projection together (or, under the static step, the terms
inside that step). It must serve what the merged copy
(``lora_mode: merged``, adapter.py) serves: the same tokens and text, greedy and seeded, on the fast step and on
transformers' forward, for the expert alone, a chat-format expert (its rows at other positions than the
anti-expert's), two LoRA experts over one anti-expert, and with the prefix cache. Adapters whose math it does not
implement are merged instead, naming why."""

from __future__ import annotations

import logging

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from proxy_engine.config import EngineConfig
from proxy_engine.engine import ProxyEngine, _decode_batches
from proxy_engine.loader import load_models
from proxy_engine.request import Target
from tests.engine.conftest import run_to_end, submit
from tests.engine.test_adapter import TARGETS, _save_lora

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PROMPTS = ["Hello there", "The city of", "Once upon a time, in a land far away"]


@pytest.fixture(scope="module")
def lora(tiny_family, tmp_path_factory):
    return _save_lora(tiny_family.anti_expert, tmp_path_factory.mktemp("lora"))


def _config(family, adapters: list, *, merge: bool = False, fast: bool = True, **expert_fields) -> EngineConfig:
    anti = {"path": str(family.anti_expert)}
    return EngineConfig(
        base={"path": str(family.base)},
        experts=[{"expert": {"path": str(adapter), **expert_fields}, "anti_expert": anti, "alpha": 1.0 + k / 2}
                 for k, adapter in enumerate(adapters)],
        runtime={"lora_mode": "merged" if merge else "auto", "fast_decode": fast})


def _serve(config: EngineConfig, target=Target.PROXY, **params) -> tuple[dict, list[torch.Tensor]]:
    engine = ProxyEngine(load_models(config), config)
    seen: list[torch.Tensor] = []
    engine.logits_hook = lambda sequences, combined: seen.append(combined.clone())
    for k, prompt in enumerate(PROMPTS):
        submit(engine, f"r{k}", prompt, target, max_tokens=10, ignore_eos=True, **params)
    results = {key: (entry["tokens"], entry["text"]) for key, entry in run_to_end(engine).items()}
    return results, seen


def _same(config: EngineConfig, merged: EngineConfig, target=Target.PROXY, **params) -> None:
    got, got_logits = _serve(config, target, **params)
    expected, expected_logits = _serve(merged, target, **params)
    assert got == expected
    for a, b in zip(got_logits, expected_logits, strict=True):  # W x + B (A x) against (W + B A) x: rounding only
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_expert_runs_over_the_anti_experts_module_and_decodes_with_it(tiny_family, lora):
    models = load_models(_config(tiny_family, [lora]))
    expert, anti = models[1], models[2]
    assert expert.adapter is not None and anti.adapter is None and expert.model is anti.model
    assert len(expert.adapter.terms) == len(TARGETS) * expert.model.config.num_hidden_layers
    config = _config(tiny_family, [lora])
    engine = ProxyEngine(models, config)
    assert engine.runners[1].fast is engine.runners[2].fast is not None
    submit(engine, "r", "Hello", max_tokens=3, ignore_eos=True)
    engine.step()
    assert _decode_batches(engine.runners) == [[0], [1, 2]]  # one pass for the expert's and anti-expert's rows


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=11)],
                         ids=["greedy", "seeded"])
def test_unmerged_serves_what_the_merged_copy_serves(tiny_family, lora, params):
    _same(_config(tiny_family, [lora]), _config(tiny_family, [lora], merge=True), **params)


def test_on_transformers_forward_too(tiny_family, lora):
    """No fast step: the terms come from forward hooks, on while the expert's runner runs."""
    _same(_config(tiny_family, [lora], fast=False), _config(tiny_family, [lora], merge=True), temperature=0)


def test_the_expert_alone(tiny_family, lora):
    _same(_config(tiny_family, [lora]), _config(tiny_family, [lora], merge=True), Target.EXPERT, temperature=0)


def test_a_chat_format_expert_whose_rows_sit_elsewhere_than_the_anti_experts(chat_family, tmp_path):
    adapter = _save_lora(chat_family.anti_expert, tmp_path / "chat-lora", seed=5, with_tokenizer=True)
    _same(_config(chat_family, [adapter], prompt_format="chat"),
          _config(chat_family, [adapter], merge=True, prompt_format="chat"), temperature=0)


def test_two_lora_experts_over_one_anti_expert(tiny_family, lora, tmp_path):
    second = _save_lora(tiny_family.anti_expert, tmp_path / "second", rank=2, alpha=4, seed=7)
    config = _config(tiny_family, [lora, second])
    models = load_models(config)
    assert len(models) == 4 and models[1].model is models[2].model is models[3].model  # base, 2 experts, anti
    _same(config, _config(tiny_family, [lora, second], merge=True), temperature=0)


def test_with_the_prefix_cache_warm(tiny_family, lora):
    """The expert's K/V is its own (its prefix cache too): a repeated prompt served from cached blocks still
    gives the merged copy's tokens."""
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)

    def twice(config: EngineConfig) -> list:
        engine = ProxyEngine(load_models(config), config)
        answers = []
        for k in range(2):
            submit(engine, f"r{k}", long_prompt, max_tokens=8, temperature=0, ignore_eos=True)
            answers.append(run_to_end(engine)[(f"r{k}", 0)]["tokens"])
        assert engine.runners[1].prefix_cache.hits_total > 0
        return answers

    unmerged = twice(_config(tiny_family, [lora]))
    assert unmerged == twice(_config(tiny_family, [lora], merge=True)) and unmerged[0] == unmerged[1]


def test_adapters_it_cannot_serve_unmerged_are_merged_naming_why(tiny_family, tmp_path, caplog):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_family.anti_expert)
    dora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS,
                                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in dora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    dora.save_pretrained(tmp_path / "dora")
    head = _save_lora(tiny_family.anti_expert, tmp_path / "head")
    # A term on the output head (no fused projection of the fast step): written into the saved file by hand.
    from safetensors.torch import load_file, save_file

    weights = load_file(head / "adapter_model.safetensors")
    weights["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, model.config.hidden_size)
    weights["base_model.model.lm_head.lora_B.weight"] = torch.zeros(model.config.vocab_size, 4)
    save_file(weights, head / "adapter_model.safetensors")
    with caplog.at_level(logging.INFO, logger="proxy_engine.loader"):
        for adapter, why in ((tmp_path / "dora", "it sets use_dora"), (head, "lm_head")):
            models = load_models(_config(tiny_family, [adapter]))
            assert models[1].adapter is None and models[1].model is not models[2].model
            assert any("is merged into a copy" in r.getMessage() and why in r.getMessage() for r in caplog.records)
        models = load_models(_config(tiny_family, [tmp_path / "dora"], merge=True))
        assert models[1].adapter is None
        assert any("lora_mode is merged" in r.getMessage() for r in caplog.records)


def test_under_the_static_step_auto_merges_and_unmerged_adds_the_terms_in_the_step(tiny_family, lora, caplog):
    """The static (CUDA-graph) step runs each model in its own graph: ``auto`` merges there (unmerged would save
    memory, not a read); ``unmerged`` adds the terms inside the step (run eagerly here, as on the CPU it is) and
    serves the merged copy's tokens."""
    def static(mode: str) -> EngineConfig:
        config = _config(tiny_family, [lora])
        config.runtime.decode_executor = "static"
        config.runtime.lora_mode = mode
        return config

    with caplog.at_level(logging.INFO, logger="proxy_engine.loader"):
        assert load_models(static("auto"))[1].adapter is None
    assert any("static CUDA-graph step" in r.getMessage() for r in caplog.records)
    models = load_models(static("unmerged"))
    assert models[1].adapter is not None and models[1].model is models[2].model
    engine = ProxyEngine(models, static("unmerged"))
    assert engine.runners[1].executor == engine.runners[2].executor == "static"
    assert engine.runners[1]._static.decoder.qkv[0][0] is engine.runners[2]._static.decoder.qkv[0][0]  # one copy
    _same(static("unmerged"), static("merged"), temperature=0)


def test_the_plan_counts_the_adapter_not_a_copy(tiny_family, lora):
    import io

    from proxy_engine.placement import plan_placement
    from server.check import format_plan

    unmerged = plan_placement(_config(tiny_family, [lora]), device_count=0)
    merged = plan_placement(_config(tiny_family, [lora], merge=True), device_count=0)
    expert, anti = unmerged.models[1], unmerged.models[2]
    assert expert.unmerged_over == "anti_expert_0" and merged.models[1].unmerged_over is None
    assert expert.weight_bytes == (lora / "adapter_model.safetensors").stat().st_size < anti.weight_bytes
    assert merged.models[1].weight_bytes == anti.weight_bytes
    assert expert.memory.kv_bytes_per_token == anti.memory.kv_bytes_per_token  # its own K/V all the same
    out = io.StringIO()
    out.write(format_plan(unmerged))
    assert f"+ adapter {lora} (unmerged over anti_expert_0)" in out.getvalue()
