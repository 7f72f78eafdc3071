"""Package boundaries, checked two ways.

1. In a fresh interpreter, import every module of a package and look at `sys.modules`: the engine
   loads no Ray, serving loads no controller, training loads no serving, and so on (what a process
   actually pulls in, lazy imports aside).
2. From the source: every `import` statement of every module (function-level and TYPE_CHECKING ones
   included) forms a graph of clusterft modules. It must have no cycle, no package may import one it
   is forbidden (lazy imports included), only `clusterft.cli` imports argparse, and every third-party
   package the runtime code imports is a declared dependency in pyproject.toml (so a plain
   `pip install clusterft` runs what the code imports).

The rules mirror the data flow config → controller → train | serve → engine, with registry below
the controller and serving, and cli on top of everything.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clusterft"

# package -> packages (clusterft subpackages or third-party top-level names) it must never import
FORBIDDEN: dict[str, set[str]] = {
    "config": {"ray", "engine", "train", "serve", "registry", "controller", "cli", "demo"},
    "data": {"ray", "engine", "train", "serve", "registry", "controller", "cli", "demo"},
    "hf": {"ray", "engine", "train", "serve", "registry", "controller", "cli", "demo"},
    "storage": {"ray", "engine", "train", "serve", "registry", "controller", "cli", "demo"},
    "engine": {"ray", "train", "serve", "registry", "controller", "cli", "demo"},
    "registry": {"ray", "engine", "train", "serve", "controller", "cli", "demo"},
    "train": {"engine", "serve", "registry", "controller", "cli", "demo"},
    "serve": {"train", "controller", "cli", "demo"},
    "controller": {"serve", "cli", "demo"},
}
# What importing every module of a package may not load, checked in a fresh interpreter.
NOT_LOADED: dict[str, set[str]] = {
    "clusterft.engine": {"ray", "clusterft.serve", "clusterft.controller", "clusterft.cli"},
    "clusterft.registry": {"ray", "clusterft.controller", "clusterft.serve", "clusterft.cli"},
    "clusterft.serve": {"clusterft.controller", "clusterft.train", "clusterft.cli"},
    "clusterft.train": {"clusterft.serve", "clusterft.controller", "clusterft.cli"},
    "clusterft.controller": {"clusterft.serve", "clusterft.cli"},
    "clusterft.config": {"ray", "torch", "clusterft.engine", "clusterft.controller", "clusterft.cli"},
}


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of clusterft."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(path: Path) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of every absolute import in the file, at any depth; `from a import b`
    yields `a.b` (b may be a module or a name in a)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """clusterft module -> the clusterft modules it imports (the longest known prefix of each name)."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {owner(name) for name, _ in imported_names(path) if name.startswith("clusterft.")}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def package_of(module: str) -> str:
    """`clusterft.serve.ingress` -> `serve`; a top-level module names itself (`demo`)."""
    return module.split(".")[1] if module.count(".") else module


def violations(modules: dict[str, Path]) -> list[str]:
    """Every import, at any depth, that crosses a forbidden boundary, as 'file:line: a imports b'."""
    found = []
    for module, path in modules.items():
        if module == "clusterft":
            continue
        forbidden = FORBIDDEN.get(package_of(module), set())
        for name, line in imported_names(path):
            parts = name.split(".")
            target = parts[1] if parts[0] == "clusterft" and len(parts) > 1 else parts[0]
            if parts[0] == "clusterft" and target == package_of(module):
                continue
            if target in forbidden:
                shown = ".".join(parts[:3]) if parts[0] == "clusterft" else target
                found.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {shown}")
            if name == "argparse" and package_of(module) != "cli":
                found.append(f"{path.relative_to(ROOT)}:{line}: {module} imports argparse (only cli/ may)")
    return sorted(set(found))


def test_the_source_import_graph_has_no_cycle() -> None:
    cycles = find_cycles(import_graph(module_files()))
    assert not cycles, "import cycles (break each by moving code down a layer): " + json.dumps(cycles)


def test_no_package_imports_across_a_forbidden_boundary() -> None:
    bad = violations(module_files())
    assert not bad, "imports that break the package boundaries:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", sorted(NOT_LOADED))
def test_importing_a_package_loads_nothing_it_must_not(package: str) -> None:
    """Import every module of `package` in a fresh interpreter; none of NOT_LOADED may be loaded."""
    script = (
        "import importlib, json, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, f"importing {package} failed:\n{result.stderr[-2000:]}"
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    leaked = sorted(
        name for name in loaded for bad in NOT_LOADED[package] if name == bad or name.startswith(bad + ".")
    )
    assert not leaked, f"importing {package} loaded {leaked[:10]}"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """A plain `pip install clusterft` installs what the runtime code imports (dev extras do not
    count: the demo's OpenAI client once lived only there)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_normalise(re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0]) for req in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for path in module_files().values():
        for name, line in imported_names(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "clusterft" or top == "__future__":
                continue
            owners = {_normalise(d) for d in distributions.get(top, [top])}
            if not owners & declared:
                missing.append(f"{path.relative_to(ROOT)}:{line}: {top} ({', '.join(sorted(owners))})")
    assert not sorted(set(missing)), "imported but not in [project.dependencies]:\n" + "\n".join(
        sorted(set(missing))
    )
