"""The conformance matrix through the HTTP layer: a real server (the real app around a real engine) on each
family, concurrent requests of mixed alpha, and the text rules checked on what the client receives:

- a completion's text is ``decode(prompt + output) - decode(prompt)`` of the naive reference's tokens;
- streamed deltas join to that text; ``echo`` is the prompt followed by it;
- logprobs ``tokens`` join to the returned text, ``text_offset`` is where each token starts, and every
  ``top_logprobs`` entry survives (its keys are distinct, so none overwrote another).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from transformers import AutoTokenizer

from proxy_engine.async_engine import AsyncEngine
from proxy_engine.prompts import compile_template
from server.settings import load_settings
from tests.conformance.client import post as _post
from tests.conformance.client import stream as _stream
from tests.conformance.conftest import engine_config
from tests.conformance.reference import NaiveProxy, completion_text, per_model_prompts
from tests.server.live import LiveServer

TOKENS = 8
TOP = 4
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(family):
    config = engine_config(family).model_dump(mode="json")
    settings = load_settings(overrides={"engine": config}, environ=False)
    server = LiveServer(AsyncEngine(settings.engine), settings).start()
    tokenizers = [AutoTokenizer.from_pretrained(p) for p in family.paths()]
    naive = NaiveProxy(family.paths(), server.ctx.info.vocab_size)
    transcript = compile_template(settings.engine.transcript_template)
    yield family, server, tokenizers, naive, transcript
    server.stop()


def _expected(served, prompt, alpha: float, continue_final: bool = False) -> str:
    family, _, tokenizers, naive, transcript = served
    prompts = per_model_prompts(family, tokenizers, prompt, transcript, continue_final)
    used = [0] if alpha == 0 else [0, 1, 2]
    tokens, _ = naive.greedy([prompts[i] if i in used else None for i in range(3)], [1.0, alpha, -alpha], TOKENS)
    return completion_text(tokenizers[0], prompts[0], tokens)


def _check_logprobs(logprobs: dict, text: str, start: int = 0) -> None:
    tokens, offsets = logprobs["tokens"], logprobs["text_offset"]
    assert "".join(tokens) == text[start:]
    position = start
    for token, offset in zip(tokens, offsets):
        assert offset == position
        position += len(token)
    for top in logprobs["top_logprobs"]:
        if top is not None:
            assert len(top) == TOP, top  # a key collision would have dropped an entry


COMMON = {"model": "proxy-tuned", "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}


def test_completions_text_stream_echo_logprobs(served):
    family, server, *_ = served
    cases = [("The capital of France is", 1.0), ("Question: what is two plus two? Answer:", 0.0),
             ("東京 and Café, naïve", 0.5), ("The quick brown fox", 2.0)]

    def one(case):
        prompt, alpha = case
        body = {**COMMON, "prompt": prompt, "alpha": alpha, "logprobs": TOP}
        plain = _post(server.url, "/v1/completions", body)["choices"][0]
        echoed = _post(server.url, "/v1/completions", {**body, "echo": True, "logprobs": None})["choices"][0]
        streamed = _stream(server.url, "/v1/completions", body)
        return plain, echoed, streamed

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(one, cases))
    for (prompt, alpha), (plain, echoed, streamed) in zip(cases, answers):
        text = _expected(served, prompt, alpha)
        assert plain["text"] == text, (family.spec.name, prompt)
        _check_logprobs(plain["logprobs"], text)
        assert echoed["text"] == prompt + text
        deltas = [c["choices"][0] for c in streamed if c["choices"]]
        assert "".join(d["text"] for d in deltas) == text
        tokens = [t for d in deltas if d["logprobs"] for t in d["logprobs"]["tokens"]]
        assert "".join(tokens) == text
        offsets = [o for d in deltas if d["logprobs"] for o in d["logprobs"]["text_offset"]]
        assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


def test_echo_with_prompt_logprobs_joins(served):
    """Scoring (echo + logprobs, the base alone when the expert is a chat model): prompt tokens join too."""
    family, server, *_ = served
    prompt = "The capital of France is"
    body = {**COMMON, "prompt": prompt, "echo": True, "logprobs": TOP, "alpha": 0.0 if family.chat_expert else 1.0}
    choice = _post(server.url, "/v1/completions", body)["choices"][0]
    text = _expected(served, prompt, body["alpha"])
    assert choice["text"] == prompt + text
    _check_logprobs(choice["logprobs"], choice["text"])


def test_chat_reaches_each_model_its_own_way(served):
    family, server, *_ = served
    cases = [(CHAT, 1.0), (CHAT, 0.5), ([{"role": "user", "content": "Hi there"}], 1.0)]

    def one(case):
        messages, alpha = case
        body = {**COMMON, "messages": messages, "alpha": alpha, "logprobs": True, "top_logprobs": TOP}
        return _post(server.url, "/v1/chat/completions", body)["choices"][0], _stream(
            server.url, "/v1/chat/completions", body)

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(one, cases))
    for (messages, alpha), (choice, streamed) in zip(cases, answers):
        text = _expected(served, messages, alpha)
        assert choice["message"]["content"] == text, family.spec.name
        content = choice["logprobs"]["content"]
        assert "".join(entry["token"] for entry in content) == text
        for entry in content:
            assert len({top["token"] for top in entry["top_logprobs"]}) == TOP
        deltas = [c["choices"][0]["delta"].get("content") or "" for c in streamed if c["choices"]]
        assert "".join(deltas) == text


def test_a_continued_assistant_message_is_continued_by_every_model(served):
    """continue_final_message: the expert continues through its template's own continuation, base and anti-expert
    through the transcript cut after the message; the reply is the continuation, right to the character (a
    SentencePiece family's first word keeps its space)."""
    family, server, *_ = served
    messages = [*CHAT, {"role": "assistant", "content": "The capital of France is"}]
    body = {**COMMON, "messages": messages, "continue_final_message": True}
    choice = _post(server.url, "/v1/chat/completions", body)["choices"][0]
    text = _expected(served, messages, 1.0, continue_final=True)
    assert choice["message"]["content"] == text, family.spec.name
    streamed = _stream(server.url, "/v1/chat/completions", body)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed if c["choices"]) == text


def test_the_issue_case_forced_tokens_keep_their_space(served):
    """Prompt "The capital of France is", three forced ``▁P`` (logit_bias): text " P P P" plain, streamed and
    echoed; logprobs tokens [" P", " P", " P"] at offsets that follow the text; no top-logprobs key lost."""
    family, server, tokenizers, *_ = served
    piece = "▁P" if "▁P" in tokenizers[0].get_vocab() else "ĠP"
    if piece not in tokenizers[0].get_vocab():
        pytest.skip(f"{family.spec.name}: no single-token ' P'")
    p = tokenizers[0].convert_tokens_to_ids(piece)
    prompt = "The capital of France is"
    body = {**COMMON, "prompt": prompt, "max_tokens": 3, "logit_bias": {str(p): 100}, "logprobs": TOP,
            "echo": False}
    choice = _post(server.url, "/v1/completions", body)["choices"][0]
    assert choice["text"] == " P P P"
    assert choice["logprobs"]["tokens"] == [" P", " P", " P"]
    assert choice["logprobs"]["text_offset"] == [0, 2, 4]
    echoed = _post(server.url, "/v1/completions", {**body, "echo": True, "logprobs": None})["choices"][0]
    assert echoed["text"] == "The capital of France is P P P"
    streamed = _stream(server.url, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == " P P P"


def test_a_prompt_written_with_its_bos_is_not_given_a_second(served):
    """add_special_tokens false (vLLM's): a completion whose text the client wrote with its special tokens is
    tokenized as sent by every plain model (the chat expert still wraps it in its template), and the answer is
    the reference's on those prompts; prompt_token_ids and /tokenize show the ids."""
    family, server, tokenizers, naive, _ = served
    base_tok = tokenizers[0]
    prompt = (base_tok.bos_token or "") + "The capital of France is"
    body = {**COMMON, "prompt": prompt, "add_special_tokens": False, "return_token_ids": True, "echo": False}
    choice = _post(server.url, "/v1/completions", body)["choices"][0]
    as_sent = base_tok(prompt, add_special_tokens=False)["input_ids"]
    assert choice["prompt_token_ids"] == as_sent, family.spec.name
    tokenized = _post(server.url, "/tokenize", {"model": COMMON["model"], "prompt": prompt,
                                                "add_special_tokens": False})
    assert tokenized["tokens"] == as_sent
    expert = per_model_prompts(family, tokenizers, prompt, None)[1] if family.chat_expert else as_sent
    tokens, _ = naive.greedy([as_sent, expert, as_sent], [1.0, 1.0, -1.0], TOKENS)
    assert choice["text"] == completion_text(base_tok, as_sent, tokens), family.spec.name


def _placed(tokens: list[dict], text: str, ids: list[int], tokenizer) -> None:
    """TGI's /tokenize entries: the ids, each token's text the input's bytes at its UTF-8 offsets, and a BOS the
    tokenizer added (not one a chat template wrote) empty at 0-0."""
    assert [t["id"] for t in tokens] == ids
    data = text.encode()
    for token in tokens:
        assert data[token["start"]:token["stop"]].decode() == token["text"], token
    added = [t for t in tokens if t["id"] == tokenizer.bos_token_id and not text.startswith(tokenizer.bos_token)]
    assert all((t["text"], t["start"], t["stop"]) == ("", 0, 0) for t in added)


def test_tgi_tokenize_places_every_token_for_every_tokenizer(served):
    """SentencePiece (Llama-2, Gemma: the first word's space marker) and byte-level BPE (Llama-3, Qwen): TGI's
    /tokenize gives the ids the model reads, each at its place in the input by UTF-8 bytes, the BOS at 0-0;
    /chat_tokenize gives the chat as each model reads it (the base's transcript, the expert's own template)."""
    family, server, tokenizers, _, transcript = served
    base = tokenizers[0]
    for text in ("The capital of France is", "Grüße aus Zürich, 東京!"):
        tokens = _post(server.url, "/tokenize", {"inputs": text})
        _placed(tokens, text, base(text)["input_ids"], base)
        if base.bos_token_id is not None and base(text)["input_ids"][0] == base.bos_token_id:  # Llama, Gemma
            assert tokens[0] == {"id": base.bos_token_id, "text": "", "start": 0, "stop": 0}
        if text.isascii():  # every character lies in exactly one token
            assert "".join(t["text"] for t in tokens) == text, family.spec.name
        bare = _post(server.url, "/tokenize", {"inputs": text, "add_special_tokens": False})
        _placed(bare, text, base(text, add_special_tokens=False)["input_ids"], base)
        for add, read in ((True, tokens), (False, bare)):  # /generate reads what /tokenize shows
            answer = httpx.post(f"{server.url}/generate", json={"inputs": text, "add_special_tokens": add,
                                                                 "parameters": {"max_new_tokens": 1}}, timeout=60)
            assert answer.headers["x-prompt-tokens"] == str(len(read)), (family.spec.name, add)

    chat = _post(server.url, "/chat_tokenize", {"model": "proxy-tuned", "messages": CHAT})
    text = transcript.render(messages=CHAT, add_generation_prompt=True, tools_text="")
    assert chat["templated_text"] == text
    _placed(chat["tokenize_response"], text, base(text)["input_ids"], base)
    if family.chat_expert:
        expert = tokenizers[1]
        chat = _post(server.url, "/chat_tokenize", {"model": "proxy-tuned:expert", "messages": CHAT})
        text = expert.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        assert chat["templated_text"] == text, family.spec.name
        _placed(chat["tokenize_response"], text, expert(text, add_special_tokens=False)["input_ids"], expert)
