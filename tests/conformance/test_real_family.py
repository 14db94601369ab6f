"""The real family in the matrix: SmolLM2-135M-Instruct served from its GGUF file, against transformers' own
``generate`` on the same weights, through HTTP: plain and chat, streamed and not, with logprobs.

The server holds the GGUF file as the base (plain prompts), and the converted directory as a chat-format expert
and a plain anti-expert: ``smollm2:base`` is the model alone on plain text, ``smollm2:expert`` the model alone in
its ChatML template, and ``smollm2`` the proxy of the three (against the naive reference). Few prompts, few
tokens: a 135M model on two shared cores.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from proxy_engine.async_engine import AsyncEngine
from proxy_engine.prompts import compile_template
from server.settings import load_settings
from tests.conformance.client import post, stream
from tests.conformance.real_smollm2 import PACKAGE, converted, gguf_path
from tests.conformance.reference import NaiveProxy, completion_text
from tests.server.live import LiveServer

TOP = 3
TIMEOUT = 300  # seconds a request may take: a 135M model on two shared cores, beside other work
LOGPROB_TOLERANCE = 1e-4  # float32 on a different kernel path (batched, cached, packed weights) than generate's
PLAIN = [("The capital of France is", 8), ("def fibonacci(n):", 8)]
CHAT = [("What is the capital of France?", 12), ("Name three colors.", 10)]


@pytest.fixture(scope="module")
def real(request):
    file = gguf_path()
    if file is None:
        pytest.skip(f"the {PACKAGE} package (SmolLM2-135M-Instruct GGUF) is not installed; the test extra installs it")
    pytest.importorskip("gguf", reason="the gguf package is not installed; the test extra installs it")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = converted(request.config.cache.mkdir("smollm2"), file)
    engine = {
        "base": {"path": str(file)},
        "experts": [{"expert": {"path": str(directory), "prompt_format": "chat"},
                     "anti_expert": {"path": str(directory)}, "alpha": 1.0}],
    }
    settings = load_settings(overrides={"engine": engine, "served_model_name": "smollm2"}, environ=False)
    server = LiveServer(AsyncEngine(settings.engine), settings).start(timeout=900)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    yield server, model, tokenizer, compile_template(settings.engine.transcript_template)
    server.stop()


@torch.no_grad()
def _generate(model, tokenizer, ids: list[int], tokens: int) -> tuple[str, list[float], list[dict[int, float]]]:
    """transformers' greedy ``generate``: the text by the completion rule, each token's logprob and the top ones."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=tokens, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=tokenizer.pad_token_id)
    new = out.sequences[0, len(ids):].tolist()
    logprobs, tops = [], []
    for token, scores in zip(new, out.scores):
        logp = torch.log_softmax(scores[0].double(), dim=-1)
        logprobs.append(float(logp[token]))
        values, indices = logp.topk(TOP)
        tops.append(dict(zip(indices.tolist(), values.tolist())))
    ends = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
               else [model.generation_config.eos_token_id])
    shown = new[:-1] if new and new[-1] in ends else new  # the end token ends the turn; it is not text
    return completion_text(tokenizer, ids, shown), logprobs, tops  # logprobs: the end token's too, if any


def _without_end(tokens: list[str], text: str, tokenizer) -> list[str]:
    """The logprob entries' tokens but a last end token, whose entry the server keeps (with no text)."""
    if tokens and tokens[-1] == tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        return tokens[:-1]
    return tokens


def _close(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected)
    assert max((abs(a - b) for a, b in zip(got, expected)), default=0.0) < LOGPROB_TOLERANCE, (got, expected)


def test_plain_completions_equal_generate(real):
    server, model, tokenizer, _ = real

    def one(case):
        prompt, tokens = case
        body = {"model": "smollm2:base", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "logprobs": TOP}
        return post(server.url, "/v1/completions", body, TIMEOUT)["choices"][0], stream(
            server.url, "/v1/completions", body, TIMEOUT)

    with ThreadPoolExecutor(len(PLAIN)) as pool:
        answers = list(pool.map(one, PLAIN))
    for (prompt, tokens), (choice, streamed) in zip(PLAIN, answers):
        text, logprobs, tops = _generate(model, tokenizer, tokenizer(prompt)["input_ids"], tokens)
        assert choice["text"] == text, prompt
        assert "".join(_without_end(choice["logprobs"]["tokens"], text, tokenizer)) == text
        _close(choice["logprobs"]["token_logprobs"], logprobs)
        for top, expected in zip(choice["logprobs"]["top_logprobs"], tops):
            _close(sorted(top.values()), sorted(expected.values()))
        deltas = [c["choices"][0] for c in streamed if c["choices"]]
        assert "".join(d["text"] for d in deltas) == text
        _close([p for d in deltas if d["logprobs"] for p in d["logprobs"]["token_logprobs"]], logprobs)


def test_chat_equals_generate_over_the_chat_template(real):
    server, model, tokenizer, _ = real

    def one(case):
        question, tokens = case
        body = {"model": "smollm2:expert", "messages": [{"role": "user", "content": question}],
                "max_tokens": tokens, "temperature": 0, "logprobs": True, "top_logprobs": TOP}
        return (post(server.url, "/v1/chat/completions", body, TIMEOUT)["choices"][0],
                stream(server.url, "/v1/chat/completions", body, TIMEOUT))

    with ThreadPoolExecutor(len(CHAT)) as pool:
        answers = list(pool.map(one, CHAT))
    for (question, tokens), (choice, streamed) in zip(CHAT, answers):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        text, logprobs, tops = _generate(model, tokenizer, list(ids), tokens)
        assert choice["message"]["content"] == text, question
        content = choice["logprobs"]["content"]
        assert "".join(_without_end([entry["token"] for entry in content], text, tokenizer)) == text
        _close([entry["logprob"] for entry in content], logprobs)
        for entry, expected in zip(content, tops):
            _close(sorted(t["logprob"] for t in entry["top_logprobs"]), sorted(expected.values()))
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed if c["choices"]) == text
        streamed_logprobs = [e["logprob"] for c in streamed if c["choices"] and c["choices"][0].get("logprobs")
                             for e in c["choices"][0]["logprobs"]["content"]]
        _close(streamed_logprobs, logprobs)


def test_the_proxy_of_the_three_equals_the_naive_reference(real):
    """base (GGUF, transcript) + 0.5 * (expert in ChatML - anti-expert on the transcript)."""
    server, model, tokenizer, transcript = real
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    body = {"model": "smollm2", "messages": messages, "max_tokens": 6, "temperature": 0, "alpha": 0.5,
            "ignore_eos": True}
    choice = post(server.url, "/v1/chat/completions", body, TIMEOUT)["choices"][0]
    plain = tokenizer(transcript.render(messages=messages, add_generation_prompt=True))["input_ids"]
    chat = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
    naive = NaiveProxy([], len(tokenizer), models=[model, model, model])
    tokens, _ = naive.greedy([plain, chat, plain], [1.0, 0.5, -0.5], 6)
    assert choice["message"]["content"] == completion_text(tokenizer, plain, tokens)


def test_the_files_tokenizer_round_trips_and_matches_the_converted_one(real):
    """The tokenizer built from the GGUF metadata (what the server's base uses): byte-level BPE, so any text
    decodes back to itself, and it splits text as the converted directory's does."""
    from transformers import AutoTokenizer

    _, _, converted_tokenizer, _ = real
    file = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    assert tokenizer.chat_template == converted_tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152
    for text in ["The quick brown fox", "  two spaces, a\ttab and\r\nCRLF", "Café, naïve, déjà vu, Ünïcödé",
                 "東京, 日本語, emoji 🙂🚀 and 👩‍👩‍👧", "def add(a, b):\n    return a + b\n",
                 "<|im_start|>user\nhi<|im_end|>",
                 "\u200b zero width, \x00 nul, \ufffd replacement"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text, text
        assert ids == converted_tokenizer(text)["input_ids"], text
