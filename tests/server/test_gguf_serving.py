"""``proxy-serve --base X.gguf --expert DIR-WITH-A-GGUF --anti-expert HF-DIR`` serves, and its answers are the
naive reference's over what transformers makes of the same files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import torch

from tests.engine.reference import NaiveProxy
from tests.reliability.support import SUBPROCESS_ENV
from tests.server.live import wait_until

TOKENS = 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    port, log = _free_port(), tmp_path / "server.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--base", str(family.base), "--expert", str(family.expert),
             "--anti-expert", str(family.anti_expert), "--port", str(port), "--served-model-name", "tiny-gguf"],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **SUBPROCESS_ENV},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return process.poll() is not None

        assert wait_until(healthy, timeout=180, interval=0.3) and process.poll() is None, log.read_text()
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
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    text = log.read_text()
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
