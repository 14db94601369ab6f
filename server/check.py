"""``proxy-serve --check``: the resolved settings and the placement plan as a table, or the first error.

The plan is the engine's (``proxy_engine.placement``), which prints nothing; this module is its report.
"""

from __future__ import annotations

import sys
from typing import TextIO

from proxy_engine.memory import gib
from proxy_engine.placement import PlacementPlan, plan_placement
from server.settings import ServerSettings


def _human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)

def format_plan(plan: PlacementPlan) -> str:
    """A table for ``proxy-serve --check``: one row per model, then per-device totals, warnings and errors."""
    header = ("model", "role", "path", "found", "devices", "dtype", "params", "weights GiB", "KV B/token", "vocab")
    rows = [header]
    for m in plan.models:
        dtype = m.dtype if m.quantization == "none" else f"{m.dtype}+{m.quantization}"
        path = f"{m.path} + adapter {m.adapter}" if m.adapter else m.path
        if m.unmerged_over:
            path += f" (unmerged over {m.unmerged_over})"
        rows.append((
            " = ".join([m.name, *m.also]), m.role, path, m.location, ",".join(m.devices), dtype,
            _human_count(m.memory.parameters if m.memory else None),
            gib(m.memory.weight_bytes if m.memory else None),
            f"{m.memory.kv_bytes_per_token:,}" if m.memory and m.memory.kv_bytes_per_token else "?",
            str(m.vocab_size or "?"),
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))

    if plan.device_weight_bytes:
        len_note = f"{plan.max_num_seqs} seqs x {plan.max_model_len} tokens" if plan.max_model_len else "unknown"
        lines += ["", f"per device (KV cache at the limits: {len_note}):"]
        for device in sorted(plan.device_weight_bytes):
            capacity = plan.device_capacity_bytes.get(device)
            budget = plan.device_kv_budget.get(device)
            lines.append(
                f"  {device:<8} weights {gib(plan.device_weight_bytes[device]):>8} GiB   "
                f"KV {gib(plan.device_kv_bytes.get(device, 0)):>8} GiB   "
                f"capacity {gib(capacity) if capacity else '?':>8} GiB"
                + ("" if budget is None else f"   K/V budget {gib(budget[0]):>8} GiB ({budget[1]})")
            )
    shared = plan.shared_vocab_size
    widths_seen = {m.vocab_size for m in plan.models if m.vocab_size}
    if len(widths_seen) > 1:
        lines.append(f"\nlogit widths differ {sorted(widths_seen)}: combined over the shared {shared} ids")
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    for error in plan.errors:
        lines.append(f"error: {error}")
    lines.append("placement OK" if plan.ok else f"placement FAILED ({len(plan.errors)} error(s))")
    return "\n".join(lines)


def check(settings: ServerSettings, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the settings (as JSON) and the plan, and return 0; or print the first error as one line, return 1."""
    out, err = out or sys.stdout, err or sys.stderr
    plan = plan_placement(settings.engine)
    if not plan.ok:
        print(f"error: {plan.first_error}", file=err)
        return 1
    print(settings.model_dump_json(indent=2), file=out)
    print(format_plan(plan), file=out)
    print(f"model ids: {', '.join(settings.model_ids)}", file=out)
    return 0
