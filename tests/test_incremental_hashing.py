"""The hashing engine's two paths (threads; worker processes for many small blobs) give the
same verdicts, stop cleanly, and keep the verification record exact."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from regfsck import hashing, layout
from regfsck.root import locate
from regfsck.scanner import Scanner
from regfsck.storage import FilesystemStorage
from regfsck.verify import VerifyOptions, run_verify
from tests.realtools import SampleInfo
from tests.support import V2
from tests.support.cli import run


def outcomes(root: Path, processes: bool, jobs: int = 2) -> list[tuple[str, str | None, int, bool]]:
    registry = locate(root)
    storage = FilesystemStorage(registry.v2)
    blobs = sorted(Scanner(storage, registry).scan().blobs.values(), key=lambda b: b.inode)
    found = [(o.blob.digest, o.actual, o.bytes_read, o.ok)
             for o in hashing.verify_blobs(storage, blobs, jobs=jobs, processes=processes)]
    return sorted(found)


def test_processes_and_threads_reach_the_same_verdicts(sample_root: Path,
                                                       sample_info: SampleInfo) -> None:
    rotten = sample_info.blobs["layer/app-v1"]
    path = sample_root / V2 / layout.blob_data(rotten)
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    by_threads = outcomes(sample_root, processes=False)
    by_processes = outcomes(sample_root, processes=True)
    assert by_processes == by_threads
    bad = [o for o in by_processes if not o[3]]
    assert [o[0] for o in bad] == [rotten] and bad[0][1] not in (None, rotten)


def test_a_blob_gone_after_the_scan_is_unreadable_in_a_worker(sample_root: Path,
                                                            sample_info: SampleInfo) -> None:
    registry = locate(sample_root)
    storage = FilesystemStorage(registry.v2)
    blobs = sorted(Scanner(storage, registry).scan().blobs.values(), key=lambda b: b.inode)
    gone = sample_info.blobs["layer/base"]
    (sample_root / V2 / layout.blob_data(gone)).unlink()
    found = {o.blob.digest: o for o in hashing.verify_blobs(storage, blobs, jobs=2, processes=True)}
    assert len(found) == len(blobs)
    assert found[gone].actual is None and "cannot open" in str(found[gone].error)
    assert all(o.ok for d, o in found.items() if d != gone)


def test_stop_before_start_hashes_nothing_and_leaves_no_worker(fixture_root: Path) -> None:
    registry = locate(fixture_root)
    storage = FilesystemStorage(registry.v2)
    blobs = list(Scanner(storage, registry).scan().blobs.values())
    stop = threading.Event()
    stop.set()
    before = threading.active_count()
    assert list(hashing.verify_blobs(storage, blobs, jobs=2, stop=stop, processes=True)) == []
    assert threading.active_count() == before


def test_record_is_exact_when_workers_hash(fixture_root: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hashing.HASH_PROCESSES_ENV, "1")
    report = run_verify(locate(fixture_root), VerifyOptions(jobs=2, changed_only=True))
    s = report.summary
    assert s.errors == 0 and s.blobs_verified == s.blobs_total > 0
    again = run_verify(locate(fixture_root), VerifyOptions(jobs=2, changed_only=True)).summary
    assert again.blobs_verified == 0 and again.blobs_skipped == s.blobs_total


def test_cli_verify_is_the_same_either_way(fixture_root: Path) -> None:
    summaries = []
    for mode in ("0", "1"):
        env = {**os.environ, hashing.HASH_PROCESSES_ENV: mode}
        result = run("verify", str(fixture_root), "--json", env=env)  # its own process pool
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        summaries.append(json.loads(result.stdout)["summary"])
    assert summaries[0] == summaries[1]
    assert summaries[0]["blobs_verified"] == summaries[0]["blobs_total"] > 0
    assert summaries[0]["bytes_verified"] == summaries[0]["bytes_total"]
