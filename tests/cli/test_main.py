"""The `clusterft` command: help for every subcommand, exit codes 0 / 2 / 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clusterft import cli


def subcommand_paths(parser=None, prefix=()):  # type: ignore[no-untyped-def]
    """Every (sub)command path of the parser, e.g. ('data', 'preview')."""
    import argparse

    parser = parser or cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from subcommand_paths(sub, (*prefix, name))


def test_console_script_help_lists_subcommands() -> None:
    exe = Path(sys.executable).parent / "clusterft"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("validate", "make-tiny-model", "data", "demo"):
        assert name in out


@pytest.mark.parametrize("path", list(subcommand_paths()))
def test_every_subcommand_has_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: clusterft" in capsys.readouterr().out


def test_user_error_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\nlora_rnak: 4\n")
    assert cli.main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"{job}:4: lora_rnak: unknown key; did you mean 'lora_rank'?" in err
    assert "Traceback" not in err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["make-tiny-model", "out", "--arch", "gpt2"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'gpt2'" in capsys.readouterr().err


def test_internal_error_exits_1_traceback_only_with_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import clusterft.hf.tiny

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(clusterft.hf.tiny, "make_tiny_model", broken)
    assert cli.main(["make-tiny-model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: disk on fire (rerun with --debug" in err
    assert "Traceback" not in err
    assert cli.main(["--debug", "make-tiny-model", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_make_tiny_model_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["make-tiny-model", str(tmp_path / "m"), "--arch", "qwen2"]) == 0
    assert "wrote qwen2/tiny model (690,048 parameters)" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_write_demo_data_reproduces_the_committed_files(tmp_path: Path) -> None:
    assert cli.main(["data", "write-demo", str(tmp_path)]) == 0
    shipped = Path(__file__).parents[2] / "examples" / "data"
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in shipped.iterdir())
    for name in written:
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name
