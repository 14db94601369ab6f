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
