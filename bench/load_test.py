"""Load test: nothing lost under load, admission control that refuses fast without slowing the admitted.

    python -m bench.load_test                          # full size (200 requests at concurrency 64), a few minutes
    python -m bench.load_test --requests 40 --concurrency 16 --rounds 1 --no-overload   # quick

One ``proxy-serve`` subprocess on loopback (the tiny family by default; ``--family bench`` for the ~86M one).

**Load.** ``--rounds`` rounds of ``--requests`` streaming requests, ``--concurrency`` at a time, with random
endpoints (completions / chat), models (proxy-tuned, ``:base``, ``:expert``), prompt lengths, ``max_tokens``,
``n``, sampling parameters, stop strings, stop token ids, ``logit_bias`` and ``alpha``; a quarter of the
clients (``--disconnect``) leave mid-stream. Every request asks for logprobs, so that each generated token is
counted. Afterwards:

- every completed request got, per choice, exactly its ``max_tokens`` (``length``) or a real stop (``stop``:
  its text ends with one of its stop strings, or its last token is an end-of-sequence or stop token), one
  ``finish_reason`` per choice, ``usage.completion_tokens`` equal to the tokens counted, and ``[DONE]``;
- no stream stalled (no gap between events longer than ``--stall-s``) or ended without ``[DONE]``;
- the engine's running, prefilling and waiting counts go back to zero (``/metrics``);
- the server's resident memory (``/proc/<pid>/status`` VmRSS) comes back near its level after a warm-up
  round.

**Overload.** A second server with a small batch and queue (``--overload-slots``, ``--overload-queue``): the
batch and the queue are filled with steady streams, then a burst of ``--burst`` requests arrives at once
from another process. Every one of the burst must be refused (429 with ``Retry-After``), and the steady
streams must complete with all their tokens; their inter-token latency (client-side, and from the
server's own histogram) is compared with a control run without a burst, and the refusals' latency with a
burst of ``GET /health`` (what any request costs this machine's HTTP stack in such a burst).

Writes ``bench/results/load.json`` and ``load.md``; exit status 1 if any check failed. The machine is shared
and noisy: read the latencies as ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import ROOT, ServerProcess, free_port, percentile, proxy_serve_flags, server_env

RESULTS = ROOT / "bench" / "results"
MODEL = "proxy-tuned"
WORDS = ("the quick brown fox jumps over lazy dog Paris is capital of France proxy tuning steers a large model "
         "with small tuned expert question what two plus answer four hello there how can I help you today "
         "numbers one ten hundred and café naïve déjà vu Tokyo emoji").split()  # noqa: SIM905
STOP_STRINGS = ["e", " the", ".", "\n", "an", "ou", "!"]


# ------------------------------------------------------------------------------------------- the server
def start_server(family, *, threads: int, extra: list[str], log_dir: Path, name: str) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "server", *proxy_serve_flags(family, port), *extra]
    return ServerProcess(name=name, command=command, env=server_env(threads), port=port,
                         log_path=log_dir / f"{name}.log").start(timeout_s=180)


def engine_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts = {}
    for name in ("running", "prefilling", "waiting"):
        match = re.search(rf"^proxy_serve_num_requests_{name} (\S+)$", text, re.MULTILINE)
        counts[name] = float(match.group(1)) if match else float("nan")
    return counts


def request_statuses(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    totals: dict[str, float] = {}
    pattern = r'^proxy_serve_requests_total\{[^}]*status="([^"]+)"\} (\S+)$'
    for status, value in re.findall(pattern, text, re.MULTILINE):
        totals[status] = totals.get(status, 0) + float(value)
    return totals


def wait_idle(url: str, limit_s: float = 120) -> tuple[dict[str, float], float]:
    """The engine's counts once all are zero (or at the limit), and how long that took."""
    start = time.monotonic()
    counts = engine_counts(url)
    while any(counts.values()) and time.monotonic() - start < limit_s:
        time.sleep(0.1)
        counts = engine_counts(url)
    return counts, time.monotonic() - start


def stop_token_texts(family) -> tuple[set[str], Any]:
    """What the logprobs ``token`` of an end-of-sequence token looks like (``tokenizer.decode([id])``), and the
    base tokenizer (for the texts of a request's stop token ids)."""
    from transformers import AutoTokenizer, GenerationConfig

    texts: set[str] = set()
    base = None
    for path in (family.base, family.expert, family.anti_expert):
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = base or tokenizer
        ids = {tokenizer.eos_token_id}
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
            ids |= set(eos) if isinstance(eos, list) else {eos}
        except OSError:
            pass
        texts |= {tokenizer.decode([i]) for i in ids if i is not None}
    return texts, base


# ------------------------------------------------------------------------------------------ the requests
@dataclass
class Plan:
    index: int
    path: str
    body: dict[str, Any]
    disconnect_after: int | None  # leave after this many data events (None: read to the end)
    stop_id_texts: set[str] = field(default_factory=set)  # the logprobs texts of its stop_token_ids

    @property
    def max_tokens(self) -> int:
        return self.body["max_tokens"]


def make_plans(count: int, rng: random.Random, *, max_tokens: int, disconnect: float, tokenizer: Any,
               start: int = 0) -> list[Plan]:
    vocab = len(tokenizer)
    leavers = set(rng.sample(range(count), round(count * disconnect)))
    plans = []
    for i in range(count):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        roll = rng.random()
        budget = rng.randint(1, 8) if roll < 0.2 else rng.randint(8, 48) if roll < 0.7 else rng.randint(48, max_tokens)
        budget = min(budget, max_tokens)
        body: dict[str, Any] = {
            "model": rng.choices([MODEL, f"{MODEL}:base", f"{MODEL}:expert"], [0.7, 0.15, 0.15])[0],
            "max_tokens": budget,
            "n": rng.choices([1, 2, 3], [0.85, 0.1, 0.05])[0],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0 if rng.random() < 0.25 else round(rng.uniform(0.3, 1.5), 2),
            "ignore_eos": rng.random() < 0.5,
        }
        if rng.random() < 0.3:
            body["top_p"] = round(rng.uniform(0.7, 1.0), 2)
        if rng.random() < 0.3:
            body["top_k"] = rng.choice([0, 5, 40])
        if rng.random() < 0.1:
            body["min_p"] = 0.05
        if rng.random() < 0.2:
            body["presence_penalty"] = round(rng.uniform(-1, 1), 2)
            body["frequency_penalty"] = round(rng.uniform(-1, 1), 2)
        if rng.random() < 0.1:
            body["repetition_penalty"] = round(rng.uniform(0.8, 1.3), 2)
        if rng.random() < 0.5:
            body["seed"] = rng.randrange(2**31)
        if rng.random() < 0.15:
            body["logit_bias"] = {str(rng.randrange(vocab)): rng.choice([-5, 5]) for _ in range(3)}
        if rng.random() < 0.3 and body["model"] == MODEL:
            body["alpha"] = rng.choice([0, 0.5, 1.5, 2.0])
        if rng.random() < 0.2:
            body["stop"] = rng.sample(STOP_STRINGS, rng.randint(1, 2))
            body["include_stop_str_in_output"] = True  # so that a stop can be seen in the text
        if rng.random() < 0.1:
            body["stop_token_ids"] = [rng.randrange(vocab)]
        if rng.random() < 0.1:
            body["min_tokens"] = rng.randint(0, budget)
        if rng.random() < 0.5:
            path = "/v1/chat/completions"
            messages = [{"role": "user", "content": words}]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": "Answer briefly."})
            body["messages"] = messages
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 2)
        else:
            path = "/v1/completions"
            body["prompt"] = words
            body["logprobs"] = rng.randint(0, 2)
        leave = rng.randint(1, max(1, budget // 2)) if i in leavers else None
        id_texts = {tokenizer.decode([t]) for t in body.get("stop_token_ids", [])}
        plans.append(Plan(start + i, path, body, leave, id_texts))
    return plans


@dataclass
class Outcome:
    index: int
    status: int | None = None
    disconnected: bool = False
    done: bool = False
    stalled: bool = False
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    tokens: int = 0  # counted from logprobs (every choice)
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between successive token-bearing events of a choice
    longest_gap_s: float = 0.0


def _token_entries(choice: dict) -> tuple[int, str | None]:
    logprobs = choice.get("logprobs") or {}
    entries = logprobs.get("content") if "content" in logprobs else logprobs.get("tokens")
    entries = entries or []
    last = entries[-1] if entries else None
    if isinstance(last, dict):
        last = last.get("token")
    return len(entries), last


def check_completed(plan: Plan, events: list[Any], stop_texts: set[str], outcome: Outcome) -> None:
    """Everything a finished stream must satisfy (see the module docstring)."""
    body, problems = plan.body, outcome.problems
    if not events or events[-1] != "[DONE]":
        problems.append("no [DONE]")
        return
    chunks = events[:-1]
    if any("error" in e for e in chunks):
        problems.append(f"error event: {next(e for e in chunks if 'error' in e)}")
        return
    n = body.get("n", 1)
    tokens = {i: 0 for i in range(n)}
    last = {i: None for i in range(n)}
    text = {i: "" for i in range(n)}
    finishes: dict[int, list[str]] = {i: [] for i in range(n)}
    roles: dict[int, bool] = {}
    usage = None
    for event in chunks:
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            i = choice["index"]
            if "delta" in choice:
                if choice["delta"].get("role") == "assistant":
                    roles[i] = True
                text[i] += choice["delta"].get("content") or ""
            else:
                text[i] += choice.get("text") or ""
            count, final = _token_entries(choice)
            if count:
                if finishes[i]:
                    problems.append(f"choice {i}: tokens after its finish_reason")
                tokens[i] += count
                last[i] = final
            if choice.get("finish_reason") is not None:
                finishes[i].append(choice["finish_reason"])
    stops = set(body.get("stop") or [])
    for i in range(n):
        if len(finishes[i]) != 1:
            problems.append(f"choice {i}: finish_reason {finishes[i]} (want exactly one)")
            continue
        reason = finishes[i][0]
        if reason == "length":
            if tokens[i] != plan.max_tokens:
                problems.append(f"choice {i}: length after {tokens[i]} tokens, max_tokens {plan.max_tokens}")
        elif reason == "stop":
            by_string = any(text[i].endswith(s) for s in stops)
            by_token = last[i] in stop_texts or last[i] in plan.stop_id_texts
            if tokens[i] > plan.max_tokens or not (by_string or by_token):
                problems.append(f"choice {i}: stop after {tokens[i]} tokens that is no real stop "
                                f"(text ends {text[i][-12:]!r}, last token {last[i]!r})")
            elif not by_string and body.get("min_tokens") and tokens[i] < body["min_tokens"]:
                # min_tokens bans end-of-sequence and stop tokens; this engine still honours stop strings
                # before it (vLLM does not check them until min_tokens).
                problems.append(f"choice {i}: stop token after {tokens[i]} < min_tokens {body['min_tokens']}")
        else:
            problems.append(f"choice {i}: finish_reason {reason!r}")
    if plan.path.endswith("chat/completions") and len(roles) != n:
        problems.append("a chat choice had no role-first chunk")
    if usage is None:
        problems.append("no usage chunk")
    elif usage["completion_tokens"] != sum(tokens.values()) or usage["prompt_tokens"] <= 0:
        problems.append(f"usage {usage} but {sum(tokens.values())} tokens counted")
    outcome.tokens = sum(tokens.values())


async def run_one(client: httpx.AsyncClient, plan: Plan, stop_texts: set[str], stall_s: float) -> Outcome:
    outcome = Outcome(plan.index)
    start = time.perf_counter()
    events: list[Any] = []
    last_event = start
    last_token_at: dict[int, float] = {}
    try:
        async with client.stream("POST", plan.path, json=plan.body,
                                 timeout=httpx.Timeout(30, read=stall_s)) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                outcome.error = f"{response.status_code}: {response.text[:200]}"
                return outcome
            data_events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                outcome.longest_gap_s = max(outcome.longest_gap_s, now - last_event)
                last_event = now
                payload = line[6:]
                event = payload if payload == "[DONE]" else json.loads(payload)
                events.append(event)
                data_events += 1
                if isinstance(event, dict):
                    for choice in event.get("choices", []):
                        count, _ = _token_entries(choice)
                        if count:
                            i = choice["index"]
                            if outcome.ttft_s is None:
                                outcome.ttft_s = now - start
                            if i in last_token_at:
                                outcome.gaps_s.append((now - last_token_at[i]) / count)
                            last_token_at[i] = now
                            outcome.tokens += count
                if plan.disconnect_after is not None and data_events >= plan.disconnect_after:
                    outcome.disconnected = True
                    return outcome  # leaving the block closes the connection mid-stream
    except httpx.ReadTimeout:
        outcome.stalled = True
        outcome.problems.append(f"stalled: no event for {stall_s}s")
        return outcome
    except httpx.HTTPError as error:
        outcome.error = f"{type(error).__name__}: {error}"
        return outcome
    outcome.done = bool(events) and events[-1] == "[DONE]"
    check_completed(plan, events, stop_texts, outcome)
    return outcome


async def run_round(url: str, plans: list[Plan], concurrency: int, stop_texts: set[str], stall_s: float,
                    limit_s: float) -> tuple[list[Outcome], float]:
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        async def one(plan: Plan) -> Outcome:
            async with semaphore:
                return await run_one(client, plan, stop_texts, stall_s)

        start = time.perf_counter()
        outcomes = await asyncio.wait_for(asyncio.gather(*(one(p) for p in plans)), timeout=limit_s)
        return list(outcomes), time.perf_counter() - start


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def quantiles(values: list[float]) -> dict[str, float | None]:
    return {"p50": ms(percentile(values, 50)), "p95": ms(percentile(values, 95)), "max": ms(max(values, default=None))}


def summarize_round(plans: list[Plan], outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    completed = [o for o in outcomes if not o.disconnected]
    gaps = [g for o in outcomes for g in o.gaps_s]
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    failures = [(o.index, o.error or "; ".join(o.problems)) for o in outcomes if o.error or o.problems]
    tokens = sum(o.tokens for o in outcomes)
    return {
        "requests": len(plans),
        "completed": len(completed),
        "disconnected": sum(o.disconnected for o in outcomes),
        "completed_ok": sum(1 for o in completed if o.done and not o.problems and not o.error),
        "stalled": sum(o.stalled for o in outcomes),
        "without_done": sum(1 for o in completed if not o.done),
        "failures": len(failures),
        "failure_examples": failures[:10],
        "choices": sum(p.body.get("n", 1) for p in plans),
        "tokens_received": tokens,
        "wall_s": round(wall_s, 2),
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s else None,
        "ttft_ms": quantiles(ttfts),
        "itl_ms": quantiles(gaps),
        "longest_event_gap_ms": ms(max((o.longest_gap_s for o in outcomes), default=None)),
    }


# ----------------------------------------------------------------------------------------------- overload
def histogram(url: str, name: str) -> dict[float, float]:
    """A Prometheus histogram's cumulative bucket counts, ``{le: count}``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    pattern = rf'^proxy_serve_{name}_bucket{{le="([^"]+)"}} (\S+)$'
    return {float(le): float(count) for le, count in re.findall(pattern, text, re.MULTILINE)}


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` of what was observed between two scrapes."""
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0
    if not total:
        return None
    for le, count in delta:
        if count >= q * total:
            return le
    return None


async def burst_requests(url: str, count: int, path: str) -> list[tuple[int, float, str | None]]:
    """``count`` requests at once: (status, seconds, Retry-After) each. Run in its own process (``--burst-url``)
    so that the client's work does not stall the steady streams' reads. ``/health`` (a GET) is the baseline:
    what any request costs this machine's HTTP stack in such a burst."""
    limits = httpx.Limits(max_connections=count + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def one(i: int) -> tuple[int, float, str | None]:
            start = time.perf_counter()
            if path == "/health":
                response = await client.get(path)
            else:
                response = await client.post(path, json={"model": MODEL, "prompt": f"burst {i}", "max_tokens": 4})
            return response.status_code, time.perf_counter() - start, response.headers.get("retry-after")

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def overload(url: str, *, slots: int, queue: int, burst: int, tokens: int, stall_s: float,
                   burst_path: str | None) -> dict[str, Any]:
    """Fill the batch and the queue with steady streams; optionally fire a burst at ``burst_path`` (at
    ``/v1/completions`` every one must be refused)."""
    with_burst = burst_path is not None
    steady = [Plan(i, "/v1/completions", {"model": MODEL, "prompt": f"steady stream {i}", "max_tokens": tokens,
                                          "ignore_eos": True, "stream": True, "logprobs": 0, "temperature": 0.0,
                                          "stream_options": {"include_usage": True}}, None)
              for i in range(slots + queue)]
    if with_burst:  # the burst client, started (imports and all) before the steady streams, waits for "go"
        burster = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.load_test", "--burst-url", url, "--burst", str(burst), "--burst-path",
            burst_path,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT)
        assert (await burster.stdout.readline()).strip() == b"ready"
    itl_before = histogram(url, "inter_token_latency_seconds")
    limits = httpx.Limits(max_connections=slots + queue + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(30, read=stall_s)) as client:
        running = [asyncio.create_task(run_one(client, p, set(), stall_s)) for p in steady]
        refusals: list[tuple[int, float, str | None]] = []
        if with_burst:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the batch and the queue are full
                counts = engine_counts(url)
                if counts["running"] + counts["prefilling"] + counts["waiting"] >= slots + queue:
                    break
                await asyncio.sleep(0.02)
            out, _ = await burster.communicate(b"go\n")
            refusals = [tuple(r) for r in json.loads(out)]
        outcomes = await asyncio.gather(*running)
    itl_after = histogram(url, "inter_token_latency_seconds")
    steady_ok = sum(1 for o in outcomes if o.done and not o.problems and o.tokens == tokens)
    gaps = [g for o in outcomes for g in o.gaps_s]
    result = {
        "steady_streams": len(steady),
        "steady_complete_with_all_tokens": steady_ok,
        "steady_itl_ms": {"p50": ms(percentile(gaps, 50)), "p95": ms(percentile(gaps, 95)),
                          "max": ms(max(gaps, default=None))},
        # The server's own inter-token histogram over the run (only the steady streams make tokens): the
        # upper bound of the bucket holding each quantile.
        "server_itl_bucket_ms": {f"p{q}": ms(histogram_quantile(itl_before, itl_after, q / 100))
                                 for q in (50, 95, 99)},
    }
    if with_burst:
        latencies = [t for _, t, _ in refusals]
        result.update({
            "burst": burst,
            "burst_path": burst_path,
            "refused_429": sum(1 for s, _, r in refusals if s == 429 and r and int(r) >= 1),
            "statuses": sorted({s for s, _, _ in refusals}),
            "refusal_ms": {"p50": ms(percentile(latencies, 50)), "p99": ms(percentile(latencies, 99)),
                           "max": ms(max(latencies, default=None))},
        })
    return result


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class LoadConfig:
    requests: int = 200
    concurrency: int = 64
    disconnect: float = 0.25
    max_tokens: int = 128
    rounds: int = 2
    warmup: int = 64  # one full wave at the default concurrency: the memory reference is then the working size
    seed: int = 0
    family: str = "tiny"
    threads: int = 1
    max_num_seqs: int = 32
    stall_s: float = 60.0
    round_limit_s: float = 900.0
    overload: bool = True
    overload_slots: int = 8
    overload_queue: int = 8
    burst: int = 200
    overload_tokens: int = 384  # long enough for the steady streams to outlast the burst
    rss_slack_mb: float = 64.0  # how far above the warmed-up level the memory may end


def build_family(name: str, cache: Path):
    if name == "bench":
        from bench.family import build_bench_family

        return build_bench_family()
    from proxy_engine.families import build_family as tiny

    return tiny(cache / "tiny-family")


def run(config: LoadConfig, *, family=None, log_dir: Path | None = None) -> dict[str, Any]:
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="proxy-load-"))
    family = family or build_family(config.family, Path(tempfile.gettempdir()) / "proxy-serve-load")
    stop_texts, tokenizer = stop_token_texts(family)
    rng = random.Random(config.seed)
    result: dict[str, Any] = {"config": asdict(config), "checks": {}}

    server = start_server(family, threads=config.threads, log_dir=log_dir, name="load",
                          extra=["--max-num-seqs", str(config.max_num_seqs)])
    try:
        memory: dict[str, Any] = {"start_mb": round(server.rss_mb(), 1)}
        peak = [server.rss_mb()]

        async def sampled(coro):
            async def sample() -> None:
                while True:
                    peak[0] = max(peak[0], server.rss_mb())
                    await asyncio.sleep(0.1)

            sampler = asyncio.create_task(sample())
            try:
                return await coro
            finally:
                sampler.cancel()

        if config.warmup:
            warm = make_plans(config.warmup, rng, max_tokens=config.max_tokens, disconnect=config.disconnect,
                              tokenizer=tokenizer, start=-config.warmup)
            # At the rounds' own concurrency: a smaller warm-up leaves the batch's larger buffers to the first
            # round, which then reads as growth though the allocator only reached its working size.
            asyncio.run(sampled(run_round(server.url, warm, config.concurrency, stop_texts,
                                          config.stall_s, config.round_limit_s)))
            wait_idle(server.url)
        memory["after_warmup_mb"] = round(server.rss_mb(), 1)
        rounds = []
        for index in range(config.rounds):
            plans = make_plans(config.requests, rng, max_tokens=config.max_tokens, disconnect=config.disconnect,
                               tokenizer=tokenizer, start=index * config.requests)
            outcomes, wall = asyncio.run(sampled(run_round(server.url, plans, config.concurrency, stop_texts,
                                                           config.stall_s, config.round_limit_s)))
            summary = summarize_round(plans, outcomes, wall)
            counts, idle_s = wait_idle(server.url)
            summary["engine_after"] = counts
            summary["seconds_to_idle"] = round(idle_s, 2)
            summary["rss_after_mb"] = round(server.rss_mb(), 1)
            rounds.append(summary)
        memory["peak_mb"] = round(peak[0], 1)
        memory["end_mb"] = round(server.rss_mb(), 1)
        memory["growth_after_warmup_mb"] = round(memory["end_mb"] - memory["after_warmup_mb"], 1)
        # A leak grows with every round; the allocator's high-water mark does not. With two rounds or more, the
        # check is against the end of the first (steady) round, else against the warm-up.
        memory["reference"] = "first round" if len(rounds) > 1 else "warm-up"
        reference_mb = rounds[0]["rss_after_mb"] if len(rounds) > 1 else memory["after_warmup_mb"]
        memory["growth_mb"] = round(memory["end_mb"] - reference_mb, 1)
        result["rounds"] = rounds
        result["memory"] = memory
        result["server_requests_total"] = request_statuses(server.url)
    finally:
        result["exit_status_after_sigterm"] = server.stop()

    checks = result["checks"]
    checks["every completed request exact (tokens, finish, usage, [DONE])"] = all(
        r["completed_ok"] == r["completed"] for r in rounds)
    checks["no stalled stream, none without [DONE]"] = all(
        r["stalled"] == 0 and r["without_done"] == 0 for r in rounds)
    checks["no failed request"] = all(r["failures"] == 0 for r in rounds)
    checks["engine back to zero running/prefilling/waiting"] = all(
        not any(r["engine_after"].values()) for r in rounds)
    checks[f"memory back within {config.rss_slack_mb:g} MB of the level after the {memory['reference']}"] = (
        memory["growth_mb"] <= config.rss_slack_mb)
    checks["server exited 0 on SIGTERM"] = result["exit_status_after_sigterm"] == 0

    if config.overload:
        server = start_server(family, threads=config.threads, log_dir=log_dir, name="overload", extra=[
            "--max-num-seqs", str(config.overload_slots), "--max-waiting", str(config.overload_queue)])
        try:
            args = dict(slots=config.overload_slots, queue=config.overload_queue, burst=config.burst,
                        tokens=config.overload_tokens, stall_s=config.stall_s)
            control = asyncio.run(overload(server.url, burst_path=None, **args))
            wait_idle(server.url)
            burst = asyncio.run(overload(server.url, burst_path="/v1/completions", **args))
            wait_idle(server.url)
            health = asyncio.run(overload(server.url, burst_path="/health", **args))
            counts, _ = wait_idle(server.url)
            result["overload"] = {"control": control, "with_burst": burst, "health_burst": health,
                                  "engine_after": counts}
        finally:
            server.stop()
        steady = config.overload_slots + config.overload_queue
        checks["burst refused with 429 + Retry-After, every one"] = burst["refused_429"] == config.burst
        checks["admitted streams complete with all tokens during the burst"] = (
            burst["steady_complete_with_all_tokens"] == steady and control["steady_complete_with_all_tokens"] == steady)
    result["ok"] = all(checks.values())
    return result


def write_report(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    config, memory = result["config"], result["memory"]
    lines = [
        "# Load test (`python -m bench.load_test`)",
        "",
        f"{config['requests']} streaming requests x {config['rounds']} rounds at concurrency {config['concurrency']}, "
        f"{config['disconnect']:.0%} of clients leaving mid-stream, random endpoints / models / lengths "
        f"(max_tokens up to {config['max_tokens']}) / sampling; {config['family']} family, server "
        f"`--max-num-seqs {config['max_num_seqs']}`, {config['threads']} torch thread(s). Shared, noisy machine: "
        "latencies are indicative.",
        "",
        "| round | requests | completed (exact) | disconnected | stalled | failures | tokens | wall s | tok/s "
        "| TTFT p50 / p95 ms | ITL p50 / p95 / max ms | engine after | s to idle | RSS after MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["rounds"]):
        engine = ", ".join(f"{k} {v:g}" for k, v in r["engine_after"].items())
        lines.append(
            f"| {i + 1} | {r['requests']} | {r['completed']} ({r['completed_ok']}) | {r['disconnected']} | "
            f"{r['stalled']} | {r['failures']} | {r['tokens_received']} | {r['wall_s']} | {r['tokens_per_s']} | "
            f"{r['ttft_ms']['p50']} / {r['ttft_ms']['p95']} | {r['itl_ms']['p50']} / {r['itl_ms']['p95']} / "
            f"{r['itl_ms']['max']} | {engine} | {r['seconds_to_idle']} | {r['rss_after_mb']} |")
    lines += [
        "",
        f"Server RSS: {memory['start_mb']} MB at start, {memory['after_warmup_mb']} MB after a warm-up round, "
        f"peak {memory['peak_mb']} MB, {memory['end_mb']} MB at the end "
        f"({memory['growth_after_warmup_mb']:+} MB against the warmed-up level, "
        f"{memory['growth_mb']:+} MB against the level after the {memory['reference']}).",
        f"Server's own count of requests by status: {result['server_requests_total']}. "
        f"Exit status after SIGTERM: {result['exit_status_after_sigterm']}.",
    ]
    if "overload" in result:
        o = result["overload"]
        c, b = o["control"], o["with_burst"]
        lines += [
            "",
            f"## Overload (`--max-num-seqs {config['overload_slots']} --max-waiting {config['overload_queue']}`)",
            "",
            f"{c['steady_streams']} steady streams ({config['overload_tokens']} tokens each) fill the batch and the "
            f"queue; then {b['burst']} more requests arrive at once: completions, which must all be refused, or, "
            "as a baseline for what any request costs in such a burst here, `GET /health`.",
            "",
            "| run | steady streams complete (all tokens) | steady ITL p50 / p95 / max ms (client) | "
            "ITL p50 / p95 / p99 bucket ms (server) | refused 429 | burst latency p50 / p99 / max ms |",
            "|---|---|---|---|---|---|",
        ]
        runs = (("control (no burst)", c), ("burst of completions (refused)", b),
                ("burst of GET /health (baseline)", o["health_burst"]))
        for label, run_ in runs:
            itl, server_itl = run_["steady_itl_ms"], run_["server_itl_bucket_ms"]
            refused = f"{run_['refused_429']} / {run_['burst']}" if run_.get("burst_path") == "/v1/completions" else (
                f"- (statuses {run_['statuses']})" if "burst" in run_ else "-")
            refusal = ("{p50} / {p99} / {max}".format(**run_["refusal_ms"]) if "burst" in run_ else "-")
            lines.append(
                f"| {label} | {run_['steady_complete_with_all_tokens']} / {run_['steady_streams']} | "
                f"{itl['p50']} / {itl['p95']} / {itl['max']} | "
                f"<= {server_itl['p50']} / <= {server_itl['p95']} / <= {server_itl['p99']} | {refused} | {refusal} |")
        lines += [
            "",
            "The burst comes from a separate client process; client-side latencies include this machine's CPU "
            "contention (server, steady client and burst client share 2 cores). The server-side column is read "
            "from the server's `inter_token_latency_seconds` histogram (bucket upper bounds).",
        ]
    lines += ["", "## Checks", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in result["checks"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = LoadConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=RESULTS / "load")
    parser.add_argument("--burst-url", help=argparse.SUPPRESS)  # internal: be the overload's burst client
    parser.add_argument("--burst-path", default="/v1/completions", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.burst_url:
        print("ready", flush=True)
        sys.stdin.readline()
        print(json.dumps(asyncio.run(burst_requests(args.burst_url, args.burst, args.burst_path))))
        return 0
    config = LoadConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    result = run(config)
    write_report(result, args.out)
    print(args.out.with_suffix(".md").read_text())
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
