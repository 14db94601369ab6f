"""proxy-eval: score base / expert / proxy-tuned / truly tuned models on a task file through any
OpenAI-compatible server, and report how much of the tuning gap proxy-tuning closes.

    proxy-eval --base-url http://127.0.0.1:8000/v1 --tasks demo/tasks/heldout.jsonl \\
        --base-model proxy-tuned:base --expert-model proxy-tuned:expert --proxy-model proxy-tuned \\
        --tuned-model demo-tuned --tuned-url http://127.0.0.1:8001/v1

Every model is asked every task at temperature 0 (chat endpoint for ``messages`` rows, completions for
``prompt`` rows, unless --chat/--completions forces one). Progress goes to stderr; the table to stdout, and
its last line is ``gap closed: NN.N%`` = (proxy - base) / (tuned - base), or ``gap closed: n/a (reason)``.
Exit status: 0, or 1 when any request failed (failed answers score 0 and are counted in the table), or 2 on
bad arguments or an unreadable task file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence

import httpx

from proxy_eval.client import Answer, Endpoint, ask
from proxy_eval.metrics import gap_closed, score
from proxy_eval.tasks import Task, TaskFileError, load_tasks

ROLES = ("base", "expert", "proxy", "tuned")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="proxy-eval",
        description="Score base / expert / proxy-tuned / truly tuned models through OpenAI-compatible servers.",
    )
    ap.add_argument("--base-url", default=None,
                    help="the server every model is asked through, e.g. http://127.0.0.1:8000/v1 "
                         "(unless a per-model --*-url overrides it)")
    ap.add_argument("--tasks", required=True, help="JSONL task file")
    for role, example in (("base", "proxy-tuned:base"), ("expert", "proxy-tuned:expert"),
                          ("proxy", "proxy-tuned"), ("tuned", "a truly tuned model")):
        ap.add_argument(f"--{role}-model", default=None, help=f"served name of the {role} model (e.g. {example}); "
                        "left out: skipped")
        flag = "--base-model-url" if role == "base" else f"--{role}-url"
        ap.add_argument(flag, dest=f"{role}_url", default=None,
                        help=f"server for the {role} model (default --base-url)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                    help="bearer token (default $OPENAI_API_KEY); --tuned-api-key overrides it for the tuned model")
    ap.add_argument("--tuned-api-key", default=None)
    ap.add_argument("--max-tokens", type=int, default=32)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="mode", action="store_const", const="chat",
                      help="ask every task through /chat/completions (a prompt row becomes one user message)")
    mode.add_argument("--completions", dest="mode", action="store_const", const="completions",
                      help="ask every task through /completions (messages become a 'User:/Assistant:' transcript)")
    ap.set_defaults(mode="auto")
    ap.add_argument("--stop", action="append", default=None, help="a stop string sent with every request (repeatable)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight per model")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--retries", type=int, default=3, help="retries on connection errors, 429 and 5xx")
    ap.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    ap.add_argument("--predictions", default=None, help="write every answer to this JSONL file")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def endpoints_from_args(args: argparse.Namespace) -> list[Endpoint]:
    endpoints = []
    for role in ROLES:
        model = getattr(args, f"{role}_model")
        if not model:
            continue
        url = getattr(args, f"{role}_url") or args.base_url
        if not url:
            raise SystemExit(f"proxy-eval: --{role}-model needs --base-url (or its own url flag)")
        key = args.tuned_api_key if role == "tuned" and args.tuned_api_key else args.api_key
        endpoints.append(Endpoint(role=role, model=model, base_url=url, api_key=key))
    return endpoints


class Progress:
    """'n/total answers (role)' on stderr: redrawn in place on a terminal, every 10% as lines otherwise."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet, self.t0 = total, 0, quiet, time.time()
        self.last, self.bucket = 0.0, -1
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.quiet:
            return
        now, final = time.time(), self.done == self.total
        message = f"[proxy-eval] {self.done}/{self.total} answers ({label}) {now - self.t0:.0f}s"
        if self.tty:
            if now - self.last >= 0.2 or final:
                self.last = now
                print("\r" + message, end="\n" if final else "", file=sys.stderr, flush=True)
            return
        bucket = self.done * 10 // self.total
        if bucket != self.bucket:
            self.bucket = bucket
            print(message, file=sys.stderr, flush=True)


async def run_model(
    client: httpx.AsyncClient, endpoint: Endpoint, tasks: Sequence[Task], args: argparse.Namespace, progress: Progress
) -> list[Answer]:
    semaphore = asyncio.Semaphore(max(1, args.concurrency))

    async def one(task: Task) -> Answer:
        async with semaphore:
            answer = await ask(client, task, endpoint, mode=args.mode, max_tokens=args.max_tokens, stop=args.stop,
                               retries=args.retries)
        progress.step(endpoint.role)
        return answer

    return list(await asyncio.gather(*(one(t) for t in tasks)))


async def collect(endpoints: list[Endpoint], tasks: list[Task], args: argparse.Namespace) -> dict[str, list[Answer]]:
    progress = Progress(len(endpoints) * len(tasks), args.quiet)
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 10.0))
    limits = httpx.Limits(max_connections=max(1, args.concurrency) * max(1, len(endpoints)))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        answers = {}
        for endpoint in endpoints:  # one model at a time: timings and load stay per model
            answers[endpoint.role] = await run_model(client, endpoint, tasks, args, progress)
    return answers


def score_answers(tasks: Sequence[Task], answers: Sequence[Answer]) -> tuple[float, list[float], int]:
    scores = [
        0.0 if a.text is None else score(t.metric, a.text, t.reference, t.choices) for t, a in zip(tasks, answers)
    ]
    errors = sum(a.text is None for a in answers)
    return (sum(scores) / len(scores) if scores else 0.0), scores, errors


def format_report(endpoints: list[Endpoint], tasks: Sequence[Task], results: dict[str, tuple[float, int]]) -> str:
    metrics = sorted({t.metric for t in tasks})
    lines = [f"tasks: {len(tasks)} ({', '.join(metrics)})", ""]
    width = max([len("model")] + [len(e.model) for e in endpoints])
    lines.append(f"{'role':<7} {'model':<{width}} {'score':>7} {'errors':>6}")
    for endpoint in endpoints:
        mean, errors = results[endpoint.role]
        lines.append(f"{endpoint.role:<7} {endpoint.model:<{width}} {mean:>7.3f} {errors:>6d}")
    lines.append("")
    have = {e.role for e in endpoints}
    missing = [r for r in ("base", "proxy", "tuned") if r not in have]
    if missing:
        lines.append(f"gap closed: n/a (no --{'-model, --'.join(missing)}-model given)")
    else:
        base, proxy, tuned = (results[r][0] for r in ("base", "proxy", "tuned"))
        if "expert" in have:
            expert = results["expert"][0]
            lines.append(f"proxy over expert alone: {proxy - expert:+.3f}")
        ratio, reason = gap_closed(base, proxy, tuned)
        lines.append(f"gap closed: {ratio * 100:.1f}%" if ratio is not None else f"gap closed: n/a ({reason})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    endpoints = endpoints_from_args(args)
    if not endpoints:
        print("proxy-eval: give at least one of --base-model, --expert-model, --proxy-model, --tuned-model",
              file=sys.stderr)
        return 2
    try:
        tasks = load_tasks(args.tasks)
    except (OSError, TaskFileError) as exc:
        print(f"proxy-eval: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        tasks = tasks[: args.limit]
    answers = asyncio.run(collect(endpoints, tasks, args))
    results: dict[str, tuple[float, int]] = {}
    per_task: dict[str, list[float]] = {}
    for endpoint in endpoints:
        mean, scores, errors = score_answers(tasks, answers[endpoint.role])
        results[endpoint.role] = (mean, errors)
        per_task[endpoint.role] = scores
        for task, answer in zip(tasks, answers[endpoint.role]):
            if answer.error:
                print(f"[proxy-eval] {endpoint.role} {task.id}: {answer.error}", file=sys.stderr)
                break  # one example per model is enough; the count is in the table
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as f:
            for i, task in enumerate(tasks):
                row = {"id": task.id, "reference": task.reference, "metric": task.metric}
                for endpoint in endpoints:
                    a = answers[endpoint.role][i]
                    row[endpoint.role] = {"text": a.text, "score": per_task[endpoint.role][i], "error": a.error,
                                          "finish_reason": a.finish_reason}
                f.write(json.dumps(row) + "\n")
    print(format_report(endpoints, tasks, results))
    return 1 if any(errors for _, errors in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
