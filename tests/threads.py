"""The calling thread's intra-op team, set for a block and put back after it.

Tests run in one thread, and the runner's ``use_cpu_threads`` sets the team once per thread: a test (or a bench
it drives) that changes the team would otherwise leave it changed for every test after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int | None = None) -> Iterator[None]:
    """This thread's team at ``count`` for the block (None: left as it is), and as it was afterwards."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
