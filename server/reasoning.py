"""Reasoning text out of a chat answer: ``<think> ... </think>`` goes to ``reasoning_content``, the rest is content.

Reasoning models write their thinking before the answer between ``<think>`` and ``</think>``. vLLM's
``--reasoning-parser`` moves it out of ``content`` into ``message.reasoning_content`` (``delta.reasoning_content``
when streamed), the field DeepSeek's API introduced and that the SDKs' users, LibreChat, Open WebUI and LiteLLM
read. ``--reasoning-parser`` here takes vLLM's two names for the two ways such a model starts its answer:

- ``deepseek_r1``: the chat template opens the block in the prompt (DeepSeek-R1 and its distills, Qwen3's
  "Thinking-2507" models), so the answer starts inside it: everything up to ``</think>`` is reasoning (a
  ``<think>`` the model writes anyway is dropped), and an answer cut before ``</think>`` is all reasoning;
- ``qwen3``: the model opens the block itself when it thinks (Qwen3's hybrid models): an answer that starts with
  ``<think>`` (after white space) reasons up to ``</think>`` or its end; any other answer is all content.
- ``granite`` (Granite 3.2 with ``thinking``): plain-text headings, "Here is my thought process:" ... "Here is my
  response:" (or "Here's"), read as ``qwen3`` reads its tags.
- ``olmo3`` (OLMo 3 Think): read as ``deepseek_r1``, since its template may open the block (vLLM's parser reads a
  never-closed answer as content when whole, as thinking when streamed; here it is thinking both ways).
- ``mistral``: as ``qwen3``, with Mistral's ``[THINK]`` ... ``[/THINK]`` (Magistral, Ministral 3 Reasoning). Those
  are special tokens, which decoding skips by default: with this parser answers keep special tokens.

Text is kept as written (the newlines around the tags included), so the streamed pieces join to the whole
answer's two fields. A request with ``chat_template_kwargs: {"enable_thinking": false}`` (or ``thinking:
false``) asked for no thinking, and one whose output is constrained (``response_format``, a required or named tool
call) cannot write any: both are read as content only. ``include_reasoning: false`` (vLLM's) drops the reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from proxy_engine.marks import first_mark, held_tail
from server.tools import ChoiceStream, ToolPlan, assistant_message

ReasoningParser = Literal["deepseek_r1", "qwen3", "mistral", "gemma4", "olmo3", "granite"]
# Each parser's tags around the thinking: (the ways it may open, the ways it may close).
_THINK = (("<think>",), ("</think>",))
TAGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "deepseek_r1": _THINK, "qwen3": _THINK, "olmo3": _THINK, "mistral": (("[THINK]",), ("[/THINK]",)),
    "gemma4": (("<|channel>",), ("<channel|>",)),
    # Granite 3.2's plain-text headings (some quantized copies write "Here's")
    "granite": (("Here is my thought process:", "Here's my thought process:"),
                ("Here is my response:", "Here's my response:")),
}
# Parsers for templates that open the block in the prompt: the answer starts inside it.
OPENED_IN_PROMPT: frozenset[str] = frozenset({"deepseek_r1", "olmo3"})
# A channel name the model writes first inside the tags, which is not thinking (Gemma 4's <|channel>thought\n).
LABELS: dict[str, str] = {"gemma4": "thought\n"}
# Parsers whose tags are special tokens, which decoding skips by default: their answers keep special tokens.
SPECIAL_TAG_PARSERS: frozenset[str] = frozenset({"mistral", "gemma4"})


def _opening(head: str, tags: tuple[str, ...]) -> bool:
    """Whether ``head`` (not empty) may still become one of ``tags``."""
    return any(len(head) < len(tag) and tag.startswith(head) for tag in tags)


def thinking_disabled(template_kwargs: dict[str, Any] | None) -> bool:
    """Whether the request's chat template variables turn thinking off (Qwen3's ``enable_thinking``, DeepSeek
    V3.1's ``thinking``)."""
    kwargs = template_kwargs or {}
    return kwargs.get("enable_thinking") is False or kwargs.get("thinking") is False


@dataclass
class ReasoningSplitter:
    """One choice's text, fed as it is generated, split into ``(field, piece)`` pairs, ``field`` being
    ``"reasoning_content"`` or ``"content"``; a piece that may be the start of a tag is held back until the next
    text or ``finish`` decides it. ``parser`` None: everything is content."""

    parser: ReasoningParser | None

    def __post_init__(self) -> None:
        self.state = "content" if self.parser is None else "start"
        self.pending = ""  # text not yet given out
        self.starts, self.ends = TAGS[self.parser or "qwen3"]
        self.label = LABELS.get(self.parser or "", "")  # dropped from the thinking's start, once read whole

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.pending += delta
        out: list[tuple[str, str]] = []
        if self.state == "start":
            head = self.pending.lstrip()
            if not head or _opening(head, self.starts):  # nothing yet, or a tag on its way
                return out
            opened = next((tag for tag in self.starts if head.startswith(tag)), None)
            if opened is not None:
                self.pending = head[len(opened):]
                self.state = "reasoning"
            else:
                self.state = "reasoning" if self.parser in OPENED_IN_PROMPT else "content"
                self.label = ""  # no tag written: no channel name either
        if self.state == "reasoning" and self.label:
            if _opening(self.pending, (self.label,)):  # it may be arriving
                return out
            if self.pending.startswith(self.label):
                self.pending = self.pending[len(self.label):]
            self.label = ""
        if self.state == "reasoning":
            found = first_mark(self.pending, self.ends)
            if found is None:
                keep = held_tail(self.pending, self.ends)  # a closing tag may be arriving
                piece, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
                return [("reasoning_content", piece)] if piece else out
            end, tag = found
            if end:
                out.append(("reasoning_content", self.pending[:end]))
            self.pending = self.pending[end + len(tag):]
            self.state = "content"
        if self.pending:
            out.append(("content", self.pending))
            self.pending = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        """What was held back, once the choice ended: the start of an answer too short to decide is read by the
        parser's rule for an answer without tags; a partial end tag is reasoning text after all."""
        rest, self.pending = self.pending, ""
        if not rest:
            return []
        if self.state == "start":
            field = "reasoning_content" if self.parser in OPENED_IN_PROMPT else "content"
            if field == "reasoning_content" and rest.lstrip() and _opening(rest.lstrip(), self.starts):
                return []  # a lone, cut "<think" opening tag: nothing said
            return [(field, rest)]
        return [("reasoning_content" if self.state == "reasoning" else "content", rest)]


def split_reasoning(parser: ReasoningParser | None, text: str) -> tuple[str | None, str | None]:
    """``(reasoning, content)`` of a whole answer; either is None when there is none of it (the content is ""
    rather than None for an answer without reasoning, as without a parser)."""
    splitter = ReasoningSplitter(parser)
    pieces = splitter.feed(text) + splitter.finish()
    reasoning = "".join(p for f, p in pieces if f == "reasoning_content")
    content = "".join(p for f, p in pieces if f == "content")
    if splitter.state == "reasoning":
        return reasoning or None, None  # ended inside the thinking (cut by max_tokens, say): no answer yet
    return reasoning or None, content


def reasoning_end(parser: ReasoningParser | None, text: str) -> int:
    """Where an answer's reasoning ends: the offset just past ``</think>`` (the whole text when the thinking was
    cut short), 0 when the answer did not reason. Read off ``split_reasoning``: the content is the text after
    the block, kept as written."""
    _, content = split_reasoning(parser, text)
    return len(text) if content is None else len(text) - len(content)


@dataclass(frozen=True)
class Reasoning:
    """A chat request's reasoning: the parser of its answer (None: all of it is content), whether the server has
    a parser at all (``reasoning_content`` is then part of every answer, null when there is none) and whether the
    request wants the reasoning back (``include_reasoning``)."""

    parser: ReasoningParser | None = None
    configured: bool = False
    include: bool = True

    def message(self, plan: ToolPlan, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A finished choice's ``message`` and ``finish_reason``: tool calls are read from the content only."""
        reasoning, content = split_reasoning(self.parser, text)
        message, reason = assistant_message(plan, content or "", reason)
        if content is None:
            message["content"] = None
        if self.configured:
            message["reasoning_content"] = reasoning if self.include else None
        return message, reason

    def deltas(self, splitter: ReasoningSplitter, stream: ChoiceStream, delta: str, finished: bool
               ) -> list[dict[str, Any]]:
        """One streamed output's chat deltas: reasoning pieces as ``reasoning_content``, content through the
        choice's tool-call stream; with ``finished``, whatever either held back."""
        if self.parser is None:
            out = stream.feed(delta)
            return out + stream.finish() if finished else out
        out = []
        for field, piece in splitter.feed(delta) + (splitter.finish() if finished else []):
            if field == "content":
                out += stream.feed(piece)
            elif self.include:
                out.append({"reasoning_content": piece})
        return out + stream.finish() if finished else out
