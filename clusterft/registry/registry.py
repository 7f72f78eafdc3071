"""The model registry: immutable versions per model name, and aliases that point at them.

    <root>/<name>/v0001/            files copied in + manifest.json (written last, atomically)
    <root>/<name>/v0002.deleted     tombstone: the number is never given out again
    <root>/<name>/aliases.json      {"aliases": {"production": "v0001", ...}, "weights": {"canary": 10},
                                     "history": [...]}
    <root>/<name>/.lock             flock: numbering, alias moves and deletes are serialised

A version is published by renaming a complete staging directory (its manifest already inside) into
place, so a reader sees a whole version or none. Files are made read-only and `verify` recomputes
every sha256, so an edited byte is found and named. Promotion is a pointer move in aliases.json.
The canary alias also carries a traffic weight (traffic.py): its share of the requests the serving
app gets; each move of it, weight changes included, is in the history, so rollback restores a split.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from clusterft.errors import UserError
from clusterft.hf.loading import model_fingerprint
from clusterft.hf.merge_check import DEFAULT_TOLERANCE
from clusterft.registry.manifest import (
    FORMAT,
    MANIFEST,
    Kind,
    Manifest,
    copy_hashed,
    files_under,
    sha256_file,
    tree_sha256,
)
from clusterft.registry.serving import read_records
from clusterft.registry.traffic import TrafficSplit, check_weight
from clusterft.storage.fs import atomic_write_text, fsync_dir

ALIASES = "aliases.json"
Alias = Literal["production", "canary"]
ALIAS_NAMES: tuple[str, ...] = get_args(Alias)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
_TOMBSTONE = re.compile(r"^v(\d{4,})\.deleted$")


class RegistryError(UserError):
    """A registry operation the user asked for cannot be done; the message says what to do instead."""


def check_model_name(name: str) -> None:
    """Raise `RegistryError` unless `name` can name a model here (it is a directory name)."""
    if not _NAME.match(name):
        raise RegistryError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (at most 100), "
            "starting with a letter or digit"
        )


class IntegrityError(RegistryError):
    """A registered version no longer matches its manifest."""


@dataclass(frozen=True)
class Version:
    """One published version: `path` is the directory the serving app loads from."""

    name: str
    version: str
    path: Path
    manifest: Manifest

    @property
    def number(self) -> int:
        return int(self.version[1:])


@dataclass(frozen=True)
class AliasChange:
    """One move of an alias, as kept in the aliases file's history (`at` is ISO 8601, UTC). A canary
    move also names the canary's traffic weight after and before it; `weight` changes only the weight
    (an automatic rollback of the canary is one, to 0, with the `reason`)."""

    alias: str
    action: Literal["promote", "rollback", "weight"]
    version: str
    previous: str | None
    at: str
    weight: int | None = None
    previous_weight: int | None = None
    reason: str | None = None


# ---------------------------------------------------------------- the registry


class Registry:
    """Versions and aliases under one directory (a local path or a mounted shared filesystem)."""

    def __init__(self, root: str | Path, *, clock: Callable[[], float] = time.time):
        self.root = Path(root)
        self._clock = clock

    def _now(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="seconds")

    def _model_dir(self, name: str) -> Path:
        check_model_name(name)
        return self.root / name

    @contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Hold the model's lock; flock works across processes and, on Linux, over NFS."""
        model_dir = self._model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        with open(model_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield model_dir
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------ register

    def register(
        self,
        name: str,
        source_dir: str | Path,
        *,
        kind: Kind,
        base_model: str | Path | None = None,
        base_model_sha256: str | None = None,
        job_id: str | None = None,
        checkpoint: str | None = None,
        eval_results: Mapping[str, Any] | None = None,
        merge_check: Mapping[str, Any] | None = None,
        verify: Callable[[Path], None] | None = None,
    ) -> Version:
        """Copy `source_dir` in as the next version of `name` and return it.

        `base_model` is required for adapters (an adapter is useless without its base); its hash is
        computed unless given. A merged version needs `merge_check`: the passing report
        (`MergeCheckReport.to_dict()`, or the merge_check.json beside the weights) of exactly these
        weights; its base model is the report's unless given. `verify(staged_dir)` runs on the
        copied files before the version is published; raising stops the registration. It must
        only read: the files are already hashed and read-only.
        """
        model_dir = self._model_dir(name)
        source = Path(source_dir)
        if kind not in get_args(Kind):
            raise RegistryError(f"unknown kind {kind!r}; choose one of {', '.join(get_args(Kind))}")
        if not source.is_dir():
            raise RegistryError(f"{source} is not a directory; register an adapter or model directory")
        files = files_under(source)
        if not files:
            raise RegistryError(f"{source} is empty; nothing to register")
        if MANIFEST in files:
            raise RegistryError(
                f"{source} has its own {MANIFEST}; register the exported adapter or HF model directory, "
                "not a checkpoint bundle"
            )
        if kind == "adapter" and base_model is None:
            raise RegistryError("an adapter needs base_model: the model directory it was trained on")
        if kind == "merged":
            base_model = _check_merge_report(merge_check, base_model)
        elif merge_check is not None:
            raise RegistryError(f"merge_check is the report of a merged version; this one is kind {kind}")
        if base_model is not None and base_model_sha256 is None:
            if not Path(base_model).exists():
                raise RegistryError(
                    f"base model {base_model} does not exist; give the path it was trained on"
                )
            base_model_sha256 = tree_sha256(Path(base_model))

        model_dir.mkdir(parents=True, exist_ok=True)
        staging = model_dir / f".staging-{secrets.token_hex(4)}"
        try:
            entries = {rel: copy_hashed(source / rel, staging / rel) for rel in files}
            for rel in files:
                (staging / rel).chmod(0o444)
            for directory in {(staging / rel).parent for rel in files}:
                fsync_dir(directory)  # the new entries themselves survive a crash, not only the bytes
            if merge_check is not None:
                _check_merged_weights(merge_check, staging)
            if verify is not None:
                verify(staging)
                if files_under(staging) != files:
                    raise RegistryError("the verify check added or removed files; it must only read them")
            with self._locked(name):
                version = f"v{self._next_number(model_dir):04d}"
                manifest = Manifest(
                    name=name,
                    version=version,
                    kind=kind,
                    files=entries,
                    created_at=self._now(),
                    # Absolute: the serving app reads the manifest from another directory, or node.
                    base_model=str(Path(base_model).resolve()) if base_model is not None else None,
                    base_model_sha256=base_model_sha256,
                    job_id=job_id,
                    checkpoint=checkpoint,
                    eval=dict(eval_results or {}),
                    merge_check=_merge_record(merge_check),
                )
                atomic_write_text(staging / MANIFEST, manifest.to_json())
                (staging / MANIFEST).chmod(0o444)
                os.rename(staging, model_dir / version)
                fsync_dir(model_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return Version(name, version, model_dir / version, manifest)

    @staticmethod
    def _next_number(model_dir: Path) -> int:
        """One past every number ever used, deleted ones included (their tombstones remain)."""
        used = [0]
        for entry in os.listdir(model_dir):
            match = _VERSION_DIR.match(entry) or _TOMBSTONE.match(entry)
            if match:
                used.append(int(match[1]))
        return max(used) + 1

    # ------------------------------------------------------------ read

    def models(self) -> list[str]:
        """Names with at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _NAME.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[Version]:
        """Published versions of `name`, oldest first."""
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            return []
        found = sorted(
            (int(m[1]), m[0]) for m in map(_VERSION_DIR.match, os.listdir(model_dir)) if m is not None
        )
        return [
            self._load(name, version) for _, version in found if (model_dir / version / MANIFEST).exists()
        ]

    def _load(self, name: str, version: str) -> Version:
        path = self._model_dir(name) / version
        try:
            manifest = Manifest.from_json((path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RegistryError(
                f"{name} has no version {version}; `clusterft registry list {name}`"
            ) from None
        except (ValueError, TypeError, KeyError) as err:
            raise IntegrityError(f"{path / MANIFEST} is unreadable ({err}); the version is damaged") from None
        return Version(name, version, path, manifest)

    def show(self, name: str, ref: str) -> Version:
        """Resolve `ref` — "v3", "v0003", "3", or an alias name — to a version of `name`."""
        if ref in ALIAS_NAMES:
            target = self.aliases(name).get(ref)
            if target is None:
                raise RegistryError(f"alias {ref} of {name} points at no version yet; promote one first")
            return self._load(name, target)
        match = re.fullmatch(r"v?(\d+)", ref)
        if match is None:
            raise RegistryError(
                f"cannot read version {ref!r}: write v3, v0003, 3, or an alias ({', '.join(ALIAS_NAMES)})"
            )
        return self._load(name, f"v{int(match[1]):04d}")

    def verify(self, name: str, ref: str, *, check_base: bool = False) -> Version:
        """Recompute every file's sha256 against the manifest; raise `IntegrityError` naming each
        changed, missing or added file. `check_base` also re-hashes the base model."""
        version = self.show(name, ref)
        manifest, problems = version.manifest, []
        actual = set(files_under(version.path)) - {MANIFEST}
        for rel in sorted(actual - set(manifest.files)):
            problems.append(f"{rel}: added after registration")
        for rel, entry in sorted(manifest.files.items()):
            path = version.path / rel
            if rel not in actual:
                problems.append(f"{rel}: missing")
            elif path.stat().st_size != entry.size:
                problems.append(f"{rel}: size {path.stat().st_size} bytes, registered {entry.size}")
            elif (digest := sha256_file(path)) != entry.sha256:
                problems.append(f"{rel}: sha256 {digest[:12]}…, registered {entry.sha256[:12]}…")
        if check_base and manifest.base_model is not None:
            base = Path(manifest.base_model)
            if not base.exists():
                problems.append(f"base model {base}: missing")
            elif tree_sha256(base) != manifest.base_model_sha256:
                problems.append(f"base model {base}: changed since registration")
        if problems:
            raise IntegrityError(
                f"{name} {version.version} failed verification ({version.path}):\n  "
                + "\n  ".join(problems)
                + "\nA registered version never changes; register the model again as a new version."
            )
        return version

    # ------------------------------------------------------------ aliases

    def _read_aliases(self, model_dir: Path) -> dict[str, Any]:
        path = model_dir / ALIASES
        if not path.exists():
            return {"format": FORMAT, "aliases": dict.fromkeys(ALIAS_NAMES), "weights": {}, "history": []}
        data = json.loads(path.read_text(encoding="utf-8"))
        data.setdefault("weights", {})  # written before canary weights existed
        return data

    def aliases(self, name: str) -> dict[str, str | None]:
        """Alias → version it points at (None: not set)."""
        return dict(self._read_aliases(self._model_dir(name))["aliases"])

    def traffic(self, name: str) -> TrafficSplit:
        """How requests for `name` are split between its production and canary versions now."""
        return _split(name, self._read_aliases(self._model_dir(name)))

    def alias_history(self, name: str) -> list[AliasChange]:
        """Every alias move of `name`, oldest first."""
        return [AliasChange(**entry) for entry in self._read_aliases(self._model_dir(name))["history"]]

    def alias_view(self, name: str) -> tuple[dict[str, str | None], list[AliasChange], TrafficSplit]:
        """aliases(), alias_history() and traffic() of `name` from one read of its aliases file, so
        the three agree even while the file is being replaced."""
        data = self._read_aliases(self._model_dir(name))
        return dict(data["aliases"]), [AliasChange(**entry) for entry in data["history"]], _split(name, data)

    def _move_alias(
        self,
        model_dir: Path,
        data: dict[str, Any],
        alias: str,
        action: Literal["promote", "rollback", "weight"],
        version: str,
        weight: int | None = None,
        reason: str | None = None,
    ) -> AliasChange:
        """Move `alias` to `version`; a canary keeps its weight unless `weight` is given."""
        previous_weight = _weight_of(data, alias)
        if alias == "canary" and weight is None:
            weight = previous_weight
        change = AliasChange(
            alias, action, version, data["aliases"].get(alias), self._now(), weight, previous_weight, reason
        )
        data["aliases"][alias] = version
        if alias == "canary":
            data["weights"]["canary"] = weight
        data["history"].append(asdict(change))
        atomic_write_text(model_dir / ALIASES, json.dumps(data, indent=2) + "\n")
        return change

    @staticmethod
    def _check_alias(alias: str) -> None:
        if alias not in ALIAS_NAMES:
            raise RegistryError(f"unknown alias {alias!r}; choose one of {', '.join(ALIAS_NAMES)}")

    def promote(
        self, name: str, ref: str, alias: str = "production", *, verify: bool = True
    ) -> AliasChange | None:
        """Point `alias` at a version (verified first, so an alias never points at a damaged one).
        Returns None when the alias already points there: a retried promotion changes nothing."""
        self._check_alias(alias)
        target = self.verify(name, ref) if verify else self.show(name, ref)
        with self._locked(name) as model_dir:
            if not (target.path / MANIFEST).exists():
                raise RegistryError(f"{name} {target.version} was deleted meanwhile; nothing promoted")
            data = self._read_aliases(model_dir)
            if data["aliases"].get(alias) == target.version:
                return None
            return self._move_alias(model_dir, data, alias, "promote", target.version)

    def rollback(self, name: str, alias: str = "production") -> AliasChange:
        """Move `alias` back to the version it pointed at before its last promotion (deleted
        versions are skipped). Rolling back twice goes back two promotions. The canary's rollback
        restores its previous (version, weight): a weight change is undone like a promotion."""
        self._check_alias(alias)
        with self._locked(name) as model_dir:
            data = self._read_aliases(model_dir)
            stack = _alias_stack(data["history"], alias)
            current = data["aliases"].get(alias)
            now = (current, _weight_of(data, alias))
            for candidate, weight in reversed(stack[:-1]):
                if (candidate, weight) != now and (model_dir / candidate / MANIFEST).exists():
                    return self._move_alias(model_dir, data, alias, "rollback", candidate, weight)
        raise RegistryError(
            f"{alias} of {name} has no earlier version to roll back to (now: {current or 'none'}); "
            f"promote one instead: `clusterft registry promote {name} VERSION --alias {alias}`"
        )

    # ------------------------------------------------------------ canary traffic

    def set_canary(
        self, name: str, ref: str, weight: int, *, reason: str | None = None, verify: bool = True
    ) -> AliasChange | None:
        """Point the canary at a version and send it `weight` percent of the traffic (production the
        rest). None when it already is so. Refused without a production version to split with."""
        check_weight(weight)
        target = self.verify(name, ref) if verify else self.show(name, ref)
        with self._locked(name) as model_dir:
            if not (target.path / MANIFEST).exists():
                raise RegistryError(f"{name} {target.version} was deleted meanwhile; nothing changed")
            data = self._read_aliases(model_dir)
            _check_split_has_production(name, data, weight)
            if (data["aliases"].get("canary"), _weight_of(data, "canary")) == (target.version, weight):
                return None
            action = "promote" if data["aliases"].get("canary") != target.version else "weight"
            return self._move_alias(model_dir, data, "canary", action, target.version, weight, reason)

    def set_canary_weight(self, name: str, weight: int, *, reason: str | None = None) -> AliasChange | None:
        """Change only the canary's share of the traffic (0: none; the canary stays set). None when
        it already is `weight`. An automatic rollback is this, to 0, with the reason."""
        check_weight(weight)
        with self._locked(name) as model_dir:
            data = self._read_aliases(model_dir)
            canary = data["aliases"].get("canary")
            if canary is None:
                raise RegistryError(
                    f"{name} has no canary version; set one first: "
                    f"`clusterft registry canary {name} VERSION --weight {weight}`"
                )
            _check_split_has_production(name, data, weight)
            if _weight_of(data, "canary") == weight:
                return None
            return self._move_alias(model_dir, data, "canary", "weight", canary, weight, reason)

    def promote_canary(self, name: str) -> AliasChange:
        """The canary's version becomes production and takes all the traffic (canary weight 0), in
        one write: no moment where the split sends the canary's share to the old production."""
        with self._locked(name) as model_dir:
            data = self._read_aliases(model_dir)
            canary = data["aliases"].get("canary")
            if canary is None or not (model_dir / canary / MANIFEST).exists():
                raise RegistryError(
                    f"{name} has no canary version to promote; set one first: "
                    f"`clusterft registry canary {name} VERSION --weight 10`"
                )
            self.verify(name, canary)  # reads only; the lock keeps the version from being deleted
            change = AliasChange(
                "production", "promote", canary, data["aliases"].get("production"), self._now()
            )
            data["history"].append(asdict(change))
            data["aliases"]["production"] = canary
            if _weight_of(data, "canary"):
                moved = AliasChange(
                    "canary",
                    "weight",
                    canary,
                    canary,
                    self._now(),
                    0,
                    _weight_of(data, "canary"),
                    reason="promoted to production",
                )
                data["history"].append(asdict(moved))
                data["weights"]["canary"] = 0
            atomic_write_text(model_dir / ALIASES, json.dumps(data, indent=2) + "\n")
            return change

    def abort_canary(self, name: str, reason: str = "aborted") -> AliasChange | None:
        """Send the canary no more traffic (weight 0), saying why; None when it had none."""
        return self.set_canary_weight(name, 0, reason=reason)

    def delete(self, name: str, ref: str) -> Version:
        """Remove a version for good; its number is never reused. Refuses while an alias points at it
        or a live Serve replica serves it (its serving record, see `serving.py`)."""
        with self._locked(name) as model_dir:
            version = self.show(name, ref)
            holders = [a for a, v in self._read_aliases(model_dir)["aliases"].items() if v == version.version]
            if holders:
                alias = holders[0]
                raise RegistryError(
                    f"{name} {version.version} is the {' and '.join(holders)} version; move the alias first: "
                    f"`clusterft registry promote {name} VERSION --alias {alias}` or "
                    f"`clusterft registry rollback {name} --alias {alias}`"
                )
            serving = [r for r in read_records(self.root, name) if r.live(time.time())]
            if version.version in {r.version for r in serving}:
                where = ", ".join(sorted(f"{r.app}/{r.replica} on {r.host}" for r in serving))
                raise RegistryError(
                    f"{name} {version.version} is still served by a live replica ({where}); stop that app "
                    "or let it switch to another version first"
                )
            # Tombstone first: even if we crash mid-delete, the number is never given out again.
            atomic_write_text(
                model_dir / f"{version.version}.deleted", json.dumps({"deleted_at": self._now()}) + "\n"
            )
            trash = model_dir / f".deleting-{version.version}-{secrets.token_hex(4)}"
            os.rename(version.path, trash)
            fsync_dir(model_dir)
            shutil.rmtree(trash)
        return version


def _check_merge_report(report: Mapping[str, Any] | None, base_model: str | Path | None) -> Path:
    """The base model of a merged version whose merge check passed; a RegistryError saying why not."""
    how = (
        "merge with `clusterft merge BASE ADAPTER OUT` (it checks, and writes OUT/merge_check.json) "
        "or clusterft.registry.merged.stage_merged, and register with merge_check=<its report>"
    )
    if report is None:
        raise RegistryError(
            "a merged version needs a passing merge-equivalence check (merged-model logits equal to "
            f"base+adapter logits on probe prompts); none was given: {how}"
        )
    rel, tolerance, dtype = report["rel_diff"], report["tolerance"], report["dtype"]
    if not (report["passed"] and rel <= tolerance):
        raise RegistryError(
            f"the merge check of this merged model failed: max |diff| {report['max_abs_diff']:.4g}, "
            f"{rel:.3g} of the logits' scale, tolerance {tolerance:g} for {dtype}; a merge that fails "
            f"it is never registered: {how}"
        )
    if tolerance > DEFAULT_TOLERANCE.get(dtype, 0.0):
        raise RegistryError(
            f"the merge check ran with tolerance {tolerance:g}, looser than the {dtype} default "
            f"{DEFAULT_TOLERANCE.get(dtype)}; a registered merge must pass the default: {how}"
        )
    checked_base, adapter = Path(report["base_model"]), Path(report["adapter"])
    if base_model is not None and Path(base_model).resolve() != checked_base:
        raise RegistryError(
            f"the merge check compared against base model {checked_base}, not {base_model}; "
            "register with the base the adapter was merged into"
        )
    for what, path in (("base model", checked_base), ("adapter", adapter)):
        if not path.exists():
            raise RegistryError(f"{what} {path} of the merge check no longer exists; merge and check again")
    if model_fingerprint(checked_base) != report["base_fingerprint"]:
        raise RegistryError(f"base model {checked_base} changed since the merge check; merge and check again")
    return checked_base


def _check_merged_weights(report: Mapping[str, Any], staged: Path) -> None:
    """The staged copy must be the merged model the report checked, not another merge."""
    if model_fingerprint(staged) != report["merged_fingerprint"]:
        raise RegistryError(
            "these merged weights are not the ones the merge check ran on (their fingerprint "
            "differs); register the directory the check wrote merge_check.json into, or check again"
        )


def _merge_record(report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The report as the manifest keeps it, with the hash of the adapter the weights came from."""
    if report is None:
        return None
    return {**report, "adapter_sha256": tree_sha256(Path(report["adapter"]))}


def _weight_of(data: dict[str, Any], alias: str) -> int | None:
    """The canary's traffic weight (0 where never set); None for aliases that carry none."""
    return int(data["weights"].get("canary") or 0) if alias == "canary" else None


def _split(name: str, data: dict[str, Any]) -> TrafficSplit:
    aliases = data["aliases"]
    return TrafficSplit(
        name, aliases.get("production"), aliases.get("canary"), _weight_of(data, "canary") or 0
    )


def _check_split_has_production(name: str, data: dict[str, Any], weight: int) -> None:
    """A canary share needs a production version to serve the rest."""
    if weight and data["aliases"].get("production") is None:
        raise RegistryError(
            f"{name} has no production version to split traffic with; promote one first: "
            f"`clusterft registry promote {name} VERSION`"
        )


def _alias_stack(history: list[dict[str, Any]], alias: str) -> list[tuple[str, int | None]]:
    """Replay the alias's moves as (version, weight) states: a promotion or weight change pushes;
    a rollback pops down to its target. Entries from before weights existed have weight 0."""
    stack: list[tuple[str, int | None]] = []
    for entry in history:
        if entry["alias"] != alias:
            continue
        state = (entry["version"], int(entry.get("weight") or 0) if alias == "canary" else None)
        if entry["action"] in ("promote", "weight"):
            stack.append(state)
        else:
            while stack and stack[-1] != state:
                stack.pop()
            if not stack:
                stack.append(state)
    return stack
