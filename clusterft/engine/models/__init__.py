"""Paged decoder models (Llama, Mistral, Qwen2) and their HF safetensors loader."""

from clusterft.engine.models.layers import LoRAMapping, ParallelContext
from clusterft.engine.models.llama import LlamaForCausalLM, ModelConfig
from clusterft.engine.models.loader import load_model

__all__ = ["LlamaForCausalLM", "LoRAMapping", "ModelConfig", "ParallelContext", "load_model"]
