"""The verification record: which blobs last hashed good, when, and with which stat.

It lives in `ROOT/regfsck-state/verify.sqlite` (beside `docker/`, where the registry never
looks) so that it travels with the tree. A row says: "at `verified_at` these bytes hashed to
their name, and the file then had this size, mtime, ctime and inode". `verify --changed-only`
trusts a row only while the file's stat is unchanged and the row is younger than `--max-age`.
A blob found bad is deleted from the record, never written as good.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from regfsck.errors import RegfsckError
from regfsck.inventory import Blob
from regfsck.layout import STATE_DIR
from regfsck.root import RegistryRoot
from regfsck.storage import EntryKind, FilesystemStorage, StorageError

RECORD_FILE = "verify.sqlite"
SCHEMA_VERSION = "1"
FLUSH_ROWS = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verified (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    verified_at REAL NOT NULL
) WITHOUT ROWID;
"""


class RecordError(RegfsckError):
    """The record cannot be opened or written (read-only root, not a database, symlink)."""


@dataclass(frozen=True, slots=True)
class RecordEntry:
    digest: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    verified_at: float  # seconds since the epoch

    def same_stat(self, blob: Blob) -> bool:
        """True when the file still has the stat it had when its bytes hashed good."""
        return (self.size == blob.size and self.mtime_ns == blob.mtime_ns
                and self.ctime_ns == blob.ctime_ns and self.inode == blob.inode)


RECORD_REL = f"{STATE_DIR}/{RECORD_FILE}"  # relative to the storage root
STATE_HOME_ENV = "XDG_STATE_HOME"


def record_base(root: RegistryRoot, state_dir: Path | None = None, *, create: bool = False) -> Path:
    """The directory holding `regfsck-state/` for `root`.

    A local tree keeps it in ROOT (it travels with the tree). A tree in object storage keeps
    it on the local disk, never in the bucket: `state_dir` (--state-dir) or
    `$XDG_STATE_HOME/regfsck` (default `~/.local/state/regfsck`), then `s3/BUCKET/PREFIX`,
    created with mode 0700."""
    if root.s3 is None:
        return root.root
    home = state_dir
    if home is None:
        xdg = os.environ.get(STATE_HOME_ENV)
        home = (Path(xdg) if xdg else Path.home() / ".local" / "state") / "regfsck"
    base = Path(home) / root.s3.provider / root.s3.bucket / (root.s3.prefix or "_")
    if not create:
        return base  # absent: no record yet (nothing is created by a plain verify)
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RecordError(f"cannot create the state directory {base}: {exc.strerror}") from exc
    return base


class VerifyRecord:
    """An open record; writes are buffered and committed in batches (and by `close`)."""

    def __init__(self, conn: sqlite3.Connection, where: str,
                 storage: FilesystemStorage | None = None) -> None:
        self._conn = conn
        self.where = where
        self._storage = storage
        self._good: list[tuple[str, int, int, int, int, float]] = []
        self._bad: list[tuple[str]] = []

    # -- opening ------------------------------------------------------------------
    @classmethod
    def open(cls, root: RegistryRoot, *, create: bool,
             state_dir: Path | None = None) -> VerifyRecord | None:
        """Open the record of `root`; None when it does not exist and `create` is false."""
        storage = FilesystemStorage(record_base(root, state_dir, create=create))
        rel = RECORD_REL
        where = storage.full_path(rel)
        try:
            state = storage.stat(STATE_DIR)
            if state is None:
                if not create:
                    return None
                try:
                    storage.make_dir(STATE_DIR, 0o755)
                except StorageError:
                    if storage.stat(STATE_DIR) is None:  # not a concurrent run's mkdir
                        raise
            elif state.kind is not EntryKind.DIR:
                raise RecordError(f"{storage.full_path(STATE_DIR)} is not a directory "
                                  f"({state.kind.value}); move it away")
            existing = storage.stat(rel)
        except StorageError as exc:
            raise RecordError(f"cannot use the verification record {where}: {exc}") from exc
        if existing is None and not create:
            return None
        if existing is not None and existing.kind is not EntryKind.FILE:
            raise RecordError(f"{where} is a {existing.kind.value}, not the verification record; "
                              "move it away")
        uri = f"file:{urllib.parse.quote(where)}?nofollow=1&mode={'rwc' if create else 'rw'}"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise RecordError(f"cannot open the verification record {where}: {exc}") from exc
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                try:
                    conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                except sqlite3.IntegrityError:  # another run (a shard) created it just now
                    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is not None and row[0] != SCHEMA_VERSION:
                raise RecordError(f"{where} has schema {row[0]!r}; this regfsck writes "
                                  f"{SCHEMA_VERSION!r} (move the old record away)")
        except sqlite3.Error as exc:
            conn.close()
            raise RecordError(f"the verification record {where} is unusable ({exc}); move it "
                              "away and the next run starts a new one") from exc
        except RecordError:
            conn.close()
            raise
        return cls(conn, where, storage)

    # -- reading ------------------------------------------------------------------
    def entries(self) -> dict[str, RecordEntry]:
        """Every row, by digest (one query; a million rows take about a second)."""
        try:
            rows = self._conn.execute(
                "SELECT digest, size, mtime_ns, ctime_ns, inode, verified_at FROM verified")
            return {row[0]: RecordEntry(*row) for row in rows}
        except sqlite3.Error as exc:
            raise RecordError(f"cannot read the verification record {self.where}: {exc}") from exc

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM verified").fetchone()[0])

    # -- writing ------------------------------------------------------------------
    def record_good(self, blob: Blob, verified_at: float) -> None:
        """Remember that `blob` (with the stat the scan saw) hashed to its name."""
        self._good.append((blob.digest, blob.size, blob.mtime_ns, blob.ctime_ns, blob.inode,
                           verified_at))
        if len(self._good) >= FLUSH_ROWS:
            self.flush()

    def record_bad(self, digest: str) -> None:
        """Forget any earlier good verdict: a damaged blob is never trusted."""
        self._good = [row for row in self._good if row[0] != digest]
        self._bad.append((digest,))
        self.flush()

    def prune(self, present: Iterable[str]) -> int:
        """Drop rows of blobs that are gone (collected); returns how many."""
        self.flush()
        keep = set(present)
        try:
            stale = [row for row in self._conn.execute("SELECT digest FROM verified")
                     if row[0] not in keep]
        except sqlite3.Error as exc:
            raise RecordError(f"cannot read the verification record {self.where}: {exc}") from exc
        self._write("DELETE FROM verified WHERE digest = ?", stale)
        return len(stale)

    def flush(self) -> None:
        """Commit buffered rows (bad verdicts first, so a bad blob never stays good)."""
        bad, good = self._bad, self._good
        self._bad, self._good = [], []
        if bad:
            self._write("DELETE FROM verified WHERE digest = ?", bad)
        if good:
            self._write("INSERT OR REPLACE INTO verified VALUES (?, ?, ?, ?, ?, ?)", good)

    def _write(self, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        if not rows:
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(sql, rows)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise RecordError(f"cannot write the verification record {self.where}: {exc}") from exc

    def invalidate(self) -> bool:
        """Delete the record after a failed write, so no stale good verdict can outlive a bad
        one that could not be stored (the next run simply re-hashes everything)."""
        self._good, self._bad = [], []
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        if self._storage is None:
            return False
        removed = False
        for suffix in ("", "-journal", "-wal", "-shm"):
            try:
                self._storage.remove_file(RECORD_REL + suffix)
                removed = removed or not suffix
            except StorageError:
                pass
        return removed

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._conn.close()

    def __enter__(self) -> VerifyRecord:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
