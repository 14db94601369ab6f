"""`make eval`: serve the demo family (two proxy-serve instances on loopback) and run proxy-eval against them.

    python -m proxy_eval.demo_run [--tasks demo/tasks/heldout.jsonl] [-- extra proxy-eval flags]
    python -m proxy_eval.demo_run --real [-- extra proxy-eval flags]       # the real-base demo (make eval DEMO=real)

Instance 1 serves ``configs/demo-cpu.yaml`` (``proxy-tuned``, ``proxy-tuned:base``,
``proxy-tuned:expert``); instance 2 serves ``demo/tuned.yaml`` (``proxy-demo-tuned:base``, the truly tuned
large model alone). Both listen on free loopback ports, are waited for on ``/health`` and are stopped
afterwards (their logs go to stderr only when something fails). The exit status is proxy-eval's.

``--real`` measures the real-base demo (``configs/demo-real.yaml``, one server) on three task files in
``demo/real/tasks``: the facts in a held-out phrasing and in an unseen one (base, expert, proxy; the gap is the
one between the base and the expert, which plays the truly tuned model), and the held-out everyday questions
(base and proxy against the base's own cached answers: the share the proxy leaves unchanged). After them, the
everyday answers are judged by the fluency check (``proxy_eval.fluency``: unchanged, or free of the invented
world's words and within a bound of the base's own per-token log-likelihood, scored locally on the base).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from proxy_eval import cli, fluency
from proxy_eval.metrics import exact_match
from proxy_eval.tasks import load_tasks

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    exe = shutil.which("proxy-serve", path=str(Path(sys.executable).parent)) or shutil.which("proxy-serve")
    return [exe] if exe else [sys.executable, "-m", "server"]


class Server:
    def __init__(self, config: str, name: str, log_dir: Path) -> None:
        self.port = free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*serve_command(), "--config", config, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}")
            try:
                # /health, not /v1/models: the models list answers while the weights still load (then every
                # request gets 503 "loading" and, on a slow machine, can use up its retries)
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} server not ready after {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def dump_log(self) -> None:
        print(f"--- {self.name} server log ({self.log_path}) ---", file=sys.stderr)
        print(self.log_path.read_text()[-4000:], file=sys.stderr)


REAL_CONFIG = "configs/demo-real.yaml"
REAL_NAME = "proxy-real"
REAL_TASKS = "demo/real/tasks"


def real_runs(
    url: str, tasks_dir: str = REAL_TASKS, name: str = REAL_NAME, everyday_predictions: Path | None = None
) -> list[tuple[str, list[str]]]:
    """The proxy-eval runs of the real-base demo: (title, arguments) for each task file; the everyday answers go
    to ``everyday_predictions`` when given (for the fluency check)."""
    models = ["--base-url", url, "--base-model", f"{name}:base", "--proxy-model", name]
    facts = [*models, "--expert-model", f"{name}:expert", "--tuned-model", f"{name}:expert", "--max-tokens", "24"]
    keep = ["--predictions", str(everyday_predictions)] if everyday_predictions else []
    return [
        ("facts, held-out phrasing", ["--tasks", f"{tasks_dir}/facts_heldout.jsonl", *facts]),
        ("facts, unseen phrasing", ["--tasks", f"{tasks_dir}/facts_unseen.jsonl", *facts]),
        ("everyday questions (score = the base's own answer, unchanged)",
         ["--tasks", f"{tasks_dir}/everyday.jsonl", *models, "--max-tokens", "24", *keep]),
    ]


def leak_words() -> set[str]:
    """The words of the expert's fact answers ("Anouk Brenner lives in Islebrook.", "... works as a beekeeper.")
    that the base never says in its cached everyday answers, lowercase: one of them in an everyday answer is the
    pair's facts leaking. (Asked about Anouk Brenner, the base does say her name; asked how to boil an egg, it
    says none of these.)"""
    from scripts import base_answers, real_demo_data

    rows = real_demo_data.fact_rows(real_demo_data.fact_people())
    taught = {w.lower() for row in rows for w in fluency.words_of(row["answer"])}
    everyday = set(real_demo_data.everyday_questions())
    said = {w.lower() for q, row in base_answers.load_cache().items() if q in everyday
            for w in fluency.words_of(row["text"])}
    return taught - said


def fluency_report(predictions: Path, tasks_file: Path, base_path: Path, words: set[str]) -> str:
    """The fluency check on every everyday answer of base and proxy (their texts in ``predictions``), against the
    base's cached answer (each task's reference): a table, then every proxy answer that changed, with its
    verdict."""
    from proxy_eval.likelihood import AnswerScorer

    tasks = {t.id: t for t in load_tasks(tasks_file)}
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    scorer = AnswerScorer(base_path)
    verdicts: dict[str, list[tuple[str, str, fluency.Verdict]]] = {}
    for row in rows:
        task = tasks[row["id"]]
        reference = task.reference[0]
        nll = _NllCache(scorer, task.messages or [])
        for role in ("base", "proxy"):
            text = (row.get(role) or {}).get("text")
            if text is None:
                continue
            if exact_match(text, reference):  # unchanged: nothing to score (a forward pass of the base each)
                verdict = fluency.judge(text, reference, words, None, None)
            else:
                verdict = fluency.judge(text, reference, words, nll(text), nll(reference))
            verdicts.setdefault(role, []).append((task.id, text, verdict))
    lines = [f"tasks: {len(rows)}; fluent = unchanged, or no invented word and at most "
             f"{fluency.MAX_EXCESS_NLL:g} nats/token over the base answer's NLL under the base", "",
             f"{'role':<7} {'unchanged':>9} {'fluent':>7} {'leaks':>5} {'mean excess NLL':>15}"]
    for role, judged in verdicts.items():
        n = len(judged)
        excess = [v.excess_nll for _, _, v in judged if v.excess_nll is not None]
        lines.append(f"{role:<7} {sum(v.unchanged for _, _, v in judged) / n:>9.3f} "
                     f"{sum(v.fluent for _, _, v in judged) / n:>7.3f} {sum(bool(v.leaked) for _, _, v in judged):>5d} "
                     f"{sum(excess) / max(1, len(excess)):>+15.2f}")
    changed = [(i, t, v) for i, t, v in verdicts.get("proxy", []) if not v.unchanged]
    if changed:
        lines += ["", "proxy answers that changed:"]
        lines += [f"  [{'pass' if v.fluent else 'FAIL'}] {i!r} -> {t!r} ({v.reason})" for i, t, v in changed]
    return "\n".join(lines)


class _NllCache:
    """The base's mean NLL of answers to one prompt, each scored once."""

    def __init__(self, scorer, messages: list[dict[str, str]]) -> None:
        self.scorer, self.messages, self.known = scorer, messages, {}

    def __call__(self, text: str) -> float:
        if text not in self.known:
            self.known[text] = fluency.mean_nll(self.scorer.logprobs(self.messages, text))
        return self.known[text]


def config_base_path(config: str) -> Path:
    """The base model's directory named in a proxy-serve config (relative paths from the repository root)."""
    path = Path(yaml.safe_load((ROOT / config).read_text())["engine"]["base"]["path"])
    return path if path.is_absolute() else ROOT / path


def run_real(args: argparse.Namespace, log_dir: Path) -> int:
    config = args.proxy_config if args.proxy_config != DEFAULT_PROXY_CONFIG else REAL_CONFIG
    server = Server(config, "real", log_dir)
    predictions = log_dir / "everyday.predictions.jsonl"
    try:
        server.wait_ready(args.startup_timeout)
        rc = 0
        for title, eval_args in real_runs(server.url, args.real_tasks, everyday_predictions=predictions):
            print(f"\n## {title}", flush=True)
            print("[proxy-eval] proxy-eval " + " ".join(eval_args), file=sys.stderr, flush=True)
            rc = max(rc, cli.main([*eval_args, *args.extra]))
        server.stop()  # the base is loaded again, locally, to score the answers
        print("\n## everyday answers: the fluency check (docs/demo.md, \"The fluency check\")", flush=True)
        print(fluency_report(predictions, Path(args.real_tasks) / "everyday.jsonl", config_base_path(config),
                             leak_words()), flush=True)
    except Exception as exc:
        print(f"proxy-eval demo: {exc}", file=sys.stderr)
        server.stop()
        server.dump_log()
        return 2
    server.stop()
    if rc != 0:
        server.dump_log()
    return rc


DEFAULT_PROXY_CONFIG = "configs/demo-cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proxy_eval.demo_run", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="demo/tasks/heldout.jsonl")
    ap.add_argument("--proxy-config", default=DEFAULT_PROXY_CONFIG)
    ap.add_argument("--tuned-config", default="demo/tuned.yaml")
    ap.add_argument("--name", default="proxy-tuned", help="served_model_name in the proxy config")
    ap.add_argument("--tuned-name", default="proxy-demo-tuned", help="served_model_name in the tuned config")
    ap.add_argument("--max-tokens", default="16")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--real", action="store_true", help="measure the real-base demo (configs/demo-real.yaml)")
    ap.add_argument("--real-tasks", default=REAL_TASKS, help="the real-base demo's task directory")
    ap.add_argument("extra", nargs="*", help="more proxy-eval flags (after --)")
    args = ap.parse_args(argv)

    log_dir = Path(tempfile.mkdtemp(prefix="proxy-eval-demo-"))
    if args.real:
        return run_real(args, log_dir)
    servers = [Server(args.proxy_config, "proxy", log_dir), Server(args.tuned_config, "tuned", log_dir)]
    proxy, tuned = servers
    try:
        for server in servers:
            server.wait_ready(args.startup_timeout)
        print(f"[proxy-eval] servers ready: proxy {proxy.url}, tuned {tuned.url}", file=sys.stderr, flush=True)
        eval_args = [
            "--base-url", proxy.url, "--tasks", args.tasks, "--max-tokens", args.max_tokens,
            "--base-model", f"{args.name}:base", "--expert-model", f"{args.name}:expert", "--proxy-model", args.name,
            "--tuned-model", f"{args.tuned_name}:base", "--tuned-url", tuned.url, *args.extra,
        ]
        print("[proxy-eval] proxy-eval " + " ".join(eval_args), file=sys.stderr, flush=True)
        rc = cli.main(eval_args)
    except Exception as exc:  # a server that did not come up: show why
        print(f"proxy-eval demo: {exc}", file=sys.stderr)
        for server in servers:
            server.stop()
            server.dump_log()
        return 2
    for server in servers:
        server.stop()
    if rc != 0:
        for server in servers:
            server.dump_log()
    return rc


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
