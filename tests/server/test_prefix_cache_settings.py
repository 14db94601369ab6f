"""Prefix caching is on by default and is set from flags, the environment or the config file."""

from __future__ import annotations

import pytest

from server.cli import build_parser, overrides_from_args
from server.settings import ConfigError, load_settings


def settings_from(*argv: str, environ: bool = False):
    args = build_parser().parse_args(["--base", "/m", *argv])
    return load_settings(overrides=overrides_from_args(args), environ=environ)


def test_on_by_default_and_off_with_a_flag():
    assert settings_from().engine.prefix_cache.enabled is True
    settings = settings_from("--no-prefix-caching", "--prefix-cache-fraction", "0.5")
    assert settings.engine.prefix_cache.enabled is False and settings.engine.prefix_cache.memory_fraction == 0.5


def test_from_the_environment(monkeypatch):
    monkeypatch.setenv("PROXY_SERVE_ENGINE__PREFIX_CACHE__ENABLED", "false")
    monkeypatch.setenv("PROXY_SERVE_ENGINE__PREFIX_CACHE__BLOCK_SIZE", "32")
    cache = settings_from(environ=True).engine.prefix_cache
    assert cache.enabled is False and cache.block_size == 32


@pytest.mark.parametrize("argv", [["--prefix-cache-fraction", "0"], ["--prefix-cache-fraction", "lots"]])
def test_bad_values_name_the_key(argv):
    with pytest.raises(ConfigError, match="engine.prefix_cache.memory_fraction"):
        settings_from(*argv)
