"""build_app(ServeSpec) -> serve.Application: the ingress bound to the engine deployment.

HTTP :port --> ingress (FastAPI, 1 per app) --handle--> engine (num_replicas) --> TP workers
"""

from __future__ import annotations

from ray import serve

from clusterft.hf.loading import check_model_dir
from clusterft.serve.engine_deployment import EngineDeployment
from clusterft.serve.ingress import OpenAIIngress
from clusterft.serve.model_source import resolve
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
    engine = EngineDeployment.options(
        num_replicas=spec.num_replicas, ray_actor_options=engine_options, **health
    ).bind(spec)
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": spec.ingress_num_cpus}, **health)
    return ingress.bind(spec, engine)


def with_device(spec: ServeSpec, cluster_gpus: float) -> ServeSpec:
    """`spec` with engine.device "auto" settled: cuda when the cluster has GPUs, else cpu."""
    device = "cuda" if cluster_gpus >= 1 else "cpu"
    return spec.model_copy(update={"engine": spec.engine.model_copy(update={"device": device})})
