"""`clusterft registry list|show|promote|rollback|delete|traffic|canary|canary-weight|canary-promote|
canary-abort`: argparse wiring and handlers.

`add_registry_commands(commands)` adds the `registry` command group to the CLI's subparsers; each
handler takes the parsed `argparse.Namespace` and returns the exit code. Errors are `UserError`s,
which the CLI prints without a traceback (exit 2).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from clusterft.cli.helpers import Subcommands, add_dir_option, add_group
from clusterft.registry import DEFAULT_REGISTRY, REGISTRY_ENV
from clusterft.registry.registry import ALIAS_NAMES, AliasChange, Registry, Version
from clusterft.registry.traffic import TrafficSplit


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; `-` for empty cells."""
    cells = [
        [str(h) for h in headers],
        *[[("-" if c is None or c == "" else str(c)) for c in r] for r in rows],
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry)


def _aliases_of(aliases: dict[str, str | None], version: str) -> str:
    return ",".join(alias for alias, target in aliases.items() if target == version)


def _metrics(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items()))


def version_record(version: Version, aliases: dict[str, str | None]) -> dict[str, Any]:
    """One version as JSON: its manifest, where it lives, and which aliases point at it."""
    return {
        **asdict(version.manifest),
        "path": str(version.path),
        "aliases": [a for a, target in aliases.items() if target == version.version],
    }


def registry_list(args: argparse.Namespace) -> int:
    """Without a name: every model with its latest version and aliases. With one: its versions."""
    registry = _registry(args)
    if args.name is None:
        records = []
        for name in registry.models():
            versions, aliases = registry.versions(name), registry.aliases(name)
            records.append(
                {"name": name, "versions": len(versions), "latest": versions[-1].version, **aliases}
            )
        if args.json:
            print(json.dumps(records, indent=2))
        elif not records:
            print(f"no models registered in {registry.root}")
        else:
            headers = ["NAME", "VERSIONS", "LATEST", *(a.upper() for a in ALIAS_NAMES)]
            rows = [[r["name"], r["versions"], r["latest"], *(r[a] for a in ALIAS_NAMES)] for r in records]
            print(format_table(headers, rows))
        return 0
    aliases = registry.aliases(args.name)
    versions = registry.versions(args.name)
    if args.json:
        print(json.dumps([version_record(v, aliases) for v in versions], indent=2))
    elif not versions:
        print(f"{args.name} has no versions in {registry.root}")
    else:
        rows = [
            [
                v.version,
                v.manifest.kind,
                v.manifest.created_at,
                v.manifest.job_id,
                _aliases_of(aliases, v.version),
                _metrics(dict(v.manifest.eval)),
            ]
            for v in versions
        ]
        print(format_table(["VERSION", "KIND", "CREATED", "JOB", "ALIASES", "EVAL"], rows))
    return 0


def _merge_check(check: Any) -> str | None:
    """One line for a merged version's passing merge-equivalence check (None for other kinds)."""
    if not check:
        return None
    return (
        f"passed: max |diff| {check['max_abs_diff']:.3g} ({check['rel_diff']:.3g} of the logits' RMS, "
        f"tolerance {check['tolerance']:g}, {check['dtype']}), {check['prompts']} probes; "
        f"adapter {check['adapter']} sha256 {check['adapter_sha256'][:12]}"
    )


def registry_show(args: argparse.Namespace) -> int:
    """A version's manifest; with --verify, its files are re-hashed first."""
    registry = _registry(args)
    version = (registry.verify if args.verify else registry.show)(args.name, args.version)
    record = version_record(version, registry.aliases(args.name))
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    manifest = version.manifest
    fields = [
        ("name", manifest.name),
        ("version", manifest.version),
        ("aliases", ", ".join(record["aliases"])),
        ("kind", manifest.kind),
        ("path", version.path),
        ("created", manifest.created_at),
        ("base model", manifest.base_model),
        ("base sha256", manifest.base_model_sha256),
        ("job", manifest.job_id),
        ("checkpoint", manifest.checkpoint),
        ("eval", _metrics(dict(manifest.eval))),
        ("merge check", _merge_check(manifest.merge_check)),
    ]
    print(format_table(["FIELD", "VALUE"], fields))
    print()
    files = [[rel, entry.size, entry.sha256] for rel, entry in sorted(manifest.files.items())]
    print(format_table(["FILE", "BYTES", "SHA256"], files))
    if args.verify:
        print(f"\nverified: all {len(files)} files match the manifest")
    return 0


def registry_promote(args: argparse.Namespace) -> int:
    """Point an alias at a version (verified first)."""
    registry = _registry(args)
    change = registry.promote(args.name, args.version, args.alias)
    if change is None:
        current = registry.aliases(args.name)[args.alias]
        print(f"{args.alias} of {args.name} already points at {current}; nothing changed")
    else:
        print(f"{args.alias} of {args.name}: {change.previous or 'none'} -> {change.version}")
    return 0


def registry_rollback(args: argparse.Namespace) -> int:
    """Move an alias back to the version it pointed at before its last promotion."""
    change = _registry(args).rollback(args.name, args.alias)
    print(f"{args.alias} of {args.name} rolled back: {change.previous} -> {change.version}")
    return 0


def split_line(split: TrafficSplit) -> str:
    """`production v0003 90%, canary v0004 10%`: where a model's requests go now."""
    if not split.active:
        return f"production {split.production or 'none'} 100%" + (
            f", canary {split.canary} 0%" if split.canary else ""
        )
    return (
        f"production {split.production} {100 - split.canary_weight}%, "
        f"canary {split.canary} {split.canary_weight}%"
    )


def _print_change(name: str, change: AliasChange | None, registry: Registry) -> None:
    if change is None:
        print(f"{name}: nothing changed")
    print(f"{name} traffic: {split_line(registry.traffic(name))}")


def registry_traffic(args: argparse.Namespace) -> int:
    """Where the model's requests go: production and canary versions and their weights."""
    split = _registry(args).traffic(args.name)
    if args.json:
        print(json.dumps({**asdict(split), "weights": split.weights}, indent=2))
    else:
        print(split_line(split))
    return 0


def registry_canary(args: argparse.Namespace) -> int:
    """Point the canary at a version and give it a share of the traffic."""
    registry = _registry(args)
    _print_change(args.name, registry.set_canary(args.name, args.version, args.weight), registry)
    return 0


def registry_canary_weight(args: argparse.Namespace) -> int:
    """Change only the canary's share of the traffic."""
    registry = _registry(args)
    change = registry.set_canary_weight(args.name, args.weight, reason=args.reason)
    _print_change(args.name, change, registry)
    return 0


def registry_canary_promote(args: argparse.Namespace) -> int:
    """The canary's version becomes production, with all the traffic."""
    registry = _registry(args)
    _print_change(args.name, registry.promote_canary(args.name), registry)
    return 0


def registry_canary_abort(args: argparse.Namespace) -> int:
    """The canary gets no more traffic (weight 0); it stays set, so `rollback --alias canary` undoes it."""
    registry = _registry(args)
    _print_change(args.name, registry.abort_canary(args.name, args.reason), registry)
    return 0


def _weight(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole percentage from 0 to 100") from None


def registry_delete(args: argparse.Namespace) -> int:
    """Delete a version no alias points at."""
    version = _registry(args).delete(args.name, args.version)
    print(f"deleted {args.name} {version.version} ({version.path})")
    return 0


def add_registry_option(parser: argparse.ArgumentParser) -> None:
    """`--registry DIR`: the model registry's root, `$CLUSTERFT_REGISTRY` or ./registry."""
    add_dir_option(
        parser, "--registry", REGISTRY_ENV, DEFAULT_REGISTRY, "model registry root on shared storage"
    )


def add_registry_commands(commands: Subcommands) -> None:
    """Add `registry list|show|promote|rollback|delete` to the CLI's top-level subparsers."""
    action = add_group(
        commands,
        "registry",
        help="registered model versions and their aliases",
        description="registered model versions and their aliases (production, canary)",
        options=[add_registry_option],
    )

    sub = action("list", registry_list, "list models, or the versions of one model")
    sub.add_argument("name", nargs="?", help="model name (omit to list every model)")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = action("show", registry_show, "show a version's manifest: base model, source job, eval, files")
    sub.add_argument("name", help="model name")
    sub.add_argument(
        "version", nargs="?", default="production", help="v3, 3 or an alias (default: production)"
    )
    sub.add_argument("--verify", action="store_true", help="re-hash every file against the manifest first")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = action("promote", registry_promote, "point an alias at a version (the serving app follows it)")
    sub.add_argument("name", help="model name")
    sub.add_argument("version", help="v3, 3, or an alias (e.g. canary, to promote the canary)")
    sub.add_argument("--alias", choices=ALIAS_NAMES, default="production", help="alias to move")

    sub = action("rollback", registry_rollback, "move an alias back to its previous version")
    sub.add_argument("name", help="model name")
    sub.add_argument("--alias", choices=ALIAS_NAMES, default="production", help="alias to move back")

    sub = action("traffic", registry_traffic, "show how requests are split between production and canary")
    sub.add_argument("name", help="model name")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = action(
        "canary", registry_canary, "point the canary at a version and send it --weight percent of requests"
    )
    sub.add_argument("name", help="model name")
    sub.add_argument("version", help="v3 or 3")
    sub.add_argument("--weight", type=_weight, required=True, help="percent of sessions to the canary, 0-100")

    sub = action("canary-weight", registry_canary_weight, "change the canary's share of requests")
    sub.add_argument("name", help="model name")
    sub.add_argument("weight", type=_weight, help="percent of sessions to the canary, 0-100")
    sub.add_argument("--reason", help="recorded in the alias history")

    sub = action("canary-promote", registry_canary_promote, "make the canary production (all traffic)")
    sub.add_argument("name", help="model name")

    sub = action("canary-abort", registry_canary_abort, "send the canary no more traffic (weight 0)")
    sub.add_argument("name", help="model name")
    sub.add_argument("--reason", default="aborted", help="recorded in the alias history")

    sub = action("delete", registry_delete, "delete a version no alias points at (its number is not reused)")
    sub.add_argument("name", help="model name")
    sub.add_argument("version", help="v3 or 3")
