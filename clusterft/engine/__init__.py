"""clusterft's paged-KV inference engine (no Ray here): block pool, prefix cache, continuous batching,
preemption, sampling, multi-LoRA, int8 weights. `LLM` for offline batches, `AsyncLLM` for serving."""

from clusterft.engine.async_llm import AsyncLLM
from clusterft.engine.config import EngineConfig
from clusterft.engine.llm_engine import LLM, LLMEngine
from clusterft.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from clusterft.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
]
