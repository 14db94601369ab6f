"""vLLM's chat prompt controls, rendered for each model: ``continue_final_message`` (the final assistant message
left open, a prefill of the answer), ``add_generation_prompt: false`` and ``chat_template_kwargs``, on a chat
template and on the plain transcript."""

from __future__ import annotations

import pytest

from proxy_engine.config import DEFAULT_TRANSCRIPT_TEMPLATE
from proxy_engine.prompts import PromptRenderer
from proxy_engine.request import FieldError, PromptInput

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if enable_thinking is defined and not enable_thinking %}<|no_think|>{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PARTIAL = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hel"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_family.base))


def _chat(tokenizer, template: str = CHATML) -> PromptRenderer:
    return PromptRenderer(tokenizer, "chat", DEFAULT_TRANSCRIPT_TEMPLATE, template)


def _plain(tokenizer, transcript: str = DEFAULT_TRANSCRIPT_TEMPLATE) -> PromptRenderer:
    return PromptRenderer(tokenizer, "plain", transcript, None)


def _continued(messages=PARTIAL) -> PromptInput:
    return PromptInput(messages=messages, continue_final=True, generation_prompt=False)


def test_a_continued_final_message_ends_the_prompt_on_both_formats(tokenizer):
    assert _chat(tokenizer).render_text(_continued()) == (
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHel")
    assert _plain(tokenizer).render_text(_continued()) == "User: Say hi\nAssistant: Hel"
    # Trailing spaces are the client's: kept as sent, so the next token is the one after them.
    spaced = [PARTIAL[0], {"role": "assistant", "content": "Hello "}]
    assert _plain(tokenizer).render_text(_continued(spaced)) == "User: Say hi\nAssistant: Hello "
    assert _chat(tokenizer).render_text(_continued(spaced)).endswith("assistant\nHello ")
    # Not continued, the same messages end with a closed assistant turn and a new one opened.
    assert _plain(tokenizer).render_text(PromptInput(messages=PARTIAL)) == (
        "User: Say hi\nAssistant: Hel\nAssistant:")


def test_no_generation_prompt_leaves_the_turn_unopened(tokenizer):
    messages = PARTIAL[:1]
    assert _chat(tokenizer).render_text(PromptInput(messages=messages, generation_prompt=False)) == (
        "<|im_start|>user\nSay hi<|im_end|>\n")
    assert _plain(tokenizer).render_text(PromptInput(messages=messages, generation_prompt=False)) == "User: Say hi\n"


def test_template_kwargs_reach_the_chat_template_only(tokenizer):
    off = PromptInput(messages=PARTIAL[:1], template_kwargs={"enable_thinking": False})
    assert _chat(tokenizer).render_text(off).endswith("<|no_think|><|im_start|>assistant\n")
    assert "<|no_think|>" not in _chat(tokenizer).render_text(PromptInput(messages=PARTIAL[:1]))
    assert _plain(tokenizer).render_text(off) == _plain(tokenizer).render_text(PromptInput(messages=PARTIAL[:1]))


def test_a_template_that_rewrites_the_final_message_cannot_continue_it(tokenizer):
    shouting = DEFAULT_TRANSCRIPT_TEMPLATE.replace("Assistant: {{ m['content'] }}",
                                                   "Assistant: {{ m['content'] | upper }}")
    with pytest.raises(ValueError, match="cannot be continued"):
        _plain(tokenizer, shouting).render_text(_continued())
    with pytest.raises(ValueError, match="cannot be continued"):
        _chat(tokenizer, CHATML.replace("{{ m.content }}", "{{ m.content | upper }}")).render_text(_continued())


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"continue_final": True}, "add_generation_prompt"),  # generation_prompt left True
        ({"messages": PARTIAL[:1], "continue_final": True, "generation_prompt": False}, "continue_final_message"),
        ({"messages": [*PARTIAL[:1], {"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]}],
          "continue_final": True, "generation_prompt": False}, "continue_final_message"),
        ({"template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs"),
        ({"template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ],
)
def test_contradictions_are_refused_naming_the_request_field(kwargs, param):
    with pytest.raises(FieldError) as refused:
        PromptInput(**{"messages": PARTIAL, **kwargs})
    assert refused.value.param == param


def test_the_controls_need_messages():
    for kwargs in ({"continue_final": True, "generation_prompt": False}, {"generation_prompt": False},
                   {"template_kwargs": {"enable_thinking": False}}):
        with pytest.raises(ValueError, match="need messages"):
            PromptInput(text="hi", **kwargs)


def test_add_special_tokens_decides_for_what_the_client_wrote_only():
    """vLLM's add_special_tokens: on completion text as a plain model tokenizes it (default yes), on a chat as a
    chat template renders it (default no: the template writes its own); the transcript built for a plain model
    keeps its BOS, and a completion wrapped in a chat template keeps the template's. (Llama-2's tokenizer: a BOS.)"""
    from tests.conformance.families import llama2_tokenizer

    tokenizer = llama2_tokenizer()
    bos = tokenizer.bos_token_id
    plain, chat = _plain(tokenizer), _chat(tokenizer)
    text = PromptInput(text="Hello there")
    assert plain.render(text)[0] == bos
    assert plain.render(PromptInput(text="Hello there", add_special_tokens=False)) == plain.render(text)[1:]
    messages = PARTIAL[:1]
    for value in (None, True, False):
        assert plain.render(PromptInput(messages=messages, add_special_tokens=value))[0] == bos  # the transcript
        wrapped = PromptInput(text="Hello there", add_special_tokens=value)
        assert chat.render(wrapped) == chat.render(text)
    assert chat.render(PromptInput(messages=messages))[0] != bos
    assert chat.render(PromptInput(messages=messages, add_special_tokens=True)) == [
        bos, *chat.render(PromptInput(messages=messages))]
