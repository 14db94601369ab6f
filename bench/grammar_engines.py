"""Compare grammar engines (xgrammar, llguidance, outlines-core) on this CPU with a Hugging Face tokenizer.

For each engine: build its tokenizer view once, compile a JSON schema (cold, then cached where the engine caches),
then walk a fixed valid JSON document token by token, computing the mask, applying it to a logits tensor and
advancing, and report the median per-step time (mask + apply). The candidates need not be installed in the
project's environment: point PYTHONPATH at a folder holding them (``pip install --target``). An engine that
cannot be imported is reported as such.

    PYTHONPATH=.:/tmp/gcands python -m bench.grammar_engines [--tokenizer DIR] [--vocab 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                    "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = '{"name":"Ada Lovelace","age":36,"tags":["a","c"],"address":{"city":"London","zip":"12345"}}'


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run_llguidance(tokenizer, vocab: int, ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    lltok, tok_s = _timed(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab))
    options = {"whitespace_flexible": False}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options)
    matcher, compile_s = _timed(lambda: llguidance.LLMatcher(lltok, grammar))
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llt.allocate_token_bitmask(1, vocab)
    logits = torch.randn(1, vocab)
    steps = []
    for token in ids:
        start = time.perf_counter()
        llt.fill_next_token_bitmask(matcher, bitmask, 0)
        masked = logits.clone()
        _apply_bitmask(masked, bitmask, vocab)
        steps.append(time.perf_counter() - start)
        assert masked[0, token] > float("-inf"), f"llguidance masked a valid token {token}"
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting()
    return {"tokenizer_s": tok_s, "compile_s": compile_s, "step_s": statistics.median(steps)}


def run_xgrammar(tokenizer, vocab: int, ids: list[int]) -> dict:
    import xgrammar as xgr

    info, tok_s = _timed(lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
    compiler = xgr.GrammarCompiler(info)
    compiled, compile_s = _timed(
        lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    )
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    logits = torch.randn(1, vocab)
    steps = []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        masked = logits.clone()
        _apply_bitmask(masked, bitmask, vocab)
        steps.append(time.perf_counter() - start)
        assert masked[0, token] > float("-inf"), f"xgrammar masked a valid token {token}"
        assert matcher.accept_token(token)
    assert matcher.is_terminated() or matcher.accept_token(info.stop_token_ids[0])
    return {"tokenizer_s": tok_s, "compile_s": compile_s, "step_s": statistics.median(steps)}


def run_outlines(tokenizer, vocab: int, ids: list[int]) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from proxy_engine.detokenizer import token_bytes

    def vocabulary():
        special = set(tokenizer.all_special_ids)
        pieces: dict[bytes, list[int]] = {}
        for token_id in range(vocab):
            if token_id not in special:
                pieces.setdefault(token_bytes(tokenizer, token_id), []).append(token_id)
        return Vocabulary(tokenizer.eos_token_id, pieces)

    vocab_obj, tok_s = _timed(vocabulary)
    regex = build_regex_from_schema(json.dumps(SCHEMA), None)  # None: no whitespace between tokens
    index, compile_s = _timed(lambda: Index(regex, vocab_obj))
    guide = Guide(index)
    logits = torch.randn(1, vocab)
    steps = []
    for token in ids:
        start = time.perf_counter()
        allowed = torch.tensor(guide.get_tokens(), dtype=torch.long)
        masked = torch.full_like(logits, float("-inf"))
        masked[0, allowed] = logits[0, allowed]
        steps.append(time.perf_counter() - start)
        assert masked[0, token] > float("-inf"), f"outlines masked a valid token {token}"
        guide.advance(token)
    assert guide.is_finished()
    return {"tokenizer_s": tok_s, "compile_s": compile_s, "step_s": statistics.median(steps)}


def _apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, vocab: int) -> None:
    """One vectorised CPU application of a 32-bit-per-word mask (the same for every engine that has one)."""
    bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()
    logits.masked_fill_(~allowed, float("-inf"))


def document_ids(tokenizer) -> list[int]:
    """The document's tokens as a model would generate them mid-text (a SentencePiece tokenizer would put a
    ``▁`` before a text's first piece: tokenize after a newline and drop the newline's tokens)."""
    ids = tokenizer("\n" + DOCUMENT, add_special_tokens=False)["input_ids"]
    for k in range(len(ids)):
        if tokenizer.decode(ids[k:]) == DOCUMENT and tokenizer.decode(ids[:k]).strip(" ") == "\n":
            return ids[k:]
    return tokenizer(DOCUMENT, add_special_tokens=False)["input_ids"]


def train_tokenizer(kind: str, vocab: int):
    """A tokenizer trained now: the tiny families' byte-level BPE, or a SentencePiece-style one (a ``▁`` for
    spaces, byte fallback), on generated words when the vocabulary is larger than the tiny corpus allows."""
    from bench.family import _corpus
    from proxy_engine.families import _CORPUS, SPECIAL_TOKENS, build_tokenizer

    corpus = [*_CORPUS, DOCUMENT, *_corpus(words=200_000)] if vocab > 512 else None
    if kind == "byte-level":
        return build_tokenizer(vocab, corpus=corpus)
    return _llama_style(corpus or [*_CORPUS, DOCUMENT] * 4, vocab, SPECIAL_TOKENS)


def _llama_style(corpus: list[str], vocab: int, specials: list[str]):
    """A Llama-2-style tokenizer: ``▁`` for spaces, ``<0xNN>`` byte fallback, the same normaliser and decoder."""
    from tokenizers import SentencePieceBPETokenizer, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(corpus, vocab_size=vocab - 256, special_tokens=specials, show_progress=False)
    state = json.loads(trained._tokenizer.to_str())["model"]
    pieces = [*specials, *(f"<0x{b:02X}>" for b in range(256))]
    pieces += [p for p, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    model = models.BPE({p: i for i, p in enumerate(pieces)}, merges, byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")


ENGINES = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a local tokenizer directory (default: the tiny family's, trained now)")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary of the trained tokenizer")
    parser.add_argument("--kind", choices=["byte-level", "sentencepiece"], default="byte-level",
                        help="byte-level BPE (GPT-2, Llama 3, Qwen) or a SentencePiece-style BPE (Llama 2, Mistral)")
    args = parser.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    else:
        tokenizer = train_tokenizer(args.kind, args.vocab)
    vocab = len(tokenizer)
    ids = document_ids(tokenizer)
    print(f"tokenizer: {type(tokenizer).__name__}, vocab {vocab}; document: {len(ids)} tokens")
    print(f"{'engine':<14} {'tokenizer s':>12} {'compile ms':>11} {'step us':>9}")
    for name, run in ENGINES.items():
        try:
            result = run(tokenizer, vocab, ids)
        except ImportError as error:
            print(f"{name:<14} not installed ({error})")
            continue
        except Exception as error:  # noqa: BLE001 - a comparison reports every engine's failure
            print(f"{name:<14} failed: {type(error).__name__}: {error}")
            continue
        print(f"{name:<14} {result['tokenizer_s']:>12.3f} {result['compile_s'] * 1e3:>11.1f} "
              f"{result['step_s'] * 1e6:>9.0f}")


if __name__ == "__main__":
    main()
