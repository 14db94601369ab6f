"""The benchmarks' shared harness: percentiles, /proc readings, and a server started and stopped for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import harness


def test_percentile_is_nearest_rank():
    assert harness.percentile([], 50) is None
    assert harness.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert harness.percentile([float(i) for i in range(101)], 99) == 99.0
    assert harness.percentile([5.0], 0) == 5.0


def test_proc_readings_of_this_process_and_of_a_gone_one():
    assert harness.cpu_seconds(os.getpid()) > 0
    assert harness.rss_bytes(os.getpid()) > 0
    assert harness.cpu_seconds(999_999_999) == 0.0  # gone: no error
    assert harness.rss_bytes(999_999_999) == 0


def test_cpu_seconds_count_the_descendants(tmp_path):
    # A parent that only waits for a child that burns CPU: the engine core in its own process is the server's
    # work too.
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\ntime.sleep(30)\n"
    (tmp_path / "burn.py").write_text(burn)
    parent = subprocess.Popen(["sh", "-c", f"{sys.executable} {tmp_path / 'burn.py'}; true"], start_new_session=True)
    try:
        for _ in range(200):
            if harness.cpu_seconds(parent.pid) >= 0.4:
                break
            time.sleep(0.05)
        fields = Path(f"/proc/{parent.pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        assert harness.cpu_seconds(parent.pid) >= 0.4 > own
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the shell and its child (a session of their own)
        parent.wait()


def test_a_server_starts_answers_health_and_stops_with_its_exit_status(tmp_path):
    # A stand-in server: /health answers 200, SIGTERM ends it with status 0 (as proxy-serve drains).
    script = tmp_path / "server.py"
    script.write_text(
        "import http.server, signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200 if self.path == '/health' else 404); self.end_headers()\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    port = harness.free_port()
    server = harness.ServerProcess(name="stand-in", command=[sys.executable, str(script), str(port)],
                                   env=harness.server_env(1), port=port, log_path=tmp_path / "log" / "server.log")
    assert server.start(timeout_s=60) is server
    try:
        assert server.url == f"http://127.0.0.1:{port}" and server.rss_mb() > 0
    finally:
        assert server.stop() == 0
    assert server.stop() == 0  # idempotent


def test_a_server_that_exits_at_once_says_so_with_its_log(tmp_path):
    server = harness.ServerProcess(name="broken", command=[sys.executable, "-c", "print('no model here'); exit(3)"],
                                   env=harness.server_env(), port=harness.free_port(), log_path=tmp_path / "b.log")
    try:
        server.start(timeout_s=60)
    except RuntimeError as error:
        assert "broken exited with 3" in str(error) and "no model here" in str(error)
    else:
        raise AssertionError("a server that exits must not count as started")
