"""ServeSpec, the CLI wiring and deployments/serve_config.yaml, without starting Ray."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray import serve

from clusterft.cli.serve import add_serve_command, parse_adapters, serve_command
from clusterft.errors import UserError
from clusterft.serve.spec import ServeSpec
from tests.serve.conftest import ENGINE, make_spec

ROOT = Path(__file__).resolve().parents[2]


def test_spec_defaults_bind_localhost_and_map_to_engine_config(tiny_llama, monkeypatch):
    spec = ServeSpec(model_dir=str(tiny_llama))
    assert (spec.host, spec.model_name, spec.tensor_parallel_size) == ("127.0.0.1", "llama-tiny", 1)
    monkeypatch.setenv("CLUSTERFT_API_KEY", "from-env")
    assert spec.resolved_api_key() == "from-env"
    config = spec.engine.to_engine_config({"a": "/x"})
    assert config.lora_modules == (("a", "/x"),) and config.block_size == 16
    assert config.attention_backend == "auto"
    torch_path = ServeSpec(model_dir="m", engine={"attention_backend": "torch"}).engine.to_engine_config()
    assert torch_path.attention_backend == "torch"
    with pytest.raises(ValidationError, match="attention_backend"):
        ServeSpec(model_dir="m", engine={"attention_backend": "flash"})
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
    # A config file's proxies bind 0.0.0.0: no key where the app is built, no app.
    monkeypatch.delenv("CLUSTERFT_API_KEY", raising=False)
    with pytest.raises(ValidationError, match=r"host 0\.0\.0\.0 exposes the server.*CLUSTERFT_API_KEY"):
        app_builder(app["args"])
    monkeypatch.setenv("CLUSTERFT_API_KEY", "from-a-secret")  # as the k8s manifests give it
    assert isinstance(app_builder(app["args"]), serve.Application)


@pytest.fixture
def no_keys(monkeypatch):
    monkeypatch.delenv("CLUSTERFT_API_KEY", raising=False)
    monkeypatch.delenv("CLUSTERFT_ADMIN_API_KEY", raising=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "serve.example.com"])
def test_an_exposed_host_needs_an_api_key_or_insecure(host, no_keys, monkeypatch):
    with pytest.raises(ValidationError, match=r"no API key is set: give one \(api_key, \$CLUSTERFT_API_KEY"):
        ServeSpec(model_dir="m", host=host)
    assert ServeSpec(model_dir="m", host=host, api_key="k").resolved_api_key() == "k"
    assert ServeSpec(model_dir="m", host=host, insecure=True).resolved_api_key() is None
    monkeypatch.setenv("CLUSTERFT_API_KEY", "from-env")
    assert ServeSpec(model_dir="m", host=host).resolved_api_key() == "from-env"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_a_loopback_host_may_run_without_keys(host, no_keys):
    spec = ServeSpec(model_dir="m", host=host)
    assert (spec.resolved_api_key(), spec.resolved_admin_api_key()) == (None, None)


def test_the_admin_key_comes_from_the_spec_or_the_environment(no_keys, monkeypatch):
    assert ServeSpec(model_dir="m", admin_api_key="adm").resolved_admin_api_key() == "adm"
    monkeypatch.setenv("CLUSTERFT_ADMIN_API_KEY", "adm-env")
    assert ServeSpec(model_dir="m").resolved_admin_api_key() == "adm-env"


def test_spec_adapter_names_follow_the_one_adapter_rule():
    with pytest.raises(ValidationError, match=r"adapters: adapter name `m@v0002`: '@' is reserved"):
        ServeSpec(model_dir="m", adapters={"m@v0002": "/a"})
    with pytest.raises(ValidationError, match=r"adapters: model `m` already exists"):
        ServeSpec(model_dir="m", adapters={"m": "/a"})
    with pytest.raises(ValidationError, match=r"adapter name is empty"):
        ServeSpec(model_dir="m", adapters={" ": "/a"})


def test_adapter_roots_are_absolute_from_where_the_spec_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ServeSpec(model_dir="m").adapter_roots == []  # runtime adapters are off by default
    spec = ServeSpec(model_dir="m", adapter_roots=["saves/adapters", "/srv/adapters"])
    assert spec.adapter_roots == [str(tmp_path / "saves" / "adapters"), "/srv/adapters"]


def test_cli_serve_security_options(tiny_llama, no_keys):
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["serve", "m", "--admin-api-key", "adm", "--adapter-root", "/a", "--adapter-root", "/b", "--insecure"]
    )
    assert (args.admin_api_key, args.adapter_root, args.insecure) == ("adm", ["/a", "/b"], True)
    args = parser.parse_args(["serve", "m"])
    assert (args.admin_api_key, args.adapter_root, args.insecure) == (None, [], False)
    with pytest.raises(UserError, match=r"host 0\.0\.0\.0 exposes the server.*`--insecure`"):
        serve_command(str(tiny_llama), host="0.0.0.0", blocking=False)


def test_device_auto_follows_the_clusters_gpus(tiny_llama):
    """One serve config for a laptop and a GPU cluster: auto is settled when the app is built."""
    from clusterft.serve.app import with_device

    spec = make_spec(tiny_llama, engine=ENGINE.model_copy(update={"device": "auto"}))
    assert with_device(spec, 0).engine.device == "cpu"
    on_gpus = with_device(spec, 2)
    assert on_gpus.engine.device == "cuda" and on_gpus.engine.to_engine_config().device == "cuda"
    with pytest.raises(ValueError, match="device"):
        spec.engine.to_engine_config()  # never reaches the engine unsettled
