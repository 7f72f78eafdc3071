"""LoRAManager: peft adapters registered by name, at most `max_loras` resident (LRU), each in a slot.

A resident adapter's A/B matrices hang on the packed linear layers under its slot; the runner maps
each token of a batch to its request's slot, so base-model requests and requests for different
adapters share one forward pass (multi-LoRA). Output: base(x) + B(A(x)) * scale, as peft computes it.
On a tensor-parallel shard each adapter is sliced like the weights it adapts (see `_shard`).

An adapter is read and checked against the base model when it is registered (`read_adapter`: rank,
target modules, every weight's key, shape and values), so a broken one is refused with the reason
instead of crashing the first step that uses it; the checked weights stay in a host-memory LRU cache
(`max_cpu_loras`) from which slots are filled. One read again later (out of the cache) that fails
fails only the requests of that adapter (ModelRunner._lora_mapping).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from clusterft.engine.models.layers import ParallelContext

_KEY_RE = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight"
)
_PACKED_INTO = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
}  # fmt: skip
_BLOCK_OF = {
    proj: "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn" for proj in _PACKED_INTO
}
_ROW_PARALLEL = ("o_proj", "down_proj")  # their input dim is split; the all-reduce sums the parts
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_dir(name: str, path: str | Path) -> Path:
    """`path` as a Path once it is a peft adapter dir; FileNotFoundError saying so otherwise."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"LoRA {name!r}: {path} has no {ADAPTER_CONFIG} (save it with peft)")
    return path


@dataclass
class AdapterWeights:
    """A peft adapter read and checked against a base model: per adapted projection, its A (r, in) and
    B (out, r) at the base model's full (unsharded) sizes, peft's scale alpha/r (or /sqrt(r)), and the
    sha256 of the config and weights bytes they were read from (what the adapter is, whatever its name)."""

    scale: float
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> (A, B)
    digest: str


def read_adapter(name: str, path: str | Path, model, pc: ParallelContext | None = None) -> AdapterWeights:
    """Read the peft adapter dir `path` and check it fits `model` (a paged model, possibly a tensor-
    parallel shard described by `pc`): a plain LoRA of positive rank on decoder projections, every
    weight present, finite, and of the shape the base model's projection needs. A ValueError (a
    FileNotFoundError for missing files) names the problem and the fix."""
    path = adapter_dir(name, path)
    where = f"LoRA {name!r} ({path})"
    try:
        config_bytes = (path / ADAPTER_CONFIG).read_bytes()
        config = json.loads(config_bytes.decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{where}: {ADAPTER_CONFIG} is unreadable ({exc}); save the adapter again with peft"
        ) from exc
    if not isinstance(config, dict):
        raise ValueError(f"{where}: {ADAPTER_CONFIG} is not a JSON object; save the adapter again with peft")
    base = config.get("base_model_name_or_path") or "unknown"
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{where}: only plain LoRA adapters are supported (peft_type LORA, use_dora false)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{where}: rank_pattern / alpha_pattern adapters are not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if type(r) is not int or r < 1:
        raise ValueError(f"{where}: {ADAPTER_CONFIG} has r={r!r}; the LoRA rank must be an integer >= 1")
    if type(alpha) not in (int, float):
        raise ValueError(f"{where}: {ADAPTER_CONFIG} has lora_alpha={alpha!r}; it must be a number")
    targets = config.get("target_modules")
    if isinstance(targets, list) and (unknown := sorted(set(targets) - set(_PACKED_INTO))):
        raise ValueError(
            f"{where}: target_modules {unknown} are not served; the engine applies LoRA to "
            f"{list(_PACKED_INTO)} only: train the adapter with target_modules among those"
        )
    if config.get("modules_to_save"):
        raise ValueError(
            f"{where}: modules_to_save {config['modules_to_save']} (fully trained modules) are not "
            "served; merge the adapter into the model and serve the merged model instead"
        )
    weights, weights_bytes = _load_weights(where, path)
    digest = hashlib.sha256(config_bytes + b"\0" + weights_bytes).hexdigest()

    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        m = _KEY_RE.fullmatch(key)
        if m is None or _BLOCK_OF.get(m[3]) != m[2]:
            raise ValueError(
                f"{where}: unsupported adapter weight {key!r}; the engine serves LoRA on the decoder "
                f"projections {list(_PACKED_INTO)} only"
            )
        layer = int(m[1])
        if layer >= len(model.layers):
            raise ValueError(
                f"{where}: {key!r} adapts layer {layer}, but the base model has {len(model.layers)} "
                f"layers: the adapter was trained for another base model ({base}); serve it with that one"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(
                f"{where}: {key!r} holds non-finite or non-float values (a diverged or broken run); "
                "use an adapter from an earlier checkpoint"
            )
        halves.setdefault((layer, m[3]), {})[m[4]] = tensor
    if not halves:
        raise ValueError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA weights; save the adapter again")

    pairs = {}
    for (layer, proj), ab in sorted(halves.items()):
        prefix = f"base_model.model.model.layers.{layer}.{_BLOCK_OF[proj]}.{proj}"
        if set(ab) != {"A", "B"}:
            missing = "B" if "A" in ab else "A"
            raise ValueError(f"{where}: {prefix}.lora_{missing}.weight is missing; save the adapter again")
        in_features, out_features = _full_sizes(model, layer, proj, pc or ParallelContext())
        for half, expected in (("A", (r, in_features)), ("B", (out_features, r))):
            shape = tuple(ab[half].shape)
            if shape == expected:
                continue
            rank = shape[0 if half == "A" else 1] if len(shape) == 2 else None
            if rank != r:
                raise ValueError(
                    f"{where}: {prefix}.lora_{half}.weight has shape {list(shape)} (rank {rank}), but "
                    f"{ADAPTER_CONFIG} says r={r}; the files are from different adapters, save it again"
                )
            raise ValueError(
                f"{where}: {prefix}.lora_{half}.weight has shape {list(shape)}, but the base model's "
                f"{proj} needs {list(expected)}: the adapter was trained for another base model "
                f"({base}); serve it with that one"
            )
        pairs[(layer, proj)] = (ab["A"], ab["B"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return AdapterWeights(scale, pairs, digest)


def _load_weights(where: str, path: Path) -> tuple[dict[str, torch.Tensor], bytes]:
    """The adapter's tensors, and the bytes they were read from (read once: what is hashed is what
    is served, even if the file is rewritten meanwhile)."""
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        hint = (
            "only safetensors is read: save it with save_pretrained(..., safe_serialization=True)"
            if (path / "adapter_model.bin").exists()
            else "save the adapter with peft's save_pretrained"
        )
        raise FileNotFoundError(f"{where}: no {ADAPTER_WEIGHTS}; {hint}")
    try:
        data = file.read_bytes()
        return load_safetensors(data), data
    except (OSError, SafetensorError) as exc:
        raise ValueError(
            f"{where}: {ADAPTER_WEIGHTS} is unreadable ({exc}): a truncated copy or not safetensors; "
            "copy or save the adapter again"
        ) from exc


def _full_sizes(model, layer: int, proj: str, pc: ParallelContext) -> tuple[int, int]:
    """(in, out) of projection `proj` in the unsharded base model: a shard holds 1/tp_size of the
    input dim of row-parallel projections and of the output dim of the others."""
    packed = getattr(getattr(model.layers[layer], _BLOCK_OF[proj]), _PACKED_INTO[proj])
    start, end = packed.offsets[proj]
    if proj in _ROW_PARALLEL:
        return packed.in_features * pc.tp_size, end - start
    return packed.in_features, (end - start) * pc.tp_size


@dataclass
class _HostAdapter:
    """An adapter ready to be made resident: peft's scale, and per adapted projection its packed
    layer, output columns [start, end) there, and this rank's A and B in the model's dtype."""

    scale: float
    pairs: list[tuple[object, int, int, torch.Tensor, torch.Tensor]]
    digest: str


class LoRAManager:
    """Adapters by name: `max_loras` resident in slots on the device (LRU), and the checked weights of
    up to `max_cpu_loras` kept in host memory (LRU; vLLM's max_cpu_loras), already sliced for this
    tensor-parallel rank and cast to the model's dtype. Making a cached adapter resident reads no file:
    an LRU swap costs no disk read or check inside a step, and it serves the weights add_lora checked
    even if the files change or vanish later. An adapter out of the cache is read and checked again,
    and refused if its files no longer hold what was registered (`digests`: the sha256 add_lora read,
    which the engine puts in the adapter's prefix-cache keys, so KV of other weights is never hit)."""

    def __init__(
        self,
        model,
        max_loras: int,
        device: torch.device,
        dtype: torch.dtype,
        pc: ParallelContext | None = None,
        max_cpu_loras: int | None = None,
    ) -> None:
        self.model = model
        self.max_loras = max_loras
        self.max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        assert self.max_cpu_loras >= max_loras, "every resident adapter fits the host cache"
        self.device = device
        self.dtype = dtype
        self.pc = pc or ParallelContext()
        self.paths: dict[str, Path] = {}
        self.digests: dict[str, str] = {}  # name -> sha256 of the adapter's bytes read by add_lora
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.free_slots = list(range(max_loras))
        self.host: OrderedDict[str, _HostAdapter] = OrderedDict()  # least recently used first
        self.num_loads = 0  # adapters made resident
        self.num_reads = 0  # adapters read from their files (registration included)

    def add_lora(self, name: str, path: str | Path) -> None:
        """Register a peft adapter dir under `name` once it is read and checked against the model
        (`read_adapter`: ValueError / FileNotFoundError naming the problem); made resident on first
        use. A name registered again serves the new adapter from its next use on."""
        host = self._read(name, path)
        self.remove_lora(name)
        self.paths[name] = Path(path)
        self.digests[name] = host.digest
        self._cache(name, host)

    def remove_lora(self, name: str) -> None:
        """Forget adapter `name` and free its slot if it is resident."""
        self.paths.pop(name, None)
        self.digests.pop(name, None)
        self.host.pop(name, None)
        slot = self.resident.pop(name, None)
        if slot is not None:
            self._unload(slot)
            self.free_slots.append(slot)

    def activate(self, name: str) -> int:
        """The slot of adapter `name`, loading it (and evicting the least recently used) if needed.
        An adapter no longer in the host cache is read from its files again, which may have changed
        since add_lora: it raises (KeyError for a name no longer registered) with the slot left free."""
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
        try:
            self._load(name, slot)
        except BaseException:
            self._unload(slot)  # a half-loaded slot must not serve anyone
            self.free_slots.append(slot)
            raise
        self.resident[name] = slot
        self.num_loads += 1
        return slot

    def _modules(self):
        return [m for m in self.model.modules() if hasattr(m, "loras")]

    def _unload(self, slot: int) -> None:
        for module in self._modules():
            module.loras.pop(slot, None)

    def _load(self, name: str, slot: int) -> None:
        host = self.host.get(name)
        if host is None:
            host = self._read(name, self.paths[name])
            if host.digest != self.digests[name]:
                raise ValueError(
                    f"LoRA {name!r} ({self.paths[name]}): its files changed since it was registered "
                    "(another adapter was written there); register it again to serve the new files"
                )
            self._cache(name, host)
        self.host.move_to_end(name)
        for packed, start, end, a, b in host.pairs:
            packed.loras.setdefault(slot, []).append(
                (a.to(self.device), b.to(self.device), host.scale, start, end)
            )

    def _read(self, name: str, path: str | Path) -> _HostAdapter:
        """Adapter `name` read, checked, sliced for this rank and cast, in host memory."""
        adapter = read_adapter(name, path, self.model, self.pc)
        self.num_reads += 1
        pairs = []
        for (layer, proj), (a, b) in adapter.pairs.items():
            packed = getattr(getattr(self.model.layers[layer], _BLOCK_OF[proj]), _PACKED_INTO[proj])
            start, end = packed.offsets[proj]
            a, b = self._shard(proj, a, b)
            pairs.append((packed, start, end, a.to(dtype=self.dtype), b.to(dtype=self.dtype)))
        return _HostAdapter(adapter.scale, pairs, adapter.digest)

    def _cache(self, name: str, host: _HostAdapter) -> None:
        self.host[name] = host
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

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
