"""`clusterft serve MODEL_DIR ...` (or `--registry DIR --model-name NAME [--alias production]`, which
follows the alias across promotions): the OpenAI server on a local Ray cluster (or --address).

The CLI adds it in one call: `add_serve_command(commands)`; `serve_command(...)` is the handler with
plain arguments. Python callers that deploy a `ServeSpec` use `clusterft.serve.launch` directly.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence

from clusterft.cli.helpers import Subcommands, add_command
from clusterft.errors import UserError
from clusterft.serve.launch import connect_ray, start_app, stop_app
from clusterft.serve.spec import EngineSettings, RegistrySource, ServeSpec


def parse_adapters(items: Sequence[str]) -> dict[str, str]:
    """['name=path', ...] -> {name: path}; a UserError names the malformed item."""
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapters {item!r}: write each adapter as NAME=PATH (e.g. sql=saves/sql-lora)")
        if name in adapters:
            raise UserError(f"--adapters: {name!r} is given twice")
        adapters[name] = path
    return adapters


def serve_command(
    model_dir: str | None,
    port: int = 8000,
    tensor_parallel_size: int = 1,
    adapters: Sequence[str] = (),
    api_key: str | None = None,
    *,
    host: str = "127.0.0.1",
    served_model_name: str | None = None,
    address: str | None = None,
    max_model_len: int | None = None,
    device: str = "cpu",
    registry: str | None = None,
    model_name: str | None = None,
    alias: str = "production",
    stream_interval: int = 4,
    admin_api_key: str | None = None,
    adapter_roots: Sequence[str] = (),
    insecure: bool = False,
    blocking: bool = True,
) -> int:
    """Serve `model_dir`, or the registry version `alias` of `model_name` points at (following it),
    until interrupted (Ctrl-C or SIGTERM: Serve and the local Ray cluster shut down)."""
    from pydantic import ValidationError

    from clusterft.hf.loading import check_model_dir

    source = None
    if registry is not None or model_name is not None:
        if registry is None or model_name is None or model_dir is not None:
            raise UserError("serve: give MODEL_DIR, or --registry DIR with --model-name NAME (not both)")
        source = RegistrySource(root=registry, model_name=model_name, alias=alias)
    elif model_dir is None:
        raise UserError("serve: give MODEL_DIR, or --registry DIR --model-name NAME to follow an alias")
    else:
        check_model_dir(model_dir)
    try:
        spec = ServeSpec(
            model_dir=model_dir,
            registry=source,
            port=port,
            tensor_parallel_size=tensor_parallel_size,
            adapters=parse_adapters(adapters),
            api_key=api_key,
            host=host,
            served_model_name=served_model_name,
            engine=EngineSettings(max_model_len=max_model_len, device=device),
            stream_interval=stream_interval,
            admin_api_key=admin_api_key,
            adapter_roots=list(adapter_roots),
            insecure=insecure,
        )
    except ValidationError as err:
        raise UserError(f"serve: {err}") from err
    if not blocking:
        _start(spec, address)
        return 0
    previous = None
    try:
        connect_ray(address, data_plane=spec.data_plane)
        # After ray.init, which sets its own SIGTERM handler (sys.exit, Serve left running), and
        # before the app starts, so a SIGTERM while it deploys also shuts everything down.
        previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
        _start(spec, address)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_app()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _start(spec: ServeSpec, address: str | None) -> None:
    url = start_app(spec, address)
    auth = " (Bearer token required)" if spec.resolved_api_key() else ""
    source = spec.registry
    following = f" (following {source.alias} of {source.root})" if source else ""
    print(f"serving {spec.model_name}{following} at {url}/v1{auth}; Ctrl-C to stop", file=sys.stderr)


def _sigterm_as_ctrl_c(signum: int, frame: object) -> None:
    """`kill PID` stops the server as Ctrl-C does, Serve and the local Ray cluster shut down (with
    Ray's handler the process exited without shutting Serve down and died of SIGABRT on the way)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the shutdown short
    raise KeyboardInterrupt


def _handler(args: argparse.Namespace) -> int:
    return serve_command(
        args.model_dir,
        args.port,
        args.tensor_parallel_size,
        args.adapters or (),
        args.api_key,
        host=args.host,
        served_model_name=args.served_model_name,
        address=args.address,
        max_model_len=args.max_model_len,
        device=args.device,
        registry=args.registry,
        model_name=args.model_name,
        alias=args.alias,
        stream_interval=args.stream_interval,
        admin_api_key=args.admin_api_key,
        adapter_roots=args.adapter_root,
        insecure=args.insecure,
    )


def add_serve_command(commands: Subcommands) -> None:
    """Add `serve` to the CLI's subcommands."""
    help = "serve a model (and LoRA adapters) with an OpenAI-compatible API on Ray Serve"
    sub = add_command(commands, "serve", _handler, help)
    sub.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help="HF model directory")
    sub.add_argument(
        "--registry", default=None, metavar="DIR", help="serve from this model registry instead of MODEL_DIR"
    )
    sub.add_argument(
        "--model-name", default=None, metavar="NAME", help="registered model name (with --registry)"
    )
    sub.add_argument("--alias", default="production", help="alias to serve and follow (default production)")
    sub.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sub.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1; 0.0.0.0 exposes it, which needs --api-key or --insecure)",
    )
    sub.add_argument("--tensor-parallel-size", type=int, default=1, help="worker shards per replica")
    sub.add_argument(
        "--stream-interval", type=int, default=4, metavar="N",
        help="tokens per streamed message after the first (default 4; 1 sends every token)",
    )  # fmt: skip
    sub.add_argument("--adapters", nargs="+", metavar="NAME=PATH", help="LoRA adapters served by name")
    sub.add_argument(
        "--api-key", default=None, help="Bearer token of /v1 and /metrics (default: $CLUSTERFT_API_KEY)"
    )
    sub.add_argument(
        "--admin-api-key",
        default=None,
        help="Bearer token of /v1/admin/* (default: $CLUSTERFT_ADMIN_API_KEY; unset with an API key: "
        "admin routes are refused)",
    )
    sub.add_argument(
        "--adapter-root", action="append", default=[], metavar="DIR",
        help="a directory runtime adapters (POST /v1/admin/adapters) may come from; repeatable "
        "(default: none, runtime adapters are refused)",
    )  # fmt: skip
    sub.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    sub.add_argument("--served-model-name", default=None, help="model id of the base (default: dir name)")
    sub.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    sub.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where workers run the model")
    sub.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
