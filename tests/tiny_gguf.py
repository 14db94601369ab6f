"""Tiny GGUF files for the tests, written with the ``gguf`` package from a tiny random Llama and a byte-level BPE.

``write_llama_gguf(model, tokenizer, file)`` lays the tensors out as llama.cpp's converter does (its names, q and
k rows permuted to its rotary layout, which transformers undoes on load) and the tokenizer as ``gpt2``-type
metadata, so ``from_pretrained(directory, gguf_file=name)`` gives back the same model and the same tokenizer.
Matrices whose rows are whole Q8_0 blocks are stored quantized (Q8_0), as real files are, the rest as F32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = hf_name.split(".", 3)  # model.layers.N.<module>.weight
    module = rest.removesuffix(".weight")
    return f"blk.{index}.{_LAYER_NAMES[module]}.weight"


def _to_rotary_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's rows interleaved pairwise (transformers reverses it on load)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _tokenizer_metadata(tokenizer) -> tuple[list[str], list[int], list[str]]:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = dict(state["model"]["vocab"])
    special = {added["content"] for added in state.get("added_tokens", []) if added.get("special")}
    for added in state.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    types = [3 if token in special else 1 for token in tokens]  # 3: control, 1: normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return tokens, types, merges


def write_llama_gguf(model, tokenizer, file: Path, *, quantize: bool = True, chat_template: str | None = None) -> Path:
    import gguf

    config = model.config
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    tokens, types, merges = _tokenizer_metadata(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("pad", tokenizer.pad_token)):
        if token is not None:
            getattr(writer, f"add_{kind}_token_id")(tokenizer.convert_tokens_to_ids(token))
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)

    with torch.no_grad():
        state = {name: tensor.float().numpy() for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, weight in state.items():
        name = _gguf_name(hf_name)
        if name.endswith("attn_q.weight"):
            weight = _to_rotary_halves(weight, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            weight = _to_rotary_halves(weight, config.num_key_value_heads)
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if quantize and name.startswith("blk.") and weight.ndim == 2 and weight.shape[1] % block == 0:
            data = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(weight, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


def tiny_llama(vocab_size: int, *, layers: int = 2, hidden: int = 64, seed: int = 0, bos: int | None = None,
               eos: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the default init, so greedy choices are not all ties
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 2.0 / parameter.shape[-1] ** 0.5)
    return model


@dataclass(frozen=True)
class GGUFFamily:
    """A triple in the three forms a deployer meets: a ``.gguf`` file (the base, Q8_0 blocks), a directory
    holding one (the expert, ChatML template) and a transformers directory (the anti-expert)."""

    base: Path
    expert: Path
    anti_expert: Path
    base_parameters: int
    base_config: object


def build_gguf_family(root: Path) -> GGUFFamily:
    from tests.conformance.families import CHATML_TEMPLATE, qwen_tokenizer

    root = Path(root)
    tokenizer = qwen_tokenizer()
    ids = {"bos": None, "eos": tokenizer.eos_token_id}
    base = tiny_llama(len(tokenizer), layers=2, hidden=64, seed=1, **ids)
    expert = tiny_llama(len(tokenizer), layers=1, hidden=32, seed=2, **ids)
    anti_expert = tiny_llama(len(tokenizer), layers=1, hidden=32, seed=3, **ids)
    base_file = write_llama_gguf(base, tokenizer, root / "base" / "tiny-base.Q8_0.gguf")
    write_llama_gguf(expert, tokenizer, root / "expert" / "tiny-expert.Q8_0.gguf", chat_template=CHATML_TEMPLATE)
    anti_expert.save_pretrained(root / "anti_expert")
    tokenizer.chat_template = None
    tokenizer.save_pretrained(root / "anti_expert")
    return GGUFFamily(base_file, root / "expert", root / "anti_expert",
                      sum(p.numel() for p in base.parameters()), base.config)
