"""Scheduler behaviour pinned step by step on a KV cache manager, no model."""

from clusterft.engine.kv_cache_manager import KVCacheManager
from clusterft.engine.outputs import ModelRunnerOutput
from clusterft.engine.request import RequestStatus
from clusterft.engine.sampling_params import SamplingParams
from clusterft.engine.scheduler import Scheduler
from tests.engine.helpers import make_request


def make_scheduler(
    num_blocks=16, num_cpu_blocks=0, budget=64, max_num_seqs=8, mode="recompute", block_size=4
):
    kv = KVCacheManager(block_size, num_blocks, num_cpu_blocks)
    return Scheduler(
        kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=256, preemption_mode=mode
    )


def run_step(sched, token=5):
    """Schedule, then pretend the model sampled `token` for every request that reached its end."""
    out = sched.schedule()
    done = [
        rid for rid, n in out.num_scheduled_tokens.items()
        if sched.requests[rid].num_computed_tokens == sched.requests[rid].num_tokens
    ]  # fmt: skip
    sched.update_from_output(
        out, ModelRunnerOutput(done, [token] * len(done), [0.0] * len(done), [None] * len(done))
    )
    return out


def test_chunked_prefill_respects_token_budget_and_decodes_come_first():
    sched = make_scheduler(budget=8)
    a, b = make_request("a", 10), make_request("b", 3)
    sched.add_request(a)
    sched.add_request(b)
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 8}
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 2, "b": 3}
    assert a.output_token_ids == [5] and b.output_token_ids == [5]
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert [r.req_id for r in out.scheduled_cached_reqs] == ["a", "b"] and not out.scheduled_new_reqs


def test_priority_then_fcfs_and_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    for rid, prio in [("low", 0), ("high", 5), ("low2", 0), ("high2", 5)]:
        sched.add_request(make_request(rid, 4, priority=prio))
    out = run_step(sched)
    assert list(out.num_scheduled_tokens) == ["high", "high2"]


def test_preemption_by_recompute_takes_lowest_priority_latest_request():
    sched = make_scheduler(num_blocks=4, budget=64)
    a, b = make_request("a", 8), make_request("b", token_ids=list(range(100, 108)))  # 2 blocks each
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)  # both prefilled: 8 tokens each = 4 blocks, pool full
    out = run_step(sched)  # a needs a 3rd block: b (later arrival) is preempted
    assert out.num_scheduled_tokens == {"a": 1}
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert "b" in out.finished_req_ids and sched.num_preemptions == {"recompute": 1, "swap": 0}
    assert [x.request_id for _, x in sched.waiting] == ["b"]


def test_preemption_by_swap_and_swap_in_when_room():
    sched = make_scheduler(num_blocks=4, num_cpu_blocks=4, mode="swap")
    a = make_request("a", 8, params=SamplingParams(temperature=0, max_tokens=2))
    b = make_request("b", token_ids=list(range(100, 108)))  # no prefix shared with a
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)
    out = run_step(sched)
    assert out.blocks_to_swap_out == [(2, 0), (3, 1)]
    assert b.status == RequestStatus.SWAPPED and b.num_computed_tokens == 8
    assert a.status == RequestStatus.FINISHED_LENGTH_CAPPED  # max_tokens=2 reached: blocks freed
    out = run_step(sched)
    assert len(out.blocks_to_swap_in) == 2 and out.num_scheduled_tokens == {"b": 1}
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b"]  # resumed: sent in full
    assert sched.num_preemptions == {"recompute": 0, "swap": 1}


def test_request_that_can_never_fit_finishes_with_reason():
    sched = make_scheduler(num_blocks=2)
    r = make_request("big", 20)
    sched.add_request(r)
    assert r.status == RequestStatus.FINISHED_IGNORED and "2 KV blocks" in r.finish_message
    grow = make_request("grow", 6, params=SamplingParams(temperature=0, max_tokens=50))
    sched.add_request(grow)
    for _ in range(4):
        run_step(sched)
    assert grow.status == RequestStatus.FINISHED_LENGTH_CAPPED and "KV cache full" in grow.finish_message
    assert sched.kv.block_pool.num_free_blocks == 2 and not sched.has_unfinished_requests()


def test_parallel_sampling_forks_before_last_prompt_token_and_copies_on_write():
    sched = make_scheduler()
    r = make_request("r#0", 6, params=SamplingParams(temperature=0, n=3, max_tokens=4))
    r.parent_id = "r"
    sched.add_request(r)
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"r#0": 5}  # the siblings each compute the last prompt token
    assert sorted(sched.requests) == ["r#0", "r#1", "r#2"]
    assert [b.ref_cnt for b in sched.kv.req_to_blocks["r#0"]] == [3, 3]
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"r#0": 1, "r#1": 1, "r#2": 1}
    assert out.blocks_to_copy == [(1, 2), (1, 3)]  # two copies; the last writer keeps block 1
    assert [sched.kv.get_block_ids(sched.requests[i]) for i in ("r#0", "r#1", "r#2")] == [
        [0, 2],
        [0, 3],
        [0, 1],
    ]


def test_abort_frees_blocks_of_waiting_and_running_requests():
    sched = make_scheduler()
    a, b = make_request("a", 9), make_request("b", 3)
    sched.add_request(a)
    run_step(sched)
    sched.add_request(b)
    sched.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv.block_pool.num_free_blocks == 16 and not sched.running
    assert not sched.requests and not sched.group_members  # nothing kept for finished requests
    out = sched.schedule()
    assert out.num_scheduled_tokens == {} and out.finished_req_ids == {"a"}  # the runner drops its state


def test_prefix_lookup_counts_once_when_admission_waits_for_blocks():
    sched = make_scheduler(num_blocks=4)
    a = make_request("a", 12, params=SamplingParams(temperature=0, max_tokens=1))  # 3 blocks
    b = make_request("b", token_ids=[0, 1, 2, 3, *range(100, 108)])  # a's first block, then 2 more
    sched.add_request(a)
    sched.add_request(b)
    out = run_step(sched)  # b hits a's block 0 but needs 2 new blocks, 1 is free: it waits
    assert out.num_scheduled_tokens == {"a": 12} and b.status == RequestStatus.WAITING
    assert (sched.kv.prefix_cache_queries, sched.kv.prefix_cache_hits) == (12, 0)
    out = run_step(sched)  # a finished (max_tokens=1): b is admitted, its lookup counted once
    assert out.num_scheduled_tokens == {"b": 8} and b.num_cached_tokens == 4
    assert (sched.kv.prefix_cache_queries, sched.kv.prefix_cache_hits) == (24, 4)
