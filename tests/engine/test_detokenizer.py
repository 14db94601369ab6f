"""detokenizer: stop strings, UTF-8 hold-back, token bytes."""

from __future__ import annotations

from proxy_engine.detokenizer import IncrementalDetokenizer, find_stop, held_back
from server.demo import TRAINED_DEMO


def test_stop_helpers():
    assert find_stop("abc STOP def", ["STOP"], 0) == (4, "STOP")
    assert find_stop("abcST", ["STOP"], 0) is None
    assert held_back("hello ST", ["STOP"]) == 2
    assert held_back("hello", ["STOP"]) == 0
    assert held_back("ab", ["abc", "b"]) == 2


class ByteTokenizer:
    """Each token is one UTF-8 byte: the hardest case for streaming."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stops: list[str], include_stop: bool = False) -> tuple[list[str], bool]:
    detok = IncrementalDetokenizer(ByteTokenizer(), stops, include_stop)
    deltas, stopped = [], False
    for byte in text.encode():
        step = detok.add(byte)
        deltas.append(step.delta)
        if step.stopped:
            stopped = True
            break
    if not stopped:
        deltas.append(detok.finish())
    return deltas, stopped


def test_utf8_is_never_split():
    deltas, _ = _stream("añ東🙂z", [])
    assert "".join(deltas) == "añ東🙂z"
    assert all("\ufffd" not in d for d in deltas)
    assert "🙂" in deltas  # released whole, once its 4th byte arrived


def test_stop_string_split_across_tokens_is_never_streamed():
    deltas, stopped = _stream("hello wor<END>ld", ["<END>"])
    assert stopped and "".join(deltas) == "hello wor"
    assert not any("<" in d for d in deltas)
    deltas, stopped = _stream("a<EN b", ["<END>"])
    assert not stopped and "".join(deltas) == "a<EN b"  # a false start is released once ruled out


def test_stop_string_included_on_request():
    deltas, stopped = _stream("x<END>y", ["<END>"], include_stop=True)
    assert stopped and "".join(deltas) == "x<END>"


def test_earliest_of_several_stops_wins():
    deltas, stopped = _stream("one two three", ["three", "two"])
    assert stopped and "".join(deltas) == "one "


def test_token_bytes_round_trip_partial_characters(tiny_family):
    from transformers import AutoTokenizer

    from proxy_engine.detokenizer import token_bytes

    tokenizer = AutoTokenizer.from_pretrained(tiny_family.base)
    text = "Café 東京 🙂 hi"
    ids = tokenizer(text)["input_ids"]
    pieces = [token_bytes(tokenizer, i) for i in ids]
    assert b"".join(pieces).decode("utf-8") == text
    assert any(_is_partial(p) for p in pieces)  # some token holds only part of a character


def _is_partial(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_the_backend_decode_is_transformers_decode_on_every_family_style():
    """The detokenizer decodes through the tokenizers backend where that is the same call (2.5x less per call):
    the same text for random windows of ids, special tokens included, on each family's tokenizer style; a
    tokenizer that cleans up spaces keeps transformers' decode."""
    import random

    from transformers import AutoTokenizer

    from proxy_engine.detokenizer import backend_decode
    from tests.conformance import families

    tokenizers = {name: getattr(families, f"{name}_tokenizer")() for name in ("llama2", "gemma", "llama3", "qwen",
                                                                               "neox")}
    tokenizers["demo"] = AutoTokenizer.from_pretrained(str(TRAINED_DEMO / "base"))
    rng = random.Random(0)
    direct = []
    for name, tokenizer in tokenizers.items():
        size = len(tokenizer)
        for skip in (True, False):
            decode = backend_decode(tokenizer, skip)
            for _ in range(200):
                ids = [rng.randrange(size) for _ in range(rng.randint(1, 8))]
                assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip), (name, ids)
        if tokenizer._proxy_serve_backend_decode:
            direct.append(name)
    assert len(direct) >= 4, direct  # the fast path is really taken
    cleaning = families.llama3_tokenizer()
    cleaning.clean_up_tokenization_spaces = True
    cleaning.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    assert backend_decode(cleaning, True).func == cleaning.decode  # " ." -> "." happens in transformers only
