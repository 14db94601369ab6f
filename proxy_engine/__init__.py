"""Proxy-tuning engine: a large base model steered by small expert / anti-expert pairs.

    s = s_base + sum_i alpha_i * (s_expert_i - s_anti_i)

The three (or more) models run in lockstep with continuous batching; each keeps its own KV cache and its own
view of the prompt. This package never imports a web framework: ``server/`` sits on top of ``AsyncEngine``.
"""

from proxy_engine.config import EngineConfig, ExpertPairConfig, LimitsConfig, ModelConfig
from proxy_engine.request import (
    EngineOverloadedError,
    FinishReason,
    PromptInput,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "EngineConfig",
    "EngineOverloadedError",
    "ExpertPairConfig",
    "FinishReason",
    "LimitsConfig",
    "ModelConfig",
    "PromptInput",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
