"""Deploy the OpenAI app on Ray Serve and take it down: what `clusterft serve`, the demo and the
serving benchmark share. Connects to the cluster at `address` / $RAY_ADDRESS, or starts a local one."""

from __future__ import annotations

import logging
import os

from clusterft.serve.spec import ServeSpec

logger = logging.getLogger(__name__)

# ServeSpec.data_plane -> Ray Serve's flags; every Serve process reads them as it starts.
DATA_PLANE_ENV: dict[str, dict[str, str]] = {
    "default": {},
    "throughput_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def connect_ray(address: str | None = None, log_to_driver: bool = True, data_plane: str = "default") -> None:
    """Join the cluster at `address` / $RAY_ADDRESS, or start a new local one ("local", never
    someone's `ray start` cluster on this host) with Serve's `data_plane` flags in its environment;
    nothing when already connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    flags = DATA_PLANE_ENV[data_plane]
    if address and flags:
        # Serve's processes there read their flags from the environment `ray start` had.
        logger.warning(
            "data_plane %s takes effect only if the cluster at %s was started with %s",
            data_plane,
            address,
            " ".join(f"{k}={v}" for k, v in flags.items()),
        )
    os.environ.update(flags)  # the local cluster's processes inherit this process's environment
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=log_to_driver)


def start_app(spec: ServeSpec, address: str | None = None, log_to_driver: bool = True) -> str:
    """Connect to (or start) Ray, start Serve on spec.host:spec.port and deploy; returns the base URL."""
    from ray import serve

    from clusterft.serve.app import build_app

    connect_ray(address, log_to_driver, spec.data_plane)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run(build_app(spec), name="clusterft", route_prefix="/")
    return f"http://{spec.host}:{spec.port}"


def stop_app() -> None:
    """Shut Serve down, then this process's Ray connection (a local cluster stops with it)."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
