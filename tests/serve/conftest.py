"""One local Ray cluster + Serve app per test module, on 127.0.0.1 and a free port; torn down after."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from clusterft.ports import free_port
from clusterft.runtime import apply_runtime_defaults
from clusterft.serve.spec import EngineSettings, ServeSpec

apply_runtime_defaults()

API_KEY = "test-key-123"
# Small engine: 64 streams of a few tokens fit at once; max_model_len small enough to hit in a test.
ENGINE = EngineSettings(num_gpu_blocks=512, max_model_len=256, max_num_seqs=64, max_num_batched_tokens=1024)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from clusterft.hf.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("serve-models") / "llama-tiny", "llama", "tiny", seed=0)


@contextmanager
def running_app(spec: ServeSpec) -> Iterator[str]:
    """Start Ray and the Serve app for `spec`; yields the base URL; always shuts both down."""
    import ray
    from ray import serve

    from clusterft.serve.app import build_app

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": spec.port})
        serve.run(build_app(spec), name="clusterft", route_prefix="/")
        url = f"http://127.0.0.1:{spec.port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "app never became healthy"
            time.sleep(0.2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module", params=["separate", "direct"])
def keyed_url(request, tiny_llama) -> Iterator[str]:
    """The tiny model's app behind API_KEY, one per test module and ingress shape (a separate ingress,
    and the engine serving HTTP itself): its base URL."""
    with running_app(make_spec(tiny_llama, api_key=API_KEY, ingress=request.param)) as base:
        yield base


def make_spec(model_dir: Path, **overrides) -> ServeSpec:
    fields = dict(
        model_dir=str(model_dir),
        served_model_name="tiny",
        port=free_port(),
        engine=ENGINE,
        engine_num_cpus=0.5,
        worker_num_cpus=0.5,
        ingress_num_cpus=0.25,
    )
    fields.update(overrides)
    return ServeSpec(**fields)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A peft LoRA adapter with non-zero B, so the adapter visibly changes greedy outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("serve-adapters") / "tiny-lora"
    get_peft_model(model, config).save_pretrained(out)
    return out


def offline_texts(
    model_dir: Path, prompts: list, max_tokens: int, lora: tuple[str, Path] | None = None
) -> list[str]:
    """Greedy completions of the offline engine, the reference the served outputs must equal."""
    from clusterft.engine import LLM, SamplingParams

    llm = LLM(model_dir, ENGINE.to_engine_config(dict([lora]) if lora else None))
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs = llm.generate(prompts, params, lora_name=lora[0] if lora else None)
    return [o.outputs[0].text for o in outs]
