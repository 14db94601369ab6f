"""The placement plan counts each model's prefix-cache budget on top of its KV cache at the limits."""

from __future__ import annotations

import json

from proxy_engine.config import EngineConfig
from proxy_engine.memory import GiB
from proxy_engine.placement import plan_placement

from .known_models import KNOWN_MODELS


def _plan(tmp_path, prefix_cache: dict):
    model = tmp_path / "llama"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(KNOWN_MODELS["meta-llama/Llama-2-70b-hf"][0]))
    (model / "model.safetensors").write_bytes(b"")
    config = EngineConfig.model_validate({
        "base": {"path": str(model), "device": ["cuda:0", "cuda:1"], "dtype": "float16"},
        "limits": {"max_num_seqs": 16, "max_model_len": 4096},
        "prefix_cache": prefix_cache,
    })
    return plan_placement(config, device_count=2, gpu_memory={0: 80 * GiB, 1: 80 * GiB})


def test_the_prefix_cache_share_is_counted_and_nothing_when_off(tmp_path):
    off = sum(_plan(tmp_path, {"enabled": False}).device_kv_bytes.values())
    assert off == 16 * 4096 * 327_680  # 20 GiB: 16 sequences x 4,096 tokens x 320 KiB
    on = sum(_plan(tmp_path, {"memory_fraction": 0.5}).device_kv_bytes.values())
    assert on == off * 1.5
