"""clusterft's paged-KV inference engine (no Ray here): block pool, prefix cache, continuous batching,
preemption, sampling, multi-LoRA, int8 weights. `LLM` for offline batches, `EngineLoop` for serving.

Names are imported on first use: `clusterft.engine.config` (which the CLI and specs need) must not
pull in torch and the model code just to build an argument parser.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EngineLoop": "clusterft.engine.async_llm",
    "EngineConfig": "clusterft.engine.config",
    "LLM": "clusterft.engine.llm_engine",
    "LLMEngine": "clusterft.engine.llm_engine",
    "CompletionOutput": "clusterft.engine.outputs",
    "EngineStats": "clusterft.engine.outputs",
    "RequestOutput": "clusterft.engine.outputs",
    "SamplingParams": "clusterft.engine.sampling_params",
}
__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineLoop",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
]

if TYPE_CHECKING:
    from clusterft.engine.async_llm import EngineLoop
    from clusterft.engine.config import EngineConfig
    from clusterft.engine.llm_engine import LLM, LLMEngine
    from clusterft.engine.outputs import CompletionOutput, EngineStats, RequestOutput
    from clusterft.engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clusterft.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
