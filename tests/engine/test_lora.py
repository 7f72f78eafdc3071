"""Multi-LoRA: peft adapters served by name, mixed with the base model in one batch, LRU-bounded."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clusterft.engine import LLM, LLMEngine, SamplingParams
from clusterft.engine.async_llm import EngineLoop
from clusterft.engine.lora import ADAPTER_WEIGHTS
from tests.engine.helpers import hf_greedy, random_prompts


def peft_greedy(peft_model, prompt, max_new_tokens):
    with torch.inference_mode():
        out = peft_model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False
        )
    tokens = out[0, len(prompt) :].tolist()
    eos = set(peft_model.generation_config.eos_token_id)
    cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:cut]


def run_mixed_batch(llm, prompts, lora_names, params):
    engine = llm.engine
    for i, (prompt, name) in enumerate(zip(prompts, lora_names, strict=True)):
        engine.add_request(f"r{i}", prompt, params, lora_name=name)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    return [finished[f"r{i}"] for i in range(len(prompts))]


def test_base_and_two_adapters_in_one_batch_match_peft(llama_dir, adapters):
    prompts = random_prompts([9, 14, 20, 11], seed=30)
    names = [None, "a", "b", "a"]
    llm = LLM(llama_dir, num_gpu_blocks=64, lora_modules=[(n, str(d)) for n, (d, _) in adapters.items()])
    params = SamplingParams(temperature=0, max_tokens=16)
    outputs = run_mixed_batch(llm, prompts, names, params)
    assert llm.engine.lora_manager.num_loads == 2
    for prompt, name, tokens in zip(prompts, names, outputs, strict=True):
        ref = hf_greedy(llama_dir, prompt, 16) if name is None else peft_greedy(adapters[name][1], prompt, 16)
        assert tokens == ref
    assert outputs[1] != hf_greedy(llama_dir, prompts[1], 16)  # the adapter changes the output


def test_cached_adapters_become_resident_without_reading_their_files(llama_dir, adapters, tmp_path):
    """max_cpu_loras keeps checked weights in host memory: with one slot and both adapters cached,
    alternating them swaps the slot four times but reads each adapter's files once (at add_lora),
    so the files may even vanish meanwhile; the outputs are peft's. A name registered again serves
    its new adapter."""
    copies = {n: Path(shutil.copytree(adapters[n][0], tmp_path / n)) for n in ("a", "b")}
    llm = LLM(
        llama_dir, num_gpu_blocks=64, max_loras=1, max_cpu_loras=2,
        lora_modules=[(n, str(p)) for n, p in copies.items()],
    )  # fmt: skip
    for path in copies.values():
        shutil.rmtree(path)
    prompt = random_prompts([12], seed=33)[0]
    params = SamplingParams(temperature=0, max_tokens=8)
    for name in ["a", "b", "a", "b"]:
        got = llm.generate(prompt, params, lora_name=name)[0].outputs[0].token_ids
        assert got == peft_greedy(adapters[name][1], prompt, 8)
    manager = llm.engine.lora_manager
    assert (manager.num_loads, manager.num_reads) == (4, 2)

    llm.engine.add_lora("b", str(adapters["a"][0]))  # "b" resident now: its slot must not serve on
    got = llm.generate(prompt, params, lora_name="b")[0].outputs[0].token_ids
    assert got == peft_greedy(adapters["a"][1], prompt, 8)
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be >= max_loras \(2\)"):
        LLM(llama_dir, num_gpu_blocks=64, max_loras=2, max_cpu_loras=1)


@pytest.mark.parametrize("fault", ["vanished", "truncated"])
def test_an_adapter_that_no_longer_loads_fails_only_its_requests(llama_dir, adapters, tmp_path, fault):
    """An adapter whose weights vanish or are cut short after add_lora (shared storage cleaned or
    rewritten under a replica) fails only its own requests, with a message naming it and the fix;
    the base-model and other-adapter requests of the same steps get the tokens they get alone. The KV
    computed for the failed requests without their adapter leaves the prefix cache: once the files
    are back, the same prompt gets the adapter's own tokens, computed afresh. (One host-cache place:
    "b", registered after it, pushed "broken" out, so its first use reads its files.)"""
    broken = Path(shutil.copytree(adapters["a"][0], tmp_path / "broken"))
    file = broken / ADAPTER_WEIGHTS
    good = file.read_bytes()
    llm = LLM(
        llama_dir, num_gpu_blocks=64, max_loras=1,
        lora_modules=[("broken", str(broken)), ("b", str(adapters["b"][0]))],
    )  # fmt: skip
    if fault == "vanished":
        file.unlink()
    else:
        file.write_bytes(good[:-100])
    prompts = random_prompts([40, 14, 20, 33], seed=32)
    names = ["broken", None, "b", "broken"]
    params = SamplingParams(temperature=0, max_tokens=12)
    engine = llm.engine
    for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
        engine.add_request(f"r{i}", prompt, params, lora_name=name)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    error = "FileNotFoundError: " if fault == "vanished" else "ValueError: "
    for i in (0, 3):
        failed = finished[f"r{i}"]
        assert [o.finish_reason for o in failed.outputs] == ["abort"]
        assert failed.finish_message.startswith(f"LoRA adapter 'broken' could not be loaded ({error}")
        assert failed.finish_message.endswith("restore its files, or register it again; it was aborted")
    assert finished["r1"].outputs[0].token_ids == hf_greedy(llama_dir, prompts[1], 12)
    assert finished["r2"].outputs[0].token_ids == peft_greedy(adapters["b"][1], prompts[2], 12)
    assert engine.resident_adapters() == ["b"]  # the failed load left no half-filled slot

    file.write_bytes(good)
    again = llm.generate(prompts[0], params, lora_name="broken")[0]
    assert again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == peft_greedy(adapters["a"][1], prompts[0], 12)


def test_an_adapter_registered_again_never_hits_the_kv_of_the_one_before(llama_dir, adapters):
    """Prefix-cache blocks are keyed by the adapter's bytes, not its name: another adapter under the
    name computes its KV afresh, the same one (registered again, or after a removal) hits it."""
    llm = LLM(llama_dir, num_gpu_blocks=64, lora_modules=[("x", str(adapters["a"][0]))])
    prompt = random_prompts([40], seed=34)[0]
    params = SamplingParams(temperature=0, max_tokens=8)

    def run() -> tuple[int, list[int]]:
        out = llm.generate(prompt, params, lora_name="x")[0]
        return out.num_cached_tokens, out.outputs[0].token_ids

    expected = {name: peft_greedy(adapters[name][1], prompt, 8) for name in "ab"}
    assert expected["a"] != expected["b"]
    assert run() == (0, expected["a"])
    assert run() == (32, expected["a"])
    llm.engine.add_lora("x", str(adapters["b"][0]))
    assert run() == (0, expected["b"])
    llm.engine.add_lora("x", str(adapters["b"][0]))
    assert run() == (32, expected["b"])
    llm.engine.remove_lora("x")
    llm.engine.add_lora("x", str(adapters["a"][0]))
    assert run() == (32, expected["a"])


def test_an_adapter_whose_files_were_replaced_is_refused_when_read_again(llama_dir, adapters, tmp_path):
    """An adapter read again from its files (pushed out of the host cache) whose files now hold
    another adapter fails its requests, naming the fix, instead of serving weights nobody registered
    under KV keyed as the registered ones; registered again, it serves the new files."""
    replaced = Path(shutil.copytree(adapters["a"][0], tmp_path / "replaced"))
    llm = LLM(
        llama_dir, num_gpu_blocks=64, max_loras=1,
        lora_modules=[("x", str(replaced)), ("b", str(adapters["b"][0]))],
    )  # fmt: skip
    shutil.copytree(adapters["b"][0], replaced, dirs_exist_ok=True)
    prompts = random_prompts([20, 14], seed=35)
    params = SamplingParams(temperature=0, max_tokens=8)
    engine = llm.engine
    engine.add_request("r0", prompts[0], params, lora_name="x")
    engine.add_request("r1", prompts[1], params)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    assert [o.finish_reason for o in finished["r0"].outputs] == ["abort"]
    assert "its files changed since it was registered" in finished["r0"].finish_message
    assert finished["r0"].finish_message.endswith("register it again; it was aborted")
    assert finished["r1"].outputs[0].token_ids == hf_greedy(llama_dir, prompts[1], 8)

    engine.add_lora("x", str(replaced))
    again = llm.generate(prompts[0], params, lora_name="x")[0].outputs[0].token_ids
    assert again == peft_greedy(adapters["b"][1], prompts[0], 8)


def test_adapter_prefix_cache_is_separate_from_base(llama_dir, adapters):
    llm = LLM(llama_dir, num_gpu_blocks=64, lora_modules=[("a", str(adapters["a"][0]))])
    prompt = random_prompts([40], seed=31)[0]
    params = SamplingParams(temperature=0, max_tokens=4)
    llm.generate(prompt, params)
    out = llm.generate(prompt, params, lora_name="a")[0]
    assert out.num_cached_tokens == 0  # base-model KV is not reused for the adapter
    assert llm.generate(prompt, params, lora_name="a")[0].num_cached_tokens == 32


def test_lru_bound_on_resident_adapters(llama_dir, adapters):
    llm = LLM(
        llama_dir,
        num_gpu_blocks=64,
        max_loras=1,
        lora_modules=[(n, str(d)) for n, (d, _) in adapters.items()],
    )
    prompts = random_prompts([9, 14, 12], seed=32)
    names = ["a", "b", "a"]
    outputs = run_mixed_batch(llm, prompts, names, SamplingParams(temperature=0, max_tokens=8))
    manager = llm.engine.lora_manager
    assert len(manager.resident) == 1 and manager.num_loads >= 2
    for prompt, name, tokens in zip(prompts, names, outputs, strict=True):
        assert tokens == peft_greedy(adapters[name][1], prompt, 8)


def test_list_loras_follows_add_and_remove(llama_dir, adapters):
    llm = LLM(llama_dir, num_gpu_blocks=16, lora_modules=[("a", str(adapters["a"][0]))])
    assert llm.engine.list_loras() == ["a"]
    llm.engine.add_lora("b", adapters["b"][0])
    assert llm.engine.list_loras() == ["a", "b"]
    llm.engine.remove_lora("a")
    assert llm.engine.list_loras() == ["b"]
    with pytest.raises(ValueError, match=r"unknown lora_name 'a'"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2), lora_name="a")


def test_unknown_adapter_is_a_clear_error(llama_dir):
    llm = LLM(llama_dir, num_gpu_blocks=16)
    with pytest.raises(ValueError, match=r"unknown lora_name 'nope'.*add_lora"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2), lora_name="nope")


# ---- adapters are checked against the base model when they are added -----------------------------


def broken_copy(adapter_dir, tmp_path, name: str):
    """A copy of a good adapter dir, to break one thing in."""
    return Path(shutil.copytree(adapter_dir, tmp_path / name))


def rewrite_config(path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def rewrite_weights(path, change) -> None:
    file = path / "adapter_model.safetensors"
    weights = load_file(str(file))
    change(weights)
    save_file(weights, str(file))


def _missing_weights(path):
    (path / "adapter_model.safetensors").unlink()


def _truncated_weights(path):
    file = path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


def _rank_zero(path):
    rewrite_config(path, r=0)


def _rank_differs_from_weights(path):
    rewrite_config(path, r=8)


def _embedding_target(path):
    rewrite_config(path, target_modules=["q_proj", "embed_tokens"])


def _nan_weight(path):
    def change(weights):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        weights[key] = torch.full_like(weights[key], float("nan"))

    rewrite_weights(path, change)


def _missing_half(path):
    rewrite_weights(path, lambda w: w.pop("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"))


def _layer_beyond_model(path):
    def change(weights):
        for half in "AB":
            key = f"base_model.model.model.layers.0.self_attn.q_proj.lora_{half}.weight"
            weights[key.replace("layers.0", "layers.7")] = weights[key].clone()

    rewrite_weights(path, change)


BROKEN = {
    "missing weights file": (_missing_weights, FileNotFoundError, r"no adapter_model\.safetensors"),
    "truncated weights file": (
        _truncated_weights,
        ValueError,
        r"unreadable .*copy or save the adapter again",
    ),
    "rank 0": (_rank_zero, ValueError, r"r=0; the LoRA rank must be an integer >= 1"),
    "rank unlike the weights": (_rank_differs_from_weights, ValueError, r"r=8.*from different adapters"),
    "unserved target module": (_embedding_target, ValueError, r"target_modules \['embed_tokens'\]"),
    "NaN weights": (_nan_weight, ValueError, r"layers\.0\.self_attn\.q_proj\.lora_B\.weight.*non-finite"),
    "half of a pair": (_missing_half, ValueError, r"layers\.1\.mlp\.up_proj\.lora_A\.weight is missing"),
    "layer the model lacks": (_layer_beyond_model, ValueError, r"adapts layer 7, but the base model has 4"),
}


@pytest.fixture(scope="module")
def base_engine(llama_dir):
    return LLM(llama_dir, num_gpu_blocks=32).engine


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_adapter_is_refused_when_added(base_engine, adapters, tmp_path, kind):
    """Registration reads the adapter and checks it, so a broken one never reaches a step (where its
    first request used to crash the step, and with it every request in the batch)."""
    breaks, error, message = BROKEN[kind]
    path = broken_copy(adapters["a"][0], tmp_path, "broken")
    breaks(path)
    with pytest.raises(error, match=message):
        base_engine.add_lora("broken", path)
    assert "broken" not in base_engine.list_loras()
    assert len(generate_all(base_engine, [1, 2, 3], None)) == 4  # the engine serves on, untouched


def test_another_base_models_adapter_is_refused_naming_the_shape(base_engine, qwen2_dir, tmp_path):
    """A real peft adapter of the tiny Qwen2 (2 KV heads: k_proj/v_proj are 32 wide, not 128)."""
    from tests.engine.helpers import make_adapter

    path, _ = make_adapter(qwen2_dir, tmp_path / "qwen2-lora", seed=3)
    expected = (
        r"k_proj\.lora_B\.weight has shape \[32, 4\], but the base model's k_proj needs \[128, 4\]: "
        rf"the adapter was trained for another base model \({re.escape(str(qwen2_dir))}\)"
    )
    with pytest.raises(ValueError, match=expected):
        base_engine.add_lora("qwen2-lora", path)
    assert "qwen2-lora" not in base_engine.list_loras()


def test_an_adapter_on_an_unserved_module_is_refused(base_engine, llama_dir, tmp_path):
    """A real peft adapter that also trains lm_head, which the engine has no LoRA slot for."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    get_peft_model(model, config).save_pretrained(tmp_path / "head-lora")
    with pytest.raises(ValueError, match=r"target_modules \['lm_head'\] are not served"):
        base_engine.add_lora("head-lora", tmp_path / "head-lora")


def test_a_broken_adapter_given_at_start_fails_the_engine_build(llama_dir, adapters, tmp_path):
    path = broken_copy(adapters["a"][0], tmp_path, "broken")
    _rank_zero(path)
    with pytest.raises(ValueError, match=r"LoRA 'sql'.*r=0"):
        LLM(llama_dir, num_gpu_blocks=16, lora_modules=[("sql", str(path))])


def generate_all(engine, prompt, lora_name) -> list[int]:
    engine.add_request(
        "probe", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), lora_name=lora_name
    )
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
    return tokens


# ---- the adapter-name rule of the asyncio front end ---------------------------------------------


def test_engine_loop_answers_400_for_a_broken_adapter_and_a_reserved_name(llama_dir, adapters, tmp_path):
    loop = EngineLoop(lambda: LLMEngine(llama_dir, num_gpu_blocks=16), base_model="tiny")
    path = broken_copy(adapters["a"][0], tmp_path, "broken")
    _rank_zero(path)
    error = loop.add_adapter("broken", str(path))["error"]
    assert (error["status"], error["param"]) == (400, "path") and "r=0" in error["message"]
    # `<model>@<version>` names the registered adapter version that base-model requests use: an
    # adapter added under such a name would replace it for every production request.
    error = loop.add_adapter("tiny@v0002", str(adapters["a"][0]))["error"]
    assert (error["status"], error["param"]) == (400, "name") and "'@' is reserved" in error["message"]
    assert loop.adapters == {} and loop.engine.list_loras() == []
    assert loop.add_adapter("good", str(adapters["a"][0])) is None
    assert loop.engine.list_loras() == ["good"]


def test_removing_an_adapter_keeps_the_prefix_cache_and_its_name_can_take_another(llama_dir, adapters):
    """Removing an adapter from the served loop no longer empties the whole prefix cache (base-model
    prompts stay cached); another adapter added under the freed name computes its own KV."""
    loop = EngineLoop(lambda: LLMEngine(llama_dir, num_gpu_blocks=64), base_model="tiny")
    prompt = random_prompts([40], seed=36)[0]
    params = SamplingParams(temperature=0, max_tokens=4)

    def run(lora_name):
        loop.engine.add_request("probe", prompt, params, lora_name=lora_name)
        while loop.engine.has_unfinished_requests():
            done = [out for out in loop.engine.step() if out.finished]
        return done[0].num_cached_tokens, done[0].outputs[0].token_ids

    assert loop.add_adapter("x", str(adapters["a"][0])) is None
    base = run(None)[1]
    assert run("x")[0] == 0 and run("x")[0] == 32
    assert loop.remove_adapter("x") is None and loop.engine.list_loras() == []
    assert run(None) == (32, base)
    assert loop.add_adapter("x", str(adapters["b"][0])) is None
    assert run("x") == (0, peft_greedy(adapters["b"][1], prompt, 4))
