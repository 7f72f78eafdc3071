"""Serving records: which registry version each Serve replica serves, kept next to the versions.

    <registry>/<model>/serving/<replica>.json   {"model_name", "version", "alias", "app", "replica",
                                                 "host", "pid", "since", "heartbeat_at", "stale_after_s"}

A replica that follows an alias (serve/follower.py) writes its record when it starts, after every
switch, and at every alias poll (the heartbeat), each time to a temp file renamed over the record,
and removes it on a clean shutdown. The controller reads the records to move a `promoted` job to
`serving` and back. They go through shared storage rather than a Ray call because a RayJob's
controller and a RayService's replicas run on different Ray clusters and share only the volume.

A record whose heartbeat is older than its own `stale_after_s` is not live: its replica died
without removing it, or hangs. The writer sets the bound from its poll interval, as it knows it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from clusterft.storage.fs import atomic_write_text

logger = logging.getLogger(__name__)

SERVING_DIR = "serving"
STALE_POLLS = 10
"""A record is live while its heartbeat is younger than this many poll intervals..."""
MIN_STALE_S = 5.0
"""...and never less than this: a busy node or clock skew between nodes must not make it flap."""


@dataclass(frozen=True)
class ServingRecord:
    """One replica serving one version; `since` is when it began serving this version."""

    model_name: str
    version: str
    alias: str
    app: str
    replica: str
    host: str
    pid: int
    since: float
    heartbeat_at: float
    stale_after_s: float

    def live(self, now: float) -> bool:
        return now - self.heartbeat_at <= self.stale_after_s


def stale_after_s(poll_interval_s: float) -> float:
    """The staleness bound of a replica that polls (and heartbeats) every `poll_interval_s`."""
    return max(STALE_POLLS * poll_interval_s, MIN_STALE_S)


def serving_dir(registry_root: str | Path, model_name: str) -> Path:
    return Path(registry_root) / model_name / SERVING_DIR


def record_path(registry_root: str | Path, model_name: str, replica: str) -> Path:
    """The replica's record file; the replica id made safe for a file name."""
    return serving_dir(registry_root, model_name) / (re.sub(r"[^A-Za-z0-9._-]", "_", replica) + ".json")


def write_record(registry_root: str | Path, record: ServingRecord) -> None:
    """Publish (or refresh) the replica's record atomically: a reader sees the old one or the new."""
    path = record_path(registry_root, record.model_name, record.replica)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(record), indent=2) + "\n")


def remove_record(registry_root: str | Path, model_name: str, replica: str) -> None:
    record_path(registry_root, model_name, replica).unlink(missing_ok=True)


def read_records(registry_root: str | Path, model_name: str) -> list[ServingRecord]:
    """Every record of `model_name`, live or not, by replica. An unreadable one is skipped with a
    warning (records are replaced by rename, so only a foreign or damaged file is unreadable)."""
    directory = serving_dir(registry_root, model_name)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue  # a temp file of a write in progress
        try:
            records.append(ServingRecord(**json.loads((directory / name).read_text(encoding="utf-8"))))
        except FileNotFoundError:
            continue  # removed by a replica's shutdown since the listing
        except (ValueError, TypeError) as err:
            logger.warning("skipping unreadable serving record %s: %s", directory / name, err)
    return records


def live_versions(records: Iterable[ServingRecord], now: float) -> frozenset[str]:
    """The versions some live replica serves."""
    return frozenset(record.version for record in records if record.live(now))
