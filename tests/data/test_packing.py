"""packing / neat_packing: rows of at most cutoff_len tokens in data order; with neat packing each
packed example's logits (and loss) equal the example's own, unpacked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clusterft.config.spec import DataArgs
from clusterft.data import IGNORE_INDEX, EpochBatchSampler, build_datasets, collate
from clusterft.data.collate import model_inputs
from clusterft.data.packing import pack_examples
from clusterft.data.preprocess import EncodedExample


def _example(ids: list[int], first_label: int) -> EncodedExample:
    labels = [IGNORE_INDEX] * first_label + ids[first_label:]
    return EncodedExample(input_ids=ids, labels=labels)


def test_greedy_packing_in_order_with_restarting_positions():
    a, b, c, d = _example([1, 2, 3], 1), _example([4, 5], 0), _example([6, 7, 8, 9], 2), _example([10], 0)
    rows = list(pack_examples([a, b, c, d], 6, neat=True))
    assert [row.input_ids for row in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    # each example's first label is dropped (it would be predicted from the previous example)
    assert [row.labels for row in rows] == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, -100]]
    assert [row.position_ids for row in rows] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    plain = list(pack_examples([a, b, c, d], 6, neat=False))
    assert [row.input_ids for row in plain] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert all(row.position_ids is None for row in plain)


def _dataset_dir(make_dataset_dir, count: int) -> Path:
    records = [
        {"instruction": "reverse" if i % 2 else "sort", "input": str(7 ** (i % 9 + 2)), "output": str(i)}
        for i in range(count)
    ]
    return make_dataset_dir({"nums": {"file_name": "nums.json"}}, {"nums.json": json.dumps(records)})


def _per_example_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**model_inputs(batch)).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def test_neat_packed_logits_and_loss_equal_the_unpacked_examples(make_dataset_dir, tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    dataset_dir = _dataset_dir(make_dataset_dir, 12)
    plain = build_datasets(
        DataArgs(dataset=["nums"], dataset_dir=str(dataset_dir), cutoff_len=64), tokenizer, seed=0
    )
    packed = build_datasets(
        DataArgs(dataset=["nums"], dataset_dir=str(dataset_dir), cutoff_len=64, neat_packing=True),
        tokenizer,
        seed=0,
    )
    assert 1 < len(packed.train) < len(plain.train)
    assert [t for row in packed.train for t in row.input_ids] == [
        t for ex in plain.train for t in ex.input_ids
    ]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pad = tokenizer.pad_token_id
    rows = list(packed.train)[:2]  # two rows of different lengths: the shorter is padded
    with torch.no_grad():
        batch = collate(rows, pad)
        packed_logits = model(**model_inputs(batch)).logits
        cross = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        examples = iter(plain.train)
        crossed = False
        for row_index, row in enumerate(rows):
            starts = [i for i, p in enumerate(row.position_ids) if p == 0]
            for start, end in zip(starts, [*starts[1:], len(row.input_ids)], strict=True):
                example = next(examples)
                assert row.input_ids[start:end] == example.input_ids
                alone = model(**model_inputs(collate([example], pad))).logits[0]
                torch.testing.assert_close(packed_logits[row_index, start:end], alone, rtol=0, atol=1e-5)
                crossed |= not torch.allclose(cross[row_index, start:end], alone, atol=1e-3)
        assert crossed  # without the packed-sequence mask, later examples attend to earlier ones
        packed_loss = _per_example_loss(model, collate(list(packed.train), pad))
        unpacked_loss = sum(_per_example_loss(model, collate([ex], pad)) for ex in plain.train)
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-4)
    for dataset in (plain.train, packed.train):  # counted in numpy over the Arrow label column
        assert dataset.label_counts() == [sum(t != IGNORE_INDEX for t in row.labels[1:]) for row in dataset]
    assert sum(packed.train.label_counts()) == sum(plain.train.label_counts())


def test_packed_order_is_deterministic_so_the_data_position_resumes_it(make_dataset_dir, tokenizer, tmp_path):
    dataset_dir = _dataset_dir(make_dataset_dir, 40)
    data = DataArgs(dataset=["nums"], dataset_dir=str(dataset_dir), cutoff_len=48, packing=True, val_size=4)
    first = build_datasets(data, tokenizer, seed=5, default_cache_dir=tmp_path / "a").train
    again = build_datasets(data, tokenizer, seed=5, default_cache_dir=tmp_path / "b").train
    assert first == again and all(len(row.input_ids) <= 48 for row in first)

    def batches(dataset, start: tuple[int, int]) -> list[list[list[int]]]:
        sampler = EpochBatchSampler(len(dataset), micro_batch_size=2, world_size=1, rank=0, seed=5)
        steps = sampler.micro_steps_per_epoch()
        positions = [(e, s) for e in range(2) for s in range(steps)]
        return [
            [dataset[i].input_ids for i in sampler.batch(*p)] for p in positions[positions.index(start) :]
        ]

    uninterrupted = batches(first, (0, 0))
    resumed = batches(again, (1, 1))  # a "restarted" run from its saved (epoch, micro_step)
    assert resumed == uninterrupted[-len(resumed) :]


def test_neat_packing_with_pipeline_is_refused():
    from clusterft.config import parse_job_dict

    raw = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "finetuning_type": "full",
           "neat_packing": True, "parallel": {"strategy": "pipeline", "pipeline_stages": 2},
           "cluster": {"num_workers": 2}}  # fmt: skip
    with pytest.raises(Exception, match="neat_packing: the pipeline stages take input ids only"):
        parse_job_dict(raw, "job.yaml")
