"""Pure units: combine, sampler, penalties, stop strings, UTF-8 hold-back."""

from __future__ import annotations

import math

import pytest
import torch

from proxy_engine.combine import Contribution, combine, proxy_tuned
from proxy_engine.detokenizer import IncrementalDetokenizer, find_stop, held_back
from proxy_engine.request import SamplingParams
from proxy_engine.sampler import (
    apply_logit_bias,
    apply_penalties,
    ban_tokens,
    filter_top_k_top_p_min_p,
    sample,
    top_logprobs,
)


def test_combine_equals_formula_and_skips_absent_rows():
    torch.manual_seed(0)
    base, e1, a1, e2, a2 = (torch.randn(3, 11) for _ in range(5))
    alphas = [0.7, -1.5]
    parts = [
        Contribution(torch.arange(3), torch.ones(3), base),
        Contribution(torch.arange(3), torch.full((3,), alphas[0]), e1),
        Contribution(torch.arange(3), torch.full((3,), -alphas[0]), a1),
        Contribution(torch.arange(3), torch.full((3,), alphas[1]), e2),
        Contribution(torch.arange(3), torch.full((3,), -alphas[1]), a2),
    ]
    expected = proxy_tuned(base, [e1, e2], [a1, a2], alphas)
    torch.testing.assert_close(combine(3, 11, parts, torch.device("cpu")), expected)
    # Row 1 has alpha 0: the small models never computed it, and the result is the base's row.
    sub = [parts[0], Contribution(torch.tensor([0, 2]), torch.tensor([1.0, 1.0]), e1[[0, 2]]),
           Contribution(torch.tensor([0, 2]), torch.tensor([-1.0, -1.0]), a1[[0, 2]])]
    out = combine(3, 11, sub, torch.device("cpu"))
    torch.testing.assert_close(out[1], base[1])
    torch.testing.assert_close(out[0], base[0] + e1[0] - a1[0])


def test_combine_casts_half_precision_to_float32():
    base = torch.randn(2, 5).to(torch.bfloat16)
    out = combine(2, 5, [Contribution(torch.arange(2), torch.ones(2), base)], torch.device("cpu"))
    assert out.dtype == torch.float32


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert sample(logits, torch.zeros(2), [None, None]).tolist() == [1, 0]
    draws = []
    for _ in range(2):
        g = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
        draws.append([sample(logits, torch.ones(2), g).tolist() for _ in range(20)])
    assert draws[0] == draws[1]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, torch.ones(1), [g]) for _ in range(3000)])
    counts = torch.bincount(draws.flatten(), minlength=3)
    assert abs(counts[0].item() / 3000 - 0.7) < 0.04


def test_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    out = filter_top_k_top_p_min_p(
        logits, torch.tensor([2, 0, 0, 0]), torch.tensor([1.0, 0.8, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.4, 0.0])
    )
    keep = torch.isfinite(out)
    assert keep[0].tolist() == [True, True, False, False]  # top_k 2
    assert keep[1].tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert keep[2].tolist() == [True, True, False, False]  # min_p 0.4 * 0.5 = 0.2 > 0.15
    assert keep[3].all()
    torch.testing.assert_close(out[3], logits[3])


def test_top_p_keeps_the_top_token_always():
    logits = torch.tensor([[1.0, 0.0]])
    out = filter_top_k_top_p_min_p(logits, torch.tensor([0]), torch.tensor([1e-6]), torch.tensor([0.0]))
    assert torch.isfinite(out[0, 0]) and not torch.isfinite(out[0, 1])


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    prompt = torch.tensor([[False, False, True, False]])
    out = apply_penalties(logits, counts, prompt, torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([2.0]))
    # token 0: 2/2 - 0.25*2 - 0.5; token 1: -2*2 - 0.25 - 0.5; token 2 (prompt only): 1/2; token 3 untouched
    torch.testing.assert_close(out, torch.tensor([[0.0, -4.75, 0.5, 1.0]]))


def test_logit_bias_and_bans():
    logits = torch.zeros(2, 4)
    apply_logit_bias(logits, [{1: 5.0}, None])
    ban_tokens(logits, [[], [0, 3]])
    assert logits[0].tolist() == [0.0, 5.0, 0.0, 0.0]
    assert logits[1, 0] == -math.inf and logits[1, 3] == -math.inf


def test_top_logprobs_are_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    chosen, values, ids = top_logprobs(logits, torch.tensor([0]), 2)
    expected = torch.log_softmax(logits, -1)
    assert ids.tolist() == [[2, 1]]
    torch.testing.assert_close(values, expected[:, [2, 1]])
    torch.testing.assert_close(chosen, expected[:, 0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_tokens": -1}, "max_tokens must be at least 0"),
        ({"n": 0}, "n must"),
        ({"n": 1000}, "n must"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": ["x"] * 17}, "stop strings"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: 500.0}}, "logit_bias"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": [1.0, 2.0]}, "alpha has 2 values"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_invalid_sampling_values_are_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).validate(vocab_size=100, num_pairs=1)


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
