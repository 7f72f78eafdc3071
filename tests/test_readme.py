"""README.md stays true: every `clusterft` command it shows parses with the real CLI, and every
repository path it names exists. (The commands' behaviour is exercised by the tests of each package
and by `make demo`; this test catches a README that drifted from the CLI.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from clusterft import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def clusterft_commands(text: str) -> list[list[str]]:
    """Each `clusterft ...` line of the README's bash blocks, split into arguments (comments dropped)."""
    commands = []
    for block in shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "clusterft" in words:
                commands.append(words[words.index("clusterft") + 1 :])
    return commands


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


def test_paths_named_in_readme_exist() -> None:
    named = set(re.findall(r"`((?:jobs|k8s|deployments|bench|examples|clusterft|tests)/[\w./-]+)`", README))
    assert named, "the README names no repository paths"
    missing = sorted(path for path in named if not (ROOT / path.rstrip("/")).exists())
    assert not missing, f"README names paths that do not exist: {missing}"
