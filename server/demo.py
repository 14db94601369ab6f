"""The model a bare ``proxy-serve`` serves: the trained demo family committed under ``demo/models``.

The family (a 3.1M-parameter base, a 0.4M chat expert and its untuned anti-expert, trained from scratch by
``scripts/train_demo.py``; see docs/demo.md) answers questions about an invented world. Where the
repository's ``demo/`` folder is not beside the installed package (a wheel installed elsewhere, as in the
container image), ``PROXY_SERVE_DEMO_MODELS`` names where the trained family is (the image sets it to
``/app/demo/models``); with neither, a tiny random family is built into the cache instead, so ``proxy-serve``
still starts with no download.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("proxy_serve")

TRAINED_DEMO = Path(__file__).resolve().parent.parent / "demo" / "models"
DEMO_MODELS_ENV = "PROXY_SERVE_DEMO_MODELS"


def trained_demo() -> Path | None:
    """Where the trained demo family is: ``$PROXY_SERVE_DEMO_MODELS``, else beside the package, else None."""
    configured = os.environ.get(DEMO_MODELS_ENV)
    for root in ([Path(configured)] if configured else []) + [TRAINED_DEMO]:
        if (root / "base" / "config.json").exists():
            return root
    if configured:  # named but not there: say so, rather than quietly serving random weights
        logger.warning("%s=%s holds no trained demo family (no base/config.json)", DEMO_MODELS_ENV, configured)
    return None


def demo_dir() -> Path:
    cache = os.environ.get("PROXY_SERVE_DEMO_DIR")
    if cache:
        return Path(cache)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "proxy-serve" / "demo"


def _trained_demo_config(root: Path) -> dict[str, Any]:
    def model(name: str, prompt_format: str = "plain") -> dict[str, Any]:
        return {"path": str(root / name), "dtype": "float32", "device": "cpu", "prompt_format": prompt_format}

    return {
        "base": model("base"),
        # As in the paper: the chat-tuned expert sees its chat template, base and anti-expert plain text.
        "experts": [{"expert": model("expert", "chat"), "anti_expert": model("anti_expert"), "alpha": 1.0}],
    }


def default_engine_config() -> dict[str, Any]:
    """The built-in demo: the trained family when the repository has it, else a tiny random one."""
    trained = trained_demo()
    if trained is not None:
        logger.info("no model configured: serving the trained demo family from %s", trained)
        return _trained_demo_config(trained)
    from proxy_engine.families import build_family  # the engine package, not the server, owns the weights

    root = demo_dir()
    logger.info("no model configured and no trained demo beside the package: a tiny random family in %s", root)
    family = build_family(root)
    return {
        "base": {"path": str(family.base)},
        "experts": [{"expert": {"path": str(family.expert)}, "anti_expert": {"path": str(family.anti_expert)},
                     "alpha": 1.0}],
    }
