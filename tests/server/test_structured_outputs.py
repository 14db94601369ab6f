"""Structured outputs through the real app and the OpenAI SDK, on the random-weight tiny family."""

from __future__ import annotations

import json
import re

import pydantic
import pytest

from tests.server.live import MODEL

# Finite: a random-weight model ends in valid JSON within a few dozen tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["colour", "count"],
    "additionalProperties": False,
}
SAMPLED = {"temperature": 1.0, "seed": 7}


class Paint(pydantic.BaseModel):
    colour: str = pydantic.Field(json_schema_extra={"enum": ["red", "green", "blue"]})
    count: int = pydantic.Field(ge=0, le=9)
    glossy: bool


@pytest.mark.parametrize("model", [MODEL, f"{MODEL}:base", f"{MODEL}:expert"])
def test_json_schema_on_chat_for_every_model(client, model):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe the paint."}], max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "paint", "schema": SCHEMA, "strict": True}},
        **SAMPLED,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    value = json.loads(choice.message.content)
    assert value["colour"] in {"red", "green", "blue"} and 0 <= value["count"] <= 9


def test_json_schema_on_completions(client):
    response = client.completions.create(
        model=MODEL, prompt="JSON:", max_tokens=60, n=2, **SAMPLED,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
    )
    for choice in response.choices:
        assert json.loads(choice.text)["colour"] in {"red", "green", "blue"}


def test_json_object_starts_an_object(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=40,
        response_format={"type": "json_object"}, **SAMPLED,
    )
    text = response.choices[0].message.content
    assert text.startswith("{")
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_parse_with_a_pydantic_model(client):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    completion = parse(model=MODEL, messages=[{"role": "user", "content": "Paint?"}], response_format=Paint,
                       max_tokens=60, **SAMPLED)
    paint = completion.choices[0].message.parsed
    assert isinstance(paint, Paint) and paint.colour in {"red", "green", "blue"}


def test_streamed_json_joins_to_the_same_answer(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Paint?"}], max_tokens=60,
                  response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}, **SAMPLED)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == whole and json.loads(streamed)


@pytest.mark.parametrize(
    "extra, check",
    [
        ({"guided_regex": r"[a-c]{3}-[0-9]"}, lambda t: re.fullmatch(r"[a-c]{3}-[0-9]", t)),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        ({"structured_outputs": {"regex": "x[0-9]"}}, lambda t: re.fullmatch("x[0-9]", t)),
        ({"guided_grammar": 'start: "a" ("b" | "c")'}, lambda t: t in ("ab", "ac")),
        ({"guided_json": SCHEMA}, lambda t: json.loads(t)["colour"] in {"red", "green", "blue"}),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, lambda t: json.loads(t)["count"] <= 9),
    ],
)
def test_vllm_fields(client, extra, check):
    response = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=40, extra_body=extra, **SAMPLED)
    assert check(response.choices[0].text), response.choices[0].text
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format", "Invalid type"),  # compiled in the engine: it names the field too
        ({"response_format": {"type": "xml"}}, "response_format.type", "not supported"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "must be an object"),
        ({"guided_regex": "(unclosed"}, "guided_regex", "unclosed group"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one output constraint"),
        ({"structured_outputs": {"yaml": "x"}}, "structured_outputs.yaml", "not supported"),
        # vLLM's structural tag is a constraint of its own: refused, not dropped (it was accepted as a hint)
        ({"structured_outputs": {"structural_tag": '{"structures": [], "triggers": ["<f="]}'}},
         "structured_outputs.structural_tag", "not supported"),
        ({"guided_grammar": "required"}, "guided_grammar", "invalid grammar: Expected ::="),  # was a 500 (fuzzing)
        ({"structured_outputs": {"grammar": "required"}}, "structured_outputs.grammar", "invalid grammar"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "nonsense"}}}}}], "tool_choice": "required"},
         "tools", "Invalid type"),
        # constraints that together exclude every token: a 400 once the first step finds it (was a 500)
        ({"guided_choice": ["x"], "allowed_token_ids": [0]}, None, "constraints together exclude every token"),
    ],
)
def test_bad_constraints_are_400s(http, body, param, needle):
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["param"] == param


def test_langchain_with_structured_output(live):
    from langchain_openai import ChatOpenAI  # the test extra pins it

    llm = ChatOpenAI(model=MODEL, base_url=f"{live.url}/v1", api_key="unused", temperature=1.0,
                                      seed=7, max_tokens=60, max_retries=0)
    paint = llm.with_structured_output(Paint).invoke("Describe a paint.")
    assert isinstance(paint, Paint) and 0 <= paint.count <= 9
