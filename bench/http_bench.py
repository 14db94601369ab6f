"""HTTP benchmark: streaming clients against ``proxy-serve`` and ``transformers serve --continuous-batching``.

    python -m bench.http_bench                      # bench family, concurrency 1 4 16 64 (several minutes)
    python -m bench.http_bench --quick              # tiny family, concurrency 1 and 4, no peer (tests)
    python -m bench.http_bench --levels 1 16 --max-tokens 64 --threads 2
    python -m bench.http_bench --family real --servers base llama --levels 1 --ref main   # make bench-llama

In one run, on one model family, with the same prompts, max_tokens, greedy decoding and EOS ignored:

- ``proxy``: ``proxy-serve`` (a subprocess on loopback) serving the proxy-tuned model;
- ``base``: the same server, model ``proxy-tuned:base`` (the base alone; the small models do not run);
- ``peer``: ``transformers serve --continuous-batching`` (a subprocess) serving the base alone. It has no
  ``ignore_eos``; its ``generation_config`` request field replaces the model's, and one without an
  ``eos_token_id`` disables EOS (its continuous-batching manager logs "Setting to -1 (disabled)");
- ``llama``: llama.cpp's ``llama-server`` (``--llama-server``, built by the user) on an F32 GGUF of the same
  base (``--llama-gguf``: ``convert_hf_to_gguf.py --outtype f32`` of the family's base directory), greedy,
  ``ignore_eos``, its own thread count unless ``--threads``; ratio ``base / llama`` (issue 18: >= 0.7x at 1
  stream on the real SmolLM2-135M, ``--family real``);
- ``floor``: the engine floor, a tight KV-cached loop of the three models (``engine_bench.floor_loop``),
  no server, batch = concurrency, decode only.

Each level runs ``concurrency`` closed-loop clients (httpx async, SSE), each sending ``rounds`` requests one
after another. Reported per server and level: aggregate tokens/s (usage ``completion_tokens`` summed, over the
level's wall time), decode tokens/s per stream, time to first token and inter-token latency p50/p99, errors,
stalled streams (no event for ``--stall-s``, or a stream that ended without ``[DONE]``), and the server's
resident memory (``/proc/<pid>/status`` VmRSS, sampled every 50 ms): at the level's start, its peak in the
first and second half of the level, and at its end. Ratios are what to read: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    ROOT,
    RssSampler,
    ServerProcess,
    cpu_seconds,
    free_port,
    percentile,
    proxy_serve_flags,
    rss_bytes,
    server_env,
)

VENV_BIN = Path(sys.executable).parent
PROMPT_TOKENS = 32


# --- servers ---------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Server(ServerProcess):
    """A server subprocess, with the model id its clients send and the extra fields of their request bodies."""

    model: str
    extra_body: dict[str, Any]


# --- clients ---------------------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    ok: bool
    tokens: int = 0
    start: float = 0.0
    first: float | None = None  # time of the first content event
    end: float = 0.0
    gaps: list[float] = field(default_factory=list)  # between consecutive content events
    stalled: bool = False
    error: str | None = None
    requested: int = 0  # the request's max_tokens
    events: int = 0  # content events: the token count of a server that sends no usage (one token per event)
    usage: bool = False  # the stream carried usage (its completion_tokens is then the count)


def _content(event: dict[str, Any]) -> bool:
    return any(c.get("text") for c in event.get("choices") or [])


async def one_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], stall_s: float) -> StreamResult:
    result = StreamResult(ok=False, start=time.perf_counter())
    last = None
    done = finished = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 timeout=httpx.Timeout(stall_s, connect=30)) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    return result
                now = time.perf_counter()
                if any(c.get("finish_reason") for c in event.get("choices") or []):
                    finished = True  # the peer ends here (it sends no [DONE])
                if _content(event):
                    result.events += 1
                    if result.first is None:
                        result.first = now
                    elif last is not None:
                        result.gaps.append(now - last)
                    last = now
                if event.get("usage"):
                    result.usage = True
                    result.tokens = int(event["usage"]["completion_tokens"])
    except httpx.ReadTimeout:
        result.stalled = True
        result.error = f"no event for {stall_s:g}s"
        return result
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    finally:
        result.end = time.perf_counter()
    if not (done or finished):
        result.stalled = True
        result.error = "the stream ended without [DONE] or a finish_reason"
        return result
    if not result.usage:
        # A server that sends no usage (transformers serve unless asked for it): the content events are the count,
        # one per token there (a token that ends mid-character merges into the next event: a lower bound).
        result.tokens = result.events
    result.ok = True
    return result


@dataclass
class Run:
    """One measurement: ``concurrency`` closed-loop clients against one target."""

    target: str
    concurrency: int
    streams: list[StreamResult]
    start: float
    end: float
    rss_start: int
    rss_end: int
    rss_peak: int
    cpu_s: float  # the server process's CPU time during the run

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_s if self.cpu_s > 0 else 0.0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.streams if r.ok)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.end - self.start)

    @property
    def requested(self) -> int:
        return sum(s.requested for s in self.streams)


class NoTokensError(RuntimeError):
    """A server answered a level without a single token: its figures would be meaningless (and its ratios a
    division by zero), so the run stops with a message naming it."""


def require_tokens(run: Run, log_path: Path | None = None) -> None:
    """Raise ``NoTokensError`` naming ``run``'s server when none of its streams produced a token."""
    if run.tokens > 0:
        return
    errors = sorted({s.error for s in run.streams if s.error})
    why = f"errors: {'; '.join(errors[:2])}" if errors else "its streams ended without content"
    where = f" (its log: {log_path})" if log_path else ""
    raise NoTokensError(f"{run.target} produced no tokens at {run.concurrency} stream(s), "
                        f"{len(run.streams)} request(s): {why}{where}")


def request_lengths(count: int, max_tokens: int, spread: float, seed: int = 1) -> list[int]:
    """Each request's max_tokens: ``max_tokens`` times a factor in ``[1 - spread, 1 + spread]``, the same list
    for every server. A spread makes streams finish (and new ones join) at different steps, as real traffic
    does, instead of in lockstep cohorts."""
    rng = random.Random(seed)
    return [max(1, round(max_tokens * (1 + spread * (2 * rng.random() - 1)))) for _ in range(count)]


async def run_level(server: Server, prompts: list[str], concurrency: int, rounds: int, lengths: list[int],
                    stall_s: float, sampler: RssSampler) -> Run:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    counter = iter(range(10**9))
    results: list[StreamResult] = []

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in range(rounds):
            i = next(counter)
            body = {"model": server.model, "prompt": prompts[i % len(prompts)], "max_tokens": lengths[i % len(lengths)],
                    "temperature": 0, "stream": True, **server.extra_body}
            result = await one_stream(client, server.url, body, stall_s)
            result.requested = body["max_tokens"]
            results.append(result)

    async with httpx.AsyncClient(limits=limits) as client:
        rss_start = rss_bytes(server.pid)
        cpu_start = cpu_seconds(server.pid)
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        end = time.perf_counter()
    cpu = cpu_seconds(server.pid) - cpu_start
    rss_end = rss_bytes(server.pid)
    peak = max(sampler.window(start, end) or [rss_end])
    return Run(server.name, concurrency, results, start, end, rss_start, rss_end, peak, cpu)


@dataclass
class LevelResult:
    """Every repeat of one target at one concurrency: throughput is the median over repeats, latencies are
    percentiles over every stream of every repeat."""

    server: str
    concurrency: int
    repeats: int
    requests: int
    tokens: int
    requested_tokens: int  # the requests' max_tokens summed (EOS ignored: tokens should equal it)
    tokens_per_s: float  # median over repeats
    tokens_per_s_runs: list[float]
    tokens_per_cpu_s: float  # median over repeats: tokens per CPU-second of the server process
    decode_tokens_per_s: float | None  # per stream: (tokens - 1) / (end - first token), median
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    errors: int
    stalled: int
    rss_start_mb: float  # the server process, before the first repeat
    rss_peak_first_mb: float  # peak during the first repeat
    rss_peak_last_mb: float  # peak during the last repeat
    rss_end_mb: float  # after the last repeat
    error_samples: list[str] = field(default_factory=list)


def summarize(runs: list[Run]) -> LevelResult:
    streams = [s for run in runs for s in run.streams]
    ok = [s for s in streams if s.ok]
    ttft = [(s.first - s.start) * 1000 for s in ok if s.first is not None]
    gaps = [g * 1000 for s in ok for g in s.gaps]
    decode = [(s.tokens - 1) / (s.end - s.first) for s in ok
              if s.first is not None and s.tokens > 1 and s.end > s.first]
    mb = 1 / 2**20
    return LevelResult(
        server=runs[0].target, concurrency=runs[0].concurrency, repeats=len(runs), requests=len(streams),
        tokens=sum(run.tokens for run in runs), requested_tokens=sum(run.requested for run in runs),
        tokens_per_s=statistics.median(r.tokens_per_s for r in runs),
        tokens_per_s_runs=[round(r.tokens_per_s, 2) for r in runs],
        tokens_per_cpu_s=statistics.median(r.tokens_per_cpu_s for r in runs),
        decode_tokens_per_s=statistics.median(decode) if decode else None,
        ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
        itl_p50_ms=percentile(gaps, 50), itl_p99_ms=percentile(gaps, 99),
        errors=sum(1 for s in streams if not s.ok), stalled=sum(1 for s in streams if s.stalled),
        rss_start_mb=runs[0].rss_start * mb, rss_peak_first_mb=runs[0].rss_peak * mb,
        rss_peak_last_mb=runs[-1].rss_peak * mb, rss_end_mb=runs[-1].rss_end * mb,
        error_samples=sorted({s.error for s in streams if s.error})[:3],
    )


async def warm_up(server: Server, prompts: list[str], stall_s: float) -> None:
    """Two short concurrent requests: loads lazily built state (the peer's batch processor, caches)."""
    async with httpx.AsyncClient() as client:
        bodies = [{"model": server.model, "prompt": p, "max_tokens": 8, "temperature": 0, "stream": True,
                   **server.extra_body} for p in prompts[:2]]
        results = await asyncio.gather(*(one_stream(client, server.url, b, stall_s) for b in bodies))
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{server.name} failed its warm-up: {failed[0]}")


# --- the run ---------------------------------------------------------------------------------------------------
def make_prompts(tokenizer, count: int, seed: int = 0) -> list[str]:
    """Random-token texts (random weights rarely emit EOS after them); the same for every server."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    return [tokenizer.decode([rng.choice(ids) for _ in range(PROMPT_TOKENS)]).strip() for _ in range(count)]


def proxy_server(family, args, log_dir: Path, model: str, name: str, source: Path | None = None) -> Server:
    """``proxy-serve`` on the family; ``source``: run the code of another checkout (``--ref``) instead."""
    port = free_port()
    flags = [*proxy_serve_flags(family, port), "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", "1024"]
    env = server_env(args.threads)
    if source is None:
        command = [str(VENV_BIN / "proxy-serve"), *flags]
    else:
        command = [sys.executable, "-m", "server", *flags]
        env["PYTHONPATH"] = str(source)
    body = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    return Server(name=name, command=command, model=model, extra_body=body, env=env, port=port,
                  log_path=log_dir / f"{name}.log", cwd=source or ROOT)


def checkout(ref: str, root: Path) -> Path:
    """The tree of git ``ref`` extracted under ``root`` (``git archive``: the repository is not touched)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    target = root / f"proxy-serve-{sha}"
    if not (target / "server" / "__main__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def peer_server(family, args, log_dir: Path) -> Server:
    port = free_port()
    command = [
        str(VENV_BIN / "transformers"), "serve", str(family.base), "--continuous-batching", "--device", "cpu",
        "--dtype", "float32", "--attn-implementation", "sdpa", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning",
    ]
    # No ignore_eos: a generation_config without eos_token_id disables EOS; max_tokens still sets the length.
    # Usage only when asked for (5.25); without it the content events are counted (one_stream).
    body = {"generation_config": json.dumps({"do_sample": False}), "stream_options": {"include_usage": True}}
    return Server(name="peer", command=command, model=str(family.base), extra_body=body, env=server_env(args.threads),
                  port=port, log_path=log_dir / "peer.log")


def llama_server(args, log_dir: Path) -> Server:
    """llama.cpp's ``llama-server`` on ``args.llama_gguf``: as many parallel slots as the largest level, each with
    the context our server gives a request here (prompt + max_tokens, rounded up), no web UI."""
    port = free_port()
    levels = max(args.levels)
    per_slot = 256 * -(-(2 * PROMPT_TOKENS + int(args.max_tokens * (1 + args.spread))) // 256)
    command = [str(args.llama_server), "-m", str(args.llama_gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(levels), "-c", str(levels * per_slot), "--no-webui"]
    if args.threads:
        command += ["-t", str(args.threads), "-tb", str(args.threads)]
    body = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    return Server(name="llama", command=command, model="llama", extra_body=body, env=server_env(args.threads),
                  port=port, log_path=log_dir / "llama.log")


class Floor:
    """The engine floor in this process (while the servers idle): ``floor_loop`` of the three models."""

    def __init__(self, family, threads: int | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from proxy_engine.cpu_tuning import cpu_threads

        # The servers' team size: --threads, else the engine's own policy (what proxy-serve uses).
        torch.set_num_threads(threads or cpu_threads() or torch.get_num_threads())
        paths = [family.base, family.expert, family.anti_expert]
        self.models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths]

    def measure(self, prompt_ids: list[list[int]], tokens: int) -> float:
        from bench.engine_bench import floor_loop

        width = min(len(i) for i in prompt_ids)
        return floor_loop(self.models, [i[:width] for i in prompt_ids], tokens)  # equal lengths: no padding


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(levels: list[LevelResult], floor: dict[int, list[float]], ratios: dict[str, float | None],
             meta: dict[str, Any]) -> str:
    lines = [
        f"family: {meta['family']}; prompts ~{PROMPT_TOKENS} tokens; max_tokens {meta['max_tokens']} "
        f"(x 1 ± {meta['spread']:g} per request, the same for every server); greedy, EOS "
        f"ignored; {meta['rounds']} request(s) per client; {meta['repeats']} interleaved repeats (tok/s: median); "
        f"threads {meta['threads'] or 'default'}; "
        f"load average {meta['load_before']} before, {meta['load_after']} after",
        "",
        "| server | streams | tok/s | tok per CPU-s | decode tok/s per stream | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | errors "
        "| stalled | RSS MB: start / peak 1st repeat / peak last repeat / end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in levels:
        lines.append(
            f"| {r.server} | {r.concurrency} | {r.tokens_per_s:.1f} | {r.tokens_per_cpu_s:.1f} | "
            f"{fmt(r.decode_tokens_per_s)} | "
            f"{fmt(r.ttft_p50_ms, 0)} / {fmt(r.ttft_p99_ms, 0)} | {fmt(r.itl_p50_ms, 0)} / {fmt(r.itl_p99_ms, 0)} | "
            f"{r.errors} | {r.stalled} | {r.rss_start_mb:.0f} / {r.rss_peak_first_mb:.0f} / "
            f"{r.rss_peak_last_mb:.0f} / {r.rss_end_mb:.0f} |"
        )
    for level, values in floor.items():
        lines.append(f"| floor (no server, decode only) | {level} | {statistics.median(values):.1f} | - | "
                     f"{statistics.median(values) / level:.1f} | - | - | - | - | - |")
    lines += ["", "| ratio (median of the repeats' paired ratios) | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f}x |" for name, value in ratios.items() if value is not None]
    return "\n".join(lines) + "\n"


def paired(runs: dict[tuple[str, int], list[Run]], a: tuple[str, int], b: tuple[str, int]) -> float | None:
    """Median over repeats of ``a``'s tokens/s over ``b``'s in the same repeat (side by side in time)."""
    x, y = runs.get(a), runs.get(b)
    values = [p.tokens_per_s / q.tokens_per_s for p, q in zip(x or [], y or []) if q.tokens_per_s]
    return statistics.median(values) if values else None


def paired_cpu(runs: dict[tuple[str, int], list[Run]], a: tuple[str, int], b: tuple[str, int]) -> float | None:
    x, y = runs.get(a), runs.get(b)
    values = [p.tokens_per_cpu_s / q.tokens_per_cpu_s for p, q in zip(x or [], y or []) if q.tokens_per_cpu_s]
    return statistics.median(values) if values else None


def compute_ratios(runs: dict[tuple[str, int], list[Run]], levels: dict[tuple[str, int], LevelResult],
                   floor: dict[int, list[float]]) -> dict[str, float | None]:
    ratios: dict[str, float | None] = {}
    for level in sorted({c for _, c in runs}):
        ratios[f"proxy / peer (base alone), {level} streams"] = paired(runs, ("proxy", level), ("peer", level))
        ratios[f"base / peer, {level} streams"] = paired(runs, ("base", level), ("peer", level))
        ratios[f"proxy / peer, {level} streams, tokens per CPU-second"] = paired_cpu(
            runs, ("proxy", level), ("peer", level))
        ratios[f"base / peer, {level} streams, tokens per CPU-second"] = paired_cpu(
            runs, ("base", level), ("peer", level))
        for name in sorted({n for n, _ in runs if n.startswith("base")}):
            ratios[f"{name} / llama, {level} streams"] = paired(runs, (name, level), ("llama", level))
            ratios[f"{name} / llama, {level} streams, tokens per CPU-second"] = paired_cpu(
                runs, (name, level), ("llama", level))
    refs = sorted({name.split("@", 1)[1] for name, _ in runs if "@" in name})
    for ref in refs:
        for level in sorted({c for _, c in runs}):
            for name in ("proxy", "base"):
                ratios[f"{name} / {name}@{ref}, {level} streams"] = paired(
                    runs, (name, level), (f"{name}@{ref}", level))
                ratios[f"{name} / {name}@{ref}, {level} streams, tokens per CPU-second"] = paired_cpu(
                    runs, (name, level), (f"{name}@{ref}", level))
    for level, values in sorted(floor.items()):
        proxy = runs.get(("proxy", level))
        if not proxy:
            continue
        ratios[f"proxy / floor, {level} streams (aggregate: with prefill and HTTP)"] = statistics.median(
            r.tokens_per_s / f for r, f in zip(proxy, values))
        if level == 1:
            rates = [[(s.tokens - 1) / (s.end - s.first) for s in r.streams if s.ok and s.first and s.tokens > 1]
                     for r in proxy]
            decode = [statistics.median(rate) / f for rate, f in zip(rates, values) if rate]
            if decode:
                ratios["proxy / floor, 1 stream (decode rate after the first token)"] = statistics.median(decode)
    for level in (16, 64):
        p, q = levels.get(("proxy", level)), levels.get(("peer", level))
        if p and q and p.ttft_p50_ms and q.ttft_p50_ms:
            ratios[f"TTFT p50 at {level}: proxy / peer (lower is better)"] = p.ttft_p50_ms / q.ttft_p50_ms
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny family, levels 1 4, 16 tokens, no peer, no floor")
    parser.add_argument("--family", choices=["bench", "tiny", "real"], default=None)
    parser.add_argument("--family-dir", type=Path, default=None)
    parser.add_argument("--levels", type=int, nargs="+", default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="requests per client, one after another")
    parser.add_argument("--spread", type=float, default=None,
                        help="each request's max_tokens is max_tokens x [1 - spread, 1 + spread] "
                             "(default 0: all equal, as the floor)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats of every measurement")
    parser.add_argument("--servers", nargs="+", default=None, choices=["proxy", "base", "peer", "llama"])
    parser.add_argument("--llama-server", type=Path, default=os.environ.get("LLAMA_SERVER"),
                        help="llama.cpp's llama-server binary, for --servers llama (default: $LLAMA_SERVER)")
    parser.add_argument("--llama-gguf", type=Path, default=os.environ.get("LLAMA_GGUF"),
                        help="F32 GGUF of the family's base, for --servers llama (default: $LLAMA_GGUF)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE,...",
                        help="also serve this code with these environment variables, measured as proxy@NAME and "
                             "base@NAME (e.g. passive2:OMP_NUM_THREADS=2,OMP_WAIT_POLICY=PASSIVE); repeatable")
    parser.add_argument("--ref", default=None,
                        help="also serve proxy and base from this git ref (named proxy@REF, base@REF): before/after "
                             "measured side by side")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--floor-max", type=int, default=16, help="measure the floor up to this batch size")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL threads for every server and the floor (default: each one's own choice)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--stall-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="http", help="output file stem")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the finally clauses stop the servers
    quick = args.quick
    args.family = args.family or ("tiny" if quick else "bench")
    args.levels = args.levels or ([1, 4] if quick else [1, 4, 16, 64])
    args.max_tokens = args.max_tokens or (16 if quick else 64)
    args.spread = 0.0 if args.spread is None else args.spread
    args.rounds = args.rounds or (1 if quick else 2)
    args.repeats = args.repeats or (1 if quick else 2)
    args.servers = args.servers or (["proxy", "base"] if quick else ["proxy", "base", "peer"])
    use_floor = not (args.no_floor or quick)
    if "llama" in args.servers and not (args.llama_server and args.llama_gguf):
        parser.error("--servers llama needs --llama-server and --llama-gguf (or $LLAMA_SERVER and $LLAMA_GGUF)")

    from transformers import AutoTokenizer

    from bench.family import family_paths

    family = family_paths(args.family, args.family_dir)
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    prompts = make_prompts(tokenizer, max(args.levels) * args.rounds)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    lengths = request_lengths(len(prompts), args.max_tokens, args.spread)
    load_before = os.getloadavg()[0]
    log_dir = args.out / "logs"

    processes: list[Server] = []
    targets: list[Server] = []
    if "proxy" in args.servers or "base" in args.servers:
        proxy = proxy_server(family, args, log_dir, "proxy-tuned", "proxy")
        processes.append(proxy)
        if "proxy" in args.servers:
            targets.append(proxy)
        if "base" in args.servers:
            targets.append(dataclasses.replace(proxy, name="base", model="proxy-tuned:base"))
    def alongside(suffix: str, source: Path | None = None, env: dict[str, str] | None = None) -> None:
        """Another proxy-serve, measured as proxy@SUFFIX and base@SUFFIX next to ours."""
        other = proxy_server(family, args, log_dir, "proxy-tuned", f"proxy@{suffix}", source)
        other.env.update(env or {})
        processes.append(other)
        if "proxy" in args.servers:
            targets.append(other)
        if "base" in args.servers:
            targets.append(dataclasses.replace(other, name=f"base@{suffix}", model="proxy-tuned:base"))

    if args.ref:
        alongside(args.ref, source=checkout(args.ref, Path(os.environ.get("TMPDIR", "/tmp"))))
    for spec in args.variant:
        name, _, assignments = spec.partition(":")
        alongside(name, env=dict(pair.split("=", 1) for pair in assignments.split(",") if pair))
    if "peer" in args.servers:
        peer = peer_server(family, args, log_dir)
        processes.append(peer)
        targets.append(peer)

    if "llama" in args.servers:
        llama = llama_server(args, log_dir)
        processes.append(llama)
        targets.append(llama)

    runs: dict[tuple[str, int], list[Run]] = {}
    floor: dict[int, list[float]] = {}
    samplers: dict[int, RssSampler] = {}
    try:
        for process in processes:  # every server stays up (idle) while the others are measured
            process.start()
            samplers[process.port] = RssSampler(process.pid)
        for target in targets:
            target.process = next(p.process for p in processes if p.port == target.port)
            asyncio.run(warm_up(target, prompts, args.stall_s))
        floor_runner = Floor(family, args.threads) if use_floor else None
        for level in args.levels:
            for repeat in range(args.repeats):
                if floor_runner is not None and level <= args.floor_max:
                    value = floor_runner.measure(prompt_ids[:level], args.max_tokens)
                    floor.setdefault(level, []).append(value)
                    print(f"floor  {level:3d} streams: {value:7.1f} tok/s", flush=True)
                shift = repeat % len(targets)
                for target in targets[shift:] + targets[:shift]:  # rotate the order: no one always goes first
                    run = asyncio.run(run_level(target, prompts, level, args.rounds, lengths, args.stall_s,
                                                samplers[target.port]))
                    runs.setdefault((target.name, level), []).append(run)
                    require_tokens(run, target.log_path)
                    errors = sum(1 for s in run.streams if not s.ok)
                    print(f"{target.name:6s} {level:3d} streams: {run.tokens_per_s:7.1f} tok/s, errors {errors}, "
                          f"RSS peak {run.rss_peak / 2**20:.0f} MB", flush=True)
    except NoTokensError as error:
        print(f"http_bench: {error}", file=sys.stderr)
        return 1
    finally:
        for sampler in samplers.values():
            sampler.stop()
        for process in processes:
            process.stop()

    levels = {key: summarize(value) for key, value in runs.items()}
    ordered = [levels[(t.name, level)] for t in targets for level in args.levels if (t.name, level) in levels]
    ratios = compute_ratios(runs, levels, floor)
    meta = {"family": args.family, "max_tokens": args.max_tokens, "spread": args.spread, "rounds": args.rounds,
            "repeats": args.repeats,
            "threads": args.threads, "levels": args.levels, "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2), "prompt_tokens": PROMPT_TOKENS,
            "commands": {p.name: " ".join(p.command) for p in processes}}
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "floor_tokens_per_s": floor, "levels": [asdict(r) for r in ordered], "ratios": ratios}
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2))
    table = markdown(ordered, floor, ratios, meta)
    (args.out / f"{args.name}.md").write_text(table)
    print(table)
    return 0 if all(r.errors == 0 for r in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
