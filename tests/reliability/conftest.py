"""Reliability fixtures: real servers on loopback around real engines on the tiny family (``tests/conftest.py``
builds it once per session), with fault hooks that tests switch on and off.

The helpers live in ``rel_support.py``; ``tests/server/srv_live.py`` starts the servers; ``bench/load_test.py``
(the load generator and its checks) is shared with the full-size benchmark.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT, ROOT / "tests" / "server"):  # bench.load_test; srv_live
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))
