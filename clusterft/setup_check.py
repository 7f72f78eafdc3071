"""Post-install step run by `make setup`: warm the JIT-built CPU ops and check the stack imports.

DeepSpeed JIT-compiles its `deepspeed_shm_comm` op on the first `init_distributed` on CPU (~30 s
with gcc), and the engine its fused paged-attention kernel on first use (~20 s). Doing both once
here, into the project-local TORCH_EXTENSIONS_DIR, keeps tests, training workers and Serve replicas
(whose start-up has deadlines) from paying for it, or racing each other to build it.
"""

from __future__ import annotations

import time

from clusterft.runtime import apply_runtime_defaults


def main() -> None:
    apply_runtime_defaults()
    start = time.perf_counter()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)
    print(f"deepspeed shm_comm op ready in {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    from clusterft.engine import fused_attention

    try:
        fused_attention.load()
    except fused_attention.FusedAttentionUnavailable as err:  # the engine falls back to plain torch
        print(f"fused attention kernel not built, the engine will use its torch path: {err}")
    else:
        print(f"fused attention kernel ready in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
