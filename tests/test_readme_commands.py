"""The README's tour, run the way a reader runs it: the commands are read from README.md and run with
the real console script in a directory laid out like a checkout (`jobs/`, `examples/`, `models/`,
`registry/`), the `curl` line and the Python snippet against a real `clusterft serve`.

Only the port changes (8000 becomes a free one), and `clusterft serve` gets a private Ray temp dir, so
that its Ctrl-C shutdown can be checked to leave none of its Ray processes behind. Which test runs
each of the README's other commands is listed in tests/test_readme.py (EXERCISED_BY).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from clusterft.ports import free_port
from clusterft.registry.registry import Registry
from tests.ray_processes import started, stop_and_check
from tests.test_readme import README, ROOT, shell_lines

CLUSTERFT = str(Path(sys.executable).parent / "clusterft")
README_URL = "http://127.0.0.1:8000"


def shown(prefix: str) -> list[str]:
    """The README's one command line that starts with `prefix`, split into words."""
    [words] = [words for words in shell_lines(README) if " ".join(words).startswith(prefix)]
    return words


def run(words: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a README command in `cwd` with the venv's console scripts; the stores are cwd's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTERFT_REGISTRY", "CLUSTERFT_HOME")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(words)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reader's working directory: the repo's jobs/ and examples/, and the tour's first command."""
    work = tmp_path_factory.mktemp("reader")
    for name in ("jobs", "examples"):
        (work / name).symlink_to(ROOT / name)
    made = run(shown("clusterft make-tiny-model"), work)
    # (Any line before it is DeepSpeed's "Setting accelerator to CPU", which it prints on stdout.)
    assert made.stdout.splitlines()[-1] == "wrote llama/tiny model (918,656 parameters) to models/tiny-llama"
    return work


def test_validate_and_preview_the_quickstart_job(checkout: Path) -> None:
    validated = run(shown("clusterft validate"), checkout)
    assert re.search(r"^jobs/quickstart\.yaml: valid \(spec hash [0-9a-f]{12}\)$", validated.stderr, re.M)
    assert "warning" not in validated.stderr
    assert "model_name_or_path: models/tiny-llama" in validated.stdout

    words = shown("clusterft data preview")
    assert words[-2:] == ["-n", "3"]
    out = run(words, checkout).stdout
    assert out.startswith("datasets: demo_tasks (")
    examples = re.split(r"^── example \d+ · .*$", out, flags=re.M)[1:]
    assert len(examples) == 3
    for text in examples:  # each example's answer, and only it, is trained on
        assert text.count("[[") == 1 and "<|im_start|>assistant\n[[" in text, text


def models_served(url: str) -> list[tuple[str, str]]:
    return [(m["id"], m["version"]) for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]


def wait_until_served(url: str, version: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while models_served(url) != [("quickstart", version)]:
        assert time.monotonic() < deadline, f"the app still serves {models_served(url)}, not {version}"
        time.sleep(0.2)


@pytest.mark.slow
def test_serve_the_registry_query_promote_rollback_and_stop(checkout: Path) -> None:
    """`clusterft registry list|show`, `clusterft serve --registry ...` following `production`, the
    README's curl request and OpenAI snippet, `registry promote` and `rollback` followed by the app,
    then Ctrl-C, after which none of the server's Ray processes is left."""
    from clusterft.hf.tiny import make_tiny_model

    registry = Registry(checkout / "registry")
    second = make_tiny_model(checkout / "models" / "tiny-llama-2", arch="llama", size="tiny", seed=1)
    for model in (checkout / "models" / "tiny-llama", second):
        registry.register("quickstart", model, kind="full")
    registry.promote("quickstart", "v1")
    assert run(shown("clusterft registry list"), checkout).stdout.splitlines() == [
        "NAME        VERSIONS  LATEST  PRODUCTION  CANARY",
        "quickstart  2         v0002   v0001       -",
    ]
    shown_version = run(shown("clusterft registry show quickstart production"), checkout).stdout
    assert re.search(r"^version\s+v0001$", shown_version, re.M), shown_version

    words = shown("clusterft serve --registry")
    port = free_port()
    words[words.index("--port") + 1] = str(port)
    url = f"http://127.0.0.1:{port}"
    ray_tmp = tempfile.mkdtemp(prefix="cftserve", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CLUSTERFT_REGISTRY")}
    env = {**env, "RAY_TMPDIR": ray_tmp}
    with started([CLUSTERFT, *words[1:]], ray_tmp, f"{url}/health", cwd=checkout, env=env) as server:
        assert models_served(url) == [("quickstart", "v0001")]

        # The README's curl line, as written but for the port.
        curl = [word.replace(README_URL, url) for word in shown("curl")]
        reply = json.loads(run(curl, checkout, timeout=60).stdout)
        assert reply["object"] == "chat.completion" and reply["model"] == "quickstart", reply
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        assert 0 < reply["usage"]["completion_tokens"] <= 8

        # The README's OpenAI snippet, as written but for the port.
        [snippet] = re.findall(r"```python\n(.*?)```", README, flags=re.S)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippet.replace(README_URL, url), {})
        assert printed.getvalue().endswith("\n")

        promoted = run(shown("clusterft registry promote"), checkout).stdout
        assert promoted == "production of quickstart: v0001 -> v0002\n"
        wait_until_served(url, "v0002")
        rolled_back = run(shown("clusterft registry rollback quickstart --alias production"), checkout).stdout
        assert rolled_back == "production of quickstart rolled back: v0002 -> v0001\n"
        wait_until_served(url, "v0001")

        assert stop_and_check(server, signal.SIGINT, ray_tmp) == 0  # Ctrl-C
