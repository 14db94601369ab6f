"""Finding a model on disk without downloading it, and reading what its files say.

``locate(model)`` resolves a configured path to a local directory, or a hub id to its snapshot in the Hugging
Face cache, checking that config.json and every weight shard are there; problems are one-line messages.
``read_config`` / ``text_config`` read config.json (the language model's part of a multimodal one).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from proxy_engine.config import ModelConfig
from proxy_engine.gguf_files import find_gguf

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID_RE.match(path)) and not path.startswith((".", "/", "~"))

def locate(model: ModelConfig, *, cache_dir: str | Path | None = None) -> tuple[str, Path | None, str | None]:
    """Find a model without downloading: ``(location, directory, error)``.

    ``location`` is "local" (a directory on disk), "hf-cache" (a hub id whose snapshot holds config.json and
    weights), "gguf" (a GGUF file; ``directory`` is the one holding it), or "missing" (with ``error`` saying why
    in one line).
    """
    gguf, error = find_gguf(model.path, model.gguf_file)
    if error:
        return "missing", None, error
    if gguf is not None:
        return "gguf", gguf.parent, None
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
        return "missing", None, f"{model.path}: not a directory nor a .gguf file"
    if not looks_like_hub_id(model.path):
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

def context_length(cfg: dict[str, Any]) -> int | None:
    """The model's context in tokens from its config (None when it states none): max_position_embeddings (or
    an older name), or YaRN's ``original_max_position_embeddings x factor`` when that is longer, as vLLM derives
    max_model_len: Qwen2.5's documented way to serve 128K tokens is to add YaRN with factor 4 to its 32K
    config.json. Other scalings are left at the stated context: with ``linear`` the stated one is sometimes
    already the stretched one (Gemma-3 states 128K beside a factor of 8), and past it dynamic NTK re-derives the
    frequencies from the batch's longest row, so a row's tokens would depend on the rows beside it."""
    cfg = text_config(cfg)
    positions = next((v for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
                      if isinstance(v := cfg.get(key), int) and v > 0), None)
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if positions is None or not isinstance(rope, dict):
        return positions
    trained, factor = rope.get("original_max_position_embeddings"), rope.get("factor")
    if (rope.get("rope_type") or rope.get("type")) != "yarn" or not isinstance(trained, int) \
            or not isinstance(factor, (int, float)):
        return positions
    return max(positions, int(trained * factor))


def max_model_len_error(requested: int | None, contexts: dict[str, int]) -> str | None:
    """Why ``limits.max_model_len`` cannot be served (None when it can): it is more than the context of some model
    (``contexts``: name -> tokens). vLLM refuses the same at start-up, rather than serve less than was set."""
    if requested is None or not contexts:
        return None
    name, shortest = min(contexts.items(), key=lambda item: item[1])
    if requested <= shortest:
        return None
    return (f"limits.max_model_len ({requested}) is more than the context of {name} ({shortest} tokens: its "
            f"max_position_embeddings, or YaRN's original context x factor); set at most {shortest} or leave it unset")


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model under text_config; the LM is what we size."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and text.get("hidden_size"):
        merged = dict(text)
        merged.setdefault("model_type", cfg.get("model_type"))
        if "tie_word_embeddings" in cfg and "tie_word_embeddings" not in text:
            merged["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        return merged
    return cfg

def has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def read_generation_config(directory: Path) -> dict[str, Any] | None:
    """A model's generation_config.json (its authors' generation settings), or None if absent or unreadable."""
    try:
        values = json.loads((directory / "generation_config.json").read_text())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None
