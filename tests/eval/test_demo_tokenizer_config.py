"""The demo family's tokenizers load with transformers 4.x as well as 5.x (evaluation harnesses pin 4.x).

transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` and an ``extra_special_tokens`` list, which
4.x cannot read (no such class; it expects a dict there). The demo's files, and what ``scripts/train_demo.py``
writes when retraining, name ``PreTrainedTokenizerFast`` and ``additional_special_tokens``, which both read.
(Checked by hand with transformers 4.57.1 and 5.24.0: the same ids, special tokens and chat templates.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from proxy_engine.families import build_tokenizer  # noqa: E402
from scripts.train_demo import portable_tokenizer_config  # noqa: E402

# Tokenizer classes transformers 4.x exports that a tokenizer.json-only directory can name.
TRANSFORMERS_4_CLASSES = {"PreTrainedTokenizerFast", "GPT2TokenizerFast", "LlamaTokenizerFast"}
DEMO_DIRS = sorted(p.parent for p in (ROOT / "demo" / "models").glob("*/tokenizer_config.json"))


def assert_portable(config: dict) -> None:
    assert config["tokenizer_class"] in TRANSFORMERS_4_CLASSES
    assert not isinstance(config.get("extra_special_tokens"), list)  # 4.x calls .items() on it
    assert not {"backend", "is_local", "local_files_only"} & set(config)


@pytest.mark.parametrize("directory", DEMO_DIRS, ids=[d.name for d in DEMO_DIRS])
def test_demo_tokenizer_configs_name_a_class_transformers_4_has(directory):
    assert_portable(json.loads((directory / "tokenizer_config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.convert_tokens_to_ids("<|end|>") in tokenizer.all_special_ids


def test_retraining_writes_the_portable_config(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    before = AutoTokenizer.from_pretrained(tmp_path)
    portable_tokenizer_config(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert_portable(config)
    after = AutoTokenizer.from_pretrained(tmp_path)
    text = "hello <|end|> world"
    assert after(text)["input_ids"] == before(text)["input_ids"]
    assert after.all_special_ids == before.all_special_ids and after.eos_token == before.eos_token
