"""LoRAManager: peft adapters registered by name, at most `max_loras` resident (LRU), each in a slot.

A resident adapter's A/B matrices hang on the packed linear layers under its slot; the runner maps
each token of a batch to its request's slot, so base-model requests and requests for different
adapters share one forward pass (multi-LoRA). Output: base(x) + B(A(x)) * scale, as peft computes it.
On a tensor-parallel shard each adapter is sliced like the weights it adapts (see `_shard`).
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file

from clusterft.engine.models.layers import ParallelContext

_KEY_RE = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight"
)
_PACKED_INTO = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
}  # fmt: skip
_ROW_PARALLEL = ("o_proj", "down_proj")  # their input dim is split; the all-reduce sums the parts


def adapter_dir(name: str, path: str | Path) -> Path:
    """`path` as a Path once it is a peft adapter dir; FileNotFoundError saying so otherwise."""
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"LoRA {name!r}: {path} has no adapter_config.json (save it with peft)")
    return path


class LoRAManager:
    def __init__(
        self,
        model,
        max_loras: int,
        device: torch.device,
        dtype: torch.dtype,
        pc: ParallelContext | None = None,
    ) -> None:
        self.model = model
        self.max_loras = max_loras
        self.device = device
        self.dtype = dtype
        self.pc = pc or ParallelContext()
        self.paths: dict[str, Path] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.free_slots = list(range(max_loras))
        self.num_loads = 0

    def add_lora(self, name: str, path: str | Path) -> None:
        """Register a peft adapter dir under `name` (loaded on first use)."""
        self.paths[name] = adapter_dir(name, path)

    def remove_lora(self, name: str) -> None:
        """Forget adapter `name` and free its slot if it is resident."""
        self.paths.pop(name, None)
        slot = self.resident.pop(name, None)
        if slot is not None:
            self._unload(slot)
            self.free_slots.append(slot)

    def activate(self, name: str) -> int:
        """The slot of adapter `name`, loading it (and evicting the least recently used) if needed."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return self.resident[name]
        if name not in self.paths:
            raise KeyError(f"unknown LoRA adapter {name!r}: register it with add_lora(name, path)")
        if self.free_slots:
            slot = self.free_slots.pop(0)
        else:
            _, slot = self.resident.popitem(last=False)
            self._unload(slot)
        self._load(self.paths[name], slot)
        self.resident[name] = slot
        self.num_loads += 1
        return slot

    def _modules(self):
        return [m for m in self.model.modules() if hasattr(m, "loras")]

    def _unload(self, slot: int) -> None:
        for module in self._modules():
            module.loras.pop(slot, None)

    def _load(self, path: Path, slot: int) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
            raise ValueError(
                f"{path}: only plain LoRA adapters are supported (peft_type LORA, use_dora false)"
            )
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError(f"{path}: rank_pattern / alpha_pattern adapters are not supported")
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        weights = load_file(str(path / "adapter_model.safetensors"))
        pairs: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            m = _KEY_RE.fullmatch(key)
            if m is None:
                raise ValueError(
                    f"{path}: unsupported adapter weight {key!r} (LoRA on decoder projections only)"
                )
            pairs.setdefault((int(m[1]), m[2], m[3]), {})[m[4]] = tensor.to(self.device, self.dtype)
        for (layer, block, proj), ab in pairs.items():
            packed = getattr(getattr(self.model.layers[layer], block), _PACKED_INTO[proj])
            start, end = packed.offsets[proj]
            a, b = self._shard(proj, ab["A"], ab["B"])
            packed.loras.setdefault(slot, []).append((a, b, scale, start, end))

    def _shard(self, proj: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of A (r, in) and B (out, r): the B rows of its output slice for
        column-parallel projections, the A columns of its input slice for row-parallel ones."""
        rank, n = self.pc.tp_rank, self.pc.tp_size
        if n == 1:
            return a, b
        if proj in _ROW_PARALLEL:
            per = a.shape[1] // n
            return a[:, rank * per : (rank + 1) * per].contiguous(), b
        per = b.shape[0] // n
        return a, b[rank * per : (rank + 1) * per].contiguous()
