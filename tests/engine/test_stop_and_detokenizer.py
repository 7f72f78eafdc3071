"""Stop strings, stop token ids, max_tokens, and streaming detokenization of multi-byte text."""

from transformers import AutoTokenizer

from clusterft.engine import LLM, SamplingParams
from clusterft.engine.detokenizer import IncrementalDetokenizer
from tests.engine.helpers import random_prompts


def test_streaming_detokenizer_never_splits_a_character(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    text = "naïve café → 東京 🎉 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some character spans several tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add_tokens([i]) for i in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_flush_emits_incomplete_tail(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    ids = tok.encode("🎉", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    assert detok.add_tokens(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1])


def test_stop_string_ends_generation_and_is_not_in_text(llama_dir):
    llm = LLM(llama_dir, num_gpu_blocks=32)
    prompt = "Once upon a time"  # the tiny model continues it with whole characters
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    stop = free.text[8:11]
    assert len(stop) == 3
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == free.text[: free.text.find(stop)]
    assert len(completion.token_ids) < len(free.token_ids)
    assert llm.engine.kv_cache_manager.block_pool.num_free_blocks == 32


def test_stop_token_ids_and_max_tokens(llama_dir):
    llm = LLM(llama_dir, num_gpu_blocks=32)
    prompt = random_prompts([10], seed=21)[0]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop_id = free.token_ids[4]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))[0]
    first = free.token_ids.index(stop_id)
    assert out.outputs[0].token_ids == free.token_ids[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id


def test_streamed_text_holds_back_a_possible_stop_string(llama_dir):
    engine = LLM(llama_dir, num_gpu_blocks=32).engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["zzzz"])
    engine.add_request("s", "Once upon a time", params)
    streamed = []
    while engine.has_unfinished_requests():
        streamed += [out for out in engine.step()]
    final = streamed[-1].outputs[0]
    assert streamed[-1].finished and final.finish_reason == "length"
    assert final.text == engine.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    for out in streamed[:-1]:
        seen = engine.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
        assert not out.finished and final.text.startswith(out.outputs[0].text)
        assert len(out.outputs[0].text) == max(0, len(seen) - 3)  # len("zzzz") - 1 held back
