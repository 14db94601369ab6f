"""proxy-serve on Ray Serve: replicas of the whole server (one engine, three models each) behind Ray's HTTP proxy.

    pip install 'proxy-serve[scale]'
    serve run server.ray_serve:app_builder config=configs/llama2-70b-chat.yaml min_replicas=1 max_replicas=4

Each replica is ``create_app`` around its own ``AsyncEngine``, exactly what ``proxy-serve`` runs: the same
routes, auth, limits, SSE streams (Ray's proxy forwards each ASGI message as it comes, so streams are not
buffered) and ``/metrics``. What Ray adds:

- **Resources.** A replica reserves, in one placement-group bundle, the GPUs its three models are placed on
  (``cuda:N`` in the config is the N-th GPU Ray gives the replica, as in a container), so replicas never share
  a GPU and a replica's models are always on one node; on the CPU the bundle holds CPUs only.
- **Readiness and health.** A replica loads its models before Ray routes anything to it, and its health
  check fails once the engine has died, so Ray replaces it.
- **Autoscaling on queue depth.** Each replica reports what its engine holds (``record_autoscaling_stats``:
  sequences running, prefilling and waiting); ``QueueDepthPolicy`` asks for as many replicas as those
  sequences (plus requests Ray itself holds back) need at ``target_sequences`` per replica.

What Ray's proxy takes away, and how it is given back (docs/security.md): uvicorn's connection limit becomes
``max_queued_requests`` (Ray answers 503 past it), its keep-alive timeout Ray's ``http_options``
(``serve_http_options``); the app's own body limit and body timeout apply as under uvicorn; the header timeout
and header size cap have no Serve equivalent. API keys come from ``api_keys_file`` (a mounted secret), read by
each replica: keys in the settings or ``runtime_env.env_vars`` are readable by anyone who reaches Ray's
dashboard or jobs API. The replica header is sent only at ``log_level: debug``.

Nothing here imports torch at module level (the engine loads it when it starts): Ray's controller imports
this module to run the policy.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy_engine.async_engine import AsyncEngine
from proxy_engine.config import EngineConfig
from server.settings import ServerSettings, load_settings

log = logging.getLogger("proxy_serve")

REPLICA_HEADER = "x-proxy-serve-replica"  # sent only at log_level debug: it names an actor of the cluster
# What a replica's engine holds, reported to Ray's autoscaler under these names.
STAT_SEQUENCES = "engine_sequences"
STAT_WAITING = "engine_waiting"
STAT_KV_USAGE = "engine_kv_cache_usage"
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


# ------------------------------------------------------------------------------------------------ resources
def gpus_needed(engine: EngineConfig) -> int:
    """GPUs one replica must hold: the highest ``cuda:N`` any of its models names, plus one.

    Inside a replica Ray renumbers its GPUs from 0 (``CUDA_VISIBLE_DEVICES``), as a container does, so a
    config naming cuda:0..3 needs four. ``auto`` names no count: give ``num_gpus`` explicitly then.
    """
    highest = -1
    models = [engine.base] + [m for pair in engine.experts for m in (pair.expert, pair.anti_expert)]
    for model in models:
        for device in [model.device] if isinstance(model.device, str) else model.device:
            if device == "auto":
                raise ValueError("a model is placed with device 'auto': pass num_gpus for each replica")
            match = _CUDA.match(device)
            if match:
                highest = max(highest, int(match.group(1) or 0))
    return highest + 1


def replica_resources(engine: EngineConfig, num_cpus: float = 1.0, num_gpus: int | None = None) -> dict[str, Any]:
    """``serve.deployment`` options reserving one replica's CPUs and GPUs together in one bundle.

    One bundle, not one per GPU: the three models run in the replica's own process, and Ray gives an actor
    only the GPUs of the bundle it sits in. STRICT_PACK keeps the bundle on one node.
    """
    gpus = gpus_needed(engine) if num_gpus is None else num_gpus
    bundle: dict[str, float] = {"CPU": num_cpus}
    if gpus:
        bundle["GPU"] = gpus
    return {
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": gpus},
        "placement_group_bundles": [bundle],
        "placement_group_strategy": "STRICT_PACK",
    }


# ---------------------------------------------------------------------------------------------- autoscaling
class QueueDepthPolicy:
    """Replicas wanted = ceil(sequences the engines hold, plus requests Ray queues, / ``target_sequences``).

    Each replica's ``engine_sequences`` (running + prefilling + waiting, averaged over Ray's look-back
    window) is summed over the replicas. With ``target_sequences`` = a replica's ``max_num_seqs`` plus the queue
    you accept, a replica is added once every engine's batch is full and its queue past that, and one is
    removed when the rest could hold the load. Ray applies min/max replicas and the up/down delays.
    Before any replica has reported (it is loading), Ray's own count of ongoing requests stands in.
    """

    def __init__(self, target_sequences: float = 32.0) -> None:
        if target_sequences <= 0:
            raise ValueError("target_sequences must be positive")
        self.target_sequences = float(target_sequences)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        reported = (ctx.aggregated_metrics or {}).get(STAT_SEQUENCES) or {}
        if reported:
            load = sum(reported.values()) + (ctx.total_queued_requests or 0.0)
        else:
            load = ctx.total_num_requests
        return desired_replicas(load, self.target_sequences, ctx.current_num_replicas), {}


def desired_replicas(load: float, target_per_replica: float, current: int) -> int:
    """The replica count that keeps ``load`` at or under ``target_per_replica`` each (at least 1 while busy)."""
    if load <= 0:
        return 0 if current == 0 else 1
    return max(1, math.ceil(load / target_per_replica - 1e-9))


def autoscaling_config(
    *,
    min_replicas: int,
    max_replicas: int,
    target_sequences: float,
    upscale_delay_s: float = 30.0,
    downscale_delay_s: float = 600.0,
    look_back_period_s: float = 30.0,
) -> AutoscalingConfig:
    """Scale on the engines' queue depth. A new replica loads its models for minutes: up early, down slowly."""
    return AutoscalingConfig(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        upscale_delay_s=upscale_delay_s,
        downscale_delay_s=downscale_delay_s,
        look_back_period_s=look_back_period_s,
        policy=AutoscalingPolicy(
            policy_function=f"{__name__}:QueueDepthPolicy",
            policy_kwargs={"target_sequences": target_sequences},
        ),
    )


# ------------------------------------------------------------------------------------------------- replica
class PreloadedEngine(AsyncEngine):
    """Started by the replica's constructor; the app's start-up finds it running and leaves it so."""

    async def start(self) -> None:
        if self.engine is None:
            await super().start()


class _ReplicaHeader:
    """Names the replica that answered (``x-proxy-serve-replica``), for logs, debugging and the tests."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.name = name.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.name)]}
            await send(message)

        await self.app(scope, receive, tagged)


def replica_app(app: ASGIApp, settings: ServerSettings, name: str) -> ASGIApp:
    """The replica's app: with the replica header only when debugging (every response, 401s included, named an
    actor of the cluster to any client)."""
    return _ReplicaHeader(app, name) if settings.log_level == "debug" else app


def serve_http_options(settings: ServerSettings) -> dict[str, Any]:
    """Ray proxy options matching ``proxy-serve``'s uvicorn limits, for ``serve.start(http_options=...)`` or a
    Serve config's ``http_options`` (cluster-wide: Ray's proxy is shared by its applications)."""
    return {"keep_alive_timeout_s": settings.timeout_keep_alive_s}


def deployment_warnings(settings: ServerSettings) -> list[str]:
    """What a deployer should hear about the settings given to Ray (logged by ``build_app``)."""
    warnings = []
    if settings.api_keys:
        warnings.append("API keys given in the settings or PROXY_SERVE_API_KEYS travel in Ray's deployment "
                        "arguments and runtime_env, readable by anyone who reaches Ray's dashboard or jobs API: "
                        "use api_keys_file (a mounted secret) instead")
    if not settings.has_keys:
        warnings.append("no API key is set: anyone who reaches Ray's HTTP proxy can use the models")
    if settings.allow_runtime_lora_updating:
        warnings.append("allow_runtime_lora_updating: a load or unload reaches the one replica Ray routes it to, "
                        "and a replica started later has none of them; serve adapters on every replica with "
                        "lora_modules, or let each replica load them on first use with lora_resolver_dir")
    return warnings


@serve.ingress()
class ProxyServeReplica:
    """One replica: an engine loaded before Ray routes to it, and the app around it."""

    async def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.engine = PreloadedEngine(settings.engine)
        await self.engine.start()  # Ray marks the replica ready (and routes to it) only once this returns
        self.name = ray.get_runtime_context().get_actor_name() or "replica"

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from server.app import create_app

        # (not self.app: Ray's wrapper owns that name)
        return replica_app(create_app(self.engine, self.settings), self.settings, self.name)

    def check_health(self) -> None:
        """Fails once the engine is gone (its step thread died): Ray then replaces this replica."""
        if not self.engine.ready:
            raise RuntimeError(f"engine not running: {self.engine.fatal_error!r}")

    def record_autoscaling_stats(self) -> dict[str, float]:
        stats = self.engine.stats()
        waiting = stats.waiting + stats.prefilling
        reported = {STAT_SEQUENCES: float(stats.running + waiting), STAT_WAITING: float(waiting)}
        usage = getattr(stats, "kv_cache_usage", None)  # the KV-cache gauge, where the engine reports one
        if usage is not None:
            reported[STAT_KV_USAGE] = float(usage)
        return reported


# ------------------------------------------------------------------------------------------------- builder
def build_app(
    settings: ServerSettings,
    *,
    min_replicas: int = 1,
    max_replicas: int = 1,
    initial_replicas: int | None = None,
    target_sequences: float | None = None,
    num_cpus: float = 1.0,
    num_gpus: int | None = None,
    upscale_delay_s: float = 30.0,
    downscale_delay_s: float = 600.0,
    look_back_period_s: float = 30.0,
    health_check_period_s: float = 10.0,
    name: str = "ProxyServe",
) -> serve.Application:
    """The Serve application: ``max_replicas`` > ``min_replicas`` autoscales, equal values fix the count.

    ``target_sequences`` defaults to the engine's ``max_num_seqs`` (a replica is added when the batches are
    full and a queue forms). Ray may hand a replica up to ``max_num_seqs + max_waiting`` requests at once; past
    that Ray queues them (and counts them for the autoscaler) rather than the engine refusing them with 429.
    Both read the config's ``max_num_seqs``: a replica whose GPU holds static K/V for fewer rows caps its batch
    lower (engine.py) and refuses with 429 what Ray sends past that; set ``max_num_seqs`` to the cap its log
    gives (or pass ``target_sequences``) on such GPUs.
    """
    limits = settings.engine.limits
    for warning in deployment_warnings(settings):
        log.warning("ray serve: %s", warning)
    options: dict[str, Any] = replica_resources(settings.engine, num_cpus=num_cpus, num_gpus=num_gpus)
    options.update(
        name=name,
        max_ongoing_requests=limits.max_num_seqs + limits.max_waiting,
        # uvicorn's limit_concurrency under proxy-serve: requests Ray holds for a replica past that get a 503.
        max_queued_requests=settings.limit_concurrency,
        # Ray waits this long for running requests before stopping a replica (a scale-down, a redeploy).
        graceful_shutdown_timeout_s=settings.shutdown_grace_s,
        health_check_period_s=health_check_period_s,
        health_check_timeout_s=max(30.0, 3 * health_check_period_s),
    )
    if max_replicas > min_replicas:
        config = autoscaling_config(
            min_replicas=min_replicas, max_replicas=max_replicas,
            target_sequences=target_sequences or limits.max_num_seqs,
            upscale_delay_s=upscale_delay_s, downscale_delay_s=downscale_delay_s,
            look_back_period_s=look_back_period_s,
        )
        if initial_replicas is not None:
            config.initial_replicas = initial_replicas
        options["autoscaling_config"] = config
    else:
        options["num_replicas"] = min_replicas
    return serve.deployment(ProxyServeReplica).options(**options).bind(settings)


_INT_ARGS = ("min_replicas", "max_replicas", "initial_replicas", "num_gpus")
_FLOAT_ARGS = ("target_sequences", "num_cpus", "upscale_delay_s", "downscale_delay_s", "look_back_period_s",
               "health_check_period_s")


def app_builder(args: Mapping[str, str]) -> serve.Application:
    """``serve run server.ray_serve:app_builder config=FILE [min_replicas=N max_replicas=M ...]``.

    ``config`` is a proxy-serve YAML file (``PROXY_SERVE_*`` variables apply on top, as for ``proxy-serve``);
    without one, the built-in demo. The other arguments are ``build_app``'s.
    """
    from server.demo import default_engine_config

    args = dict(args)
    config = args.pop("config", None) or os.environ.get("PROXY_SERVE_CONFIG")
    unknown = set(args) - set(_INT_ARGS) - set(_FLOAT_ARGS)
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; known: config, {', '.join(_INT_ARGS + _FLOAT_ARGS)}")
    kwargs: dict[str, Any] = {k: int(v) for k, v in args.items() if k in _INT_ARGS}
    kwargs.update({k: float(v) for k, v in args.items() if k in _FLOAT_ARGS})
    settings = load_settings(config, default_engine=default_engine_config)
    return build_app(settings, **kwargs)
