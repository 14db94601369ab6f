"""Chat templates that ignore ``tools`` (SmolLM2's): detected at start-up with a warning, and the opt-in
preamble that writes the tools into the system message the way Hermes-style templates do."""

from __future__ import annotations

import json
import logging

import pytest

from proxy_engine.config import DEFAULT_TRANSCRIPT_TEMPLATE, ModelConfig
from proxy_engine.loader import warn_if_tools_unseen
from proxy_engine.prompts import PromptRenderer, template_ignores_tools
from proxy_engine.request import PromptInput
from proxy_engine.tool_calls import system_tools_preamble

# SmolLM2-135M-Instruct's template (from its GGUF metadata): ChatML with a default system prompt, no tools.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HERMES_LIKE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": CITY}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_family.base))


def _renderer(tokenizer, template: str, preamble: bool) -> PromptRenderer:
    return PromptRenderer(tokenizer, "chat", DEFAULT_TRANSCRIPT_TEMPLATE, template, tools_preamble=preamble)


def test_detection_compares_a_probe_with_and_without_a_tool(tokenizer):
    assert template_ignores_tools(tokenizer, SMOLLM2)
    assert not template_ignores_tools(tokenizer, HERMES_LIKE)
    assert not template_ignores_tools(tokenizer, None)
    assert not template_ignores_tools(tokenizer, "{{ raise_exception('no') }}")  # cannot tell: no warning
    assert _renderer(tokenizer, SMOLLM2, False).ignores_tools
    assert not PromptRenderer(tokenizer, "plain", DEFAULT_TRANSCRIPT_TEMPLATE, SMOLLM2).ignores_tools  # transcript


def test_without_the_setting_the_model_sees_no_tools(tokenizer):
    renderer = _renderer(tokenizer, SMOLLM2, False)
    assert renderer.render_text(PromptInput(messages=USER, tools=TOOLS)) == renderer.render_text(
        PromptInput(messages=USER))


def test_the_preamble_is_a_system_message_with_tools_and_the_call_format(tokenizer):
    renderer = _renderer(tokenizer, SMOLLM2, True)
    text = renderer.render_text(PromptInput(messages=USER, tools=TOOLS))
    preamble = system_tools_preamble("hermes", TOOLS)
    assert text == (f"<|im_start|>system\n{preamble}<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert f"<tools>\n{json.dumps(TOOLS[0])}\n</tools>" in preamble
    assert '<tool_call>{"name": "<function-name>", "arguments": {"<argument>": "<value>"}}</tool_call>' in preamble
    # Without tools in the request nothing changes (the template's default system prompt stays).
    assert "SmolLM" in renderer.render_text(PromptInput(messages=USER))


def test_the_preamble_closes_an_existing_system_message_and_history_shows_calls(tokenizer):
    renderer = _renderer(tokenizer, SMOLLM2, True)
    messages = [{"role": "system", "content": "Be brief."}, *USER,
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "content": "21C", "tool_call_id": "call_1"}]
    text = renderer.render_text(PromptInput(messages=messages, tools=TOOLS))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert ('<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
            '<|im_end|>\n<|im_start|>tool\n21C<|im_end|>\n') in text


def test_a_template_that_renders_tools_is_left_alone(tokenizer):
    renderer = _renderer(tokenizer, HERMES_LIKE, True)
    text = renderer.render_text(PromptInput(messages=USER, tools=TOOLS))
    assert text.startswith("<|im_start|>system\n<tools>{") and "# Tools" not in text


def test_start_up_warns_once_per_model_and_names_the_setting(tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="proxy_engine.loader"):
        warn_if_tools_unseen("base", _renderer(tokenizer, SMOLLM2, False))
        warn_if_tools_unseen("expert", _renderer(tokenizer, HERMES_LIKE, False))
        warn_if_tools_unseen("expert_1", _renderer(tokenizer, SMOLLM2, True))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "base model's chat template ignores tools" in warnings[0].getMessage()
    assert "tools_preamble: true" in warnings[0].getMessage()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("expert_1" in m and "written into its system message" in m for m in infos)


def test_the_setting_from_flags_and_yaml(tmp_path):
    from server.cli import resolve_settings

    settings, _ = resolve_settings(["--base", "b", "--expert", "e", "--anti-expert", "a", "--base-tools-preamble",
                                    "--expert-tools-preamble"])
    assert settings.engine.base.tools_preamble and settings.engine.experts[0].expert.tools_preamble
    assert not settings.engine.experts[0].anti_expert.tools_preamble
    assert ModelConfig(path="x").tools_preamble is False
