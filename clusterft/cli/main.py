"""The `clusterft` command.

Exit codes: 0 ok; 2 a user error (bad spec, unknown dataset, missing file) with a message that
names the problem and the fix; 1 an internal error, with a traceback only under --debug.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from functools import partial

from clusterft.cli.helpers import add_command, add_group
from clusterft.errors import UserError
from clusterft.runtime import apply_runtime_defaults


def _validate(args: argparse.Namespace) -> int:
    import warnings

    import yaml

    from clusterft.config import load_job_spec
    from clusterft.preflight import check_job_paths

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = load_job_spec(args.job)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    for note in check_job_paths(spec):
        print(f"warning: {note}", file=sys.stderr)
    if not args.quiet:
        print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), end="")
    print(f"{args.job}: valid (spec hash {spec.spec_hash()[:12]})", file=sys.stderr)
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from clusterft.hf.tiny import count_parameters, make_tiny_model

    out = make_tiny_model(args.out, arch=args.arch, size=args.size, seed=args.seed)
    print(f"wrote {args.arch}/{args.size} model ({count_parameters(out):,} parameters) to {out}")
    return 0


def _data_preview(args: argparse.Namespace) -> int:
    from clusterft.config import load_job_spec
    from clusterft.data.preview import preview
    from clusterft.hf.loading import load_tokenizer

    spec = load_job_spec(args.job)
    tokenizer = load_tokenizer(spec.model.model_name_or_path)
    print(preview(spec.data, tokenizer, args.n, seed=spec.train.seed, color=sys.stdout.isatty()))
    return 0


def _write_demo_data(args: argparse.Namespace) -> int:
    from clusterft.data.demo_data import write_demo_datasets

    print(f"wrote {write_demo_datasets(args.out_dir)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from clusterft.cli.train import train_command

    return train_command(args.job, progress=not args.no_progress)


def _checkpoints(args: argparse.Namespace) -> int:
    from clusterft.cli.train import checkpoints_command

    return checkpoints_command(args.action, args.path, args.keep)


def _merge(args: argparse.Namespace) -> int:
    from clusterft.cli.train import merge_command

    return merge_command(args.base, args.adapter, args.out)


def _demo(args: argparse.Namespace) -> int:
    from clusterft.demo import run_demo

    return run_demo(workdir=args.workdir, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clusterft",
        description="Fine-tune, resume, promote and serve LLMs on a Ray cluster.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command = partial(add_command, commands)

    sub = command("validate", _validate, "check a job spec YAML and print it resolved (exit 2 on errors)")
    sub.add_argument("job", help="job spec YAML, e.g. jobs/quickstart.yaml")
    sub.add_argument("-q", "--quiet", action="store_true", help="print only the verdict")

    sub = command(
        "make-tiny-model", _make_tiny_model, "write a tiny random Llama/Qwen2 model + tokenizer (offline)"
    )
    sub.add_argument("out", help="output directory (an HF model dir)")
    sub.add_argument("--arch", choices=["llama", "qwen2"], default="llama", help="model family")
    sub.add_argument("--size", choices=["tiny", "small"], default="tiny", help="tiny ~0.9M, small ~5M params")
    sub.add_argument("--seed", type=int, default=0, help="weight initialisation seed")

    data_action = add_group(commands, "data", "inspect a job's datasets")
    sub = data_action(
        "preview",
        _data_preview,
        "show rendered examples with the trained-on part marked",
        "show rendered examples with the trained-on part marked ([[...]])",
    )
    sub.add_argument("job", help="job spec YAML")
    sub.add_argument("-n", type=int, default=3, help="number of examples")
    sub = data_action(
        "write-demo", _write_demo_data, "write the bundled demo datasets and their dataset_info.json"
    )
    sub.add_argument("out_dir", nargs="?", default="examples/data", help="where (default examples/data)")

    sub = command(
        "train", _train, "run a job spec on Ray Train with DeepSpeed (local cluster unless RAY_ADDRESS)"
    )
    sub.add_argument("job", help="job spec YAML")
    sub.add_argument("--no-progress", action="store_true", help="no live progress bar (logs, CI)")

    sub = command("checkpoints", _checkpoints, "list, verify or prune a run's checkpoint bundles")
    sub.add_argument("action", choices=["list", "verify", "prune"], help="verify checks every sha256")
    sub.add_argument("path", help="a run's checkpoint directory (local path or pyarrow URI)")
    sub.add_argument("--keep", type=int, default=None, help="prune: valid bundles to keep (default 1)")

    sub = command("merge", _merge, "merge a LoRA adapter into its base model and save an HF model dir")
    sub.add_argument("base", help="base HF model dir")
    sub.add_argument("adapter", help="peft adapter dir")
    sub.add_argument("out", help="output HF model dir")

    from clusterft.cli.jobs import add_eval_command, add_jobs_commands
    from clusterft.cli.registry import add_registry_commands
    from clusterft.cli.serve import add_serve_command

    add_jobs_commands(commands)
    add_eval_command(commands)
    add_registry_commands(commands)
    add_serve_command(commands)

    sub = command("demo", _demo, "run the end-to-end demo on a local Ray cluster and a tiny model")
    sub.add_argument("--workdir", default=".", help="where models/ and saves/ are written")
    sub.add_argument("--quick", action="store_true", help="fewer steps (used by the tests)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `clusterft` console script; returns the exit code."""
    apply_runtime_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"internal error: {type(err).__name__}: {err} (rerun with --debug for a traceback)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
