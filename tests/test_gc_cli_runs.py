"""The runs / undo / purge commands and durations, on the shipped fixture (no real tools needed)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regfsck.durations import DurationError, format_duration, parse_duration
from tests.support.cli import invoke as cli
from tests.support.snapshot import registry_snapshot


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604800),
                                              ("168h", 604800), ("1h30m", 5400), ("0", 0), ("0s", 0)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1", "-1h", "1.5h", "1H", "h", "1 h", "1w", "1h-", "ten minutes"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(DurationError, match="not a duration"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**8))
def test_duration_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(timedelta(seconds=seconds))) == timedelta(seconds=seconds)


def test_runs_undo_purge(fixture_root: Path) -> None:
    before = registry_snapshot(fixture_root)
    assert json.loads(cli("runs", str(fixture_root), "--json").stdout) == {"runs": [], "bytes": 0}
    nothing = cli("undo", str(fixture_root))
    assert nothing.returncode == 3 and "nothing to undo" in nothing.stderr

    gc = json.loads(cli("gc", str(fixture_root), "--grace", "0", "--apply", "--json").stdout)
    after_gc = registry_snapshot(fixture_root)
    assert after_gc != before
    [run] = json.loads(cli("runs", str(fixture_root), "--json").stdout)["runs"]
    assert (run["run_id"], run["command"], run["status"]) == (gc["run_id"], "gc", "complete")
    assert run["bytes"] >= gc["reclaimable_bytes"] > 0
    human = cli("runs", str(fixture_root))
    assert gc["run_id"] in human.stdout and "complete" in human.stdout

    preview = json.loads(cli("purge", str(fixture_root), "--json").stdout)
    assert preview["runs"] == [gc["run_id"]] and preview["applied"] is False
    young = json.loads(cli("purge", str(fixture_root), "--older-than", "1h", "--apply", "--json").stdout)
    assert young["runs"] == [] and young["kept"] == [gc["run_id"]]

    undone = json.loads(cli("undo", str(fixture_root), gc["run_id"], "--json").stdout)
    assert undone["run_id"] == gc["run_id"] and undone["moved_back"] == gc["apply"]["moved"]
    assert registry_snapshot(fixture_root) == before
    again = cli("undo", str(fixture_root), gc["run_id"])
    assert again.returncode == 3 and "already reverted" in again.stderr

    purged = json.loads(cli("purge", str(fixture_root), "--apply", "--json").stdout)
    assert purged["runs"] == [gc["run_id"]] and purged["bytes_freed"] > 0
    assert json.loads(cli("runs", str(fixture_root), "--json").stdout)["runs"] == []
    assert registry_snapshot(fixture_root) == before


def test_purge_frees_the_quarantined_bytes(fixture_root: Path) -> None:
    gc = json.loads(cli("gc", str(fixture_root), "--grace", "0", "--apply", "--json").stdout)
    purged = cli("purge", str(fixture_root), "--apply")
    assert purged.returncode == 0 and "Deleted 1 run:" in purged.stdout
    assert not (fixture_root / "regfsck-quarantine" / gc["run_id"]).exists()
    assert cli("undo", str(fixture_root)).returncode == 3  # gone for good


def test_undo_argument_errors(fixture_root: Path) -> None:
    assert cli("undo", str(fixture_root), "a", "b").returncode == 2
    bad = cli("undo", str(fixture_root), "../../etc")
    assert bad.returncode == 3 and "not a run id" in bad.stderr
