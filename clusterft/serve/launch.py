"""Deploy the OpenAI app on Ray Serve and take it down: what `clusterft serve`, the demo and the
serving benchmark share. Connects to the cluster at `address` / $RAY_ADDRESS, or starts a local one."""

from __future__ import annotations

import os

from clusterft.serve.spec import ServeSpec


def connect_ray(address: str | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster at `address` / $RAY_ADDRESS, or start a new local one ("local", never
    someone's `ray start` cluster on this host); nothing when already connected."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=log_to_driver)


def start_app(spec: ServeSpec, address: str | None = None, log_to_driver: bool = True) -> str:
    """Connect to (or start) Ray, start Serve on spec.host:spec.port and deploy; returns the base URL."""
    from ray import serve

    from clusterft.serve.app import build_app

    connect_ray(address, log_to_driver)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run(build_app(spec), name="clusterft", route_prefix="/")
    return f"http://{spec.host}:{spec.port}"


def stop_app() -> None:
    """Shut Serve down, then this process's Ray connection (a local cluster stops with it)."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
