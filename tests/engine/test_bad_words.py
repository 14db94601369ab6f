"""vLLM's ``allowed_token_ids`` and ``bad_words``: the token sequences a word is banned as (vLLM's rule, on a
byte-level BPE and a SentencePiece tokenizer), the completion rule, and both through the engine."""

from __future__ import annotations

import pytest

from proxy_engine.bad_words import bad_word_token_ids, banned_next
from proxy_engine.request import FieldError, SamplingParams
from tests.engine.conftest import make_engine, run_to_end, submit


def _contains(tokens: list[int], run: tuple[int, ...]) -> bool:
    return any(tuple(tokens[i:i + len(run)]) == run for i in range(len(tokens) - len(run) + 1))


def test_a_word_is_banned_as_spelled_alone_and_after_a_space(chat_family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat_family.base))  # byte-level BPE
    counts_differ = []
    for word in ("capital", "Fairholm", "hedgehog", "東京"):
        spelled = bad_word_token_ids(tokenizer, [word, " " + word])
        alone = tuple(tokenizer.encode(word, add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word, add_special_tokens=False))
        # " word" and "word" are one word; a spelling that is a lone space token before the word alone is covered.
        assert spelled == ((alone,) if spaced in (alone,) or spaced[1:] == alone else (alone, spaced))
        if len(spelled) == 2 and len(spaced) != len(alone):
            counts_differ.append(word)
    # Kept whatever the token counts: mid-sentence is where a word occurs (vLLM drops that spelling then).
    assert counts_differ


def test_sentencepiece_spellings_drop_a_lone_space_token():
    from tests.conformance.families import llama2_tokenizer

    tokenizer = llama2_tokenizer()
    for word in ("capital", "France", "東京"):
        alone = tuple(tokenizer.encode(word, add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word, add_special_tokens=False))
        expected = [alone] if spaced[1:] == alone else list(dict.fromkeys([alone, spaced]))
        assert list(bad_word_token_ids(tokenizer, [word])) == expected


def test_the_last_token_is_banned_only_when_the_output_ends_with_the_rest():
    words = ((7,), (1, 2, 3), (4, 5))
    assert banned_next(words, []) == [7]  # one token: always; longer words need their head in the output
    assert banned_next(words, [9, 1, 2]) == [7, 3]
    assert banned_next(words, [1, 2, 9]) == [7]
    assert banned_next(words, [4]) == [7, 5]


def test_bad_words_keep_the_greedy_output_free_of_them(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    submit(engine, "probe", "The capital of France is", temperature=0, max_tokens=12, ignore_eos=True)
    probe = run_to_end(engine)[("probe", 0)]
    texts = [engine.tokenizer.decode([t]) for t in probe["tokens"]]
    word = next(t for t in texts if t.startswith(" ") and t[1:].isalpha())  # the first whole word greedy writes
    engine = make_engine(chat_models, chat_family)
    submit(engine, "ban", "The capital of France is", temperature=0, max_tokens=12, ignore_eos=True,
           bad_words=[word])
    banned = run_to_end(engine)[("ban", 0)]
    assert banned["tokens"] != probe["tokens"]
    spelled = bad_word_token_ids(engine.tokenizer, [word])
    assert tuple(engine.tokenizer.encode(word, add_special_tokens=False)) in spelled
    for run in spelled:
        assert not _contains(banned["tokens"], run), (word, run)


def test_a_word_of_several_tokens_is_kept_out_mid_sentence_on_the_demo():
    """The case vLLM's rule misses: on the demo's byte-level BPE `` hedgehog`` is two tokens and ``hedgehog`` three,
    and greedy writes `` hedgehog`` after this prompt."""
    from proxy_engine.config import EngineConfig
    from proxy_engine.engine import ProxyEngine
    from proxy_engine.loader import load_models
    from server.demo import default_engine_config

    config = EngineConfig(**default_engine_config())  # what `make serve` serves
    models = load_models(config)
    texts = {}
    for bad in (None, ["hedgehog"]):
        engine = ProxyEngine(models, config)
        submit(engine, "r", "The pet of Greta Fairholm is", temperature=0, max_tokens=4, bad_words=bad)
        texts[bool(bad)] = run_to_end(engine)[("r", 0)]["text"]
    assert " hedgehog" in texts[False]
    assert "hedgehog" not in texts[True]


def test_allowed_token_ids_are_all_that_is_generated(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    allowed = [5, 17, 40, 41, 300]
    submit(engine, "sampled", "Hello", temperature=1.0, seed=4, max_tokens=20, ignore_eos=True,
           allowed_token_ids=allowed)
    submit(engine, "greedy", "Hello", temperature=0, max_tokens=8, ignore_eos=True, allowed_token_ids=[300])
    results = run_to_end(engine)
    assert set(results[("sampled", 0)]["tokens"]) <= set(allowed) and len(results[("sampled", 0)]["tokens"]) == 20
    assert results[("greedy", 0)]["tokens"] == [300] * 8


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
        ({"bad_words": ["  "]}, "bad_words"),
        ({"bad_words": ["x"] * 65}, "bad_words"),
    ],
)
def test_bad_values_name_their_field(params, param):
    with pytest.raises(FieldError) as refused:
        SamplingParams(**params).validate(vocab_size=1000, num_pairs=1)
    assert refused.value.param == param
