"""Memory arithmetic: parameter counts from config.json shapes (with the families' quirks), bytes per
parameter at a dtype or quantization, KV-cache bytes per token, and memory sizes as people write them.

Exact for the Llama / Mistral / Qwen2 families (it reproduces their published counts); close for GPT-2, GPT-NeoX
style and Mixtral / Qwen-MoE style models. Reads a few KB of files at most; loads no weight.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy_engine.config import ModelConfig
from proxy_engine.model_files import text_config

GiB = 1024**3

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

# Bytes per parameter of a quantized linear weight. 8-bit (LLM.int8): one byte plus a per-row scale (ignored).
# 4-bit (NF4/FP4): half a byte plus one fp32 absmax per block of 64 weights (4 / 64 bytes).
QUANT_BYTES: dict[str, float] = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}

# Families whose MLP is a plain up/down projection (not gated) and whose norms are LayerNorms with a bias.
_NON_GATED = {"gpt2", "gpt_bigcode", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "codegen"}
# Families with learned absolute position embeddings.
_ABSOLUTE_POSITIONS = {"gpt2", "gpt_bigcode", "opt"}
# Families whose config class defaults tie_word_embeddings to False (the transformers default is True).
_UNTIED_BY_DEFAULT = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo", "olmo2",
    "gpt_neox", "falcon", "cohere", "starcoder2",
}
# Families with a bias on the q, k and v projections whatever the config says.
_QKV_BIAS = {"qwen2", "qwen2_moe"}
# Families with RMSNorm on q and k per head.
_QK_NORM = {"qwen3", "qwen3_moe", "olmo2"}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Sizes of one model, from its config.json (or, failing that, its safetensors headers)."""

    parameters: int
    quantizable_parameters: int  # the transformer blocks' linear weights (what bitsandbytes quantizes)
    weight_bytes: int  # at the resolved dtype and quantization
    kv_bytes_per_token: int  # K and V, all layers, at the compute dtype; 0 when unknown
    source: str  # "config.json", "safetensors" or "gguf" (the header's tensor shapes)


def parse_size(value: str | int) -> int:
    """'20GiB' -> 21474836480, '500MB' -> 500000000, 1024 -> 1024. Raises ValueError on anything else."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"not a memory size: {value!r} (use e.g. '20GiB' or '500MB')")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])

def gib(n: int | float | None) -> str:
    if n is None:
        return "?"
    value = n / GiB
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.2g}"

def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return None

def config_dtype(cfg: dict[str, Any] | None) -> str | None:
    """The checkpoint's dtype as config.json states it (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    if not cfg:
        return None
    for source in (cfg, cfg.get("text_config") or {}):
        value = source.get("dtype") or source.get("torch_dtype")
        if isinstance(value, str):
            value = value.removeprefix("torch.")
            if value in DTYPE_BYTES:
                return value
    return None

def resolve_dtype(model: ModelConfig, cfg: dict[str, Any] | None) -> str:
    """An explicit dtype as given; ``auto`` -> the checkpoint's dtype, or float32 when it names none.

    This is what ``from_pretrained(dtype="auto")`` does too, so the plan and the loader agree.
    """
    if model.dtype != "auto":
        return model.dtype
    return config_dtype(cfg) or "float32"

def count_parameters(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """``(total, quantizable)`` parameter counts from a config.json dict, or None if its shape keys are missing.

    Exact for the Llama / Mistral / Qwen2 families (it reproduces their published counts); close for GPT-2,
    GPT-NeoX style and Mixtral / Qwen-MoE style models. ``quantizable`` counts the transformer blocks' linear
    weights, which is what bitsandbytes replaces (embeddings, norms, biases and the LM head stay unquantized).
    """
    cfg = text_config(cfg)
    model_type = str(cfg.get("model_type") or "")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head")
    vocab = cfg.get("vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
        return None
    kv_heads = _first(cfg, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if cfg.get("multi_query") else heads
    head_dim = cfg.get("head_dim") or hidden // heads
    intermediate = _first(cfg, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size") or 4 * hidden
    gated = model_type not in _NON_GATED
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = model_type not in _UNTIED_BY_DEFAULT

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attn_linear = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    attn_bias = 0
    if cfg.get("attention_bias") or not gated:
        attn_bias = q_out + 2 * kv_out + hidden
    elif model_type in _QKV_BIAS:
        attn_bias = q_out + 2 * kv_out
    qk_norm = 2 * head_dim if model_type in _QK_NORM else 0

    def mlp(inner: int) -> tuple[int, int]:
        if gated:
            return 3 * hidden * inner, (2 * inner + hidden if cfg.get("mlp_bias") else 0)
        return 2 * hidden * inner, inner + hidden

    n_experts = _first(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    if isinstance(n_experts, int) and n_experts > 1:
        expert_inner = cfg.get("moe_intermediate_size") or intermediate
        e_linear, e_bias = mlp(expert_inner)
        mlp_linear, mlp_bias = n_experts * e_linear, n_experts * e_bias
        router = hidden * n_experts
        shared_inner = cfg.get("shared_expert_intermediate_size")
        if shared_inner:
            s_linear, s_bias = mlp(shared_inner)
            mlp_linear += s_linear
            mlp_bias += s_bias
            router += hidden  # the shared expert's gate
    else:
        mlp_linear, mlp_bias = mlp(intermediate)
        router = 0
    norm = 2 * hidden if not gated else hidden  # LayerNorm has a bias, RMSNorm has not

    per_layer_linear = attn_linear + mlp_linear
    per_layer_other = attn_bias + qk_norm + mlp_bias + router + 2 * norm
    embeddings = vocab * hidden
    if model_type in _ABSOLUTE_POSITIONS:
        embeddings += (_first(cfg, "max_position_embeddings", "n_positions") or 0) * hidden
    lm_head = 0 if tied else vocab * hidden
    total = layers * (per_layer_linear + per_layer_other) + embeddings + lm_head + norm
    return total, layers * per_layer_linear

def kv_elements_per_token(cfg: dict[str, Any]) -> int:
    """Elements of K and V cached per token over all layers (0 when the config lacks the shapes)."""
    cfg = text_config(cfg)
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads)):
        return 0
    if cfg.get("kv_lora_rank") and cfg.get("qk_rope_head_dim") is not None:
        # Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): transformers caches the compressed latents, one
        # "head" each, in the K and V places: the kv_lora_rank-wide latent and the RoPE key part.
        return layers * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
    layers -= cfg.get("num_kv_shared_layers") or 0  # Gemma-3n's last layers reuse an earlier layer's K/V
    kv_heads = _first(cfg, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if cfg.get("multi_query") else heads
    head_dim = cfg.get("head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim


def kv_bytes_per_token(cfg: dict[str, Any], dtype: str) -> int:
    """Bytes of K and V per token over all layers (0 when the config lacks the shapes)."""
    return kv_elements_per_token(cfg) * DTYPE_BYTES[dtype]


def count_safetensors_parameters(directory: Path) -> int | None:
    """Exact parameter count from the safetensors headers (a few KB read per file; no tensor is loaded)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error):
            return None
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info.get("shape", []))
    return total

def estimate_memory(
    cfg: dict[str, Any] | None, dtype: str, quantization: str = "none", directory: Path | None = None
) -> MemoryEstimate | None:
    counted = count_parameters(cfg) if cfg else None
    source = "config.json"
    if counted is None and directory is not None:
        exact = count_safetensors_parameters(directory)
        if exact is None:
            return None
        # Without the shapes we cannot tell linear weights apart: treat all as quantizable (a lower bound).
        counted, source = (exact, exact), "safetensors"
    if counted is None:
        return None
    return counted_memory(counted, cfg, dtype, quantization, source)

def counted_memory(
    counted: tuple[int, int], cfg: dict[str, Any] | None, dtype: str, quantization: str, source: str
) -> MemoryEstimate:
    """The estimate for ``(total, quantizable)`` parameters held at ``dtype`` (and ``quantization``)."""
    total, quantizable = counted
    unit = DTYPE_BYTES[dtype]
    if quantization in QUANT_BYTES:
        weight_bytes = int(quantizable * QUANT_BYTES[quantization] + (total - quantizable) * unit)
    else:
        weight_bytes = total * unit
    return MemoryEstimate(
        parameters=total,
        quantizable_parameters=quantizable,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_bytes_per_token(cfg, dtype) if cfg else 0,
        source=source,
    )
