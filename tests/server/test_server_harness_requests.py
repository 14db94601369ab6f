"""The requests evaluation harnesses really send for loglikelihoods, answered as they read them.

lm-evaluation-harness 0.4.13's ``local-completions`` sends context + continuation as token ids with
``echo: true``, ``logprobs: 1``, ``temperature: 0`` and ``max_tokens: 1`` (not 0), and reads
``token_logprobs[ctxlen:-1]`` (all but the last, which belongs to the one token it made the server generate)
and the matching ``top_logprobs`` for ``is_greedy``. Other harnesses send ``max_tokens: 0`` (the prompt alone);
both shapes must score the prompt the same.
"""

from __future__ import annotations

from tests.server.live import MODEL

LM_EVAL_0_4_13 = {"temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}


def lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """What lm_eval.models.openai_completions.parse_logprobs computes from one choice."""
    logprobs = choice["logprobs"]
    continuation = logprobs["token_logprobs"][ctxlen:-1]
    top = logprobs["top_logprobs"][ctxlen:-1]
    tokens = logprobs["tokens"][ctxlen:-1]
    greedy = all(max(t, key=t.get) == token for t, token in zip(top, tokens))
    return sum(continuation), greedy


def test_lm_eval_0_4_13_loglikelihood_request(http):
    context = http.post("/tokenize", json={"model": MODEL, "prompt": "The capital of France is"}).json()["tokens"]
    continuation = http.post("/tokenize", json={"model": MODEL, "prompt": " Paris"}).json()["tokens"]
    prompt = context + continuation
    answer = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **LM_EVAL_0_4_13})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt) + 1  # the prompt, then the one generated token
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert answer.json()["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 1,
                                      "total_tokens": len(prompt) + 1, "prompt_tokens_details": {"cached_tokens": 0}}

    scored = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **LM_EVAL_0_4_13,
                                                "max_tokens": 0}).json()["choices"][0]["logprobs"]
    assert len(scored["tokens"]) == len(prompt)
    # All but the last entry of the max_tokens 1 answer are the max_tokens 0 answer.
    assert logprobs["tokens"][:-1] == scored["tokens"]
    for a, b in zip(logprobs["token_logprobs"][1:-1], scored["token_logprobs"][1:]):
        assert abs(a - b) < 1e-5
    total, greedy = lm_eval_parse(choice, len(context))
    assert total < 0 and abs(total - sum(scored["token_logprobs"][len(context):])) < 1e-4
    assert isinstance(greedy, bool)


def test_lm_eval_shape_with_several_prompts(http):
    """lm-eval batches requests: a list of token-id prompts, one choice each, in order."""
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    answer = http.post("/v1/completions", json={"model": MODEL, "prompt": prompts, **LM_EVAL_0_4_13}).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, answer["choices"]):
        assert len(choice["logprobs"]["tokens"]) == len(prompt) + 1
