from __future__ import annotations

from pathlib import Path

import pytest

from proxy_engine.families import Family, build_family

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return build_family(tmp_path_factory.mktemp("deploy-family"), chat_expert=True)
