"""CacheEngine: the KV tensors of one worker, and the block copies/swaps the scheduler orders.

Per layer, K and V are (num_blocks, num_kv_heads, block_size, head_dim): per KV head, a block is a
contiguous (block_size, head_dim) matrix. A tensor-parallel worker holds only its KV heads
(num_kv_heads / tp_size) of every block: block ids are global, bytes local.
"""

from __future__ import annotations

import torch


class CacheEngine:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_gpu_blocks: int,
        num_cpu_blocks: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        shape = (num_gpu_blocks, num_kv_heads, block_size, head_dim)
        cpu_shape = (num_cpu_blocks, num_kv_heads, block_size, head_dim)
        pin = torch.device(device).type == "cuda"
        # Zeroed, not empty: padded decode slots are masked, and 0 * NaN from garbage would still be NaN.
        self.gpu_cache = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.cpu_cache = [
            (
                torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin),
                torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin),
            )
            for _ in range(num_layers)
        ]
        self.device = torch.device(device)

    @staticmethod
    def block_bytes(
        num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
    ) -> int:
        """Bytes one block takes on one worker (K and V, all layers)."""
        return (
            2
            * num_layers
            * block_size
            * num_kv_heads
            * head_dim
            * torch.empty((), dtype=dtype).element_size()
        )

    def swap_out(self, mapping: list[tuple[int, int]]) -> None:
        """(device block, cpu block) pairs."""
        if not mapping:
            return
        src = torch.tensor([g for g, _ in mapping], device=self.device)
        dst = torch.tensor([c for _, c in mapping])
        for (gk, gv), (ck, cv) in zip(self.gpu_cache, self.cpu_cache, strict=True):
            ck[dst] = gk[src].to("cpu")
            cv[dst] = gv[src].to("cpu")

    def swap_in(self, mapping: list[tuple[int, int]]) -> None:
        """(cpu block, device block) pairs."""
        if not mapping:
            return
        src = torch.tensor([c for c, _ in mapping])
        dst = torch.tensor([g for _, g in mapping], device=self.device)
        for (gk, gv), (ck, cv) in zip(self.gpu_cache, self.cpu_cache, strict=True):
            gk[dst] = ck[src].to(self.device)
            gv[dst] = cv[src].to(self.device)

    def copy(self, mapping: list[tuple[int, int]]) -> None:
        """(src, dst) device block pairs: copy-on-write."""
        if not mapping:
            return
        src = torch.tensor([s for s, _ in mapping], device=self.device)
        dst = torch.tensor([d for _, d in mapping], device=self.device)
        for k, v in self.gpu_cache:
            k[dst] = k[src]
            v[dst] = v[src]
