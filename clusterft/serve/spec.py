"""ServeSpec: what one Serve application serves and how, built once (CLI, YAML) and passed down frozen.

Engine knobs map one to one onto `EngineConfig`; values the engine derives at start-up (the KV block
count, `max_model_len` from the model) are asked of the engine, never written back here.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from clusterft.config.spec import Section, known_template
from clusterft.engine.config import EngineConfig
from clusterft.registry import DEFAULT_REGISTRY, REGISTRY_ENV

API_KEY_ENV = "CLUSTERFT_API_KEY"


class EngineSettings(Section):
    """The engine's settings (see clusterft.engine.EngineConfig for their exact meaning)."""

    block_size: int = Field(default=16, description="Tokens per KV block (a power of two).")
    num_gpu_blocks: int | None = Field(
        default=None, description="KV blocks per worker; None sizes them from kv_cache_space."
    )
    kv_cache_space: float = Field(default=1.0, gt=0, description="GiB of KV cache per worker.")
    swap_space: float = Field(default=0.0, ge=0, description="GiB of CPU blocks for swapped-out requests.")
    max_num_seqs: int = Field(default=128, ge=1, description="Requests running at once.")
    max_num_batched_tokens: int = Field(default=2048, ge=1, description="Token budget of one engine step.")
    max_model_len: int | None = Field(
        default=None, description="Prompt + completion limit; None: the model's max_position_embeddings."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV blocks of shared prefixes.")
    enable_chunked_prefill: bool = Field(default=True, description="Split long prompts over steps.")
    preemption_mode: Literal["recompute", "swap", "auto"] = Field(
        default="auto", description="What happens to a request preempted when blocks run out."
    )
    max_loras: int = Field(default=4, ge=1, description="LoRA adapters resident at once (LRU beyond).")
    quantization: Literal["int8"] | None = Field(default=None, description="Weight-only int8 linears.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights/KV dtype."
    )
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="Where workers run the model.")
    seed: int = Field(default=0, description="Seeds sampling of requests without their own seed.")

    def to_engine_config(self, lora_modules: dict[str, str] | None = None) -> EngineConfig:
        """The EngineConfig these settings describe (ValueError from the engine names the bad knob)."""
        return EngineConfig(**self.model_dump(), lora_modules=tuple((lora_modules or {}).items()))


class RegistrySource(Section):
    """Serve whatever version an alias of the model registry points at, and follow it when it moves."""

    root: str = Field(
        default_factory=lambda: os.environ.get(REGISTRY_ENV, DEFAULT_REGISTRY),
        description=f"The registry's root directory (shared storage); default ${REGISTRY_ENV} or ./registry.",
    )
    model_name: str = Field(description="Registered model name (also the default served model name).")
    alias: str = Field(default="production", description="The alias to follow (production, canary).")
    poll_interval_s: float = Field(
        default=0.5, gt=0, description="How often the engine replica checks whether the alias moved."
    )


class ServeSpec(Section):
    """One Serve application: a base model, its LoRA adapters, the engine, and the HTTP edge."""

    model_dir: str | None = Field(
        default=None, description="Local HF model directory (config.json + safetensors + tokenizer)."
    )
    registry: RegistrySource | None = Field(
        default=None, description="Instead of model_dir: serve and follow an alias of the model registry."
    )
    served_model_name: str | None = Field(
        default=None, description="The `model` clients ask for; default: the model directory's name."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters served next to the base: name -> peft adapter dir."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="Worker actors per engine replica, each holding a shard of the model."
    )
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Engine settings.")
    host: str = Field(default="127.0.0.1", description="Address the HTTP proxy binds; 0.0.0.0 exposes it.")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port.")
    api_key: str | None = Field(
        default=None,
        description=f"Bearer token every /v1 route requires; default: ${API_KEY_ENV}; none: open.",
    )
    enable_metrics: bool = Field(default=True, description="Serve Prometheus text on GET /metrics.")
    max_queued_requests: int = Field(
        default=256, ge=0, description="Waiting requests beyond which new ones get 503 + Retry-After."
    )
    num_replicas: int = Field(default=1, ge=1, description="Engine replicas (each with its own workers).")
    stream_interval: int = Field(
        default=4,
        ge=1,
        description="Output tokens a stream gathers before the engine replica sends them on (vLLM's "
        "stream_interval): 1 sends every token; N sends the first token at once, then every N tokens "
        "and the last ones, so one message carries several tokens (4: about twice the served "
        "throughput of 1 for a small model, bench/serve_load.py; a chunk every 4 decode steps).",
    )
    chat_template: str = Field(
        default="tokenizer", description="Chat template: the tokenizer's own, or a clusterft template name."
    )
    engine_num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved for each engine replica.")
    worker_num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved for each worker actor.")
    ingress_num_cpus: float = Field(default=0.5, ge=0, description="CPUs reserved for each HTTP ingress.")
    health_check_period_s: float = Field(
        default=5.0, gt=0, description="Serve's replica health-check period."
    )

    _known_template = field_validator("chat_template")(known_template)

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name.strip():
                raise ValueError("adapter names must be non-empty model ids (e.g. 'sql-lora')")
        return value

    @model_validator(mode="after")
    def _one_model_source(self) -> ServeSpec:
        if (self.model_dir is None) == (self.registry is None):
            raise ValueError(
                "give exactly one of model_dir (a fixed HF model directory) or registry "
                "({root, model_name, alias}: follow a registry alias)"
            )
        return self

    @property
    def model_name(self) -> str:
        """The `model` id of the base model in requests and /v1/models (stable across versions)."""
        if self.served_model_name:
            return self.served_model_name
        if self.registry is not None:
            return self.registry.model_name
        assert self.model_dir is not None
        return os.path.basename(os.path.normpath(self.model_dir))

    def resolved_api_key(self) -> str | None:
        """The key to require: the spec's, else $CLUSTERFT_API_KEY, else None (open)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None
