"""What chat frontends send, and how they read what comes back.

The request bodies and headers below are the ones recorded from the real clients (see docs/frontends.md for
where each came from): Open WebUI 0.12.4 from its backend (aiohttp), LibreChat through the LangChain ``ChatOpenAI``
that its agents endpoint builds (``@langchain/openai`` over the ``openai`` Node SDK), and LibreChat's older
``OpenAIClient`` (the ``openai`` Node SDK directly). Only ``model`` is rewritten to the served ids.

The parsers replay the clients' reading of an event stream:

- ``openai_node_events``: the ``openai`` Node SDK's ``Stream`` (LibreChat, and the browser code of frontends
  that call the API directly): lines split on ``\\n``, ``\\r\\n`` or ``\\r``; ``:`` comments skipped; ``data:``
  lines of one event joined with ``\\n``; an event whose data starts with ``[DONE]`` ends it; anything else is
  ``JSON.parse``d, and a payload with an ``error`` member is thrown as an ``APIError``.
- ``ChatCompletionAccumulator``: the SDK's ``ChatCompletionStream`` (``chat.completions.stream(...)``, which old
  LibreChat used): builds the final completion and refuses one whose choice lacks a role or a finish reason.
- ``open_webui_events``: Open WebUI's backend, which reads the upstream body line by line, keeps lines starting
  with ``data:``, strips them, stops at ``[DONE]``, ``json.loads`` the rest and reports an ``error`` member.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

API_KEY = "sk-frontend-test-0123456789"
BROWSER_ORIGIN = "http://localhost:3000"
MODEL = "proxy-tuned"
BASE_MODEL = "proxy-tuned:base"
EXPERT_MODEL = "proxy-tuned:expert"

# ------------------------------------------------------------------------------------------------ LibreChat

# The openai Node SDK's headers (6.x under Node 20), as recorded on the wire; LangChain adds its user agent.
OPENAI_NODE_HEADERS = {
    "accept": "application/json",
    "content-type": "application/json",
    "user-agent": "OpenAI/JS 6.49.0",
    "x-stainless-retry-count": "0",
    "x-stainless-lang": "js",
    "x-stainless-package-version": "6.49.0",
    "x-stainless-os": "Linux",
    "x-stainless-arch": "x64",
    "x-stainless-runtime": "node",
    "x-stainless-runtime-version": "v20.20.2",
    "accept-language": "*",
    "sec-fetch-mode": "cors",
}
LANGCHAIN_HEADERS = {**OPENAI_NODE_HEADERS, "user-agent": "langchainjs-openai/1.0.0 ((node/v20.20.2; linux; x64))"}


def bearer(headers: dict[str, str], key: str = API_KEY) -> dict[str, str]:
    return {**headers, "authorization": f"Bearer {key}"}


# LibreChat (agents endpoint): ChatOpenAI({streaming: true, model, temperature, topP, frequencyPenalty,
# presencePenalty, user, modelKwargs: addParams, ...}).stream(messages). LangChain puts the known fields
# first, then ``stream`` and ``stream_options``, then the modelKwargs (``addParams``), ``max_tokens`` when set
# (not by default) and the messages last.
LIBRECHAT_AGENTS_STREAM = {
    "model": MODEL,
    "temperature": 0.7,
    "top_p": 0.9,
    "frequency_penalty": 0.1,
    "presence_penalty": 0.2,
    "user": "6650c0ffee0ddba11c0ffee1",
    "stream": True,
    "stream_options": {"include_usage": True},
    "alpha": 0.5,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is proxy-tuning?"},
    ],
}

# LibreChat (agents endpoint) title, titleMethod "completion" (the default): the same client options without
# stream/streaming, the titleModel, and one human message built from this template.
LIBRECHAT_TITLE_PROMPT = (
    "Provide a concise, 5-word-or-less title for the conversation, using title case conventions. Only return "
    "the title itself.\n\nConversation:\nUser: What is proxy-tuning?\nAI: Proxy-tuning steers a large model."
)
LIBRECHAT_AGENTS_TITLE = {
    "model": EXPERT_MODEL,
    "temperature": 0.7,
    "top_p": 0.9,
    "frequency_penalty": 0.1,
    "presence_penalty": 0.2,
    "user": "6650c0ffee0ddba11c0ffee1",
    "stream": False,
    "alpha": 0.5,
    "max_tokens": 50,
    "messages": [{"role": "user", "content": LIBRECHAT_TITLE_PROMPT}],
}

# Older LibreChat (OpenAIClient, openai SDK ``beta.chat.completions.stream``): defaults temperature 0.8,
# top_p 1, presence_penalty 1, ``stop`` and ``max_tokens`` passed through even when unset (null), ``user``,
# a system message named "instructions" for the preset's instructions, ``name`` on user messages, addParams
# merged last.
LIBRECHAT_LEGACY_STREAM = {
    "model": MODEL,
    "temperature": 0.8,
    "top_p": 1,
    "presence_penalty": 1,
    "frequency_penalty": 0,
    "stop": ["\nUser:", "||>"],
    "max_tokens": None,
    "user": "6650c0ffee0ddba11c0ffee1",
    "stream": True,
    "messages": [
        {"role": "system", "name": "instructions", "content": "Instructions:\nAnswer briefly."},
        {"role": "user", "name": "Alice", "content": "Hello!"},
        {"role": "assistant", "content": "Hi! How can I help you today?"},
        {"role": "user", "name": "Alice", "content": "Tell me about Paris."},
    ],
    "alpha": 1.0,
}

# Older LibreChat title, "completion" method: one *system* message, max_tokens 16, temperature 0.2.
LIBRECHAT_LEGACY_TITLE = {
    "model": EXPERT_MODEL,
    "temperature": 0.2,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "max_tokens": 16,
    "user": "6650c0ffee0ddba11c0ffee1",
    "messages": [{
        "role": "system",
        "content": (
            "Please generate a concise, 5-word-or-less title for the conversation, using its same language, with "
            "no punctuation. Apply title case conventions appropriate for the language. Never directly mention "
            'the language name or the word "title"\n\n||>User:\n"Tell me about Paris."\n||>Response:\n'
            '"\\"Paris is the capital of France.\\""\n\n||>Title:'
        ),
    }],
}

# ------------------------------------------------------------------------------------------------ Open WebUI

# Open WebUI 0.12.4's backend (aiohttp) calls the API; recorded through a logging proxy in front of the server.
OPEN_WEBUI_HEADERS = {
    "accept": "*/*",
    "accept-encoding": "gzip, deflate, br",
    "user-agent": "Python/3.11 aiohttp/3.14.5",
}
OPEN_WEBUI_POST_HEADERS = {"content-type": "application/json", **OPEN_WEBUI_HEADERS}

# Two of the 28 built-in tool definitions that a chat from the browser carries by default ("native" function
# calling); the models read them (a plain model in its transcript) and an answer in the family's call format
# comes back as ``tool_calls``.
_OPEN_WEBUI_TOOLS = [
    {"type": "function", "function": {
        "name": "get_current_timestamp", "description": "Get the current Unix timestamp in seconds.",
        "parameters": {"properties": {}, "type": "object"}}},
    {"type": "function", "function": {
        "name": "calculate_timestamp",
        "description": "Get the current Unix timestamp, optionally adjusted by days, weeks, months, or years.\n"
                       "Use this to calculate timestamps for date filtering in search functions.\n"
                       "Examples: \"last week\" = weeks_ago=1, \"3 days ago\" = days_ago=3, "
                       "\"a year ago\" = years_ago=1",
        "parameters": {"properties": {
            "days_ago": {"default": 0, "description": "Number of days to subtract from current time (default: 0)",
                         "type": "integer"},
            "weeks_ago": {"default": 0, "description": "Number of weeks to subtract from current time (default: 0)",
                          "type": "integer"},
        }, "type": "object"}}},
]

# A chat sent from the browser with the default settings: no sampler fields, no max_tokens, the tools.
OPEN_WEBUI_CHAT = {
    "stream": True,
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is proxy-tuning?"}],
    "tools": _OPEN_WEBUI_TOOLS,
}

# The same with the chat's advanced parameters set, "usage" reporting on and alpha as a custom parameter:
# Open WebUI passes Ollama-only names (``repeat_penalty``, ``num_ctx``) through, sends ``stop`` with its
# escapes unexpanded, and turns the custom parameter's string "0.5" into a number.
OPEN_WEBUI_CHAT_WITH_PARAMS = {
    "stream": True,
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are concise."},
        {"role": "user", "content": "What is proxy-tuning?"},
    ],
    "stream_options": {"include_usage": True},
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "min_p": 0.05,
    "max_tokens": 24,
    "seed": 7,
    "stop": ["\\n\\nUser:"],
    "frequency_penalty": 0.1,
    "presence_penalty": 0.2,
    "repeat_penalty": 1.1,
    "num_ctx": 4096,
    "alpha": 0.5,
}


def open_webui_task(task: str, chat: str, **extra: Any) -> dict[str, Any]:
    """A background task (title, tags, follow-ups): one user message holding the task prompt, not streamed.

    Titles add ``max_tokens: 1000``; tags and follow-ups send no ``max_tokens`` at all. The task prompts are
    Open WebUI's defaults, shortened here to their first and last lines.
    """
    return {"model": MODEL, "messages": [{"role": "user", "content": (
        f"### Task:\n{task}\n### Output:\nJSON format: {{ ... }}\n### Chat History:\n<chat_history>\n{chat}\n"
        "</chat_history>")}], "stream": False, **extra}


OPEN_WEBUI_TITLE = open_webui_task(
    "Generate a concise title summarizing the chat history.", "USER: What is proxy-tuning?\nASSISTANT: ",
    max_tokens=1000,
)
OPEN_WEBUI_TAGS = open_webui_task(
    "Generate 1-3 broad tags categorizing the main themes of the chat history.",
    "USER: What is proxy-tuning?\nASSISTANT: It steers a large model.",
)

# ------------------------------------------------------------------------------------------------ context

MAX_MODEL_LEN = 256  # the test server's context (tests/frontends/conftest.py)
_FILLER = " The quick brown fox jumps over the lazy dog."


def fill_context(http, body: dict[str, Any], leave: int = 24) -> dict[str, Any]:
    """``body`` with its last user message lengthened until at most ``leave`` tokens of context remain.

    Frontends send no ``max_tokens`` by default, so the server generates up to the end of the context; a
    long pasted message keeps that short here while the body's fields stay exactly the frontend's. The
    length is measured with the server's own ``/tokenize``.
    """
    body = json.loads(json.dumps(body))
    message = next(m for m in reversed(body["messages"]) if m["role"] == "user")

    def count() -> int:
        response = http.post("/tokenize", json={"model": body.get("model"), "messages": body["messages"]},
                             headers=bearer({}))
        response.raise_for_status()
        return response.json()["count"]

    target = MAX_MODEL_LEN - leave
    tokens = count()
    while tokens < target:
        message["content"] += _FILLER * max(1, (target - tokens) // 16)
        tokens = count()
    if tokens > MAX_MODEL_LEN - 4:
        raise AssertionError(f"filled past the context: {tokens} of {MAX_MODEL_LEN} tokens")
    return body


# ------------------------------------------------------------------------------------------------ parsers


class StreamAPIError(Exception):
    """The SDK's ``APIError`` thrown from inside a stream (an ``error`` payload after the 200)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.error = error


def _lines(text: str) -> list[str]:
    """The SDK's ``LineDecoder``: ``\\r\\n``, ``\\n`` and ``\\r`` all end a line."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


@dataclass
class SSE:
    event: str | None
    data: str


def sse_messages(text: str) -> list[SSE]:
    """The SDK's ``SSEDecoder`` over a whole body: fields per line, an event dispatched at each blank line."""
    messages: list[SSE] = []
    event: str | None = None
    data: list[str] = []
    for line in _lines(text):
        if not line:
            if event is not None or data:
                messages.append(SSE(event, "\n".join(data)))
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if event is not None or data:  # a last event without its blank line is still flushed at the end
        messages.append(SSE(event, "\n".join(data)))
    return messages


def openai_node_events(text: str) -> tuple[list[dict[str, Any]], bool]:
    """``Stream.fromSSEResponse``: the JSON payloads in order and whether ``[DONE]`` was seen.

    Raises ``StreamAPIError`` for an ``error`` payload and ``json.JSONDecodeError`` for data that is not JSON,
    as the SDK does.
    """
    payloads: list[dict[str, Any]] = []
    done = False
    for sse in sse_messages(text):
        if done:
            continue
        if sse.data.startswith("[DONE]"):
            done = True
            continue
        data = json.loads(sse.data)
        if sse.event is None or not sse.event.startswith("thread."):
            if isinstance(data, dict) and data.get("error"):
                raise StreamAPIError(data["error"])
            payloads.append(data)
        elif sse.event == "error":
            raise StreamAPIError(data.get("error") or data)
    return payloads, done


@dataclass
class _ChoiceSnapshot:
    role: str | None = None
    content: str | None = None
    finish_reason: str | None = None


@dataclass
class ChatCompletionAccumulator:
    """``ChatCompletionStream``'s snapshot and ``finalChatCompletion()`` checks."""

    id: str | None = None
    model: str | None = None
    choices: dict[int, _ChoiceSnapshot] = field(default_factory=dict)
    usage: dict[str, int] | None = None
    chunks: int = 0

    def add(self, chunk: dict[str, Any]) -> None:
        assert chunk.get("object") == "chat.completion.chunk", chunk
        self.chunks += 1
        self.id = chunk["id"]
        self.model = chunk["model"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk["choices"]:
            snapshot = self.choices.setdefault(choice["index"], _ChoiceSnapshot())
            if choice.get("finish_reason"):
                snapshot.finish_reason = choice["finish_reason"]
            delta = choice.get("delta") or {}
            if delta.get("role"):
                snapshot.role = delta["role"]
            if delta.get("content") is not None:
                snapshot.content = (snapshot.content or "") + delta["content"]

    def final(self) -> dict[str, Any]:
        if not self.chunks:
            raise AssertionError("stream ended without producing a ChatCompletion")
        choices = []
        for index, snapshot in sorted(self.choices.items()):
            if not snapshot.finish_reason:
                raise AssertionError(f"missing finish_reason for choice {index}")
            if not snapshot.role:
                raise AssertionError(f"missing role for choice {index}")
            choices.append({"index": index, "finish_reason": snapshot.finish_reason,
                            "message": {"role": snapshot.role, "content": snapshot.content}})
        return {"id": self.id, "object": "chat.completion", "model": self.model, "choices": choices,
                "usage": self.usage}


def open_webui_events(text: str) -> tuple[list[dict[str, Any]], bool]:
    """Open WebUI's backend reading of an upstream stream (``process_chat_response``): ``data:`` lines only."""
    payloads: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data.startswith("[DONE]"):
            return payloads, True
        payload = json.loads(data)
        if isinstance(payload, dict) and payload.get("error"):
            raise StreamAPIError(payload["error"])
        payloads.append(payload)
    return payloads, False
