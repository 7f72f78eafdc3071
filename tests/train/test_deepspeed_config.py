"""The strategy → DeepSpeed config compiler: exact dicts for every strategy, and "auto" resolution."""

from __future__ import annotations

import json

import pytest

from clusterft.config import parse_job_dict
from clusterft.errors import UserError
from clusterft.train.deepspeed_config import build_deepspeed_config
from clusterft.train.plan import plan_run


def make_spec(**extra):
    raw = {
        "model_name_or_path": "m",
        "dataset": "d",
        "output_dir": "out",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 3,
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "max_grad_norm": 0.5,
        **extra,
    }
    return parse_job_dict(raw, "test")


def config_for(spec, world_size, **kwargs):
    """The config of a fresh run of `spec` on `world_size` workers (data enough for any batch)."""
    return build_deepspeed_config(spec, plan_run(spec, world_size, num_train_examples=1024), **kwargs)


CPU_OPTIMIZER = {
    "type": "AdamW",
    "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "torch_adam": True},
}


def test_ddp_on_cpu():
    assert config_for(make_spec(), world_size=2) == {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "train_batch_size": 12,
        "gradient_clipping": 0.5,
        "optimizer": CPU_OPTIMIZER,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_buckets_follow_hidden_size(stage):
    config = config_for(make_spec(parallel={"strategy": f"zero{stage}"}), 2, hidden_size=64)
    assert config["zero_optimization"] == {
        "stage": stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 4096,
        "allgather_bucket_size": 4096,
        "round_robin_gradients": False,
    }


def test_zero3_offload_params():
    spec = make_spec(parallel={"strategy": "zero3", "offload": "optimizer+params"})
    zero = config_for(spec, 4, hidden_size=100)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_prefetch_bucket_size"] == 9000
    assert zero["stage3_param_persistence_threshold"] == 1000
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}


def test_zero2_offload_optimizer_only():
    zero = config_for(make_spec(parallel={"strategy": "zero2", "offload": "optimizer"}), 2)[
        "zero_optimization"
    ]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "offload_param" not in zero
    assert zero["reduce_bucket_size"] == 500_000_000


def test_pipeline_batch_is_per_data_parallel_group():
    spec = make_spec(
        finetuning_type="full",
        cluster={"num_workers": 4},
        parallel={"strategy": "pipeline", "pipeline_zero_stage": 1},
    )
    config = config_for(spec, 4)
    assert config["train_batch_size"] == 2 * 3 * 2  # 4 workers / 2 stages = 2 data-parallel groups
    assert config["zero_optimization"]["stage"] == 1
    assert config["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}


def test_tensor_parallel_autotp():
    spec = make_spec(finetuning_type="full", parallel={"strategy": "tensor", "tensor_parallel_size": 2})
    config = config_for(spec, 2)
    assert config["tensor_parallel"] == {"autotp_size": 2}
    assert config["train_batch_size"] == 12  # DeepSpeed counts tensor-parallel ranks in the batch


def test_batch_sizes_are_the_plans_after_a_resume_on_fewer_workers():
    """A 2-worker run (global micro-batch 4) resumed on 1 worker: that worker takes micro-batches
    of 4, not the spec's 2, and DeepSpeed's batch sizes must say so."""
    spec = make_spec(cluster={"num_workers": 1}, parallel={"strategy": "zero2"})
    config = build_deepspeed_config(spec, plan_run(spec, 1, num_train_examples=64, global_micro_batch=4))
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 4 * 3 * 1


def test_raw_json_batch_sizes_are_the_plans(tmp_path):
    """Workers are fed the plan's batches, so a raw JSON's explicit batch sizes give way to it."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "train_batch_size": 12}))
    spec = make_spec(deepspeed=str(path), cluster={"num_workers": 1})
    config = build_deepspeed_config(spec, plan_run(spec, 1, num_train_examples=64, global_micro_batch=4))
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (4, 12)


def test_gpu_uses_fused_optimizer_and_bf16():
    spec = make_spec(cluster={"gpus_per_worker": 1}, bf16=True)
    config = config_for(spec, 2)
    assert "torch_adam" not in config["optimizer"]["params"]
    assert config["bf16"] == {"enabled": True}


def test_fp16_on_gpu_trains_in_fp16_with_dynamic_loss_scaling():
    config = config_for(make_spec(cluster={"gpus_per_worker": 1}, fp16=True), 2)
    assert config["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
    }
    assert "bf16" not in config
    assert "fp16" not in config_for(make_spec(cluster={"gpus_per_worker": 1}), 2)  # fp32 by default


def test_raw_json_auto_values_resolved(tmp_path):
    raw = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": True},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    config = config_for(make_spec(deepspeed=str(path)), 2, hidden_size=8)
    assert config["train_batch_size"] == 12
    assert config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": False}
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 64, "overlap_comm": True}
    assert config["optimizer"] == CPU_OPTIMIZER


def test_raw_json_scheduler_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(UserError, match="scheduler"):
        config_for(make_spec(deepspeed=str(path)), 2)


def test_raw_json_missing_file_names_it():
    with pytest.raises(UserError, match=r"nope\.json not found"):
        config_for(make_spec(deepspeed="nope.json"), 2)
