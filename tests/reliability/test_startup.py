"""Start-up failures end ``proxy-serve`` with a non-zero status and one clear line, never a traceback; and
``--check`` validates placement without loading anything.

(An unknown configuration key, status 2, is covered by ``tests/server/test_server_cli.py``.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy_engine.families import TINY_SMALL, build_model, build_tokenizer
from tests.reliability.support import SUBPROCESS_ENV

ROOT = Path(__file__).resolve().parents[2]


def proxy_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **SUBPROCESS_ENV}, check=False)


def triple(family, **paths: str) -> list[str]:
    chosen = {"base": str(family.base), "expert": str(family.expert), "anti-expert": str(family.anti_expert),
              **paths}
    return [arg for role, path in chosen.items() for arg in (f"--{role}", path)]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The failure's line: the last one on stderr, and the only one that says ``proxy-serve: error``."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("proxy-serve: error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def test_bad_model_path(tiny_family, tmp_path):
    missing = tmp_path / "no-such-model"
    result = proxy_serve(*triple(tiny_family, expert=str(missing)), "--port", "0")
    line = one_error_line(result)
    assert result.returncode == 1 and str(missing) in line and "not found" in line
    assert result.stderr.strip() == line  # found before anything loads: nothing else was printed


def test_port_in_use(tiny_family):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = proxy_serve(*triple(tiny_family), "--port", str(port))
    line = one_error_line(result)
    assert result.returncode == 1 and f"127.0.0.1:{port}" in line and "in use" in line
    assert result.stderr.strip() == line  # bound before the models load


def test_vocabulary_mismatch(tiny_family, tmp_path):
    """A pair whose tokenizer was trained on other text: the same ids name other tokens."""
    other = build_tokenizer(512, corpus=["zebra quartz jukebox vexing fjord " * 8, "0123456789 " * 20])
    expert = build_model(tmp_path / "expert", other, TINY_SMALL, seed=5)
    anti = build_model(tmp_path / "anti", other, TINY_SMALL, seed=6)
    result = proxy_serve(*triple(tiny_family, expert=str(expert), **{"anti-expert": str(anti)}), "--port", "0")
    line = one_error_line(result)
    assert result.returncode == 1 and "failed to load the models" in line and "vocabulary" in line


def test_check_prints_the_placement_plan(tiny_family):
    result = proxy_serve(*triple(tiny_family), "--check", "--api-key", "sk-hidden-123")
    assert result.returncode == 0, result.stderr
    assert '"served_model_name": "proxy-tuned"' in result.stdout and "sk-hidden-123" not in result.stdout
    assert "placement OK" in result.stdout and str(tiny_family.base) in result.stdout
    assert "model ids: proxy-tuned, proxy-tuned:base, proxy-tuned:expert\n" in result.stdout


def test_check_with_a_missing_path_is_one_line(tmp_path):
    config = tmp_path / "missing.yaml"
    config.write_text(textwrap.dedent(f"""
        engine:
          base: {{path: {tmp_path / "nowhere"}}}
          experts:
            - expert: {{path: {tmp_path / "nowhere-e"}}}
              anti_expert: {{path: {tmp_path / "nowhere-a"}}}
    """))
    result = proxy_serve("--config", str(config), "--check")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: base: ")
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not (ROOT / "demo" / "models").is_dir(), reason="demo/models is not built (scripts/train_demo.py)")
def test_check_demo_cpu_config():
    result = proxy_serve("--config", "configs/demo-cpu.yaml", "--check")
    assert result.returncode == 0, result.stderr
    assert "placement OK" in result.stdout


def test_a_kv_budget_that_cannot_hold_the_context_asked_for_is_one_line(tiny_family):
    result = proxy_serve(*triple(tiny_family), "--port", "0", "--max-model-len", "256", "--kv-cache-memory", "20KB")
    line = one_error_line(result)
    assert result.returncode == 1 and "raise --kv-cache-memory or lower --max-model-len" in line
    assert "tokens fit" in line and "one sequence of 256 tokens" in line
