"""GGUF checkpoints (llama.cpp's one-file format) as a model source: finding the file and reading its header.

A model's ``path`` may name a ``.gguf`` file, or a directory that holds one and no config.json (``gguf_file``
picks one when a directory holds several, e.g. a Q4 and a Q8). transformers loads it with
``from_pretrained(directory, gguf_file=name)`` and dequantizes every tensor, so in memory the model takes its
dtype's bytes per parameter, not the file's 4 or 8 bits: that is what the placement counts. The header (the
metadata and every tensor's shape) is read with the ``gguf`` package, the ``gguf`` extra, without reading weights.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

GGUF_SUFFIX = ".gguf"
MISSING_PACKAGE = "reading GGUF files needs the gguf package: pip install 'proxy-serve[gguf]'"


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file's header says, in the terms of a transformers config.json."""

    config: dict[str, Any]  # model_type, hidden_size, num_hidden_layers, ... (what memory.py reads)
    parameters: int  # every tensor's elements: exact, and the count once dequantized
    quantizable_parameters: int  # the transformer blocks' matrices
    chat_template: str | None


def find_gguf(path: str, gguf_file: str | None = None) -> tuple[Path | None, str | None]:
    """``(file, error)`` for a GGUF source; ``(None, None)`` when ``path`` is not one (a model directory, a hub id).

    A ``.gguf`` file; a directory with ``gguf_file`` in it; a directory without config.json holding exactly one
    ``.gguf`` file. A directory with several and no ``gguf_file`` is an error naming them.
    """
    local = Path(path).expanduser()
    if gguf_file is not None:
        if local.is_file() and local.name == gguf_file:
            return local, None
        if not local.is_dir():
            return None, f"{path}: gguf_file {gguf_file!r} is set, so path must be the directory holding it"
        file = local / gguf_file
        if not file.is_file():
            return None, f"{path}: no file {gguf_file!r} in this directory (gguf_file)"
        return file, None
    if local.is_file() and local.suffix.lower() == GGUF_SUFFIX:
        return local, None
    if local.is_dir() and not (local / "config.json").is_file():
        files = sorted(p for p in local.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
        if len(files) == 1:
            return files[0], None
        if len(files) > 1:
            names = ", ".join(p.name for p in files[:4])
            return None, f"{path}: directory holds {len(files)} GGUF files ({names}); name one with gguf_file"
    return None, None


def gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def require_gguf() -> None:
    if not gguf_available():
        raise ImportError(MISSING_PACKAGE)


# llama.cpp's architecture names that differ from transformers' model types.
_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "command-r": "cohere", "gpt-oss": "gpt_oss"}


def _value(field) -> Any:
    return field.contents()


@lru_cache(maxsize=16)
def _read_header(file: Path, _mtime: float) -> GGUFHeader:
    from gguf import GGUFReader
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    reader = GGUFReader(file)
    fields = reader.fields
    architecture = str(_value(fields["general.architecture"]))
    model_type = _MODEL_TYPES.get(architecture, architecture)
    config: dict[str, Any] = {"model_type": model_type}
    for gguf_key, hf_key in GGUF_CONFIG_MAPPING.get(model_type, GGUF_CONFIG_MAPPING.get(architecture, {})).items():
        field = fields.get(f"{architecture}.{gguf_key}")
        if field is not None and hf_key:
            config[hf_key] = _value(field)
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in fields:
        config["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    names = {tensor.name for tensor in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names  # as transformers decides it
    parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    quantizable = sum(int(t.n_elements) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) >= 2)
    template = fields.get("tokenizer.chat_template")
    return GGUFHeader(config=config, parameters=parameters, quantizable_parameters=quantizable,
                      chat_template=str(_value(template)) if template is not None else None)


def read_header(file: Path) -> GGUFHeader:
    """The header of ``file`` (cached while the file is unchanged: parsing a 49k-token vocabulary takes seconds).

    Raises ``ImportError`` (naming the extra) without the ``gguf`` package, ``ValueError`` for a file that is not
    GGUF."""
    require_gguf()
    file = Path(file).resolve()
    try:
        return _read_header(file, file.stat().st_mtime)
    except (KeyError, IndexError, ValueError, struct.error) as error:
        raise ValueError(f"{file}: not a readable GGUF file ({error})") from error
