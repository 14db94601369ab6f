"""``python gated_server.py <proxy-serve arguments>``: ``proxy-serve`` whose engine holds its decode phase
while the file named by ``$PROXY_TEST_GATE`` exists (60 s at most), so that a test can keep a request in
flight for as long as it needs, whatever the machine's speed; whose step thread dies while the file named by
``$PROXY_TEST_DIE`` exists; and whose model loading holds while the file
named by ``$PROXY_TEST_LOAD_GATE`` exists (120 s at most), like a 70B model that takes minutes to load."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# The gates patch the engine in this process: it must not run in an engine process of its own.
os.environ["PROXY_SERVE_ENGINE_PROCESS"] = "0"

from proxy_engine import engine as engine_module  # noqa: E402

GATE = Path(os.environ["PROXY_TEST_GATE"])
_init = engine_module.ProxyEngine.__init__


def _hold(phase: str, sequences: list) -> None:
    if phase == "decode":
        deadline = time.monotonic() + 60
        while GATE.exists() and time.monotonic() < deadline:
            time.sleep(0.01)


def _gated_init(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    self.fault_hook = _hold


engine_module.ProxyEngine.__init__ = _gated_init

if os.environ.get("PROXY_TEST_DIE"):
    # While the file named by $PROXY_TEST_DIE exists, the step raises before its guarded phases (where a fault
    # in admission or in the inbox would): the step thread dies.
    DIE = Path(os.environ["PROXY_TEST_DIE"])
    _step = engine_module.ProxyEngine.step

    def _dying_step(self):
        if DIE.exists():
            raise RuntimeError("injected fault outside the guarded phases")
        return _step(self)

    engine_module.ProxyEngine.step = _dying_step

if os.environ.get("PROXY_TEST_LOAD_GATE"):
    from proxy_engine import async_engine

    LOAD_GATE = Path(os.environ["PROXY_TEST_LOAD_GATE"])
    _build = async_engine.AsyncEngine._build

    def _slow_build(self):
        deadline = time.monotonic() + 120
        while LOAD_GATE.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return _build(self)

    async_engine.AsyncEngine._build = _slow_build

if __name__ == "__main__":
    from server.cli import main

    sys.exit(main(sys.argv[1:]))
