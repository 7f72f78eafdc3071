"""README.md stays true: every `clusterft` command it shows parses with the real CLI, every repository
path it names exists, and every command line of its shell blocks is run somewhere: EXERCISED_BY names
the test (or demo step) that runs each, and fails when a README command has none."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from clusterft import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def shell_lines(text: str) -> list[list[str]]:
    """Each command line of the README's bash blocks, split into words (comments dropped)."""
    lines = [line for block in shell_blocks(text) for line in block.replace("\\\n", " ").splitlines()]
    return [words for words in (shlex.split(line, comments=True) for line in lines) if words]


def clusterft_commands(text: str) -> list[list[str]]:
    """The arguments of each `clusterft ...` command in the README's bash blocks."""
    return [words[words.index("clusterft") + 1 :] for words in shell_lines(text) if "clusterft" in words]


COMMANDS = clusterft_commands(README)


def test_the_readme_shows_the_main_commands() -> None:
    shown = {words[0] for words in COMMANDS}
    assert {
        "make-tiny-model",
        "validate",
        "data",
        "train",
        "checkpoints",
        "jobs",
        "registry",
        "serve",
    } <= shown


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:60] for w in COMMANDS])
def test_readme_command_parses(words: list[str]) -> None:
    args = cli.build_parser().parse_args(words)  # argparse exits 2 on an unknown flag or subcommand
    assert callable(args.handler)


def test_make_targets_in_readme_exist() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in re.findall(r"^make (\w+)", "\n".join(shell_blocks(README)), flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def git_ignored(path: str) -> bool:
    """Whether git ignores `path`: an output a run writes (the dashboard tests' screenshots), which a
    fresh clone lacks until that run."""
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


def test_paths_named_in_readme_exist() -> None:
    named = set(re.findall(r"`((?:jobs|k8s|deployments|bench|examples|clusterft|tests)/[\w./-]+)`", README))
    assert named, "the README names no repository paths"
    missing = sorted(
        path for path in named if not (ROOT / path.rstrip("/")).exists() and not git_ignored(path)
    )
    assert not missing, f"README names paths that do not exist: {missing}"


SERVE_TOUR = "tests/test_readme_commands.py::test_serve_the_registry_query_promote_rollback_and_stop"
CONTROLLER_JOB = (
    "tests/train/test_job_submit.py::test_ray_job_submit_runs_the_controller_to_promotion_and_eval"
)
TRAIN_JOB = "tests/train/test_job_submit.py::test_ray_job_submit_trains"
DEMO = "tests/test_demo.py::test_demo_runs_end_to_end"
CHECKOUT = "tests/test_readme_commands.py::test_validate_and_preview_the_quickstart_job"
CANARY_CLI = "tests/registry/test_canary.py::test_cli_sets_shows_and_aborts_the_split"
# README command line (words joined by one space) -> PATH::NAME of the test, fixture, make target or
# demo step that runs it (tests/test_demo.py runs the demo).
EXERCISED_BY = {
    "make demo": DEMO,  # `clusterft demo`, with --quick (200 steps instead of 400)
    "make test": "Makefile::test",  # the suite this test is part of
    "source .venv/bin/activate": "tests/test_readme_commands.py::run",  # the venv's bin first on PATH
    "clusterft make-tiny-model models/tiny-llama": "tests/test_readme_commands.py::checkout",  # its fixture
    "clusterft validate jobs/quickstart.yaml": CHECKOUT,
    "clusterft data preview jobs/quickstart.yaml -n 3": CHECKOUT,
    "clusterft train jobs/quickstart.yaml": TRAIN_JOB,  # a 4-step job, as a Ray job
    "clusterft checkpoints list saves/storage/quickstart/bundles": TRAIN_JOB,
    "clusterft checkpoints verify saves/storage/quickstart/bundles": TRAIN_JOB,
    "export RAY_AUTH_MODE=disabled": "clusterft/runtime.py::apply_runtime_defaults",  # every test process
    "ray start --head --num-cpus=4 --block & RAY_HEAD=$!": "tests/train/test_job_submit.py::head_cluster",
    "clusterft jobs submit jobs/quickstart.yaml --wait": CONTROLLER_JOB,  # as a Ray job, as k8s runs it
    "clusterft jobs list": CONTROLLER_JOB,
    "clusterft jobs status JOB_ID": CONTROLLER_JOB,
    "clusterft jobs logs JOB_ID --follow": CONTROLLER_JOB,
    "kill -9 $(cat saves/quickstart/.clusterft/workers/rank-1.pid)": "clusterft/demo.py::WorkerKiller",
    "clusterft registry list": SERVE_TOUR,
    "clusterft registry show quickstart production": SERVE_TOUR,
    "clusterft serve --registry registry --model-name quickstart --port 8000": SERVE_TOUR,
    (
        "curl -s http://127.0.0.1:8000/v1/chat/completions -H Content-Type: application/json -d "
        '{"model": "quickstart", "messages": [{"role": "user", "content": "sort\\n5301"}], "max_tokens": 8}'
    ): SERVE_TOUR,
    "clusterft registry promote quickstart v0002": SERVE_TOUR,
    "clusterft registry rollback quickstart --alias production": SERVE_TOUR,
    "clusterft registry canary quickstart v0004 --weight 10": CANARY_CLI,
    "clusterft registry canary-weight quickstart 25": CANARY_CLI,
    "clusterft registry traffic quickstart": CANARY_CLI,
    "clusterft registry canary-promote quickstart": CANARY_CLI,
    "clusterft registry canary-abort quickstart --reason ...": CANARY_CLI,
    "clusterft registry rollback quickstart --alias canary": CANARY_CLI,
    "kill $RAY_HEAD": "tests/train/test_job_submit.py::head_cluster",  # its teardown
    (
        "ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
        "clusterft train jobs/quickstart.yaml"
    ): TRAIN_JOB,
}


def test_every_readme_command_is_exercised() -> None:
    shown = {" ".join(words) for words in shell_lines(README)}
    assert sorted(shown - set(EXERCISED_BY)) == [], "README commands no test runs: add one, then list it here"
    assert sorted(set(EXERCISED_BY) - shown) == [], "listed commands the README no longer shows"
    for where in set(EXERCISED_BY.values()):
        path, name = where.split("::")
        source = (ROOT / path).read_text(encoding="utf-8")
        assert re.search(rf"^(def |class )?{name}[(:]", source, flags=re.M), f"{where}: no such test or step"
