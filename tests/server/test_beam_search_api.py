"""vLLM's ``use_beam_search`` (and ``length_penalty``) on /v1/completions and /v1/chat/completions, through the
OpenAI SDK's ``extra_body`` as vLLM's users send it: the n best beams as the choices, streamed or not, with the
usage and logprobs of any answer; what beam search cannot honour is a 400 naming it."""

from __future__ import annotations

import json

from server.protocol import ChatCompletionRequest, CompletionRequest
from tests.server.live import MODEL

BEAM = {"use_beam_search": True, "length_penalty": 1.0}
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


def test_completions_answer_the_n_best_beams(client):
    answer = client.completions.create(model=MODEL, prompt="Once upon a time", n=3, max_tokens=5, logprobs=2,
                                       extra_body={**BEAM, "ignore_eos": True, "return_token_ids": True})
    choices = sorted(answer.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2]
    tokens = [tuple(c.model_extra["token_ids"]) for c in choices]
    assert len(set(tokens)) == 3 and all(len(t) == 5 for t in tokens)  # three different beams, each 5 tokens
    prompt_len = answer.usage.prompt_tokens
    scores = [sum(c.logprobs.token_logprobs) / (prompt_len + 5) for c in choices]
    assert scores == sorted(scores, reverse=True)  # best first, by vLLM's ranking
    assert all(c.finish_reason == "length" and len(c.logprobs.top_logprobs[0]) == 2 for c in choices)
    assert answer.usage.completion_tokens == 15
    # The best beam is at least as likely as greedy decoding's answer (beam search's point), per token.
    greedy = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0,
                                       logprobs=0, extra_body={"ignore_eos": True})
    assert sum(choices[0].logprobs.token_logprobs) >= sum(greedy.choices[0].logprobs.token_logprobs) - 1e-4


def test_several_prompts_each_get_their_beams_numbered_as_openai_numbers_choices(client):
    prompts = ["Once upon a time", "The king said"]
    answer = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3, echo=True,
                                       extra_body={**BEAM, "ignore_eos": True})
    choices = sorted(answer.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2, 3]
    for choice in choices:  # prompt i's beams are choices 2i and 2i + 1, each echoing its prompt
        assert choice.text.startswith(prompts[choice.index // 2]) and choice.finish_reason == "length"
    for i, prompt in enumerate(prompts):  # the same beams as the prompt alone
        alone = client.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=3,
                                          extra_body={**BEAM, "ignore_eos": True})
        assert [c.text for c in sorted(alone.choices, key=lambda c: c.index)] == [
            choices[2 * i + k].text.removeprefix(prompt) for k in range(2)]


def test_a_streamed_chat_beam_search_is_the_same_answer(client, http):
    body = {"model": MODEL, "messages": MESSAGES, "n": 2, "max_tokens": 6, **BEAM}
    whole = http.post("/v1/chat/completions", json=body).json()
    texts = {c["index"]: c["message"]["content"] for c in whole["choices"]}
    streamed: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                streamed[choice["index"]] += choice["delta"].get("content") or ""
                if choice.get("finish_reason"):
                    finishes[choice["index"]] = choice["finish_reason"]
    assert streamed == texts and set(finishes) == {0, 1}
    sdk = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=6, extra_body=BEAM)
    assert {c.index: c.message.content for c in sdk.choices} == texts  # deterministic: no sampling involved


def test_what_beam_search_cannot_honour_is_refused_naming_it(http):
    for field, value in (("logit_bias", {"5": 2.0}), ("repetition_penalty", 1.3), ("min_tokens", 2),
                         ("length_penalty", 99.0), ("truncate_prompt_tokens", -1)):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 3, **BEAM, field: value}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == field, (field, response.text)
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3,
                                                       "response_format": schema, **BEAM})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    wide = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3, "n": 16, **BEAM})
    assert wide.status_code == 400 and wide.json()["error"]["param"] == "n"
    assert http.get("/health").status_code == 200


def test_the_models_sampler_defaults_do_not_reach_a_beam_search():
    """A generation_config's repetition_penalty or top_p is the model's sampling advice: a beam search ranks the
    distribution as it is, and only the advised length applies (a request's own penalty is refused instead)."""
    defaults = {"repetition_penalty": 1.1, "top_p": 0.8, "temperature": 0.7, "max_tokens": 9}
    for request in (CompletionRequest(prompt="x", max_tokens=None, use_beam_search=True),
                    ChatCompletionRequest(messages=MESSAGES, use_beam_search=True)):
        params = request.sampling_params(defaults=defaults)
        assert params.beam_search and params.repetition_penalty == 1.0 and params.top_p == 1.0
        assert params.default_max_tokens == 9
        params.check_beam_search()


def test_a_client_that_leaves_during_the_search_stops_it(live):
    """The search runs whole before the answer's first byte: the client's leaving is watched meanwhile, and its
    steps are aborted (vLLM's keeps searching)."""
    import httpx

    from tests.server.live import wait_until

    body = {"model": MODEL, "prompt": "Once upon a time", "n": 4, "max_tokens": 400, "ignore_eos": True, **BEAM}
    with httpx.Client(base_url=live.url) as gone:
        try:
            gone.post("/v1/completions", json=body, timeout=1.0)
        except httpx.ReadTimeout:
            pass
        else:
            raise AssertionError("a 400-step search of 4 beams answered within a second")

    def idle() -> bool:
        stats = live.engine.stats()
        return stats.running + stats.waiting + stats.prefilling == 0

    def left() -> bool:
        return 'status="499"' in httpx.get(f"{live.url}/metrics").text

    assert wait_until(left, timeout=10) and wait_until(idle, timeout=10)
