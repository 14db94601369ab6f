"""Tiny families of the real architectures users pair, each with a tokenizer of its real style, built in seconds.

Nothing is downloaded: weights are random, tokenizers are trained on a small corpus (SentencePiece BPE with
the ``sentencepiece`` package, byte-level BPE with ``tokenizers``) and wrapped in the transformers class the
real family ships. Each family is a base (2 layers), a chat- or task-tuned expert and its anti-expert (1 layer),
saved as Hugging Face checkpoints the server loads like any other.

- llama2: LlamaForCausalLM; SentencePiece BPE, byte fallback, dummy prefix, BOS; ``[INST]`` chat expert.
- llama3: LlamaForCausalLM; byte-level BPE, ``<|begin_of_text|>``, end ids ``<|end_of_text|>`` and ``<|eot_id|>``.
- qwen2.5: Qwen2ForCausalLM (qkv bias); byte-level BPE, ChatML, no BOS; logit rows padded past the tokenizer.
- mistral: MistralForCausalLM with a sliding window of 8 (transformers decode path); SentencePiece like Llama-2;
  an OpenHermes-style ChatML expert whose ``<|im_end|>`` end id lies past the shared vocabulary.
- gemma2: Gemma2ForCausalLM, eager attention, soft-capping, local + global layers; SentencePiece without a dummy
  prefix, ``<start_of_turn>``.
- pythia: GPTNeoXForCausalLM (partial rotary, parallel residual); byte-level BPE; a task expert (plain prompts).
- llama3.1: LlamaForCausalLM with Llama-3.1's ``llama3`` RoPE scaling and a head size that is not hidden / heads
  (Mistral-Nemo's quirk); tokenizer as llama3.
- qwen3: Qwen3ForCausalLM (query / key norms, transformers decode path); tokenizer and ChatML as qwen2.5.
- gemma3: Gemma3ForCausalLM (query / key norms, sliding + global layers with their own RoPE bases, sdpa);
  tokenizer as gemma2.

They live in the tests, not in ``proxy_engine``: they need the test-only ``sentencepiece`` package, and the
benchmarks measure speed on ``proxy_engine.families`` (one architecture is enough there).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris. Berlin is the capital of Germany. Rome is the capital of Italy.",
    "Proxy-tuning steers a large model with the difference between a small tuned model and its base.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is two plus two? Answer: four. P P P",
    "Café, naïve, déjà vu, Ünïcödé, 東京, 日本語, emoji 🙂🚀, and accents á é í ó ú.",
    "User: hello there\nAssistant: Hi! How can I help you today?\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation ; : , . ! ? ( ) [ ] { }",
]

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set content = m['content'] %}{% if loop.first and system %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


# --------------------------------------------------------------------------------------------- tokenizers
def _sentencepiece_vocab(user_symbols: list[str], dummy_prefix: bool, specials: tuple[str, str, str]):
    """Train a SentencePiece BPE model (byte fallback) and read back ``(vocab, merges, user-defined ids)``."""
    import sentencepiece as spm
    from transformers.tokenization_utils_base import generate_merges

    unk, bos, eos = specials
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8), model_writer=model, model_type="bpe", vocab_size=420,
        byte_fallback=True, add_dummy_prefix=dummy_prefix, character_coverage=0.98, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece=unk, bos_piece=bos, eos_piece=eos,
        user_defined_symbols=user_symbols, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    skip = {p for i, p in ((i, processor.id_to_piece(i)) for i in range(len(vocab)))
            if processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i) or p in user_symbols}
    merges = generate_merges(vocab, skip_tokens=skip)
    return vocab, merges


def llama2_tokenizer():
    """Llama-2's: SentencePiece BPE, byte fallback, a dummy prefix (decoded alone, one leading space is stripped)."""
    from transformers import LlamaTokenizer

    vocab, merges = _sentencepiece_vocab([], True, ("<unk>", "<s>", "</s>"))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=False)
    tokenizer.chat_template = LLAMA2_TEMPLATE
    return tokenizer


def gemma_tokenizer():
    """Gemma's: SentencePiece BPE, byte fallback, no dummy prefix, ``<start_of_turn>`` / ``<end_of_turn>``."""
    from transformers import GemmaTokenizer

    turns = ["<start_of_turn>", "<end_of_turn>"]
    vocab, merges = _sentencepiece_vocab(["<pad>", *turns], False, ("<unk>", "<bos>", "<eos>"))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, pad_token="<pad>",
                               mask_token="<pad>", additional_special_tokens=turns)
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def _byte_level(specials: list[str], bos: str | None):
    """A byte-level BPE (GPT-2 / Llama-3 / Qwen style): specials first, BOS prepended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    if bos is not None:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def llama3_tokenizer():
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level(specials, "<|begin_of_text|>"), bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>", additional_special_tokens=specials[2:4],
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def qwen_tokenizer():
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level(specials, None), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:2],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def neox_tokenizer():
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|padding|>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level(specials, None), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|padding|>",
    )


# --------------------------------------------------------------------------------------------- models
def _llama_config(cls_name: str, vocab: int, layers: int, hidden: int, **extra):
    import transformers

    config_cls = getattr(transformers, cls_name)
    return config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, **extra)


def llama_config(vocab, layers, hidden, **ids):
    return _llama_config("LlamaConfig", vocab, layers, hidden, **ids)


def qwen2_config(vocab, layers, hidden, **ids):
    return _llama_config("Qwen2Config", vocab, layers, hidden, use_sliding_window=False, **ids)


def mistral_config(vocab, layers, hidden, **ids):
    # A window of 8 (Mistral v0.1 has 4096): prompts of 10-30 tokens reach past it, so a lost window shows.
    return _llama_config("MistralConfig", vocab, layers, hidden, sliding_window=8, **ids)


def gemma_config(vocab, layers, hidden, **ids):
    # The first Gemma: (1 + w) norms, sqrt(hidden) embedding scale, tanh-GELU MLP, one K/V head (as Gemma-2B).
    from transformers import GemmaConfig

    return GemmaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=hidden // 4, max_position_embeddings=256,
        hidden_activation="gelu_pytorch_tanh", attn_implementation="sdpa", **ids,
    )


def gemma2_config(vocab, layers, hidden, **ids):
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
        sliding_window=6, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=hidden // 4,
        attn_implementation="eager", **ids,
    )


def llama31_config(vocab, layers, hidden, **ids):
    # Llama-3.1's RoPE scaling (a static rewrite of the frequencies) and a head size of 24, not 64 / 4 heads.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    return _llama_config("LlamaConfig", vocab, layers, hidden, head_dim=24, rope_theta=500000.0,
                         rope_scaling=scaling, **ids)


def qwen3_config(vocab, layers, hidden, **ids):
    return _llama_config("Qwen3Config", vocab, layers, hidden, head_dim=hidden // 4, **ids)


def gemma3_config(vocab, layers, hidden, **ids):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
        sliding_window=6, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        query_pre_attn_scalar=hidden // 4, attn_implementation="sdpa", **ids,
    )


def gemma3_vision_config(vocab, layers, hidden, **ids):
    """Gemma-3 as 4B-27B ship: ``Gemma3ForConditionalGeneration``, a (tiny) SigLIP vision tower and projector
    around the text decoder; the image token is an ordinary id to a text-only forward."""
    from transformers import Gemma3Config, SiglipVisionConfig

    text = gemma3_config(vocab, layers, hidden, **ids)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        image_token_index=vocab - 1, boi_token_index=vocab - 1, eoi_token_index=vocab - 1,
                        attn_implementation="sdpa", **ids)


def mistral3_vision_config(vocab, layers, hidden, **ids):
    """Mistral-Small-3.1 as it ships: ``Mistral3ForConditionalGeneration`` (a tiny Pixtral vision tower) around a
    Mistral decoder with a window of 8, which only ``AutoModelForImageTextToText`` loads."""
    from transformers import Mistral3Config, PixtralVisionConfig

    text = mistral_config(vocab, layers, hidden, **ids)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=28, patch_size=14)
    return Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=vocab - 1,
                          attn_implementation="sdpa", **ids)


def neox_config(vocab, layers, hidden, **ids):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=256,
                         use_parallel_residual=True, tie_word_embeddings=False, **ids)


@dataclass(frozen=True)
class Spec:
    """How one family is built, and what the README's "Supported families" table says about it."""

    name: str
    architecture: str
    tokenizer_style: str
    attention: str
    decode_path: str  # "fast" (fast_decode.py) or "transformers"
    tokenizer: Callable[[], object]
    config: Callable[..., object]
    expert_template: str | None  # the expert's chat template (None: a task expert, plain prompts)
    base_extra_rows: int = 0  # logit rows past the tokenizer (padded embeddings)
    expert_extra_rows: int = 0
    expert_added_tokens: list[str] = field(default_factory=list)  # tokens past the shared vocabulary
    expert_eos: str | None = None  # the expert's end-of-turn, written to its generation config
    end_tokens: list[str] = field(default_factory=list)  # every end id of the family (generation config)


SPECS: dict[str, Spec] = {
    s.name: s
    for s in [
        Spec("llama2", "LlamaForCausalLM", "SentencePiece BPE, byte fallback, dummy prefix, BOS", "sdpa", "fast",
             llama2_tokenizer, llama_config, LLAMA2_TEMPLATE),
        Spec("llama3", "LlamaForCausalLM", "byte-level BPE, <|begin_of_text|>, end ids incl. <|eot_id|>", "sdpa",
             "fast", llama3_tokenizer, llama_config, LLAMA3_TEMPLATE, end_tokens=["<|end_of_text|>", "<|eot_id|>"]),
        Spec("qwen2.5", "Qwen2ForCausalLM (qkv bias)", "byte-level BPE, ChatML, no BOS", "sdpa", "fast",
             qwen_tokenizer, qwen2_config, CHATML_TEMPLATE, base_extra_rows=64, expert_extra_rows=24,
             end_tokens=["<|endoftext|>", "<|im_end|>"]),
        Spec("mistral", "MistralForCausalLM (sliding window)", "SentencePiece BPE like Llama-2; ChatML expert with "
             "<|im_end|> past the shared vocabulary", "sdpa, window 8", "fast", llama2_tokenizer,
             mistral_config, CHATML_TEMPLATE, expert_added_tokens=["<|im_end|>", "<|im_start|>"],
             expert_eos="<|im_end|>"),
        Spec("gemma", "GemmaForCausalLM (one K/V head, tanh-GELU)", "SentencePiece BPE, no dummy prefix, "
             "<start_of_turn>", "sdpa", "fast", gemma_tokenizer, gemma_config, GEMMA_TEMPLATE,
             end_tokens=["<eos>", "<end_of_turn>"]),
        Spec("gemma2", "Gemma2ForCausalLM", "SentencePiece BPE, no dummy prefix, <start_of_turn>",
             "eager, soft-capping, local + global layers", "fast", gemma_tokenizer, gemma2_config,
             GEMMA_TEMPLATE, end_tokens=["<eos>", "<end_of_turn>"]),
        Spec("pythia", "GPTNeoXForCausalLM", "byte-level BPE (GPT-NeoX)", "sdpa, partial rotary, parallel residual",
             "transformers", neox_tokenizer, neox_config, None),
        Spec("llama3.1", "LlamaForCausalLM (`llama3` RoPE scaling, head size 24 ≠ hidden / heads)",
             "byte-level BPE as Llama-3", "sdpa", "fast", llama3_tokenizer, llama31_config, LLAMA3_TEMPLATE,
             end_tokens=["<|end_of_text|>", "<|eot_id|>"]),
        Spec("qwen3", "Qwen3ForCausalLM (query / key norms)", "byte-level BPE, ChatML, no BOS", "sdpa",
             "fast", qwen_tokenizer, qwen3_config, CHATML_TEMPLATE, end_tokens=["<|endoftext|>", "<|im_end|>"]),
        Spec("gemma3", "Gemma3ForCausalLM (query / key norms)", "SentencePiece BPE, no dummy prefix, <start_of_turn>",
             "sdpa, local + global layers with their own RoPE bases", "fast", gemma_tokenizer, gemma3_config,
             GEMMA_TEMPLATE, end_tokens=["<eos>", "<end_of_turn>"]),
        Spec("gemma3-vision", "Gemma3ForConditionalGeneration (Gemma-3 4B-27B: vision tower dropped, text decoder "
             "served)", "SentencePiece BPE, no dummy prefix, <start_of_turn>",
             "sdpa, local + global layers with their own RoPE bases", "fast", gemma_tokenizer, gemma3_vision_config,
             GEMMA_TEMPLATE, end_tokens=["<eos>", "<end_of_turn>"]),
        Spec("mistral3-vision", "Mistral3ForConditionalGeneration (Mistral-Small-3.1: vision tower dropped, text "
             "decoder served)", "SentencePiece BPE like Llama-2; `[INST]` chat expert", "sdpa, window 8", "fast",
             llama2_tokenizer, mistral3_vision_config, LLAMA2_TEMPLATE),
    ]
}


@dataclass(frozen=True)
class BuiltFamily:
    spec: Spec
    base: Path
    expert: Path
    anti_expert: Path

    @property
    def chat_expert(self) -> bool:
        return self.spec.expert_template is not None

    def paths(self) -> list[str]:
        return [str(self.base), str(self.expert), str(self.anti_expert)]


def _save_model(directory: Path, spec: Spec, tokenizer, *, layers: int, hidden: int, seed: int, extra_rows: int,
                template: str | None, eos: list[int]) -> None:
    from transformers import GenerationConfig

    from proxy_engine.text_model import auto_class

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
           "pad_token_id": tokenizer.pad_token_id}
    config = spec.config(len(tokenizer) + extra_rows, layers, hidden, **ids)
    torch.manual_seed(seed)
    model = auto_class(config.model_type).from_config(config).float().eval()
    with torch.no_grad():
        # Larger-than-default weights so that random models have peaked, seed-distinct distributions (no near
        # ties for greedy decoding to break differently in batched and unbatched arithmetic).
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 2.0 / parameter.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
            elif "norm" in name:  # not all ones: a norm weight applied to the wrong heads or rows shows
                parameter.uniform_(0.5, 1.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(directory)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    if template is None:
        for name in ("chat_template.jinja", "chat_template.json"):
            (directory / name).unlink(missing_ok=True)


def build(name: str | Spec, root: Path) -> BuiltFamily:
    """Build family ``name`` (or a ``Spec`` of one's own) under ``root`` (reused when the stamp matches)."""
    spec = name if isinstance(name, Spec) else SPECS[name]
    name = spec.name
    root = Path(root)
    family = BuiltFamily(spec, root / "base", root / "expert", root / "anti_expert")
    stamp = root / "family.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"name": name, "version": 2}:
        return family
    tokenizer = spec.tokenizer()
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in spec.end_tokens] or [tokenizer.eos_token_id]
    _save_model(family.base, spec, tokenizer, layers=2, hidden=64, seed=1, extra_rows=spec.base_extra_rows,
                template=None, eos=end_ids)
    _save_model(family.anti_expert, spec, tokenizer, layers=1, hidden=32, seed=3, extra_rows=0, template=None,
                eos=end_ids)
    expert_tokenizer = tokenizer
    expert_eos = end_ids
    if spec.expert_added_tokens:  # an OpenHermes-style fine-tune: ChatML tokens appended to the vocabulary
        expert_tokenizer = spec.tokenizer()
        expert_tokenizer.add_special_tokens({"additional_special_tokens": spec.expert_added_tokens})
        expert_tokenizer.eos_token = spec.expert_eos
        expert_eos = [expert_tokenizer.convert_tokens_to_ids(spec.expert_eos)]
    _save_model(family.expert, spec, expert_tokenizer, layers=1, hidden=32, seed=2,
                extra_rows=spec.expert_extra_rows, template=spec.expert_template, eos=expert_eos)
    stamp.write_text(json.dumps({"name": name, "version": 2}))
    return family
