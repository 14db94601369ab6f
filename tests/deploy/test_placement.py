"""Placement: device maps for every device form, memory estimates against real models, one-line errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from proxy_engine import loader, placement
from proxy_engine.config import EngineConfig, ModelConfig
from proxy_engine.loader import from_pretrained_kwargs, input_device
from proxy_engine.memory import GiB, count_parameters, estimate_memory, kv_elements_per_token, parse_size
from proxy_engine.model_files import context_length
from proxy_engine.placement import plan_placement
from server.check import check, format_plan
from server.settings import ServerSettings

from .known_models import KNOWN_MODELS


def engine(base: dict, *pairs: tuple[dict, dict], **extra) -> EngineConfig:
    return EngineConfig.model_validate(
        {"base": base, "experts": [{"expert": e, "anti_expert": a} for e, a in pairs], **extra}
    )


# ------------------------------------------------------------------------------------ from_pretrained_kwargs
def test_kwargs_cpu_is_a_plain_load():
    kwargs = from_pretrained_kwargs(ModelConfig(path="m"))
    assert kwargs == {"dtype": "auto", "local_files_only": True, "trust_remote_code": False, "device_map": None}


@pytest.mark.parametrize(("device", "expected"), [("cuda:1", "cuda:1"), ("cuda", "cuda:0"), ("mps", "mps")])
def test_kwargs_single_device_maps_everything_there(device, expected):
    kwargs = from_pretrained_kwargs(ModelConfig(path="m", device=device))
    assert kwargs["device_map"] == {"": expected}
    assert "max_memory" not in kwargs


def test_kwargs_auto_passes_caps_with_accelerate_keys():
    assert from_pretrained_kwargs(ModelConfig(path="m", device="auto"))["device_map"] == "auto"
    kwargs = from_pretrained_kwargs(
        ModelConfig(path="m", device="auto", max_memory={"cuda:0": "20GiB", "cpu": "64GiB"})
    )
    assert kwargs["device_map"] == "auto"
    assert kwargs["max_memory"] == {0: 20 * GiB, "cpu": 64 * GiB}


def test_kwargs_gpu_list_restricts_max_memory_to_those_gpus():
    model = ModelConfig(path="m", device=["cuda:1", "cuda:2"], max_memory={"cuda:1": "30GiB", "cuda:2": "40GiB"})
    kwargs = from_pretrained_kwargs(model)
    assert kwargs["device_map"] == "auto"
    assert kwargs["max_memory"] == {1: 30 * GiB, 2: 40 * GiB}  # no cuda:0, no cpu: nothing lands there


def test_kwargs_gpu_list_uncapped_uses_free_memory(monkeypatch):
    monkeypatch.setattr(loader, "usable_bytes", lambda device, utilization: (10 + device.index) * GiB)
    kwargs = from_pretrained_kwargs(ModelConfig(path="m", device=["cuda:0", "cuda:3"], max_memory={"cuda:3": "5GiB"}))
    assert kwargs["max_memory"] == {0: 10 * GiB, 3: 5 * GiB}


def test_kwargs_gpu_list_is_sized_within_gpu_memory_utilization(monkeypatch):
    asked = []
    monkeypatch.setattr(loader, "usable_bytes", lambda device, utilization: asked.append(utilization) or 6 * GiB)
    kwargs = from_pretrained_kwargs(ModelConfig(path="m", device=["cuda:0", "cuda:1"]), utilization=0.5)
    assert kwargs["max_memory"] == {0: 6 * GiB, 1: 6 * GiB} and asked == [0.5, 0.5]


def test_kwargs_gpu_list_without_gpus_says_so(monkeypatch):
    monkeypatch.setattr(loader, "usable_bytes", lambda device, utilization: None)
    with pytest.raises(ValueError, match="cuda:1"):
        from_pretrained_kwargs(ModelConfig(path="m", device=["cuda:0", "cuda:1"], max_memory={"cuda:0": "1GiB"}))


def test_kwargs_dtype_revision_remote_code():
    kwargs = from_pretrained_kwargs(
        ModelConfig(path="m", dtype="bfloat16", device="cuda:0", revision="abc123", trust_remote_code=True)
    )
    assert kwargs["dtype"] is torch.bfloat16
    assert kwargs["revision"] == "abc123"
    assert kwargs["trust_remote_code"] is True
    assert kwargs["local_files_only"] is True
    assert "torch_dtype" not in kwargs  # transformers 5 spells it dtype


def test_kwargs_quantization_configs():
    eight = from_pretrained_kwargs(ModelConfig(path="m", device="cuda:0", quantization="8bit"))
    assert eight["quantization_config"].load_in_8bit
    four = from_pretrained_kwargs(ModelConfig(path="m", device="cuda:0", dtype="bfloat16", quantization="4bit"))
    q = four["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert "quantization_config" not in from_pretrained_kwargs(ModelConfig(path="m"))
    # auto: the 4-bit compute dtype is the checkpoint's own 16-bit dtype (float16 when it names none)
    assert from_pretrained_kwargs(ModelConfig(path="m", quantization="4bit"))[
        "quantization_config"].bnb_4bit_compute_dtype == torch.float16


def test_kwargs_load_the_tiny_family_and_input_device(tiny_family):
    from transformers import AutoModelForCausalLM

    for device in ("cpu", "auto"):
        model_config = ModelConfig(path=str(tiny_family.base), device=device, dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(model_config.path, **from_pretrained_kwargs(model_config))
        assert input_device(model) == torch.device("cpu")
        assert next(model.parameters()).dtype == torch.float32


def test_input_device_follows_the_embedding_layer():
    class Sharded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(2, 2)
            self.embed = torch.nn.Embedding(4, 2, device="meta")
            self.hf_device_map = {"model.embed_tokens": 1, "lm_head": 0}

        def get_input_embeddings(self):
            return self.embed

    # the embedding is on meta here (standing in for a GPU we lack): the device map's first entry decides
    assert input_device(Sharded()) == torch.device("cuda", 1)
    assert input_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


# --------------------------------------------------------------------------------------------- estimates
@pytest.mark.parametrize("hub_id", sorted(KNOWN_MODELS))
def test_parameter_count_matches_published_counts(hub_id):
    cfg, published = KNOWN_MODELS[hub_id]
    total, quantizable = count_parameters(cfg)
    assert total == published
    assert 0.5 * total < quantizable < total  # embeddings and norms stay unquantized


def test_llama2_70b_numbers_used_in_the_configs():
    cfg, _ = KNOWN_MODELS["meta-llama/Llama-2-70b-hf"]
    memory = estimate_memory(cfg, "float16")
    assert round(memory.weight_bytes / GiB, 1) == 128.5
    assert memory.kv_bytes_per_token == 327_680  # 2 x 80 layers x 8 kv heads x 128 x 2 bytes
    four = estimate_memory(cfg, "float16", "4bit")
    assert 34 * GiB < four.weight_bytes < 40 * GiB


_YARN_QWEN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


@pytest.mark.parametrize(("cfg", "expected"), [
    ({"max_position_embeddings": 4096}, 4096),  # Llama-2
    ({"n_positions": 1024}, 1024),  # GPT-2
    ({"max_position_embeddings": 32768, "rope_scaling": _YARN_QWEN}, 131072),  # Qwen2.5's documented 128K
    ({"max_position_embeddings": 40960, "rope_scaling": _YARN_QWEN}, 131072),  # Qwen3
    ({"max_position_embeddings": 163840,  # DeepSeek-V3: the stated context already is 4K x 40
      "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}}, 163840),
    ({"max_position_embeddings": 131072, "rope_scaling": _LLAMA31_ROPE}, 131072),  # Llama-3.1: already scaled
    ({"max_position_embeddings": 131072, "rope_scaling": {"type": "longrope", "factor": 32.0}}, 131072),  # Phi-3
    # Linear: the stated context (Gemma-3 4B+ states its 128K beside a factor of 8, vLLM special-cases it).
    ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}, 131072),
    # Dynamic NTK: not stretched (past the stated context a row's frequencies would follow its batch's longest).
    ({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 4096),
    ({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 4096),  # no original
    ({"max_position_embeddings": 131072, "rope_parameters": {  # Gemma-3: per layer type, context as stated
        "full_attention": {"rope_type": "linear", "factor": 8.0}, "sliding_attention": {"rope_type": "default"}}},
     131072),
    ({"text_config": {"hidden_size": 8, "max_position_embeddings": 2048}}, 2048),  # a vision wrapper's decoder
    ({"hidden_size": 8}, None),
])
def test_context_length_counts_yarn_as_vllm_does(cfg, expected):
    assert context_length(cfg) == expected


def test_latent_attention_kv_is_the_compressed_latent_per_layer():
    """DeepSeek-V3's published shapes: transformers caches the 512-wide latent and the 64-wide RoPE key."""
    cfg = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
           "num_key_value_heads": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
           "v_head_dim": 128}
    assert kv_elements_per_token(cfg) == 61 * (512 + 64)
    assert estimate_memory({**cfg, "vocab_size": 129280, "intermediate_size": 18432},
                           "bfloat16").kv_bytes_per_token == 61 * 576 * 2


def test_gpt2_style_estimate_is_close():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128)
    real = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    total, _ = count_parameters(config.to_dict())
    assert abs(total - real) / real < 0.01


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_estimate_matches_the_loaded_tiny_family(tiny_family, dtype):
    from transformers import AutoModelForCausalLM

    side = {"dtype": dtype}
    config = engine(
        {"path": str(tiny_family.base), **side},
        (
            {"path": str(tiny_family.expert), "prompt_format": "chat", **side},
            {"path": str(tiny_family.anti_expert), **side},
        ),
    )
    plan = plan_placement(config)
    assert plan.ok, plan.errors
    assert [m.name for m in plan.models] == ["base", "expert_0", "anti_expert_0"]
    assert [m.role for m in plan.models] == ["base", "expert", "anti_expert"]
    for model_plan in plan.models:
        assert model_plan.location == "local" and model_plan.devices == ["cpu"] and model_plan.dtype == dtype
        model = AutoModelForCausalLM.from_pretrained(model_plan.resolved_path, dtype=getattr(torch, dtype))
        real_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert abs(model_plan.memory.weight_bytes - real_bytes) / real_bytes < 0.10
        assert model_plan.memory.parameters == sum(p.numel() for p in model.parameters())
        # KV bytes per token: what a forward over N tokens really stores, divided by N
        ids = torch.arange(5).unsqueeze(0)
        cache = model(input_ids=ids, use_cache=True).past_key_values
        stored = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                     for layer in cache.layers)
        assert model_plan.memory.kv_bytes_per_token == stored // 5


def test_4bit_auto_compute_dtype_follows_the_checkpoint(tmp_path):
    fake = _fake_model(tmp_path / "q", KNOWN_MODELS["Qwen/Qwen2.5-0.5B"][0])
    kwargs = from_pretrained_kwargs(ModelConfig(path=str(fake), device="cuda:0", quantization="4bit"))
    assert kwargs["dtype"] == "auto" and kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16


def test_auto_dtype_resolves_from_the_checkpoint(tmp_path, tiny_family):
    plan = plan_placement(engine({"path": str(tiny_family.base)}))
    assert plan.models[0].dtype == "float32"  # the tiny family is saved in float32
    fake = _fake_model(tmp_path / "m", {**KNOWN_MODELS["Qwen/Qwen2.5-0.5B"][0]})
    assert plan_placement(engine({"path": str(fake)})).models[0].dtype == "bfloat16"
    no_dtype = {k: v for k, v in KNOWN_MODELS["Qwen/Qwen2.5-0.5B"][0].items() if k != "torch_dtype"}
    assert plan_placement(engine({"path": str(_fake_model(tmp_path / "n", no_dtype))})).models[0].dtype == "float32"


# ------------------------------------------------------------------------------------------------- errors
def test_missing_path_is_one_clear_line(tiny_family, tmp_path):
    config = engine({"path": str(tmp_path / "nope")})
    plan = plan_placement(config)
    assert not plan.ok
    assert plan.first_error.startswith("base: ") and "not found" in plan.first_error
    assert "\n" not in plan.first_error


def test_a_max_model_len_past_a_models_context_is_refused_not_lowered(tiny_family):
    """As vLLM: a limit the models cannot hold is an error at start-up naming the model and its context, where it
    used to be lowered in silence; at or under the context it is taken as is."""
    from proxy_engine.engine import ProxyEngine
    from proxy_engine.loader import load_models

    pair = ({"path": str(tiny_family.expert)}, {"path": str(tiny_family.anti_expert)})
    context = json.loads((tiny_family.anti_expert / "config.json").read_text())["max_position_embeddings"]
    too_long = engine({"path": str(tiny_family.base)}, pair, limits={"max_model_len": context + 1})
    plan = plan_placement(too_long, device_count=0)
    assert plan.errors == [f"limits.max_model_len ({context + 1}) is more than the context of "
                           f"{plan.models[0].name} ({context} tokens: its max_position_embeddings, or YaRN's original "
                           f"context x factor); set at most {context} or leave it unset"]
    assert plan_placement(engine({"path": str(tiny_family.base)}, pair, limits={"max_model_len": context}),
                          device_count=0).ok
    models = load_models(engine({"path": str(tiny_family.base)}, pair))
    with pytest.raises(ValueError, match=rf"limits.max_model_len \({context + 1}\) is more than the context of base"):
        ProxyEngine(models, too_long)
    assert ProxyEngine(models, engine({"path": str(tiny_family.base)}, pair,
                                      limits={"max_model_len": context - 8})).max_model_len == context - 8


def test_allow_long_max_model_len_serves_past_the_stated_context(tiny_family, monkeypatch):
    """vLLM's escape hatch (VLLM_ALLOW_LONG_MAX_MODEL_LEN), for RoPE models that state less than they were
    stretched to: a warning, and a request past the stated context runs to its end."""
    from proxy_engine.engine import ProxyEngine
    from proxy_engine.loader import load_models
    from proxy_engine.request import FinishReason, PromptInput, SamplingParams

    pair = ({"path": str(tiny_family.expert)}, {"path": str(tiny_family.anti_expert)})
    context = json.loads((tiny_family.base / "config.json").read_text())["max_position_embeddings"]
    monkeypatch.setenv("PROXY_SERVE_ALLOW_LONG_MAX_MODEL_LEN", "1")
    config = engine({"path": str(tiny_family.base)}, pair, limits={"max_model_len": context + 32})
    assert config.limits.allow_long_max_model_len
    plan = plan_placement(config, device_count=0)
    assert plan.ok and any("is more than the context of" in w for w in plan.warnings)
    proxy = ProxyEngine(load_models(config), config)
    assert proxy.max_model_len == context + 32
    prompt = [5 + i % 400 for i in range(context - 4)]
    (sequence,) = proxy.make_sequences("long", PromptInput(token_ids=prompt),
                                       SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    proxy.add([sequence])
    while proxy.has_work():
        proxy.step()
    assert sequence.finish_reason is FinishReason.LENGTH and len(sequence.output_ids) == 24  # past the context


def test_cuda_index_past_the_visible_gpus(tiny_family):
    config = engine({"path": str(tiny_family.base), "device": "cuda:3"})
    plan = plan_placement(config, device_count=0)
    assert plan.errors == [
        "base: device cuda:3 requested but torch.cuda.device_count() = 0 (no CUDA GPU visible; "
        "check the driver, CUDA_VISIBLE_DEVICES or docker --gpus)"
    ]
    assert plan_placement(config, device_count=2).first_error.startswith("base: device cuda:3 requested")
    assert plan_placement(config, device_count=4, gpu_memory={3: 80 * GiB}).ok


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="this machine has a cuda:3")
def test_cuda_3_on_this_machine(tiny_family):
    plan = plan_placement(engine({"path": str(tiny_family.base), "device": "cuda:3"}))
    assert any("cuda:3" in e for e in plan.errors)


def test_gpu_list_errors_name_each_missing_gpu(tiny_family):
    plan = plan_placement(engine({"path": str(tiny_family.base), "device": ["cuda:0", "cuda:1"]}), device_count=1)
    assert len(plan.errors) == 1 and "cuda:1" in plan.errors[0]


@pytest.mark.skipif(placement.importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes installed")
def test_quantization_without_bitsandbytes(tiny_family):
    plan = plan_placement(engine({"path": str(tiny_family.base), "quantization": "8bit"}))
    assert any("bitsandbytes" in e for e in plan.errors)


def test_chat_format_without_template_is_an_error(tiny_family):
    config = engine(
        {"path": str(tiny_family.base)},
        ({"path": str(tiny_family.anti_expert), "prompt_format": "chat"}, {"path": str(tiny_family.anti_expert)}),
    )
    errors = plan_placement(config).errors
    assert len(errors) == 1 and errors[0].startswith("expert_0:") and "chat template" in errors[0]


def test_bad_memory_cap(tiny_family):
    config = engine({"path": str(tiny_family.base), "device": "auto", "max_memory": {"cuda:0": "lots"}})
    assert "max_memory" in plan_placement(config, device_count=1, gpu_memory={0: GiB}).first_error


def test_weights_over_capacity_and_caps(tmp_path):
    big = _fake_model(tmp_path / "big", KNOWN_MODELS["meta-llama/Llama-2-70b-hf"][0])
    one_gpu = engine({"path": str(big), "device": "cuda:0", "dtype": "float16"})
    plan = plan_placement(one_gpu, device_count=1, gpu_memory={0: 80 * GiB})
    assert plan.errors and plan.errors[0].startswith("cuda:0: the weights placed on it need ~128.48 GiB")
    capped = engine(
        {"path": str(big), "device": ["cuda:0", "cuda:1"], "max_memory": {"cuda:0": "40GiB", "cuda:1": "40GiB"}}
    )
    plan = plan_placement(capped, device_count=2, gpu_memory={0: 80 * GiB, 1: 80 * GiB})
    assert any("max_memory allows only 80.00 GiB" in e for e in plan.errors)
    limits = {"max_num_seqs": 64, "max_model_len": 4096}
    spread = engine({"path": str(big), "device": ["cuda:0", "cuda:1"]}, limits=limits)
    plan = plan_placement(spread, device_count=2, gpu_memory={0: 80 * GiB, 1: 80 * GiB})
    assert plan.ok
    assert plan.device_weight_bytes["cuda:0"] == pytest.approx(128.48 / 2 * GiB, rel=1e-3)
    assert any("KV cache at the limits" in w for w in plan.warnings)  # 64 x 4096 x 320 KiB = 80 GiB of KV


# ------------------------------------------------------------------------------------------- hub cache
def _fake_model(directory: Path, cfg: dict, weights: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    if weights:
        (directory / "model.safetensors").write_bytes(b"")
    return directory


def _fake_cache(cache: Path, repo_id: str, cfg: dict, weights: bool = True) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _fake_model(repo / "snapshots" / commit, cfg, weights)


def test_hub_id_found_in_the_cache(tmp_path):
    cfg, published = KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"]
    _fake_cache(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct", cfg)
    plan = plan_placement(engine({"path": "Qwen/Qwen2.5-0.5B-Instruct"}), cache_dir=tmp_path)
    assert plan.ok, plan.errors
    model = plan.models[0]
    assert model.location == "hf-cache" and model.memory.parameters == published and model.vocab_size == 151936


def test_hub_id_not_cached_or_without_weights(tmp_path):
    plan = plan_placement(engine({"path": "meta-llama/Llama-2-70b-hf"}), cache_dir=tmp_path)
    assert "not in the Hugging Face cache" in plan.first_error and "never downloads" in plan.first_error
    _fake_cache(tmp_path, "org/config-only", {"model_type": "llama"}, weights=False)
    plan = plan_placement(engine({"path": "org/config-only"}), cache_dir=tmp_path)
    assert "weights are not" in plan.first_error


def test_interrupted_download_is_caught(tmp_path):
    model = _fake_model(tmp_path / "m", KNOWN_MODELS["Qwen/Qwen2.5-0.5B"][0], weights=False)
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (model / "model-00001-of-00002.safetensors").write_bytes(b"")
    plan = plan_placement(engine({"path": str(model)}))
    assert plan.first_error.endswith("1 weight shard(s) missing, e.g. model-00002-of-00002.safetensors")
    (model / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert plan_placement(engine({"path": str(model)})).ok


# ----------------------------------------------------------------------------------------------- report
def test_format_plan_table(tiny_family, tmp_path):
    qwen = _fake_model(tmp_path / "qwen72", KNOWN_MODELS["Qwen/Qwen2.5-72B"][0])
    small = _fake_model(tmp_path / "qwen05", KNOWN_MODELS["Qwen/Qwen2.5-0.5B"][0])
    config = engine({"path": str(qwen), "device": ["cuda:0", "cuda:1"]}, ({"path": str(small), "device": "cuda:2"},
                                                                            {"path": str(small), "device": "cuda:2"}))
    plan = plan_placement(config, device_count=3, gpu_memory={i: 80 * GiB for i in range(3)})
    text = format_plan(plan)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["model", "role", "path", "found"]
    assert "72.71B" in text and "135.43" in text and "327,680" in text and "cuda:0,cuda:1" in text
    assert "combined over the shared 151936 ids" in text
    # one model named by both of the pair's roles: one row, its weights counted once on cuda:2
    assert [line.split()[:3] for line in lines if "anti_expert" in line] == [["expert_0", "=", "anti_expert_0"]]
    assert plan.device_weight_bytes["cuda:2"] == plan.models[1].memory.weight_bytes
    assert lines[-1] == "placement OK"


def test_check_exit_codes(tiny_family, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    assert check(ServerSettings(engine=engine({"path": str(tiny_family.base)})), out=out, err=err) == 0
    assert out.getvalue().rstrip().splitlines()[-2:] == ["placement OK", "model ids: proxy-tuned, proxy-tuned:base"]
    assert not err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert check(ServerSettings(engine=engine({"path": str(tmp_path / "missing")})), out=out, err=err) == 1
    assert not out.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1 and err.getvalue().startswith("error: base:")


def test_parse_size():
    assert parse_size("20GiB") == 20 * GiB
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size(1024) == 1024
    with pytest.raises(ValueError):
        parse_size("lots")


def test_gpu_memory_utilization_is_each_gpus_capacity_in_the_plan(tmp_path):
    """--check counts a GPU's capacity as its total memory times --gpu-memory-utilization."""
    big = _fake_model(tmp_path / "big", KNOWN_MODELS["meta-llama/Llama-2-70b-hf"][0])
    spread = {"path": str(big), "device": ["cuda:0", "cuda:1"]}
    gpus = {0: 80 * GiB, 1: 80 * GiB}
    assert plan_placement(engine(spread), device_count=2, gpu_memory=gpus).ok  # 64.24 GiB of weights on each
    capped = engine(spread, runtime={"gpu_memory_utilization": 0.7})
    plan = plan_placement(capped, device_count=2, gpu_memory=gpus)
    assert plan.device_capacity_bytes["cuda:0"] == int(56 * GiB)
    assert plan.errors[0].startswith("cuda:0: the weights placed on it need ~64.24 GiB but it has 56.00 GiB")


def test_the_plan_shows_each_devices_kv_budget_as_the_engine_will_set_it(tmp_path, monkeypatch):
    """On the CPU a default K/V budget (a share of the RAM available less the weights); on a GPU one only when
    --kv-cache-memory sets it; a context one sequence cannot fill is a warning, or an error where it was asked for."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    small = _fake_model(tmp_path / "llama7", KNOWN_MODELS["meta-llama/Llama-2-7b-hf"][0])  # 512 KiB of K/V a token
    monkeypatch.setattr(placement, "free_bytes", lambda device: 20 * GiB)
    cpu = plan_placement(engine({"path": str(small), "dtype": "float16"}))
    limit, source = cpu.device_kv_budget["cpu"]
    assert limit == int((20 * GiB - cpu.device_weight_bytes["cpu"]) * 0.4) and "RAM available" in source
    assert "K/V budget" in format_plan(cpu).splitlines()[-2]
    gpu = {"path": str(small), "device": "cuda:0", "dtype": "float16"}
    assert "cuda:0" not in plan_placement(engine(gpu), device_count=1, gpu_memory={0: 80 * GiB}).device_kv_budget
    # 1 GiB holds one sequence of about 1,000 tokens of this model, not its 4,096
    short = plan_placement(engine(gpu, runtime={"kv_cache_memory": GiB}), device_count=1,
                           gpu_memory={0: 80 * GiB})
    assert short.ok and short.device_kv_budget["cuda:0"] == (GiB, "--kv-cache-memory")
    assert any("one sequence of 4096 tokens needs more K/V" in w and "up to 102" in w for w in short.warnings)
    asked = plan_placement(engine(gpu, runtime={"kv_cache_memory": GiB}, limits={"max_model_len": 4096}),
                           device_count=1, gpu_memory={0: 80 * GiB})
    assert any("raise --kv-cache-memory or lower --max-model-len" in e for e in asked.errors)
