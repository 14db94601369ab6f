"""Where each model goes, in which dtype, and how much memory it will take: decided before any weight loads.

``plan_placement(config)`` resolves every model of an ``EngineConfig`` (the base, then each expert /
anti-expert pair) to its files (model_files.py), a concrete dtype, a list of devices, and a memory estimate
(memory.py), then adds the estimates up per device against what each device holds. Problems come back as
one-line messages in ``PlacementPlan.errors`` rather than as exceptions, so ``proxy-serve --check`` can show
all of them (its report is the server's, server/check.py) and the server can refuse to start on the first.

Nothing here loads weights, downloads, prints, or imports a web framework.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from proxy_engine.adapter import find_adapter
from proxy_engine.attention_masks import unsupported_layers
from proxy_engine.config import EngineConfig, ModelConfig
from proxy_engine.device_memory import free_bytes, total_bytes
from proxy_engine.executor.selection import STATIC, wanted_executor
from proxy_engine.gguf_files import GGUFHeader, find_gguf, read_header
from proxy_engine.kv_budget import budget_limit, short_context
from proxy_engine.layout import ModelLayout
from proxy_engine.lora import merge_reason
from proxy_engine.memory import MemoryEstimate, counted_memory, estimate_memory, gib, parse_size, resolve_dtype
from proxy_engine.model_files import (
    context_length,
    has_chat_template,
    locate,
    max_model_len_error,
    read_config,
    text_config,
)


# --------------------------------------------------------------------------------------------------- results
@dataclass
class ModelPlan:
    """One model's resolved placement."""

    name: str  # "base", "expert_0", "anti_expert_0", ...
    role: str  # "base" | "expert" | "anti_expert"
    pair: int | None  # the expert pair's index (None for the base)
    path: str  # as configured
    resolved_path: str | None  # the local directory (a cache snapshot for a hub id); None when not found
    location: str  # "local" | "hf-cache" | "gguf" | "missing"
    dtype: str  # resolved: float32 | bfloat16 | float16
    quantization: str  # none | 8bit | 4bit
    devices: list[str]  # concrete devices: ["cpu"], ["cuda:0"], ["cuda:0", "cuda:1"], ...
    adapter: str | None = None  # a PEFT adapter over it (proxy_engine/adapter.py)
    unmerged_over: str | None = None  # the model whose weights its LoRA runs over, unmerged (lora.py)
    also: list[str] = field(default_factory=list)  # the other roles this one model plays (layout.py): loaded once
    architecture: str | None = None
    vocab_size: int | None = None
    context_length: int | None = None  # tokens (model_files.context_length)
    memory: MemoryEstimate | None = None

    @property
    def weight_bytes(self) -> int | None:
        return self.memory.weight_bytes if self.memory else None

@dataclass
class PlacementPlan:
    models: list[ModelPlan]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Estimated bytes per device: weights, plus the KV cache when every sequence is at the length cap.
    device_weight_bytes: dict[str, int] = field(default_factory=dict)
    device_kv_bytes: dict[str, int] = field(default_factory=dict)
    device_capacity_bytes: dict[str, int] = field(default_factory=dict)
    # The K/V budget of each device that has one (kv_budget.py): bytes, and where the figure comes from.
    device_kv_budget: dict[str, tuple[int, str]] = field(default_factory=dict)
    max_num_seqs: int = 0
    max_model_len: int | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def first_error(self) -> str | None:
        return self.errors[0] if self.errors else None

    @property
    def shared_vocab_size(self) -> int | None:
        sizes = [m.vocab_size for m in self.models if m.vocab_size]
        return min(sizes) if sizes else None


# --------------------------------------------------------------------------------------------------- devices
def _cuda_device_count() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # a broken driver reads as no GPU
        return 0

def normalise_device(device: str) -> str:
    return "cuda:0" if device == "cuda" else device

def accelerate_key(device: str) -> int | str:
    """'cuda:3' -> 3 (accelerate's GPU keys are ints); 'cpu' / 'mps' / 'disk' stay as they are."""
    device = normalise_device(device)
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    if device in ("cpu", "mps", "disk"):
        return device
    raise ValueError(f"max_memory key {device!r}: use 'cuda:N', 'cpu', 'mps' or 'disk'")

def resolve_devices(model: ModelConfig, device_count: int) -> list[str]:
    """The concrete devices a model will occupy: 'auto' means every visible GPU (or the CPU when none)."""
    if isinstance(model.device, list):
        return [normalise_device(d) for d in model.device]
    if model.device == "auto":
        return [f"cuda:{i}" for i in range(device_count)] or ["cpu"]
    return [normalise_device(model.device)]

def _device_errors(name: str, model: ModelConfig, devices: list[str], device_count: int) -> list[str]:
    errors = []
    for device in devices:
        if device.startswith("cuda:"):
            index = int(device.split(":", 1)[1])
            if index >= device_count:
                errors.append(
                    f"{name}: device {device} requested but torch.cuda.device_count() = {device_count}"
                    + (" (no CUDA GPU visible; check the driver, CUDA_VISIBLE_DEVICES or docker --gpus)"
                       if device_count == 0 else "")
                )
        elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            errors.append(f"{name}: device mps requested but torch.backends.mps.is_available() is False")
    if len(set(devices)) != len(devices):
        errors.append(f"{name}: device list names a GPU twice: {devices}")
    for key, value in (model.max_memory or {}).items():
        try:
            accelerate_key(key)
            parse_size(value)
        except ValueError as exc:
            errors.append(f"{name}: max_memory: {exc}")
    return errors


# ------------------------------------------------------------------------------------------------------ plan
def _model_names(layout: ModelLayout) -> list[tuple[str, str, int | None, ModelConfig, list[str]]]:
    """Each distinct model as the loader loads it (``ModelLayout``: a model several roles name is planned, and
    counted in memory, once): its first role's name, role and pair, its config, and its other roles' names."""
    roles: list[list[tuple[str, str, int | None]]] = [[("base", "base", None)]] + [[] for _ in layout.slots[1:]]
    for i, (expert, anti) in enumerate(layout.pairs):
        roles[expert].append((f"expert_{i}", "expert", i))
        roles[anti].append((f"anti_expert_{i}", "anti_expert", i))
    return [(*played[0], slot.config, [name for name, _, _ in played[1:]])
            for slot, played in zip(layout.slots, roles, strict=True)]

def plan_placement(
    config: EngineConfig,
    *,
    device_count: int | None = None,
    gpu_memory: dict[int, int] | None = None,
    cache_dir: str | Path | None = None,
) -> PlacementPlan:
    """Resolve every model of ``config`` and check that it can be loaded where it is asked to go.

    ``device_count`` and ``gpu_memory`` (bytes per GPU index) default to what torch sees; tests pass them to
    play another machine. ``cache_dir`` is the Hugging Face hub cache to look in (default: the usual one).
    """
    count = _cuda_device_count() if device_count is None else device_count
    if gpu_memory is None:
        gpu_memory = {i: total for i in range(count) if (total := total_bytes(torch.device("cuda", i))) is not None}
    plan = PlacementPlan(models=[], max_num_seqs=config.limits.max_num_seqs)

    layout = ModelLayout.of(config)
    names = _model_names(layout)
    for index, (name, role, pair, model, also) in enumerate(names):
        location, directory, error = locate(model, cache_dir=cache_dir)
        if error:
            plan.errors.append(f"{name}: {error}")
        gguf_path = find_gguf(model.path, model.gguf_file)[0] if location == "gguf" else None
        gguf = _gguf_header(name, model.path, gguf_path, plan) if gguf_path is not None else None
        if gguf is not None:
            cfg = gguf.config
        else:
            cfg = read_config(directory) if directory is not None and location not in ("missing", "gguf") else None
        if cfg:
            decoder = text_config(cfg)
            layers_reason = unsupported_layers(decoder.get("model_type"), decoder.get("layer_types"))
            if layers_reason is not None:
                plan.errors.append(f"{name}: {layers_reason}")
        dtype = resolve_dtype(model, cfg)
        devices = resolve_devices(model, count)
        plan.errors.extend(_device_errors(name, model, devices, count))
        if model.quantization != "none":
            if importlib.util.find_spec("bitsandbytes") is None:
                plan.errors.append(
                    f"{name}: quantization {model.quantization} needs bitsandbytes, which is not installed "
                    "(pip install bitsandbytes)"
                )
            if devices == ["cpu"]:
                plan.warnings.append(f"{name}: {model.quantization} quantization on the CPU is slow or unsupported")
        if model.dtype == "float16" and devices == ["cpu"]:
            plan.warnings.append(f"{name}: float16 on the CPU is slow; prefer float32 or bfloat16")
        if model.max_memory and not (isinstance(model.device, list) or model.device == "auto"):
            plan.warnings.append(f"{name}: max_memory is ignored for a single device ({model.device})")
        if model.prompt_format == "chat" and directory is not None and location != "missing":
            if model.chat_template is None and not _has_template(model, directory, gguf):
                plan.errors.append(
                    f"{name}: prompt_format is chat but the tokenizer has no chat template; set chat_template"
                )
        if gguf is not None:
            if model.quantization != "none":
                plan.errors.append(f"{name}: quantization {model.quantization} does not apply to a GGUF file "
                                   "(transformers dequantizes it on load); leave quantization at none")
            counted = (gguf.parameters, gguf.quantizable_parameters)
            memory = counted_memory(counted, cfg, dtype, "none", "gguf")  # dequantized: dtype bytes per parameter
        elif location == "gguf":
            memory = None  # the header could not be read (the error says why)
        else:
            memory = estimate_memory(cfg, dtype, model.quantization, directory) if location != "missing" else None
        host = layout.adapter_host(index)
        unmerged_over = names[host][0] if host is not None and _expect_unmerged(model, devices, config) else None
        if unmerged_over is not None and memory is not None:  # no copy of the weights: the adapter's terms
            memory = replace(memory, weight_bytes=_adapter_bytes(model.adapter))
        plan.models.append(
            ModelPlan(
                name=name, role=role, pair=pair, path=model.path, adapter=model.adapter, also=also,
                unmerged_over=unmerged_over,
                resolved_path=_resolved_path(location, directory, gguf_path),
                location=location, dtype=dtype, quantization=model.quantization, devices=devices,
                architecture=((cfg or {}).get("architectures") or [None])[0]
                or (f"{cfg['model_type']} (GGUF)" if gguf is not None else None),
                vocab_size=text_config(cfg).get("vocab_size") if cfg else None,
                context_length=context_length(cfg) if cfg else None,
                memory=memory,
            )
        )

    _account_memory(plan, config, gpu_memory)
    return plan

def _expect_unmerged(model: ModelConfig, devices: list[str], config: EngineConfig) -> bool:
    """Whether the loader will run this adapter unmerged over its host (``loader.load_unmerged``'s rule, foreseen
    from the files and the device: the static step is taken as supported, so ``auto`` on a GPU plans a copy)."""
    static = wanted_executor(torch.device(devices[0]), config.runtime) == STATIC
    directory = find_adapter(model.adapter) if model.adapter else None
    return merge_reason(directory, config.runtime.lora_mode, static) is None


def _adapter_bytes(adapter: str | None) -> int:
    directory = find_adapter(adapter) if adapter else None
    if directory is None:
        return 0
    return sum(f.stat().st_size for f in directory.glob("adapter_model.*"))


def _gguf_header(name: str, path: str, file: Path, plan: PlacementPlan) -> GGUFHeader | None:
    """The GGUF file's header, or None with the reason in ``plan.errors`` (the gguf extra missing, a bad file)."""
    try:
        return read_header(file)
    except (ImportError, ValueError) as error:
        plan.errors.append(f"{name}: {path}: {error}")
        return None

def _resolved_path(location: str, directory: Path | None, gguf_path: Path | None) -> str | None:
    if gguf_path is not None:
        return str(gguf_path)
    return str(directory) if directory is not None and location != "missing" else None

def _has_template(model: ModelConfig, directory: Path, gguf: GGUFHeader | None) -> bool:
    """Whether the tokenizer the model will use has a chat template (a separate tokenizer directory's, if set)."""
    if model.tokenizer is not None and Path(model.tokenizer).expanduser().is_dir():
        return has_chat_template(Path(model.tokenizer).expanduser())
    return bool(gguf.chat_template) if gguf is not None else has_chat_template(directory)

def _account_memory(plan: PlacementPlan, config: EngineConfig, gpu_memory: dict[int, int]) -> None:
    """Spread each model's weights and worst-case KV cache over its devices and compare with capacity.

    Weights over several GPUs are split in proportion to their caps (evenly when uncapped), which is roughly
    what accelerate's balanced device map does. Over capacity with the weights alone is an error; over it
    only with a full KV cache (every sequence at ``max_model_len``) is a warning, since caches grow with use.
    """
    limits = config.limits
    known_lens = [m.context_length for m in plan.models if m.context_length]
    plan.max_model_len = limits.max_model_len or (min(known_lens) if known_lens else None)
    too_long = max_model_len_error(limits.max_model_len, {m.name: m.context_length for m in plan.models
                                                          if m.context_length})
    if too_long is not None:
        (plan.warnings if limits.allow_long_max_model_len else plan.errors).append(too_long)
    model_configs = {name: model for name, _, _, model, _ in _model_names(ModelLayout.of(config))}
    for mp in plan.models:
        if mp.memory is None:
            continue
        caps = {
            normalise_device(k): parse_size(v)
            for k, v in (model_configs[mp.name].max_memory or {}).items()
            if _safe_size(v) is not None
        }
        device_caps = [caps.get(d) for d in mp.devices]
        shares = [1 / len(mp.devices)] * len(mp.devices)
        if len(mp.devices) > 1 and all(c is not None for c in device_caps):
            known = [c for c in device_caps if c is not None]
            total_cap = sum(known)
            if mp.memory.weight_bytes > total_cap:
                plan.errors.append(
                    f"{mp.name}: weights need ~{gib(mp.memory.weight_bytes)} GiB but max_memory allows only "
                    f"{gib(total_cap)} GiB on {', '.join(mp.devices)}"
                )
            if total_cap:
                shares = [c / total_cap for c in known]
        kv = mp.memory.kv_bytes_per_token * limits.max_num_seqs * (plan.max_model_len or 0)
        if config.prefix_cache.enabled:  # the prefix cache's budget is a share of that, on top of it
            kv = int(kv * (1 + config.prefix_cache.memory_fraction))
        for device, share in zip(mp.devices, shares):
            plan.device_weight_bytes[device] = plan.device_weight_bytes.get(device, 0) + int(
                mp.memory.weight_bytes * share
            )
            plan.device_kv_bytes[device] = plan.device_kv_bytes.get(device, 0) + int(kv * share)

    for device in plan.device_weight_bytes:
        if device.startswith("cuda:"):
            capacity = gpu_memory.get(int(device.split(":", 1)[1]))
            if capacity is not None and config.runtime.gpu_memory_utilization is not None:
                capacity = int(capacity * config.runtime.gpu_memory_utilization)
        elif device == "cpu":
            capacity = total_bytes(torch.device("cpu"))
        else:
            capacity = None
        if capacity is None:
            continue
        plan.device_capacity_bytes[device] = capacity
        weights, kv = plan.device_weight_bytes[device], plan.device_kv_bytes.get(device, 0)
        budget = _kv_budget(plan, config, device, weights)
        held = kv if budget is None else min(kv, budget)  # the caches grow no further than the budget
        if weights > capacity:
            plan.errors.append(
                f"{device}: the weights placed on it need ~{gib(weights)} GiB but it has {gib(capacity)} GiB"
            )
        elif weights + held > capacity:
            what = "KV cache at the limits" if held == kv else "the K/V budget"
            plan.warnings.append(
                f"{device}: weights ~{gib(weights)} GiB + {what} ~{gib(held)} GiB exceed its "
                f"{gib(capacity)} GiB; lower limits.max_num_seqs or limits.max_model_len"
                + ("" if budget is None else ", or --kv-cache-memory")
            )


def _kv_budget(plan: PlacementPlan, config: EngineConfig, device: str, weights: int) -> int | None:
    """The device's K/V budget as the engine will set it (the RAM available now, less the weights still to load,
    for the CPU's default), recorded in the plan; a context one sequence cannot fill within it is a warning (the
    engine shortens it) or, when limits.max_model_len asked for it, an error (the engine refuses it)."""
    limit = budget_limit(torch.device(device), config.runtime.kv_cache_memory,
                         lambda: None if (free := free_bytes(torch.device(device))) is None else max(0, free - weights))
    if limit is None:
        return None
    plan.device_kv_budget[device] = limit
    on = [m for m in plan.models if device in m.devices and m.memory and m.memory.kv_bytes_per_token]
    wanted = plan.max_model_len or max((m.context_length or 0 for m in on), default=0)
    short = short_context(device, *limit, [m.memory.kv_bytes_per_token for m in on], [wanted] * len(on),
                          config.limits.max_model_len is not None) if on and wanted else None
    if short is not None and short.refused:
        plan.errors.append(short.error)
    elif short is not None:
        plan.warnings.append(f"{short.problem}: the server will serve sequences up to {short.longest} tokens")
    return limit[0]

def _safe_size(value: str) -> int | None:
    try:
        return parse_size(value)
    except ValueError:
        return None
