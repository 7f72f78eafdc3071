"""Serving records on shared storage: written atomically, read back, live until their bound passes."""

from __future__ import annotations

import os
from pathlib import Path

from clusterft.registry.serving import (
    MIN_STALE_S,
    ServingRecord,
    live_versions,
    read_records,
    record_path,
    remove_record,
    stale_after_s,
    write_record,
)


def record(version: str, replica: str, heartbeat_at: float, stale: float = 5.0) -> ServingRecord:
    return ServingRecord(
        model_name="quick",
        version=version,
        alias="production",
        app="clusterft",
        replica=replica,
        host="node-1",
        pid=4242,
        since=heartbeat_at - 30,
        heartbeat_at=heartbeat_at,
        stale_after_s=stale,
    )


def test_records_round_trip_one_file_per_replica_and_go_away_when_removed(tmp_path: Path) -> None:
    a, b = record("v0001", "clusterft#engine#a1", 100.0), record("v0002", "clusterft#engine#b2", 101.0)
    write_record(tmp_path, a)
    write_record(tmp_path, b)
    assert (
        record_path(tmp_path, "quick", a.replica)
        == tmp_path / "quick" / "serving" / "clusterft_engine_a1.json"
    )
    assert read_records(tmp_path, "quick") == [a, b]
    refreshed = record("v0002", a.replica, 102.0)  # a switched to v2: the same file, replaced
    write_record(tmp_path, refreshed)
    assert read_records(tmp_path, "quick") == [refreshed, b]
    assert sorted(os.listdir(tmp_path / "quick" / "serving")) == [
        "clusterft_engine_a1.json",
        "clusterft_engine_b2.json",
    ]
    remove_record(tmp_path, "quick", a.replica)
    remove_record(tmp_path, "quick", a.replica)  # twice: no error
    assert read_records(tmp_path, "quick") == [b]
    assert read_records(tmp_path, "other") == []


def test_a_record_is_live_until_its_heartbeat_is_older_than_its_bound(tmp_path: Path) -> None:
    fresh, old = record("v0002", "r1", 100.0), record("v0001", "r2", 95.0)
    assert fresh.live(105.0) and not fresh.live(105.1)
    assert live_versions([fresh, old], 100.0) == {"v0001", "v0002"}
    assert live_versions([fresh, old], 100.5) == {"v0002"}  # old: 5.5 s since its heartbeat
    assert live_versions([fresh, old], 200.0) == frozenset()


def test_the_bound_is_several_polls_and_never_below_the_floor() -> None:
    assert stale_after_s(0.25) == MIN_STALE_S == 5.0
    assert stale_after_s(2.0) == 20.0


def test_temp_files_and_damaged_records_are_skipped(tmp_path: Path) -> None:
    good = record("v0001", "r1", 100.0)
    write_record(tmp_path, good)
    directory = tmp_path / "quick" / "serving"
    (directory / ".r2.json.ab12.tmp").write_text("{")  # a write in progress
    (directory / "r3.json").write_text("{not json")
    (directory / "r4.json").write_text('{"version": "v0001"}')  # fields missing
    assert read_records(tmp_path, "quick") == [good]
