"""proxy-serve on Ray Serve (server/ray_serve.py), on a local Ray cluster of two CPUs, loopback only.

Two replicas of a tiny family both serve; a replica killed mid-stream is replaced while new requests succeed;
the queue-depth autoscaler moves between one and two replicas under a bounded load. 2.5-4 minutes on two
shared cores, so not in ``make test``: ``make test-scale`` runs them (PROXY_SERVE_SCALE_TESTS=1).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("PROXY_SERVE_SCALE_TESTS") != "1",
    reason="Ray cluster tests (2.5-4 min): run them with make test-scale",
)
ray = pytest.importorskip("ray", reason="ray[serve] is not installed: pip install -e '.[scale]'")
serve = pytest.importorskip("ray.serve")

from proxy_engine.families import Family, build_family  # noqa: E402
from server.ray_serve import REPLICA_HEADER, STAT_SEQUENCES, STAT_WAITING, build_app  # noqa: E402
from server.settings import ServerSettings, load_settings  # noqa: E402

DEPLOYMENT = "ProxyServe"
# Generous bounds on waiting for the cluster (replicas start worker processes that import torch on 2 shared
# cores); they bound the test's length, they assert nothing about speed.
SETTLE_S = 180.0


# -------------------------------------------------------------------------------------------- on a cluster
@pytest.fixture(scope="module")
def long_family(tmp_path_factory) -> Family:
    """A tiny family with room for long streams (a replica must still be streaming when it is killed)."""
    return build_family(tmp_path_factory.mktemp("ray-family"), max_position_embeddings=4096)


def settings_for(family: Family) -> ServerSettings:
    return load_settings(overrides={
        "served_model_name": "tiny",
        "log_level": "debug",  # the replica header (which the tests read) is sent only when debugging
        "engine": {
            "base": {"path": str(family.base)},
            "experts": [{"expert": {"path": str(family.expert)}, "anti_expert": {"path": str(family.anti_expert)}}],
            # One sequence at a time: a second request queues, which is what the autoscaler reads.
            "limits": {"max_num_seqs": 1, "max_waiting": 16},
        },
    }, environ=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    # Replicas report their engine's stats every half second (Ray's default is 10 s), so the autoscaling test
    # does not wait minutes. Set before ray.init: the workers inherit the environment.
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024, log_to_driver=False,
             configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def running_replicas(app: str) -> int:
    status = serve.status().applications.get(app)
    if status is None or DEPLOYMENT not in status.deployments:
        return 0
    return status.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


def wait_for(condition, what: str, timeout: float = SETTLE_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def complete(client: httpx.Client, max_tokens: int = 4) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "tiny", "prompt": "Paris is", "max_tokens": max_tokens})


def replicas_answering(client: httpx.Client, want: int, attempts: int = 80) -> set[str]:
    seen: set[str] = set()
    for _ in range(attempts):
        response = complete(client)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"]
        seen.add(response.headers[REPLICA_HEADER])
        if len(seen) >= want:
            break
    return seen


@pytest.fixture(scope="module")
def two_replicas(cluster: str, long_family: Family) -> Iterator[str]:
    app = build_app(settings_for(long_family), min_replicas=2, max_replicas=2, num_cpus=0.25,
                    health_check_period_s=1.0)
    serve.run(app, name="fixed", route_prefix="/")
    try:
        yield cluster
    finally:
        serve.delete("fixed", _blocking=False)  # its replicas stop in the background


def test_both_replicas_serve(two_replicas: str):
    assert running_replicas("fixed") == 2
    with httpx.Client(base_url=two_replicas, timeout=60) as client:
        assert len(replicas_answering(client, want=2)) == 2
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]][0] == "tiny"


def test_a_replica_killed_mid_stream_is_replaced(two_replicas: str):
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=two_replicas, timeout=60) as client:
        events, completed = 0, False
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            victim = response.headers[REPLICA_HEADER]
            lines = response.iter_lines()
            try:
                for line in lines:
                    if line.startswith("data: {"):
                        events += 1
                        if events == 3:  # events arrive while the generation runs: Ray's proxy streams them
                            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                    completed = completed or line == "data: [DONE]"
            except httpx.HTTPError:
                pass  # the connection to a dead replica may end abruptly
        assert events >= 3 and not completed, "the stream outlived its replica"

        # New requests succeed at once or after Ray notices the death; then the replica is replaced.
        wait_for(lambda: complete(client).status_code == 200, "a request succeeds after the kill")
        for _ in range(5):
            assert complete(client).status_code == 200
        # Ray's status may still count the dead replica for a moment: wait for two live ones answering.
        wait_for(lambda: len(replicas_answering(client, want=2, attempts=10) - {victim}) == 2,
                 "two replicas serving, the killed one not among them")
        assert running_replicas("fixed") == 2


def test_autoscaling_between_one_and_two_replicas(cluster: str, long_family: Family):
    app = build_app(settings_for(long_family), min_replicas=1, max_replicas=2, target_sequences=1, num_cpus=0.25,
                    upscale_delay_s=0.5, downscale_delay_s=2.0, look_back_period_s=2.0, health_check_period_s=1.0)
    serve.run(app, name="autoscale", route_prefix="/autoscale")
    base_url = f"{cluster}/autoscale"  # (the app sees the prefix as its root_path)
    try:
        assert running_replicas("autoscale") == 1
        stop = threading.Event()
        failures: list[str] = []

        def load() -> None:  # one client streaming long completions back to back, until told to stop
            with httpx.Client(base_url=base_url, timeout=60) as client:
                body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 256, "ignore_eos": True,
                        "stream": True}
                while not stop.is_set():
                    with client.stream("POST", "/v1/completions", json=body) as response:
                        if response.status_code != 200:
                            failures.append(response.read().decode())
                        for _ in response.iter_lines():
                            pass

        clients = [threading.Thread(target=load, daemon=True) for _ in range(3)]
        for thread in clients:
            thread.start()
        try:  # three streams on max_num_seqs 1 at target 1 sequence per replica: two replicas wanted
            # What the policy reads: the live engine's own counts, through Ray's custom-metrics hook (asked while
            # the loaded replica is the only one: Ray routes a call to the less busy replica once there are two).
            handle = serve.get_deployment_handle(DEPLOYMENT, app_name="autoscale")

            def engine_report() -> dict[str, float]:
                return handle.record_autoscaling_stats.remote().result(timeout_s=60)

            report = wait_for(lambda: (r := engine_report())[STAT_SEQUENCES] >= 1 and r, "the engine reports its load")
            assert report[STAT_WAITING] >= 0
            wait_for(lambda: running_replicas("autoscale") == 2, "scaled up to 2 replicas under load")
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=SETTLE_S)
        assert not failures, failures[:2]
        wait_for(lambda: running_replicas("autoscale") == 1, "scaled down to 1 replica once idle")
        with httpx.Client(base_url=base_url, timeout=60) as client:
            assert complete(client).status_code == 200
    finally:
        serve.delete("autoscale", _blocking=False)
