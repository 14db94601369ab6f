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

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from proxy_engine.model_files import looks_like_hub_id

if TYPE_CHECKING:
    import torch

    from proxy_engine.config import EngineConfig, ExpertPairConfig, ModelConfig

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


def running_checkpoints(config: EngineConfig) -> list[ModelConfig]:
    """The checkpoints an adapter added beside the configured pairs may run over: the base's and each
    anti-expert's that has no adapter of its own, once each."""
    found: list[ModelConfig] = []
    for model in (config.base, *(pair.anti_expert for pair in config.experts)):
        if model.adapter is None and model not in found:
            found.append(model)
    return found


def trained_over(directory: Path) -> str | None:
    """The checkpoint an adapter's config names as the one it was trained over, if it says."""
    try:
        return json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def _same_checkpoint(path: str, other: str | None) -> bool:
    if not other:
        return False
    if path == other:
        return True
    a, b = Path(path).expanduser(), Path(other).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _has_template(directory: Path, anti: ModelConfig) -> bool:
    """Whether the adapter's model has a chat template: its own tokenizer's, or else the checkpoint's."""
    from proxy_engine.model_files import has_chat_template, locate

    if has_tokenizer(directory):
        return has_chat_template(directory)
    if anti.chat_template:
        return True
    source = Path(anti.tokenizer).expanduser() if anti.tokenizer else locate(anti)[1]
    return source is not None and source.is_dir() and has_chat_template(source)


def adapter_pair(config: EngineConfig, name: str, directory: Path, *, anti_expert: str | None = None,
                 alpha: float = 1.0, prompt_format: str | None = None) -> ExpertPairConfig:
    """The expert pair that serves the adapter at ``directory`` under ``name`` alone (vLLM's ``--lora-modules`` and
    runtime LoRA loading): out of the default combination, its expert the adapter over a running checkpoint.

    That checkpoint (its anti-expert): the one ``anti_expert`` names, else the one the adapter says it was trained
    over, else the configuration's only anti-expert, else (no pair configured) the base, whose own LoRA the pair then
    is (at alpha 1 it answers as the base with the LoRA merged would, in logit space). Its prompt format: as
    ``prompt_format`` says, else as the configured experts read (a chat-tuned expert reads its template) where the
    adapter's model has a chat template (its own tokenizer's or the checkpoint's), else as the checkpoint does.
    ``FieldError`` naming ``anti_expert`` or ``lora_name`` for what does not fit."""
    from proxy_engine.config import ExpertPairConfig
    from proxy_engine.request import FieldError

    checkpoints = running_checkpoints(config)
    paths = ", ".join(model.path for model in checkpoints)
    if anti_expert is not None:
        chosen = [model for model in checkpoints if _same_checkpoint(model.path, anti_expert)]
        if not chosen:
            raise FieldError(f"anti_expert {anti_expert[:200]!r} is not a checkpoint this server runs: one of "
                             f"{paths}", "anti_expert")
    else:
        over = trained_over(directory)
        chosen = [model for model in checkpoints if _same_checkpoint(model.path, over)]
        antis = [model for model in checkpoints if model != config.base]
        chosen = chosen or (antis if len(antis) == 1 else [] if antis else [config.base])
        if not chosen:
            raise FieldError(f"the adapter {directory} says it was trained over {over or 'no checkpoint'}, which "
                             f"this server does not run; name the checkpoint it runs over (anti_expert): one of "
                             f"{paths}", "anti_expert")
    anti = chosen[0]
    if prompt_format is None:
        formats = {pair.expert.prompt_format for pair in config.experts if pair.name is not None or pair.in_default}
        prompt_format = formats.pop() if len(formats) == 1 else anti.prompt_format
        if prompt_format == "chat" and not _has_template(directory, anti):
            prompt_format = "plain"  # a LoRA of a base model, beside chat experts: nothing to render chat with
    from pydantic import ValidationError

    try:
        return ExpertPairConfig(expert=anti.model_copy(update={"adapter": str(directory),
                                                              "prompt_format": prompt_format}),
                                anti_expert=anti, alpha=alpha, name=name, in_default=False)
    except ValidationError as error:
        raise FieldError(f"{name[:64]!r}: {error.errors()[0]['msg']}", "lora_name") from None


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
    except Exception as error:
        from proxy_engine.lora import read_weights_error

        if (unreadable := read_weights_error(directory, error)) is not None:
            raise unreadable from error
        if not isinstance(error, RuntimeError | ValueError | KeyError):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{role}: the adapter {adapter} does not fit this model (trained over "
                         f"{trained_over or 'another model'}?): {first}") from error
