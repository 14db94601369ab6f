"""An image-text-to-text checkpoint (Gemma-3 4B-27B) is served as its text decoder: the same modules, the same
logits on text, the vision tower gone; any other model is left as loaded."""

from __future__ import annotations

import logging

import torch

from proxy_engine.text_model import text_model
from tests.conformance.families import gemma3_vision_config, llama_config


def _gemma3_vision():
    torch.manual_seed(0)
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration(gemma3_vision_config(96, 2, 64, bos_token_id=1, eos_token_id=2,
                                                                pad_token_id=0)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(-0.5, 0.5)  # Gemma's (1 + w): drawn, so a lost offset shows
    return model


def test_the_text_decoder_of_a_vision_model_is_served_with_the_same_modules_and_logits(caplog):
    wrapper = _gemma3_vision()
    ids = torch.tensor([[1, 7, 30, 12, 64, 5, 9, 40, 41, 42]])  # longer than the window (6): local layers bind
    with torch.no_grad():
        expected = wrapper(input_ids=ids).logits
    vision = {id(p) for p in wrapper.model.vision_tower.parameters()}
    with caplog.at_level(logging.INFO, logger="proxy_engine.text_model"):
        served = text_model(wrapper, "base")
    assert type(served).__name__ == "Gemma3ForCausalLM" and served.config is wrapper.config.text_config
    assert served.model is wrapper.model.language_model and served.lm_head is wrapper.lm_head
    assert served.lm_head.weight is served.model.embed_tokens.weight  # the tie survives
    assert not any(p.device.type == "meta" for p in served.parameters())
    assert not vision & {id(p) for p in served.parameters()}
    assert "vision tower and projector dropped" in caplog.text and "Gemma3ForConditionalGeneration" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, expected)


def test_a_sharded_wrapper_s_device_map_is_renamed_for_the_text_model():
    wrapper = _gemma3_vision()
    wrapper.hf_device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                             "model.language_model.embed_tokens": 0, "model.language_model.layers.0": 0,
                             "model.language_model.layers.1": 1, "lm_head": 1}
    served = text_model(wrapper)
    assert served.hf_device_map == {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}


def test_other_models_are_left_as_loaded(caplog):
    from transformers import AutoModelForCausalLM, LlamaModel

    llama = AutoModelForCausalLM.from_config(llama_config(64, 1, 32))
    assert text_model(llama) is llama
    # A wrapper whose decoder is not the module transformers' text-only class holds: served whole, and said so.
    wrapper = _gemma3_vision()
    wrapper.model.language_model = LlamaModel(llama_config(96, 1, 32))
    with caplog.at_level(logging.WARNING, logger="proxy_engine.text_model"):
        assert text_model(wrapper, "expert") is wrapper
    assert "serving the whole model" in caplog.text


def test_the_auto_class_follows_what_transformers_loads_each_type_with():
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from proxy_engine.text_model import auto_class

    assert auto_class("llama") is AutoModelForCausalLM and auto_class(None) is AutoModelForCausalLM
    assert auto_class("gemma3") is AutoModelForCausalLM  # it maps gemma3 to the vision wrapper itself
    assert auto_class("mistral3") is AutoModelForImageTextToText and auto_class("llava") is AutoModelForImageTextToText


def test_a_wrapper_without_a_text_only_class_is_refused_by_name():
    """Qwen2.5-VL's decoder (3-D rotary positions) has no causal-LM class: a clear error at load, not a crash in
    the engine."""
    import pytest
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope",
                                                                                   "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32))
    model = Qwen2_5_VLForConditionalGeneration(config)
    with pytest.raises(ValueError, match="base: Qwen2_5_VLForConditionalGeneration wraps a text decoder"):
        text_model(model, "base")


def test_a_llava_wrapper_serves_its_llama_decoder():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    wrapper = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision.to_dict(),
                                                        text_config=llama_config(96, 2, 32).to_dict(),
                                                        image_token_index=95)).eval()
    ids = torch.tensor([[1, 7, 30, 12, 64, 5, 9]])
    with torch.no_grad():
        expected = wrapper(input_ids=ids).logits
        served = text_model(wrapper)
        assert type(served).__name__ == "LlamaForCausalLM" and served.model is wrapper.model.language_model
        torch.testing.assert_close(served(input_ids=ids).logits, expected)
