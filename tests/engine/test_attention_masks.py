"""Decode masks for the transformers path: additive (eager attention adds them), with the sliding window."""

from __future__ import annotations

import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig

from proxy_engine.attention_masks import DecodeMasks, additive, visible


def test_visible_columns_respect_position_and_window():
    seen = visible(torch.tensor([2, 5]), span=6, window=3)
    assert seen.tolist() == [[True, True, True, False, False, False], [False, False, False, True, True, True]]
    assert visible(torch.tensor([1]), span=3, window=None).tolist() == [[True, True, False]]


def test_masks_are_additive_not_boolean():
    """A boolean mask added to eager attention's scores adds 1 to the seen keys and hides nothing."""
    mask = additive(torch.tensor([[True, False]]), torch.float32)
    assert mask.shape == (1, 1, 1, 2) and mask.dtype == torch.float32
    assert mask[0, 0, 0, 0] == 0 and mask[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_full_attention_rows_of_one_length_need_no_mask():
    masks = DecodeMasks(LlamaConfig(), torch.float32)
    assert masks.build(torch.tensor([3, 3]), 4, uniform=True) is None
    assert masks.build(torch.tensor([3, 1]), 4, uniform=False).shape == (2, 1, 1, 4)


def test_a_sliding_window_is_kept_even_for_rows_of_one_length():
    masks = DecodeMasks(MistralConfig(sliding_window=2), torch.bfloat16)
    mask = masks.build(torch.tensor([3]), 4, uniform=True)
    assert mask.dtype == torch.bfloat16
    assert (mask[0, 0, 0] == 0).tolist() == [False, False, True, True]


def test_mixed_layers_get_one_mask_per_layer_type():
    config = Gemma2Config(num_hidden_layers=2, sliding_window=2, layer_types=["sliding_attention", "full_attention"])
    masks = DecodeMasks(config, torch.float32).build(torch.tensor([3, 1]), 4, uniform=False)
    assert set(masks) == {"sliding_attention", "full_attention"}
    assert (masks["full_attention"][0, 0, 0] == 0).tolist() == [True, True, True, True]
    assert (masks["sliding_attention"][0, 0, 0] == 0).tolist() == [False, False, True, True]
