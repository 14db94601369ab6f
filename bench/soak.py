"""Soak test: minutes of mixed traffic against a ``proxy-serve`` subprocess on loopback, then the checks.

    python -m bench.soak                      # 10 minutes at concurrency 64 (tiny family, one torch thread)
    python -m bench.soak --minutes 1 --concurrency 32
    python -m bench.soak --quick              # seconds: what tests/reliability/test_soak.py runs

Each of ``concurrency`` clients loops over a weighted mix of actions until the time is up:

- ``stream``: a streamed completion or chat (random sampling parameters, 1..48 tokens), read to ``[DONE]``;
- ``drop``: a stream the client leaves after its first few events;
- ``whole``: a non-streamed completion or chat;
- ``score``: ``echo`` + ``logprobs`` with ``max_tokens`` 0 or 1 (what evaluation harnesses send);
- ``tokenize`` / ``detokenize``;
- ``hostile``: malformed or refused bodies (bad JSON, no content type, a foreign ``Host``, a 1 MB model name,
  a request that can never be admitted, float32-unsafe values, unknown fields, garbage on the socket).

Checks: no 5xx (and no connection error) at all; every completed stream ends in ``[DONE]`` with no error event;
the server's RSS after warm-up (the first fifth of the run) stays within ``--rss-limit-mb``; the engine is idle
(running, prefilling and waiting all 0) at the end; SIGTERM then exits 0. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.load_test import build_family, start_server, wait_idle

MODEL = "proxy-tuned"
WORDS = "the quick brown fox jumps over a lazy dog while Paris stays the capital of France".split()
OVERSIZED = 5 * 1024 * 1024  # past the default max_body_bytes (4 MiB)
ACTIONS = {"stream": 30, "drop": 12, "whole": 14, "score": 12, "tokenize": 8, "detokenize": 4, "hostile": 20}


@dataclass
class SoakConfig:
    seconds: float = 600.0
    concurrency: int = 64
    warmup_fraction: float = 0.2
    max_tokens: int = 48
    max_num_seqs: int = 32
    rss_limit_mb: float = 64.0
    threads: int = 1
    seed: int = 0
    family: str = "tiny"


@dataclass
class Tally:
    by_action: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    streams_done: int = 0
    tokens: int = 0
    current: str = ""  # the action in progress (a client runs one at a time)
    early_closes: int = 0  # connection closed while the client still sent an oversized body (after the 413)

    def fail(self, message: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(message)
        else:
            self.failures[-1] = f"... and more ({message})"


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def sampling(rng: random.Random, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": rng.choice([MODEL, f"{MODEL}:base", f"{MODEL}:expert"]),
                            "max_tokens": rng.randint(1, max_tokens), "seed": rng.randint(0, 2**31)}
    for name, value in (("temperature", rng.choice([0, 0.7, 1.0, 1e-39])), ("top_p", rng.choice([1.0, 0.9])),
                        ("top_k", rng.choice([0, 5])), ("repetition_penalty", rng.choice([1.0, 1.2])),
                        ("presence_penalty", rng.choice([0, 0.5])), ("stop", rng.choice([None, [" the"], "."])),
                        ("logit_bias", rng.choice([None, {"5": 3}])), ("n", rng.choice([1, 1, 2])),
                        ("alpha", rng.choice([None, 0.5, 2.0]))):
        if value is not None and rng.random() < 0.5:
            body[name] = value
    return body


def request_body(rng: random.Random, config: SoakConfig) -> tuple[str, dict[str, Any]]:
    body = sampling(rng, config.max_tokens)
    if rng.random() < 0.5:
        return "/v1/completions", {**body, "prompt": words(rng, 1, 12)}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": words(rng, 1, 12)}]}


def hostile(rng: random.Random) -> tuple[str, bytes, dict[str, str], set[int]]:
    """(path, raw body, headers, statuses the server may answer)."""
    json_type = {"content-type": "application/json"}
    cases = [
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 2,}', json_type, {400}),
        ("/v1/completions", b'{"prompt": "x"}', {"content-type": "text/plain"}, {415}),
        ("/v1/completions", b'{"prompt": "x"}', {}, {415}),
        ("/v1/models", b"", {"host": "evil.example"}, {403}),
        ("/v1/completions", json.dumps({"model": "m" * 1_000_000, "prompt": "x"}).encode(), json_type, {404}),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": ["x"] * 64, "n": 16}).encode(), json_type, {400}),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "repetition_penalty": 1e-300}).encode(),
         json_type, {400}),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "temperature": 1e308}).encode(), json_type,
         {400}),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stop_token_ids": [1] * 300}).encode(),
         json_type, {400}),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode(), json_type, {400}),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}],
                                             "tools": [{"type": "function"}], "unknown": [1]}).encode(),
         json_type, {200, 400}),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": list(range(10**6, 10**6 + 5))}).encode(),
         json_type, {400}),
        ("/tokenize", json.dumps({"model": MODEL, "prompt": "x" * 2_000_000}).encode(), json_type, {400}),
        ("/detokenize", json.dumps({"model": MODEL, "tokens": [-1]}).encode(), json_type, {400}),
        ("/v1/completions", b"\xff\xfe" * 100, json_type, {400}),
        ("/v1/completions", b"x" * OVERSIZED, json_type, {413}),
        ("garbage", b"GARBAGE\r\n\r\n", {}, {400}),
    ]
    return rng.choice(cases)


async def raw_socket(url: str, data: bytes) -> int:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), 30)
        return int(head.split()[1])
    finally:
        writer.close()


async def read_stream(client: httpx.AsyncClient, path: str, body: dict, tally: Tally, *, leave_after: int | None
                      ) -> int:
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code
        events = 0
        last = None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            last = line[6:]
            events += 1
            if last != "[DONE]" and '"error"' in last and json.loads(last).get("error"):
                tally.fail(f"error event in {path}: {last[:200]}")
            if leave_after is not None and events >= leave_after:
                return 200  # the client leaves; the server must abort the request
            if last != "[DONE]":
                tally.tokens += 1
        if last != "[DONE]":
            tally.fail(f"stream {path} ended without [DONE] (last {str(last)[:100]})")
        else:
            tally.streams_done += 1
        return 200


async def one_action(client: httpx.AsyncClient, url: str, rng: random.Random, config: SoakConfig,
                     tally: Tally) -> None:
    action = rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
    tally.by_action[action] += 1
    allowed = {200, 429}
    tally.current = action
    if action in ("stream", "drop"):
        path, body = request_body(rng, config)
        status = await read_stream(client, path, body, tally, leave_after=rng.randint(1, 4) if action == "drop"
                                   else None)
    elif action == "whole":
        path, body = request_body(rng, config)
        response = await client.post(path, json=body)
        status = response.status_code
        if status == 200 and not response.json().get("choices"):
            tally.fail(f"{path}: an answer without choices")
    elif action == "score":
        prompt = [rng.randint(5, 400) for _ in range(rng.randint(2, 16))]
        body = {"model": rng.choice([MODEL, f"{MODEL}:base"]), "prompt": prompt, "echo": True, "logprobs": 1,
                "temperature": 0, "max_tokens": rng.choice([0, 1])}
        response = await client.post("/v1/completions", json=body)
        status = response.status_code
        if status == 200:
            tokens = response.json()["choices"][0]["logprobs"]["tokens"]
            if len(tokens) != len(prompt) + body["max_tokens"]:
                tally.fail(f"scoring returned {len(tokens)} entries for {len(prompt)} prompt tokens")
    elif action == "tokenize":
        response = await client.post("/tokenize", json={"model": MODEL, "prompt": words(rng, 1, 200)})
        status = response.status_code
    elif action == "detokenize":
        tokens = [rng.randint(5, 400) for _ in range(rng.randint(1, 30))]
        response = await client.post("/detokenize", json={"model": MODEL, "tokens": tokens})
        status = response.status_code
    else:
        path, raw, headers, allowed = hostile(rng)
        tally.current = f"hostile {path} ({len(raw)} bytes)"
        if path == "garbage":
            status = await raw_socket(url, raw)
        elif path == "/v1/models":
            status = (await client.get(path, headers=headers)).status_code
        else:
            status = (await client.post(path, content=raw, headers=headers)).status_code
        allowed = allowed | {429}
    tally.statuses[status] += 1
    if status not in allowed:
        tally.fail(f"{action}: status {status}")


async def client_loop(url: str, deadline: float, rng: random.Random, config: SoakConfig, tally: Tally,
                      client: httpx.AsyncClient) -> None:
    while time.monotonic() < deadline:
        try:
            await one_action(client, url, rng, config, tally)
        except (TimeoutError, httpx.HTTPError, OSError) as error:
            if isinstance(error, (httpx.ReadError, httpx.WriteError)) and f"({OVERSIZED} bytes)" in tally.current:
                # The server answers 413 as soon as the declared length is past the limit and closes the
                # connection; a client still writing the rest of a 5 MB body may see the close first.
                tally.early_closes += 1
                continue
            tally.statuses["connection error"] += 1
            tally.fail(f"{tally.current}: {type(error).__name__}: {error}")


async def soak(url: str, config: SoakConfig, rss: Callable[[], float]) -> tuple[Tally, list[tuple[float, float]]]:
    tally = Tally()
    samples: list[tuple[float, float]] = []
    start = time.monotonic()
    deadline = start + config.seconds
    limits = httpx.Limits(max_connections=config.concurrency + 8, max_keepalive_connections=config.concurrency)
    timeout = httpx.Timeout(120, connect=30)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        async def sample() -> None:
            while True:
                samples.append((time.monotonic() - start, rss()))
                await asyncio.sleep(max(0.2, config.seconds / 200))

        sampler = asyncio.create_task(sample())
        rngs = [random.Random(config.seed * 1000 + i) for i in range(config.concurrency)]
        await asyncio.gather(*(client_loop(url, deadline, rng, config, tally, client) for rng in rngs))
        sampler.cancel()
    samples.append((time.monotonic() - start, rss()))
    return tally, samples


def run(config: SoakConfig, *, family=None, log_dir: Path | None = None) -> dict[str, Any]:
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="proxy-soak-"))
    family = family or build_family(config.family, Path(tempfile.gettempdir()) / "proxy-serve-load")
    server = start_server(family, threads=config.threads, log_dir=log_dir, name="soak",
                          extra=["--max-num-seqs", str(config.max_num_seqs)])
    try:
        start_mb = server.rss_mb()
        wall = time.monotonic()
        tally, samples = asyncio.run(soak(server.url, config, server.rss_mb))
        wall = time.monotonic() - wall
        counts, idle_s = wait_idle(server.url)
    finally:
        status = server.stop()
    warm_until = config.seconds * config.warmup_fraction
    after = [mb for t, mb in samples if t >= warm_until] or [samples[-1][1]]
    rss = {"start_mb": round(start_mb, 1), "after_warmup_mb": round(after[0], 1), "peak_mb": round(max(after), 1),
           "end_mb": round(after[-1], 1), "growth_after_warmup_mb": round(max(after) - after[0], 1)}
    fivexx = sum(n for s, n in tally.statuses.items() if isinstance(s, int) and s >= 500)
    checks = {
        "no 5xx": fivexx == 0,
        "no connection errors": tally.statuses.get("connection error", 0) == 0,
        "no failures": not tally.failures,
        "rss flat after warm-up": rss["growth_after_warmup_mb"] <= config.rss_limit_mb,
        "engine idle at the end": not any(counts.values()),
        "SIGTERM exit 0": status == 0,
    }
    requests = sum(tally.by_action.values())
    return {
        "config": asdict(config), "wall_s": round(wall, 1), "requests": requests,
        "requests_per_s": round(requests / wall, 1) if wall else None, "by_action": dict(tally.by_action),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items(), key=str)},
        "oversized_early_closes": tally.early_closes, "streams_completed": tally.streams_done,
        "stream_events": tally.tokens, "rss": rss,
        "engine_after": counts, "s_to_idle": round(idle_s, 2), "exit_status": status, "checks": checks,
        "failures": tally.failures, "ok": all(checks.values()), "log": str(server.log_path),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="8 seconds at concurrency 16")
    parser.add_argument("--rss-limit-mb", type=float, default=64.0)
    parser.add_argument("--family", default="tiny", choices=["tiny", "bench"])
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    config = SoakConfig(seconds=8.0 if args.quick else args.minutes * 60,
                        concurrency=16 if args.quick else args.concurrency, rss_limit_mb=args.rss_limit_mb,
                        family=args.family)
    result = run(config)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
