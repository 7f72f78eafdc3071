"""Distributed training on Ray Train + DeepSpeed: config compilation, the per-worker recipe, the launcher."""
