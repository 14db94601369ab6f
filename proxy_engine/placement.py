"""Where each model goes, in which dtype, and how much memory it will take: decided before any weight loads.

``plan_placement(config)`` resolves every model of an ``EngineConfig`` (the base, then each expert /
anti-expert pair) to a local directory or a hub id already in the Hugging Face cache, a concrete dtype, a
list of devices, and a memory estimate read from its ``config.json`` (parameter count from the shapes, times
bytes per parameter; KV-cache bytes per token). Problems come back as one-line messages in
``PlacementPlan.errors`` rather than as exceptions, so ``proxy-serve --check`` can print all of them and a
loader can refuse to start on the first one.

``from_pretrained_kwargs(model_config)`` turns one ``ModelConfig`` into the keyword arguments of
``AutoModelForCausalLM.from_pretrained`` (device map, memory caps, dtype, quantization); ``input_device(model)``
says where a loaded (possibly sharded) model wants its input ids.

Nothing here loads weights, downloads, or imports a web framework. ``transformers`` is imported lazily and
only for ``BitsAndBytesConfig``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from proxy_engine.config import EngineConfig, ModelConfig

GiB = 1024**3

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Bytes per parameter of a quantized linear weight. 8-bit (LLM.int8): one byte plus a per-row scale (ignored).
# 4-bit (NF4/FP4): half a byte plus one fp32 absmax per block of 64 weights (4 / 64 bytes).
QUANT_BYTES: dict[str, float] = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}

# Families whose MLP is a plain up/down projection (not gated) and whose norms are LayerNorms with a bias.
_NON_GATED = {"gpt2", "gpt_bigcode", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "codegen"}
# Families with learned absolute position embeddings.
_ABSOLUTE_POSITIONS = {"gpt2", "gpt_bigcode", "opt"}
# Families whose config class defaults tie_word_embeddings to False (the transformers default is True).
_UNTIED_BY_DEFAULT = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo", "olmo2",
    "gpt_neox", "falcon", "cohere", "starcoder2",
}
# Families with a bias on the q, k and v projections whatever the config says.
_QKV_BIAS = {"qwen2", "qwen2_moe"}
# Families with RMSNorm on q and k per head.
_QK_NORM = {"qwen3", "qwen3_moe", "olmo2"}

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


# --------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class MemoryEstimate:
    """Sizes of one model, from its config.json (or, failing that, its safetensors headers)."""

    parameters: int
    quantizable_parameters: int  # the transformer blocks' linear weights (what bitsandbytes quantizes)
    weight_bytes: int  # at the resolved dtype and quantization
    kv_bytes_per_token: int  # K and V, all layers, at the compute dtype; 0 when unknown
    source: str  # "config.json" or "safetensors"


@dataclass
class ModelPlan:
    """One model's resolved placement."""

    name: str  # "base", "expert_0", "anti_expert_0", ...
    role: str  # "base" | "expert" | "anti_expert"
    pair: int | None  # the expert pair's index (None for the base)
    path: str  # as configured
    resolved_path: str | None  # the local directory (a cache snapshot for a hub id); None when not found
    location: str  # "local" | "hf-cache" | "missing"
    dtype: str  # resolved: float32 | bfloat16 | float16
    quantization: str  # none | 8bit | 4bit
    devices: list[str]  # concrete devices: ["cpu"], ["cuda:0"], ["cuda:0", "cuda:1"], ...
    architecture: str | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
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


# --------------------------------------------------------------------------------------------------- helpers
def parse_size(value: str | int) -> int:
    """'20GiB' -> 21474836480, '500MB' -> 500000000, 1024 -> 1024. Raises ValueError on anything else."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"not a memory size: {value!r} (use e.g. '20GiB' or '500MB')")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])


def _gib(n: int | float | None) -> str:
    if n is None:
        return "?"
    value = n / GiB
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.2g}"


def _human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def _cuda_device_count() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # a broken driver reads as no GPU
        return 0


def _gpu_total_bytes(index: int) -> int | None:
    try:
        return int(torch.cuda.get_device_properties(index).total_memory)
    except Exception:
        return None


def _gpu_free_bytes(index: int) -> int | None:
    try:
        return int(torch.cuda.mem_get_info(index)[0])
    except Exception:
        return None


def _host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _normalise_device(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def _accelerate_key(device: str) -> int | str:
    """'cuda:3' -> 3 (accelerate's GPU keys are ints); 'cpu' / 'mps' / 'disk' stay as they are."""
    device = _normalise_device(device)
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    if device in ("cpu", "mps", "disk"):
        return device
    raise ValueError(f"max_memory key {device!r}: use 'cuda:N', 'cpu', 'mps' or 'disk'")


def _model_names(config: EngineConfig) -> list[tuple[str, str, int | None, ModelConfig]]:
    names: list[tuple[str, str, int | None, ModelConfig]] = [("base", "base", None, config.base)]
    for i, pair in enumerate(config.experts):
        names.append((f"expert_{i}", "expert", i, pair.expert))
        names.append((f"anti_expert_{i}", "anti_expert", i, pair.anti_expert))
    return names


# ---------------------------------------------------------------------------------------- locating the model
def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID_RE.match(path)) and not path.startswith((".", "/", "~"))


def locate(model: ModelConfig, *, cache_dir: str | Path | None = None) -> tuple[str, Path | None, str | None]:
    """Find a model without downloading: ``(location, directory, error)``.

    ``location`` is "local" (a directory on disk), "hf-cache" (a hub id whose snapshot holds config.json and
    weights), or "missing" (with ``error`` saying why in one line).
    """
    local = Path(model.path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            return "missing", local, f"{model.path}: directory has no config.json (is it a model directory?)"
        if not _has_weights(local):
            return "missing", local, f"{model.path}: directory has no weights (*.safetensors or *.bin)"
        if missing := _missing_shards(local):
            return "missing", local, f"{model.path}: {len(missing)} weight shard(s) missing, e.g. {missing[0]}"
        return "local", local, None
    if local.exists():
        return "missing", None, f"{model.path}: not a directory"
    if not _looks_like_hub_id(model.path):
        return "missing", None, f"{model.path}: path not found (resolved to {local.resolve()})"
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return "missing", None, f"{model.path}: not a local directory and huggingface_hub is not installed"
    try:
        cached = try_to_load_from_cache(model.path, "config.json", cache_dir=cache_dir, revision=model.revision)
    except HFValidationError as exc:
        return "missing", None, f"{model.path}: not a local directory nor a valid hub id ({exc})"
    if not isinstance(cached, str):
        from huggingface_hub import constants

        where = cache_dir or constants.HF_HUB_CACHE
        rev = f" at revision {model.revision}" if model.revision else ""
        return "missing", None, (
            f"{model.path}: not a local directory and not in the Hugging Face cache{rev} ({where}); "
            f"fetch it first (hf download {model.path}): this server never downloads"
        )
    snapshot = Path(cached).parent
    if not _has_weights(snapshot):
        return "missing", snapshot, (
            f"{model.path}: config.json is cached but the weights are not (snapshot {snapshot}); "
            f"fetch them first (hf download {model.path})"
        )
    if missing := _missing_shards(snapshot):
        return "missing", snapshot, (
            f"{model.path}: {len(missing)} weight shard(s) missing from the cache, e.g. {missing[0]} "
            f"(an interrupted download? hf download {model.path})"
        )
    return "hf-cache", snapshot, None


def _has_weights(directory: Path) -> bool:
    patterns = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
    return any(any(directory.glob(p)) for p in patterns)


def _missing_shards(directory: Path) -> list[str]:
    """Shards an index names that are absent (an interrupted download); broken cache symlinks count."""
    missing: list[str] = []
    for index in (*directory.glob("*.safetensors.index.json"), *directory.glob("*.bin.index.json")):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError):
            continue
        missing += sorted(name for name in shards if not (directory / name).is_file())
    return missing


def read_config(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model under text_config; the LM is what we size."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and text.get("hidden_size"):
        merged = dict(text)
        merged.setdefault("model_type", cfg.get("model_type"))
        if "tie_word_embeddings" in cfg and "tie_word_embeddings" not in text:
            merged["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        return merged
    return cfg


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return None


def config_dtype(cfg: dict[str, Any] | None) -> str | None:
    """The checkpoint's dtype as config.json states it (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    if not cfg:
        return None
    for source in (cfg, cfg.get("text_config") or {}):
        value = source.get("dtype") or source.get("torch_dtype")
        if isinstance(value, str):
            value = value.removeprefix("torch.")
            if value in DTYPE_BYTES:
                return value
    return None


def resolve_dtype(model: ModelConfig, cfg: dict[str, Any] | None) -> str:
    """An explicit dtype as given; ``auto`` -> the checkpoint's dtype, or float32 when it names none.

    This is what ``from_pretrained(dtype="auto")`` does too, so the plan and the loader agree.
    """
    if model.dtype != "auto":
        return model.dtype
    return config_dtype(cfg) or "float32"


# ----------------------------------------------------------------------------------------- memory estimation
def count_parameters(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """``(total, quantizable)`` parameter counts from a config.json dict, or None if its shape keys are missing.

    Exact for the Llama / Mistral / Qwen2 families (it reproduces their published counts); close for GPT-2,
    GPT-NeoX style and Mixtral / Qwen-MoE style models. ``quantizable`` counts the transformer blocks' linear
    weights, which is what bitsandbytes replaces (embeddings, norms, biases and the LM head stay unquantized).
    """
    cfg = _text_config(cfg)
    model_type = str(cfg.get("model_type") or "")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head")
    vocab = cfg.get("vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
        return None
    kv_heads = _first(cfg, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if cfg.get("multi_query") else heads
    head_dim = cfg.get("head_dim") or hidden // heads
    intermediate = _first(cfg, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size") or 4 * hidden
    gated = model_type not in _NON_GATED
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = model_type not in _UNTIED_BY_DEFAULT

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attn_linear = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    attn_bias = 0
    if cfg.get("attention_bias") or not gated:
        attn_bias = q_out + 2 * kv_out + hidden
    elif model_type in _QKV_BIAS:
        attn_bias = q_out + 2 * kv_out
    qk_norm = 2 * head_dim if model_type in _QK_NORM else 0

    def mlp(inner: int) -> tuple[int, int]:
        if gated:
            return 3 * hidden * inner, (2 * inner + hidden if cfg.get("mlp_bias") else 0)
        return 2 * hidden * inner, inner + hidden

    n_experts = _first(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    if isinstance(n_experts, int) and n_experts > 1:
        expert_inner = cfg.get("moe_intermediate_size") or intermediate
        e_linear, e_bias = mlp(expert_inner)
        mlp_linear, mlp_bias = n_experts * e_linear, n_experts * e_bias
        router = hidden * n_experts
        shared_inner = cfg.get("shared_expert_intermediate_size")
        if shared_inner:
            s_linear, s_bias = mlp(shared_inner)
            mlp_linear += s_linear
            mlp_bias += s_bias
            router += hidden  # the shared expert's gate
    else:
        mlp_linear, mlp_bias = mlp(intermediate)
        router = 0
    norm = 2 * hidden if not gated else hidden  # LayerNorm has a bias, RMSNorm has not

    per_layer_linear = attn_linear + mlp_linear
    per_layer_other = attn_bias + qk_norm + mlp_bias + router + 2 * norm
    embeddings = vocab * hidden
    if model_type in _ABSOLUTE_POSITIONS:
        embeddings += (_first(cfg, "max_position_embeddings", "n_positions") or 0) * hidden
    lm_head = 0 if tied else vocab * hidden
    total = layers * (per_layer_linear + per_layer_other) + embeddings + lm_head + norm
    return total, layers * per_layer_linear


def kv_bytes_per_token(cfg: dict[str, Any], dtype: str) -> int:
    """Bytes of K and V per token over all layers (0 when the config lacks the shapes)."""
    cfg = _text_config(cfg)
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads)):
        return 0
    kv_heads = _first(cfg, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if cfg.get("multi_query") else heads
    head_dim = cfg.get("head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def count_safetensors_parameters(directory: Path) -> int | None:
    """Exact parameter count from the safetensors headers (a few KB read per file; no tensor is loaded)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error):
            return None
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info.get("shape", []))
    return total


def estimate_memory(
    cfg: dict[str, Any] | None, dtype: str, quantization: str = "none", directory: Path | None = None
) -> MemoryEstimate | None:
    counted = count_parameters(cfg) if cfg else None
    source = "config.json"
    if counted is None and directory is not None:
        exact = count_safetensors_parameters(directory)
        if exact is None:
            return None
        # Without the shapes we cannot tell linear weights apart: treat all as quantizable (a lower bound).
        counted, source = (exact, exact), "safetensors"
    if counted is None:
        return None
    total, quantizable = counted
    unit = DTYPE_BYTES[dtype]
    if quantization in QUANT_BYTES:
        weight_bytes = int(quantizable * QUANT_BYTES[quantization] + (total - quantizable) * unit)
    else:
        weight_bytes = total * unit
    return MemoryEstimate(
        parameters=total,
        quantizable_parameters=quantizable,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_bytes_per_token(cfg, dtype) if cfg else 0,
        source=source,
    )


# ------------------------------------------------------------------------------------------------- devices
def resolve_devices(model: ModelConfig, device_count: int) -> list[str]:
    """The concrete devices a model will occupy: 'auto' means every visible GPU (or the CPU when none)."""
    if isinstance(model.device, list):
        return [_normalise_device(d) for d in model.device]
    if model.device == "auto":
        return [f"cuda:{i}" for i in range(device_count)] or ["cpu"]
    return [_normalise_device(model.device)]


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
            _accelerate_key(key)
            parse_size(value)
        except ValueError as exc:
            errors.append(f"{name}: max_memory: {exc}")
    return errors


# ---------------------------------------------------------------------------------------------------- plan
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
        gpu_memory = {i: total for i in range(count) if (total := _gpu_total_bytes(i)) is not None}
    plan = PlacementPlan(models=[], max_num_seqs=config.limits.max_num_seqs)

    for name, role, pair, model in _model_names(config):
        location, directory, error = locate(model, cache_dir=cache_dir)
        if error:
            plan.errors.append(f"{name}: {error}")
        cfg = read_config(directory) if directory is not None and location != "missing" else None
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
            if model.chat_template is None and not _has_chat_template(directory):
                plan.errors.append(
                    f"{name}: prompt_format is chat but the tokenizer has no chat template; set chat_template"
                )
        memory = estimate_memory(cfg, dtype, model.quantization, directory) if location != "missing" else None
        plan.models.append(
            ModelPlan(
                name=name, role=role, pair=pair, path=model.path,
                resolved_path=str(directory) if directory is not None and location != "missing" else None,
                location=location, dtype=dtype, quantization=model.quantization, devices=devices,
                architecture=((cfg or {}).get("architectures") or [None])[0],
                vocab_size=_text_config(cfg).get("vocab_size") if cfg else None,
                max_position_embeddings=_text_config(cfg).get("max_position_embeddings") if cfg else None,
                memory=memory,
            )
        )

    _account_memory(plan, config, gpu_memory)
    return plan


def _has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _account_memory(plan: PlacementPlan, config: EngineConfig, gpu_memory: dict[int, int]) -> None:
    """Spread each model's weights and worst-case KV cache over its devices and compare with capacity.

    Weights over several GPUs are split in proportion to their caps (evenly when uncapped), which is roughly
    what accelerate's balanced device map does. Over capacity with the weights alone is an error; over it
    only with a full KV cache (every sequence at ``max_model_len``) is a warning, since caches grow with use.
    """
    limits = config.limits
    known_lens = [m.max_position_embeddings for m in plan.models if m.max_position_embeddings]
    plan.max_model_len = limits.max_model_len or (min(known_lens) if known_lens else None)
    model_configs = {name: model for name, _, _, model in _model_names(config)}
    for mp in plan.models:
        if mp.memory is None:
            continue
        caps = {
            _normalise_device(k): parse_size(v)
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
                    f"{mp.name}: weights need ~{_gib(mp.memory.weight_bytes)} GiB but max_memory allows only "
                    f"{_gib(total_cap)} GiB on {', '.join(mp.devices)}"
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
        elif device == "cpu":
            capacity = _host_ram_bytes()
        else:
            capacity = None
        if capacity is None:
            continue
        plan.device_capacity_bytes[device] = capacity
        weights, kv = plan.device_weight_bytes[device], plan.device_kv_bytes.get(device, 0)
        if weights > capacity:
            plan.errors.append(
                f"{device}: the weights placed on it need ~{_gib(weights)} GiB but it has {_gib(capacity)} GiB"
            )
        elif weights + kv > capacity:
            plan.warnings.append(
                f"{device}: weights ~{_gib(weights)} GiB + KV cache at the limits ~{_gib(kv)} GiB exceed its "
                f"{_gib(capacity)} GiB; lower limits.max_num_seqs or limits.max_model_len"
            )


def _safe_size(value: str) -> int | None:
    try:
        return parse_size(value)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ loading
def from_pretrained_kwargs(model_config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``AutoModelForCausalLM.from_pretrained(model_config.path, **kwargs)``.

    - ``dtype``: a ``torch.dtype``, or "auto" (the checkpoint's dtype; float32 when it names none).
    - ``device_map``: None for the CPU (a plain load), ``{"": device}`` for one device, "auto" for "auto" and
      for a list of GPUs; a list also gets ``max_memory`` holding exactly those GPUs (the others absent, so
      accelerate puts nothing on them), each capped by ``max_memory`` or else by its free memory now.
    - ``quantization_config``: a ``BitsAndBytesConfig`` for 8bit / 4bit.
    - ``local_files_only=True`` always (never download); ``revision`` and ``trust_remote_code`` as configured.
    """
    kwargs: dict[str, Any] = {
        "dtype": "auto" if model_config.dtype == "auto" else _TORCH_DTYPES[model_config.dtype],
        "local_files_only": True,
        "trust_remote_code": model_config.trust_remote_code,
    }
    if model_config.revision is not None:
        kwargs["revision"] = model_config.revision
    caps: dict[int | str, int] = {
        _accelerate_key(k): parse_size(v) for k, v in (model_config.max_memory or {}).items()
    }
    device = model_config.device
    if isinstance(device, list):
        gpus = [_accelerate_key(d) for d in device]
        max_memory: dict[int | str, int] = {}
        for gpu in gpus:
            cap = caps.get(gpu)
            if cap is None:
                cap = _gpu_free_bytes(gpu) if isinstance(gpu, int) else None
            if cap is None:
                raise ValueError(
                    f"{model_config.path}: cannot size cuda:{gpu} (no such GPU visible); give max_memory for it"
                )
            max_memory[gpu] = cap
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = max_memory
    elif device == "auto":
        kwargs["device_map"] = "auto"
        if caps:
            kwargs["max_memory"] = caps
    elif device == "cpu":
        kwargs["device_map"] = None
    else:
        kwargs["device_map"] = {"": _normalise_device(device)}

    if model_config.quantization != "none":
        from transformers import BitsAndBytesConfig

        if model_config.quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            compute = _TORCH_DTYPES.get(model_config.dtype, torch.bfloat16)
            if model_config.dtype == "auto":  # the checkpoint's 16-bit dtype when it names one
                _, directory, _ = locate(model_config)
                named = config_dtype(read_config(directory)) if directory is not None else None
                compute = _TORCH_DTYPES[named] if named and named != "float32" else torch.float16
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
    return kwargs


def input_device(model: torch.nn.Module) -> torch.device:
    """Where input ids must go: the embedding layer's device (the first shard when layers are spread)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and device_map:
        first = next(iter(device_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        if first not in ("disk", "meta"):
            return torch.device(first)
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------- report
def format_plan(plan: PlacementPlan) -> str:
    """A table for ``proxy-serve --check``: one row per model, then per-device totals, warnings and errors."""
    header = ("model", "role", "path", "found", "devices", "dtype", "params", "weights GiB", "KV B/token", "vocab")
    rows = [header]
    for m in plan.models:
        dtype = m.dtype if m.quantization == "none" else f"{m.dtype}+{m.quantization}"
        rows.append((
            m.name, m.role, m.path, m.location, ",".join(m.devices), dtype,
            _human_count(m.memory.parameters if m.memory else None),
            _gib(m.memory.weight_bytes if m.memory else None),
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
            lines.append(
                f"  {device:<8} weights {_gib(plan.device_weight_bytes[device]):>8} GiB   "
                f"KV {_gib(plan.device_kv_bytes.get(device, 0)):>8} GiB   "
                f"capacity {_gib(capacity) if capacity else '?':>8} GiB"
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


def check(config: EngineConfig, *, stream: Any = None) -> int:
    """``--check`` in one call: print the plan and return 0, or print the first error as one line and return 1."""
    import sys

    out = stream or sys.stdout
    plan = plan_placement(config)
    if plan.ok:
        print(format_plan(plan), file=out)
        return 0
    print(f"error: {plan.first_error}", file=out if stream else sys.stderr)
    return 1
