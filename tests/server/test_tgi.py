"""Text Generation Inference's own API (server/tgi.py): /generate, /generate_stream, POST / and /info, in TGI's
wire format, checked against the OpenAI endpoints' answers to the same request and through the client written
for TGI (huggingface_hub's InferenceClient)."""

from __future__ import annotations

import json
import re

import pytest

from server.serving import Choice
from server.tgi import finish_reason
from tests.server.live import MODEL

PROMPT = "The capital of France is"


def _generate(http, inputs: str = PROMPT, path: str = "/generate", **parameters) -> dict:
    response = http.post(path, json={"inputs": inputs, "parameters": parameters})
    assert response.status_code == 200, response.text
    return response.json()


def _completion(http, **body) -> dict:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def _events(http, body: dict, path: str = "/generate_stream") -> list[dict]:
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data:") for line in lines) and "data: [DONE]" not in lines  # TGI sends no [DONE]
    return [json.loads(line[len("data:"):]) for line in lines]


def test_greedy_generate_is_the_greedy_completion_with_its_tokens_and_logprobs(http):
    """Greedy (``parameters`` given, no sampling field): the text, ids and logprobs of the OpenAI endpoint's
    greedy answer; each token's text is what it added, so they join to the text."""
    body = _generate(http, max_new_tokens=8, details=True, top_n_tokens=2)
    reference = _completion(http, max_tokens=8, temperature=0, logprobs=2, return_token_ids=True)
    assert body["generated_text"] == reference["text"]
    details = body["details"]
    tokens = details["tokens"]
    assert [t["id"] for t in tokens] == reference["token_ids"]
    assert [t["logprob"] for t in tokens] == pytest.approx(reference["logprobs"]["token_logprobs"], abs=1e-5)
    assert "".join(t["text"] for t in tokens if not t["special"]) == body["generated_text"]
    assert details["generated_tokens"] == len(tokens) and details["seed"] is None and details["prefill"] == []
    assert details["finish_reason"] == {"length": "length", "stop": "eos_token"}[reference["finish_reason"]]
    assert [len(top) for top in details["top_tokens"]] == [2] * len(tokens)
    assert all(top[0]["logprob"] >= top[1]["logprob"] for top in details["top_tokens"])
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in tokens)


def test_details_only_when_asked_and_headers_count_tokens(http):
    response = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}})
    assert response.status_code == 200 and set(response.json()) == {"generated_text"}
    usage = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5,
                                               "temperature": 0}).json()["usage"]
    assert response.headers["x-prompt-tokens"] == str(usage["prompt_tokens"])
    assert response.headers["x-generated-tokens"] == str(usage["completion_tokens"])
    assert response.headers["x-request-id"].startswith("tgi-") and float(response.headers["x-compute-time"]) > 0


def test_stop_sequence_stays_in_the_text(http):
    """TGI keeps the stop string at the end of ``generated_text`` and says ``stop_sequence``."""
    free = _generate(http, max_new_tokens=16)["generated_text"]
    visible = free.strip()
    assert len(visible) >= 4, f"the tiny model said too little to test stop strings: {free!r}"
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    body = _generate(http, max_new_tokens=16, stop=[stop], details=True)
    assert body["generated_text"] == free[: free.index(stop) + len(stop)]
    assert body["details"]["finish_reason"] == "stop_sequence"


def test_finish_reason_names():
    assert finish_reason(Choice(0, finish_reason="length")) == "length"
    assert finish_reason(Choice(0, finish_reason="stop", stop_reason="###")) == "stop_sequence"
    assert finish_reason(Choice(0, finish_reason="stop", stop_reason=None)) == "eos_token"


def test_stream_events_join_to_the_text_and_end_with_details(http):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True}}
    events = _events(http, body)
    whole = _generate(http, max_new_tokens=6, details=True)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert [e["token"]["id"] for e in events] == [t["id"] for t in whole["details"]["tokens"]]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == whole["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"]["finish_reason"] == whole["details"]["finish_reason"]
    assert last["details"]["generated_tokens"] == len(events)
    assert last["details"]["input_length"] == int(http.post("/generate", json=body).headers["x-prompt-tokens"])
    plain = _events(http, {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}})
    assert plain[-1]["details"] is None and plain[-1]["generated_text"] == whole["generated_text"]


def test_compat_route_answers_a_list_with_the_prompt_first_or_streams(http):
    """``POST /`` (what huggingface_hub posts to): a one-element list, ``return_full_text`` true by default."""
    response = http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}})
    assert response.status_code == 200
    [body] = response.json()
    generated = _generate(http, max_new_tokens=5)["generated_text"]
    assert body["generated_text"] == PROMPT + generated
    [cut] = http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5,
                                                                   "return_full_text": False}}).json()
    assert cut["generated_text"] == generated
    events = _events(http, {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}, "stream": True}, path="/")
    assert events[-1]["generated_text"] == PROMPT + generated
    assert _generate(http, max_new_tokens=5, return_full_text=True)["generated_text"] == PROMPT + generated


def test_sampling_follows_tgi_rules(http):
    """``parameters`` given without sampling fields: greedy, whatever the seed. A seed makes a sampled request
    reproducible and is reported; ``parameters`` left out entirely samples, as TGI's defaults do."""
    greedy = _generate(http, max_new_tokens=8)["generated_text"]
    assert _generate(http, max_new_tokens=8, seed=5)["generated_text"] == greedy
    sampled = [_generate(http, max_new_tokens=8, do_sample=True, seed=seed, details=True) for seed in (1, 1, 2, 3)]
    assert sampled[0]["generated_text"] == sampled[1]["generated_text"]
    assert len({s["generated_text"] for s in sampled}) > 1
    assert sampled[0]["details"]["seed"] == 1
    # a warper off its neutral value samples too (TGI's rule), and a u64 seed is taken whole
    texts = {_generate(http, max_new_tokens=8, temperature=1.5, seed=2**64 - 1 - k)["generated_text"] for k in range(4)}
    assert len(texts) > 1
    typical = _generate(http, max_new_tokens=8, do_sample=True, typical_p=0.5, seed=3, details=True)
    assert typical["details"]["generated_tokens"] >= 1
    defaults = {_generate_bare(http) for _ in range(4)}
    assert len(defaults) > 1


def _generate_bare(http) -> str:
    response = http.post("/generate", json={"inputs": PROMPT})
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def test_truncate_keeps_the_prompts_last_tokens(http):
    response = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "truncate": 3,
                                                                            "details": True}})
    assert response.status_code == 200 and response.headers["x-prompt-tokens"] == "3"
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    same = _completion(http, prompt=ids[-3:], max_tokens=4, temperature=0)
    assert response.json()["generated_text"] == same["text"]


def test_decoder_input_details_are_the_prompt_logprobs(http):
    body = _generate(http, max_new_tokens=2, decoder_input_details=True, details=True)
    prefill = body["details"]["prefill"]
    reference = _completion(http, max_tokens=2, temperature=0, prompt_logprobs=0, return_token_ids=True)
    assert [p["id"] for p in prefill] == reference["prompt_token_ids"]
    assert prefill[0]["logprob"] is None and all(p["logprob"] <= 0 for p in prefill[1:])
    assert "".join(p["text"] for p in prefill).strip() == PROMPT


def test_grammar_constrains_the_output(http):
    body = _generate(http, max_new_tokens=12, grammar={"type": "regex", "value": "(yes|no)!"})
    assert re.fullmatch("(yes|no)!", body["generated_text"])
    schema = {"type": "object", "properties": {"n": {"type": "boolean"}}, "required": ["n"],
              "additionalProperties": False}
    for grammar in ({"type": "json", "value": schema}, {"type": "json", "value": json.dumps(schema)},
                    {"type": "json_schema", "value": {"name": "x", "schema": schema}}):
        text = _generate(http, max_new_tokens=24, grammar=grammar)["generated_text"]
        assert isinstance(json.loads(text)["n"], bool), text


def test_alpha_and_adapter_id_pick_the_model(http):
    """``alpha`` 0 is the base alone, as ``adapter_id`` naming the base model id is; an unknown adapter is a 422."""
    base = _generate(http, max_new_tokens=8, adapter_id=f"{MODEL}:base")["generated_text"]
    assert _generate(http, max_new_tokens=8, alpha=0.0)["generated_text"] == base
    assert base == _completion(http, model=f"{MODEL}:base", max_tokens=8, temperature=0)["text"]
    counted = 'proxy_serve_requests_total{endpoint="generate",model="unknown",status="404"}'
    before = next((line for line in http.get("/metrics").text.splitlines() if line.startswith(counted)), None)
    refused = http.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "my-lora"}})
    assert refused.status_code == 422 and "`adapter_id` 'my-lora' is not served" in refused.json()["error"]
    after = next(line for line in http.get("/metrics").text.splitlines() if line.startswith(counted))
    assert float(after.split()[-1]) == (float(before.split()[-1]) if before else 0.0) + 1  # counted as refused


@pytest.mark.parametrize(("parameters", "named"), [
    ({"best_of": 2}, "best_of"),
    ({"watermark": True}, "watermark"),
    ({"temperature": 0}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"truncate": 0}, "truncate"),
    ({"adapter_id": "my-lora"}, "adapter_id"),
    ({"max_new_tokens": 10**6}, "context length"),
    ({"grammar": {"type": "regex", "value": "("}}, "regex"),
    ({"grammar": {"type": "xml", "value": "x"}}, "grammar"),
    ({"stop": "x"}, "stop"),
])
def test_refusals_are_tgi_validation_errors(http, parameters, named):
    for path in ("/generate", "/generate_stream", "/"):
        response = http.post(path, json={"inputs": PROMPT, "parameters": parameters})
        assert response.status_code == 422, (path, response.text)
        body = response.json()
        assert body["error_type"] == "validation" and body["error"].startswith("Input validation error: ")
        assert named in body["error"], body


def test_malformed_requests_are_tgi_validation_errors(http):
    for body in ({"parameters": {}}, {"inputs": ""}, {"inputs": 3}, {"inputs": "x", "parameters": {"seed": -1}}):
        response = http.post("/generate", json=body)
        assert response.status_code == 422 and response.json()["error_type"] == "validation", body
    response = http.post("/generate", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["error"]
    streamed = http.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"decoder_input_details": True}})
    assert streamed.status_code == 422 and "streaming" in streamed.json()["error"]
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1}).status_code == 200


def test_info(http):
    info = http.get("/info").json()
    models = http.get("/v1/models").json()["data"]
    assert info["model_id"] == MODEL and info["model_pipeline_tag"] == "text-generation"
    assert info["max_total_tokens"] == models[0]["max_model_len"] == info["max_input_tokens"] + 1
    assert info["max_best_of"] == 1 and info["max_stop_sequences"] >= 4 and info["version"]
    assert len(info["experts"]) == 1 and info["experts"][0]["alpha"] == 1.0


def test_huggingface_hub_inference_client(live, monkeypatch):
    """The client TGI users call: plain text, details, streams, and its typed validation error."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import ValidationError

    # The tests run with HF_HUB_OFFLINE=1, which also stops the client from reaching this loopback server.
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    client = InferenceClient(model=live.url, timeout=60)
    generated = client.text_generation(PROMPT, max_new_tokens=6, return_full_text=False)
    assert client.text_generation(PROMPT, max_new_tokens=6) == PROMPT + generated  # TGI's default on POST /
    output = client.text_generation(PROMPT, max_new_tokens=6, details=True, return_full_text=False)
    assert output.generated_text == generated
    assert output.details.finish_reason in ("length", "eos_token")
    assert len(output.details.tokens) == output.details.generated_tokens
    pieces = list(client.text_generation(PROMPT, max_new_tokens=6, stream=True, return_full_text=False))
    assert "".join(pieces) == generated
    events = list(client.text_generation(PROMPT, max_new_tokens=6, stream=True, details=True,
                                         return_full_text=False))
    assert events[-1].generated_text == generated and events[-1].details.generated_tokens == len(events)
    with pytest.raises(ValidationError, match="temperature"):
        client.text_generation(PROMPT, temperature=-1.0)
    with pytest.raises(ValidationError, match="context length"):
        list(client.text_generation(PROMPT, max_new_tokens=10**6, stream=True))


def test_the_text_generation_packages_body_with_every_field_spelled_out(http):
    """The ``text-generation`` package (LangChain's older TGI client) and LiteLLM send every parameter, nulls
    included; that is a greedy request asking for details."""
    parameters = {"best_of": None, "details": True, "decoder_input_details": False, "do_sample": False,
                  "frequency_penalty": None, "max_new_tokens": 6, "repetition_penalty": None,
                  "return_full_text": False, "seed": None, "stop": [], "temperature": None, "top_k": None,
                  "top_n_tokens": None, "top_p": None, "truncate": None, "typical_p": None, "watermark": False,
                  "grammar": None, "adapter_id": None}
    body = _generate(http, **parameters)
    assert body["generated_text"] == _completion(http, max_tokens=6, temperature=0)["text"]
    assert body["details"]["generated_tokens"] == len(body["details"]["tokens"])
    events = _events(http, {"inputs": PROMPT, "parameters": parameters, "stream": True})
    assert events[-1]["generated_text"] == body["generated_text"]


def _tgi_tokens(http, path: str = "/tokenize", **body):
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _placed(tokens: list[dict], text: str) -> None:
    """Each token's text is the input's bytes between its UTF-8 byte offsets (TGI's), in order."""
    data = text.encode()
    for token in tokens:
        assert set(token) == {"id", "text", "start", "stop"}
        assert 0 <= token["start"] <= token["stop"] <= len(data)
        assert data[token["start"]:token["stop"]].decode() == token["text"], token
    assert [t["start"] for t in tokens] == sorted(t["start"] for t in tokens)


def test_tgi_tokenize_places_each_token_of_the_prompt_in_the_input(http):
    """TGI's POST /tokenize (its GenerateRequest body, told from vLLM's by ``inputs``): the ids /generate reads,
    each with its text and byte offsets; ``truncate`` keeps the last ones, as the prompt is cut to generate."""
    tokens = _tgi_tokens(http, inputs=PROMPT)
    assert [t["id"] for t in tokens] == http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    _placed(tokens, PROMPT)
    assert "".join(t["text"] for t in tokens) == PROMPT
    assert tokens[0]["start"] == 0 and tokens[-1]["stop"] == len(PROMPT)

    wide = "Grüße aus Zürich, 東京!"  # offsets count UTF-8 bytes, as TGI's do: past the first "ü" they differ
    placed = _tgi_tokens(http, inputs=wide)
    _placed(placed, wide)
    assert placed[-1]["stop"] == len(wide.encode()) > len(wide)
    assert [t["id"] for t in placed] == http.post("/tokenize", json={"model": MODEL, "prompt": wide}).json()["tokens"]

    assert _tgi_tokens(http, inputs=PROMPT, parameters={"truncate": 2}) == tokens[-2:]
    assert _tgi_tokens(http, inputs=PROMPT, parameters={"adapter_id": f"{MODEL}:expert"}) == tokens  # one tokenizer


def test_tgi_chat_tokenize_is_the_templated_chat_and_its_tokens(http):
    """TGI's POST /chat_tokenize: the chat as the model reads it (the plain base: the transcript) and its tokens,
    the ids vLLM's /tokenize gives for the same messages."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße! Hi there"}]
    body = _tgi_tokens(http, "/chat_tokenize", model=MODEL, messages=messages)
    assert set(body) == {"tokenize_response", "templated_text"}
    text = body["templated_text"]
    assert "Be brief." in text and "Grüße! Hi there" in text and text.rstrip().endswith("Assistant:")
    _placed(body["tokenize_response"], text)
    vllm = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    assert [t["id"] for t in body["tokenize_response"]] == vllm
    no_model = _tgi_tokens(http, "/chat_tokenize", messages=messages)  # TGI's clients may leave it out
    assert no_model == body


def test_tgi_tokenize_refusals_are_tgi_validation_errors(http, live):
    too_long = "x" * (live.ctx.settings.max_prompt_chars + 1)
    for path, body, named in [
        ("/tokenize", {"inputs": ""}, "inputs"),
        ("/tokenize", {"inputs": 3}, "inputs"),
        ("/tokenize", {"inputs": "x", "parameters": {"adapter_id": "nope"}}, "adapter_id"),
        ("/tokenize", {"inputs": too_long}, "max_prompt_chars"),
        ("/chat_tokenize", {"messages": []}, "messages"),
        ("/chat_tokenize", {"model": "nope", "messages": [{"role": "user", "content": "Hi"}]}, "nope"),
    ]:
        response = http.post(path, json=body)
        assert response.status_code == 422, (body, response.text)
        answer = response.json()
        assert answer["error_type"] == "validation" and named in answer["error"], answer
    # vLLM's /tokenize on the same path still answers (and refuses) in its own shape.
    refused = http.post("/tokenize", json={"model": MODEL, "prompt": 5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
    listed = http.post("/tokenize", json=[PROMPT])
    assert listed.status_code == 400 and "object" in listed.json()["error"]["message"]
