"""Which decode executor a model gets, and the static K/V buffers each model may allocate.

Three executors decode a runner's rows (``ModelRunner.decode`` dispatches on the choice):

- ``static`` (the CUDA backend): fixed K/V buffers, fixed-shape steps, CUDA graphs (static_executor.py); the
  default on CUDA for the families architecture.py knows;
- ``fast`` (the CPU backend): fast_decode.py's step over the growable slot cache; the default on the CPU;
- ``transformers``: the model's own forward, for every architecture the other two do not know.

``RuntimeConfig.decode_executor`` forces one (``static`` on the CPU runs the graph-safe step eagerly: the tests
compare it with the others there); a model that cannot take the one asked for falls back along
static -> fast -> transformers, and the log says why.
"""

from __future__ import annotations

import logging

import torch

from proxy_engine.architecture import unsupported_reason
from proxy_engine.config import RuntimeConfig
from proxy_engine.device_memory import usable_bytes
from proxy_engine.executor.static_cache import SlotPlan, plan_slots
from proxy_engine.executor.static_decode import static_unsupported_reason

log = logging.getLogger("proxy_engine.executor")

STATIC, FAST, TRANSFORMERS = "static", "fast", "transformers"
KV_MEMORY_FRACTION = 0.8  # of a GPU's free memory once the weights are in, for the static K/V of its models


def wanted_executor(device: torch.device, runtime: RuntimeConfig) -> str:
    """The executor ``runtime`` asks for on ``device``, before what a model supports narrows it."""
    if not runtime.fast_decode or runtime.decode_executor == TRANSFORMERS:
        return TRANSFORMERS
    if runtime.decode_executor == "auto":
        return STATIC if device.type == "cuda" else FAST
    return runtime.decode_executor


def wants_static(model: torch.nn.Module, device: torch.device, runtime: RuntimeConfig,
                 max_len: int | None = None) -> bool:
    """Whether ``model`` decodes through the static executor given memory for its buffers (what they are
    planned for: a model that never uses them takes no share of the GPU and caps no batch)."""
    return wanted_executor(device, runtime) == STATIC and static_unsupported_reason(model, max_len) is None


def choose_executor(model: torch.nn.Module, device: torch.device, runtime: RuntimeConfig,
                    plan: SlotPlan | None, name: str = "model", max_len: int | None = None) -> str:
    """``static``, ``fast`` or ``transformers`` for ``model`` on ``device`` (see the module docstring);
    ``max_len``, the longest sequence, lets a sliding window that never binds decode like full attention."""
    wanted = wanted_executor(device, runtime)
    if wanted == TRANSFORMERS:
        return TRANSFORMERS
    if wanted == STATIC:
        reason = (static_unsupported_reason(model, max_len)
                  or (None if plan is not None else "no memory for static K/V"))
        if reason is None:
            return STATIC
        log.info("%s: no static decode (%s)", name, reason)
    reason = unsupported_reason(model, max_len)
    if reason is None:
        return FAST
    log.info("%s decodes through transformers: %s", name, reason)
    return TRANSFORMERS


def free_bytes(device: torch.device, utilization: float | None = None) -> int | None:
    """Memory the server may fill on a GPU (``device_memory.usable_bytes``); None (no limit) elsewhere."""
    return usable_bytes(device, utilization) if device.type == "cuda" else None


def static_kv_plans(bytes_per_token: list[int], devices: list[torch.device], max_rows: int, max_lens: list[int],
                    fraction: float = KV_MEMORY_FRACTION, static: list[bool] | None = None,
                    utilization: float | None = None) -> list[SlotPlan | None]:
    """Each model's static buffers: ``max_rows`` slots of its ``max_len`` tokens (the engine's KV budget at its
    limits), or as many slots as ``fraction`` of its GPU's free memory holds (within ``utilization`` of the GPU's
    total, when given: ``gpu_memory_utilization``; the models sharing a GPU share it in proportion to their
    budgets); None where not even one full-length row fits (that model keeps the
    growable cache and the ``fast`` executor, no graphs), and for the models ``static`` says decode otherwise.

    Fewer slots than ``max_rows`` cap the running batch (``running_cap``), as vLLM's KV pool caps its
    concurrency: a Llama-2-7B base at the default 32 sequences of 4,096 tokens wants 64 GiB of K/V, more than
    an 80 GB GPU has beside the weights, and without a cap it would lose its graphs altogether. (That 20-odd
    rows from graphs beat 32 launched op by op is expected from issue 18's profile, not yet measured.)
    """
    static = static if static is not None else [True] * len(devices)
    wanted = [per_token * max_rows * max_len if use else 0
              for per_token, max_len, use in zip(bytes_per_token, max_lens, static)]
    plans: list[SlotPlan | None] = []
    for index, device in enumerate(devices):
        if not static[index]:  # decodes on another executor: no buffers, no share of the GPU
            plans.append(None)
            continue
        free = free_bytes(device, utilization)
        available = None
        if free is not None:
            together = sum(w for w, d in zip(wanted, devices) if d == device)
            available = int(free * fraction * wanted[index] / together) if together else 0
        plan = plan_slots(bytes_per_token[index], max_rows, max_lens[index], available)
        if plan is None:
            log.warning("static K/V for one sequence of %d tokens does not fit in the %.1f GiB available on %s: that "
                        "model decodes without CUDA graphs (lower --max-model-len, or raise --gpu-memory-utilization, "
                        "to use them)", max_lens[index], (available or 0) / 2**30, device)
        elif plan.slots < max_rows:
            log.warning("static K/V for %d sequences of %d tokens needs %.1f GiB on %s, %.1f GiB available: %d "
                        "sequences run at once (lower --max-model-len for more)", max_rows, max_lens[index],
                        wanted[index] / 2**30, device, (available or 0) / 2**30, plan.slots)
        plans.append(plan)
    # The fewest slots cap the running batch, so no model needs more: the others' buffers shrink to match.
    cap = running_cap(plans, max_rows)
    return [None if plan is None else SlotPlan(cap, plan.capacity, plan.nbytes // plan.slots * cap) for plan in plans]


def running_cap(plans: list[SlotPlan | None], max_rows: int) -> int:
    """Sequences that may run at once: ``max_rows``, or fewer where a model's static buffers hold fewer."""
    return min([max_rows, *(plan.slots for plan in plans if plan is not None)])
