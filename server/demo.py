"""The model a bare ``proxy-serve`` serves. Kept to this one function so that a trained demo family can
replace the tiny random one without touching anything else."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("proxy_serve")


def demo_dir() -> Path:
    cache = os.environ.get("PROXY_SERVE_DEMO_DIR")
    if cache:
        return Path(cache)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "proxy-serve" / "demo"


def default_engine_config() -> dict[str, Any]:
    """The built-in demo: for now a tiny random-weight family, built once into the cache (it talks nonsense)."""
    from proxy_engine.families import build_family  # the engine package, not the server, owns the weights

    root = demo_dir()
    logger.info("no model configured: serving the built-in demo family from %s", root)
    family = build_family(root)
    return {
        "base": {"path": str(family.base)},
        "experts": [{"expert": {"path": str(family.expert)}, "anti_expert": {"path": str(family.anti_expert)},
                     "alpha": 1.0}],
    }
