"""Helpers shared by the engine tests: HF references, prompts, requests, LoRA adapters."""

from __future__ import annotations

import itertools

import torch

from clusterft.engine.request import Request
from clusterft.engine.sampling_params import SamplingParams

_ARRIVALS = itertools.count()
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_HF_MODELS = {}


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    if model_dir not in _HF_MODELS:
        _HF_MODELS[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _HF_MODELS[model_dir]


def hf_greedy(model_dir, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """HF generate's new tokens for one prompt, stopped at EOS (kept) like the engine."""
    model = hf_model(model_dir)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    tokens = out[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(7, 1024, (n,), generator=g).tolist() for n in lengths]


def make_request(
    request_id: str,
    num_tokens: int = 0,
    token_ids: list[int] | None = None,
    params: SamplingParams | None = None,
    priority: int = 0,
    arrival_time: float | None = None,
    lora_name: str | None = None,
    lora_digest: str | None = None,
) -> Request:
    """A request with prompt `token_ids` (default 0..num_tokens-1); arrival defaults to its order; an
    adapter's digest defaults to one per name."""
    ids = token_ids if token_ids is not None else list(range(num_tokens))
    return Request(
        request_id=request_id,
        prompt_token_ids=ids,
        sampling_params=params or SamplingParams(temperature=0, max_tokens=16),
        eos_token_ids=frozenset({2}),
        arrival_time=arrival_time if arrival_time is not None else float(next(_ARRIVALS)),
        priority=priority,
        lora_name=lora_name,
        lora_digest=lora_digest or (lora_name and f"sha256-of-{lora_name}"),
    )


def make_adapter(base_dir, out_dir, seed):
    """A peft LoRA adapter dir on every projection, saved to `out_dir`; (out_dir, the peft model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # make the adapter matter: B is random and not small
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir, peft_model.eval()


FAILING_REQUEST = "boom"  # a step that schedules this request id raises (failing_forward)


def failing_forward(execute_model):
    """ModelRunner.execute_model that raises, as a device out of memory or a kernel error would, on
    a step that schedules the request FAILING_REQUEST: a fault of the whole step, not of one request."""

    def execute(runner, so):
        if FAILING_REQUEST in so.num_scheduled_tokens:
            raise RuntimeError("the forward pass failed (injected)")
        return execute_model(runner, so)

    return execute
