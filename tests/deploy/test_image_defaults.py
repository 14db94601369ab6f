"""What the container image serves by default, and that flags after the image name add to it.

The image installs the package (``pip install .``) into a venv, away from the repository's ``demo/`` folder,
runs ``proxy-serve`` with no arguments of its own, and names the trained demo with ``PROXY_SERVE_DEMO_MODELS``.
These tests reproduce that without Docker: the package copied where no ``demo/`` is beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server import demo
from server.cli import resolve_settings
from server.settings import ServerSettings, load_settings

from .conftest import REPO

DEMO_MODELS = REPO / "demo" / "models"


@pytest.fixture
def installed_elsewhere(monkeypatch, tmp_path):
    """The package as the image has it: no demo/ beside it, the trained family named by the environment."""
    monkeypatch.setattr(demo, "TRAINED_DEMO", tmp_path / "site-packages" / "demo" / "models")
    monkeypatch.setenv(demo.DEMO_MODELS_ENV, str(DEMO_MODELS))
    for name in list(os.environ):
        if name.startswith("PROXY_SERVE_") and name != demo.DEMO_MODELS_ENV:
            monkeypatch.delenv(name)


def test_flags_after_the_image_name_keep_the_trained_demo(installed_elsewhere):
    settings, _ = resolve_settings(["--api-key", "sk-test", "--max-num-seqs", "4", "--served-model-name", "x"])
    assert Path(settings.engine.base.path) == DEMO_MODELS / "base"
    assert Path(settings.engine.experts[0].expert.path) == DEMO_MODELS / "expert"
    assert settings.engine.experts[0].expert.prompt_format == "chat"
    assert settings.engine.limits.max_num_seqs == 4  # an engine setting applies on top of the demo
    assert settings.api_key_values() == ["sk-test"] and settings.served_model_name == "x"


def test_naming_a_model_replaces_the_demo(installed_elsewhere, tiny_family):
    settings, _ = resolve_settings(["--base", str(tiny_family.base), "--expert", str(tiny_family.expert),
                                    "--anti-expert", str(tiny_family.anti_expert)])
    assert settings.engine.base.path == str(tiny_family.base)
    assert settings.engine.experts[0].expert.path == str(tiny_family.expert)
    assert settings.engine.experts[0].expert.prompt_format == "plain"  # nothing of the demo's pair leaks in
    settings, _ = resolve_settings(["--config", str(REPO / "configs" / "demo-cpu.yaml")])
    assert settings.engine.base.path == "demo/models/base"


def test_a_named_but_missing_demo_is_reported(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(demo, "TRAINED_DEMO", tmp_path / "nowhere")
    monkeypatch.setenv(demo.DEMO_MODELS_ENV, str(tmp_path / "empty"))
    with caplog.at_level("WARNING", logger="proxy_serve"):
        assert demo.trained_demo() is None
    assert "holds no trained demo family" in caplog.text
    monkeypatch.delenv(demo.DEMO_MODELS_ENV)
    monkeypatch.setattr(demo, "TRAINED_DEMO", DEMO_MODELS)
    assert demo.trained_demo() == DEMO_MODELS  # from a checkout: beside the package, no variable needed


def test_an_installed_copy_finds_the_demo_through_the_environment(tmp_path):
    """The real thing in a subprocess: the packages copied away from the checkout, as `pip install .` does."""
    site = tmp_path / "site-packages"
    for package in ("server", "proxy_engine"):
        shutil.copytree(REPO / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import json; from server.cli import resolve_settings; "
             "s, _ = resolve_settings(['--api-key', 'sk-test']); "
             "print(json.dumps([s.served_model_name, s.engine.base.path]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_SERVE_")}
    env.update(PYTHONPATH=str(site), PROXY_SERVE_DEMO_MODELS=str(DEMO_MODELS),
               PROXY_SERVE_DEMO_DIR=str(tmp_path / "random-demo"))
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    name, base = json.loads(result.stdout.strip().splitlines()[-1])
    assert (name, base) == ("proxy-tuned", str(DEMO_MODELS / "base"))
    assert not (tmp_path / "random-demo").exists(), "no random family was built"


def test_one_served_model_name_everywhere():
    """The README, the docs, compose and the demo config ask for the id the server serves by default."""
    default = ServerSettings.model_fields["served_model_name"].default
    assert default == "proxy-tuned"
    assert yaml.safe_load((REPO / "configs" / "demo-cpu.yaml").read_text())["served_model_name"] == default
    assert load_settings(REPO / "configs" / "demo-cpu.yaml", environ=False).served_model_name == default
    for doc in ("README.md", "docs/deployment.md", "docs/demo.md", "docs/scaling.md", "docker/compose.yaml"):
        text = (REPO / doc).read_text()
        asked = set(re.findall(r'"model":\s*"([^"]+)"', text)) | set(re.findall(r'model="([^"]+)"', text))
        asked = {m.split(":")[0] for m in asked}
        assert asked <= {default, "proxy-demo-tuned"}, (doc, asked)
        assert "proxy-demo\"" not in text and "`proxy-demo`" not in text and "proxy-demo:" not in text, doc
