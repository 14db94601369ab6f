"""The runner's slot cache: rows joining and leaving at any time decode exactly as each row would alone."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

from proxy_engine.runner import ModelRunner


def _alone(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits of one row, no cache, no batch."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _join(runner: ModelRunner, seq_ids: list[int], prompts: list[list[int]]) -> None:
    job = runner.start_prefill(seq_ids, prompts)
    while not job.complete:
        runner.prefill_step(job, 7)  # small chunks: the job spans several steps
    runner.add_rows(job)


def test_rows_join_and_leave_and_decode_as_alone(tiny_family):
    model = AutoModelForCausalLM.from_pretrained(tiny_family.base, dtype=torch.float32).eval()
    runner = ModelRunner(model, 512, 1, "base")
    rng = random.Random(0)
    sequences: dict[int, list[int]] = {}
    next_id = 0
    for step in range(40):
        if step % 5 == 0:  # a group of rows of different lengths joins
            group = []
            for _ in range(rng.randint(1, 3)):
                sequences[next_id] = [rng.randrange(10, 500) for _ in range(rng.randint(1, 12))]
                group.append(next_id)
                next_id += 1
            _join(runner, group, [sequences[i] for i in group])
        if step % 3 == 2 and runner.num_rows > 1:  # some rows leave, from anywhere in the batch
            leaving = set(rng.sample(runner.seq_ids, rng.randint(1, runner.num_rows - 1)))
            runner.keep_rows([i for i in runner.seq_ids if i not in leaving])
        assert sorted(runner.seq_ids) == sorted(set(runner.seq_ids))
        tokens = [rng.randrange(10, 500) for _ in runner.seq_ids]
        for seq_id, token in zip(runner.seq_ids, tokens):
            sequences[seq_id].append(token)
        logits = runner.decode(torch.tensor(tokens))
        for row, seq_id in enumerate(runner.seq_ids):
            torch.testing.assert_close(logits[row], _alone(model, sequences[seq_id]), atol=1e-4, rtol=1e-4)
    assert all(torch.isfinite(layer.k_buf).all() for layer in runner.cache.layers)
    runner.keep_rows([])
    assert runner.num_rows == 0 and runner.kv_bytes() == 0


def test_capacity_grows_and_is_kept_while_rows_run(tiny_family):
    model = AutoModelForCausalLM.from_pretrained(tiny_family.base, dtype=torch.float32).eval()
    runner = ModelRunner(model, 512, 1, "base")
    _join(runner, [0, 1], [[5, 6, 7], list(range(10, 70))])
    for _ in range(10):
        runner.decode(torch.tensor([11, 12]))
    capacity = runner.cache.capacity
    assert capacity >= 71 and runner.cache.lengths == [13, 70]
    runner.keep_rows([0])
    assert runner.seq_ids == [0] and runner.cache.capacity == capacity  # no copy of the batch on leave
    _join(runner, [2], [[1, 2, 3, 4]])
    assert runner.seq_ids == [0, 2] and runner.cache.lengths == [13, 4]
