"""What a decode step needs to know about a model's architecture, read once from its modules.

fast_decode.py (the CPU step) and executor/static_decode.py (the fixed-shape step CUDA graphs capture) compute
a decoder layer's math without transformers' module stack. What varies between the families they take is read
here, so both steps follow one description (``DecoderLayout``):

- the RMSNorm: Llama's (float32 statistics, the result cast to the input dtype, then ``weight *``), Gemma's
  (``(1 + weight) *`` in float32, then the cast) or OLMo's (``weight *`` in float32, then the cast);
- the norms around a layer: two before its sub-blocks (before attention, before the MLP: Llama, Mistral, Qwen,
  Gemma), four (Gemma-2 / Gemma-3 also norm each sub-block's output before its residual add), or two after them
  (OLMo-2 / OLMo-3: only each sub-block's output is normed);
- query / key norms: per head (Qwen3, Gemma-3), applied to q and k side by side before the rotary, or over each
  whole projection (OLMo-2 / OLMo-3: one RMSNorm over all of q's heads, one over k's);
- the embedding's scale (Gemma: ``sqrt(hidden)`` in the model's dtype; Granite: its ``embedding_multiplier``),
  Granite's residual multiplier on each sub-block's output and its logits divided by ``logits_scaling``;
- each layer's attention: full, or a sliding window (Mistral v0.1, Qwen2 with ``use_sliding_window``, Gemma-2 /
  Gemma-3's local layers), its rotary embedding (Gemma-3's local layers have their own RoPE base), its
  scaling, and Gemma-2's attention-logit soft-cap (``cap * tanh(scores / cap)``, eager attention only);
- the MLP's gate activation (SiLU; Gemma's tanh-GELU);
- a mixture of experts in place of a dense MLP (Mixtral, Qwen2-MoE with its gated shared expert, Qwen3-MoE,
  OLMoE): the steps call the model's own block, router and experts, so its numerics are transformers' and its
  experts run as transformers' configured implementation runs them (``grouped_mm`` by default: each chosen
  expert's weights read in place, nothing read back to the host, shapes fixed by the rows');
- Gemma-2's final-logit soft-cap.

Anything else (other layer types, quantized linears, offloaded weights) decodes through transformers' forward;
``unsupported_reason`` says why.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

from proxy_engine.attention_masks import FULL, SLIDING, sliding_window

# Architectures whose decoder layer is: [norm] -> q/k/v (bias allowed) -> [q / k norms] -> RoPE -> attention ->
# o -> [norm] -> residual -> [norm] -> down(act(gate) * up) -> [norm] -> residual.
# With routed experts in place of the dense MLP, run through transformers' own block (``routed_block``):
MIXTURES = {"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"}
SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
             "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM",
             "GraniteForCausalLM", *MIXTURES}
# RMSNorm classes that are LlamaRMSNorm under another name, those that are GemmaRMSNorm, and OLMo's (Llama's
# weight, applied in float32 before the cast, as T5's).
LLAMA_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "GraniteRMSNorm",
                   "MixtralRMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "OlmoeRMSNorm"}
GEMMA_RMS_NORMS = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"}
OLMO_RMS_NORMS = {"Olmo2RMSNorm", "Olmo3RMSNorm"}
# Gemma and Gemma-2 scale the embedding by sqrt(hidden) in the model's forward in transformers versions whose
# embedding module does not (later ones carry an ``embed_scale``).
_SQRT_HIDDEN_EMBEDDING = {"GemmaForCausalLM", "Gemma2ForCausalLM"}
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # frequencies that depend on the sequence seen so far


def length_dependent_rope(rope_type: str) -> bool:
    """Whether a RoPE type's frequencies change with the sequence seen so far (transformers' dynamic_rope_update):
    no table of every position can stand for them."""
    return any(kind in rope_type for kind in LENGTH_DEPENDENT_ROPE)


class Norm(NamedTuple):
    """One RMSNorm: Llama's ``weight * cast(rms(x))``, or with ``upcast`` ``cast(rms(x) * weight)``, ``weight``
    in float32: Gemma's ``1 + w``, OLMo's ``w``."""

    weight: torch.Tensor
    eps: float
    upcast: bool


def routed_block(mlp: torch.nn.Module) -> torch.nn.Module | None:
    """``mlp`` when it is a mixture of experts (a router ``gate`` and ``experts``), else None (a dense MLP)."""
    return mlp if getattr(mlp, "gate", None) is not None and getattr(mlp, "experts", None) is not None else None


def _routed_reason(mlp: torch.nn.Module) -> str | None:
    """Why a routed ``mlp`` cannot run as the steps run it (transformers' own block), None when it can."""
    weights = [getattr(mlp.experts, name, None) for name in ("gate_up_proj", "down_proj")]
    if any(type(w) is not torch.nn.Parameter or w.dim() != 3 for w in weights):
        return "routed experts other than 3-D expert weights (quantized or replaced)"
    return None


def grouped_mm_runs_on(device: torch.device) -> bool:
    """Whether torch's grouped GEMM has a kernel on ``device``: on CUDA from SM80 (Ampere) on. On older GPUs (V100,
    T4) transformers falls back to a loop over the experts that reads their offsets back to the host, which no
    CUDA graph can hold."""
    if device.type != "cuda":
        return True
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def fit_experts_implementation(model: torch.nn.Module) -> str | None:
    """Switch ``model`` from transformers' default ``grouped_mm`` experts to ``batched_mm`` where ``grouped_mm``
    would not run as made: expert rows ``torch._grouped_mm`` refuses ("strides should be multiple of 16 bytes": a
    hidden or intermediate size that is not a multiple of 16 bytes, as in tiny test models; transformers' own
    forward fails on them too), or a GPU older than SM80 (``grouped_mm_runs_on``). ``batched_mm`` takes any shape
    on any device and is graph-safe as well. Returns the implementation set, or None."""
    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        return None
    blocks = [block for m in model.modules() if (block := routed_block(m)) is not None]
    weights = [w for b in blocks for name in ("gate_up_proj", "down_proj")
               if isinstance(w := getattr(b.experts, name, None), torch.Tensor)]
    aligned = all(all(size * w.element_size() % 16 == 0 for size in w.shape[1:]) for w in weights)
    if aligned and all(grouped_mm_runs_on(device) for device in {w.device for w in weights}):
        return None
    model.set_experts_implementation("batched_mm")
    return "batched_mm"


def graph_safe_experts(config) -> bool:
    """Whether transformers runs a model's experts without reading the router's choice back to the host (its
    ``grouped_mm`` and ``batched_mm`` implementations, made for CUDA graphs; ``eager`` loops over the experts hit)."""
    return getattr(config, "_experts_implementation", None) in ("grouped_mm", "batched_mm")


class LayerLayout(NamedTuple):
    """One decoder layer's parts, in the order the step applies them."""

    attn_norm: Norm | None  # before attention (None: OLMo-2/3)
    attn_out_norm: Norm | None  # Gemma-2/3, OLMo-2/3: the attention output's norm, before the residual add
    mlp_norm: Norm | None  # before the MLP (None: OLMo-2/3)
    mlp_out_norm: Norm | None  # Gemma-2/3, OLMo-2/3: the MLP output's norm, before the residual add
    head_norm: Norm | None  # Qwen3 / Gemma-3: weight [heads + kv_heads, D], q's norm then k's on each head
    proj_norm: tuple[Norm, Norm] | None  # OLMo-2/3: q's norm over its whole projection, then k's
    residual_scale: float | None  # Granite: each sub-block's output times this before the residual add
    kind: str  # FULL or SLIDING (attention_masks.py)
    scaling: float
    softcap: float | None  # Gemma-2's attention-logit soft-cap (eager attention), else None
    act: Callable[[torch.Tensor], torch.Tensor]  # the MLP's gate activation (SiLU called directly: the common case)
    routed: torch.nn.Module | None = None  # a mixture-of-experts block in place of the dense MLP (called as is)


def _norm_kind(module: torch.nn.Module) -> str | None:
    """``llama``, ``gemma`` or ``olmo`` for the RMSNorms the steps know, None for anything else."""
    name = type(module).__name__
    for kind, names in (("llama", LLAMA_RMS_NORMS), ("gemma", GEMMA_RMS_NORMS), ("olmo", OLMO_RMS_NORMS)):
        if name in names:
            return kind
    return None


def _eps(module: torch.nn.Module) -> float:
    return module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps


def read_norm(module: torch.nn.Module, heads: int | None = None) -> Norm:
    """``module``'s ``Norm``; ``heads`` repeats its weight over that many heads (a per-head norm)."""
    kind = _norm_kind(module)
    weight = module.weight.detach()
    if kind == "gemma":
        weight = 1.0 + weight.float()  # the same float32 values GemmaRMSNorm computes on every call
    elif kind == "olmo":
        weight = weight.float()
    if heads is not None:
        weight = weight.expand(heads, -1)
    return Norm(weight, _eps(module), kind != "llama")


def _per_head(attention: torch.nn.Module) -> bool:
    """Whether the query norm is over each head (Qwen3, Gemma-3) rather than over the whole projection (OLMo)."""
    return attention.q_norm.weight.dim() == 1 and attention.q_norm.weight.shape[0] == attention.head_dim


def head_norm_of(attention: torch.nn.Module, heads: int, kv_heads: int) -> Norm | None:
    """The per-head query and key norms side by side (``weight [heads + kv_heads, D]``), or None."""
    if getattr(attention, "q_norm", None) is None or not _per_head(attention):
        return None
    q, k = read_norm(attention.q_norm, heads), read_norm(attention.k_norm, kv_heads)
    return Norm(torch.cat((q.weight, k.weight)), q.eps, q.upcast)


def proj_norm_of(attention: torch.nn.Module) -> tuple[Norm, Norm] | None:
    """The query and key norms over their whole projections (OLMo-2 / OLMo-3), or None."""
    if getattr(attention, "q_norm", None) is None or _per_head(attention):
        return None
    return read_norm(attention.q_norm), read_norm(attention.k_norm)


def _head_norms_reason(attention: torch.nn.Module, head_dim: int, heads: int, kv_heads: int) -> str | None:
    """Why ``attention``'s query / key norms are not one RMSNorm kind and eps over each head, or over each whole
    projection."""
    norms = [getattr(attention, name, None) for name in ("q_norm", "k_norm")]
    if all(norm is None for norm in norms):
        return None
    shapes = tuple(None if norm is None else tuple(norm.weight.shape) for norm in norms)
    if (any(norm is None or _norm_kind(norm) is None for norm in norms)
            or shapes not in (((head_dim,), (head_dim,)), ((heads * head_dim,), (kv_heads * head_dim,)))
            or _norm_kind(norms[0]) != _norm_kind(norms[1]) or _eps(norms[0]) != _eps(norms[1])
            or getattr(attention, "head_dim", head_dim) != head_dim):
        return "query / key norms other than an RMSNorm over each head or over each whole projection"
    return None


def layer_kinds_of(config, max_len: int | None = None) -> list[str]:
    """Each layer's attention kind; a window no sequence of ``max_len`` tokens outgrows counts as full attention
    (Mistral v0.1's 4,096 under a 4,096-token limit): no mask to build for it."""
    window = sliding_window(config)
    types = list(getattr(config, "layer_types", None) or [])
    if not types:
        types = [SLIDING if window is not None else FULL] * config.num_hidden_layers
    if window is None or (max_len is not None and max_len <= window):
        types = [FULL if kind == SLIDING else kind for kind in types]
    return types


def rotary_for(inner: torch.nn.Module, kind: str) -> tuple[Callable, str]:
    """``(rotary(x, position_ids) -> (cos, sin), rope type)`` of layers of ``kind``: Gemma-3's rotary module takes
    the layer type (its local layers have their own base); older transformers kept a second module for them."""
    rotary = inner.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(kind, "default")
        return partial(rotary, layer_type=kind), str(rope_type)
    if kind == SLIDING and hasattr(inner, "rotary_emb_local"):
        rotary = inner.rotary_emb_local
        return rotary, str(getattr(rotary, "rope_type", "default"))
    return rotary, str(rope_type)


def rope_types(model: torch.nn.Module, max_len: int | None = None) -> list[str]:
    """The RoPE type of each attention kind ``model``'s layers use (without reading the rest of its layout)."""
    return [rotary_for(model.model, kind)[1] for kind in sorted(set(layer_kinds_of(model.config, max_len)))]


def embedding_scale(model: torch.nn.Module) -> torch.Tensor | float | None:
    """The factor the model multiplies its input embeddings by (a tensor in their dtype, or Granite's Python float,
    as each model's forward multiplies), or None."""
    multiplier = getattr(model.model, "embedding_multiplier", None)  # Granite
    if multiplier is not None:
        return None if multiplier == 1 else float(multiplier)
    embed = model.model.embed_tokens
    scale = getattr(embed, "embed_scale", None)
    if scale is None and type(model).__name__ in _SQRT_HIDDEN_EMBEDDING:
        scale = torch.tensor(model.config.hidden_size**0.5)
    if scale is None:
        return None
    return scale.to(dtype=embed.weight.dtype, device=embed.weight.device)


class DecoderLayout:
    """The family-specific parts of ``model``'s decode math (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, max_len: int | None = None) -> None:
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.window = sliding_window(config)
        kinds = layer_kinds_of(config, max_len)
        self.kinds = sorted(set(kinds))
        self.rotary = {kind: rotary_for(inner, kind) for kind in self.kinds}
        self.embed_scale = embedding_scale(model)
        self.final_norm = read_norm(inner.norm)
        self.final_softcap: float | None = getattr(config, "final_logit_softcapping", None) or None
        scaling = getattr(config, "logits_scaling", None) if "Granite" in type(model).__name__ else None
        self.logits_divisor: float | None = None if scaling in (None, 1) else float(scaling)  # Granite
        self.layers: list[LayerLayout] = []
        for layer, kind in zip(inner.layers, kinds):
            attn = layer.self_attn
            sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma-2/3: four norms
            post_only = not hasattr(layer, "input_layernorm")  # OLMo-2/3: the sub-blocks' outputs alone
            softcap = getattr(attn, "attn_logit_softcapping", None) or None
            pre_mlp = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
            self.layers.append(LayerLayout(
                attn_norm=None if post_only else read_norm(layer.input_layernorm),
                attn_out_norm=read_norm(layer.post_attention_layernorm) if sandwich or post_only else None,
                mlp_norm=None if post_only else read_norm(pre_mlp),
                mlp_out_norm=read_norm(layer.post_feedforward_layernorm) if sandwich or post_only else None,
                head_norm=head_norm_of(attn, self.heads, self.kv_heads),
                proj_norm=proj_norm_of(attn),
                residual_scale=None if getattr(layer, "residual_multiplier", 1) == 1 else float(
                    layer.residual_multiplier),
                kind=kind, scaling=attn.scaling, softcap=softcap,
                act=F.silu if isinstance(_activation(layer.mlp), torch.nn.SiLU) else _activation(layer.mlp),
                routed=routed_block(layer.mlp),
            ))

    @property
    def windowed(self) -> bool:
        """Whether some layer's window can bind (its decode step needs a windowed mask)."""
        return SLIDING in self.kinds


def _activation(mlp: torch.nn.Module) -> torch.nn.Module:
    """The MLP's gate activation: its own, or (routed) its experts'."""
    return mlp.experts.act_fn if routed_block(mlp) is not None else mlp.act_fn


def unsupported_reason(model: torch.nn.Module, max_len: int | None = None) -> str | None:
    """Why ``model``'s decode step cannot be computed from a ``DecoderLayout`` (None when it can)."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not a recognised Llama- or Gemma-family architecture"
    config = model.config
    if any(t not in (FULL, SLIDING) for t in (getattr(config, "layer_types", None) or [])):
        return "layers other than full or sliding-window attention"
    if SLIDING in (getattr(config, "layer_types", None) or []) and sliding_window(config) is None:
        return "sliding-window layers without a window"
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation}"
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "accelerate hooks (offloaded or dispatched weights)"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return f"weights on {len(devices)} devices"
    inner = model.model
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        routed = routed_block(mlp) is not None
        if routed and (reason := _routed_reason(mlp)) is not None:
            return reason
        dense = [] if routed else [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, *dense]
        if any(type(lin) is not torch.nn.Linear for lin in linears):
            return "quantized or replaced linear layers"
        reason = _head_norms_reason(attn, head_dim, config.num_attention_heads,
                                    getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        if reason is not None:
            return reason
        names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
        norms = [getattr(layer, n) for n in names if hasattr(layer, n)]
        if not hasattr(layer, "post_attention_layernorm") or (
                not hasattr(layer, "input_layernorm") and not hasattr(layer, "post_feedforward_layernorm")):
            return "a decoder layer without the norms of a known layout"
        for norm in norms:
            if _norm_kind(norm) is None:
                return f"{type(norm).__name__}"
    if _norm_kind(inner.norm) is None:
        return f"{type(inner.norm).__name__}"
    if type(model.lm_head) is not torch.nn.Linear:
        return "a non-linear output head"
    return None
