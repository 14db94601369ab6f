"""``proxy-serve --base X.gguf --expert DIR-WITH-A-GGUF --anti-expert HF-DIR`` serves, and its answers are the
naive reference's over what transformers makes of the same files."""

from __future__ import annotations

import httpx
import torch

from tests.engine.reference import NaiveProxy
from tests.reliability.support import SUBPROCESS_ENV
from tests.server.live import cli_server

TOKENS = 6


def _reference(family) -> tuple[NaiveProxy, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(path, gguf_file=None):
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()

    expert_file = next(family.expert.glob("*.gguf")).name
    models = [load(family.base.parent, family.base.name), load(family.expert, expert_file), load(family.anti_expert)]
    tokenizer = AutoTokenizer.from_pretrained(str(family.base.parent), gguf_file=family.base.name)
    return NaiveProxy([], family.base_config.vocab_size, models=models), tokenizer


def test_serves_a_gguf_triple_from_flags(gguf_family, tmp_path):
    family = gguf_family
    args = ["--base", str(family.base), "--expert", str(family.expert), "--anti-expert", str(family.anti_expert),
            "--served-model-name", "tiny-gguf"]
    with cli_server(args, tmp_path / "server.log", env=SUBPROCESS_ENV, timeout=180) as (url, process):
        models = httpx.get(f"{url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny-gguf", "tiny-gguf:base", "tiny-gguf:expert"]
        body = {"model": "tiny-gguf", "prompt": "The capital of France is", "max_tokens": TOKENS, "temperature": 0,
                "ignore_eos": True}
        completion = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert completion.status_code == 200, completion.text
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "tiny-gguf:base", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": TOKENS,
            "temperature": 0, "ignore_eos": True})
        assert chat.status_code == 200, chat.text
    text = (tmp_path / "server.log").read_text()
    assert process.returncode == 0, text
    assert f"loading base from {family.base}" in text

    naive, tokenizer = _reference(family)
    ids = tokenizer(body["prompt"])["input_ids"]
    tokens, _ = naive.greedy([ids, ids, ids], [1.0, 1.0, -1.0], TOKENS)
    expected = tokenizer.decode(ids + tokens)[len(tokenizer.decode(ids)):]
    assert completion.json()["choices"][0]["text"] == expected
    transcript = "User: Hi there\nAssistant:"  # the base is a plain model: chat reaches it as a transcript
    ids = tokenizer(transcript)["input_ids"]
    tokens, _ = naive.greedy([ids, None, None], [1.0, 0.0, 0.0], TOKENS)
    assert chat.json()["choices"][0]["message"]["content"] == tokenizer.decode(ids + tokens)[len(transcript):]
