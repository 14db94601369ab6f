"""Task files: JSONL, one question a line.

    {"prompt": "Q: ...\\nA:", "reference": "x", "metric": "exact_match"}
    {"messages": [{"role": "user", "content": "..."}], "reference": ["x", "y"], "metric": "contains"}
    {"messages": [...], "reference": "b", "metric": "choice", "choices": ["a", "b", "c"]}

``metric`` defaults to exact_match; ``id`` is optional (the line number otherwise). Blank lines and lines
starting with ``#`` are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from proxy_eval.metrics import METRICS


class TaskFileError(ValueError):
    pass


@dataclass(frozen=True)
class Task:
    id: str
    reference: list[str]
    metric: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    choices: list[str] | None = None


def parse_task(obj: object, where: str) -> Task:
    if not isinstance(obj, dict):
        raise TaskFileError(f"{where}: a task is a JSON object")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise TaskFileError(f"{where}: give exactly one of 'prompt' and 'messages'")
    if prompt is not None and not isinstance(prompt, str):
        raise TaskFileError(f"{where}: 'prompt' must be a string")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise TaskFileError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
    reference = obj.get("reference")
    refs = [reference] if isinstance(reference, str) else reference
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise TaskFileError(f"{where}: 'reference' must be a string or a non-empty list of strings")
    metric = obj.get("metric", "exact_match")
    if metric not in METRICS:
        raise TaskFileError(f"{where}: unknown metric {metric!r} (known: {', '.join(METRICS)})")
    choices = obj.get("choices")
    if metric == "choice":
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise TaskFileError(f"{where}: the choice metric needs 'choices', a non-empty list of strings")
    elif choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise TaskFileError(f"{where}: 'choices' must be a list of strings")
    task_id = obj.get("id", where)
    return Task(
        id=str(task_id), reference=list(refs), metric=metric, prompt=prompt,
        messages=[{"role": m["role"], "content": m["content"]} for m in messages] if messages else None,
        choices=list(choices) if choices else None,
    )


def load_tasks(path: str | Path) -> list[Task]:
    path = Path(path)
    tasks = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path.name}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskFileError(f"{where}: not JSON ({exc.msg})") from None
            tasks.append(parse_task(obj, where))
    if not tasks:
        raise TaskFileError(f"{path}: no tasks")
    return tasks
