"""Default sampling parameters from a model's ``generation_config.json``, as vLLM's ``--generation-config``.

A request that omits a field gets the model's recommended value; a field the request sends always wins.
``engine.generation_config`` (``--generation-config``) says where the values come from:

- ``auto`` (the default): each model id from its own model's file: ``NAME`` (proxy-tuned) and ``NAME:expert``
  from the (first) expert's, ``NAME:base`` from the base's, a named pair's ``NAME:PAIR`` and ``NAME:PAIR:expert``
  from that pair's expert's. The proxy-tuned model answers as the tuned model
  does, and the expert is where that tuning lives: a chat expert's file holds its authors' chat settings
  (Llama-2-chat: temperature 0.6, top_p 0.9), while a pretrained base's is about plain continuation (Qwen2.5's
  base says greedy). With no expert pair, every id takes the base's.
- ``vllm`` or ``none``: no defaults (OpenAI's: temperature 1, top_p 1, no top_k / min_p / repetition penalty).
- a folder: that folder's ``generation_config.json``, for every model id.

Read as vLLM reads them: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` (a value equal to
transformers' own default is no recommendation, and is skipped), and ``max_new_tokens``: the most tokens a request
that sends no ``max_tokens`` gets (chat and Responses; a completion keeps OpenAI's default of 16), capped by the
context left rather than refused. One addition: ``"do_sample": false`` written in the file makes the default
greedy (temperature 0), which is what transformers' ``generate`` does with that file; vLLM ignores it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy_engine.adapter import find_adapter
from proxy_engine.config import EngineConfig, ModelConfig
from proxy_engine.model_files import locate, read_generation_config
from proxy_engine.request import Serves, Target, served_targets

log = logging.getLogger("proxy_engine")

OFF = ("vllm", "none")
# generation_config.json key -> request field; and transformers' defaults, which recommend nothing.
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
TRANSFORMERS_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class SamplingDefaults:
    """The defaults one model id gets, and the file they were read from (for the start-up log)."""

    values: dict[str, Any] = field(default_factory=dict)
    source: str | None = None


def from_generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """The request fields a ``generation_config.json`` recommends (see the module docstring)."""
    values = {
        name: config[key] for key, name in FIELDS.items()
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool)
        and config[key] != TRANSFORMERS_DEFAULTS.get(key)
    }
    if config.get("do_sample") is False:
        values["temperature"] = 0.0
    return values


def _read(model: ModelConfig) -> SamplingDefaults:
    """The defaults in ``model``'s own folder (or its snapshot in the hub cache), its adapter's first (a fine-tune's
    recommended sampling, over the untuned checkpoint's); none if neither has the file."""
    adapter = find_adapter(model.adapter) if model.adapter is not None else None
    for directory in (adapter, locate(model)[1]):
        config = read_generation_config(directory) if directory is not None else None
        if config:
            return SamplingDefaults(from_generation_config(config), str(directory / "generation_config.json"))
    return SamplingDefaults()


def sampling_defaults(config: EngineConfig) -> dict[Target, SamplingDefaults]:
    """Each served target's defaults under ``config.generation_config`` (empty ones when it is ``vllm`` /
    ``none``): under ``auto``, a target that involves an expert pair takes the expert's (the first pair's when it
    involves them all), the base alone the base's."""
    targets = served_targets(config)
    setting = config.generation_config
    if setting in OFF:
        return {target: SamplingDefaults() for target in targets}
    if setting != "auto":
        folder = Path(setting).expanduser()
        shared = SamplingDefaults(from_generation_config(read_generation_config(folder) or {}),
                                  str(folder / "generation_config.json"))
        return {target: shared for target in targets}
    base = _read(config.base)
    experts = [_read(pair.expert) for pair in config.experts]
    return {target: base if target.serves is Serves.BASE or not experts else experts[target.expert_pair]
            for target in targets}


def describe(defaults: dict[Target, SamplingDefaults], names: dict[Target, str]) -> list[str]:
    """One start-up line per model id whose defaults come from a file, e.g.
    ``proxy-tuned: temperature=0.0 (from demo/models/expert/generation_config.json)``."""
    lines = []
    for target, name in names.items():
        found = defaults.get(target)
        if found is not None and found.values:
            shown = ", ".join(f"{key}={value}" for key, value in found.values.items())
            lines.append(f"{name}: {shown} (from {found.source})")
    return lines
