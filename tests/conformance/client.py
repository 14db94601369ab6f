"""The matrix's HTTP client: a request's JSON answer (asserting 200), or a stream's ``data:`` chunks."""

from __future__ import annotations

import json

import httpx


def post(url: str, path: str, body: dict, timeout: float = 120) -> dict:
    response = httpx.post(f"{url}{path}", json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def stream(url: str, path: str, body: dict, timeout: float = 120) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=timeout) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks
