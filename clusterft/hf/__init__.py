"""Hugging Face interop: local model/tokenizer loading, tiny model maker, LoRA wrap/merge."""
