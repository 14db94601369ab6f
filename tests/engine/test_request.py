"""request: SamplingParams.validate names the field of every bad value."""

from __future__ import annotations

import pytest

from proxy_engine.request import SamplingParams


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


def test_wire_enums_read_as_their_values():
    """Finish reasons and error codes go into JSON bodies, SSE events, log lines and metric labels as is."""
    import json

    from proxy_engine.request import ErrorCode, FinishReason

    body = json.dumps({"code": ErrorCode.TIMEOUT, "finish": FinishReason.STOP})
    assert body == '{"code": "timeout", "finish": "stop"}'
    code = ErrorCode.INTERNAL_ERROR
    assert f"{code}" == format(code) == str(code) == "internal_error"
    assert ErrorCode("shutdown") is ErrorCode.SHUTDOWN and FinishReason.LENGTH == "length"


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (None, [0.0, 0.5, 0.0]),  # the pair's own default
        (2.0, [0.0, 2.0, 0.0]),
        ([2.0], [0.0, 2.0, 0.0]),
        ([9.0, 3.0, 9.0], [0.0, 3.0, 0.0]),  # one per pair (the playground's sliders): the selected one counts
        (0, [0.0, 0.0, 0.0]),
    ],
)
def test_a_named_pairs_model_runs_that_pair_alone(alpha, expected):
    """A named pair's model id (Target.pair): its alpha, the other pairs' 0, whatever the request sends for them."""
    assert SamplingParams(alpha=alpha).resolve_alphas([1.0, 0.5, 1.5], pair=1) == expected


@pytest.mark.parametrize(("alpha", "message"), [([1.0, 2.0], "alpha has 2 values, but this model serves one"),
                                                 (float("nan"), "alpha"), ([1.0, 200.0, 1.0], r"\[-100, 100\]")])
def test_a_named_pairs_alpha_is_checked_as_any(alpha, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(alpha=alpha).validate(vocab_size=100, num_pairs=3, pair=1)
