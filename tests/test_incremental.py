"""verify --changed-only / --max-age / --sample / --max-duration on trees the real registry wrote.

What these prove: the record skips only blobs it may vouch for; damage with a stat change is
caught at once; bit rot (bytes changed, stat not) hides from --changed-only but not from the
rotating --sample pass nor from --max-age; a run stopped by --max-duration records what it
did and the next run resumes with the rest; plain verify and --no-data keep their meaning.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regfsck import hashing, layout
from regfsck.errors import Interrupted
from regfsck.incremental import Reason, SelectionOptions, select_blobs
from regfsck.inventory import Blob
from regfsck.record import RECORD_REL, STATE_DIR, RecordEntry
from regfsck.root import locate
from regfsck.verify import VerifyOptions, run_verify
from tests.realtools import RealRegistry, SampleInfo, pseudo_random_bytes
from tests.support import V2
from tests.support.cli import invoke


def verify_json(root: Path, *args: str, expect: int = 0) -> dict[str, object]:
    result = invoke("verify", str(root), "--json", *args)
    assert result.returncode == expect, result.stderr + result.stdout[-2000:]
    return json.loads(result.stdout)


def summary(doc: dict[str, object]) -> dict[str, object]:
    return doc["summary"]  # type: ignore[return-value]


def kinds(doc: dict[str, object]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in doc["findings"]:  # type: ignore[attr-defined]
        found.setdefault(f["kind"], set()).add(f.get("digest", ""))
    return found


def record_rows(root: Path) -> dict[str, tuple[int, int, int, int, float]]:
    with sqlite3.connect(root / RECORD_REL) as conn:
        return {r[0]: tuple(r[1:]) for r in conn.execute("SELECT * FROM verified")}  # type: ignore[misc]


def blob_file(root: Path, digest: str) -> Path:
    return root / V2 / layout.blob_data(digest)


def rot(root: Path, digest: str) -> None:
    """Flip one byte of a blob's data in place (same size)."""
    path = blob_file(root, digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def hide_stat_change(root: Path, digest: str) -> None:
    """Make the record believe the blob's stat is unchanged: what real bit rot looks like
    (a process cannot change bytes without moving ctime, so the record is told instead)."""
    st = blob_file(root, digest).stat()
    with sqlite3.connect(root / RECORD_REL) as conn:
        conn.execute("UPDATE verified SET size=?, mtime_ns=?, ctime_ns=?, inode=? WHERE digest=?",
                     (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest))


# --------------------------------------------------------------------------- the CLI


def test_plain_verify_rehashes_everything_and_creates_no_record(sample_root: Path) -> None:
    doc = verify_json(sample_root)
    s = summary(doc)
    assert s["blobs_verified"] == s["blobs_total"] > 0
    assert s["blobs_skipped"] == 0 and s["record"] is None
    assert not (sample_root / STATE_DIR).exists()


def test_changed_only_skips_what_the_record_vouches_for(sample_root: Path,
                                                        sample_info: SampleInfo) -> None:
    first = summary(verify_json(sample_root, "--changed-only"))
    assert first["blobs_verified"] == first["blobs_total"]
    assert first["hashed_because"] == {"new": first["blobs_total"]}
    assert first["record"] == RECORD_REL
    assert len(record_rows(sample_root)) == first["blobs_total"]

    second = summary(verify_json(sample_root, "--changed-only"))
    assert second["blobs_verified"] == 0
    assert second["blobs_skipped"] == first["blobs_total"]

    # A new image pushed by the real registry: only its blobs are new.
    before = set(record_rows(sample_root))
    with RealRegistry(sample_root) as registry:
        layer = registry.put_blob("a/b", pseudo_random_bytes("incremental-new-layer", 5000))
    third = summary(verify_json(sample_root, "--changed-only"))
    assert third["hashed_because"] == {"new": 1}
    assert set(record_rows(sample_root)) - before == {layer}

    # A stat change (here: mtime) makes a blob due again, and it is still good.
    touched = sample_info.blobs["layer/base"]
    os.utime(blob_file(sample_root, touched), ns=(1, 1))
    fourth = verify_json(sample_root, "--changed-only")
    assert summary(fourth)["hashed_because"] == {"changed": 1}
    assert summary(fourth)["errors"] == 0
    assert record_rows(sample_root)[touched][1] == 1


def test_plain_verify_updates_an_existing_record_and_no_data_never_touches_it(
        sample_root: Path, sample_info: SampleInfo) -> None:
    verify_json(sample_root, "--changed-only")
    path = sample_root / RECORD_REL
    rows = record_rows(sample_root)
    bad = sample_info.blobs["layer/app-v1"]
    rot(sample_root, bad)
    snapshot = (path.read_bytes(), path.stat().st_mtime_ns)
    doc = verify_json(sample_root, "--no-data")
    assert summary(doc)["record"] is None and summary(doc)["blobs_verified"] == 0
    assert (path.read_bytes(), path.stat().st_mtime_ns) == snapshot
    # A plain run re-hashes all, and its bad verdict removes the good one.
    doc = verify_json(sample_root, expect=1)
    assert summary(doc)["blobs_verified"] == summary(doc)["blobs_total"]
    assert bad in kinds(doc)["blob_digest_mismatch"]
    assert set(record_rows(sample_root)) == set(rows) - {bad}


def test_damage_with_a_stat_change_is_caught_and_never_recorded_good(
        sample_root: Path, sample_info: SampleInfo) -> None:
    verify_json(sample_root, "--changed-only")
    bad = sample_info.blobs["layer/zstd"]
    rot(sample_root, bad)
    for _ in range(2):  # and again: a blob found bad stays due
        doc = verify_json(sample_root, "--changed-only", expect=1)
        assert bad in kinds(doc)["blob_digest_mismatch"]
        assert bad not in record_rows(sample_root)
    assert summary(doc)["hashed_because"] == {"new": 1}


def test_bit_rot_hides_from_changed_only_but_not_from_the_rotating_sample(
        sample_root: Path, sample_info: SampleInfo) -> None:
    verify_json(sample_root, "--changed-only")
    bad = sample_info.blobs["layer/app-v2"]
    rot(sample_root, bad)
    hide_stat_change(sample_root, bad)
    # The documented trade-off: the record vouches for the rotten blob.
    doc = verify_json(sample_root, "--changed-only")
    assert summary(doc)["blobs_verified"] == 0 and "blob_digest_mismatch" not in kinds(doc)
    # The rotating pass reaches it within 100/P runs.
    percent = 25
    runs = math.ceil(100 / percent)
    for _ in range(runs):
        time.sleep(0.01)  # verdict times strictly increase between runs
        result = invoke("verify", str(sample_root), "--json", "--changed-only", "--sample", str(percent))
        doc = json.loads(result.stdout)
        if "blob_digest_mismatch" in kinds(doc):
            assert result.returncode == 1
            assert bad in kinds(doc)["blob_digest_mismatch"]
            assert bad not in record_rows(sample_root)
            break
        assert result.returncode == 0
        assert summary(doc)["hashed_because"].keys() == {"sampled"}  # type: ignore[attr-defined]
    else:
        pytest.fail(f"--sample {percent} did not reach the rotten blob in {runs} runs")


def test_max_age_expires_old_verdicts(sample_root: Path, sample_info: SampleInfo) -> None:
    verify_json(sample_root, "--changed-only")
    bad = sample_info.blobs["layer/a-b"]
    rot(sample_root, bad)
    hide_stat_change(sample_root, bad)
    with sqlite3.connect(sample_root / RECORD_REL) as conn:
        conn.execute("UPDATE verified SET verified_at = verified_at - 8 * 86400 WHERE digest = ?",
                     (bad,))
    assert summary(verify_json(sample_root, "--changed-only"))["blobs_verified"] == 0  # 30d default
    doc = verify_json(sample_root, "--changed-only", "--max-age", "7d", expect=1)
    assert summary(doc)["hashed_because"] == {"expired": 1}
    assert kinds(doc)["blob_digest_mismatch"] == {bad}


@pytest.mark.parametrize("args", [
    ["--no-data", "--changed-only"], ["--no-data", "--sample", "5"],
    ["--no-data", "--max-duration", "1h"], ["--max-age", "7d"], ["--sample", "0"],
    ["--sample", "101"], ["--max-duration", "0"], ["--changed-only", "--max-age", "soon"],
    ["--max-duration", "-5m"],
])
def test_bad_incremental_arguments_are_usage_errors(fixture_root: Path, args: list[str]) -> None:
    result = invoke("verify", str(fixture_root), "--json", *args)
    assert result.returncode == 2, result.stderr
    assert json.loads(result.stdout)["exit_code"] == 2  # --json: the error, as JSON, only
    assert len(result.stderr.strip().splitlines()) <= 3  # typer's own errors take three lines
    assert not (fixture_root / STATE_DIR).exists()


def test_unusable_record_stops_incremental_runs_but_not_plain_ones(fixture_root: Path) -> None:
    (fixture_root / STATE_DIR).write_text("a file where the state directory belongs")
    result = invoke("verify", str(fixture_root), "--json", "--changed-only")
    assert result.returncode == 3
    assert json.loads(result.stdout)["exit_code"] == 3 and result.stderr.startswith("regfsck: ")
    assert len(result.stderr.strip().splitlines()) == 1
    doc = verify_json(fixture_root)
    assert summary(doc)["blobs_verified"] == summary(doc)["blobs_total"]
    assert "not a directory" in str(summary(doc)["record_error"])


def test_max_duration_that_completes_is_a_normal_run(fixture_root: Path) -> None:
    s = summary(verify_json(fixture_root, "--max-duration", "1h"))
    assert s["blobs_verified"] == s["blobs_total"] and s["stopped_at_limit"] is False
    assert s["blobs_deferred"] == 0
    assert len(record_rows(fixture_root)) == s["blobs_total"]


# --------------------------------------------------------------------------- the engine


@pytest.fixture
def slow_hashing(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Each blob takes at least 100 ms to check; yields the digests checked, in order."""
    checked: list[str] = []
    real = hashing._check_blob

    def slow(storage, blob, on_bytes, stop):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 0.1
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                raise Interrupted
            time.sleep(0.005)
        outcome = real(storage, blob, on_bytes, stop)
        checked.append(blob.digest)
        return outcome

    monkeypatch.setattr(hashing, "_check_blob", slow)
    yield checked


@pytest.mark.slow  # over a second (--durations)
def test_max_duration_stops_cleanly_and_the_next_run_resumes(
        fixture_root: Path, slow_hashing: list[str]) -> None:
    root = locate(fixture_root)
    limit = timedelta(seconds=1.5)
    ctrl_c = threading.Event()
    first = run_verify(root, VerifyOptions(jobs=1, max_duration=limit), stop=ctrl_c)
    s1 = first.summary
    assert s1.stopped_at_limit and not s1.interrupted
    assert not ctrl_c.is_set()  # the limit is not a Ctrl-C: a later one still means "stop"
    assert 0 < s1.blobs_verified < s1.blobs_total / 2
    assert s1.blobs_deferred == s1.blobs_total - s1.blobs_verified
    assert s1.errors == 0
    done = set(slow_hashing)
    assert set(record_rows(fixture_root)) == done  # exactly what finished, nothing partial
    slow_hashing.clear()
    second = run_verify(root, VerifyOptions(jobs=1, max_duration=limit)).summary
    assert second.stopped_at_limit
    assert slow_hashing and not set(slow_hashing) & done  # it went on with the rest first
    recorded = set(record_rows(fixture_root))
    assert recorded == done | set(slow_hashing)
    slow_hashing.clear()
    third = run_verify(root, VerifyOptions(jobs=2, changed_only=True)).summary
    assert not third.stopped_at_limit and third.blobs_deferred == 0
    assert set(slow_hashing) == set(record_rows(fixture_root)) - recorded
    assert third.blobs_skipped == len(recorded)
    assert len(record_rows(fixture_root)) == third.blobs_total


def test_interrupt_keeps_the_verdicts_already_reached(fixture_root: Path,
                                                     slow_hashing: list[str]) -> None:
    root = locate(fixture_root)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    report = run_verify(root, VerifyOptions(jobs=2, changed_only=True), stop=stop)
    s = report.summary
    assert s.interrupted and not s.stopped_at_limit
    assert 0 < s.blobs_verified < s.blobs_total
    assert set(record_rows(fixture_root)) == set(slow_hashing)


@pytest.mark.slow  # over a second (--durations)
def test_a_bad_blob_found_during_a_limited_run_is_not_recorded(fixture_root: Path,
                                                              slow_hashing: list[str]) -> None:
    root = locate(fixture_root)
    run_verify(root, VerifyOptions(jobs=2, changed_only=True))
    rows = record_rows(fixture_root)
    victim = sorted(rows)[0]
    rot(fixture_root, victim)
    report = run_verify(root, VerifyOptions(jobs=1, changed_only=True,
                                            max_duration=timedelta(seconds=30)))
    assert [f.digest for f in report.findings if f.kind == "blob_digest_mismatch"] == [victim]
    assert victim not in record_rows(fixture_root)
    assert set(record_rows(fixture_root)) == set(rows) - {victim}


# --------------------------------------------------------------------------- selection rules


def _blob(n: int, size: int) -> Blob:
    return Blob(f"sha256:{n:064x}", f"blobs/sha256/{n:064x}/data", size, 10 + n, 20 + n, 30 + n)


blob_states = st.lists(
    st.tuples(st.integers(1, 5000),  # size
              st.sampled_from(["none", "same", "changed"]),  # record state
              st.floats(0, 100 * 86400)),  # age of the verdict in seconds
    min_size=1, max_size=60)


def _world(states: list[tuple[int, str, float]], now: float) -> tuple[list[Blob], dict[str, RecordEntry]]:
    blobs, record = [], {}
    for n, (size, state, age) in enumerate(states):
        b = _blob(n, size)
        blobs.append(b)
        if state != "none":
            record[b.digest] = RecordEntry(b.digest, b.size, b.mtime_ns + (state == "changed"),
                                           b.ctime_ns, b.inode, now - age)
    return blobs, record


@given(blob_states, st.integers(1, 60))
def test_changed_only_skips_exactly_the_unchanged_fresh_verdicts(
        states: list[tuple[int, str, float]], max_age_days: int) -> None:
    now = 1e9
    blobs, record = _world(states, now)
    sel = select_blobs(blobs, record, SelectionOptions(
        changed_only=True, max_age=timedelta(days=max_age_days)), now)
    for b, (_, state, age) in zip(blobs, states, strict=True):
        expected = {"none": Reason.NEW, "changed": Reason.CHANGED}.get(state)
        if expected is None and age > max_age_days * 86400:
            expected = Reason.EXPIRED
        assert sel.reasons.get(b.digest) == expected
    assert sel.skipped + len(sel.to_hash) == len(blobs)
    # New and changed blobs come first (a run cut short does them before anything else).
    priorities = [sel.reasons[b.digest] in (Reason.NEW, Reason.CHANGED) for b in sel.to_hash]
    assert priorities == sorted(priorities, reverse=True)


@given(blob_states, st.sampled_from([1, 5, 10, 33, 50, 100]))
def test_the_sample_takes_the_stalest_and_rotates_through_the_whole_store(
        states: list[tuple[int, str, float]], percent: int) -> None:
    now = 1e9
    blobs, record = _world(states, now)
    total = sum(b.size for b in blobs)
    seen: set[str] = set()
    for run in range(1, math.ceil(100 / percent) + 1):  # runs come after every old verdict
        sel = select_blobs(blobs, record, SelectionOptions(sample_percent=percent), now + run)
        chosen = [b for b in blobs if b.digest in sel.reasons]
        assert sum(b.size for b in chosen) >= min(total, percent / 100 * total)
        staleness = {b.digest: (record[b.digest].verified_at if b.digest in record
                                and record[b.digest].same_stat(b) else float("-inf"))
                     for b in blobs}
        if len(chosen) < len(blobs):
            assert max(staleness[b.digest] for b in chosen) <= min(
                staleness[b.digest] for b in blobs if b.digest not in sel.reasons)
        for b in chosen:  # the run's verdicts
            record[b.digest] = RecordEntry(b.digest, b.size, b.mtime_ns, b.ctime_ns, b.inode,
                                           now + run)
        seen.update(b.digest for b in chosen)
    assert seen == {b.digest for b in blobs}
