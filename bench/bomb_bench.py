"""A plain request's latency while tool and grammar bombs are in flight, against its idle latency, side by side.

    python -m bench.bomb_bench                                     # this checkout, tiny family (about a minute)
    python -m bench.bomb_bench --repo before=/work/main --repo after=.   # two checkouts in one run

For each checkout (``--repo NAME=PATH``: its ``server`` package is what runs, with this interpreter), a
``proxy-serve`` subprocess on loopback (the engine in its own process, the default) serves the family. Then:

- **idle**: ``--plain`` chat requests of ``--max-tokens`` tokens, one after another: their latencies;
- **bombs**: ``--tool-bombs`` clients loop on a chat whose one tool has a ``--tool-mb`` MB description
  (``tool_choice: required``: a family with no tool-call format leaves tools out under ``auto``; under the
  body limit) and ``--grammar-bombs`` clients loop on a chat under a fresh
  JSON schema of ``--properties`` optional properties each time (about 240 KB at 8,000: seconds of compiling,
  and past ~500 a grammar that cannot run); the same plain requests are timed again while the tool bombs
  loop, while the grammar bombs loop, and while both do.

The figure to read is the ratio of the medians, each phase / idle, per checkout; each bomb's answers are
counted.
No timing is asserted anywhere (tests/bench/test_bomb_bench.py runs it small).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.family import family_paths
from bench.harness import ROOT, ServerProcess, free_port, percentile, proxy_serve_flags, server_env

MODEL = "proxy-tuned"
_fresh = itertools.count()


def plain_body(max_tokens: int) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}]}


def tool_bomb(mb: float) -> bytes:
    """One body, encoded once: the clients' own work stays small on a machine they share with the server."""
    description = "x" * int(mb * 2**20)
    tool = {"type": "function", "function": {"name": "f", "description": description,
                                             "parameters": {"type": "object"}}}
    return json.dumps({"model": MODEL, "max_tokens": 4, "tools": [tool], "tool_choice": "required",
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()


def grammar_bomb(properties: int) -> bytes:
    tag = next(_fresh)  # a fresh schema each time: no cache can answer it
    schema = {"type": "object", "properties": {f"p{tag}_{i}": {"type": "integer"} for i in range(properties)}}
    return json.dumps({"model": MODEL, "max_tokens": 4, "guided_json": schema,
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()


def time_plain(client: httpx.Client, count: int, max_tokens: int, timeout_s: float) -> tuple[list[float], int]:
    """Latencies of ``count`` plain requests, one after another, and how many ran past ``timeout_s`` (those count
    as ``timeout_s``: a lower bound, so a stalled server does not hold the run for minutes)."""
    latencies, late = [], 0
    for _ in range(count):
        started = time.perf_counter()
        try:
            client.post("/v1/chat/completions", json=plain_body(max_tokens), timeout=timeout_s).raise_for_status()
        except httpx.TimeoutException:
            late += 1
        latencies.append(min(time.perf_counter() - started, timeout_s))
    return latencies, late


class Bombers:
    """Clients that send bombs in a loop until stopped, counting the statuses they get."""

    def __init__(self, url: str, makers: list) -> None:
        self.url, self.makers = url, makers
        self.stop = threading.Event()
        self.statuses: Counter[str] = Counter()
        self.threads = [threading.Thread(target=self._loop, args=(kind, make), daemon=True) for kind, make in makers]

    def _loop(self, kind: str, make) -> None:
        with httpx.Client(base_url=self.url, timeout=300) as client:
            while not self.stop.is_set():
                try:
                    status = str(client.post("/v1/chat/completions", content=make(),
                                             headers={"Content-Type": "application/json"}).status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                if not self.stop.is_set():  # answers while the run ends (the server stopping) are not counted
                    self.statuses[f"{kind} {status}"] += 1

    def __enter__(self) -> Bombers:
        for thread in self.threads:
            thread.start()
        time.sleep(1.0)  # let every bomb reach the server first
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(1)  # a bomb still waiting for its answer ends with the server (daemon threads)


PHASES = ("tool bombs", "grammar bombs", "both")


def run_checkout(name: str, repo: Path, args, family) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "server", *proxy_serve_flags(family, port)]
    server = ServerProcess(name=name, command=command, env=server_env(threads=args.threads, PYTHONPATH=str(repo)),
                           port=port, log_path=args.out / "logs" / f"bombs-{name}.log", cwd=repo).start()
    body = tool_bomb(args.tool_mb)
    tools = [("tool", lambda: body)] * args.tool_bombs
    grammars = [("grammar", lambda: grammar_bomb(args.properties))] * args.grammar_bombs
    phases = {}
    try:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            time_plain(client, 2, args.max_tokens, args.plain_timeout)  # warm-up
            idle, _ = time_plain(client, args.plain, args.max_tokens, args.plain_timeout)
            for phase, makers in zip(PHASES, (tools, grammars, tools + grammars)):
                if not makers:
                    continue
                with Bombers(server.url, makers) as bombers:
                    loaded, late = time_plain(client, args.plain, args.max_tokens, args.plain_timeout)
                    bombers.stop.set()
                phases[phase] = {"latencies_s": loaded, "median_s": statistics.median(loaded),
                                 "p90_s": percentile(loaded, 90), "late": late,
                                 "ratio": statistics.median(loaded) / statistics.median(idle),
                                 "bomb_statuses": dict(bombers.statuses)}
    finally:
        server.stop(grace_s=5)
    return {"idle_s": idle, "idle_median_s": statistics.median(idle), "phases": phases}


def table(results: dict[str, dict], args) -> str:
    lines = [f"Plain chat ({args.max_tokens} tokens) latency, idle and while bombs loop: {args.tool_bombs} clients "
             f"sending a tool with a {args.tool_mb} MB description, {args.grammar_bombs} sending a fresh schema of "
             f"{args.properties} optional properties; {args.plain} plain requests per phase, family {args.family}.",
             f"Requests past {args.plain_timeout:g} s count as {args.plain_timeout:g} s (a lower bound).", "",
             "| checkout | phase | idle median s | median s | p90 s | / idle | past the cap | bomb answers |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for phase, p in r["phases"].items():
            answers = ", ".join(f"{k}: {v}" for k, v in sorted(p["bomb_statuses"].items()))
            lines.append(f"| {name} | {phase} | {r['idle_median_s']:.3f} | {p['median_s']:.3f} | {p['p90_s']:.3f} | "
                         f"{p['ratio']:.2f}x | {p['late']}/{args.plain} | {answers} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", action="append", default=[], metavar="NAME=PATH",
                        help="a checkout to run (repeatable; default: this one)")
    parser.add_argument("--family", default="tiny", choices=["tiny", "bench"])
    parser.add_argument("--family-dir", type=Path, default=None)
    parser.add_argument("--plain", type=int, default=8, help="plain requests per phase")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--plain-timeout", type=float, default=60.0, help="a plain request's cap, seconds")
    parser.add_argument("--tool-bombs", type=int, default=3)
    parser.add_argument("--tool-mb", type=float, default=3.8)
    parser.add_argument("--grammar-bombs", type=int, default=3)
    parser.add_argument("--properties", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None, help="OMP threads of the server (default: its own)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    family = family_paths(args.family, args.family_dir)
    repos = [item.split("=", 1) for item in args.repo] or [["this", str(ROOT)]]
    results = {name: run_checkout(name, Path(path).resolve(), args, family) for name, path in repos}
    text = table(results, args)
    (args.out / "bombs.md").write_text(text)
    (args.out / "bombs.json").write_text(json.dumps({"meta": vars(args) | {"out": str(args.out),
                                                                           "family_dir": str(args.family_dir)},
                                                     "results": results}, indent=2))
    print(text)
    return results


if __name__ == "__main__":
    main()
