"""A decode step with fixed shapes over static K/V buffers: the math a CUDA graph captures.

``StaticDecoder.step(ids, positions, rows, span, cache)`` computes next-token logits for ``rows`` rows (slots
``[0, rows)`` of a ``StaticSlotKVCache``), attending over columns ``[0, span)``: every tensor's shape depends
only on ``(rows, span)``, and nothing reads a value back to the host, so the same call runs eagerly (the CPU,
``--enforce-eager``, shapes past the largest bucket) or is captured once per bucket and replayed
(cuda_graphs.py). It is the model's math, op for op, as fast_decode.py's, with these differences that make it
graph-safe and cheaper:

- rotary ``cos`` / ``sin`` come from a table computed once for every position by the model's own
  ``rotary_emb`` (the same float32 arithmetic per position; RoPE types that depend on the sequence length,
  "dynamic" NTK and "longrope", are not supported here and decode on the other paths);
- the key mask is built inside the step from the positions tensor (``column <= position``, and ``column >
  position - window`` for a sliding-window layer), not on the host;
- grouped-query attention folds the query heads of a K/V head into the query-length axis
  (``[rows, kv_heads, group, head_dim]`` against ``[rows, kv_heads, span, head_dim]``): no K/V is repeated and
  any SDPA backend takes it (the mask is the same for the whole group: they share the position);
- a mixture of experts (Mixtral, Qwen2/3-MoE, OLMoE) runs as the model's own block under transformers'
  ``grouped_mm`` (or ``batched_mm``) experts implementation, which reads nothing back and keeps shapes fixed by
  the rows' (transformers made it for CUDA graphs); under ``eager`` a routed model takes the other paths;
- q/k/v and gate/up run as one GEMM each on fused weights; the model's own Linear weights become views of the
  fused tensors, so transformers' forward (prefill) reads the same memory and nothing is held twice;
- fewer, larger kernels (each costs a few microseconds even inside a graph, and a step has thousands): RMSNorm
  through ``F.rms_norm`` (one fused kernel on CUDA, float32 statistics as LlamaRMSNorm), rotary applied to q
  and k together as ``x * cos + swap_halves(x) * signed_sin`` (one ``cat`` and one ``addcmul``), and the
  residual adds folded into the o / down GEMMs (``addmm``) where those have no bias.

On CUDA the attention backend is chosen explicitly (``DECODE_BACKENDS``): PyTorch's memory-efficient kernel,
math as the fallback, never cuDNN, which builds a new execution plan for each new span (1.6 ms of host time
per call in issue 18's profile).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from proxy_engine.architecture import (
    DecoderLayout,
    Norm,
    graph_safe_experts,
    length_dependent_rope,
    rope_types,
    routed_block,
    unsupported_reason,
)
from proxy_engine.attention_masks import FULL, SLIDING
from proxy_engine.fast_decode import (
    fuse_linears,
    head_norm,
    proj_norms,
    routed_mlp,
    softcap,
    softcapped_attention,
    upcast_norm,
    with_terms,
)
from proxy_engine.lora import LoraAdapter, layer_terms

log = logging.getLogger("proxy_engine.executor.static_decode")

# Row strides of an attention mask the memory-efficient SDPA kernel reads in place (its preprocess_mask pads
# any other mask into a fresh copy first).
MASK_ALIGNMENT = 8


def static_unsupported_reason(model: torch.nn.Module, max_len: int | None = None) -> str | None:
    """Why ``model`` cannot use the static decode step (None when it can); ``max_len`` as in
    ``unsupported_reason``."""
    reason = unsupported_reason(model, max_len)
    if reason is not None:
        return reason
    if any(routed_block(layer.mlp) is not None for layer in model.model.layers) and not graph_safe_experts(
            model.config):
        return (f"experts implementation {getattr(model.config, '_experts_implementation', None)} reads the "
                "router's choice back to the host")
    for rope_type in rope_types(model, max_len):
        if length_dependent_rope(rope_type):
            return f"RoPE type {rope_type} depends on the sequence length"
    return None


def decode_backends(device: torch.device):
    """The SDPA context of a decode step: on CUDA memory-efficient attention (math as fallback), never cuDNN."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def disable_cudnn_attention() -> None:
    """Process-wide: SDPA never picks cuDNN (a new plan for every new shape: prefill chunks and the
    transformers decode path meet new shapes all the time)."""
    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("cuDNN attention disabled for SDPA (a new execution plan per shape)")


def _fused(linears: list[torch.nn.Linear], attribute: str, owner: torch.nn.Module) -> tuple[torch.Tensor,
                                                                                             torch.Tensor | None]:
    """One weight (and bias) for ``linears``, whose own weights become views of it (``fuse_linears``, row-major);
    idempotent: a second decoder over the same model finds the fused tensors on ``owner``."""
    existing = getattr(owner, attribute, None)
    if existing is None:
        existing = fuse_linears(linears, column_major=False)
        setattr(owner, attribute, existing)
    return existing


def _aligned(width: int) -> int:
    """``width`` rounded up to the attention mask's alignment (``MASK_ALIGNMENT`` elements)."""
    return -(-width // MASK_ALIGNMENT) * MASK_ALIGNMENT


class StaticDecoder:
    """The fixed-shape decode step of one model architecture.py describes (see the module docstring).

    The three small fused forms (``rms_norm``, ``rotate``, ``linear_add``) are static methods so that
    ``bench/fusions.py`` can put each one's unfused form back alone and time what it saves on a GPU.
    """

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """LlamaRMSNorm (float32 statistics, the result in the input dtype, then the weight) in one fused kernel."""
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)

    @staticmethod
    def rotate(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, heads: int) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
        """Rotary on q and k together (``qk [n, heads + kv_heads, D]``): ``x * cos + swap_halves(x) * signed_sin``,
        one ``cat`` and one ``addcmul``; ``(q [n, heads, D], k [n, kv_heads, D])``."""
        half = qk.shape[-1] // 2
        qk = torch.addcmul(qk * cos, torch.cat((qk[..., half:], qk[..., :half]), dim=-1), signed_sin)
        return qk[:, :heads], qk[:, heads:]

    @staticmethod
    def linear_add(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x + h W^T (+ b)``: the residual add in the GEMM's epilogue when there is no bias."""
        if bias is None:
            return torch.addmm(x, h, weight.t())
        return x + F.linear(h, weight, bias)

    def branch(self, h: torch.Tensor, out_norm: Norm | None, scale: float | None) -> torch.Tensor:
        """``fast_decode.branch_output`` through this step's ``norm``: a sub-block's output as the residual
        stream takes it, normed (Gemma-2/3, OLMo), scaled (Granite)."""
        if out_norm is not None:
            h = self.norm(h, out_norm)
        return h if scale is None else h * scale

    def norm(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        """``norm`` on ``x``: ``rms_norm`` for Llama's, Gemma's ``(1 + w)`` form in float32 for an offset one."""
        return upcast_norm(x, norm.weight, norm.eps) if norm.upcast else self.rms_norm(x, norm.weight, norm.eps)

    def __init__(self, model: torch.nn.Module, vocab_size: int, max_positions: int, fuse: bool = True,
                 adapter: LoraAdapter | None = None) -> None:
        """``adapter``: a LoRA whose terms every step adds (an expert served unmerged over ``model``: lora.py);
        its small GEMMs are captured with the rest."""
        inner = model.model
        self.layout = layout = DecoderLayout(model, max_positions)
        self.embed = inner.embed_tokens.weight
        self.layers = list(inner.layers)
        self.head_weight = model.lm_head.weight[:vocab_size]
        self.head_bias = None if model.lm_head.bias is None else model.lm_head.bias[:vocab_size]
        self.heads, self.kv_heads, self.head_dim = layout.heads, layout.kv_heads, layout.head_dim
        self.group = self.heads // self.kv_heads
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.fused = False
        with torch.no_grad():
            # Per attention kind (Gemma-3's local layers have their own RoPE base): cos and signed_sin tables.
            # rotate_half(x) * sin == swap_halves(x) * signed_sin: the negation moves into the table.
            self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            half = self.head_dim // 2
            for kind, (rotary, _) in layout.rotary.items():
                cos, sin = self._rotary_table(rotary, max_positions)
                self.tables[kind] = cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            if fuse:
                try:
                    self.qkv = [_fused([lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj],
                                       "_proxy_fused_qkv", lay.self_attn) for lay in self.layers]
                    self.gate_up = [None if shape.routed is not None else  # routed: transformers' own block
                                    _fused([lay.mlp.gate_proj, lay.mlp.up_proj], "_proxy_fused_gate_up", lay.mlp)
                                    for lay, shape in zip(self.layers, layout.layers)]
                    self.fused = True
                except RuntimeError as error:  # out of memory for the transient copy: separate GEMMs
                    log.warning("q/k/v and gate/up not fused (%s: %s)", type(error).__name__, error)
        self.lora: list[tuple[slice, list]] = [] if adapter is None else [(slice(None), layer_terms(adapter,
                                                                                                    self.layers))]
        if adapter is not None and not self.fused:  # the terms are on the fused projections
            raise ValueError("a LoRA served unmerged needs q/k/v and gate/up fused")
        # Static index tensors: slices of them are views, so a captured graph reads fixed addresses.
        self.columns = torch.arange(_aligned(max_positions), device=self.device)
        self.hidden_value = torch.tensor(torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        self.seen_value = torch.zeros((), dtype=self.dtype, device=self.device)

    def _rotary_table(self, rotary, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [positions, head_dim]`` in the model's dtype, from the model's own rotary module."""
        probe = torch.zeros((1, 1, self.head_dim), dtype=self.dtype, device=self.device)
        cos, sin = rotary(probe, torch.arange(positions, device=self.device)[None, :])
        return cos[0].contiguous(), sin[0].contiguous()

    def _qk_v(self, index: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q and k side by side [n, (heads + kv_heads) * D], v [n, kv_heads * D])``: slices of one GEMM's
        output when fused (the rotary then runs once over q and k)."""
        qk_size = (self.heads + self.kv_heads) * self.head_dim
        if self.fused:
            weight, bias = self.qkv[index]
            out = with_terms(F.linear(h, weight, bias), h, self.lora, index, "qkv")
            return out[:, :qk_size], out[:, qk_size:]
        attn = self.layers[index].self_attn
        q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias)
        k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias)
        return torch.cat((q, k), dim=-1), F.linear(h, attn.v_proj.weight, attn.v_proj.bias)

    def _gate_up(self, index: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            weight, bias = self.gate_up[index]
            return with_terms(F.linear(h, weight, bias), h, self.lora, index, "gate_up").chunk(2, dim=-1)
        mlp = self.layers[index].mlp
        return F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias), F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, span: int, cache) -> torch.Tensor:
        """Logits ``[n, V]`` (float32) for ``ids [n]`` at ``positions [n]``, written into slots ``rows [n]`` of
        ``cache`` (a slot cache whose buffers hold at least ``span`` columns), attending over ``[0, span)``."""
        n = ids.shape[0]
        layout = self.layout
        heads, kv_heads, head_dim, group = self.heads, self.kv_heads, self.head_dim, self.group
        x = F.embedding(ids, self.embed)  # [n, hidden]
        if layout.embed_scale is not None:
            x = x * layout.embed_scale
        # [n, 1, D] against [n, heads + kv_heads, D], per attention kind
        tables = {kind: (cos.index_select(0, positions)[:, None, :], sin.index_select(0, positions)[:, None, :])
                  for kind, (cos, sin) in self.tables.items()}
        # [n, span]: the row's tokens and the new one; built _aligned(span) wide and sliced, so the mask's strides
        # are what the memory-efficient kernel takes as is (else it pads a copy in every layer: a bucket as long
        # as an unaligned max_model_len).
        columns = self.columns[:_aligned(span)][None, :]
        seen = columns <= positions[:, None]
        masks = {FULL: torch.where(seen, self.seen_value, self.hidden_value)[:, None, None, :span]}  # [n, 1, 1, span]
        if layout.windowed:
            local = seen & (columns > positions[:, None] - layout.window)
            masks[SLIDING] = torch.where(local, self.seen_value, self.hidden_value)[:, None, None, :span]
        for index, (layer, lay) in enumerate(zip(self.layers, layout.layers)):
            attn, mlp = layer.self_attn, layer.mlp
            h = x if lay.attn_norm is None else self.norm(x, lay.attn_norm)
            qk, v = self._qk_v(index, h)
            if lay.proj_norm is not None:  # OLMo-2/3: one RMSNorm over all of q's heads, one over k's
                qk = proj_norms(qk, lay.proj_norm, heads * head_dim)
            qk = qk.reshape(n, heads + kv_heads, head_dim)
            if lay.head_norm is not None:  # Qwen3 / Gemma-3: RMSNorm over each q and k head, before the rotary
                qk = head_norm(qk, lay.head_norm)
            q, k = self.rotate(qk, *tables[lay.kind], heads)  # [n, heads | kv_heads, D]
            kv = cache.layers[index]
            kv.k_buf[rows, :, positions] = k
            kv.v_buf[rows, :, positions] = v.reshape(n, kv_heads, head_dim)
            keys, values = kv.k_buf[:n, :, :span], kv.v_buf[:n, :, :span]  # [n, kv_heads, span, D]
            # Query heads h = g * group + j share K/V head g (transformers' repeat_kv): fold j into the query axis.
            q = q.reshape(n, kv_heads, group, head_dim)
            if lay.softcap is None:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=masks[lay.kind], scale=lay.scaling)
            else:
                out = softcapped_attention(q, keys, values, masks[lay.kind], lay.scaling, lay.softcap)
            out = out.reshape(n, heads * head_dim)  # [n, kv_heads, group, D] -> [n, heads * D]
            if lay.attn_out_norm is None and lay.residual_scale is None:
                x = with_terms(self.linear_add(x, out, attn.o_proj.weight, attn.o_proj.bias), out, self.lora, index,
                                "o")  # x + W out + B A out
            else:  # Gemma-2/3, OLMo: the output is normed before the residual add; Granite: scaled
                h = with_terms(F.linear(out, attn.o_proj.weight, attn.o_proj.bias), out, self.lora, index, "o")
                x = x + self.branch(h, lay.attn_out_norm, lay.residual_scale)
            h = x if lay.mlp_norm is None else self.norm(x, lay.mlp_norm)
            if lay.routed is not None:  # transformers' own block: graph-safe under grouped_mm / batched_mm
                x = x + self.branch(routed_mlp(lay.routed, h), lay.mlp_out_norm, lay.residual_scale)
                continue
            gate, up = self._gate_up(index, h)
            h = lay.act(gate) * up
            if lay.mlp_out_norm is None and lay.residual_scale is None:
                x = with_terms(self.linear_add(x, h, mlp.down_proj.weight, mlp.down_proj.bias), h, self.lora, index,
                                "down")
            else:
                h = with_terms(F.linear(h, mlp.down_proj.weight, mlp.down_proj.bias), h, self.lora, index, "down")
                x = x + self.branch(h, lay.mlp_out_norm, lay.residual_scale)
        x = self.norm(x, layout.final_norm)
        logits = F.linear(x, self.head_weight, self.head_bias)
        if layout.logits_divisor is not None:
            logits = logits / layout.logits_divisor
        if layout.final_softcap is not None:
            logits = softcap(logits, layout.final_softcap)
        return logits.float()
