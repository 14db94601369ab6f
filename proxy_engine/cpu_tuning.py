"""Process-wide CPU tuning: the intra-op thread team of the threads that run models, and glibc's malloc.

Both are settings of the process (or of a thread), not of a model: they live here rather than in the runner.
The knob is ``RuntimeConfig.cpu_threads`` (``PROXY_SERVE_CPU_THREADS``).
"""

from __future__ import annotations

import os
import threading

import torch

from proxy_engine.config import RuntimeConfig

_thread_state = threading.local()


def cpu_threads(runtime: RuntimeConfig | None = None) -> int | None:
    """Intra-op threads for models on the CPU, or None to leave torch's own setting alone.

    ``runtime.cpu_threads`` (default: ``PROXY_SERVE_CPU_THREADS``) decides when set; an ``OMP_NUM_THREADS`` set
    by the deployer is left alone; otherwise one core is left free (as vLLM's CPU backend reserves one for its
    frontend): the step thread's OpenMP team must not compete with the HTTP event loop, the detokenizer and
    the clients for the cores. On a shared 2-core machine a team of 2 ran 2-10x slower than a team of 1
    whenever another process was busy (its threads spin at every barrier while the other is descheduled);
    see bench/NOTES.md.
    """
    explicit = (runtime or RuntimeConfig()).cpu_threads
    if explicit:
        return explicit
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores - 1))


def use_cpu_threads(runtime: RuntimeConfig | None = None) -> None:
    """Apply ``cpu_threads()`` once in the calling thread (OpenMP's team size is a per-thread setting)."""
    if getattr(_thread_state, "configured", False):
        return
    _thread_state.configured = True
    threads = cpu_threads(runtime)
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_MMAP_THRESHOLD = 4 << 20
_malloc_tamed = False


def tame_malloc() -> None:
    """Fix glibc's mmap threshold (once per process) so that freed tensor memory goes back to the system.

    glibc raises its threshold each time a large mmapped block is freed (up to 32 MB), after which such
    blocks come from the heap, which fragments and keeps them: at 64 streams the server's RSS, measured
    after each round with every KV buffer freed, grew from 1.6 to 2.7 GB over 8 rounds, and was flat (1.4 GB)
    with the threshold fixed at 4 MB. A ``MALLOC_MMAP_THRESHOLD_`` set by the deployer is left alone.
    """
    global _malloc_tamed
    if _malloc_tamed or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    _malloc_tamed = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; setting it also stops the dynamic adjustment
    except (OSError, AttributeError):  # not glibc
        pass
