"""The engine deployment: a thin Serve shell. One replica runs one `EngineLoop`
(clusterft/engine/async_llm.py) per model version, through a `ModelFollower` that switches versions
when the followed registry alias moves; admin changes reach it through `clusterft.serve.admin`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from clusterft.engine import LLMEngine, SamplingParams
from clusterft.engine.async_llm import EngineLoop
from clusterft.engine.core_process import EngineCoreClient
from clusterft.serve.admin import Reconciler, sync_forever
from clusterft.serve.autoscaling import engine_load
from clusterft.serve.follower import ModelFollower
from clusterft.serve.model_source import ModelVersion, resolve_version
from clusterft.serve.model_source import resolve as resolve_spec
from clusterft.serve.spec import ServeSpec


def version_adapter_name(spec: ServeSpec, model: ModelVersion) -> str | None:
    """The internal LoRA name of a registered adapter version (applied to the served model name)."""
    return f"{spec.model_name}@{model.version}" if model.adapter_dir is not None else None


def build_engine(spec: ServeSpec, model: ModelVersion) -> LLMEngine | EngineCoreClient:
    """The engine of one replica for one model version: in-process for tensor_parallel_size 1 (in a
    child process with engine_process), else sharded over workers. Its weight version is the
    registry's, so its prefix-cache block hashes never equal another version's."""
    adapters = dict(spec.adapters)
    lora = version_adapter_name(spec, model)
    if lora is not None:
        assert model.adapter_dir is not None
        adapters[lora] = model.adapter_dir
    config = spec.engine.to_engine_config(adapters)
    if spec.engine_process:
        return EngineCoreClient(model.model_dir, config, model.weight_version)
    if spec.tensor_parallel_size == 1:
        engine = LLMEngine(model.model_dir, config)
    else:
        from clusterft.serve.sharded_engine import ShardedLLMEngine

        engine = ShardedLLMEngine(model.model_dir, config, spec.tensor_parallel_size, spec.worker_num_cpus)
    engine.weight_version = model.weight_version
    return engine


def engine_loop(spec: ServeSpec, model: ModelVersion) -> EngineLoop:
    """The step loop of one replica for one model version, set up as the spec says."""
    return EngineLoop(
        lambda: build_engine(spec, model),
        base_model=spec.model_name,
        adapters=spec.adapters,
        base_lora=version_adapter_name(spec, model),
        max_queued_requests=spec.max_queued_requests,
        stream_interval=spec.stream_interval,
    )


class EngineReplica:
    """One engine replica's state and calls around ModelFollower (one engine per replica and model
    version); the Serve deployments below and in clusterft/serve/direct.py are its two shapes."""

    def __init__(self, spec: ServeSpec) -> None:
        from clusterft.runtime import apply_runtime_defaults

        apply_runtime_defaults()

        def resolve(ref: str | None) -> ModelVersion:
            if ref is None or spec.registry is None:
                return resolve_spec(spec)
            return resolve_version(spec.registry, ref)

        self.follower = ModelFollower(spec, resolve, lambda model: engine_loop(spec, model))
        loop = asyncio.get_running_loop()  # Serve runs __init__ on the replica's event loop
        if spec.registry is not None:
            self._watch_task = loop.create_task(self.follower.watch())
        # Admin changes (adapters, reload) arrive through the app's record: see clusterft.serve.admin.
        self.reconciler = Reconciler(self.follower)
        replica = serve.get_replica_context().replica_id.unique_id
        self._admin_task = loop.create_task(sync_forever(spec, replica, self.reconciler, self.follower.stats))

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        model: str,
        priority: int = 0,
        tokenizer: str | None = None,
        session: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """ModelFollower.generate: `priority` is the engine's (higher runs first), `tokenizer` the
        fingerprint of the tokenizer the prompt was made with (None: token ids from the client),
        `session` the request's routing key between production and canary."""
        chunks = self.follower.generate(
            request_id, prompt_token_ids, params, model, priority, tokenizer, session
        )
        async for chunk in chunks:
            yield chunk

    def model_info(self) -> dict[str, Any]:
        return self.follower.model_info()

    def status(self) -> dict[str, Any]:
        return self.follower.status()

    def check_health(self) -> None:
        self.follower.check_health()

    def record_routing_stats(self) -> dict[str, Any]:
        """What clusterft.serve.router's PrefixAffinityRouter prefers replicas by besides prefixes:
        the LoRA adapters resident in this replica's engine now (a sharded engine's residency lives
        in its workers: none reported, so its adapters get no affinity beyond their prefixes)."""
        return {"resident_adapters": self.follower.current.loop.engine.resident_adapters()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's load for clusterft.serve.autoscaling's policy (Serve averages each over
        its look-back window): requests waiting for admission, running, and the KV blocks in use."""
        return engine_load(self.follower.stats())

    def __del__(self) -> None:
        # Serve calls this on a graceful replica shutdown: the serving record goes at once rather
        # than going stale, so the controller moves a job off `serving` without waiting for it.
        follower = getattr(self, "follower", None)  # None when __init__ failed
        if follower is not None:
            follower.close()


@serve.deployment(name="engine", max_ongoing_requests=1024)
class EngineDeployment(EngineReplica):
    """The engine behind the separate ingress (clusterft/serve/ingress.py), reached by handle calls."""
