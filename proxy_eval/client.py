"""Asking an OpenAI-compatible server: chat or completions, temperature 0, with retries on overload."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx

from proxy_eval.tasks import Task

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def transcript(messages: list[dict[str, str]]) -> str:
    """Messages as a plain transcript, for sending a chat task to a completions endpoint."""
    lines = []
    for m in messages:
        if m["role"] == "system":
            lines.append(m["content"] + "\n")
        elif m["role"] == "user":
            lines.append(f"User: {m['content']}")
        else:
            lines.append(f"Assistant: {m['content']}")
    return "\n".join(lines) + "\nAssistant:"


@dataclass
class Endpoint:
    """One model to evaluate: its role (base/expert/proxy/tuned), the served model name, and where it lives."""

    role: str
    model: str
    base_url: str
    api_key: str | None = None


@dataclass
class Answer:
    text: str | None
    error: str | None = None
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)


def build_request(
    task: Task, endpoint: Endpoint, mode: str, max_tokens: int, stop: list[str] | None
) -> tuple[str, dict]:
    """(path, JSON body) for one task. mode: 'auto' (messages->chat, prompt->completions), 'chat', 'completions'."""
    use_chat = task.messages is not None if mode == "auto" else mode == "chat"
    body: dict = {"model": endpoint.model, "max_tokens": max_tokens, "temperature": 0}
    if stop:
        body["stop"] = stop
    if use_chat:
        body["messages"] = task.messages if task.messages is not None else [{"role": "user", "content": task.prompt}]
        return "/chat/completions", body
    body["prompt"] = task.prompt if task.prompt is not None else transcript(task.messages or [])
    return "/completions", body


def parse_response(path: str, data: dict) -> Answer:
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if path == "/chat/completions" else choice["text"]
    except (KeyError, IndexError, TypeError):
        return Answer(None, error=f"unexpected response shape: {str(data)[:200]}")
    return Answer(text if text is not None else "", finish_reason=choice.get("finish_reason"))


async def ask(
    client: httpx.AsyncClient,
    task: Task,
    endpoint: Endpoint,
    *,
    mode: str = "auto",
    max_tokens: int = 32,
    stop: list[str] | None = None,
    retries: int = 3,
    backoff_s: float = 0.5,
) -> Answer:
    path, body = build_request(task, endpoint, mode, max_tokens, stop)
    url = endpoint.base_url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    last_error = "no attempt"
    for attempt in range(retries + 1):
        try:
            response = await client.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                try:
                    return parse_response(path, response.json())
                except ValueError:
                    return Answer(None, error=f"response is not JSON: {response.text[:200]}")
            last_error = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code not in RETRY_STATUS:
                break
            retry_after = response.headers.get("retry-after")
            if retry_after and retry_after.replace(".", "", 1).isdigit():
                await asyncio.sleep(min(float(retry_after), 10.0))
                continue
        if attempt < retries:
            await asyncio.sleep(backoff_s * 2**attempt)
    return Answer(None, error=last_error)
