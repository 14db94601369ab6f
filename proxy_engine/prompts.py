"""Each model's own view of a prompt: plain text, or its chat template.

As in the paper, a chat-tuned expert sees the chat format while the base and anti-expert see plain text, so
the three token sequences differ in length. Chat requests reach a ``plain`` model as a simple transcript
(``EngineConfig.transcript_template``).
"""

from __future__ import annotations

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from proxy_engine.request import PromptInput, PromptTokens
from proxy_engine.tool_calls import (
    DEFAULT_FORMAT,
    messages_with_tools_preamble,
    template_messages,
    tools_preamble,
    transcript_messages,
)


def compile_template(source: str) -> jinja2.Template:
    """Templates run sandboxed: they come from model repositories and configuration files."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    return environment.from_string(source)


# Marks the end of a continued final message in the rendered transcript (as transformers' own tag does).
_CONTINUE_MARKER = "\x00proxy-serve:continue\x00"

_PROBE_MESSAGES = [{"role": "user", "content": "Hello"}]
_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_lookup", "description": "Look something up.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}}


def template_ignores_tools(tokenizer, chat_template: str | None) -> bool:
    """Whether the chat template renders a conversation the same with a tool as without (SmolLM2's does): then a
    request's tools never reach the model through it. A template that fails on the probe is given the benefit of
    the doubt."""
    if not chat_template:
        return False
    try:
        renders = [
            tokenizer.apply_chat_template(_PROBE_MESSAGES, chat_template=chat_template, add_generation_prompt=True,
                                          tokenize=False, **extra)
            for extra in ({}, {"tools": [_PROBE_TOOL]})
        ]
    except Exception:  # templates are arbitrary Jinja: a refusal here says nothing about tools
        return False
    return renders[0] == renders[1]


class PromptRenderer:
    """Renders a ``PromptInput`` into one model's token ids.

    ``tools_preamble``: when this chat-format model's template ignores ``tools`` (``ignores_tools``), write a
    request's tools into the system message instead (``tool_calls.messages_with_tools_preamble``).
    """

    def __init__(self, tokenizer, prompt_format: str, transcript_template: str, chat_template: str | None,
                 tools_preamble: bool = False) -> None:
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.transcript = compile_template(transcript_template)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.tool_format = DEFAULT_FORMAT  # the family's tool-call format (the engine sets the configured one)
        if prompt_format == "chat" and not self.chat_template:
            raise ValueError(
                f"prompt_format is 'chat' but {getattr(tokenizer, 'name_or_path', 'the tokenizer')} has no chat "
                "template: configure chat_template for this model"
            )
        self.ignores_tools = prompt_format == "chat" and template_ignores_tools(tokenizer, self.chat_template)
        self.tools_preamble = tools_preamble

    def ids_to_text(self, token_ids: list[int]) -> str:
        """A token-id prompt as text for a chat template, without the BOS the tokenizer put first: the template
        writes its own, and a second one would be a different prompt than the model was tuned on."""
        ids = list(token_ids)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and ids and ids[0] == bos:
            ids = ids[1:]
        return self.tokenizer.decode(ids)

    def render_text(self, prompt: PromptInput) -> str | None:
        """The text this model sees (None for token ids given to a plain model, which pass through as they are)."""
        if self.prompt_format == "chat":
            messages = prompt.messages
            if messages is None:
                text = prompt.text if prompt.text is not None else self.ids_to_text(prompt.token_ids)
                messages = [{"role": "user", "content": text}]
            extra = {"tools": prompt.tools} if prompt.tools else {}  # the template writes them its own way
            if prompt.tools and self.ignores_tools and self.tools_preamble:
                messages, extra = messages_with_tools_preamble(self.tool_format, messages, prompt.tools), {}
            try:
                return self.tokenizer.apply_chat_template(
                    template_messages(messages, self.tool_format), chat_template=self.chat_template,
                    add_generation_prompt=prompt.generation_prompt, continue_final_message=prompt.continue_final,
                    tokenize=False, **(prompt.template_kwargs or {}), **extra,
                )
            except jinja2.TemplateError as error:  # e.g. a template that insists on alternating roles
                raise ValueError(f"the chat template refused these messages: {error}") from error
            except ValueError as error:
                if not prompt.continue_final:
                    raise
                # transformers' message quotes the whole rendered prompt: say what is wrong instead.
                raise ValueError("the chat template does not write the final message's content as given, so it "
                                 "cannot be continued") from error
        if prompt.messages is not None:
            tools_text = tools_preamble(self.tool_format, prompt.tools) if prompt.tools else ""
            messages = transcript_messages(self.tool_format, prompt.messages)
            if not prompt.continue_final:
                return self.transcript.render(messages=messages, add_generation_prompt=prompt.generation_prompt,
                                              tools_text=tools_text)
            return self._open_final_message(messages, tools_text)
        return prompt.text

    def _open_final_message(self, messages: list[dict], tools_text: str) -> str:
        """The transcript up to the end of the final message's content, so the model continues that message.

        As transformers does for chat templates: a marker appended to the content shows where it ends once
        rendered, whatever the transcript template writes around it (its trailing newline, say)."""
        final = dict(messages[-1], content=messages[-1]["content"] + _CONTINUE_MARKER)
        rendered = self.transcript.render(messages=[*messages[:-1], final], add_generation_prompt=False,
                                          tools_text=tools_text)
        if _CONTINUE_MARKER not in rendered:
            raise ValueError("the transcript template does not write the final message's content as given, so it "
                             "cannot be continued")
        return rendered[: rendered.rindex(_CONTINUE_MARKER)]

    def adds_special_tokens(self, prompt: PromptInput) -> bool:
        """Whether the tokenizer's special tokens (BOS) go on this model's rendering of ``prompt``: a chat template
        writes its own, plain text gets them. The request's ``add_special_tokens`` decides for the text it wrote
        as this model reads it (a chat on a chat template; completion text on a plain model), not for the prompts
        built here (the transcript of a chat, which needs its BOS; a completion wrapped in a chat template)."""
        chat_template = self.prompt_format == "chat"
        written_as_sent = chat_template == (prompt.messages is not None)
        if written_as_sent and prompt.add_special_tokens is not None:
            return prompt.add_special_tokens
        return not chat_template

    def render(self, prompt: PromptInput) -> list[int]:
        if self.prompt_format == "plain" and prompt.token_ids is not None:
            return list(prompt.token_ids)
        return self._encode(self.render_text(prompt), prompt)["input_ids"]

    def tokens(self, prompt: PromptInput) -> PromptTokens:
        """``render``'s ids with the text they came from and each one's place in it (TGI's /tokenize)."""
        text = self.render_text(prompt)
        if text is None:
            raise ValueError("a prompt of token ids has no text to place its tokens in")
        fast = getattr(self.tokenizer, "is_fast", False)  # a slow (Python) tokenizer gives no offsets
        encoded = self._encode(text, prompt, offsets=fast)
        ids = encoded["input_ids"]
        offsets = [(start, stop) for start, stop in encoded["offset_mapping"]] if fast else [(0, 0)] * len(ids)
        return PromptTokens(text, ids, offsets)

    def _encode(self, text: str, prompt: PromptInput, offsets: bool = False):
        extra = {"return_offsets_mapping": True} if offsets else {}  # only asked of a tokenizer that gives them
        encoded = self.tokenizer(text, add_special_tokens=self.adds_special_tokens(prompt), **extra)
        if not encoded["input_ids"]:
            raise ValueError("the prompt is empty")
        return encoded
