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
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import stat as stat_module
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from regfsck.document import Document
from regfsck.errors import ExitCode, RegfsckError
from regfsck.hashing import ProvenChunks
from regfsck.layout import QUARANTINE_DIR, V2_PREFIX
from regfsck.root import RegistryRoot
from regfsck.storage import (
    AppendFile,
    MutableStorage,
    StorageError,
    UnsafePathError,
    check_relative,
    mutable_storage,
)
from regfsck.undoplan import build_view, missing_parts, restored_tags, used_now

if TYPE_CHECKING:
    from regfsck.session import MutationSession

JOURNAL = "journal.jsonl"
META = "meta.json"
PAYLOAD = "v2"
UNDONE = "undone"  # where an undo puts the files the run had created (kept until purge)
# An undo's steps that leave the tree as they find it, judged again by a later undo
# (`_finish_kept_undos`), and those that change it.
_JUDGED_AGAIN = frozenset({"keep", "already_there"})
_CHANGING = frozenset({"move_back", "unmake", "rmdir", "remake_dir"})
_TAKING = frozenset({"unmake", "rmdir"})
_KEPT_NOTED = 1000  # entries of `undo_kept` a run's meta.json notes
# Why an undo left a path in place, as noted (`_may_finish` reads them back).
_BACK_IN_PLACE = "the same content is back in place"
_DIR_AGAIN = "the directory exists again"
_USED = "used by what was written since the run"
_HOLDS = "holds what was written since the run"
_EMPTIED_BY = "moved what was inside it"  # "run X moved ..."
RUN_ID_RE = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}")
CHUNK = 1 << 20
# Changes per journal flush: moves, creations and directory changes alike. A flush costs
# one filesystem sync (creations) or journal fsync (moves) whatever its size: on journaled
# ext4 about 10 ms of commit besides the data (9,000 link rewrites: 72 syncs took 1.40 s,
# 19 took 0.84 s). A batch of link rewrites reaches about as many directories as it has
# changes, which the storage keeps open for it (`kept_dirs_limit`, up to 1024). gc's sweep
# queues 256 moves at a time on its own (sweep.BATCH).
BATCH = 1024
UNDO_BATCH = BATCH
JOURNAL_CHUNK = 1 << 20  # bytes of a journal read at a time
STAGING = "new"  # where a run writes new files before renaming them into the tree
# What the registry's filesystem driver creates under the usual umask 022; new entries
# with no sibling to copy from get these.
FILE_MODE = 0o644
DIR_MODE = 0o755

OnCrash = Literal["revert", "finish"]
# Run states kept in meta.json; the journal stays the source of truth after a crash.
RUNNING, COMPLETE, INTERRUPTED, UNDOING, REVERTED = (
    "running", "complete", "interrupted", "undoing", "reverted")
FINAL_STATES = (COMPLETE, INTERRUPTED, REVERTED)


class QuarantineError(RegfsckError):
    """A run cannot start, continue or be undone; the message says why (exit 3)."""


class UndoConflictError(QuarantineError):
    """Undoing would overwrite or delete something the run did not leave there."""


def new_run_id(now: datetime | None = None) -> str:
    """Sortable id: UTC time to the microsecond plus a short random suffix."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{when.strftime('%Y%m%dT%H%M%S.%f')}Z-{secrets.token_hex(3)}"


def check_run_id(run_id: str, exit_code: ExitCode = ExitCode.CANNOT_RUN) -> str:
    """Refuse anything but a run id (it becomes a path component). `purge RUN_ID...` calls
    a bad one a usage error (2); `undo` has always refused it as a run it cannot undo (3)."""
    if not RUN_ID_RE.fullmatch(run_id):
        raise QuarantineError(f"not a run id: {run_id[:80]!r} (see `regfsck runs ROOT`)",
                              exit_code=exit_code)
    return run_id


def _v2(rel: str) -> str:
    parts = check_relative(rel)
    if not parts:
        raise UnsafePathError("empty path: the v2 directory itself cannot be moved")
    return "/".join([V2_PREFIX, *parts])


def _parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def _self_and_parents(path: str) -> Iterator[str]:
    """`path`, then each directory above it up to its first component."""
    while True:
        yield path
        if "/" not in path:
            return
        path = path.rpartition("/")[0]


def _within(path: str, paths: set[str] | dict[str, Any]) -> bool:
    """Is `path`, or a directory above it, one of `paths`? In time of its depth: an undo
    asks once per change, and comparing with each of `paths` made it quadratic (an
    import of 1,500 images: 50 s of the undo's 52). A loop, not a generator: a batch
    asks several times per change."""
    while True:
        if path in paths:
            return True
        cut = path.rfind("/")
        if cut < 0:
            return False
        path = path[:cut]


class _PathClaims:
    """Paths claimed so far; a path collides with them when it is one, lies inside one or
    holds one: each answered by set lookups along its own depth."""

    def __init__(self) -> None:
        self._claimed: set[str] = set()
        self._holding: set[str] = set()  # every directory above a claimed path

    def collides(self, path: str) -> bool:
        return path in self._holding or _within(path, self._claimed)

    def claim(self, path: str) -> None:
        self._claimed.add(path)
        parents = _self_and_parents(path)
        next(parents)
        self._holding.update(parents)


def _absent_dirs(dirs: list[str], known: set[str], exists: Callable[[str], bool]) -> list[str]:
    """Of directories `dirs` (outermost first), those that do not exist yet: the ones in
    `known` are not looked at, the rest in turn until the first absent one, below which
    none can exist. Those found are added to `known`."""
    for depth, path in enumerate(dirs):
        if path in known:
            continue
        if not exists(path):
            return dirs[depth:]
        known.add(path)
    return []


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
class RunInfo(Document):
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
    # A reverted run: what its undo left in place because later runs needed it (taken, or
    # put back, when those are undone too: `_finish_kept_undos`); "<path>: why", up to 1000.
    undo_kept: list[str] = field(default_factory=list)


@dataclass
class UndoResult(Document):
    run_id: str
    command: str
    moved_back: int = 0
    files_removed: int = 0
    dirs_removed: int = 0
    dirs_recreated: int = 0
    skipped: int = 0  # changes a crash had left unapplied, or already gone
    kept: list[str] = field(default_factory=list)  # "<path>: why" of creations left in place
    warnings: list[str] = field(default_factory=list)
    # Older reverted runs whose undo this one finished: what they had kept only for what
    # this run made is gone now (each {"run_id", "command", "files_removed", ...}).
    finished: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UndoStep(Document):
    """One reverse step, decided before anything moves.

    Actions: move_back (quarantine -> tree), unmake (a creation -> the run's `undone/`),
    rmdir / remake_dir (a directory the run created / removed), keep (a creation that is
    no longer only the run's: used or rewritten since), already_there (the same content or
    directory is back in place), skip (never applied, or gone), settle (a crash came after
    the step: only its journal line is missing)."""

    seq: int
    action: str
    rel: str
    why: str = ""
    held: str | None = None  # ROOT-relative: where a move_back comes from / an unmake goes


@dataclass(frozen=True)
class UndoPlan:
    """What undoing a run would do to the tree as it is now; refused when `problems`."""

    run_id: str
    steps: tuple[UndoStep, ...]
    problems: tuple[str, ...]
    blockers: tuple[str, ...]  # newer runs to undo first
    warnings: tuple[str, ...]
    # Older reverted runs whose undo kept something: judged again once this undo is done
    # (what they kept only for this run's files goes then: `_finish_kept_undos`).
    then_finishes: tuple[str, ...] = ()

    def count(self, action: str) -> int:
        return sum(1 for step in self.steps if step.action == action)

    def refusal(self) -> str:
        shown = "; ".join(self.problems[:5]) + (
            f"; and {len(self.problems) - 5} more" if len(self.problems) > 5 else "")
        first = (f" Undo run {', '.join(self.blockers)} first."
                 if self.blockers else " Put these paths back by hand, or leave the run.")
        return (f"cannot undo run {self.run_id}: the tree changed since ({shown}).{first} "
                "Nothing was changed.")

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "steps": [s.to_json() for s in self.steps],
                "problems": list(self.problems), "blockers": list(self.blockers),
                "warnings": list(self.warnings), "then_finishes": list(self.then_finishes)}


@dataclass
class PurgeResult(Document):
    runs: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept: list[str] = field(default_factory=list)  # younger runs, or runs needing recovery
    applied: bool = True
    needed: dict[str, list[str]] = field(default_factory=dict)  # kept run -> runs whose undo needs it


# --------------------------------------------------------------------------- the journal


@dataclass(slots=True)
class _Change:
    """One journaled change and what the journal says became of it (slotted: an undo
    holds one per change of its run, a million for a big gc)."""

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
    done_info: dict[str, Any] | None = None  # the "done" line (a creation's mtime and inode)
    undo_info: dict[str, Any] = field(default_factory=dict)  # the last "undo-intent" line

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


_SHARED: dict[str, str] = {}  # the journal's keys and words, one object each
_WORDS = frozenset({"ev", "op", "kind"})
_IN_FIELDS = frozenset({"ev", "seq", "op", "rel"})  # an intent's keys a _Change holds itself


def _shared(entry: Any) -> Any:
    """A journal line's object with its keys (and its `ev`, `op`, `kind` words) shared with
    every other line's: each line decoded on its own would hold its own copies, ~0.5 KB
    per change, and an undo holds every change of its run."""
    if not isinstance(entry, dict):
        return entry
    return {_SHARED.setdefault(key, key):
            _SHARED.setdefault(value, value) if key in _WORDS and isinstance(value, str) else value
            for key, value in entry.items()}


def _journal_lines(handle: BinaryIO) -> Iterator[tuple[bytes, bool]]:
    """A journal's lines read a chunk at a time, each with whether a newline ends it.

    Read whole, a gc's journal of a million moves (~360 MB) would be held twice over
    (its bytes and their lines) beside the changes decoded from it."""
    rest = b""
    while chunk := handle.read(JOURNAL_CHUNK):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line, True
    if rest:
        yield rest, False


def _journal_entries(storage: MutableStorage, path: str) -> Iterator[dict[str, Any]]:
    """A journal's lines, decoded one by one; a torn last line (crash while appending: no
    newline ends it) is left out, a damaged line elsewhere is an error."""
    try:
        with storage.open_read(path) as handle:
            for number, (line, ended) in enumerate(_journal_lines(handle), 1):
                if not line.strip():
                    continue
                try:
                    entry = _shared(json.loads(line))
                    entry["ev"]
                except (ValueError, KeyError, TypeError) as exc:
                    if not ended:
                        return  # the crash cut the last line short
                    raise QuarantineError(f"damaged journal {path}, line {number}") from exc
                yield entry
    except StorageError as exc:
        raise QuarantineError(f"cannot read the journal {path}: {exc}") from exc


def _intent_info(entry: dict[str, Any]) -> dict[str, Any]:
    """What an intent line says beyond the `_Change`'s own fields (`ev`, `seq`, `op`,
    `rel`): an undo holds one per change of its run, and a dict of half the keys takes
    about half the memory."""
    return {key: value for key, value in entry.items() if key not in _IN_FIELDS}


def _read_journal(storage: MutableStorage, path: str) -> _Journal:
    """Parse a journal into its changes and what became of each."""
    if storage.stat(path) is None:
        return _Journal([], False, False, None)  # crashed right after creating the run dir
    changes: dict[int, _Change] = {}
    finished = reverted = False
    note: str | None = None
    for entry in _journal_entries(storage, path):
        event = entry["ev"]
        seq: Any = entry.get("seq")  # an int in every line a run writes
        if event == "intent":
            changes[seq] = change = _Change(seq, entry["op"], entry["rel"],
                                            _intent_info(entry))
            if "staged" in entry:  # written ahead: the intent knows the bytes
                change.written = {"sha256": entry.get("sha256"), "size": entry.get("size")}
        elif event == "finish":
            finished = True
            note = entry.get("note")
        elif event == "reverted":
            reverted = True
        elif seq in changes:
            change = changes[seq]
            if event == "done":
                change.done = True
                if len(entry) > 2:  # more than ev and seq (a creation's mtime and inode)
                    change.done_info = entry
            elif event == "failed":
                change.failed = True
            elif event == "written":
                change.written = entry
            elif event == "resolved":
                change.resolved = bool(entry["applied"])
            elif event == "undo-intent":  # again after a "keep": judged anew (finishing)
                change.undo_started = True
                change.undo_done = False
                change.undo_info = entry
            elif event == "undo-done":
                change.undo_done = True
    return _Journal([changes[k] for k in sorted(changes)], finished, reverted, note)


# One encoder for every journal line (json.dumps with separators builds one per call).
_journal_line = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


class _JournalWriter:
    """Appends whole lines only: a line cut short (full disk, crash) is removed before the
    next append, since buried mid-file it would read as damage and block undo and recover."""

    def __init__(self, storage: MutableStorage, path: str) -> None:
        self.path = path
        self.file: AppendFile | None = storage.open_journal(path)
        try:
            self._size = self._drop_torn_tail(self.file)
        except OSError as exc:
            self.close()
            raise StorageError(exc.errno, f"cannot repair the journal {path}: {exc.strerror}",
                               path) from exc

    @staticmethod
    def _drop_torn_tail(file: AppendFile) -> int:
        size = file.size()
        if not size:
            return 0
        tail = file.read_tail(1 << 16)
        if tail.endswith(b"\n"):
            return size
        cut = tail.rfind(b"\n")
        if cut < 0 and size > len(tail):
            return size  # a 64 KiB line: not ours to judge here; the reader will say
        keep = size - len(tail) + cut + 1
        file.truncate(keep)
        return keep

    def write(self, entry: dict[str, Any], sync: bool = True) -> None:
        """Append one line; a full or failing disk is a StorageError (the CLI's one-line stop)."""
        self.write_many([entry], sync=sync)

    def write_many(self, entries: Sequence[dict[str, Any]], sync: bool = False) -> None:
        """Append whole lines with one write (a batch's intents, or its outcomes)."""
        data = b"".join((_journal_line(e) + "\n").encode() for e in entries)
        file = self.file
        if file is None:  # as a write to a closed descriptor said before
            raise StorageError(errno.EBADF, f"cannot write the journal {self.path}: "
                               f"{os.strerror(errno.EBADF)}", self.path)
        try:
            file.append(data, sync=sync)
        except OSError as exc:
            with contextlib.suppress(OSError):  # never leave half a line behind
                file.truncate(self._size)
            raise StorageError(exc.errno, f"cannot write the journal {self.path}: {exc.strerror}",
                               self.path) from exc
        self._size += len(data)

    def sync(self) -> None:
        """The lines written so far durable (the journal's own flush)."""
        self.write_many([], sync=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# --------------------------------------------------------------------------- a run


class _RunFiles:
    """Paths of one run, relative to ROOT (the storage root)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = check_run_id(run_id)
        self.dir = f"{QUARANTINE_DIR}/{run_id}"
        self.journal = f"{self.dir}/{JOURNAL}"
        self.meta = f"{self.dir}/{META}"
        self.payload = f"{self.dir}/{PAYLOAD}"
        self.staging = f"{self.dir}/{STAGING}"

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

    def held_roots(self, storage: MutableStorage) -> list[str]:
        """Every directory of the run holding bytes: payloads and reverted creations."""
        if storage.stat(self.dir) is None:
            return []
        return [f"{self.dir}/{e.name}" for e in storage.list_dir(self.dir)
                if e.kind.value == "dir" and (e.name.startswith(PAYLOAD) or e.name.startswith(UNDONE))]

    def payloads(self, storage: MutableStorage) -> list[str]:
        """The run's payload roots: `v2`, plus `v2~<seq>` for paths moved twice."""
        if storage.stat(self.dir) is None:
            return []
        return [f"{self.dir}/{e.name}" for e in storage.list_dir(self.dir)
                if e.kind.value == "dir" and (e.name == PAYLOAD or e.name.startswith(PAYLOAD + "~"))]


def _write_meta(storage: MutableStorage, files: _RunFiles, meta: dict[str, Any]) -> None:
    storage.replace_file(files.meta, json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n")


def _read_meta(storage: MutableStorage, files: _RunFiles) -> dict[str, Any] | None:
    try:
        meta = json.loads(storage.read_small(files.meta, 1 << 20))
    except StorageError:
        return None
    except ValueError as exc:
        raise QuarantineError(f"damaged {files.meta} (not JSON): inspect it by hand; the "
                              f"run's {JOURNAL} beside it records what the run did") from exc
    return meta if isinstance(meta, dict) else None


def _active(session: MutationSession, *, tree: bool = True, what: str = "a run begins",
            recovered: bool = True) -> MutationSession:
    """`session`, if it is an open mutation session (of the tree unless `tree` is false;
    with `recovered` false, one whose lock is held and whose recovery is under way);
    anything else refuses `what` before anything changes."""
    from regfsck.session import MutationSession

    if not isinstance(session, MutationSession) or (tree and not session.tree) \
            or not (session.active if recovered else session.lock.held):
        raise QuarantineError(f"{what} only inside an open mutation session "
                              "(regfsck.session.mutation_session: root lock held, interrupted "
                              "runs recovered); nothing was changed")
    return session


@dataclass(slots=True)
class _Op:
    """One change of a batch: journaled with the batch, then carried out in order."""

    seq: int
    op: str
    rel: str  # relative to v2
    entry: dict[str, Any]  # the intent line
    source: str  # ROOT-relative: what a move or create renames
    target: str  # ROOT-relative: where it goes (a mkdir/rmdir: the directory)
    happened: bool = False


class Run:
    """One journaled mutation of the tree (see the module docstring).

    Each change is carried out before its method returns, unless it is made inside
    `with run.batch():`; there changes are queued, up to BATCH at a time, and carried out
    by `flush` (when the batch is full, when a change needs the disk as the batch leaves
    it, at the end of the block, or when the run finishes). Either way every intent line
    of a batch, and the bytes of every file it creates (written ahead into the run's
    `new/` directory), are made durable by one flush of the filesystem before the first
    change of the batch; the changes then follow in order. A crash at any point leaves
    intents whose outcome the disk tells (a file is in exactly one of its two places),
    so `recover` reverts or keeps exactly what happened.

    Use as a context manager: leaving it with an exception ends the run by its
    `on_crash` policy ("revert": put everything back; "finish": keep what was done),
    the same policy `recover` applies after a crash. A batch not yet flushed was never
    journaled nor applied: it is dropped."""

    def __init__(self, session: MutationSession, files: _RunFiles, meta: dict[str, Any]) -> None:
        self.session = _active(session)
        self.root = session.root
        self.files = files
        self.meta = meta
        self.storage = session.storage
        self._journal = _JournalWriter(self.storage, files.journal)
        self._seq = 0
        # Every directory of the run's payloads, each made by this object (`begin` made
        # the payload): one that is not in this set does not exist (`_absent_held_dirs`).
        self._held_dirs: set[str] = {files.payload}
        self._held_items: set[str] = set()  # paths of the moved items themselves
        self.moved = self.created = self.dirs_created = self.dirs_removed = 0
        self.closed = False
        self._batch: list[_Op] = []
        # What the queued batch does to v2-relative paths: "dir"/"file" made fresh (empty),
        # or "gone"; `_below` holds every ancestor of those paths (to find descendants).
        self._overlay: dict[str, str] = {}
        self._below: set[str] = set()
        # lstat of v2 directories (v2-relative, "" for v2) read while the batch was queued:
        # nothing on disk changes until its flush, so each is looked at once (a replace
        # asks for its directory twice: the move's parent mtime, the creation's parent).
        self._disk_dirs: dict[str, os.stat_result | None] = {}
        self._staged = 0
        self._broken: str | None = None
        self._batching = 0
        self._bulk_moves = False  # in quarantine_batch: independent moves only

    @property
    def run_id(self) -> str:
        return self.files.run_id

    @property
    def path(self) -> str:
        """The run directory relative to ROOT."""
        return self.files.dir

    # -- lifecycle -----------------------------------------------------------
    @classmethod
    def begin(cls, session: MutationSession, details: dict[str, Any], *,
              on_crash: OnCrash = "revert", command: str | None = None) -> Run:
        """Create the run directory, its meta.json and an empty journal.

        Only inside an open mutation session (regfsck.session): the root lock is held and
        interrupted runs are settled, or no run begins. `command` defaults to the session's.
        Refuses when the quarantine is not on the tree's filesystem: moves must be renames."""
        root = _active(session).root
        command = command or session.command
        storage = session.storage
        files = _RunFiles(new_run_id())
        try:
            if storage.stat(QUARANTINE_DIR) is None:
                storage.make_dir(QUARANTINE_DIR, 0o700)
            storage.make_dir(files.dir, 0o700)
            storage.make_dir(files.payload, 0o700)
            q_dev = storage.lstat_raw(files.dir)
            # (object storage: the run's "directory" does not exist until its first object,
            # and a stat of `v2` there would list the whole tree: no filesystems to compare)
            for part in ("", "blobs", "repositories") if q_dev is not None else ():
                st = storage.lstat_raw("/".join(p for p in (V2_PREFIX, part) if p))
                if st is not None and q_dev is not None and st.st_dev != q_dev.st_dev:
                    raise QuarantineError(
                        f"{root.display}/{QUARANTINE_DIR} is not on the same filesystem as "
                        f"{root.v2 / part}; regfsck only moves files by rename, never copies")
            made = storage.lstat_raw(files.dir)  # the file clock: later writes are not older
            meta = {"run_id": files.run_id, "command": command, "details": details,
                    "started_at": _now_iso(),
                    "started_ns": made.st_mtime_ns if made else None, "status": RUNNING, "on_crash": on_crash,
                    "pid": os.getpid(), "host": socket.gethostname()}
            _write_meta(storage, files, meta)
        except StorageError as exc:
            # A full disk fails here: leave no empty run behind (`runs` would list it as
            # "? unknown 0 changes" for ever).
            with contextlib.suppress(StorageError):
                if storage.stat(files.dir) is not None:
                    storage.remove_tree(files.dir)
            raise QuarantineError(f"cannot start a run in {root.display}/{QUARANTINE_DIR}: {exc}") from exc
        run = cls(session, files, meta)
        try:
            run._journal.write({"ev": "begin", "run_id": files.run_id, "command": command})
        except StorageError as exc:
            run._journal.close()
            with contextlib.suppress(StorageError):  # nothing happened: leave no "running" run
                storage.remove_tree(files.dir)
            raise QuarantineError(f"cannot start a run in {root.display}/{QUARANTINE_DIR}: {exc}") from exc
        return run

    def finish(self, note: str | None = None) -> None:
        """Mark the run complete (every journaled change is in place; undo reverts it).

        The queued batch is carried out first. A run that created files makes every change
        durable (one syncfs) before the journal's last line says so: it no longer fsyncs
        each new file's directory. A run of moves only relies, as before, on the journal's
        fsync, which on ext4 and XFS commits the renames journaled before it (a syncfs
        would also wait for every other writer's data on the filesystem)."""
        if self.closed:
            return
        self.flush()
        if self._staged:
            self.storage.sync_all(self.files.dir)
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
        _drop_staging(self.storage, self.files)

    def abort(self, reason: str) -> list[str]:
        """End a run that failed midway by its on_crash policy; returns what was done.

        The changes still queued were asked for before the failure: a "finish" run carries
        them out and keeps them with the rest, a "revert" run drops them (never journaled,
        never applied: nothing to put back)."""
        if self.closed:
            return []
        if self.meta.get("on_crash") == "finish" and self._broken is None:
            with contextlib.suppress(StorageError, QuarantineError):
                self.flush()  # a failure here leaves intents the disk settles below
        self._forget_batch()
        self.storage.release_dirs()
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

    # -- the batch -----------------------------------------------------------
    def _check_open(self) -> None:
        """Refuse a change once the run is over; else hold the directories the batch
        opens until its flush ends (`MutableStorage.hold_dirs`: a replace reaches each of
        its directories several times, and the batch trusts the disk it read until then)."""
        if self.closed:
            raise QuarantineError(f"run {self.run_id} is already finished")
        if self._broken is not None:
            raise QuarantineError(f"run {self.run_id} stopped: {self._broken}")
        self.storage.hold_dirs()

    def _state(self, rel: str) -> str | None:
        """What the queued batch leaves at `rel`: "dir"/"file" (made by it), "gone", or
        None when the disk tells. Below a path the batch made or moved away nothing of
        the disk's counts: what it made is empty, what it moved took its contents along."""
        state = self._overlay.get(rel)
        if state is not None or not self._overlay or "/" not in rel:
            return state
        return "gone" if _within(_parent_of(rel), self._overlay) else None

    def _mark(self, rel: str, state: str) -> None:
        if state == "gone" and rel in self._below:  # what the batch made inside goes along
            for path in [p for p in self._overlay if p.startswith(rel + "/")]:
                del self._overlay[path]
        self._overlay[rel] = state
        path = rel
        while "/" in path:
            path = path.rpartition("/")[0]
            if path in self._below:
                break
            self._below.add(path)

    def _touches(self, rel: str) -> bool:
        """Does the queued batch change `rel`, something inside it or one of its parents?"""
        return rel in self._below or self._state(rel) is not None

    def _parent_mtime(self, rel: str) -> int | None:
        """The mtime of `rel`'s parent before the batch (what undo puts back)."""
        parent = _parent_of(rel)
        if parent and self._state(parent) is not None:
            return None  # made by this batch: undo removes it again
        # Object storage keeps no directory times to restore (and a directory's stat there
        # is a listing of everything below it): nothing to note.
        st = None if self.storage.implicit_dirs else self._disk_dir(parent)
        return st.st_mtime_ns if st is not None else None

    def _disk_dir(self, dir_rel: str) -> os.stat_result | None:
        """lstat of v2 directory `dir_rel` ("" for v2) as the disk shows it before the
        queued batch (asked once per batch: `_disk_dirs`)."""
        if dir_rel not in self._disk_dirs:
            self._disk_dirs[dir_rel] = self.storage.lstat_raw(
                _v2(dir_rel) if dir_rel else V2_PREFIX)
        return self._disk_dirs[dir_rel]

    def _queue(self, op: str, rel: str, source: str, target: str, **info: Any) -> _Op:
        self._seq += 1
        entry = {"ev": "intent", "seq": self._seq, "op": op, "rel": rel,
                 "parent_mtime_ns": self._parent_mtime(rel), **info}
        item = _Op(self._seq, op, rel, entry, source, target)
        self._batch.append(item)
        return item

    def _full(self) -> None:
        # Where a crash can leave a move half done (object storage: copy, then delete),
        # two open changes on one path (a replace) could not be told apart: there every
        # change is its own batch, except quarantine_batch's moves of distinct paths (each
        # settled from the bucket on its own; the backend moves them all at once).
        if not self._batching or len(self._batch) >= BATCH or (
                not self.storage.atomic_moves and not self._bulk_moves):
            self.flush()

    @contextlib.contextmanager
    def batch(self) -> Iterator[Run]:
        """Queue the changes made inside the block (see the class docstring) and carry out
        the rest at its end. Between two changes the disk may not show the earlier ones
        yet: a caller that looks at the tree first calls `settle` with the paths it reads.
        Leaving by an exception leaves the queue to `abort` (the run's exit)."""
        self._batching += 1
        try:
            yield self
        finally:
            self._batching -= 1
        if not self._batching:
            self.flush()

    def _forget_batch(self) -> None:
        self._batch = []
        self._overlay.clear()
        self._below.clear()
        self._disk_dirs.clear()

    def settle(self, *rels: str) -> None:
        """Carry out the queued batch if it changes any of `rels` (v2-relative), so that
        the disk shows them as the run leaves them: for callers that look before they act."""
        if self._batch and any(self._touches(rel) for rel in rels):
            self.flush()

    def flush(self) -> None:
        """Journal the queued batch, make it durable with one flush, then carry it out.

        A change that fails stops the batch: the changes before it are journaled done,
        those after it failed, and the run refuses further changes (the caller's exit
        ends it by its on_crash policy). A change interrupted otherwise (Ctrl-C) gets no
        line at all: the disk tells whether it happened."""
        self._check_open()
        try:
            self._flush()
        finally:
            self.storage.release_dirs()

    def _flush(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._forget_batch()
        staged = [item.source for item in batch if item.op == "create"]
        try:
            self._journal.write_many([item.entry for item in batch], sync=False)
            # Their bytes, and the intent lines with them, durable at once: where the whole
            # filesystem was flushed (the journal is on it: `begin` checks), the journal's
            # own fsync would only ask the disk for one more cache flush per batch.
            if not (staged and self.storage.sync_all(self.files.dir)):
                self._journal.sync()
        except BaseException as exc:
            self._broken = f"cannot write the journal: {exc}"
            raise
        if self.storage.batch_moves and all(item.op == "move" for item in batch):
            # Object storage: the whole batch at once (copies in parallel, one bulk delete).
            # A failure leaves no lines: `recover` settles each move from the bucket.
            try:
                self.storage.move_many([(item.source, item.target) for item in batch])
            except BaseException as exc:
                self._broken = str(exc)[:300] or type(exc).__name__
                raise
            self.moved += len(batch)
            for item in batch:
                item.happened = True
            self._journal.write_many([{"ev": "done", "seq": item.seq} for item in batch])
            return
        lines: list[dict[str, Any]] = []
        owners: dict[tuple[str, bool], tuple[int, int, int | None]] = {}
        finished = 0  # items of the batch settled so far
        try:
            for item in batch:
                try:
                    self._apply(item, owners)
                except StorageError:
                    if item.op != "rmdir" or item.happened:
                        raise
                    lines.append({"ev": "failed", "seq": item.seq})  # not empty after all
                else:
                    lines.append({"ev": "done", "seq": item.seq})
                finished += 1
        except BaseException as exc:
            index = finished
            item = batch[index]
            if item.happened:
                lines.append({"ev": "done", "seq": item.seq})
            elif isinstance(exc, StorageError):
                lines.append({"ev": "failed", "seq": item.seq})
            lines.extend({"ev": "failed", "seq": later.seq} for later in batch[index + 1:])
            self._broken = str(exc)[:300] or type(exc).__name__
            with contextlib.suppress(StorageError):
                self._journal.write_many(lines, sync=False)
            raise
        self._journal.write_many(lines, sync=False)

    def _owner(self, directory: str, is_dir: bool,
               owners: dict[tuple[str, bool], tuple[int, int, int | None]]) -> tuple[int, int, int]:
        """(uid, gid, mode) for a new entry in `directory` (cached for the batch: what the
        batch adds there gets exactly this, so asking again would find the same)."""
        key = (directory, is_dir)
        if key not in owners:
            owners[key] = self.storage.neighbours(directory, directory=is_dir)
        uid, gid, mode = owners[key]
        return uid, gid, (DIR_MODE if is_dir else FILE_MODE) if mode is None else mode

    def _apply(self, item: _Op, owners: dict[tuple[str, bool], tuple[int, int, int | None]]) -> None:
        if item.op == "move":
            self.storage.move(item.source, item.target)
            item.happened = True
            self.moved += 1
        elif item.op == "create":
            uid, gid, mode = self._owner(_parent_of(item.target), False, owners)
            self.storage.adopt(item.source, (uid, gid), mode)
            self.storage.move(item.source, item.target)
            item.happened = True
            self.created += 1
        elif item.op == "mkdir":
            uid, gid, mode = self._owner(_parent_of(item.target), True, owners)
            self.storage.make_dir(item.target)
            item.happened = True
            self.dirs_created += 1
            self.storage.adopt(item.target, (uid, gid), mode)
            # In a directory the batch made there is only what the batch puts in it: its
            # neighbours are the owner just given and no mode of a sibling yet.
            owners.setdefault((item.target, False), (uid, gid, None))
            owners.setdefault((item.target, True), (uid, gid, None))
        elif item.op == "rmdir":
            self.storage.remove_empty_dir(item.target)
            item.happened = True
            self.dirs_removed += 1

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
            if any(p in self._held_items for p in prefixes) or held in self._held_dirs:
                continue
            to_make = self._absent_held_dirs(prefixes[:-1])
            # Below a directory about to be made nothing is there yet: only a path whose
            # parent exists needs a look (link rewrites: each in a directory of its own).
            if not to_make and self.storage.lstat_raw(held):
                continue
            if payload not in self._held_dirs:
                self.storage.make_dir(payload, 0o700)
                self._held_dirs.add(payload)
            for path in to_make:
                self.storage.make_dir(path, 0o700)
                self._held_dirs.add(path)
            self._held_items.add(held)  # reserved: later moves must not nest in it
            return held
        raise QuarantineError(f"no free quarantine path for {rel}")  # unreachable: seq is new

    def _absent_held_dirs(self, dirs: list[str]) -> list[str]:
        """The quarantine directories of `dirs` (outermost first) to make: from the first
        one this run has not made. Nothing else makes directories in its payloads (a
        directory moved there is a held item, never entered), so no look at the disk is
        needed (a link rewrite's own directory: one lstat less per link). Object storage
        has none (they come with the objects moved below them)."""
        if self.storage.implicit_dirs:
            return []
        for depth, path in enumerate(dirs):
            if path not in self._held_dirs:
                return dirs[depth:]
        return []

    # -- changes -------------------------------------------------------------
    def _queue_move(self, rel: str) -> None:
        self._check_open()
        source = _v2(rel)
        state = self._state(rel)
        if state == "gone":
            raise QuarantineError(f"cannot quarantine {rel}: it does not exist")
        if state is not None or rel in self._below:
            self.flush()  # made by the batch, or holding what it made: move it as it will be
        st = self.storage.lstat_raw(source)
        if st is None:
            raise QuarantineError(f"cannot quarantine {rel}: it does not exist")
        held = self._held_path(rel)
        kind = "dir" if stat_module.S_ISDIR(st.st_mode) else "file"
        self._queue("move", rel, source, held, kind=kind,
                    size=st.st_size if kind == "file" else None, held=held)
        self._mark(rel, "gone")

    def quarantine(self, rel: str) -> None:
        """Move a file or directory (relative to v2) into the run's quarantine (queued:
        see the class docstring; journaled before it happens)."""
        self._queue_move(rel)
        self._full()

    def quarantine_batch(self, rels: Sequence[str]) -> None:
        """`quarantine` for many paths, carried out now (one journal fsync per BATCH).

        All intent lines are written and synced before the first move, so the journal
        still announces every move before it happens; a crash in the middle leaves some
        moves done and some not, which `recover` tells apart from the disk."""
        self._bulk_moves = True
        try:
            with self.batch():
                for rel in rels:
                    self._queue_move(rel)
                    self._full()
        finally:
            self._bulk_moves = False

    def _missing_parents(self, rel: str) -> list[str]:
        """The directories (v2-relative, outermost first) to make before `rel` can be created."""
        parts = check_relative(rel)[:-1]
        missing: list[str] = []
        for depth in range(len(parts), 0, -1):
            dir_rel = "/".join(parts[:depth])
            state = self._state(dir_rel)
            if state is None:
                st = self._disk_dir(dir_rel)
                state = "gone" if st is None else "dir" if stat_module.S_ISDIR(st.st_mode) else "file"
            if state == "gone":
                missing.append(dir_rel)
                continue
            if state != "dir":
                raise QuarantineError(f"cannot create {rel}: {dir_rel} is not a directory "
                                      "(a file or a symbolic link)")
            break
        missing.reverse()
        return missing

    def _stage(self, data: bytes | BinaryIO | Iterable[bytes]) -> tuple[str, str, int]:
        """Write the bytes of a new file into the run's `new/` directory (no fsync: the
        batch's one flush makes them durable); (path, sha256 hex, size).

        Chunks proven to be a sha256 blob (`hashing.ProvenChunks`: they raise at their end
        otherwise, and the write with them) are not hashed again: their digest is the
        sha256 the intent records."""
        if not self._staged and self.storage.lstat_raw(self.files.staging) is None:
            self.storage.make_dir(self.files.staging, 0o700)
        self._staged += 1
        path = f"{self.files.staging}/{self._staged}"
        hasher = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            for chunk in _chunks(data):
                hasher.update(chunk)
                yield chunk

        known: str | None = None
        chunks: Iterable[bytes] = hashed()
        if isinstance(data, ProvenChunks) and data.digest.startswith("sha256:"):
            known, chunks = data.digest.removeprefix("sha256:"), data
        try:
            size = self.storage.write_new_file(path, chunks, sync=False)
        except BaseException:
            with contextlib.suppress(StorageError):
                if self.storage.lstat_raw(path) is not None:
                    self.storage.remove_file(path)
            raise
        return path, known if known is not None else hasher.hexdigest(), size

    def create_file(self, rel: str, data: bytes | BinaryIO | Iterable[bytes]) -> str:
        """Create a new file (queued; refuses if it exists); returns the sha256 digest of
        what will be there.

        `data` may be bytes, a binary file or an iterable of chunks (streamed, so blobs of
        any size need bounded memory); it is read and written (to the run's `new/`) now:
        a stream that fails (a digest that does not match) changes nothing. The file, and
        every directory made for it, gets the owner and group of the directory it lands in
        and the mode of its neighbours (a sibling's, else the registry's 0644/0755): a
        registry running as the tree's owner must read what root wrote, whatever root's
        umask. The file keeps the inode and mtime it is written with (renamed into place),
        which the intent records: an undo tells a later rewrite from ours by them."""
        self._check_open()
        target = _v2(rel)
        state = self._state(rel)
        parents = self._missing_parents(rel)  # a path whose directory is missing is free
        if state in ("dir", "file") or (state is None and not parents
                                         and self.storage.lstat_raw(target) is not None):
            raise QuarantineError(f"refusing to create {rel}: it already exists")
        staged, sha256, size = self._stage(data)
        st = self.storage.lstat_raw(staged)
        for dir_rel in parents:
            self._queue("mkdir", dir_rel, "", _v2(dir_rel))
            self._mark(dir_rel, "dir")
        self._queue("create", rel, staged, target, staged=staged, sha256=sha256, size=size,
                    mtime_ns=st.st_mtime_ns if st else None, ino=st.st_ino if st else None)
        self._mark(rel, "file")
        self._full()
        return f"sha256:{sha256}"

    def replace_file(self, rel: str, data: bytes | BinaryIO | Iterable[bytes]) -> str:
        """Quarantine the existing file, then create the new one in its place.

        Its mode comes from its neighbours, not from the file replaced: a damaged file's
        mode (chmod 000) is part of the damage."""
        self.quarantine(rel)
        return self.create_file(rel, data)

    def remove_empty_dirs(self, rel_dirs: Iterable[str]) -> list[str]:
        """Remove the directories that are empty (deepest first); undo recreates them.

        Directories that are missing or not empty are skipped; returns those removed."""
        self.flush()
        with self.batch():
            queued = self._queue_rmdirs(rel_dirs)
        return [item.rel for item in queued if item.happened]

    def _queue_rmdirs(self, rel_dirs: Iterable[str]) -> list[_Op]:
        queued: list[_Op] = []
        for rel in sorted(set(rel_dirs), key=lambda r: (-len(check_relative(r)), r)):
            path = _v2(rel)
            if self._state(rel) == "gone":
                continue
            st = self.storage.lstat_raw(path)
            if st is None or not stat_module.S_ISDIR(st.st_mode) or any(
                    self._state(f"{rel}/{e.name}") != "gone" for e in self.storage.list_dir(path)):
                continue
            queued.append(self._queue("rmdir", rel, "", path, mtime_ns=st.st_mtime_ns,
                                      mode=st.st_mode, uid=st.st_uid, gid=st.st_gid))
            self._mark(rel, "gone")
            self._full()
        return queued


def _drop_staging(storage: MutableStorage, files: _RunFiles) -> None:
    """Delete what a run wrote ahead and never put in the tree (its own copies, never part
    of the tree: an interrupted batch, or creations a revert found not applied)."""
    with contextlib.suppress(StorageError):
        # On object storage an emptied `new/` does not exist, yet a run killed while writing
        # a large object ahead may have left its multipart upload open there: remove_tree
        # aborts those too.
        if storage.implicit_dirs or storage.lstat_raw(files.staging) is not None:
            storage.remove_tree(files.staging)


# --------------------------------------------------------------------------- undo / recover


class _Reverter:
    """Puts one run back, change by change in reverse order, journaling as it goes."""

    def __init__(self, root: RegistryRoot, storage: MutableStorage, files: _RunFiles,
                 dry_run: bool = False) -> None:
        self.root = root
        self.storage = storage
        self.files = files
        self.dry_run = dry_run  # planning only: not even our own leftover temp files go
        self._outcome: dict[int, bool] = {}  # changes the journal leaves open, settled by `learn`
        self._settled_away: set[str] = set()  # dry run: what settling an undo's move would empty
        self._quarantine_dirs: set[str] = set()  # directories of the undone/ tree known there
        self._undone_bases: dict[str, bool] = {}  # planning: does `undone/` (or `undone~N/`) exist?

    def exists(self, path: str) -> bool:
        if self._settled_away and self._emptied(path):
            return False
        return self.storage.lstat_raw(path) is not None

    def _emptied(self, path: str) -> bool:
        return _within(path, self._settled_away)

    def learn(self, journal: _Journal) -> None:
        """Settle from the disk every change the journal leaves open (a crash came first).

        A run carries out its changes strictly in order and stops at the first that does
        not happen, so the open changes that happened are a prefix of them: each is asked
        of the disk in order until one did not happen, and none after it did. This also
        settles what the disk alone cannot: a directory made where the same batch moved
        the old one away exists either way, but only counts once everything before it
        happened."""
        self._outcome = {}
        stopped = False
        for change in journal.changes:
            if change.applied_by_journal is not None:
                continue
            state = False if stopped else self._on_disk(change)
            self._outcome[change.seq] = state
            # Object storage moves a batch's paths all at once (in parallel), not in order:
            # there each is settled on its own (one change per batch holds anything else).
            stopped = (stopped or not state) and self.storage.atomic_moves

    def forward_applied(self, change: _Change) -> bool:
        """Did this change reach the disk? Asked of the disk when the journal cannot tell."""
        known = change.applied_by_journal
        if known is None:
            known = self._outcome.get(change.seq)
        if change.op == "create" and "tmp" in change.info:
            return self._tmp_create_applied(change, known)
        return self._on_disk(change) if known is None else known

    def _on_disk(self, change: _Change) -> bool:
        original = _v2(change.rel)
        if change.op == "move":
            held = self.files.held_of(change)
            if not self.dry_run:  # object storage: a copy made, its source not yet deleted
                self.storage.settle_move(original, held)
            # Its quarantine path was free when the move was journaled and only this move
            # fills it: there, the move happened (whatever a later change put in its place).
            if self.exists(held):
                return True
            if self.exists(original):
                return False
            raise UndoConflictError(
                f"run {self.files.run_id}: {change.rel} is in neither the tree nor the "
                f"quarantine; resolve it by hand ({held})")
        if change.op == "mkdir":
            return self.exists(original)
        if change.op == "rmdir":
            return not self.exists(original)
        if "tmp" in change.info:
            return self._tmp_create_applied(change, None)
        # Written ahead into the run's `new/` and durable before the intent: the rename
        # into the tree takes it from there, so it is in exactly one of the two places.
        staged = change.info.get("staged")
        if not isinstance(staged, str) or not staged.startswith(self.files.staging + "/"):
            raise QuarantineError(f"damaged journal in {self.files.dir}: bad staged path")
        check_relative(staged)
        if not self.dry_run:  # object storage: copied into the tree, not yet deleted
            self.storage.settle_move(staged, original)
        return not self.exists(staged)

    def _tmp_create_applied(self, change: _Change, known: bool | None) -> bool:
        """A creation journaled by an older regfsck: temp file beside its target."""
        original = _v2(change.rel)
        tmp = _v2(change.info["tmp"])
        if self.exists(tmp):
            # Ours (the name carries the run id) and never renamed: the change did not happen.
            if not self.dry_run:
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

    def _same_content(self, held: str, original: str) -> bool:
        """Is what now sits at `original` the very content the quarantine holds at `held`?

        (a blob gc moved away and a push wrote again, byte for byte): then nothing needs to
        come back and the quarantined copy simply stays."""
        a, b = self.storage.lstat_raw(held), self.storage.lstat_raw(original)
        if a is None or b is None:
            return False
        if stat_module.S_ISREG(a.st_mode) and stat_module.S_ISREG(b.st_mode):
            return a.st_size == b.st_size and self._file_sha256(held) == self._file_sha256(original)
        if stat_module.S_ISDIR(a.st_mode) and stat_module.S_ISDIR(b.st_mode):
            names = [e.name for e in self.storage.list_dir(held)]
            if names != [e.name for e in self.storage.list_dir(original)]:
                return False
            return all(self._same_content(f"{held}/{n}", f"{original}/{n}") for n in names)
        return False

    def _created_changed(self, change: _Change, original: str) -> str | None:
        """Why the file a `create` made is no longer the run's (None: it is, untouched)."""
        st = self.storage.lstat_raw(original)
        if st is None or not stat_module.S_ISREG(st.st_mode):
            return "replaced since by something that is not a file"
        done = change.done_info or {}
        if "staged" in change.info:  # the intent recorded the file's inode and mtime
            done = change.info
        # Where a move is a copy (object storage), the object in the tree got the server's
        # time when it was copied there, which no intent can know: the staged object's time
        # says nothing about it, and its identity is its content (checked below).
        if "staged" in change.info and not self.storage.atomic_moves:
            done = {}
        if done.get("mtime_ns") is not None and (
                int(done["mtime_ns"]) != st.st_mtime_ns or int(done.get("ino", st.st_ino)) != st.st_ino):
            return "written again since the run (a push or another tool)"
        expected = (change.written or {}).get("sha256")
        if expected is not None and (st.st_size != (change.written or {}).get("size", st.st_size)
                                     or self._file_sha256(original) != expected):
            return "its content changed since the run"
        return None

    def _prefetch(self, paths: Iterable[str]) -> dict[str, bool]:
        """Existence of many paths at once: each distinct directory is checked once the
        careful way (no symlink on the way, see `lstat_raw`) and its entries are then
        lstat'ed relative to it; a plan over a million moves asks the disk a few thousand
        times instead of walking every path component by component."""
        by_dir: dict[str, list[str]] = {}
        for path in dict.fromkeys(paths):
            by_dir.setdefault(path.rpartition("/")[0], []).append(path)
        known: dict[str, bool] = {}
        for directory, inside in by_dir.items():
            st = self.storage.lstat_raw(directory) if directory else None
            if st is None or not stat_module.S_ISDIR(st.st_mode):
                continue  # absent, or not a plain directory: asked one by one
            try:
                results = self.storage.lstat_many(
                    directory, [path[len(directory) + 1:] for path in inside])
            except StorageError:
                continue
            for path, result in zip(inside, results, strict=True):
                if not isinstance(result, StorageError):
                    known[path] = result is not None  # the caller's string: no copy per path
        return known

    def _undone_path(self, change: _Change, reserved: _PathClaims) -> str:
        """Where a reverted creation goes: `<run>/undone/<rel>` (another root if taken,
        by an earlier undo or by another step of this plan)."""
        for base in (f"{self.files.dir}/{UNDONE}", f"{self.files.dir}/{UNDONE}~{change.seq}"):
            held = self.files.held(change.rel, base)
            if reserved.collides(held):
                continue
            if base not in self._undone_bases:  # below a base not there, nothing is: one look
                self._undone_bases[base] = self.storage.lstat_raw(base) is not None
            if not self._undone_bases[base] or self.storage.lstat_raw(held) is None:
                reserved.claim(held)
                return held
        raise QuarantineError(f"no free quarantine path for {change.rel}")

    def plan(self, journal: _Journal, since_ns: int, others: _OtherRuns,
             taken: Collection[str] = ()) -> UndoPlan:
        """Judge every reverse step against the tree as it is now, before anything moves.

        Two passes: the first finds the creations that are still exactly the run's (the
        candidates to move away); the tree as it would be after the undo is then built in
        memory, and a candidate that a root written since the run still uses is kept; the
        second pass simulates every step in reverse order with those decisions (parents
        present, directories empty, paths free) and checks that no tag the undo brings
        back would lack a part (naming the newer run that holds it)."""
        self.learn(journal)
        # What an earlier undo left as it found it is judged again (`_finish_kept_undos`):
        # a creation kept (used by, or holding, what a later run wrote) goes once nothing
        # needs it; a path found back in place ("already_there": a later run wrote it
        # again) comes back from the quarantine once that run's undo took it (`taken`),
        # never when anyone else removed it since.
        pending = [c for c in reversed(journal.changes) if not c.undo_done
                   or (step := c.undo_info.get("step")) == "keep"
                   or (step == "already_there" and c.rel in taken)]
        applied: list[_Change] = []
        steps: list[UndoStep] = []
        for change in pending:
            if change.undo_done:
                applied.append(change)  # kept: applied, and nothing of its undo to settle
                continue
            if change.undo_started:
                self._settle_reverse(change)
            if change.undo_started and self._already_reverted(change):
                steps.append(UndoStep(change.seq, "settle", change.rel))
            elif not self.forward_applied(change):
                steps.append(UndoStep(change.seq, "skip", change.rel))
            else:
                applied.append(change)
        changed: dict[int, str] = {}
        candidates: list[str] = []
        last_move: dict[str, int] = {}  # path -> the last seq that moved it
        # path -> every seq that moved it; only a run that also created something needs it
        # (`taken_by_itself`): a gc's undo of a million moves does not hold it.
        creates = any(c.op == "create" for c in applied)
        moves_of: dict[str, list[int]] = {}
        for c in journal.changes if creates else ():
            if c.op == "move":
                moves_of.setdefault(c.rel, []).append(c.seq)
        for c in applied:
            if c.op == "move":
                last_move[c.rel] = max(c.seq, last_move.get(c.rel, 0))
        for change in applied:
            if change.op != "create":
                continue
            if last_move and any(last_move.get(p, 0) > change.seq
                                 for p in _self_and_parents(change.rel)):
                continue  # moved away later by the run itself: it comes back as the run's own
            if self.exists(_v2(change.rel)):
                why = self._created_changed(change, _v2(change.rel))
                if why is None:
                    candidates.append(change.rel)
                else:
                    changed[change.seq] = why
        payloads = self.files.payloads(self.storage)
        view = build_view(self.root, candidates, payloads)
        used = used_now(self.root, view, since_ns)

        originals = [_v2(c.rel) for c in applied]  # one string per path, shared by the maps
        known = self._prefetch(p for c, original in zip(applied, originals, strict=True)
                               for p in (original, _parent_of(original),
                                         *((self.files.held_of(c),) if c.op == "move" else ())))

        def on_disk(path: str) -> bool:
            if self._settled_away and self._emptied(path):
                return False
            found = known.get(path)
            return self.exists(path) if found is None else found

        present: dict[str, bool] = {}
        children: dict[str, set[str]] = {}
        mounts: dict[str, str] = {}  # original -> held, of directories moved back
        back: set[int] = {c.seq for c in journal.changes  # moves put back by an earlier undo
                          if c.undo_done and c.undo_info.get("step") == "move_back"} \
            if moves_of else set()
        problems: list[str] = []
        blockers: set[str] = set()
        reserved = _PathClaims()

        def exists(path: str) -> bool:
            if path in present:
                return present[path]
            ancestor = path
            while "/" in ancestor:
                ancestor = ancestor.rpartition("/")[0]
                if not present.get(ancestor, True) and ancestor.startswith(V2_PREFIX):
                    return False  # a directory the plan removes takes its contents along
                if ancestor in mounts:
                    return exists(mounts[ancestor] + path[len(ancestor):])
            return on_disk(path)

        def set_present(path: str, value: bool) -> None:
            present[path] = value
            children.setdefault(_parent_of(path), set()).add(path)

        def forget_below(path: str) -> None:
            """A directory moved back brings its own contents: what the plan noted below
            that path before (earlier steps, later changes) was about other contents."""
            stack = list(children.pop(path, ()))
            while stack:
                below = stack.pop()
                present.pop(below, None)
                mounts.pop(below, None)
                stack.extend(children.pop(below, ()))

        def taken_by_itself(change: _Change) -> bool:
            """Did the run move this creation away later (it, or a directory above it),
            and did that move's undo not put it back (the same content was found in place:
            what is there now is not the run's)?"""
            if not moves_of:  # an import or a repair of nothing but creations
                return False
            later = [seq for p in _self_and_parents(change.rel) for seq in moves_of.get(p, ())
                     if seq > change.seq]
            return bool(later) and min(later) not in back

        def empty_after(path: str) -> bool:
            names = {f"{path}/{e.name}" for e in self.storage.list_dir(path)} \
                if self.exists(path) else set()
            names |= {p for p in children.get(path, ()) if present[p]}
            return not any(exists(n) for n in names)

        def blocked(path: str, what: str) -> None:
            holder = others.holder(path)
            if holder is not None:
                blockers.add(holder)
                problems.append(f"{what} (run {holder} changed it: undo that run first)")
            else:
                problems.append(what)

        # Object storage: a directory is only what the keys below imply; moving a key back
        # brings its parents back with it, so a vanished parent is no obstacle.
        implicit_dirs = self.storage.implicit_dirs
        for change, original in zip(applied, originals, strict=True):
            parent = _parent_of(original)
            if change.op == "move":
                held = self.files.held_of(change)
                if not exists(held):
                    problems.append(f"{change.rel}: its quarantined copy is gone")
                elif exists(original):
                    if original not in present and self._same_content(held, original):
                        steps.append(UndoStep(change.seq, "already_there", change.rel,
                                              _BACK_IN_PLACE, held))
                    else:
                        blocked(change.rel, f"{change.rel}: something new exists at that path")
                elif not implicit_dirs and not exists(parent):
                    blocked(parent.removeprefix(V2_PREFIX + "/"),
                            f"{change.rel}: its parent directory is gone")
                elif others.newer_holder(change.rel):
                    # A later run made this path again and moved it away, or moved away
                    # what stood there since: its undo puts that back here, and must find
                    # the path free.
                    blocked(change.rel, f"{change.rel}: a later run moved what was there since")
                else:
                    steps.append(UndoStep(change.seq, "move_back", change.rel, held=held))
                    forget_below(original)
                    set_present(original, True)
                    present[held] = False
                    mounts[original] = held
                    if moves_of:
                        back.add(change.seq)
            elif change.op in ("create", "mkdir") and others.newer_holder(change.rel):
                # A later run moved what this one made (or what holds it) into its own
                # quarantine, or wrote over it: that run's undo puts it back, and must find
                # it as it left it. Taking it now would leave this run's files behind for
                # good (they come back with the later undo) or that undo without a parent.
                blocked(change.rel, f"{change.rel}: a later run changed what this run made")
            elif change.op == "create":
                if not exists(original):
                    steps.append(UndoStep(change.seq, "skip", change.rel, "already gone"))
                elif taken_by_itself(change):
                    steps.append(UndoStep(change.seq, "skip", change.rel, "what is there is not "
                                          "the run's: its own copy stays in its quarantine"))
                elif change.seq in changed:
                    steps.append(UndoStep(change.seq, "keep", change.rel, changed[change.seq]))
                elif change.rel in used:
                    steps.append(UndoStep(change.seq, "keep", change.rel,
                                          _USED))
                else:
                    steps.append(UndoStep(change.seq, "unmake", change.rel,
                                          held=self._undone_path(change, reserved)))
                    set_present(original, False)
            elif change.op == "mkdir":
                st = self.storage.lstat_raw(original) if original not in present else None
                if not exists(original):
                    steps.append(UndoStep(change.seq, "skip", change.rel, "already gone"))
                elif st is not None and not stat_module.S_ISDIR(st.st_mode):
                    steps.append(UndoStep(change.seq, "keep", change.rel, "not a directory now"))
                elif not empty_after(original):
                    steps.append(UndoStep(change.seq, "keep", change.rel,
                                          _HOLDS))
                elif (inside := others.newer_inside(change.rel)) is not None:
                    # Emptied by a later run that moved things out of it: that run's undo
                    # puts them back here. Kept, and taken once that run is undone.
                    steps.append(UndoStep(change.seq, "keep", change.rel,
                                          f"run {inside} {_EMPTIED_BY}"))
                else:
                    steps.append(UndoStep(change.seq, "rmdir", change.rel))
                    set_present(original, False)
            elif change.op == "rmdir":
                if exists(original):
                    st = self.storage.lstat_raw(original) if original not in present else None
                    if st is not None and not stat_module.S_ISDIR(st.st_mode):
                        blocked(change.rel, f"{change.rel}: a file sits where the directory was")
                    else:
                        steps.append(UndoStep(change.seq, "already_there", change.rel,
                                              _DIR_AGAIN))
                elif not implicit_dirs and not exists(parent):
                    blocked(parent.removeprefix(V2_PREFIX + "/"),
                            f"{change.rel}: its parent directory is gone")
                else:
                    steps.append(UndoStep(change.seq, "remake_dir", change.rel))
                    set_present(original, True)
        warnings: list[str] = []
        for repo, tag, target in view.restored_tags:
            missing = missing_parts(view, repo, target)
            # Only a newer run can have taken what the tag had when this run moved it;
            # a part an older run holds was missing already (the tag comes back as it was).
            holders = sorted({h for m in missing for h in others.holders(m) if h > self.files.run_id})
            if holders:
                blockers.update(holders)
                problems.append(f"tag {repo}:{tag} would come back without "
                                f"{len(missing)} of its parts, held by run {', '.join(holders)}")
            elif missing:
                warnings.append(f"tag {repo}:{tag} comes back as it was, not whole "
                                f"({missing[0]} is missing and no run holds it)")
        order = {c.seq: n for n, c in enumerate(pending)}
        steps.sort(key=lambda step: order[step.seq])
        return UndoPlan(self.files.run_id, tuple(steps), tuple(problems),
                        tuple(sorted(blockers)), tuple(warnings))

    def execute(self, plan: UndoPlan, journal: _Journal, result: UndoResult,
                writer: _JournalWriter) -> None:
        """Carry out a plan, newest change first, in batches of one journal fsync.

        Each batch's undo-intent lines (with the step chosen) are on disk before any of
        its steps; after a crash the next plan settles a step with an intent but no
        undo-done line from the disk."""
        by_seq = {c.seq: c for c in journal.changes}
        for start in range(0, len(plan.steps), UNDO_BATCH):
            batch = plan.steps[start:start + UNDO_BATCH]
            for number, step in enumerate(batch):
                entry: dict[str, Any] = {"ev": "undo-intent", "seq": step.seq, "step": step.action}
                if step.action == "unmake":
                    entry["held"] = step.held
                writer.write(entry, sync=number == len(batch) - 1)
            self.storage.hold_dirs()  # (a step reaches its directories more than once)
            try:
                for step in batch:
                    self._do_step(step, by_seq[step.seq], result)
                    writer.write({"ev": "undo-done", "seq": step.seq}, sync=False)
            finally:
                self.storage.release_dirs()

    def _do_step(self, step: UndoStep, change: _Change, result: UndoResult) -> None:
        original = _v2(change.rel)
        if step.action == "move_back" and step.held is not None:
            self.storage.move(step.held, original)
            result.moved_back += 1
        elif step.action == "unmake" and step.held is not None:
            self._make_quarantine_parents(step.held)
            self.storage.move(original, step.held)
            result.files_removed += 1
        elif step.action == "rmdir":
            self.storage.remove_empty_dir(original)
            result.dirs_removed += 1
        elif step.action == "remake_dir":
            self.storage.make_dir(original)
            result.dirs_recreated += 1
        elif step.action == "skip":
            result.skipped += 1
            return
        elif step.action in ("keep", "already_there"):
            result.kept.append(f"{change.rel}: {step.why}")
            return
        self._restore_times(change)

    def _make_quarantine_parents(self, held: str) -> None:
        """Make the directories above `held` inside the run's directory: those known there
        are not looked at again, and below the first absent one none can exist (an undo
        of an import moves tens of thousands of files there: one look each, not seven)."""
        parts = held.split("/")
        dirs = ["/".join(parts[:depth])
                for depth in range(len(self.files.dir.split("/")) + 1, len(parts))]
        for path in _absent_dirs(dirs, self._quarantine_dirs,
                                 lambda path: self.storage.lstat_raw(path) is not None):
            self.storage.make_dir(path, 0o700)
            self._quarantine_dirs.add(path)

    def _settle_reverse(self, change: _Change) -> None:
        """An undo killed inside one of its moves: settle that move as the recovery settles
        a run's own (`settle_move`), before anything is judged.

        Where a move is a copy then a delete (object storage), a step journaled
        (undo-intent) without its undo-done may have left its object in both places, or a
        part of a directory's keys copied, or a part of its sources deleted: judged as is,
        the copy in the tree reads as "something new exists at that path" and every later
        undo refuses, with half a tag back in the tree. Settled, it is in exactly one
        place again (copies without a deleted source go: the move had not happened;
        deletes begun are finished) and the plan goes on from there. A filesystem rename
        leaves nothing to settle. A dry run changes nothing: it plans as if settled (the
        place the settle would empty reads as absent), so it shows what the undo will do."""
        step, held = change.undo_info.get("step"), change.undo_info.get("held")
        move: tuple[str, str] | None = None
        if change.op == "move" and step == "move_back":
            move = (self.files.held_of(change), _v2(change.rel))
        elif change.op == "create" and step == "unmake" and isinstance(held, str) \
                and held.startswith(self.files.dir + "/"):
            check_relative(held)
            move = (_v2(change.rel), held)
        if move is None or self.storage.atomic_moves:
            return
        if self.dry_run:
            source, dest = self._keys(move[0]), self._keys(move[1])
            if source and dest:  # as `settle_move` decides (copies not yet complete go)
                self._settled_away.add(move[1] if dest <= source else move[0])
            return
        try:
            self.storage.settle_move(*move)
        except StorageError as exc:
            if exc.errno != errno.EEXIST:
                raise
            # Something not a copy was written at the tree's path since: left as it is, the
            # plan refuses that step ("something new exists at that path"), so a recovery
            # reports it and does not wedge every later command.

    def _keys(self, path: str) -> set[str]:
        """The files at or below `path`, relative to it ("" for `path` itself)."""
        st = self.storage.lstat_raw(path)
        if st is None:
            return set()
        if not stat_module.S_ISDIR(st.st_mode):
            return {""}
        return {f"/{e.name}{rest}" for e in self.storage.list_dir(path)
                for rest in self._keys(f"{path}/{e.name}")}

    def _already_reverted(self, change: _Change) -> bool:
        """A crash during undo: did this change's reverse step happen?"""
        original = _v2(change.rel)
        step = change.undo_info.get("step")
        if step in ("keep", "skip", "already_there"):
            return True
        if change.op == "move":
            return self.exists(original) and not self.exists(self.files.held_of(change))
        if change.op == "create":
            held = change.undo_info.get("held")
            return not self.exists(original) and (not isinstance(held, str) or self.exists(held))
        if change.op == "mkdir":
            return not self.exists(original)
        return self.exists(original)  # rmdir

    def _restore_times(self, change: _Change) -> None:
        """Give a recreated directory its mode, owner and mtime, and its parent its mtime."""
        if self.storage.implicit_dirs:
            return  # object storage: no directory times, modes or owners exist
        if change.op == "rmdir":
            info = change.info
            owner = (int(info["uid"]), int(info["gid"])) if info.get("uid") is not None else None
            self.storage.set_times(_v2(change.rel), int(info["mtime_ns"]), mode=info.get("mode"),
                                   owner=owner)
        self._restore_parent_mtime(change)


class _OtherRuns:
    """Which other run changed a path: moved it (or an ancestor) away, removed it as an
    empty directory, or created it; read from their journals (what a refusal names)."""

    def __init__(self, storage: MutableStorage, me: str, *, makers: bool = False) -> None:
        self.storage = storage
        self.me = me
        self._paths: dict[str, list[str]] | None = None
        self._inside: dict[str, list[str]] | None = None  # directory -> runs that took from it
        # path -> runs that made it or something below (only when asked: `makers`)
        self._made: dict[str, list[str]] | None = {} if makers else None
        self._newer: bool | None = None  # is there any run after this one?

    def _load(self) -> dict[str, list[str]]:
        paths: dict[str, list[str]] = {}
        inside: dict[str, list[str]] = {}
        for files in _run_dirs(self.storage):
            if files.run_id == self.me:
                continue
            meta = _read_meta(self.storage, files) or {}
            if meta.get("status") == REVERTED:
                continue
            try:
                journal = _read_journal(self.storage, files.journal)
            except QuarantineError:
                continue
            for change in journal.changes:
                if change.undo_done or change.applied_by_journal is False:
                    continue
                if change.op in ("move", "rmdir", "create"):
                    paths.setdefault(change.rel, []).append(files.run_id)
                if change.op in ("move", "rmdir"):  # its undo needs every directory above
                    parent = _parent_of(change.rel)
                    while parent and files.run_id not in inside.setdefault(parent, []):
                        inside[parent].append(files.run_id)
                        parent = _parent_of(parent)
                elif self._made is not None and change.op in ("create", "mkdir"):
                    path = change.rel  # its undo takes it, and what is above
                    while path and files.run_id not in self._made.setdefault(path, []):
                        self._made[path].append(files.run_id)
                        path = _parent_of(path)
        self._inside = inside
        return paths

    def holders(self, rel: str) -> list[str]:
        """Every other run that changed `rel` or one of its ancestors."""
        if self._paths is None:
            self._paths = self._load()
        found: list[str] = []
        path = rel
        while path:
            found.extend(self._paths.get(path, ()))
            path = path.rpartition("/")[0]
        return sorted(set(found))

    def holder(self, rel: str) -> str | None:
        """The run to undo first for `rel`: the newest newer run that changed it (or an
        ancestor), else the newest that did."""
        found = self.holders(rel)
        return self.newer_holder(rel) or (found[-1] if found else None)

    def newer_holder(self, rel: str) -> str | None:
        """The newest run after this one (not reverted) that changed `rel` or an ancestor
        since: moved it away, removed it, wrote over it. Journals are read only when such
        a run may exist: undoing the newest run, the usual case, reads none."""
        newer = [r for r in self.holders(rel) if r > self.me] if self._any_newer() else []
        return newer[-1] if newer else None

    def newer_inside(self, rel: str) -> str | None:
        """The newest run after this one (not reverted) that moved or removed something
        below the directory `rel`: its undo puts that back, so it needs `rel` there."""
        if not self._any_newer():
            return None
        if self._paths is None:
            self._paths = self._load()
        assert self._inside is not None
        newer = sorted(r for r in self._inside.get(rel, ()) if r > self.me)
        return newer[-1] if newer else None

    def makers(self, rel: str) -> list[str]:
        """Every other run (not reverted) that created `rel` or something below it (built
        with `makers=True`: an undo plan has no use for it)."""
        if self._paths is None:
            self._paths = self._load()
        assert self._made is not None, "_OtherRuns(..., makers=True)"
        return sorted(self._made.get(rel, ()))

    def _any_newer(self) -> bool:
        if self._newer is None:
            self._newer = any(files.run_id > self.me for files in _run_dirs(self.storage))
        return self._newer


def _since_ns(meta: dict[str, Any]) -> int:
    """When the run started, in the file clock: roots written at or after it are new."""
    value = meta.get("started_ns")
    if isinstance(value, int):
        return value
    try:
        return int(datetime.fromisoformat(str(meta.get("started_at"))).timestamp()) * 1_000_000_000
    except ValueError:
        return 0  # unknown: every root counts as new, so nothing used is ever taken


def plan_undo(root: RegistryRoot, run_id: str) -> UndoPlan:
    """The frozen plan an undo of `run_id` would carry out now (nothing is changed)."""
    storage = mutable_storage(root)
    files = _RunFiles(check_run_id(run_id))
    meta = _read_meta(storage, files)
    if meta is None:
        raise QuarantineError(f"no run {run_id} in {root.display}/{QUARANTINE_DIR}")
    journal = _read_journal(storage, files.journal)
    plan = _Reverter(root, storage, files, dry_run=True).plan(journal, _since_ns(meta),
                                                              _OtherRuns(storage, run_id))
    return replace(plan, then_finishes=tuple(f.run_id for f, _ in _kept_by_undos(storage, run_id)))


def _revert_run(root: RegistryRoot, storage: MutableStorage, files: _RunFiles,
                meta: dict[str, Any], journal: _Journal) -> UndoResult:
    """Plan, refuse or carry out; the run is `undoing` only while steps are being done.

    A refusal (the plan found a step impossible) changes nothing, not even the status.
    A failure midway (I/O error) puts the status back to what it was, with the steps done
    so far journaled: the next undo plans again from there, so no run ever wedges the tree.
    Once the run is reverted, older reverted runs' undos are finished (`_finish_kept_undos`)."""
    reverter = _Reverter(root, storage, files)
    plan = reverter.plan(journal, _since_ns(meta), _OtherRuns(storage, files.run_id))
    if plan.problems:
        if meta.get("status") == UNDOING:
            before = meta.get("status_before_undo")
            meta.update(status=before or INTERRUPTED,
                        note=f"undo stopped partway: {plan.problems[0]}"[:300])
            _write_meta(storage, files, meta)
        raise UndoConflictError(plan.refusal())
    result = _carry_out(storage, files, meta, journal, reverter, plan)
    if any(step.action in _CHANGING for step in plan.steps):
        result.finished = _finish_kept_undos(root, storage, files.run_id, plan, result.warnings)
    return result


def _carry_out(storage: MutableStorage, files: _RunFiles, meta: dict[str, Any],
               journal: _Journal, reverter: _Reverter, plan: UndoPlan) -> UndoResult:
    """Execute a plan that is not refused: `undoing` while its steps are done, `reverted`
    after (a run reverted before and finished now keeps the date of its undo)."""
    result = UndoResult(files.run_id, str(meta.get("command", "?")), warnings=list(plan.warnings))
    before = meta.get("status_before_undo") if meta.get("status") == UNDOING else meta.get("status")
    meta.update(status=UNDOING, status_before_undo=before)
    _write_meta(storage, files, meta)
    writer = _JournalWriter(storage, files.journal)
    try:
        reverter.execute(plan, journal, result, writer)
        writer.write({"ev": "reverted"})
    except (StorageError, QuarantineError) as exc:
        meta.update(status=before or INTERRUPTED, note=f"undo stopped partway: {exc}"[:300],
                    undo_cut_short=True)  # its next plan settles the steps begun
        with contextlib.suppress(StorageError):
            _write_meta(storage, files, meta)
        raise
    finally:
        writer.close()
    if meta.pop("undo_cut_short", None):
        meta.pop("note", None)  # "undo stopped partway": not any more
    if before == REVERTED:  # finished: what this plan did not judge again is left as it was
        judged = {step.rel for step in plan.steps}
        left = [k for k in meta.get("undo_kept") or () if k.partition(": ")[0] not in judged]
        meta.pop("undo_rejudge", None)
        meta.update(status=REVERTED, undo_finished_at=_now_iso(),
                    undo_kept=(left + result.kept)[:_KEPT_NOTED])
    else:
        meta.update(status=REVERTED, reverted_at=_now_iso(), undo_kept=result.kept[:_KEPT_NOTED])
    _write_meta(storage, files, meta)
    _drop_staging(storage, files)  # every creation is settled: what is left was never used
    return result


def _kept_by_undos(storage: MutableStorage, me: str) -> list[tuple[_RunFiles, dict[str, Any]]]:
    """The reverted runs older than `me` whose undo kept something, newest first, each
    with its meta.json (a finish writes only its own run's)."""
    found: list[tuple[_RunFiles, dict[str, Any]]] = []
    for files in reversed(_run_dirs(storage)):
        if files.run_id < me:
            meta = _read_meta(storage, files) or {}
            if meta.get("status") == REVERTED and (meta.get("undo_kept") or meta.get("undo_rejudge")
                                                   or meta.get("undo_cut_short")):
                found.append((files, meta))
    return found


def _may_finish(meta: dict[str, Any], taken: set[str], touched: set[str]) -> bool:
    """Can what this reverted run's undo left in place (meta.json's `undo_kept`, "<path>:
    why") be judged otherwise now that later undos took `taken` and changed `touched`?
    Answered from its meta alone, so that a big run (a gc's million-line journal) whose
    undo kept a few files for good is not read again at every later undo."""
    kept = meta.get("undo_kept") or []
    if len(kept) >= _KEPT_NOTED or meta.get("undo_cut_short") or (meta.get("undo_rejudge")
                                                                   and touched):
        return True  # not all noted; a finish that failed midway; a path waits for its parent
    above = {parent for path in touched for parent in _self_and_parents(_parent_of(path))}
    for entry in kept:
        path, _, why = entry.partition(": ")
        if path in taken and why in (_BACK_IN_PLACE, _DIR_AGAIN):
            return True  # the later run that wrote it again was undone
        if path in above and (why == _HOLDS or why.endswith(_EMPTIED_BY)):
            return True  # something inside the kept directory changed
        if why == _USED and taken:
            return True  # what used it may be gone
    return False


def _finish_kept_undos(root: RegistryRoot, storage: MutableStorage, me: str,
                       plan: UndoPlan, warnings: list[str]) -> list[dict[str, Any]]:
    """Finish the undos of older reverted runs, newest first, now that run `me` is undone.

    An undo out of order keeps what the run made that a later run still needs: a
    directory holding the later run's files (import A into team/a, import B into team/b,
    undo A: `team/` stays), a blob the later run's image uses. And it finds back in place
    what the run had moved away when a later run wrote it again (rm a tag, import it
    again, undo the rm: the tag is there, the rm's copy stays in its quarantine). Once the
    later run is undone as well, left so, the tree would never come back as it was: kept
    files for good, a tag nobody removed any more gone. So each older reverted run whose
    undo left something is planned again (those changes only, judged against the tree as
    it is now, with the same rules; a path found back in place only when an undo here took
    it, never when anyone else removed it since): what it may take now goes to its own
    quarantine, what it may put back comes back, journaled in its own journal. Only older
    runs: what a run's undo left was written after the run started. A plan that is
    refused or changes nothing changes nothing."""
    finished: list[dict[str, Any]] = []
    older = _kept_by_undos(storage, me)
    taken = {step.rel for step in plan.steps if step.action in _TAKING} if older else set()
    touched = {step.rel for step in plan.steps if step.action in _CHANGING} if older else set()
    for files, meta in older:
        if not _may_finish(meta, taken, touched):
            continue
        try:
            journal = _read_journal(storage, files.journal)
            done = _finish_run(root, storage, files, meta, journal, taken)
        except (QuarantineError, StorageError) as exc:
            # This undo is done whatever happens here: the older run stays as it was left
            # (a step cut short is settled when it is next judged), and the operator told.
            warnings.append(f"the undo of run {files.run_id} could not be finished: {exc}"[:300])
            continue
        if done is None:
            continue
        result, steps = done
        taken.update(step.rel for step in steps if step.action in _TAKING)
        touched.update(step.rel for step in steps if step.action in _CHANGING)
        finished.append({"run_id": files.run_id, "command": result.command,
                         "moved_back": result.moved_back, "files_removed": result.files_removed,
                         "dirs_removed": result.dirs_removed,
                         "dirs_recreated": result.dirs_recreated, "kept": len(result.kept)})
    return finished


def _finish_run(root: RegistryRoot, storage: MutableStorage, files: _RunFiles,
                meta: dict[str, Any], journal: _Journal,
                taken: set[str]) -> tuple[UndoResult, tuple[UndoStep, ...]] | None:
    """Judge again what a reverted run's undo left in place; carry out the plan unless it
    is refused or changes nothing (None). A path found back in place is judged again only
    when a later undo took it (`taken`, and the paths noted in its meta.json as waiting:
    `undo_rejudge`, which is brought up to date when nothing can be done yet)."""
    reverter = _Reverter(root, storage, files)
    rejudge = taken | set(meta.get("undo_rejudge") or ())
    plan = reverter.plan(journal, _since_ns(meta), _OtherRuns(storage, files.run_id), rejudge)
    if plan.problems or not any(step.action in _CHANGING for step in plan.steps):
        waiting = sorted(c.rel for c in journal.changes if c.rel in rejudge
                         and c.undo_info.get("step") == "already_there")
        if waiting != meta.get("undo_rejudge", []):
            meta["undo_rejudge"] = waiting
            _write_meta(storage, files, meta)
        return None
    return _carry_out(storage, files, meta, journal, reverter, plan), plan.steps


def _seal_run(root: RegistryRoot, storage: MutableStorage, files: _RunFiles,
              meta: dict[str, Any], journal: _Journal, reason: str) -> int:
    """Keep what an interrupted run did: settle each in-flight change from the disk."""
    reverter = _Reverter(root, storage, files)
    writer = _JournalWriter(storage, files.journal)
    applied = 0
    try:
        storage.sync_all(files.dir)  # what the disk shows now stays, power loss or not
        reverter.learn(journal)
        lines: list[dict[str, Any]] = []
        for change in journal.changes:
            known = change.applied_by_journal
            state = reverter.forward_applied(change)
            if known is None or change.op == "create":
                lines.append({"ev": "resolved", "seq": change.seq, "applied": state})
            applied += state
        writer.write_many(lines)
        writer.write({"ev": "finish", "note": reason})  # synced: the lines above with it
    finally:
        writer.close()
    meta.update(status=INTERRUPTED, finished_at=_now_iso(), changes=applied, note=reason)
    _write_meta(storage, files, meta)
    _drop_staging(storage, files)  # every creation is settled ("resolved"): the rest was never used
    return applied


def _recover_run(root: RegistryRoot, storage: MutableStorage, files: _RunFiles,
                 reason: str = "interrupted (crash or kill)") -> str:
    meta = _read_meta(storage, files) or {}
    journal = _read_journal(storage, files.journal)
    command = meta.get("command", "?")
    if meta.get("status") == UNDOING:
        try:
            result = _revert_run(root, storage, files, meta, journal)
        except UndoConflictError as exc:  # the status is back to what it was: nothing wedges
            return f"run {files.run_id} ({command}): its interrupted undo cannot go on: {exc}"
        return (f"run {files.run_id} ({command}): finished its interrupted undo "
                f"({result.moved_back} moved back)")
    if journal.finished:
        meta.update(status=COMPLETE, finished_at=meta.get("finished_at") or _now_iso())
        _write_meta(storage, files, meta)
        _drop_staging(storage, files)
        return f"run {files.run_id} ({command}): had completed; bookkeeping updated"
    if meta.get("on_crash", "revert") == "finish":
        applied = _seal_run(root, storage, files, meta, journal, reason)
        return (f"run {files.run_id} ({command}) was {reason}: kept its {applied} completed "
                f"changes (revert them with `regfsck undo ROOT {files.run_id}`)")
    try:
        result = _revert_run(root, storage, files, meta, journal)
    except UndoConflictError as exc:
        # The tree moved on since the crash in a way the revert cannot follow: keep what
        # the run did (a complete, undoable run) rather than block every later command.
        applied = _seal_run(root, storage, files, meta, journal, f"{reason}; not reverted")
        return (f"run {files.run_id} ({command}) was {reason}; it could not be reverted now, "
                f"so its {applied} changes are kept: {exc}")
    changes = result.moved_back + result.files_removed + result.dirs_removed + result.dirs_recreated
    kept = f", kept {len(result.kept)} that are used or rewritten since" if result.kept else ""
    return f"run {files.run_id} ({command}) was {reason}: reverted its {changes} changes{kept}"


def _run_dirs(storage: MutableStorage) -> list[_RunFiles]:
    if storage.stat(QUARANTINE_DIR) is None:
        return []
    return [_RunFiles(e.name) for e in storage.list_dir(QUARANTINE_DIR)
            if e.kind.value == "dir" and RUN_ID_RE.fullmatch(e.name)]


@dataclass(frozen=True)
class Recovery:
    """What `recover` did: a message for each run it settled, and the runs it reverted
    (an `undo` meant for one of those has nothing left to do: `reverted_by_recovery`)."""

    messages: list[str]
    reverted: list[str]


def recover(session: MutationSession) -> Recovery:
    """Finish or revert every run a crash left open (`mutation_session` calls it once the
    root lock is held, before the session opens; nothing else may).

    Each run's on_crash policy decides: "revert" puts the tree back as it was before the
    run, "finish" keeps the changes that reached the disk (still undoable)."""
    root = _active(session, what="recovery runs", recovered=False).root
    storage = session.storage
    messages: list[str] = []
    reverted: list[str] = []
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
            if (_read_meta(storage, files) or {}).get("status") == REVERTED:
                reverted.append(files.run_id)
    return Recovery(messages, reverted)


def reverted_by_recovery(session: MutationSession, run_id: str | None) -> str | None:
    """The run an undo of `run_id` (None: the newest) was meant for, when the session's
    recovery has just reverted it: that undo is done, and must not go on to an older run."""
    reverted = _active(session, what="an undo runs").reverted_by_recovery
    if reverted and (run_id is None or run_id in reverted):
        return run_id or reverted[-1]
    return None


def list_runs(root: RegistryRoot) -> list[RunInfo]:
    """Every run in the quarantine, oldest first."""
    storage = mutable_storage(root)
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
            bytes=sum(storage.tree_size(p) for p in files.held_roots(storage)),
            note=meta.get("note"), path=files.dir,
            undo_kept=list(meta.get("undo_kept") or []) if status == REVERTED else []))
    return runs


def undo_target(root: RegistryRoot, run_id: str | None) -> str:
    """The run `undo` would revert: `run_id` (checked), or the newest not yet reverted."""
    storage = mutable_storage(root)
    for files in reversed(_run_dirs(storage)):
        if run_id is not None and files.run_id != check_run_id(run_id):
            continue
        meta = _read_meta(storage, files)
        if meta is not None and (run_id is not None or meta.get("status") != REVERTED):
            return files.run_id
    if run_id is not None:
        raise QuarantineError(f"no run {run_id} in {root.display}/{QUARANTINE_DIR}")
    raise QuarantineError(f"nothing to undo in {root.display}/{QUARANTINE_DIR}")


def undo(session: MutationSession, run_id: str | None = None) -> UndoResult:
    """Revert a run (default: the newest run not yet reverted) by its plan (`plan_undo`),
    inside an open mutation session (root lock held, interrupted runs recovered).

    Judged against the tree as it is now before anything moves: a step that cannot be
    done, or a tag that would come back without its parts, refuses the whole undo and
    names the newer run to undo first; creations used or rewritten since stay in place."""
    root = _active(session, what="an undo runs").root
    storage = session.storage
    candidates = _run_dirs(storage)
    if run_id is not None:
        check_run_id(run_id)
        candidates = [f for f in candidates if f.run_id == run_id]
        if not candidates:
            raise QuarantineError(f"no run {run_id} in {root.display}/{QUARANTINE_DIR}")
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
    raise QuarantineError(f"nothing to undo in {root.display}/{QUARANTINE_DIR}")


def _finished_at(meta: dict[str, Any]) -> datetime | None:
    for key in ("reverted_at", "finished_at", "started_at"):
        value = meta.get(key)
        if value:
            try:
                return datetime.fromisoformat(str(value))
            except ValueError:
                continue
    return None


def _needed_runs(root: RegistryRoot, storage: MutableStorage) -> dict[str, set[str]]:
    """run id -> the other runs whose undo needs what it holds.

    A run U (not reverted) needs run P when undoing U would bring back a tag whose parts
    are missing from the tree and held by P (rm, then gc --delete-untagged: the rm's undo
    needs the gc's quarantine), or when U moves something back into a directory P moved
    or removed. Purging P would make U's undo impossible (it would refuse, or restore a
    tag that cannot be pulled)."""
    needed: dict[str, set[str]] = {}
    for files in _run_dirs(storage):
        meta = _read_meta(storage, files) or {}
        if meta.get("status") == REVERTED:
            if meta.get("undo_kept") or meta.get("undo_rejudge"):
                _needed_to_finish(storage, files, needed)
            continue
        try:
            journal = _read_journal(storage, files.journal)
        except QuarantineError:
            continue
        others = _OtherRuns(storage, files.run_id)
        for change in journal.changes:
            if change.op in ("move", "rmdir") and not change.undo_done \
                    and change.applied_by_journal is not False:
                parent = _parent_of(change.rel)
                if parent and not storage.implicit_dirs and storage.lstat_raw(_v2(parent)) is None:
                    for holder in others.holders(parent):
                        needed.setdefault(holder, set()).add(files.run_id)
        payloads = files.payloads(storage)
        if not any(restored_tags(root, p) for p in payloads):
            continue  # brings back no tag: nothing of its needs another run's content
        view = build_view(root, [], payloads)
        for repo, _tag, target in view.restored_tags:
            for missing in missing_parts(view, repo, target):
                for holder in others.holders(missing):
                    needed.setdefault(holder, set()).add(files.run_id)
    return needed


def _needed_to_finish(storage: MutableStorage, files: _RunFiles,
                      needed: dict[str, set[str]]) -> None:
    """A reverted run whose undo found a path back in place (a newer run wrote it again)
    still holds its own copy: when that newer run is undone, the copy comes back
    (`_finish_kept_undos`). Purged, the path would stay gone: the newer run needs it."""
    try:
        journal = _read_journal(storage, files.journal)
    except QuarantineError:
        return
    others = _OtherRuns(storage, files.run_id, makers=True)
    for change in journal.changes:
        if change.op == "move" and change.undo_info.get("step") == "already_there":
            for holder in (*others.holders(change.rel), *others.makers(change.rel)):
                if holder > files.run_id:
                    needed.setdefault(files.run_id, set()).add(holder)


def purge(session: MutationSession, older_than: timedelta, *, dry_run: bool = False,
          now: datetime | None = None, force: bool = False,
          run_ids: Collection[str] | None = None) -> PurgeResult:
    """Delete for good the runs that ended at least `older_than` ago; reports bytes freed.

    Inside an open mutation session; a quarantine session (`tree=False`) is enough: the
    registry never reads the quarantine, so it may keep running meanwhile.

    `run_ids` limits it to those runs (an unknown id is a QuarantineError): what a command
    suggests after its own run, so that following the hint never deletes every other run.
    Runs still open (a crash, see `recover`) are never purged. A run whose content another
    run's undo still needs (see `_needed_runs`) is kept unless `force`: purging it would
    leave that undo refusing, or restoring tags that cannot be pulled."""
    root = _active(session, tree=False, what="a purge runs").root
    storage = session.storage
    now = now or datetime.now(UTC)
    result = PurgeResult(applied=not dry_run)
    runs = _run_dirs(storage)
    if run_ids is not None:
        known = {files.run_id for files in runs}
        unknown = sorted(set(run_ids) - known)
        if unknown:
            raise QuarantineError(f"no run {unknown[0]} in {root.display}/{QUARANTINE_DIR} "
                                  "(see `regfsck runs`)")
        runs = [files for files in runs if files.run_id in run_ids]
    needed = {} if force else _needed_runs(root, storage)
    for files in runs:
        meta = _read_meta(storage, files) or {}
        ended = _finished_at(meta)
        if meta.get("status") not in FINAL_STATES or ended is None or now - ended < older_than:
            result.kept.append(files.run_id)
            continue
        users = sorted(needed.get(files.run_id, set()))
        if users:
            result.kept.append(files.run_id)
            result.needed[files.run_id] = users
            continue
        result.runs.append(files.run_id)
        if dry_run:
            result.bytes_freed += storage.tree_size(files.dir)
        else:
            result.bytes_freed += storage.remove_tree(files.dir)
    return result
