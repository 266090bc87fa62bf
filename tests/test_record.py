"""The verification record (ROOT/regfsck-state/verify.sqlite): storage, refusals, invalidation."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from regfsck.inventory import Blob
from regfsck.record import RECORD_REL, STATE_DIR, RecordEntry, RecordError, VerifyRecord
from regfsck.root import locate


def blob(n: int, **changes: int) -> Blob:
    fields = {"size": 100 + n, "mtime_ns": 10**18 + n, "ctime_ns": 2 * 10**18 + n, "inode": 1000 + n}
    fields.update(changes)
    return Blob(f"sha256:{n:064x}", f"blobs/sha256/00/{n:064x}/data", **fields)


def test_no_record_is_created_unless_asked(fixture_root: Path) -> None:
    root = locate(fixture_root)
    assert VerifyRecord.open(root, create=False) is None
    assert not (fixture_root / STATE_DIR).exists()


def test_good_verdicts_round_trip_with_their_stat(fixture_root: Path) -> None:
    root = locate(fixture_root)
    with VerifyRecord.open(root, create=True) as record:  # type: ignore[union-attr]
        for n in range(5000):  # more than one flush
            record.record_good(blob(n), 1_700_000_000.5)
    assert (fixture_root / RECORD_REL).is_file()
    reopened = VerifyRecord.open(root, create=False)
    assert reopened is not None
    entries = reopened.entries()
    reopened.close()
    assert len(entries) == 5000
    b = blob(42)
    assert entries[b.digest] == RecordEntry(b.digest, b.size, b.mtime_ns, b.ctime_ns, b.inode,
                                            1_700_000_000.5)
    assert entries[b.digest].same_stat(b)


@pytest.mark.parametrize("field", ["size", "mtime_ns", "ctime_ns", "inode"])
def test_any_stat_change_breaks_the_verdict(field: str) -> None:
    b = blob(1)
    entry = RecordEntry(b.digest, b.size, b.mtime_ns, b.ctime_ns, b.inode, 0.0)
    assert entry.same_stat(b)
    assert not entry.same_stat(blob(1, **{field: getattr(b, field) + 1}))


def test_a_bad_verdict_removes_the_good_one_even_unflushed(fixture_root: Path) -> None:
    root = locate(fixture_root)
    with VerifyRecord.open(root, create=True) as record:  # type: ignore[union-attr]
        record.record_good(blob(1), 1.0)
        record.record_good(blob(2), 1.0)
    with VerifyRecord.open(root, create=False) as record:  # type: ignore[union-attr]
        record.record_good(blob(3), 2.0)  # still buffered
        record.record_bad(blob(1).digest)
        record.record_bad(blob(3).digest)
    with VerifyRecord.open(root, create=False) as record:  # type: ignore[union-attr]
        assert set(record.entries()) == {blob(2).digest}


def test_prune_forgets_blobs_that_are_gone(fixture_root: Path) -> None:
    root = locate(fixture_root)
    with VerifyRecord.open(root, create=True) as record:  # type: ignore[union-attr]
        for n in range(10):
            record.record_good(blob(n), 1.0)
        assert record.prune([blob(n).digest for n in range(0, 10, 2)]) == 5
        assert set(record.entries()) == {blob(n).digest for n in range(0, 10, 2)}


def test_state_dir_symlink_is_refused_and_nothing_is_written_through_it(
        fixture_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (fixture_root / STATE_DIR).symlink_to(outside)
    with pytest.raises(RecordError, match="not a directory"):
        VerifyRecord.open(locate(fixture_root), create=True)
    assert list(outside.iterdir()) == []


def test_record_file_symlink_is_refused(fixture_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.sqlite"
    (fixture_root / STATE_DIR).mkdir()
    (fixture_root / RECORD_REL).symlink_to(target)
    with pytest.raises(RecordError):
        VerifyRecord.open(locate(fixture_root), create=True)
    assert not target.exists()


def test_record_that_is_a_directory_is_refused(fixture_root: Path) -> None:
    (fixture_root / RECORD_REL).mkdir(parents=True)
    with pytest.raises(RecordError, match="move it away"):
        VerifyRecord.open(locate(fixture_root), create=False)


def test_garbage_record_is_refused_with_advice(fixture_root: Path) -> None:
    (fixture_root / STATE_DIR).mkdir()
    (fixture_root / RECORD_REL).write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(RecordError, match="move it"):
        VerifyRecord.open(locate(fixture_root), create=False)


def test_other_schema_is_refused(fixture_root: Path) -> None:
    root = locate(fixture_root)
    VerifyRecord.open(root, create=True).close()  # type: ignore[union-attr]
    with sqlite3.connect(fixture_root / RECORD_REL) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    with pytest.raises(RecordError, match="schema"):
        VerifyRecord.open(root, create=False)


def test_invalidate_deletes_the_record(fixture_root: Path) -> None:
    root = locate(fixture_root)
    record = VerifyRecord.open(root, create=True)
    assert record is not None
    record.record_good(blob(1), 1.0)
    assert record.invalidate()
    assert not os.path.exists(fixture_root / RECORD_REL)
    assert VerifyRecord.open(root, create=False) is None
