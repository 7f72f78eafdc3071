from __future__ import annotations

import pytest

from clusterft.data import DatasetError, EpochBatchSampler


def _sampler(
    num_examples: int = 50, micro_batch_size: int = 2, world_size: int = 4, rank: int = 0, seed: int = 1
):
    return EpochBatchSampler(
        num_examples, micro_batch_size=micro_batch_size, world_size=world_size, rank=rank, seed=seed
    )


def test_epoch_order_is_a_seeded_permutation():
    sampler = _sampler()
    assert sorted(sampler.epoch_order(0)) == list(range(50))
    assert sampler.epoch_order(0) == _sampler().epoch_order(0)
    assert sampler.epoch_order(0) != sampler.epoch_order(1)
    assert sampler.epoch_order(0) != _sampler(seed=2).epoch_order(0)


def test_drop_last_and_micro_steps():
    sampler = _sampler()  # G = 8: 6 full slices, 2 examples dropped
    assert sampler.micro_steps_per_epoch() == 6
    seen = [i for step in range(6) for i in sampler.global_batch(0, step)]
    assert seen == sampler.epoch_order(0)[:48]
    with pytest.raises(IndexError):
        sampler.global_batch(0, 6)


def test_ranks_get_contiguous_chunks_of_the_global_slice():
    ranks = [_sampler(rank=r) for r in range(4)]
    for step in range(6):
        global_batch = ranks[0].global_batch(3, step)
        assert [i for r in ranks for i in r.batch(3, step)] == global_batch
        assert ranks[2].batch(3, step) == global_batch[4:6]


def test_global_batches_do_not_depend_on_world_size():
    four_workers = _sampler(micro_batch_size=2, world_size=4)
    one_worker = _sampler(micro_batch_size=8, world_size=1)
    two_workers = [_sampler(micro_batch_size=4, world_size=2, rank=r) for r in range(2)]
    for epoch in range(3):
        for step in range(6):
            expected = four_workers.global_batch(epoch, step)
            assert one_worker.batch(epoch, step) == expected
            assert two_workers[0].batch(epoch, step) + two_workers[1].batch(epoch, step) == expected


def test_too_few_examples_for_one_global_batch():
    with pytest.raises(DatasetError, match="cannot fill one global batch of 8"):
        _sampler(num_examples=7)
    with pytest.raises(ValueError, match="rank=4"):
        _sampler(rank=4)
