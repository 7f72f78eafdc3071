"""The job spec: LLaMA-Factory YAMLs load as they are; mistakes name the file, line, key and fix."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest

from clusterft.config import SpecError, load_job_spec
from clusterft.config.reference import BEGIN, END, render_reference

LLAMAFACTORY_YAML = textwrap.dedent(
    """\
    model_name_or_path: ./models/tiny-llama
    stage: sft
    do_train: true
    finetuning_type: lora          # lora | full (and freeze if cheap)
    lora_rank: 8
    lora_alpha: 16
    lora_dropout: 0.05
    lora_target: all               # or q_proj,v_proj
    dataset: demo_tasks            # comma-separated names from dataset_info.json
    dataset_dir: examples/data
    template: chatml               # default | alpaca | chatml | llama3 | qwen
    cutoff_len: 512
    per_device_train_batch_size: 8
    gradient_accumulation_steps: 2
    learning_rate: 5.0e-4
    num_train_epochs: 3            # or max_steps
    lr_scheduler_type: cosine
    warmup_ratio: 0.1
    output_dir: saves/demo
    bf16: false
    seed: 42
    """
)


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_job_spec(path)
    return [f"{p.line}:{p.key}: {p.message}" for p in info.value.problems]


def test_llamafactory_yaml_loads_as_is(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, LLAMAFACTORY_YAML))
    assert spec.model.model_name_or_path == "./models/tiny-llama"
    assert spec.method.finetuning_type == "lora"
    assert (spec.method.lora_rank, spec.method.effective_lora_alpha, spec.method.lora_dropout) == (
        8,
        16,
        0.05,
    )
    assert spec.method.lora_target == ["all"]
    assert spec.data.dataset == ["demo_tasks"]
    assert (spec.data.template, spec.data.cutoff_len) == ("chatml", 512)
    assert spec.train.per_device_train_batch_size == 8
    assert spec.train.gradient_accumulation_steps == 2
    assert spec.train.learning_rate == 5e-4
    assert (spec.train.num_train_epochs, spec.train.max_steps) == (3.0, -1)
    assert (spec.train.lr_scheduler_type, spec.train.warmup_ratio, spec.train.seed) == ("cosine", 0.1, 42)
    # clusterft's own sections take their defaults.
    assert spec.parallel.strategy == "ddp" and spec.cluster.num_workers == 2


def test_spec_is_frozen_and_hash_tracks_content(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, LLAMAFACTORY_YAML))
    with pytest.raises(Exception, match="frozen"):
        spec.train.seed = 1  # type: ignore[misc]
    other = load_job_spec(write(tmp_path, LLAMAFACTORY_YAML.replace("seed: 42", "seed: 43"), "b.yaml"))
    assert spec.spec_hash() == load_job_spec(write(tmp_path, LLAMAFACTORY_YAML, "c.yaml")).spec_hash()
    assert spec.spec_hash() != other.spec_hash()


def test_comma_separated_lists(tmp_path: Path) -> None:
    text = LLAMAFACTORY_YAML.replace("dataset: demo_tasks ", "dataset: a, b ").replace(
        "lora_target: all ", "lora_target: q_proj,v_proj "
    )
    spec = load_job_spec(write(tmp_path, text))
    assert spec.data.dataset == ["a", "b"]
    assert spec.method.lora_target == ["q_proj", "v_proj"]


def test_typo_suggests_nearest_key_with_line(tmp_path: Path) -> None:
    path = write(tmp_path, LLAMAFACTORY_YAML.replace("lora_rank: 8", "lora_rnak: 8"))
    assert errors_of(path) == ["5:lora_rnak: unknown key; did you mean 'lora_rank'?"]


def test_section_typo_and_bad_values_all_reported(tmp_path: Path) -> None:
    text = LLAMAFACTORY_YAML + "parallel:\n  strategy: zero4\n  stages: 4\ncheckpoint:\n  keep_lats: 2\n"
    path = write(tmp_path, text)
    assert errors_of(path) == [
        "24:parallel.stages: unknown key; did you mean 'pipeline_stages'?",
        "26:checkpoint.keep_lats: unknown key; did you mean 'keep_last'?",
    ]
    path = write(tmp_path, LLAMAFACTORY_YAML + "parallel:\n  strategy: zero4\n", "b.yaml")
    [error] = errors_of(path)
    assert error.startswith("23:parallel.strategy: Input should be 'ddp', 'zero1'")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("finetuning_type: lora", "finetuning_type: qlora"),
            "4:finetuning_type: Input should be 'lora', 'full'",
        ),
        (("lora_rank: 8", "lora_rank: 0"), "5:lora_rank: Input should be greater than 0"),
        (("template: chatml", "template: vicuna"), "11:template: unknown template 'vicuna'; choose one of"),
        (("cutoff_len: 512", "cutoff_len: many"), "12:cutoff_len: Input should be a valid integer"),
        (("bf16: false", "bf16: true\nfp16: true"), "(spec): bf16 and fp16 are both true; choose one"),
        (("num_train_epochs: 3", "num_train_epochs: 0"), "(spec): nothing to train: set max_steps > 0"),
        (("stage: sft", "stage: dpo"), "2:stage: Input should be 'sft'"),
        (("do_train: true", "do_train: false"), "(spec): do_train is false: a job spec trains"),
        (
            ("output_dir: saves/demo", "output: saves/demo"),
            "19:output: unknown key; did you mean 'output_dir'?",
        ),
    ],
)
def test_broken_specs_name_the_key(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    path = write(tmp_path, LLAMAFACTORY_YAML.replace(*change))
    assert any(error.startswith(expected) or expected in error for error in errors_of(path)), errors_of(path)


def test_missing_required_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "lora_rank: 4\n")
    assert errors_of(path) == [
        "None:model_name_or_path: is required",
        "None:dataset: is required",
        "None:output_dir: is required",
    ]


def test_cross_section_rules(tmp_path: Path) -> None:
    offload = write(
        tmp_path, LLAMAFACTORY_YAML + "parallel:\n  strategy: zero2\n  offload: optimizer+params\n"
    )
    assert "needs strategy zero3" in errors_of(offload)[0]
    pipeline = write(
        tmp_path,
        LLAMAFACTORY_YAML
        + "cluster:\n  num_workers: 3\nparallel:\n  strategy: pipeline\n  pipeline_stages: 2\n",
        "p.yaml",
    )
    assert "pipeline_stages=2 must divide cluster.num_workers=3" in errors_of(pipeline)[0]
    zero_pipe = write(
        tmp_path, LLAMAFACTORY_YAML + "parallel:\n  strategy: pipeline\n  pipeline_zero_stage: 2\n", "z.yaml"
    )
    assert "pipeline_zero_stage: Input should be 0 or 1" in errors_of(zero_pipe)[0]
    for precision in ("bf16", "fp16"):  # neither may silently train in fp32 on CPU
        cpu = write(tmp_path, LLAMAFACTORY_YAML.replace("bf16: false", f"{precision}: true"), "f.yaml")
        assert f"{precision}: true trains on GPUs only" in errors_of(cpu)[0]
        gpu = (
            LLAMAFACTORY_YAML.replace("bf16: false", f"{precision}: true")
            + "cluster:\n  gpus_per_worker: 1\n"
        )
        assert getattr(load_job_spec(write(tmp_path, gpu, "g.yaml")).train, precision) is True


def test_elastic_num_workers(tmp_path: Path) -> None:
    """cluster.num_workers: [min, max] is Ray Train's elastic range; every count in it must split the
    global micro-batch (per_device_train_batch_size 8 × max) evenly; the strategy is data parallel."""
    spec = load_job_spec(write(tmp_path, LLAMAFACTORY_YAML + "cluster:\n  num_workers: [2, 3]\n"))
    assert spec.cluster.num_workers == (2, 3)
    assert (spec.cluster.min_workers, spec.cluster.max_workers) == (2, 3)
    same = load_job_spec(write(tmp_path, LLAMAFACTORY_YAML + "cluster:\n  num_workers: [2, 2]\n", "s.yaml"))
    assert spec.cluster.elastic and not same.cluster.elastic and same.cluster.num_workers == 2
    refused = {
        "[3, 1]": "needs 1 <= min <= max, not [3, 1]",
        "[0, 2]": "needs 1 <= min <= max, not [0, 2]",
        "[1, 2, 3]": "give a number of workers or [min, max] of two integers",
        "0": "needs at least 1 worker, not 0",
        "[2, 4]": "the global micro-batch of 32 examples (per_device_train_batch_size × max) cannot be "
        "split evenly over 3 workers",
    }
    for value, message in refused.items():
        bad = write(tmp_path, LLAMAFACTORY_YAML + f"cluster:\n  num_workers: {value}\n", "b.yaml")
        assert message in errors_of(bad)[0], value
    pipe = LLAMAFACTORY_YAML.replace("finetuning_type: lora", "finetuning_type: full")
    pipe += "cluster:\n  num_workers: [2, 4]\nparallel:\n  strategy: pipeline\n  pipeline_stages: 2\n"
    assert "needs a data-parallel strategy" in errors_of(write(tmp_path, pipe, "p.yaml"))[0]


def test_promote_merge_needs_a_lora_adapter(tmp_path: Path) -> None:
    merge = LLAMAFACTORY_YAML + "promote:\n  merge: true\n"
    assert load_job_spec(write(tmp_path, merge)).promote.merge is True
    assert load_job_spec(write(tmp_path, LLAMAFACTORY_YAML, "d.yaml")).promote.merge is False
    full = write(tmp_path, merge.replace("finetuning_type: lora", "finetuning_type: full"), "full.yaml")
    assert errors_of(full) == [
        "None:(spec): promote.merge: true merges a LoRA adapter into its base, but finetuning_type is "
        "full: the trained model is already a whole model; remove promote.merge (or train with "
        "finetuning_type: lora)"
    ]


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])
@pytest.mark.parametrize("finetuning_type", ["lora", "freeze"])
def test_model_parallel_trains_full_models_only(tmp_path: Path, strategy: str, finetuning_type: str) -> None:
    text = LLAMAFACTORY_YAML.replace("finetuning_type: lora", f"finetuning_type: {finetuning_type}")
    text += f"parallel:\n  strategy: {strategy}\n"
    path = write(tmp_path, text)
    assert errors_of(path) == [
        f"None:(spec): parallel.strategy {strategy} trains finetuning_type full only (its layers are "
        "rebuilt or split, which peft adapters do not survive); set finetuning_type: full, or use "
        f"ddp/zero* for {finetuning_type}"
    ]
    full = write(
        tmp_path, text.replace(f"finetuning_type: {finetuning_type}", "finetuning_type: full"), "f.yaml"
    )
    spec = load_job_spec(full)
    assert (spec.parallel.strategy, spec.method.finetuning_type) == (strategy, "full")


def test_from_checkpoint_is_a_filesystem_path(tmp_path: Path) -> None:
    bundle = "saves/storage/demo/bundles/step_000000004"
    spec = load_job_spec(write(tmp_path, LLAMAFACTORY_YAML + f"resume:\n  from_checkpoint: {bundle}\n"))
    assert spec.resume.from_checkpoint == bundle
    uri = write(tmp_path, LLAMAFACTORY_YAML + f"resume_from_checkpoint: s3://ckpt/{bundle}\n", "u.yaml")
    assert errors_of(uri) == [
        f"None:resume.from_checkpoint: s3://ckpt/{bundle} is a URI, but a bundle to resume from is read "
        "as a filesystem path; give its directory on a local or shared filesystem "
        "(e.g. /mnt/ckpt/run/bundles/step_000000004)"
    ]


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "model_name_or_path: [unclosed\n")
    [error] = errors_of(bad)
    assert error.startswith("2:(yaml): not valid YAML")
    assert "not found" in errors_of(tmp_path / "nope.yaml")[0]
    assert "must be a YAML mapping" in errors_of(write(tmp_path, "- a\n- b\n", "list.yaml"))[0]


def test_renamed_and_ignored_llamafactory_keys(tmp_path: Path) -> None:
    text = LLAMAFACTORY_YAML + "deepspeed: ds_z2.json\noverwrite_cache: true\nresume_from_checkpoint: null\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = load_job_spec(write(tmp_path, text))
    assert spec.parallel.deepspeed == "ds_z2.json"
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'job.yaml'}: overwrite_cache is accepted but ignored: "
        "the tokenized cache is keyed by the data options, files and tokenizer"
    ]


def test_readme_reference_matches_models() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme[readme.index(BEGIN) + len(BEGIN) : readme.index(END)].strip()
    assert block == render_reference().strip(), (
        "README is stale: run `python -m clusterft.config.reference --write`"
    )


def test_promote_auto_is_off_unless_asked_for(tmp_path: Path) -> None:
    assert load_job_spec(write(tmp_path, LLAMAFACTORY_YAML)).promote.auto is False
    auto = write(tmp_path, LLAMAFACTORY_YAML + "promote:\n  auto: true\n", "auto.yaml")
    assert load_job_spec(auto).promote.auto is True
    typo = write(tmp_path, LLAMAFACTORY_YAML + "promote:\n  auto: sometimes\n", "typo.yaml")
    assert "promote.auto" in errors_of(typo)[0]
