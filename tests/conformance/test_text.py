"""The text rule on real tokenizer styles, at the detokenizer: ``decode(prompt + output) - decode(prompt)``,
token texts that join to it, and top-logprobs keys that stay distinct."""

from __future__ import annotations

import pytest

from proxy_engine.detokenizer import IncrementalDetokenizer
from tests.conformance.families import gemma_tokenizer, llama2_tokenizer, llama3_tokenizer, qwen_tokenizer
from tests.conformance.reference import completion_text

PROMPT = "The capital of France is"


@pytest.fixture(scope="module", params=["llama2", "gemma2", "llama3", "qwen2.5"])
def tokenizer(request):
    return {"llama2": llama2_tokenizer, "gemma2": gemma_tokenizer, "llama3": llama3_tokenizer,
            "qwen2.5": qwen_tokenizer}[request.param]()


def _run(tokenizer, prompt_ids, output_ids):
    detokenizer = IncrementalDetokenizer(tokenizer, [], prompt_ids=prompt_ids)
    deltas, token_texts = [], []
    for token in output_ids:
        step = detokenizer.add(token)
        deltas.append(step.delta)
        token_texts.append(step.token_text)
    deltas.append(detokenizer.finish())
    if token_texts:
        token_texts[-1] += detokenizer.flushed  # what the engine's last logprobs entry carries
    return "".join(deltas), token_texts


def test_sentencepiece_keeps_the_space_before_the_first_word():
    """The issue's case: Llama-2 style, three forced ``▁P`` after "The capital of France is"."""
    tokenizer = llama2_tokenizer()
    prompt = tokenizer(PROMPT)["input_ids"]
    p = tokenizer.convert_tokens_to_ids("▁P")
    text, token_texts = _run(tokenizer, prompt, [p, p, p])
    assert text == " P P P"
    assert token_texts == [" P", " P", " P"]
    assert PROMPT + text == "The capital of France is P P P"


def test_token_texts_join_and_characters_split_over_tokens(tokenizer):
    prompt = tokenizer(PROMPT)["input_ids"]
    output = tokenizer(" 東京 déjà vu 🙂 and P", add_special_tokens=False)["input_ids"]
    text, token_texts = _run(tokenizer, prompt, output)
    assert text == completion_text(tokenizer, prompt, output) == " 東京 déjà vu 🙂 and P"
    assert "".join(token_texts) == text


def test_an_invalid_byte_run_decodes_as_the_full_decode_does(tokenizer):
    """A byte that breaks a run turns the whole run into U+FFFD in a SentencePiece decode: never streamed early."""
    prompt = tokenizer(PROMPT)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    bytes_ = [i for i, piece in enumerate(pieces) if piece in ("<0xE6>", "<0x9D>", "<0xB1>", "<0x7F>")]
    if len(bytes_) < 4:
        pytest.skip("a byte-level tokenizer: no byte-fallback pieces")
    e6, x9d, b1, x7f = (tokenizer.convert_tokens_to_ids(p) for p in ("<0xE6>", "<0x9D>", "<0xB1>", "<0x7F>"))
    word = tokenizer.convert_tokens_to_ids("▁P")
    for output in ([e6, x9d, b1, e6, word], [x7f, e6, word], [e6, x9d, b1, word, e6]):
        text, token_texts = _run(tokenizer, prompt, output)
        assert text == completion_text(tokenizer, prompt, output), output
        assert "".join(token_texts) == text


def test_top_logprob_keys_are_distinct_and_rendered_in_context(tokenizer):
    prompt = tokenizer(PROMPT)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, [], prompt_ids=prompt)
    candidates = list(range(len(tokenizer)))
    keys = detokenizer.render(candidates)
    assert len(set(keys)) == len(keys)
    if "▁P" in tokenizer.get_vocab() and "P" in tokenizer.get_vocab():
        by_piece = dict(zip(tokenizer.convert_ids_to_tokens(candidates), keys))
        assert by_piece["▁P"] == " P" and by_piece["P"] == "P"
