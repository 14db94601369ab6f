"""What a browser test needs (Playwright, Debian's chromium) and what it does when a piece is missing: a skip
with the reason, or a failure where its make target requires it."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

# PLAYGROUND_CHROMIUM names another build of chromium (a path or a command).
NAMED = os.environ.get("PLAYGROUND_CHROMIUM")
CHROMIUM = shutil.which(NAMED) if NAMED else shutil.which("chromium") or shutil.which("chromium-browser")


def browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (the test extra has it)"
    if CHROMIUM is None:
        return "Debian's chromium is not installed (apt-get install -y chromium; make install does it where apt is"\
            " available)"
    return None


def skip_unless_ready(missing: str | None, required: bool, target: str) -> pytest.MarkDecorator:
    """The module's mark: a skip naming ``missing``; where ``target`` requires the test, raise instead."""
    if missing and required:
        raise RuntimeError(f"{target}: {missing}")
    return pytest.mark.skipif(missing is not None, reason=missing or "")
