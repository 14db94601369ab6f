"""A decode step for Llama-family models that calls the model's own weights without its module stack.

transformers' forward costs a fixed amount of Python per layer (module calls, keyword plumbing, decorators,
mask and cache dispatch) whatever the batch: for the small expert / anti-expert it was most of their decode
time (a 4-layer, 3.7M-parameter model: 2.0 ms per step at one row, 1.2 ms with this path), and 5-8% of
the base's. Prefill, and every architecture not recognised here, still run through transformers.

The math is the model's, op for op: RMSNorm in float32 then the weight, rotary embeddings from the model's own
``rotary_emb`` (every RoPE scaling type), SDPA with the module's scaling (grouped-query heads included),
SiLU-gated MLP, the final norm and the head cut to the shared vocabulary. The weights are not copied.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from proxy_engine.config import PACKED_WEIGHTS_ENV

log = logging.getLogger("proxy_engine.fast_decode")

PACKED_MIN_ROWS = 4  # below this many rows the plain (row-major) GEMM is as fast or faster
_PACKED_MEMORY_SHARE = 0.1  # unset: pack when the copies take at most this share of physical memory

# Architectures whose decoder layer is exactly: RMSNorm -> q/k/v (bias allowed) -> RoPE -> attention -> o ->
# residual -> RMSNorm -> down(act(gate) * up) -> residual.
_SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: float32 statistics, then the weight in the input dtype."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PackedLinear:
    """``y = x W^T + b`` on a oneDNN pre-packed copy of ``W`` (used from ``PACKED_MIN_ROWS`` rows on).

    On the CPU, MKL's float32 GEMM on a row-major ``[N, K]`` weight is slow for a handful of rows (4-64: the
    decode batch); the same weight reordered once into oneDNN's blocked layout cut the decode step by 7-8%
    at 16 rows (more with q/k/v and gate/up fused into one packed GEMM each), but was 18% slower at one row,
    so one to three rows keep the plain GEMM on the model's own weights. The packed copies double the memory
    of the linear weights: see ``packing_allowed``.
    """

    __slots__ = ("bias", "packed")

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> None:
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
        if all(b is None for b in biases):
            self.bias = None
        else:
            parts = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
            self.bias = torch.cat(parts).detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packing_allowed(model: torch.nn.Module, name: str, setting: bool | None = None) -> bool:
    """Whether to keep oneDNN-packed copies of the linear weights (CPU, float32, and memory to spare).

    ``setting`` (``RuntimeConfig.packed_weights``): False never, True always, None when the copies are small.
    """
    weight = model.lm_head.weight
    if setting is False or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if setting:
        return True
    size = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    if size > _PACKED_MEMORY_SHARE * memory:
        log.info("%s: no packed weight copies (%.1f GB would exceed %.0f%% of memory; %s=1 forces them)", name,
                 size / 1e9, _PACKED_MEMORY_SHARE * 100, PACKED_WEIGHTS_ENV)
        return False
    return True


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot use the fast decode step (None when it can)."""
    name = type(model).__name__
    if name not in _SUPPORTED:
        return f"{name} is not a recognised Llama-family architecture"
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "layers other than full attention"
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation}"
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "accelerate hooks (offloaded or dispatched weights)"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return f"weights on {len(devices)} devices"
    inner = model.model
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(lin) is not torch.nn.Linear for lin in linears):
            return "quantized or replaced linear layers"
        if any(hasattr(attn, extra) for extra in ("q_norm", "k_norm")):
            return "query / key norms"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"):
                return f"{type(norm).__name__}"
    if type(model.lm_head) is not torch.nn.Linear or getattr(config, "final_logit_softcapping", None):
        return "a non-linear output head"
    return None


class FastDecoder:
    """``decode(ids, positions, mask, cache)`` for one model: next-token logits ``[n, V]`` in float32."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, pack: bool = False) -> None:
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.layers = list(inner.layers)
        self.final_norm = inner.norm

        self.head_weight = model.lm_head.weight[:vocab_size]  # rows past the shared vocabulary: never computed
        self.head_bias = None if model.lm_head.bias is None else model.lm_head.bias[:vocab_size]
        self.packed: list[dict[str, PackedLinear]] | None = None
        self.packed_head: PackedLinear | None = None
        if pack:
            def packed(*linears: torch.nn.Linear) -> PackedLinear:
                return PackedLinear([lin.weight for lin in linears], [lin.bias for lin in linears])

            self.packed = [
                {"qkv": packed(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                 "o": packed(layer.self_attn.o_proj),
                 "gate_up": packed(layer.mlp.gate_proj, layer.mlp.up_proj),
                 "down": packed(layer.mlp.down_proj)}
                for layer in self.layers
            ]
            self.packed_head = PackedLinear([self.head_weight], [self.head_bias])
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.act = F.silu if getattr(config, "hidden_act", "silu") == "silu" else None

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, vocab_size: int, name: str, packed: bool | None = None
    ) -> FastDecoder | None:
        """The fast decoder of ``model``, or None when its architecture is not supported; ``packed`` as in
        ``packing_allowed``."""
        reason = unsupported_reason(model)
        if reason is not None:
            log.info("%s decodes through transformers: %s", name, reason)
            return None
        pack = packing_allowed(model, name, packed)
        try:
            return cls(model, vocab_size, pack)
        except RuntimeError as error:  # a oneDNN build that cannot reorder: the plain GEMM everywhere
            if not pack:
                raise
            log.warning("%s: packing the linear weights failed (%s); using the plain GEMM", name, error)
            return cls(model, vocab_size, False)

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        """``ids [n]``, ``positions [n]``, ``mask [n, 1, 1, span]`` or None, ``cache`` a ``SlotKVCache``."""
        n = ids.shape[0]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids)  # [n, hidden]
        cos, sin = self.rotary(x[:, None, :], positions.view(n, 1))  # [n, 1, D]
        cos, sin = cos[:, None], sin[:, None]  # [n, 1, 1, D] against [n, heads, 1, D]
        gqa = kv_heads != heads
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        packed = self.packed if self.packed is not None and n >= PACKED_MIN_ROWS else None
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            h = _norm(x, norm.weight, norm.variance_epsilon)
            if packed is not None:
                q, k, v = packed[index]["qkv"](h).split([q_size, kv_size, kv_size], dim=-1)
            else:
                q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias)
                k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias)
                v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias)
            q = q.reshape(n, heads, 1, head_dim)
            k = k.reshape(n, kv_heads, 1, head_dim)
            v = v.reshape(n, kv_heads, 1, head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.layers[index].update(k, v)  # [n, kv_heads, span, D]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                                 enable_gqa=gqa)  # [n, heads, 1, D]
            out = out.reshape(n, q_size)
            if packed is not None:
                x = x + packed[index]["o"](out)
            else:
                x = x + F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
            norm = layer.post_attention_layernorm
            h = _norm(x, norm.weight, norm.variance_epsilon)
            if packed is not None:
                gate, up = packed[index]["gate_up"](h).chunk(2, dim=-1)
            else:
                gate = F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)
                up = F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias)
            gate = self.act(gate) if self.act is not None else mlp.act_fn(gate)
            if packed is not None:
                x = x + packed[index]["down"](gate * up)
            else:
                x = x + F.linear(gate * up, mlp.down_proj.weight, mlp.down_proj.bias)
        x = _norm(x, self.final_norm.weight, self.final_norm.variance_epsilon)
        if packed is not None:
            return self.packed_head(x).float()
        return F.linear(x, self.head_weight, self.head_bias).float()
