"""Session fixtures: each conformance family built once (seconds), its models loaded once per family."""

from __future__ import annotations

import pytest

from proxy_engine.config import EngineConfig, ExpertPairConfig, LimitsConfig, ModelConfig
from tests.conformance.families import SPECS, BuiltFamily, build

FAMILIES = list(SPECS)


def engine_config(family: BuiltFamily, **limits) -> EngineConfig:
    return EngineConfig(
        base=ModelConfig(path=str(family.base)),
        experts=[
            ExpertPairConfig(
                expert=ModelConfig(path=str(family.expert), prompt_format="chat" if family.chat_expert else "plain"),
                anti_expert=ModelConfig(path=str(family.anti_expert)),
                alpha=1.0,
            )
        ],
        limits=LimitsConfig(**limits),
    )


@pytest.fixture(scope="session")
def conformance_root(tmp_path_factory):
    return tmp_path_factory.mktemp("conformance")


@pytest.fixture(scope="session", params=FAMILIES)
def family(request, conformance_root) -> BuiltFamily:
    return build(request.param, conformance_root / request.param)
