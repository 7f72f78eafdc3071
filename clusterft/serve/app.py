"""build_app(ServeSpec) -> serve.Application: the ingress bound to the engine deployment.

HTTP :port --> ingress (FastAPI, 1 per app) --handle--> engine (num_replicas) --> TP workers
or, with ingress: direct (clusterft/serve/direct.py), one hop:
HTTP :port --> engine (num_replicas, FastAPI in each) --> TP workers

The handle routes by prompt prefix (clusterft/serve/router.py) unless routing is pow2; the engine
replicas scale on engine load (clusterft/serve/autoscaling.py) when the spec has autoscaling.
"""

from __future__ import annotations

import warnings
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from clusterft.hf.loading import check_model_dir
from clusterft.serve.autoscaling import POLICY_PATH
from clusterft.serve.direct import DIRECT_REPLICA_ENV, DirectEngineDeployment
from clusterft.serve.engine_deployment import EngineDeployment
from clusterft.serve.ingress import OpenAIIngress
from clusterft.serve.model_source import resolve
from clusterft.serve.router import ROUTER_PATH
from clusterft.serve.spec import ServeSpec


def build_app(spec: ServeSpec) -> serve.Application:
    """The Serve application for `spec` (deploy with `serve.run`, or from deployments/app.py)."""
    if spec.engine.device == "auto":
        import ray
        import torch

        # Not connected yet (serve.run connects later): the local cluster it starts has this host's GPUs.
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else torch.cuda.device_count()
        spec = with_device(spec, gpus)
    check_model_dir(
        resolve(spec).model_dir
    )  # a registry alias that points nowhere fails here, not in a replica
    engine_options = {"num_cpus": spec.engine_num_cpus}
    if spec.engine.device == "cuda" and spec.tensor_parallel_size == 1:
        engine_options["num_gpus"] = 1  # the in-process worker needs the GPU itself
    health = {"health_check_period_s": spec.health_check_period_s, "health_check_timeout_s": 30}
    if spec.ingress == "direct":  # the engine replicas are the HTTP ingress (one hop)
        direct_options = {**engine_options, "runtime_env": {"env_vars": DIRECT_REPLICA_ENV}}
        direct = DirectEngineDeployment.options(
            ray_actor_options=direct_options, **health, **replica_options(spec)
        )
        return direct.bind(spec)
    engine = EngineDeployment.options(
        ray_actor_options=engine_options, **health, **replica_options(spec), **routing_options(spec)
    ).bind(spec)
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": spec.ingress_num_cpus}, **health)
    return ingress.bind(spec, engine)


def replica_options(spec: ServeSpec) -> dict[str, Any]:
    """The engine deployment's replica count: fixed, or scaled on the engines' load."""
    scaling = spec.autoscaling
    if scaling is None:
        return {"num_replicas": spec.num_replicas}
    policy_kwargs = {
        "target_requests_per_replica": scaling.target_requests_per_replica,
        "target_kv_usage": scaling.target_kv_usage,
    }
    config = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": spec.num_replicas,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        "look_back_period_s": scaling.look_back_period_s,
        "metrics_interval_s": scaling.metrics_interval_s,
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": policy_kwargs},
    }
    with warnings.catch_warnings():  # metrics_interval_s: deprecated for an env var, still honoured
        warnings.simplefilter("ignore", DeprecationWarning)
        return {"num_replicas": "auto", "autoscaling_config": AutoscalingConfig(**config)}


def routing_options(spec: ServeSpec) -> dict[str, Any]:
    """The engine deployment's request router (Serve's default for pow2)."""
    if spec.routing == "pow2":
        return {}
    kwargs = {"block_size": spec.engine.block_size, "imbalance_threshold": spec.routing_imbalance_threshold}
    # Routing stats (resident adapters) are cheap: a dict per replica every second.
    config = RequestRouterConfig(
        request_router_class=ROUTER_PATH, request_router_kwargs=kwargs, request_routing_stats_period_s=1.0
    )
    return {"request_router_config": config}


def with_device(spec: ServeSpec, cluster_gpus: float) -> ServeSpec:
    """`spec` with engine.device "auto" settled: cuda when the cluster has GPUs, else cpu."""
    device = "cuda" if cluster_gpus >= 1 else "cpu"
    return spec.model_copy(update={"engine": spec.engine.model_copy(update={"device": device})})
