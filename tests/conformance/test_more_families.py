"""Families beyond the matrix's, each with the quirk that used to break a server, token for token and character for
character against the naive reference. Most decode through transformers' forward, so what is checked is that the
engine's caches, masks and batching fit their attention; OLMo-2 / OLMo-3, Granite and Qwen2 with YaRN decode on the
fast step (``architecture.py``), so it is checked that the step follows their math.

- phi3: fused ``qkv_proj`` / ``gate_up_proj``; olmo2: a norm after each sub-block and none before, query / key
  norms each over its whole projection (fast step); olmo3: the same with windowed layers (fast step);
- granite: embedding, residual, attention and logit multipliers (fast step);
- cohere: LayerNorm, parallel block, logit scale;
- starcoder2: sliding window, biases, LayerNorm; mixtral / qwen2_moe: routed experts (and Qwen's shared one);
- gpt2: learned positions, Conv1D projections; falcon: multi-query attention, parallel block;
- bloom, mpt, falcon with ``alibi``: ALiBi, which their forward computes from a 2-D padding mask;
- deepseek_v3: multi-head latent attention, whose cached latent and RoPE key (K's and V's places) differ in width;
- gpt_oss: attention sinks, alternating sliding / full layers, eager attention; smollm3: layers without RoPE;
- gemma3n_text: Gemma-3n's text decoder, whose later layers reuse an earlier layer's K/V and write none;
- gemma4_text: Gemma 4's text decoder (per-layer inputs, windowed and full layers with their own head size and
  partial RoPE), as its small models are built (the later half reusing an earlier layer's K/V), and as the
  checkpoints ship (``Gemma4ForConditionalGeneration``: the vision tower dropped, the text decoder served);
- qwen2-yarn: YaRN stretching a 16-position config to 128 (on the fast step: Qwen2 is a family it knows);
- eighteen that were served right before (OLMo, StableLM, Qwen3-MoE, Phi, OPT, GPT-J, CodeGen, GPT-BigCode,
  Persimmon, Nemotron, JetMoE, GLM, EXAONE-4, ERNIE-4.5, Seed-OSS, Apertus, Arcee, Cohere2), and DeepSeek-V2 and
  MiniCPM3 (latent attention, as DeepSeek-V3).

Families whose layers keep a recurrent state (Mamba, linear attention, convolutions) or restart attention at
absolute chunk boundaries (Llama-4) are refused before any weight loads; the last tests say how.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from proxy_engine.attention_masks import unsupported_layers
from proxy_engine.config import EngineConfig, ModelConfig
from proxy_engine.loader import load_models
from proxy_engine.placement import plan_placement
from tests.conformance.families import CHATML_TEMPLATE, LLAMA3_TEMPLATE, Spec, build, llama3_tokenizer, qwen_tokenizer
from tests.conformance.test_engine_matrix import (  # noqa: F401  (the matrix's test, run on these families)
    loaded,
    test_greedy_matches_naive_reference_token_and_character,
)

MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
           num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1,
           topk_group=1, first_k_dense_replace=1)
# model_type -> config fields past the shared small shape (hidden 64 / 32, 4 query and 2 K/V heads).
MORE = {
    "phi3": {},
    "olmo2": {},
    "olmo3": dict(sliding_window=6),  # its default pattern: windowed layers (a full one every fourth)
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0),
    "cohere": {},
    "starcoder2": dict(sliding_window=6),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "gpt2": {},
    "falcon": dict(multi_query=True),
    "bloom": {},
    "mpt": {},
    "falcon-alibi": dict(alibi=True),
    "deepseek_v3": MLA,
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=6),
    "smollm3": dict(no_rope_layer_interval=2),
    # Served right before this module existed (the last two not: latent attention), kept here so that they stay so.
    "olmo": {}, "stablelm": {}, "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "phi": {}, "opt": {}, "gptj": dict(rotary_dim=8), "codegen": dict(rotary_dim=8), "gpt_bigcode": {},
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "persimmon": {}, "nemotron": {}, "jetmoe": {}, "glm": {}, "exaone4": {}, "ernie4_5": {}, "seed_oss": {},
    "apertus": {}, "arcee": {}, "cohere2": {}, "deepseek_v2": dict(MLA, v_head_dim=8), "minicpm3": dict(
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    # Gemma-3n (its text decoder): the later half of the layers reuse an earlier layer's keys and values.
    "gemma3n_text": dict(head_dim=16, altup_num_inputs=2, laurel_rank=8, hidden_size_per_layer_input=8,
                         activation_sparsity_pattern=None),
    # Gemma 4's text decoder: per-layer inputs, windowed layers and full ones with their own head size and a partial
    # ("proportional") RoPE; then as its small models have it (E2B, E4B), the later half reusing an earlier K/V.
    "gemma4_text": dict(head_dim=16, global_head_dim=16, hidden_size_per_layer_input=8, sliding_window=6),
    "gemma4-vision": {},  # as the checkpoints ship: Gemma4ForConditionalGeneration (_gemma4_vision_config)
    "gemma4_text-shared": dict(head_dim=16, global_head_dim=16, hidden_size_per_layer_input=8, sliding_window=6,
                               kv_shared_half=True),
    # Qwen2.5's documented 128K set-up: YaRN over the 32K it was trained on (here 16 positions x 8); the prompts
    # run past 16, so the context must come from the scaling, and the fast step must rotate as transformers does.
    "qwen2-yarn": dict(max_position_embeddings=16, use_sliding_window=False,
                       rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}),
}


# architecture.py knows them: they decode on the fast step (static on CUDA)
FAST = {"olmo2", "olmo3", "granite", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}


def _config_maker(model_type: str, extra: dict):
    def make(vocab, layers, hidden, **ids):
        fields = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=hidden * 2, max_position_embeddings=256,
                      tie_word_embeddings=False, **ids)
        if fields.get("pad_token_id") is None:  # some configs default to an id past a small vocabulary
            fields["pad_token_id"] = 0
        quirks = dict(extra)
        # sharing needs an earlier layer of the same type: all full attention
        if model_type == "gemma3n_text" or quirks.pop("kv_shared_half", False):
            fields |= {"num_kv_shared_layers": layers // 2, "layer_types": ["full_attention"] * layers}
        if model_type == "gemma4_text":
            fields |= {"vocab_size_per_layer_input": vocab}
        return AutoConfig.for_model(model_type, **{**fields, **quirks})
    return make


def _gemma4_vision_config(vocab, layers, hidden, **ids):
    """Gemma 4 as it ships: ``Gemma4ForConditionalGeneration``, a (tiny) vision tower around the text decoder."""
    from transformers import Gemma4Config, Gemma4VisionConfig

    text = _config_maker("gemma4_text", MORE["gemma4_text"])(vocab, layers, hidden, **ids)
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=8, patch_size=14, position_embedding_size=64)
    last = vocab - 1  # its image, audio and boundary tokens: ordinary ids to a text-only forward
    return Gemma4Config(text_config=text.to_dict(), vision_config=vision.to_dict(), boi_token_id=last,
                        eoi_token_id=last, image_token_id=last, video_token_id=last, boa_token_id=last,
                        eoa_token_index=last, audio_token_id=last, tie_word_embeddings=False, **ids)


def _spec(name: str) -> Spec:
    if name == "gemma4-vision":
        return Spec(name, "gemma4", "byte-level BPE as Llama-3", "as transformers builds it", "transformers",
                    llama3_tokenizer, _gemma4_vision_config, LLAMA3_TEMPLATE,
                    end_tokens=["<|end_of_text|>", "<|eot_id|>"])
    model_type = name.partition("-")[0]
    if model_type == "qwen2":  # transformers loads a qwen2 checkpoint's tokenizer as Qwen2's, with its specials
        return Spec(name, model_type, "byte-level BPE, ChatML", "sdpa", "fast", qwen_tokenizer,
                    _config_maker(model_type, MORE[name]), CHATML_TEMPLATE, end_tokens=["<|endoftext|>", "<|im_end|>"])
    path = "fast" if model_type in FAST else "transformers"
    return Spec(name, model_type, "byte-level BPE as Llama-3", "as transformers builds it", path,
                llama3_tokenizer, _config_maker(model_type, MORE[name]), LLAMA3_TEMPLATE,
                end_tokens=["<|end_of_text|>", "<|eot_id|>"])


@pytest.fixture(scope="module", params=list(MORE))
def family(request, tmp_path_factory):
    return build(_spec(request.param), tmp_path_factory.mktemp(request.param))


def test_each_decodes_on_the_path_listed(loaded):  # noqa: F811  (the matrix's fixture)
    from proxy_engine.engine import ProxyEngine
    from tests.conformance.conftest import engine_config

    family, models, _ = loaded
    assert {r.executor for r in ProxyEngine(models, engine_config(family)).runners} == {family.spec.decode_path}


def test_the_quirk_is_in_the_checkpoint(family):
    """The tiny checkpoints carry what the family is listed for (an unused field would test nothing)."""
    config = AutoConfig.from_pretrained(family.base)
    name = family.spec.name
    if name == "deepseek_v3":
        assert config.qk_nope_head_dim + config.qk_rope_head_dim != config.v_head_dim
    if name in ("bloom", "mpt", "falcon-alibi"):
        from proxy_engine.attention_masks import uses_alibi

        assert uses_alibi(config)
    if name == "starcoder2":
        assert config.sliding_window == 6
    if name == "gemma4_text":
        assert config.hidden_size_per_layer_input == 8
        assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    if name == "gemma4_text-shared":
        assert config.num_kv_shared_layers == 1
    if name == "gemma4-vision":
        assert config.architectures == ["Gemma4ForConditionalGeneration"] and config.vision_config is not None
    if name == "qwen2-yarn":
        from proxy_engine.loader import max_positions

        assert config.max_position_embeddings == 16 and max_positions(_Stub(config), None) == 128


class _Stub:
    def __init__(self, config) -> None:
        self.config = config


# --------------------------------------------------------------------------------------------- refusals
RECURRENT = {
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},  # listed: refused by its layer types
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "llama4_text": {"layer_types": ["chunked_attention", "full_attention"]},
    "falcon_h1": {},  # not listed in config.json: refused by its model type
    "mamba": {},
}


@pytest.mark.parametrize("model_type", list(RECURRENT))
def test_recurrent_and_chunked_layers_are_refused_before_weights_load(model_type, tmp_path):
    base = tmp_path / model_type
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"],
                                                  "vocab_size": 32, **RECURRENT[model_type]}))
    save_file({"embed.weight": torch.zeros(32, 8)}, base / "model.safetensors")  # found, so read
    reason = unsupported_layers(model_type, RECURRENT[model_type].get("layer_types"))
    assert reason is not None and model_type in reason and "full or sliding-window attention" in reason
    plan = plan_placement(EngineConfig(base=ModelConfig(path=str(base))), device_count=0)
    assert any(error == f"base: {reason}" for error in plan.errors), plan.errors


def test_the_loader_refuses_them_too_with_the_role_and_path(tmp_path):
    family = build(_spec("phi3"), tmp_path / "phi3")  # real tokenizers; the base's config is made recurrent
    config = json.loads((family.base / "config.json").read_text())
    (family.base / "config.json").write_text(json.dumps({**config, "layer_types": ["linear_attention"] * 2}))
    with pytest.raises(ValueError, match=r"^base \(.*\): phi3 has linear_attention layers; the engine serves"):
        load_models(EngineConfig(base=ModelConfig(path=str(family.base))))


def test_attention_only_configs_pass():
    assert unsupported_layers("gemma3_text", ["sliding_attention", "full_attention"]) is None
    assert unsupported_layers("llama", None) is None


@pytest.mark.parametrize("name", ["deepseek_v3", "bloom", "gpt_oss"])
def test_a_cached_prefix_gives_the_uncached_output(name, tmp_path):
    """The prefix cache keeps K and V blocks of their own widths (latent attention), and ALiBi or a window is
    recomputed from the columns: a 40-token cached prefix gives the tokens and logprobs of an engine without it."""
    from tests.engine.test_prefix_cache import assert_same, with_and_without_prefix_cache

    _, outputs = with_and_without_prefix_cache(build(_spec(name), tmp_path / name))
    assert_same(*outputs)


def test_layers_that_reuse_another_layers_kv_hold_no_buffers(tmp_path):
    """Gemma-3n's shared layers write no K/V: the slot cache keeps buffers for the layers that do, KV bytes per token
    count those alone, and the prefix cache stands aside (its blocks would have nothing of their own to keep)."""
    from proxy_engine.engine import ProxyEngine
    from proxy_engine.prefix_cache import kv_bytes_per_token
    from proxy_engine.request import PromptInput, SamplingParams
    from tests.conformance.conftest import engine_config

    family = build(_spec("gemma3n_text"), tmp_path / "gemma3n")
    config = engine_config(family)
    models = load_models(config)
    engine = ProxyEngine(models, config)
    base = engine.runners[0]
    assert base.prefix_cache is None and models[0].model.config.num_kv_shared_layers == 1
    engine.add(engine.make_sequences("r", PromptInput(text="The capital of France is"),
                                     SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))
    engine.step()
    layers = base.cache.layers
    assert layers[0].k_buf is not None and layers[1].k_buf is None and base.cache.live == [layers[0]]
    assert base.cache.nbytes() == kv_bytes_per_token(models[0].model) * base.cache.slots * base.cache.capacity
    while engine.has_work():
        engine.step()


def test_layer_types_only_the_config_class_derives_are_refused_after_load(tmp_path, monkeypatch):
    """Falcon-H1's config.json lists no layer types (its config class derives them): were the family not named,
    the loaded model's config still refuses it, with the role and path, before the engine is built."""
    import proxy_engine.attention_masks as attention_masks

    family = build(Spec("falcon_h1", "falcon_h1", "", "", "transformers", llama3_tokenizer,
                        _config_maker("falcon_h1", {}), None), tmp_path / "falcon_h1")
    assert "layer_types" not in json.loads((family.base / "config.json").read_text())
    monkeypatch.setattr(attention_masks, "RECURRENT_MODEL_TYPES", frozenset())
    with pytest.raises(ValueError, match=r"^base \(.*\): falcon_h1 has hybrid layers"):
        load_models(EngineConfig(base=ModelConfig(path=str(family.base))))


def test_latent_attention_kv_bytes_per_token_match_what_the_cache_holds(tmp_path):
    """Admission and the prefix-cache budget count K and V bytes per token: under latent attention the compressed
    latents, as the slot cache stores them (and as placement reads them from config.json)."""
    from proxy_engine.engine import ProxyEngine
    from proxy_engine.memory import kv_bytes_per_token as from_config
    from proxy_engine.prefix_cache import kv_bytes_per_token
    from proxy_engine.request import PromptInput, SamplingParams
    from tests.conformance.conftest import engine_config
    from tests.engine.test_prefix_cache import collect

    family = build(_spec("deepseek_v3"), tmp_path / "deepseek_v3")
    config = engine_config(family)
    models = load_models(config)
    engine = ProxyEngine(models, config)
    engine.add(engine.make_sequences("r", PromptInput(text="The capital of France is"),
                                     SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    engine.step()  # prefilled and in its slot
    for member, runner in zip(models, engine.runners):
        cache = runner.cache
        per_token = kv_bytes_per_token(member.model)
        text = member.model.config
        # The compressed latent in K's place and the RoPE key in V's, one "head" each, float32.
        assert per_token == text.num_hidden_layers * 4 * (text.kv_lora_rank + text.qk_rope_head_dim)
        assert cache.nbytes() == per_token * cache.slots * cache.capacity
        stored = json.loads((Path(member.config.path) / "config.json").read_text())
        assert from_config(stored, "float32") == per_token
    collect(engine)
