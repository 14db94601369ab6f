"""Units: normalisation, the three metrics, the gap-closed ratio, task-file parsing, request building."""

import json

import pytest

from proxy_eval.client import Endpoint, build_request, parse_response, transcript
from proxy_eval.metrics import choice, contains, exact_match, gap_closed, normalize, pick_choice, score
from proxy_eval.tasks import TaskFileError, load_tasks, parse_task


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  Brindlemoor. ", "brindlemoor"),
        ("Juniper   Bay!", "juniper bay"),
        ("\u201cTeal\u201d\n", "teal"),
        ("don't", "don t"),
        ("", ""),
        ("CAFÉ", "café"),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_exact_match():
    assert exact_match(" Tarsville", "Tarsville") == 1.0
    assert exact_match("tarsville.", ["Oxmere", "Tarsville"]) == 1.0
    assert exact_match("Tarsville. Mira works as a baker", "Tarsville") == 0.0
    assert exact_match("", "Tarsville") == 0.0


def test_contains_uses_word_boundaries():
    assert contains("She lives in Juniper Bay, by the sea.", "juniper bay") == 1.0
    assert contains("a baker", "bake") == 0.0
    assert contains("nothing here", ["x", "here"]) == 1.0


def test_choice_picks_exact_then_first_appearing():
    choices = ["red", "green", "blue green"]
    assert pick_choice("Green", choices) == 1
    assert pick_choice("I think red, not green", choices) == 0
    assert pick_choice("blue green it is", choices) == 2  # the longer choice at the same position
    assert pick_choice("purple", choices) is None
    assert choice("green", "green", choices) == 1.0
    assert choice("red then green", "green", choices) == 0.0
    assert choice("purple", "green", choices) == 0.0
    with pytest.raises(ValueError):
        choice("x", "x", [])


def test_score_dispatch():
    assert score("exact_match", "A", "a") == 1.0
    assert score("contains", "x a y", "a") == 1.0
    assert score("choice", "b", "b", ["a", "b"]) == 1.0
    with pytest.raises(ValueError):
        score("bleu", "a", "a")


def test_gap_closed():
    assert gap_closed(0.0, 0.8, 1.0) == (pytest.approx(0.8), None)
    assert gap_closed(0.2, 0.2, 0.6)[0] == pytest.approx(0.0)
    assert gap_closed(0.1, 0.9, 0.5)[0] == pytest.approx(2.0)  # proxy beats tuned: over 100%
    assert gap_closed(0.5, 0.4, 0.0)[0] == pytest.approx(0.2)  # tuning hurt; the ratio keeps its meaning
    ratio, reason = gap_closed(0.3, 0.5, 0.3)
    assert ratio is None and "same" in reason


def test_parse_task_and_errors(tmp_path):
    t = parse_task({"messages": [{"role": "user", "content": "q"}], "reference": "a"}, "f:1")
    assert t.metric == "exact_match" and t.reference == ["a"] and t.id == "f:1"
    for bad in (
        {"reference": "a"},
        {"prompt": "p", "messages": [{"role": "user", "content": "q"}], "reference": "a"},
        {"prompt": "p"},
        {"prompt": "p", "reference": "a", "metric": "bleu"},
        {"prompt": "p", "reference": "a", "metric": "choice"},
        {"messages": [], "reference": "a"},
    ):
        with pytest.raises(TaskFileError):
            parse_task(bad, "f:1")
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "p", "reference": ["a", "b"], "id": "x"}) + "\n\n# comment\n{oops\n")
    with pytest.raises(TaskFileError, match="t.jsonl:4"):
        load_tasks(path)


def test_build_request_modes():
    chat_task = parse_task({"messages": [{"role": "user", "content": "Hi?"}], "reference": "a"}, "1")
    prompt_task = parse_task({"prompt": "Q: x\nA:", "reference": "a"}, "2")
    ep = Endpoint("proxy", "proxy-tuned", "http://h/v1")
    path, body = build_request(chat_task, ep, "auto", 8, None)
    assert path == "/chat/completions" and body["messages"][0]["content"] == "Hi?" and body["temperature"] == 0
    path, body = build_request(prompt_task, ep, "auto", 8, ["\n"])
    assert path == "/completions" and body["prompt"] == "Q: x\nA:" and body["stop"] == ["\n"]
    path, body = build_request(prompt_task, ep, "chat", 8, None)
    assert path == "/chat/completions" and body["messages"] == [{"role": "user", "content": "Q: x\nA:"}]
    path, body = build_request(chat_task, ep, "completions", 8, None)
    assert path == "/completions" and body["prompt"] == "User: Hi?\nAssistant:"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert transcript(messages) == "S\n\nUser: U\nAssistant:"
    assert parse_response("/completions", {"choices": [{"text": " x", "finish_reason": "stop"}]}).text == " x"
    assert parse_response("/chat/completions", {"choices": []}).error
