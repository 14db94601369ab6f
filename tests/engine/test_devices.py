"""Devices by construction, the parts a CPU can show: generators live where the logits live, and a copy to
the host is never left asynchronous (the GPU halves are tests/gpu)."""

from __future__ import annotations

import torch

from proxy_engine.combine import Contribution, combine, non_blocking_to
from proxy_engine.request import PromptInput, SamplingParams
from tests.engine.conftest import make_engine


def test_copies_to_the_host_block_and_copies_to_accelerators_do_not():
    assert non_blocking_to("cpu") is False and non_blocking_to(torch.device("cpu")) is False
    assert non_blocking_to("cuda:0") is True and non_blocking_to(torch.device("cuda", 1)) is True


def test_combine_reads_every_part_on_the_host():
    part = Contribution.of(torch.ones(2, 4), [0, 1], [1.0, 0.5])
    out = combine(2, 4, [part], torch.device("cpu"))
    assert out.tolist() == [[1.0] * 4, [0.5] * 4]


def test_each_sequence_generator_lives_on_the_engine_device(chat_models, chat_family):
    engine = make_engine(chat_models, chat_family)
    (sequence,) = engine.make_sequences("r", PromptInput(text="Hi"), SamplingParams(max_tokens=2, seed=3))
    assert sequence.generator.device == engine.device
