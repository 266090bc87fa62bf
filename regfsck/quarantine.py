"""Journaled runs: every change to the tree can be undone, and a crash can be recovered.

Nothing is ever deleted from the tree directly. A run moves each victim, by rename on the
same filesystem, into `ROOT/regfsck-quarantine/<run-id>/v2/<same path>` (outside
`docker/`, where the registry never looks), and creates new files atomically. Before
each change a line saying what is about to happen is appended to the run's
`journal.jsonl` and fsynced, so after a crash (kill -9, power loss) the journal and the
state of the disk together say exactly which changes happened. From the journal a run
can be reverted exactly (`undo`: same paths, same bytes, directory mtimes restored),
finished after a crash (`recover`), or deleted for good (`purge`).

Journal lines (JSON, one per line, `seq` numbers the changes of a run):
  {"ev": "intent", "seq", "op": "move"|"mkdir"|"create"|"rmdir", "rel", "parent_mtime_ns", ...}
  {"ev": "written", "seq", "sha256", "size"}   create: temp file complete and synced
  {"ev": "done", "seq"} / {"ev": "failed", "seq"} / {"ev": "resolved", "seq", "applied"}
  {"ev": "finish", "note"?}                      the run ended; every change is in place
  {"ev": "undo-intent", "seq"} / {"ev": "undo-done", "seq"} / {"ev": "reverted"}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import stat as stat_module
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, BinaryIO, Literal

from regfsck.layout import V2_PREFIX
from regfsck.root import RegistryRoot
from regfsck.storage import FilesystemStorage, StorageError, UnsafePathError, check_relative

QUARANTINE_DIR = "regfsck-quarantine"
JOURNAL = "journal.jsonl"
META = "meta.json"
PAYLOAD = "v2"
RUN_ID_RE = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}")
CHUNK = 1 << 20
UNDO_BATCH = 256

OnCrash = Literal["revert", "finish"]
# Run states kept in meta.json; the journal stays the source of truth after a crash.
RUNNING, COMPLETE, INTERRUPTED, UNDOING, REVERTED = (
    "running", "complete", "interrupted", "undoing", "reverted")
FINAL_STATES = (COMPLETE, INTERRUPTED, REVERTED)


class QuarantineError(Exception):
    """A run cannot start, continue or be undone; the message says why (CLI exit 3)."""


class UndoConflictError(QuarantineError):
    """Undoing would overwrite or delete something the run did not leave there."""


def new_run_id(now: datetime | None = None) -> str:
    """Sortable id: UTC time to the microsecond plus a short random suffix."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{when.strftime('%Y%m%dT%H%M%S.%f')}Z-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    """Refuse anything but a run id (it becomes a path component)."""
    if not RUN_ID_RE.fullmatch(run_id):
        raise QuarantineError(f"not a run id: {run_id[:80]!r} (see `regfsck runs ROOT`)")
    return run_id


def _v2(rel: str) -> str:
    parts = check_relative(rel)
    if not parts:
        raise UnsafePathError("empty path: the v2 directory itself cannot be moved")
    return "/".join([V2_PREFIX, *parts])


def _parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _chunks(data: bytes | BinaryIO | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        yield bytes(data)
        return
    read = getattr(data, "read", None)
    if read is not None:
        while chunk := read(CHUNK):
            yield chunk
        return
    yield from data


# --------------------------------------------------------------------------- results


@dataclass
class RunInfo:
    run_id: str
    command: str
    status: str
    started_at: str
    finished_at: str | None
    details: dict[str, Any]
    changes: int  # journaled changes applied (moves, creations, directory changes)
    bytes: int  # bytes held in the quarantine (what purge frees)
    note: str | None = None
    path: str = ""  # relative to ROOT

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class UndoResult:
    run_id: str
    command: str
    moved_back: int = 0
    files_removed: int = 0
    dirs_removed: int = 0
    dirs_recreated: int = 0
    skipped: int = 0  # changes a crash had left unapplied

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PurgeResult:
    runs: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept: list[str] = field(default_factory=list)  # younger runs, or runs needing recovery
    applied: bool = True

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- the journal


@dataclass
class _Change:
    """One journaled change and what the journal says became of it."""

    seq: int
    op: str
    rel: str  # relative to the v2 directory
    info: dict[str, Any]
    done: bool = False
    failed: bool = False
    resolved: bool | None = None
    written: dict[str, Any] | None = None
    undo_started: bool = False
    undo_done: bool = False

    @property
    def applied_by_journal(self) -> bool | None:
        """True/False when the journal knows; None when only the disk can tell (crash)."""
        if self.done:
            return True
        if self.failed:
            return False
        return self.resolved


@dataclass
class _Journal:
    changes: list[_Change]
    finished: bool
    reverted: bool
    note: str | None


def _read_journal(storage: FilesystemStorage, path: str) -> _Journal:
    """Parse a journal; a torn last line (crash while appending) is ignored."""
    if storage.stat(path) is None:
        return _Journal([], False, False, None)  # crashed right after creating the run dir
    try:
        with storage.open_read(path) as handle:
            raw = handle.read()
    except StorageError as exc:
        raise QuarantineError(f"cannot read the journal {path}: {exc}") from exc
    lines = raw.split(b"\n")
    changes: dict[int, _Change] = {}
    finished = reverted = False
    note: str | None = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            event = entry["ev"]
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):
                break  # the crash cut the last line short
            raise QuarantineError(f"damaged journal {path}, line {number}") from exc
        seq = entry.get("seq")
        if event == "intent":
            changes[seq] = _Change(seq, entry["op"], entry["rel"], entry)
        elif event == "finish":
            finished = True
            note = entry.get("note")
        elif event == "reverted":
            reverted = True
        elif seq in changes:
            change = changes[seq]
            if event == "done":
                change.done = True
            elif event == "failed":
                change.failed = True
            elif event == "written":
                change.written = entry
            elif event == "resolved":
                change.resolved = bool(entry["applied"])
            elif event == "undo-intent":
                change.undo_started = True
            elif event == "undo-done":
                change.undo_done = True
    return _Journal([changes[k] for k in sorted(changes)], finished, reverted, note)


class _JournalWriter:
    """Appends whole lines only: a line cut short (full disk, crash) is removed before the
    next append, since buried mid-file it would read as damage and block undo and recover."""

    def __init__(self, storage: FilesystemStorage, path: str) -> None:
        self.path = path
        self.fd = storage.open_append(path)
        try:
            self._size = self._drop_torn_tail(storage)
        except OSError as exc:
            self.close()
            raise StorageError(exc.errno, f"cannot repair the journal {path}: {exc.strerror}",
                               path) from exc

    def _drop_torn_tail(self, storage: FilesystemStorage) -> int:
        size = os.fstat(self.fd).st_size
        if not size:
            return 0
        reader = storage.open_fd(self.path)
        try:
            tail = os.pread(reader, min(size, 1 << 16), max(0, size - (1 << 16)))
        finally:
            os.close(reader)
        if tail.endswith(b"\n"):
            return size
        cut = tail.rfind(b"\n")
        if cut < 0 and size > len(tail):
            return size  # a 64 KiB line: not ours to judge here; the reader will say
        keep = size - len(tail) + cut + 1
        os.ftruncate(self.fd, keep)
        return keep

    def write(self, entry: dict[str, Any], sync: bool = True) -> None:
        """Append one line; a full or failing disk is a StorageError (the CLI's one-line stop)."""
        line = (json.dumps(entry, separators=(",", ":"), ensure_ascii=True) + "\n").encode()
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self.fd, view):]
            if sync:
                os.fsync(self.fd)
        except OSError as exc:
            with contextlib.suppress(OSError):  # never leave half a line behind
                os.ftruncate(self.fd, self._size)
            raise StorageError(exc.errno, f"cannot write the journal {self.path}: {exc.strerror}",
                               self.path) from exc
        self._size += len(line)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------------- a run


class _RunFiles:
    """Paths of one run, relative to ROOT (the storage root)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = check_run_id(run_id)
        self.dir = f"{QUARANTINE_DIR}/{run_id}"
        self.journal = f"{self.dir}/{JOURNAL}"
        self.meta = f"{self.dir}/{META}"
        self.payload = f"{self.dir}/{PAYLOAD}"

    def held(self, rel: str, payload: str | None = None) -> str:
        """Where a quarantined path `rel` (relative to v2) is kept."""
        return "/".join([payload or self.payload, *check_relative(rel)])

    def held_of(self, change: _Change) -> str:
        """The quarantine copy of a move (journaled, since a collision picks another root)."""
        held = change.info.get("held")
        if held is None:
            return self.held(change.rel)
        if not isinstance(held, str) or not held.startswith(self.dir + "/"):
            raise QuarantineError(f"damaged journal in {self.dir}: bad quarantine path")
        check_relative(held)
        return held

    def payloads(self, storage: FilesystemStorage) -> list[str]:
        """The run's payload roots: `v2`, plus `v2~<seq>` for paths moved twice."""
        if storage.stat(self.dir) is None:
            return []
        return [f"{self.dir}/{e.name}" for e in storage.list_dir(self.dir)
                if e.kind.value == "dir" and (e.name == PAYLOAD or e.name.startswith(PAYLOAD + "~"))]


def _write_meta(storage: FilesystemStorage, files: _RunFiles, meta: dict[str, Any]) -> None:
    storage.replace_file(files.meta, json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n")


def _read_meta(storage: FilesystemStorage, files: _RunFiles) -> dict[str, Any] | None:
    try:
        meta = json.loads(storage.read_small(files.meta, 1 << 20))
    except StorageError:
        return None
    except ValueError as exc:
        raise QuarantineError(f"damaged {files.meta} (not JSON): inspect it by hand; the "
                              f"run's {JOURNAL} beside it records what the run did") from exc
    return meta if isinstance(meta, dict) else None


class Run:
    """One journaled mutation of the tree (see the module docstring).

    Use as a context manager: leaving it with an exception ends the run by its
    `on_crash` policy ("revert": put everything back; "finish": keep what was done),
    the same policy `recover` applies after a crash."""

    def __init__(self, root: RegistryRoot, files: _RunFiles, meta: dict[str, Any]) -> None:
        self.root = root
        self.files = files
        self.meta = meta
        self.storage = FilesystemStorage(root.root)
        self._journal = _JournalWriter(self.storage, files.journal)
        self._seq = 0
        self._held_dirs: set[str] = set()  # parent dirs this run made in its quarantine
        self._held_items: set[str] = set()  # paths of the moved items themselves
        self.moved = self.created = self.dirs_created = self.dirs_removed = 0
        self.closed = False

    @property
    def run_id(self) -> str:
        return self.files.run_id

    @property
    def path(self) -> str:
        """The run directory relative to ROOT."""
        return self.files.dir

    # -- lifecycle -----------------------------------------------------------
    @classmethod
    def begin(cls, root: RegistryRoot, command: str, details: dict[str, Any], *,
              on_crash: OnCrash = "revert") -> Run:
        """Create the run directory, its meta.json and an empty journal.

        Refuses when the quarantine is not on the tree's filesystem: moves must be renames."""
        storage = FilesystemStorage(root.root)
        files = _RunFiles(new_run_id())
        try:
            if storage.stat(QUARANTINE_DIR) is None:
                storage.make_dir(QUARANTINE_DIR, 0o700)
            storage.make_dir(files.dir, 0o700)
            storage.make_dir(files.payload, 0o700)
            q_dev = storage.lstat_raw(files.dir)
            for part in ("", "blobs", "repositories"):
                st = storage.lstat_raw("/".join(p for p in (V2_PREFIX, part) if p))
                if st is not None and q_dev is not None and st.st_dev != q_dev.st_dev:
                    raise QuarantineError(
                        f"{root.root / QUARANTINE_DIR} is not on the same filesystem as "
                        f"{root.v2 / part}; regfsck only moves files by rename, never copies")
            meta = {"run_id": files.run_id, "command": command, "details": details,
                    "started_at": _now_iso(), "status": RUNNING, "on_crash": on_crash,
                    "pid": os.getpid(), "host": socket.gethostname()}
            _write_meta(storage, files, meta)
        except StorageError as exc:
            raise QuarantineError(f"cannot start a run in {root.root / QUARANTINE_DIR}: {exc}") from exc
        run = cls(root, files, meta)
        try:
            run._journal.write({"ev": "begin", "run_id": files.run_id, "command": command})
        except StorageError as exc:
            run._journal.close()
            with contextlib.suppress(StorageError):  # nothing happened: leave no "running" run
                storage.remove_tree(files.dir)
            raise QuarantineError(f"cannot start a run in {root.root / QUARANTINE_DIR}: {exc}") from exc
        return run

    def finish(self, note: str | None = None) -> None:
        """Mark the run complete (every journaled change is in place; undo reverts it)."""
        if self.closed:
            return
        entry: dict[str, Any] = {"ev": "finish"}
        if note:
            entry["note"] = note
        self._journal.write(entry)
        self._journal.close()
        self.closed = True
        self.meta.update(status=COMPLETE, finished_at=_now_iso(), changes=self._seq_applied(),
                         moved=self.moved, created=self.created, dirs_removed=self.dirs_removed)
        if note:
            self.meta["note"] = note
        _write_meta(self.storage, self.files, self.meta)

    def abort(self, reason: str) -> list[str]:
        """End a run that failed midway by its on_crash policy; returns what was done."""
        if self.closed:
            return []
        self._journal.close()
        self.closed = True
        return [_recover_run(self.root, self.storage, self.files, reason=reason)]

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and not self.closed:
            self.abort(f"stopped by {type(exc).__name__}: {exc}"[:300])

    def _seq_applied(self) -> int:
        return self.moved + self.created + self.dirs_created + self.dirs_removed

    def _next(self, op: str, rel: str, sync: bool = True, **info: Any) -> int:
        if self.closed:
            raise QuarantineError(f"run {self.run_id} is already finished")
        self._seq += 1
        parent = _parent_of(_v2(rel))
        st = self.storage.lstat_raw(parent)
        entry = {"ev": "intent", "seq": self._seq, "op": op, "rel": rel,
                 "parent_mtime_ns": st.st_mtime_ns if st is not None else None, **info}
        self._journal.write(entry, sync=sync)
        return self._seq

    def _held_path(self, rel: str) -> str:
        """A free quarantine path for `rel`, its parent directories created (not journaled).

        Normally `<run>/v2/<rel>`. When that path is taken (the same path moved twice, or a
        directory moved after something inside it) or would nest inside an item moved
        earlier, the copy goes below a fresh root `<run>/v2~<seq>/` instead: moved items
        are never mixed, so each one goes back on its own."""
        parts = check_relative(rel)
        for payload in (self.files.payload, f"{self.files.payload}~{self._seq + 1}"):
            prefixes = ["/".join([payload, *parts[:depth]]) for depth in range(1, len(parts) + 1)]
            held = prefixes[-1]
            if any(p in self._held_items for p in prefixes) or self.storage.lstat_raw(held):
                continue
            if payload != self.files.payload and self.storage.stat(payload) is None:
                self.storage.make_dir(payload, 0o700)
            for path in prefixes[:-1]:
                if path not in self._held_dirs:
                    if self.storage.lstat_raw(path) is None:
                        self.storage.make_dir(path, 0o700)
                    self._held_dirs.add(path)
            return held
        raise QuarantineError(f"no free quarantine path for {rel}")  # unreachable: seq is new

    # -- changes -------------------------------------------------------------
    def quarantine(self, rel: str) -> None:
        """Move a file or directory (relative to v2) into the run's quarantine, journaled first."""
        source = _v2(rel)
        st = self.storage.lstat_raw(source)
        if st is None:
            raise QuarantineError(f"cannot quarantine {rel}: it does not exist")
        held = self._held_path(rel)
        kind = "dir" if stat_module.S_ISDIR(st.st_mode) else "file"
        seq = self._next("move", rel, kind=kind, size=st.st_size if kind == "file" else None,
                         held=held)
        try:
            self.storage.rename_noreplace(source, held)
        except BaseException:
            self._journal.write({"ev": "failed", "seq": seq})
            raise
        self._journal.write({"ev": "done", "seq": seq}, sync=False)
        self._held_items.add(held)
        self.moved += 1

    def quarantine_batch(self, rels: Sequence[str]) -> None:
        """`quarantine` for many paths with one journal fsync for the whole batch.

        All intent lines are written and synced before the first move, so the journal
        still announces every move before it happens; a crash in the middle leaves some
        moves done and some not, which `recover` tells apart from the disk."""
        prepared: list[tuple[int, str, str]] = []
        for number, rel in enumerate(rels):
            source = _v2(rel)
            st = self.storage.lstat_raw(source)
            if st is None:
                raise QuarantineError(f"cannot quarantine {rel}: it does not exist")
            held = self._held_path(rel)
            self._held_items.add(held)  # reserve it: later paths of the batch must not nest in it
            kind = "dir" if stat_module.S_ISDIR(st.st_mode) else "file"
            seq = self._next("move", rel, kind=kind, size=st.st_size if kind == "file" else None,
                             held=held, sync=number == len(rels) - 1)
            prepared.append((seq, source, held))
        for index, (seq, source, held) in enumerate(prepared):
            try:
                self.storage.rename_noreplace(source, held)
            except BaseException:
                for later_seq, _, _ in prepared[index:]:
                    self._journal.write({"ev": "failed", "seq": later_seq}, sync=False)
                self._journal.write({"ev": "failed", "seq": seq})
                raise
            self._journal.write({"ev": "done", "seq": seq}, sync=False)
            self.moved += 1

    def _make_parents(self, rel: str) -> None:
        parts = check_relative(rel)[:-1]
        for depth in range(1, len(parts) + 1):
            dir_rel = "/".join(parts[:depth])
            st = self.storage.lstat_raw(_v2(dir_rel))
            if st is not None:
                if not stat_module.S_ISDIR(st.st_mode):
                    raise QuarantineError(f"cannot create {rel}: {dir_rel} is not a directory")
                continue
            seq = self._next("mkdir", dir_rel)
            try:
                self.storage.make_dir(_v2(dir_rel))
            except BaseException:
                self._journal.write({"ev": "failed", "seq": seq})
                raise
            self._journal.write({"ev": "done", "seq": seq}, sync=False)
            self.dirs_created += 1

    def create_file(self, rel: str, data: bytes | BinaryIO | Iterable[bytes]) -> str:
        """Create a new file atomically (temp file, fsync, rename); refuses if it exists.

        `data` may be bytes, a binary file or an iterable of chunks (streamed, so blobs
        of any size need bounded memory). Returns the sha256 digest of what was written."""
        target = _v2(rel)
        if self.storage.lstat_raw(target) is not None:
            raise QuarantineError(f"refusing to create {rel}: it already exists")
        self._make_parents(rel)
        name = check_relative(rel)[-1]
        tmp_rel = "/".join([*check_relative(rel)[:-1], f".{name}.{self.run_id}.tmp"])
        seq = self._next("create", rel, tmp=tmp_rel)
        hasher = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            for chunk in _chunks(data):
                hasher.update(chunk)
                yield chunk

        try:
            size = self.storage.write_new_file(_v2(tmp_rel), hashed())
            self._journal.write({"ev": "written", "seq": seq, "sha256": hasher.hexdigest(),
                                 "size": size})
            self.storage.rename_noreplace(_v2(tmp_rel), target)
        except BaseException:
            if self.storage.lstat_raw(_v2(tmp_rel)) is not None:
                self.storage.remove_file(_v2(tmp_rel))
            self._journal.write({"ev": "failed", "seq": seq})
            raise
        self.storage.fsync_dir(_parent_of(target))
        self._journal.write({"ev": "done", "seq": seq}, sync=False)
        self.created += 1
        return f"sha256:{hasher.hexdigest()}"

    def replace_file(self, rel: str, data: bytes | BinaryIO | Iterable[bytes]) -> str:
        """Quarantine the existing file, then create the new one in its place."""
        self.quarantine(rel)
        return self.create_file(rel, data)

    def remove_empty_dirs(self, rel_dirs: Iterable[str]) -> list[str]:
        """Remove the directories that are empty (deepest first); undo recreates them.

        Directories that are missing or not empty are skipped; returns those removed."""
        removed: list[str] = []
        for rel in sorted(set(rel_dirs), key=lambda r: (-len(check_relative(r)), r)):
            path = _v2(rel)
            st = self.storage.lstat_raw(path)
            if st is None or not stat_module.S_ISDIR(st.st_mode) or self.storage.list_dir(path):
                continue
            seq = self._next("rmdir", rel, mtime_ns=st.st_mtime_ns, mode=st.st_mode,
                             uid=st.st_uid, gid=st.st_gid)
            try:
                self.storage.remove_empty_dir(path)
            except StorageError:
                self._journal.write({"ev": "failed", "seq": seq})
                continue
            self._journal.write({"ev": "done", "seq": seq}, sync=False)
            self.dirs_removed += 1
            removed.append(rel)
        return removed


# --------------------------------------------------------------------------- undo / recover


class _Reverter:
    """Puts one run back, change by change in reverse order, journaling as it goes."""

    def __init__(self, root: RegistryRoot, storage: FilesystemStorage, files: _RunFiles) -> None:
        self.root = root
        self.storage = storage
        self.files = files

    def exists(self, path: str) -> bool:
        return self.storage.lstat_raw(path) is not None

    def forward_applied(self, change: _Change) -> bool:
        """Did this change reach the disk? Asked of the disk when the journal cannot tell."""
        known = change.applied_by_journal
        if known is not None and change.op != "create":
            return known
        original = _v2(change.rel)
        if change.op == "move":
            here, held = self.exists(original), self.exists(self.files.held_of(change))
            if held and not here:
                return True
            if here and not held:
                return False
            state = "both" if here else "neither"
            raise UndoConflictError(
                f"run {self.files.run_id}: {change.rel} is in {state} of the tree and the "
                f"quarantine; resolve it by hand ({self.files.held_of(change)})")
        if change.op == "mkdir":
            return self.exists(original) if known is None else known
        if change.op == "rmdir":
            return not self.exists(original) if known is None else known
        return self._create_applied(change, original, known)

    def _create_applied(self, change: _Change, original: str, known: bool | None) -> bool:
        tmp = _v2(change.info["tmp"])
        if self.exists(tmp):
            # Ours (the name carries the run id) and never renamed: the change did not happen.
            self.storage.remove_file(tmp)
            return False if known is None else known
        if known is not None:
            return known
        # Renamed into place only after the "written" line: the file at `original` is ours.
        return change.written is not None and self.exists(original)

    def _restore_parent_mtime(self, change: _Change) -> None:
        mtime = change.info.get("parent_mtime_ns")
        parent = _parent_of(_v2(change.rel))
        if mtime is not None and self.exists(parent):
            self.storage.set_times(parent, int(mtime))

    def _file_sha256(self, path: str) -> str:
        hasher = hashlib.sha256()
        with self.storage.open_read(path) as handle:
            while chunk := handle.read(CHUNK):
                hasher.update(chunk)
        return hasher.hexdigest()

    def preflight(self, changes: list[_Change]) -> None:
        """Check, before touching anything, that every reverse step has its way clear.

        The reverse steps are simulated: exact paths whose existence a step changes are
        remembered, and a directory moved back makes its quarantined contents visible at
        its original path for the steps after it."""
        present: dict[str, bool] = {}
        mounts: dict[str, str] = {}  # original -> held, of directories moved back

        def exists(path: str) -> bool:
            if path in present:
                return present[path]
            ancestor = path
            while "/" in ancestor:
                ancestor = ancestor.rpartition("/")[0]
                if ancestor in mounts:
                    return exists(mounts[ancestor] + path[len(ancestor):])
            return self.exists(path)

        problems: list[str] = []
        for change in reversed(changes):
            if change.undo_done or not self.forward_applied(change):
                continue
            original = _v2(change.rel)
            if change.op == "move":
                held = self.files.held_of(change)
                if not exists(held):
                    problems.append(f"{change.rel}: its quarantined copy is gone")
                elif exists(original):
                    problems.append(f"{change.rel}: something new exists at that path")
                present[original], present[held] = True, False
                mounts[original] = held
            elif change.op == "create":
                if not exists(original):
                    problems.append(f"{change.rel}: the file the run created is gone")
                present[original] = False
            elif change.op == "mkdir":
                present[original] = False
            elif change.op == "rmdir":
                if exists(original):
                    problems.append(f"{change.rel}: a directory was created there since")
                present[original] = True
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                               if len(problems) > 5 else "")
            raise UndoConflictError(
                f"cannot undo run {self.files.run_id}: the tree changed since ({shown}). "
                "Undo newer runs first, or put these paths back by hand")

    def revert(self, journal: _Journal, result: UndoResult, writer: _JournalWriter) -> None:
        """Reverse every applied change, newest first, in batches of one journal fsync.

        Each batch's undo-intent lines are on disk before any of its steps; after a crash
        a step with an intent but no undo-done line is settled from the disk."""
        pending: list[_Change] = []
        for change in reversed(journal.changes):
            if change.undo_done:
                continue
            if not self.forward_applied(change):
                result.skipped += 1
                continue
            pending.append(change)
        for start in range(0, len(pending), UNDO_BATCH):
            batch = pending[start:start + UNDO_BATCH]
            for number, change in enumerate(batch):
                writer.write({"ev": "undo-intent", "seq": change.seq}, sync=number == len(batch) - 1)
            for change in batch:
                if change.undo_started and self._already_reverted(change):
                    self._restore_times(change)  # the crash may have come before it
                else:
                    self._revert_one(change, result)
                writer.write({"ev": "undo-done", "seq": change.seq}, sync=False)

    def _already_reverted(self, change: _Change) -> bool:
        """A crash during undo: did this reverse step happen?"""
        original = _v2(change.rel)
        if change.op == "move":
            return self.exists(original) and not self.exists(self.files.held_of(change))
        if change.op in ("create", "mkdir"):
            return not self.exists(original)
        return self.exists(original)  # rmdir

    def _revert_one(self, change: _Change, result: UndoResult) -> None:
        original = _v2(change.rel)
        if change.op == "move":
            self.storage.rename_noreplace(self.files.held_of(change), original)
            result.moved_back += 1
        elif change.op == "create":
            expected = (change.written or {}).get("sha256")
            if expected is not None and self._file_sha256(original) != expected:
                raise UndoConflictError(
                    f"cannot undo run {self.files.run_id}: {change.rel} changed since the run "
                    "created it; remove or move it by hand, then run undo again")
            self.storage.remove_file(original)
            result.files_removed += 1
        elif change.op == "mkdir":
            self.storage.remove_empty_dir(original)
            result.dirs_removed += 1
        elif change.op == "rmdir":
            self.storage.make_dir(original)
            result.dirs_recreated += 1
        self._restore_times(change)

    def _restore_times(self, change: _Change) -> None:
        """Give a recreated directory its mode, owner and mtime, and its parent its mtime."""
        if change.op == "rmdir":
            info = change.info
            owner = (int(info["uid"]), int(info["gid"])) if info.get("uid") is not None else None
            self.storage.set_times(_v2(change.rel), int(info["mtime_ns"]), mode=info.get("mode"),
                                   owner=owner)
        self._restore_parent_mtime(change)


def _revert_run(root: RegistryRoot, storage: FilesystemStorage, files: _RunFiles,
                meta: dict[str, Any], journal: _Journal) -> UndoResult:
    reverter = _Reverter(root, storage, files)
    result = UndoResult(files.run_id, str(meta.get("command", "?")))
    if meta.get("status") != UNDOING:
        reverter.preflight(journal.changes)
        meta.update(status=UNDOING)
        _write_meta(storage, files, meta)
    writer = _JournalWriter(storage, files.journal)
    try:
        reverter.revert(journal, result, writer)
        writer.write({"ev": "reverted"})
    finally:
        writer.close()
    meta.update(status=REVERTED, reverted_at=_now_iso())
    _write_meta(storage, files, meta)
    return result


def _seal_run(root: RegistryRoot, storage: FilesystemStorage, files: _RunFiles,
              meta: dict[str, Any], journal: _Journal, reason: str) -> int:
    """Keep what an interrupted run did: settle each in-flight change from the disk."""
    reverter = _Reverter(root, storage, files)
    writer = _JournalWriter(storage, files.journal)
    applied = 0
    try:
        for change in journal.changes:
            known = change.applied_by_journal
            state = reverter.forward_applied(change)
            if known is None or change.op == "create":
                writer.write({"ev": "resolved", "seq": change.seq, "applied": state})
            applied += state
        writer.write({"ev": "finish", "note": reason})
    finally:
        writer.close()
    meta.update(status=INTERRUPTED, finished_at=_now_iso(), changes=applied, note=reason)
    _write_meta(storage, files, meta)
    return applied


def _recover_run(root: RegistryRoot, storage: FilesystemStorage, files: _RunFiles,
                 reason: str = "interrupted (crash or kill)") -> str:
    meta = _read_meta(storage, files) or {}
    journal = _read_journal(storage, files.journal)
    command = meta.get("command", "?")
    if meta.get("status") == UNDOING:
        result = _revert_run(root, storage, files, meta, journal)
        return (f"run {files.run_id} ({command}): finished its interrupted undo "
                f"({result.moved_back} moved back)")
    if journal.finished:
        meta.update(status=COMPLETE, finished_at=meta.get("finished_at") or _now_iso())
        _write_meta(storage, files, meta)
        return f"run {files.run_id} ({command}): had completed; bookkeeping updated"
    if meta.get("on_crash", "revert") == "finish":
        applied = _seal_run(root, storage, files, meta, journal, reason)
        return (f"run {files.run_id} ({command}) was {reason}: kept its {applied} completed "
                f"changes (revert them with `regfsck undo ROOT {files.run_id}`)")
    result = _revert_run(root, storage, files, meta, journal)
    changes = result.moved_back + result.files_removed + result.dirs_removed + result.dirs_recreated
    return f"run {files.run_id} ({command}) was {reason}: reverted its {changes} changes"


def _run_dirs(storage: FilesystemStorage) -> list[_RunFiles]:
    if storage.stat(QUARANTINE_DIR) is None:
        return []
    return [_RunFiles(e.name) for e in storage.list_dir(QUARANTINE_DIR)
            if e.kind.value == "dir" and RUN_ID_RE.fullmatch(e.name)]


def recover(root: RegistryRoot) -> list[str]:
    """Finish or revert every run a crash left open (call under the root lock).

    Each run's on_crash policy decides: "revert" puts the tree back as it was before the
    run, "finish" keeps the changes that reached the disk (still undoable)."""
    storage = FilesystemStorage(root.root)
    messages: list[str] = []
    for files in _run_dirs(storage):
        meta = _read_meta(storage, files)
        if meta is None:
            journal = _read_journal(storage, files.journal)
            if not journal.changes:
                storage.remove_tree(files.dir)  # begin never completed: nothing was changed
                messages.append(f"run {files.run_id}: removed (interrupted before any change)")
                continue
            raise QuarantineError(f"{files.dir} has a journal but no meta.json; inspect it by hand")
        if meta.get("status") in (RUNNING, UNDOING):
            messages.append(_recover_run(root, storage, files))
    return messages


def list_runs(root: RegistryRoot) -> list[RunInfo]:
    """Every run in the quarantine, oldest first."""
    storage = FilesystemStorage(root.root)
    runs: list[RunInfo] = []
    for files in _run_dirs(storage):
        meta = _read_meta(storage, files) or {}
        status = str(meta.get("status", "unknown"))
        changes = meta.get("changes")
        if changes is None and storage.stat(files.journal) is not None:
            journal = _read_journal(storage, files.journal)
            changes = sum(1 for c in journal.changes if c.applied_by_journal)
        runs.append(RunInfo(
            run_id=files.run_id, command=str(meta.get("command", "?")), status=status,
            started_at=str(meta.get("started_at", "")),
            finished_at=meta.get("reverted_at") or meta.get("finished_at"),
            details=meta.get("details") or {}, changes=int(changes or 0),
            bytes=sum(storage.tree_size(p) for p in files.payloads(storage)),
            note=meta.get("note"), path=files.dir))
    return runs


def undo(root: RegistryRoot, run_id: str | None = None) -> UndoResult:
    """Revert a run exactly (default: the newest run not yet reverted).

    Checks first that every path is as the run left it, so an undo that would clash with
    later changes refuses before touching anything."""
    storage = FilesystemStorage(root.root)
    candidates = _run_dirs(storage)
    if run_id is not None:
        check_run_id(run_id)
        candidates = [f for f in candidates if f.run_id == run_id]
        if not candidates:
            raise QuarantineError(f"no run {run_id} in {root.root / QUARANTINE_DIR}")
    for files in reversed(candidates):
        meta = _read_meta(storage, files)
        if meta is None:
            continue
        if meta.get("status") == REVERTED:
            if run_id is not None:
                raise QuarantineError(f"run {run_id} was already reverted")
            continue
        journal = _read_journal(storage, files.journal)
        return _revert_run(root, storage, files, meta, journal)
    raise QuarantineError(f"nothing to undo in {root.root / QUARANTINE_DIR}")


def _finished_at(meta: dict[str, Any]) -> datetime | None:
    for key in ("reverted_at", "finished_at", "started_at"):
        value = meta.get(key)
        if value:
            try:
                return datetime.fromisoformat(str(value))
            except ValueError:
                continue
    return None


def purge(root: RegistryRoot, older_than: timedelta, *, dry_run: bool = False,
          now: datetime | None = None) -> PurgeResult:
    """Delete for good the runs that ended at least `older_than` ago; reports bytes freed.

    Runs still open (a crash, see `recover`) are never purged."""
    storage = FilesystemStorage(root.root)
    now = now or datetime.now(UTC)
    result = PurgeResult(applied=not dry_run)
    for files in _run_dirs(storage):
        meta = _read_meta(storage, files) or {}
        ended = _finished_at(meta)
        if meta.get("status") not in FINAL_STATES or ended is None or now - ended < older_than:
            result.kept.append(files.run_id)
            continue
        result.runs.append(files.run_id)
        if dry_run:
            result.bytes_freed += storage.tree_size(files.dir)
        else:
            result.bytes_freed += storage.remove_tree(files.dir)
    return result
