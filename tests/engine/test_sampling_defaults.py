"""Default sampling parameters from generation_config.json (vLLM's --generation-config): what a file recommends,
and which file each model id reads under auto, vllm / none, and a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy_engine.config import EngineConfig
from proxy_engine.request import Serves, Target, served_targets
from proxy_engine.sampling_defaults import describe, from_generation_config, sampling_defaults
from server.demo import default_engine_config


def test_a_files_recommendations_are_the_sampler_fields_it_sets():
    llama2_chat = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096, "eos_token_id": 2}
    assert from_generation_config(llama2_chat) == {"temperature": 0.6, "top_p": 0.9}
    qwen_instruct = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                     "min_p": 0.05, "max_new_tokens": 512}
    assert from_generation_config(qwen_instruct) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                     "repetition_penalty": 1.05, "min_p": 0.05, "max_tokens": 512}


def test_transformers_own_defaults_and_odd_values_recommend_nothing():
    assert from_generation_config({"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}) == {}
    assert from_generation_config({"eos_token_id": [0, 5], "pad_token_id": 1}) == {}
    assert from_generation_config({"temperature": "hot", "top_k": True, "top_p": None}) == {}


def test_do_sample_false_written_in_the_file_is_greedy():
    """transformers' generate decodes that file greedily; so do the server's defaults (vLLM ignores do_sample)."""
    assert from_generation_config({"do_sample": False}) == {"temperature": 0.0}
    assert from_generation_config({"do_sample": False, "temperature": 0.7, "max_new_tokens": 9}) == {
        "temperature": 0.0, "max_tokens": 9}
    assert from_generation_config({"do_sample": True}) == {}


def _model(root: Path, name: str, generation: dict | None) -> str:
    directory = root / name
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return str(directory)


def _engine(tmp_path: Path, generation_config: str = "auto", experts: bool = True) -> EngineConfig:
    base = _model(tmp_path, "base", {"do_sample": False, "max_new_tokens": 2048})
    pair = [{"expert": {"path": _model(tmp_path, "expert", {"temperature": 0.6, "top_p": 0.9})},
             "anti_expert": {"path": _model(tmp_path, "anti", {"temperature": 0.1})}}] if experts else []
    return EngineConfig(base={"path": base}, experts=pair, generation_config=generation_config)


def test_auto_reads_the_experts_file_for_the_proxy_tuned_model_and_the_bases_for_base(tmp_path):
    defaults = sampling_defaults(_engine(tmp_path))
    tuned = {"temperature": 0.6, "top_p": 0.9}
    assert defaults[Target.PROXY].values == tuned and defaults[Target.EXPERT].values == tuned
    assert defaults[Target.BASE].values == {"temperature": 0.0, "max_tokens": 2048}
    assert defaults[Target.PROXY].source == str(tmp_path / "expert" / "generation_config.json")
    lines = describe(defaults, {Target.PROXY: "proxy-tuned", Target.BASE: "proxy-tuned:base"})
    assert lines == [f"proxy-tuned: temperature=0.6, top_p=0.9 (from {tmp_path}/expert/generation_config.json)",
                     f"proxy-tuned:base: max_tokens=2048, temperature=0.0 (from {tmp_path}/base/"
                     "generation_config.json)"]


def test_auto_without_an_expert_pair_reads_the_base_for_every_id(tmp_path):
    defaults = sampling_defaults(_engine(tmp_path, experts=False))
    assert {t: d.values for t, d in defaults.items()} == {t: {"temperature": 0.0, "max_tokens": 2048}
                                                          for t in (Target.PROXY, Target.BASE)}


def test_a_model_without_the_file_or_not_on_disk_has_no_defaults(tmp_path):
    config = EngineConfig(base={"path": _model(tmp_path, "bare", None)},
                          experts=[{"expert": {"path": "org/not-cached"}, "anti_expert": {"path": "org/x"}}])
    assert all(not d.values and d.source is None for d in sampling_defaults(config).values())


@pytest.mark.parametrize("off", ["vllm", "none"])
def test_vllm_or_none_turns_the_defaults_off(tmp_path, off):
    assert all(not d.values for d in sampling_defaults(_engine(tmp_path, off)).values())


def test_a_folder_gives_every_id_its_file(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"top_k": 5, "min_p": 0.1}))
    config = _engine(tmp_path, str(folder))
    defaults = sampling_defaults(config)
    assert {t: d.values for t, d in defaults.items()} == {t: {"top_k": 5, "min_p": 0.1} for t in served_targets(config)}


def test_a_folder_without_the_file_is_a_configuration_error(tmp_path):
    with pytest.raises(ValidationError, match="not a folder holding a generation_config.json"):
        EngineConfig(base={"path": "b"}, generation_config=str(tmp_path))


def test_the_demo_family_decodes_greedily_by_default():
    """The demo ships its own files: a frontend that sends no temperature gets the answers `make eval` scored."""
    config = EngineConfig(**default_engine_config())  # what `make serve` serves
    defaults = sampling_defaults(config)
    assert {t: d.values for t, d in defaults.items()} == {t: {"temperature": 0.0} for t in served_targets(config)}


def test_a_named_pairs_ids_read_that_pairs_expert(tmp_path):
    """NAME:PAIR and NAME:PAIR:expert answer as that pair's expert recommends; NAME keeps the first pair's."""
    base = _model(tmp_path, "base", {"do_sample": False})
    pairs = [{"expert": {"path": _model(tmp_path, f"expert{i}", {"temperature": t})},
              "anti_expert": {"path": _model(tmp_path, f"anti{i}", None)}, "name": name}
             for i, (name, t) in enumerate([("chat", 0.6), ("code", 0.2)])]
    config = EngineConfig(base={"path": base}, experts=pairs)
    defaults = {target: d.values.get("temperature") for target, d in sampling_defaults(config).items()}
    assert defaults == {Target.PROXY: 0.6, Target.BASE: 0.0, Target.EXPERT: 0.6,
                        Target(Serves.PROXY, 0): 0.6, Target(Serves.EXPERT, 0): 0.6,
                        Target(Serves.PROXY, 1): 0.2, Target(Serves.EXPERT, 1): 0.2}
