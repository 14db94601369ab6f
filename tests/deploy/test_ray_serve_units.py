"""server/ray_serve.py without a cluster: the resources a replica reserves, the autoscaling arithmetic, the builder.

The cluster tests are tests/scale (``make test-scale``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e '.[scale]'")

from proxy_engine.config import EngineConfig  # noqa: E402
from server.ray_serve import (  # noqa: E402
    REPLICA_HEADER,
    STAT_SEQUENCES,
    QueueDepthPolicy,
    app_builder,
    build_app,
    deployment_warnings,
    desired_replicas,
    gpus_needed,
    replica_app,
    replica_resources,
    serve_http_options,
)
from server.settings import load_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def engine(devices: dict[str, str | list[str]]) -> EngineConfig:
    def model(role: str) -> dict:
        return {"path": f"/m/{role}", "device": devices.get(role, "cpu")}

    return EngineConfig.model_validate({
        "base": model("base"), "experts": [{"expert": model("expert"), "anti_expert": model("anti_expert")}],
    })


def test_a_replica_reserves_the_gpus_its_models_name():
    assert gpus_needed(engine({})) == 0
    assert gpus_needed(engine({"base": ["cuda:0", "cuda:1"], "expert": "cuda:2", "anti_expert": "cuda:3"})) == 4
    assert gpus_needed(engine({"base": "cuda", "expert": "cuda:0"})) == 1
    config = yaml.safe_load((REPO / "configs" / "llama2-70b-chat.yaml").read_text())["engine"]
    options = replica_resources(EngineConfig.model_validate(config), num_cpus=8)
    assert options["placement_group_bundles"] == [{"CPU": 8, "GPU": 4}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"] == {"num_cpus": 8, "num_gpus": 4}
    cpu = replica_resources(engine({}), num_cpus=0.5)
    assert cpu["placement_group_bundles"] == [{"CPU": 0.5}] and cpu["ray_actor_options"]["num_gpus"] == 0
    with pytest.raises(ValueError, match="num_gpus"):
        gpus_needed(engine({"base": "auto"}))
    auto = replica_resources(engine({"base": "auto"}), num_gpus=2)
    assert auto["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 2}]


def context(per_replica: list[float] | None, current: int, ongoing: float = 0.0, queued: float = 0.0):
    metrics = None if per_replica is None else {STAT_SEQUENCES: {f"r{i}": v for i, v in enumerate(per_replica)}}
    return SimpleNamespace(aggregated_metrics=metrics, current_num_replicas=current, total_num_requests=ongoing,
                           total_queued_requests=queued)


def test_the_policy_scales_on_the_engines_queue_depth():
    policy = QueueDepthPolicy(target_sequences=8)
    assert policy(context([8, 8], 2))[0] == 2  # full batches, no queue: stay
    assert policy(context([8, 9], 2))[0] == 3  # a queue forms: one more
    assert policy(context([8, 8], 2, queued=1))[0] == 3  # requests Ray holds back count too
    assert policy(context([1, 2, 0], 3))[0] == 1  # the rest fit in one
    assert policy(context([0, 0], 2))[0] == 1  # idle: down to one (Ray's min_replicas applies after)
    assert policy(context(None, 1, ongoing=20))[0] == 3  # no engine reported yet: Ray's own count
    assert desired_replicas(0, 4, current=0) == 0 and desired_replicas(4, 4, current=0) == 1
    with pytest.raises(ValueError):
        QueueDepthPolicy(target_sequences=0)


def test_app_builder_reads_a_config_and_refuses_unknown_arguments():
    application = app_builder({"config": str(REPO / "configs" / "demo-cpu.yaml"), "min_replicas": "1",
                               "max_replicas": "3", "num_cpus": "2"})
    assert application is not None
    with pytest.raises(ValueError, match="unknown argument"):
        app_builder({"replicas": "2"})


def settings(**server):
    return load_settings(config_file=REPO / "configs" / "demo-cpu.yaml", overrides=server, environ=False)


def test_the_deployment_keeps_the_servers_limits():
    """uvicorn's connection limit becomes Ray's queue bound per replica; its keep-alive timeout Ray's proxy's."""
    config = settings(limit_concurrency=64, timeout_keep_alive_s=3)
    assert build_app(config)._bound_deployment.max_queued_requests == 64
    assert serve_http_options(config) == {"keep_alive_timeout_s": 3}


async def _headers(app) -> list:
    sent = []

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 401, "headers": []})

    async def send(message):
        sent.append(message)

    await replica_app(inner, app, "SERVE_REPLICA::x")({"type": "http"}, None, send)
    return [name for name, _ in sent[0]["headers"]]


def test_the_replica_header_is_sent_only_when_debugging():
    import asyncio

    assert asyncio.run(_headers(settings())) == []
    assert asyncio.run(_headers(settings(log_level="debug"))) == [REPLICA_HEADER.encode()]


def test_keys_in_the_settings_or_none_at_all_are_warned_about(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# a mounted secret\nsk-one\n\nsk-two\n")
    assert deployment_warnings(settings(api_keys_file=str(keys))) == []
    assert settings(api_keys_file=str(keys)).api_key_values() == ["sk-one", "sk-two"]
    assert "api_keys_file" in deployment_warnings(settings(api_keys=["sk-inline"]))[0]
    assert "no API key" in deployment_warnings(settings())[0]


def test_runtime_lora_updating_is_warned_about_on_ray(tmp_path):
    """A load reaches one replica: the deployer hears so, and where adapters belong instead."""
    keys = tmp_path / "keys"
    keys.write_text("sk-one\n")
    warned = deployment_warnings(settings(api_keys_file=str(keys), allow_runtime_lora_updating=True))
    assert len(warned) == 1 and "lora_modules" in warned[0]
