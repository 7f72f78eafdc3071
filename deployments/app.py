"""Import path for `serve run` / `serve deploy` / a RayService's serveConfigV2: `deployments.app:app_builder`.

Serve passes the `args` of serve_config.yaml here; they are a ServeSpec (model_dir, adapters,
tensor_parallel_size, engine, ...), validated like every other spec.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from clusterft.runtime import apply_runtime_defaults
from clusterft.serve.app import build_app
from clusterft.serve.spec import ServeSpec


def app_builder(args: dict[str, Any]) -> serve.Application:
    apply_runtime_defaults()
    return build_app(ServeSpec(**args))
