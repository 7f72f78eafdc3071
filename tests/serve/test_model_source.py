"""Alias resolution, alias polling and the version switch, without Ray or real engines."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from clusterft.registry.registry import Registry, RegistryError
from clusterft.serve.follower import ModelFollower, replica_identity
from clusterft.serve.model_source import AliasWatch, ModelVersion, resolve, resolve_version
from clusterft.serve.spec import RegistrySource, ServeSpec


def fake_model(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(text)
    return path


@pytest.fixture
def registry(tmp_path) -> tuple[Registry, RegistrySource]:
    reg = Registry(tmp_path / "registry")
    reg.register("quick", fake_model(tmp_path / "m1", "one"), kind="full")
    reg.register("quick", fake_model(tmp_path / "m2", "two"), kind="full")
    base = fake_model(tmp_path / "base", "base")
    reg.register("quick", fake_model(tmp_path / "lora", "adapter"), kind="adapter", base_model=base)
    return reg, RegistrySource(root=str(reg.root), model_name="quick")


def test_spec_takes_exactly_one_source(registry):
    _, source = registry
    assert ServeSpec(registry=source).model_name == "quick"
    assert ServeSpec(registry=source, served_model_name="q").model_name == "q"
    with pytest.raises(ValidationError, match="exactly one of model_dir"):
        ServeSpec(model_dir="/m", registry=source)
    with pytest.raises(ValidationError, match="exactly one of model_dir"):
        ServeSpec()


def test_alias_resolves_to_full_and_adapter_versions(registry, tmp_path):
    reg, source = registry
    with pytest.raises(RegistryError, match="promote one first"):
        resolve(ServeSpec(registry=source))
    reg.promote("quick", "v2")
    assert resolve(ServeSpec(registry=source)) == ModelVersion("v0002", str(reg.root / "quick" / "v0002"))
    assert resolve_version(source, "v1").model_dir == str(reg.root / "quick" / "v0001")
    reg.promote("quick", "3")
    adapter = resolve(ServeSpec(registry=source))
    base, version_dir = str((tmp_path / "base").resolve()), str(reg.root / "quick" / "v0003")
    assert adapter == ModelVersion("v0003", base, version_dir)
    assert adapter.weight_version == 3
    assert resolve(ServeSpec(model_dir="/m")) == ModelVersion(None, "/m")


def test_alias_watch_sees_promote_and_rollback(registry):
    reg, source = registry
    watch = AliasWatch(source)
    assert watch.target() is None  # no aliases file yet
    reg.promote("quick", "v1")
    assert watch.target() == "v0001"
    reg.promote("quick", "v2", "canary")  # another alias moved: same answer
    assert watch.target() == "v0001"
    reg.promote("quick", "v2")
    assert watch.target() == "v0002"
    reg.rollback("quick")
    assert watch.target() == "v0001"


class FakeLoop:
    """Stands in for EngineLoop: each request waits for `release` and then answers with its version."""

    def __init__(self, model: ModelVersion) -> None:
        self.model = model
        self.adapters: dict[str, str] = {}
        self.engine = self
        self.release = asyncio.Event()
        self.shut = False

    async def generate(self, request_id, prompt_token_ids, params, model, priority):
        yield {"outputs": [], "finished": False}
        await self.release.wait()
        yield {"outputs": [{"text": self.model.version}], "finished": True}

    def add_adapter(self, name: str, path: str) -> dict | None:
        if path.endswith("-only") and not path.endswith(f"-for-{self.model.version}-only"):
            return {"error": {"status": 400, "message": f"{name} does not fit {self.model.version}"}}
        self.adapters[name] = path
        return None

    def shutdown(self) -> None:
        self.shut = True


def test_runtime_adapters_follow_a_switch_and_one_that_no_longer_fits_is_reported(registry):
    reg, source = registry
    reg.promote("quick", "v1")

    async def scenario() -> None:
        follower = ModelFollower(
            ServeSpec(registry=source), lambda ref: resolve_version(source, ref), FakeLoop
        )
        follower.add_adapter("kept", "/adapters/kept")
        follower.add_adapter("old", "/adapters/old-for-v0001-only")
        reg.promote("quick", "v2")
        result = await follower.reload()
        assert result["switched"] and follower.adapters == {"kept": "/adapters/kept"}
        assert result["dropped_adapters"] == {"old": "old does not fit v0002"}
        assert follower.status()["last_switch"]["dropped_adapters"] == {"old": "old does not fit v0002"}

    asyncio.run(scenario())


def test_switch_keeps_old_requests_on_old_engine_and_survives_a_bad_version(registry):
    reg, source = registry
    reg.promote("quick", "v1")
    spec = ServeSpec(registry=source)
    broken = {"v0003"}

    def make_loop(model: ModelVersion) -> FakeLoop:
        if model.version in broken:
            raise OSError("weights unreadable")
        return FakeLoop(model)

    async def scenario() -> None:
        follower = ModelFollower(spec, lambda ref: resolve_version(source, ref), make_loop)
        old = follower.current.loop
        old_request = follower.generate("a", [1], None, "quick", 0)
        assert (await old_request.__anext__())["model_version"] == "v0001"
        reg.promote("quick", "v2")
        result = await follower.reload()
        assert result["switched"] and (result["version"], result["previous"]) == ("v0002", "v0001")
        new_request = follower.generate("b", [1], None, "quick", 0)
        assert (await new_request.__anext__())["model_version"] == "v0002"
        await asyncio.sleep(0.01)
        assert not old.shut and follower.status()["draining"] == ["v0001"]  # a request still runs on it
        old.release.set()
        assert [c["model_version"] async for c in old_request] == ["v0001"]
        await asyncio.sleep(0.01)
        assert old.shut and follower.status()["draining"] == []

        reg.promote("quick", "v3")  # fails to load: v2 keeps serving, the error is reported
        failed = await follower.reload()
        assert not failed["switched"] and failed["error"] == "v0003: OSError: weights unreadable"
        assert failed["version"] == "v0002"  # the error names the version that failed; this one serves
        assert follower.version == "v0002" and follower.status()["num_load_failures"] == 1

        reg.rollback("quick")  # v3 -> v2: already serving it
        assert not (await follower.reload())["switched"]
        assert (await follower.reload("v1"))["version"] == "v0001"
        assert follower.status()["last_error"] is None

    asyncio.run(scenario())


def test_a_prompt_tokenized_for_another_tokenizer_is_sent_back_naming_the_version(registry, tmp_path):
    from clusterft.hf.tiny import make_tiny_model
    from clusterft.serve.model_source import tokenizer_fingerprint

    reg, source = registry
    model = make_tiny_model(tmp_path / "model", "llama", "tiny", seed=0)
    reg.register("quick", model, kind="full")  # v4: a tokenizer (v1 to v3 have none)
    reg.promote("quick", "v4")
    v4 = tokenizer_fingerprint(str(reg.root / "quick" / "v0004"))
    assert v4 == tokenizer_fingerprint(str(model)) != tokenizer_fingerprint(str(tmp_path / "m1"))

    async def scenario() -> None:
        follower = ModelFollower(
            ServeSpec(registry=source), lambda ref: resolve_version(source, ref), FakeLoop
        )
        chunks = [c async for c in follower.generate("a", [1], None, "quick", 0, "another tokenizer")]
        assert [(c["tokenizer_changed"], c["model_version"], c["error"]["status"]) for c in chunks] == [
            (True, "v0004", 503)
        ]
        same = follower.generate("b", [1], None, "quick", 0, v4)
        assert (await same.__anext__())["model_version"] == "v0004"  # admitted
        untokenized = follower.generate("c", [1], None, "quick", 0, None)  # token ids from the client
        assert "error" not in await untokenized.__anext__()

    asyncio.run(scenario())


def test_follower_keeps_a_serving_record_beats_while_polling_and_removes_it_when_stopped(registry):
    from clusterft.registry.serving import read_records

    reg, source = registry
    reg.promote("quick", "v1")
    spec = ServeSpec(registry=source.model_copy(update={"poll_interval_s": 0.05}))

    async def scenario() -> None:
        follower = ModelFollower(
            spec, lambda ref: resolve_version(source, ref), FakeLoop, identity=("app", "app#engine#r1")
        )
        [started] = read_records(reg.root, "quick")  # written before the first poll
        assert (started.version, started.alias, started.app, started.replica) == (
            "v0001",
            "production",
            "app",
            "app#engine#r1",
        )
        assert started.stale_after_s == 5.0 and started.since <= started.heartbeat_at
        watch = asyncio.get_running_loop().create_task(follower.watch())
        await asyncio.sleep(0.3)
        [beating] = read_records(reg.root, "quick")
        assert beating.version == "v0001" and beating.heartbeat_at > started.heartbeat_at
        assert beating.since == started.since

        reg.promote("quick", "v2")  # the poll switches; the record follows at once
        for _ in range(100):
            await asyncio.sleep(0.02)
            if follower.version == "v0002":
                break
        [switched] = read_records(reg.root, "quick")
        assert switched.version == "v0002" and switched.since > started.since

        watch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watch
        assert read_records(reg.root, "quick") == []
        follower._publish()  # closed: a late heartbeat writes nothing
        assert read_records(reg.root, "quick") == []

    asyncio.run(scenario())


def test_a_follower_of_a_fixed_model_dir_writes_no_record(tmp_path):
    spec = ServeSpec(model_dir=str(tmp_path / "m"))
    follower = ModelFollower(
        spec, lambda ref: ModelVersion(None, spec.model_dir), FakeLoop, identity=("a", "r")
    )
    assert follower.record() is None
    follower.close()
    assert not any(tmp_path.rglob("*.json"))


def test_outside_a_serve_replica_the_identity_is_the_process() -> None:
    assert replica_identity() == ("local", f"{socket.gethostname()}-{os.getpid()}")
