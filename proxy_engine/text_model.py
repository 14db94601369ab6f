"""The language model inside an image-text-to-text checkpoint, served as the plain causal LM it is.

Gemma-3 from 4B up ships as ``Gemma3ForConditionalGeneration`` (and ``AutoModelForCausalLM`` loads it as such):
a vision tower, a projector, and a text decoder at ``model.language_model`` with the head at ``lm_head``. The
server takes text only, so for it the model is the text decoder and its head; every part of the engine that
reads a model's config or layers (the runner, the decode steps, the prefix cache) reads the decoder's.
``text_model`` rebuilds the text-only class transformers has for that decoder (``Gemma3ForCausalLM``) around the
loaded modules: no weight is copied, the shell is built on the meta device, and the vision tower is dropped with
the wrapper. On text the two compute the same logits: the wrapper embeds the ids with the decoder's own
embedding and runs the decoder with a causal mask (its bidirectional image spans need image tokens).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("proxy_engine.text_model")


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


def _tied(model: torch.nn.Module) -> bool:
    embeddings = model.get_input_embeddings()
    return embeddings is not None and embeddings.weight is model.lm_head.weight
