"""An expert given as a LoRA adapter, served over HTTP (the merge itself: tests/engine/test_adapter.py): the
start-up line and its model card name the adapter, and the proxy-tuned and expert-alone models answer."""

from __future__ import annotations

import httpx
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from proxy_engine.engine_process import async_engine_for
from server.cli import resolve_settings
from tests.server.live import MODEL, LiveServer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def test_an_adapter_expert_over_http(tiny_family, tmp_path, caplog):
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_family.anti_expert),
                                  peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    wrapped.save_pretrained(tmp_path / "lora")
    settings, _ = resolve_settings(["--base", str(tiny_family.base), "--expert", str(tmp_path / "lora"),
                                    "--anti-expert", str(tiny_family.anti_expert)])
    with caplog.at_level("INFO", logger="proxy_serve"):
        server = LiveServer(async_engine_for(settings.engine), settings).start()
    assert f"expert {tiny_family.anti_expert} + adapter {tmp_path / 'lora'} on cpu" in caplog.text  # start-up line
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
            assert cards[f"{MODEL}:expert"]["root"] == str(tmp_path / "lora")
            assert cards[MODEL]["root"] == str(tiny_family.base)
            for model in (MODEL, f"{MODEL}:expert"):
                answer = http.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4,
                                                            "ignore_eos": True})
                assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
