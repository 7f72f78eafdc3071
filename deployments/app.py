"""Import path for `serve run` / `serve deploy` / a RayService's serveConfigV2: `deployments.app:app_builder`.

Serve passes the `args` of serve_config.yaml here; they are a ServeSpec (model_dir, adapters,
tensor_parallel_size, engine, ...), validated like every other spec. A config file's HTTP proxies bind
0.0.0.0 unless its http_options.host says otherwise, which this builder cannot see, so `host` defaults
to 0.0.0.0 here: the spec then refuses to build without an API key (api_key, or $CLUSTERFT_API_KEY
where the app runs) unless the args say `host: 127.0.0.1` or `insecure: true`.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from clusterft.runtime import apply_runtime_defaults
from clusterft.serve.app import build_app
from clusterft.serve.spec import ServeSpec

CONFIG_FILE_HOST = "0.0.0.0"  # Serve's default bind for config files


def app_builder(args: dict[str, Any]) -> serve.Application:
    apply_runtime_defaults()
    return build_app(ServeSpec(**{"host": CONFIG_FILE_HOST, **args}))
