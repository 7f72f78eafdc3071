"""ServeSpec, the CLI wiring and deployments/serve_config.yaml, without starting Ray."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray import serve

from clusterft.cli.serve import add_serve_command, parse_adapters
from clusterft.errors import UserError
from clusterft.serve.spec import ServeSpec

ROOT = Path(__file__).resolve().parents[2]


def test_spec_defaults_bind_localhost_and_map_to_engine_config(tiny_llama, monkeypatch):
    spec = ServeSpec(model_dir=str(tiny_llama))
    assert (spec.host, spec.model_name, spec.tensor_parallel_size) == ("127.0.0.1", "llama-tiny", 1)
    monkeypatch.setenv("CLUSTERFT_API_KEY", "from-env")
    assert spec.resolved_api_key() == "from-env"
    config = spec.engine.to_engine_config({"a": "/x"})
    assert config.lora_modules == (("a", "/x"),) and config.block_size == 16
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        ServeSpec(model_dir="m", tensor_parallel_size=0)
    with pytest.raises(ValidationError, match="chat_template"):
        ServeSpec(model_dir="m", chat_template="nope")
    with pytest.raises(ValidationError, match="extra"):
        ServeSpec(model_dir="m", prot=1)
    assert spec.stream_interval == 4  # the first token at once, then 4 per message
    with pytest.raises(ValidationError, match="stream_interval"):
        ServeSpec(model_dir="m", stream_interval=0)


def test_adapters_flag_parsing():
    assert parse_adapters(["a=/p/a", "b=rel/b"]) == {"a": "/p/a", "b": "rel/b"}
    with pytest.raises(UserError, match="NAME=PATH"):
        parse_adapters(["nopath"])
    with pytest.raises(UserError, match="twice"):
        parse_adapters(["a=1", "a=2"])


def test_cli_serve_arguments():
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "serve",
            "m",
            "--port",
            "9000",
            "--tensor-parallel-size",
            "2",
            "--adapters",
            "a=x",
            "b=y",
            "--api-key",
            "k",
        ]
    )
    assert (args.model_dir, args.port, args.tensor_parallel_size, args.adapters, args.api_key) == (
        "m",
        9000,
        2,
        ["a=x", "b=y"],
        "k",
    )
    assert args.host == "127.0.0.1"


def test_serve_config_yaml_builds_the_app(tiny_llama, tmp_path, monkeypatch):
    """The shipped config serves the registry's production alias, found through $CLUSTERFT_REGISTRY."""
    from clusterft.registry.registry import Registry
    from deployments.app import app_builder

    config = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    [app] = config["applications"]
    assert app["import_path"] == "deployments.app:app_builder"
    registry = Registry(tmp_path / "registry")
    name = app["args"]["registry"]["model_name"]
    registry.promote(name, registry.register(name, tiny_llama, kind="full").version)
    monkeypatch.setenv("CLUSTERFT_REGISTRY", str(tmp_path / "registry"))
    spec = ServeSpec(**app["args"])  # the shipped args are a valid spec
    assert spec.registry is not None and spec.registry.root == str(tmp_path / "registry")
    assert isinstance(app_builder(app["args"]), serve.Application)
