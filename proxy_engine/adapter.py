"""A model given as a PEFT adapter (LoRA and its kin) over a checkpoint, merged into the checkpoint's weights at load.

Most fine-tunes of a small model are published as a LoRA adapter, and the expert of a proxy-tuning pair is by
definition the anti-expert after tuning. So ``--expert ./my-lora --anti-expert ./small-model`` serves: the
expert's ``path`` becomes the anti-expert's checkpoint and its ``adapter`` the LoRA (``resolve_pair``, applied by
``EngineConfig``'s validation, so the loader, the placement plan and ``--check`` all see the same thing). Any
model may also name an ``adapter`` over its ``path`` in the config file.

The merge happens once, at load (``merge_adapter``: peft's ``merge_and_unload``), so the merged model decodes on
every path exactly as a saved fine-tune would (the fast CPU step, the static CUDA-graph step, transformers'
forward). It costs a second copy of the small model's weights, as a saved fine-tune does; sharing them between
the expert and the anti-expert (LoRA applied unmerged) is not built.

An adapter that ships a tokenizer (most instruct LoRAs save one, holding the chat template the tuning used) is the
model's tokenizer unless ``tokenizer`` names another. This module imports no torch at import time (the server
validates configs through it).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from proxy_engine.model_files import looks_like_hub_id

if TYPE_CHECKING:
    import torch

    from proxy_engine.config import ExpertPairConfig, ModelConfig

log = logging.getLogger("proxy_engine.adapter")

ADAPTER_CONFIG = "adapter_config.json"


def find_adapter(path: str, revision: str | None = None) -> Path | None:
    """The directory of the PEFT adapter at ``path`` (a local directory, or a hub id whose snapshot is in the local
    cache), or None when ``path`` holds none. A directory with a ``config.json`` is a model, not an adapter."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local if (local / ADAPTER_CONFIG).is_file() and not (local / "config.json").is_file() else None
    if local.exists() or not looks_like_hub_id(path):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        cached = try_to_load_from_cache(path, ADAPTER_CONFIG, revision=revision)
        model = try_to_load_from_cache(path, "config.json", revision=revision)
    except HFValidationError:
        return None
    return Path(cached).parent if isinstance(cached, str) and not isinstance(model, str) else None


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file()


def resolve_model(model: ModelConfig, where: str) -> ModelConfig:
    """``model`` with its ``adapter`` checked; the adapter's own tokenizer, when it ships one and ``tokenizer`` is
    unset. ``ValueError`` naming ``where`` for an adapter that cannot be found, or one over a quantized model."""
    if model.adapter is None:
        return model
    directory = find_adapter(model.adapter)
    if directory is None:
        raise ValueError(f"{where}.adapter: {model.adapter} is not a PEFT adapter (a directory holding "
                         f"{ADAPTER_CONFIG}, or a hub id cached with one); this server never downloads")
    if model.quantization != "none":
        raise ValueError(f"{where}.adapter: an adapter cannot be merged into {model.quantization} weights; merge it "
                         "into the checkpoint first, or load the model unquantized")
    if model.tokenizer is None and has_tokenizer(directory):
        return model.model_copy(update={"tokenizer": str(directory)})
    return model


def resolve_pair(pair: ExpertPairConfig, index: int) -> ExpertPairConfig:
    """An expert whose ``path`` is an adapter becomes the anti-expert's checkpoint with that adapter; each model's
    ``adapter`` is then checked (``resolve_model``)."""
    expert = pair.expert
    if expert.adapter is None and find_adapter(expert.path, expert.revision) is not None:
        anti = pair.anti_expert
        expert = expert.model_copy(update={"adapter": expert.path, "path": anti.path, "gguf_file": anti.gguf_file,
                                           "revision": anti.revision})
    where = f"experts.{index}"
    return pair.model_copy(update={"expert": resolve_model(expert, f"{where}.expert"),
                                   "anti_expert": resolve_model(pair.anti_expert, f"{where}.anti_expert")})


def merge_adapter(model: torch.nn.Module, adapter: str, role: str) -> torch.nn.Module:
    """``model`` with the adapter at ``adapter`` merged into its weights (peft's ``merge_and_unload``, checked for
    non-finite values). ``ValueError`` naming the role for an adapter that adds virtual tokens instead of weights
    (prompt or prefix tuning), or one that does not fit the model (another architecture or size)."""
    directory = find_adapter(adapter)
    if directory is None:  # resolve_model checked it; the files went away since
        raise ValueError(f"{role}: the adapter {adapter} is gone")
    try:
        from peft import PeftConfig, PeftModel
    except ImportError as error:  # pragma: no cover - a core dependency
        raise ImportError("merging an adapter needs peft (pip install peft)") from error
    settings = PeftConfig.from_pretrained(str(directory))  # adapter_config.json, read once
    kind = str(getattr(settings.peft_type, "value", settings.peft_type))
    trained_over = settings.base_model_name_or_path
    if settings.is_prompt_learning:
        raise ValueError(f"{role}: the adapter {adapter} is {kind}, which adds virtual prompt tokens instead of "
                         "changing weights, so it cannot be merged; LoRA-family adapters (LORA, LOHA, LOKR, IA3, "
                         "...) can")
    log.info("merging the %s adapter %s (r=%s, trained over %s) into the %s model", kind, adapter,
             getattr(settings, "r", "?"), trained_over or "?", role)
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x: not the deployer's concern
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = PeftModel.from_pretrained(model, str(directory), is_trainable=False)
            return wrapped.merge_and_unload(safe_merge=True)
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{role}: the adapter {adapter} does not fit this model (trained over "
                         f"{trained_over or 'another model'}?): {first}") from error
