"""Tiny model families built on the fly: random weights and a byte-level BPE tokenizer trained in a second.

Tests, benchmarks and the no-download fallback demo use these instead of downloading anything. Every family
shares one tokenizer (so the vocabulary check passes), and can be built with an expert whose logit rows are
padded past the vocabulary, or with a chat template for a chat-format expert.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Proxy-tuning steers a large model with the difference between a small tuned model and its base.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is two plus two? Answer: four.",
    "Café, naïve, déjà vu, Ünïcödé, 東京, 日本語, emoji 🙂🚀, and accents á é í ó ú.",
    "User: hello there\nAssistant: Hi! How can I help you today?\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation ; : , . ! ? ( ) [ ] { }",
]


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int


TINY = Shape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128)
TINY_SMALL = Shape(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
# The benchmark family named in the issues: ~86M base, ~4M pair (with a 4k vocabulary, tied embeddings).
BENCH_BASE = Shape(layers=12, hidden=768, heads=12, kv_heads=12, intermediate=2048)
BENCH_SMALL = Shape(layers=4, hidden=256, heads=4, kv_heads=4, intermediate=512)


def build_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """Train a byte-level BPE tokenizer (so multi-byte characters split across tokens, as in real models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((corpus or _CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    return fast


def build_model(
    directory: Path,
    tokenizer,
    shape: Shape,
    *,
    seed: int,
    extra_vocab: int = 0,
    chat_template: str | None = None,
    max_position_embeddings: int = 512,
    dtype: torch.dtype = torch.float32,
    tie_embeddings: bool = False,
) -> Path:
    """A random-weight Llama saved with its tokenizer; ``extra_vocab`` pads the logit rows past the vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab + extra_vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # Larger-than-default init so that random models have peaked, seed-distinct distributions.
    if not tie_embeddings:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.5 / shape.hidden**0.5 * 8)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    if chat_template is None:
        # save_pretrained may keep an old template file around from a previous build; keep the dir honest.
        for name in ("chat_template.jinja", "chat_template.json"):
            (directory / name).unlink(missing_ok=True)
    return directory


@dataclass(frozen=True)
class Family:
    base: Path
    expert: Path
    anti_expert: Path

    def as_dict(self) -> dict[str, str]:
        return {"base": str(self.base), "expert": str(self.expert), "anti_expert": str(self.anti_expert)}


def build_family(
    root: Path,
    *,
    base: Shape = TINY,
    small: Shape = TINY_SMALL,
    vocab_size: int = 512,
    padded_expert: bool = False,
    chat_expert: bool = False,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Family:
    """Build base / expert / anti-expert under ``root`` (reused when already built with the same options)."""
    root = Path(root)
    options = {
        "base": base.__dict__, "small": small.__dict__, "vocab_size": vocab_size, "padded_expert": padded_expert,
        "chat_expert": chat_expert, "max_position_embeddings": max_position_embeddings, "seed": seed,
    }
    stamp = root / "family.json"
    family = Family(root / "base", root / "expert", root / "anti_expert")
    if stamp.exists() and json.loads(stamp.read_text()) == options:
        return family
    tokenizer = build_tokenizer(vocab_size)
    build_model(family.base, tokenizer, base, seed=seed + 1, max_position_embeddings=max_position_embeddings)
    build_model(
        family.expert,
        tokenizer,
        small,
        seed=seed + 2,
        extra_vocab=64 if padded_expert else 0,
        chat_template=CHAT_TEMPLATE if chat_expert else None,
        max_position_embeddings=max_position_embeddings,
    )
    build_model(family.anti_expert, tokenizer, small, seed=seed + 3, max_position_embeddings=max_position_embeddings)
    stamp.write_text(json.dumps(options))
    return family
