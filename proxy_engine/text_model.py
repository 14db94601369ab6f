"""The language model inside an image-text-to-text checkpoint, served as the plain causal LM it is.

Gemma-3 from 4B up ships as ``Gemma3ForConditionalGeneration`` (and ``AutoModelForCausalLM`` loads it as such),
Mistral-Small-3.1 as ``Mistral3ForConditionalGeneration`` (which only ``AutoModelForImageTextToText`` loads:
``auto_class``): a vision tower, a projector, and a text decoder at ``model.language_model`` with the head at
``lm_head``. The server takes text only, so for it the model is the text decoder and its head; every part of the
engine that reads a model's config or layers (the runner, the decode steps, the prefix cache) reads the decoder's.
``text_model`` rebuilds the text-only class transformers has for that decoder (``Gemma3ForCausalLM``,
``MistralForCausalLM``) around the loaded modules: no weight is copied, the shell is built on the meta device, and
the vision tower is dropped with the wrapper. On text the two compute the same logits: the wrapper embeds the
ids with the decoder's own embedding and runs the decoder with a causal mask (its bidirectional image spans need
image tokens). A wrapper whose decoder has no text-only class (Qwen2.5-VL's, with its 3-D rotary positions) is
refused at load.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("proxy_engine.text_model")


def auto_class(model_type: str | None) -> type:
    """The transformers auto class that loads a checkpoint of ``model_type``: ``AutoModelForCausalLM``, or
    ``AutoModelForImageTextToText`` for the image-text-to-text types only it knows (Mistral-Small-3.1's
    ``mistral3``, LLaVA), whose text decoder ``text_model`` then takes out."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if model_type and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
            model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def text_model_class(model: torch.nn.Module) -> type | None:
    """transformers' causal-LM class for ``model``'s text decoder, when ``model`` wraps one; else None."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    decoder = getattr(getattr(model, "model", None), "language_model", None)
    if text_config is None or decoder is None or getattr(model, "lm_head", None) is None:
        return None
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(text_config, "model_type", ""))
    cls = getattr(transformers, name, None) if name else None
    if cls is None or cls is type(model):
        return None
    return cls


def text_model(model: torch.nn.Module, role: str = "model") -> torch.nn.Module:
    """``model``'s text decoder and head as their own causal LM (see the module docstring), or ``model`` itself
    when it is not an image-text-to-text wrapper or transformers has no text-only class for its decoder."""
    cls = text_model_class(model)
    if cls is None:
        if _wrapper(model):
            raise ValueError(
                f"{role}: {type(model).__name__} wraps a text decoder "
                f"({type(getattr(model.config, 'text_config', None)).__name__}) that transformers has no causal-LM "
                f"class for, so it cannot be served as text; use a text-only checkpoint of the family")
        return model
    decoder = model.model.language_model
    with torch.device("meta"):
        shell = cls._from_config(model.config.text_config)
    if type(shell.model) is not type(decoder):  # not the module the text-only class is built on: keep the wrapper
        log.warning("%s: %s's text decoder is a %s, not the %s that %s holds; serving the whole model",
                    role, type(model).__name__, type(decoder).__name__, type(shell.model).__name__, cls.__name__)
        return model
    dropped = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in decoder.parameters())
    dropped -= 0 if _tied(model) else model.lm_head.weight.numel()
    shell.model = decoder
    shell.lm_head = model.lm_head
    shell.generation_config = model.generation_config
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict):  # where input_device() looks for the first shard, under the shell's names
        shell.hf_device_map = {key.replace("model.language_model", "model", 1): value for key, value in
                               device_map.items() if key.startswith(("model.language_model", "lm_head"))}
    log.info("%s: serving the text decoder of %s as %s (%.1fM parameters of vision tower and projector dropped; "
             "requests are text only)", role, type(model).__name__, cls.__name__, dropped / 1e6)
    return shell.eval()


def _wrapper(model: torch.nn.Module) -> bool:
    """A model whose config nests its language model's (no layer count of its own): the engine cannot run it."""
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) is not None and getattr(config, "num_hidden_layers", None) is None


def _tied(model: torch.nn.Module) -> bool:
    embeddings = model.get_input_embeddings()
    return embeddings is not None and embeddings.weight is model.lm_head.weight
