"""Decode-step attention masks for models that run through transformers' forward.

A decode step's rows have different lengths (each row's tokens sit at columns ``[0, length)`` of its slot), so
the step passes a prepared mask and transformers uses it as is, for every layer. Two things follow:

- it must be *additive* (0 where a key is seen, the dtype's minimum where not): eager attention (Gemma-2,
  gpt-oss, anything with soft-capping) adds the mask to the scores, so a boolean mask would add 1 to the
  visible keys and 0 to the hidden ones, hiding nothing;
- it must carry the model's sliding window (Mistral v0.1, Qwen2 with ``use_sliding_window``, Gemma-2's local
  layers): transformers only builds windowed masks itself. Models whose layers mix full and sliding attention
  get one mask per layer type, the ``{layer_type: mask}`` mapping their forward accepts.

ALiBi models (BLOOM, MPT, Falcon-RW) are the exception: their forward derives the ALiBi bias from a 2-D padding
mask (which columns hold a token), so they get that, ``[n, span]`` of ones and zeros; transformers builds the
causal part from it, and a decode step's single query never sees past its own column either way.

Absolute positions equal slot columns, so "row r sees column c" is ``c <= pos_r`` and, within a window ``w``,
``c > pos_r - w`` (transformers' ``sliding_window_overlay``).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("proxy_engine.attention_masks")

FULL = "full_attention"
SLIDING = "sliding_attention"


def sliding_window(config) -> int | None:
    """The model's attention window in tokens, or None when every layer attends to the whole context."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


# Families with layers that keep a recurrent state instead of keys and values (state-space, linear attention,
# convolution), for checkpoints whose config.json lists no layer types (transformers' config class derives them).
RECURRENT_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma", "falcon_h1", "bamba", "nemotron_h",
    "zamba", "zamba2", "jamba", "plamo2", "lfm2", "lfm2_moe", "qwen3_next", "kimi_linear", "minimax",
    "granitemoehybrid",
})


def unsupported_layers(model_type: str | None, layer_types: list[str] | None) -> str | None:
    """Why the engine cannot batch a model with these layers (None when every layer is full or sliding-window
    attention): its caches hold each layer's keys and values by column, which a recurrent state (Mamba, linear
    attention, convolution) is not, and Llama-4's chunked attention restarts at absolute positions that left-padded
    prefill shifts."""
    other = sorted(set(layer_types or []) - {FULL, SLIDING})
    if not other and model_type not in RECURRENT_MODEL_TYPES:
        return None
    what = ", ".join(other) if other else "recurrent-state"
    return (f"{model_type or 'the model'} has {what} layers; the engine serves decoders whose every layer is full or "
            f"sliding-window attention (it caches their keys and values by position)")


def layer_kinds(config) -> set[str]:
    """The attention kinds of the model's layers (``full_attention`` / ``sliding_attention``)."""
    kinds = set(getattr(config, "layer_types", None) or [])
    reason = unsupported_layers(getattr(config, "model_type", None), list(kinds))
    if reason is not None:
        raise ValueError(reason)
    if not kinds:
        return {SLIDING if sliding_window(config) else FULL}
    return kinds


def uses_alibi(config) -> bool:
    """Whether the model biases attention with ALiBi, computed in its forward from a 2-D padding mask."""
    attn_config = getattr(config, "attn_config", None)  # MPT keeps it there
    return (getattr(config, "model_type", None) == "bloom" or getattr(config, "alibi", False) is True
            or getattr(attn_config, "alibi", False) is True)


def visible(positions: torch.Tensor, span: int, window: int | None) -> torch.Tensor:
    """``[n, span]`` bool: which columns each row's new token sees (its position is ``positions[r]``)."""
    columns = torch.arange(span, device=positions.device)[None, :]
    seen = columns <= positions[:, None]
    if window is not None:
        seen &= columns > positions[:, None] - window
    return seen


def additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, 1, 1, span]`` in ``dtype``: 0 where seen, the dtype's minimum where not."""
    hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=seen.device)
    return torch.where(seen, torch.zeros((), dtype=dtype, device=seen.device), hidden)[:, None, None, :]


class DecodeMasks:
    """Builds one decode step's mask argument for a model (a tensor, a per-layer-type mapping, or None)."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        self.kinds = layer_kinds(config)
        self.window = sliding_window(config)
        if SLIDING in self.kinds and self.window is None:
            raise ValueError("the model has sliding-attention layers but no sliding_window")
        self.dtype = dtype if dtype.is_floating_point else torch.float32
        self.padding = uses_alibi(config)

    @property
    def windowed(self) -> bool:
        return SLIDING in self.kinds

    def build(self, positions: torch.Tensor, span: int, uniform: bool):
        """None when every row has one length and no layer has a window (transformers' own causal mask is then
        exact and the cheapest); otherwise additive masks, or an ALiBi model's 2-D padding mask."""
        if uniform and not self.windowed:
            return None
        if self.padding:
            return visible(positions, span, None).long()
        masks = {}
        for kind in self.kinds:
            masks[kind] = additive(visible(positions, span, self.window if kind == SLIDING else None), self.dtype)
        if len(masks) == 1:
            return next(iter(masks.values()))
        return masks
