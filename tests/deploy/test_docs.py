"""The YAML in docs/deployment.md and docs/scaling.md parses, and the configs it embeds validate."""

from __future__ import annotations

import re

import pytest
import yaml

from proxy_engine.config import EngineConfig

from .conftest import REPO

DOCS = [REPO / "docs" / "deployment.md", REPO / "docs" / "scaling.md"]
BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)


def blocks(path):
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_yaml_blocks_parse(path):
    found = blocks(path)
    assert found
    for block in found:
        assert [doc for doc in yaml.safe_load_all(block) if doc is not None]


def test_kubernetes_example():
    docs = [d for block in blocks(REPO / "docs" / "scaling.md") for d in yaml.safe_load_all(block) if d]
    kinds = {d["kind"]: d for d in docs if "kind" in d}
    expected = {"PersistentVolumeClaim", "ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler",
                "InferenceService"}
    assert expected <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The drain fits the pod's grace period after the preStop sleep, with time to exit.
    env = {e["name"]: e.get("value") for e in container["env"]}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert float(env["PROXY_SERVE_SHUTDOWN_GRACE_S"]) + pre_stop + 5 <= pod["terminationGracePeriodSeconds"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's uid
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "proxy-models" for v in pod["volumes"])
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["proxy.yaml"])
    EngineConfig.model_validate(config["engine"])
    assert "sessionAffinity" not in kinds["Service"]["spec"]


def test_librechat_example():
    (librechat,) = [yaml.safe_load(b) for b in blocks(REPO / "docs" / "deployment.md") if "endpoints:" in b]
    (endpoint,) = librechat["endpoints"]["custom"]
    assert endpoint["baseURL"].endswith("/v1") and endpoint["models"]["fetch"] is True and endpoint["apiKey"]


def test_kserve_and_ray_serve_examples():
    docs = [d for block in blocks(REPO / "docs" / "scaling.md") for d in yaml.safe_load_all(block) if d]
    (isvc,) = [d for d in docs if d.get("kind") == "InferenceService"]
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container" and container["args"] == ["--config", "/config/proxy.yaml"]
    assert container["ports"][0]["containerPort"] == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert predictor["securityContext"]["runAsUser"] == 10001
    (serve_config,) = [d for d in docs if "applications" in d]
    (app,) = serve_config["applications"]
    assert app["import_path"] == "server.ray_serve:app_builder"
    module, _, attr = app["import_path"].partition(":")
    assert f"def {attr}(" in (REPO / (module.replace(".", "/") + ".py")).read_text()
    assert set(app["args"]) <= {"config", "min_replicas", "max_replicas", "num_cpus", "num_gpus", "target_sequences"}
