"""Memory the server may fill on a device: what is free there now and, on a GPU given ``gpu_memory_utilization``
(vLLM's flag), no more than that share of its total, counting what is in use already (the weights just loaded,
other processes). The one place that asks torch or the OS how much memory there is."""

from __future__ import annotations

import os
from pathlib import Path

import torch

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: a container's memory.max and memory.current


def free_bytes(device: torch.device) -> int | None:
    """Memory free now on ``device`` (for the CPU: host RAM the kernel can hand out, within a container's memory
    limit); None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            return host_available_bytes(MEMINFO, CGROUP)
    except Exception:  # noqa: BLE001 - no such GPU, no CUDA build, a broken driver, no sysconf
        pass
    return None


def host_available_bytes(meminfo: Path, cgroup: Path) -> int:
    """Host RAM a new allocation can take: ``MemAvailable`` (free pages plus the page cache the kernel reclaims;
    ``MemFree`` alone would call a machine with a warm file cache full), and no more than a cgroup v2 memory limit
    leaves (``memory.max - memory.current``: Docker's ``--memory``, which /proc/meminfo does not show and whose
    OOM killer acts first). ``sysconf``'s free pages where /proc/meminfo is missing."""
    available = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, max(0, int(limit) - int((cgroup / "memory.current").read_text())))
    except (OSError, ValueError):
        pass
    return available


def total_bytes(device: torch.device) -> int | None:
    """All of ``device``'s memory (host RAM, for the CPU); None when unknown."""
    try:
        if device.type == "cuda":  # from the device's properties: no CUDA context is made for it
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except Exception:  # noqa: BLE001
        pass
    return None


def within_utilization(free: int, total: int, utilization: float | None) -> int:
    """Of ``free`` bytes, those the server may still fill when it may use ``utilization`` of ``total``: what is in
    use already (``total - free``) counts against that share, as in vLLM."""
    if utilization is None:
        return free
    return max(0, min(free, int(total * utilization) - (total - free)))


def usable_bytes(device: torch.device, utilization: float | None = None) -> int | None:
    """What the server may still allocate on ``device``: its free memory, and on a GPU no more than
    ``utilization`` of its total allows (None: all that is free); None when unknown."""
    free = free_bytes(device)
    if free is None or utilization is None or device.type != "cuda":
        return free
    total = total_bytes(device)
    return free if total is None else within_utilization(free, total, utilization)


def out_of_memory(error: BaseException) -> bool:
    """An allocation failure: CUDA's ``OutOfMemoryError``, Python's ``MemoryError``, the CPU allocator's or another
    backend's message."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
