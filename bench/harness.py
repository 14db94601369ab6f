"""What the benchmarks that drive a server subprocess share: a free port, the server's start (until ``/health``
answers) and stop (SIGTERM, then SIGKILL), its resident memory and CPU time from ``/proc``, and percentiles.

Used by ``bench/http_bench.py`` and ``bench/load_test.py``. Linux only (``/proc``); no psutil needed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0..100), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def server_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """This environment, offline, with ``threads`` OpenMP / MKL threads when given."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def proxy_serve_flags(family, port: int) -> list[str]:
    """``proxy-serve`` arguments for a family's three models on loopback ``port``, logging warnings only."""
    return ["--base", str(family.base), "--expert", str(family.expert), "--anti-expert", str(family.anti_expert),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]


# --- /proc -----------------------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (0 once it is gone)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _own_cpu_seconds(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, parent pid) of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and its live descendants so far (an engine core
    in its own process is the server's work too): the work a run cost, whatever the contention from other
    processes on a shared machine (wall-clock numbers are not)."""
    try:
        total = _own_cpu_seconds(pid)[0]
    except OSError:
        return 0.0
    children: dict[int, list[tuple[int, float]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != pid:
            try:
                seconds, parent = _own_cpu_seconds(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append((int(entry.name), seconds))
    todo = [pid]
    while todo:
        for child, seconds in children.get(todo.pop(), []):
            total += seconds
            todo.append(child)
    return total


class RssSampler:
    """Samples a process's RSS every ``period`` seconds in a thread: ``(time, bytes)`` pairs."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), rss_bytes(self.pid)))
            self._stop.wait(self.period)

    def window(self, start: float, end: float) -> list[int]:
        return [b for t, b in self.samples if start <= t <= end]

    def peak(self) -> int:
        return max((b for _, b in self.samples), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- the server --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ServerProcess:
    """A server subprocess on loopback, in a session of its own (so that stopping it stops its children)."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    cwd: Path = ROOT
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def rss_mb(self) -> float:
        return rss_bytes(self.pid) / 2**20

    def start(self, timeout_s: float = 300) -> ServerProcess:
        """Start it and wait until ``/health`` answers 200; raise with the log's tail if it exits or hangs."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=self.cwd, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer /health within {timeout_s:.0f}s:\n{self._log_tail()}")

    def stop(self, grace_s: float = 60) -> int | None:
        """SIGTERM (the server drains, then exits 0), SIGKILL after ``grace_s``; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return f"(no log at {self.log_path})"

