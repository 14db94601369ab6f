"""Shared fixtures: tiny model families built once per session (random weights, a tokenizer trained on the fly)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from proxy_engine.families import Family, build_family  # noqa: E402


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> Family:
    """Plain-format family: base (2 layers) and a 1-layer expert / anti-expert."""
    return build_family(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def chat_family(tmp_path_factory) -> Family:
    """The expert has a chat template and padded logit rows (576 vs a 512-token vocabulary)."""
    return build_family(tmp_path_factory.mktemp("chat"), padded_expert=True, chat_expert=True)


@pytest.fixture(scope="session")
def gguf_family(tmp_path_factory):
    """A tiny triple as a .gguf file (base), a directory holding one (expert) and a transformers directory
    (anti-expert): tests/tiny_gguf.py. Needs the ``gguf`` package (the test extra installs it)."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'proxy-serve[gguf]')")
    from tests.tiny_gguf import build_gguf_family

    return build_gguf_family(tmp_path_factory.mktemp("gguf-family"))


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run only where CUDA is available; elsewhere they are skipped and say why."""
    # The marker, not ``item.keywords`` (which also holds the names of the folders: tests/gpu/ itself).
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); run `pytest -m gpu` on one")
    for item in gpu_items:
        item.add_marker(skip)
