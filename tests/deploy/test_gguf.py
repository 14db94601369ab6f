"""GGUF files as a model source: found as a file, a directory holding one, or ``gguf_file`` in a directory; sized
from the header at the dequantized dtype without loading weights; loaded (float32 on the CPU) with the tokenizer
from the file's metadata, which round-trips text exactly; a clear error naming the extra without ``gguf``."""

from __future__ import annotations

import io
import shutil

import pytest
import torch

from proxy_engine import gguf_files
from proxy_engine.config import EngineConfig, ExpertPairConfig, ModelConfig
from proxy_engine.gguf_files import find_gguf, read_header
from proxy_engine.loader import from_pretrained_kwargs, load_models, load_tokenizer
from proxy_engine.model_files import locate
from proxy_engine.placement import plan_placement
from server.check import check
from server.cli import resolve_settings


@pytest.fixture(scope="module")
def family(gguf_family):
    return gguf_family


def _config(family, **base) -> EngineConfig:
    return EngineConfig(
        base=ModelConfig(path=str(family.base), **base),
        experts=[ExpertPairConfig(expert=ModelConfig(path=str(family.expert), prompt_format="chat"),
                                  anti_expert=ModelConfig(path=str(family.anti_expert)))],
    )


def test_found_as_a_file_a_directory_or_by_name(family, tmp_path):
    assert find_gguf(str(family.base)) == (family.base, None)
    assert find_gguf(str(family.base.parent)) == (family.base, None)
    assert find_gguf(str(family.anti_expert)) == (None, None)  # a transformers directory is not a GGUF source
    assert locate(ModelConfig(path=str(family.expert)))[:2] == ("gguf", family.expert)
    several = tmp_path / "several"
    several.mkdir()
    for name in ("m.Q4_1.gguf", "m.Q8_0.gguf"):
        shutil.copy(family.base, several / name)
    location, _, error = locate(ModelConfig(path=str(several)))
    assert location == "missing" and "2 GGUF files" in error and "gguf_file" in error
    assert locate(ModelConfig(path=str(several), gguf_file="m.Q8_0.gguf"))[0] == "gguf"
    assert "no file 'nope.gguf'" in locate(ModelConfig(path=str(several), gguf_file="nope.gguf"))[2]


def test_header_gives_the_config_and_exact_counts(family):
    header = read_header(family.base)
    config = family.base_config
    assert header.parameters == family.base_parameters  # every tensor, Q8_0 blocks counted as their elements
    assert header.config["model_type"] == "llama"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "max_position_embeddings", "intermediate_size"):
        assert header.config[key] == getattr(config, key), key
    assert header.config["tie_word_embeddings"] is False
    assert header.chat_template is None and read_header(family.expert / "tiny-expert.Q8_0.gguf").chat_template


@pytest.mark.parametrize("dtype,width", [("auto", 4), ("float32", 4), ("bfloat16", 2)])
def test_placement_counts_the_dequantized_size(family, dtype, width):
    plan = plan_placement(_config(family, dtype=dtype), device_count=0)
    assert plan.ok, plan.errors
    base = plan.models[0]
    assert base.location == "gguf" and base.resolved_path == str(family.base)
    assert base.memory.source == "gguf" and base.dtype == ("float32" if dtype == "auto" else dtype)
    assert base.memory.weight_bytes == family.base_parameters * width  # not the file's Q8_0 bytes
    from gguf import GGUFReader

    stored = sum(int(t.n_bytes) for t in GGUFReader(family.base).tensors)  # Q8_0 blocks: ~1.06 bytes a weight
    assert width == 2 or base.memory.weight_bytes > stored
    config = family.base_config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_width = config.num_key_value_heads * head_dim
    assert base.memory.kv_bytes_per_token == 2 * config.num_hidden_layers * kv_width * width
    assert base.vocab_size == config.vocab_size and base.context_length == 256
    assert base.architecture == "llama (GGUF)"


def test_placement_refuses_bitsandbytes_on_gguf_and_a_bad_file(family, tmp_path):
    plan = plan_placement(_config(family, quantization="8bit"), device_count=0)
    assert any("does not apply to a GGUF file" in e for e in plan.errors)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    plan = plan_placement(EngineConfig(base=ModelConfig(path=str(bad))), device_count=0)
    assert not plan.ok and "not a readable GGUF file" in plan.first_error


def test_missing_extra_names_it(family, monkeypatch):
    monkeypatch.setattr(gguf_files, "gguf_available", lambda: False)
    plan = plan_placement(_config(family), device_count=0)
    assert "pip install 'proxy-serve[gguf]'" in plan.first_error
    with pytest.raises(ImportError, match=r"proxy-serve\[gguf\]"):
        load_tokenizer(ModelConfig(path=str(family.base)))


def test_check_from_flags_sizes_it_without_loading(family, monkeypatch):
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("--check loaded weights"))
    settings, _ = resolve_settings(["--check", "--base", str(family.base), "--expert", str(family.expert),
                                    "--anti-expert", str(family.anti_expert)])
    out, err = io.StringIO(), io.StringIO()
    assert check(settings, out=out, err=err) == 0, err.getvalue()
    table = out.getvalue()
    assert "gguf" in table and "placement OK" in table and str(family.base) in table


def test_yaml_gguf_file_key(family, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"engine:\n  base:\n    path: {family.base.parent}\n    gguf_file: {family.base.name}\n")
    settings, _ = resolve_settings(["--config", str(config)])
    assert settings.engine.base.gguf_file == family.base.name
    assert plan_placement(settings.engine, device_count=0).models[0].location == "gguf"


def test_loads_float32_with_the_files_tokenizer(family):
    kwargs = from_pretrained_kwargs(ModelConfig(path=str(family.base)))
    assert kwargs["gguf_file"] == family.base.name and kwargs["dtype"] is torch.float32 and "revision" not in kwargs
    assert from_pretrained_kwargs(ModelConfig(path=str(family.base), dtype="bfloat16"))["dtype"] is torch.bfloat16
    models = load_models(_config(family))
    assert [m.role for m in models] == ["base", "expert", "anti_expert"]
    base = models[0]
    assert next(base.model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in base.model.parameters()) == family.base_parameters
    assert base.max_len == 256 and base.vocab_size == family.base_config.vocab_size
    assert models[1].renderer.chat_template  # from the expert file's metadata
    for text in ["The quick brown fox", "  two spaces\n\ttab", "Café, naïve, 東京 🙂🚀", "<|im_end|> after"]:
        for model in models:
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            assert model.tokenizer.decode(ids) == text
        assert len({tuple(m.tokenizer(text)["input_ids"]) for m in models}) == 1  # one vocabulary


def test_a_tokenizer_path_wins_over_the_files(family):
    tokenizer = load_tokenizer(ModelConfig(path=str(family.base), tokenizer=str(family.anti_expert)))
    assert tokenizer.chat_template is None  # the anti-expert's directory has none; the GGUF's would have a name
    assert tokenizer.name_or_path == str(family.anti_expert)
