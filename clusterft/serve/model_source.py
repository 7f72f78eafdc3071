"""Where a Serve app's weights come from: a fixed model directory, or the registry version an alias
points at (and whether that alias has moved since).

    spec.model_dir ──────────────────────────────────────► ModelVersion(None, model_dir)
    spec.registry ─► <root>/<name>/aliases.json ─► vNNNN/manifest.json
                       kind full | merged ─────────────► ModelVersion("vNNNN", <version dir>)
                       kind adapter ───────────────────► ModelVersion("vNNNN", base_model, <version dir>)

The registry's own reader (clusterft.registry.registry, no Ray, no controller state) parses the
files, so the on-disk format has one owner.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from clusterft.registry.registry import ALIASES, Registry
from clusterft.registry.traffic import TrafficSplit
from clusterft.serve.spec import RegistrySource, ServeSpec


@dataclass(frozen=True)
class ModelVersion:
    """One servable set of weights: the HF model the engine loads, plus an adapter applied to every
    request for the served model name when the registered version is a LoRA adapter."""

    version: str | None  # "v0003"; None when serving a fixed model_dir
    model_dir: str
    adapter_dir: str | None = None

    @property
    def weight_version(self) -> int:
        """The engine's weight version (part of every prefix-cache block hash): the version number."""
        return int(self.version[1:]) if self.version else 0


def resolve_version(source: RegistrySource, ref: str | None = None) -> ModelVersion:
    """The version `ref` (default: the version the source's alias points at now), ready to load.
    Raises RegistryError (a UserError) naming the fix when the alias is unset or the version damaged."""
    registered = Registry(source.root).show(source.model_name, ref or source.alias)
    manifest = registered.manifest
    if manifest.kind == "adapter":
        assert manifest.base_model is not None, "the registry refuses adapters without a base model"
        return ModelVersion(registered.version, manifest.base_model, str(registered.path))
    return ModelVersion(registered.version, str(registered.path))


# What turns text into token ids and back, chat templates included (HF's file names).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_fingerprint(model_dir: str) -> str:
    """The identity of a model dir's tokenizer: a hash of its tokenizer files. Versions with equal
    fingerprints tokenize (and render chats) alike, so a prompt tokenized for one serves the other."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def resolve(spec: ServeSpec) -> ModelVersion:
    """What `spec` serves right now."""
    if spec.registry is not None:
        return resolve_version(spec.registry)
    assert spec.model_dir is not None, "ServeSpec validates that one source is given"
    return ModelVersion(None, spec.model_dir)


class AliasWatch:
    """Cheap polling of one alias: a stat of the aliases file each poll, a read only when it changed.

    The registry replaces aliases.json by rename, so any move gives the file a new inode (and
    usually a new mtime): comparing (inode, mtime_ns, size) catches every move without reading."""

    def __init__(self, source: RegistrySource) -> None:
        self.source = source
        self.path = Path(source.root) / source.model_name / ALIASES
        self._seen: tuple[int, int, int] | None = None
        self._target: str | None = None
        self._moves = 0
        self._split: TrafficSplit | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        key = self._stat()
        if key is not None and key == self._seen:
            return
        # No file (key None): the registry's defaults, no alias set and no canary.
        aliases, history, split = Registry(self.source.root).alias_view(self.source.model_name)
        self._target = aliases.get(self.source.alias)
        self._moves = sum(1 for c in history if c.alias == self.source.alias and c.action != "weight")
        # Only an app following production serves a canary beside it.
        self._split = split if self.source.alias == "production" else None
        self._seen = key

    def target(self) -> str | None:
        """The version the alias points at now (None: unset), re-read only when the file changed."""
        self._refresh()
        return self._target

    def poll(self) -> tuple[str | None, int, TrafficSplit | None]:
        """(target, moves, split) from one look at the file."""
        self._refresh()
        return self._target, self._moves, self._split

    def moves(self) -> int:
        """How many times the alias has been moved (promotes and rollbacks): a move away and back
        between two polls changes it, though not the target."""
        self._refresh()
        return self._moves

    def split(self) -> TrafficSplit | None:
        """Following production, how requests are split with the canary now (None: following another
        alias), read in the same pass as the target."""
        self._refresh()
        return self._split
