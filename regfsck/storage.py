"""The storage seam: the few operations regfsck needs from wherever the tree lives.

Everything above this module speaks in POSIX paths relative to the `v2` directory.
Two backends implement it: `FilesystemStorage` (here) and `objectstore.ObjectStorage`
(a bucket or container in object storage, S3 or Azure, listed flat once into the same
directory model). `open_storage` is the one place that picks the backend from a
`RegistryRoot`. Not every reader takes any `Storage` yet: what reads through file
descriptors (hashing in worker processes, the deep layer pass, repair's `--from` sources
and their spool, the verification record) asks `local_only` or builds a
`FilesystemStorage` for a local path (a backup, the local state directory), or refuses
object storage with a one-line error. (import plans through any `Storage` and writes
through `MutableStorage`.)

Changes go through the same seam: `MutableStorage` is what a journaled run
(regfsck.quarantine) needs, rooted at ROOT, and `mutable_storage` picks its backend
(`FilesystemStorage`, or `objectstore.ObjectRootStorage` on S3).

Safety lives here: no operation follows a symbolic link, no path may contain `..`,
an absolute part or NUL, and opening a FIFO or device never blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import functools
import os
import platform
import resource
import stat as stat_module
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar

from regfsck.errors import RegfsckError

if TYPE_CHECKING:
    from regfsck.root import RegistryRoot, S3Location

_T = TypeVar("_T")


class EntryKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"  # FIFO, socket, device: never opened


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory entry as listed, without following symlinks."""

    name: str
    kind: EntryKind


@dataclass(frozen=True, slots=True)
class Stat:
    kind: EntryKind
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


class StorageError(RegfsckError, OSError):
    """An I/O problem reading the tree, carrying the relative path for findings (an OSError
    for the code that handles I/O; exit 3 when it reaches the operator)."""

    def __init__(self, code: int | None, message: str, path: str) -> None:
        OSError.__init__(self, code, message, path)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


class UnsafePathError(RegfsckError, ValueError):
    """A path that could leave the root (`..`, absolute, NUL, symlink on the way)."""


class DirEntryLike(Protocol):
    """The part of `os.DirEntry` the walk uses (the object backend has its own)."""

    @property
    def name(self) -> str: ...

    def is_dir(self, *, follow_symlinks: bool = True) -> bool: ...

    def is_file(self, *, follow_symlinks: bool = True) -> bool: ...

    def is_symlink(self) -> bool: ...

    def stat(self, *, follow_symlinks: bool = True) -> Any: ...


class Storage(Protocol):
    """What reading a registry tree needs; paths are relative to the `v2` directory.

    `scandir` yields `os.DirEntry`-like objects (name, is_dir, is_file, is_symlink, stat)
    and `lstat_many` `os.stat_result`-like ones (st_mode, st_size, st_mtime_ns, st_ctime_ns,
    st_ino): the scanner walks either backend with the same code."""

    io_threads: int  # reads worth keeping in flight (manifest preloads)
    scan_threads: int  # threads for the walk itself

    def list_dir(self, path: str) -> list[Entry]: ...

    def scandir(self, path: str) -> Iterable[DirEntryLike]: ...

    def stat(self, path: str) -> Stat | None: ...

    def lstat_many(self, dir_path: str, names: Sequence[str]) -> list[Any]: ...

    def read_small(self, path: str, limit: int) -> bytes: ...

    def read_link_fast(self, path: str, limit: int = 256) -> bytes: ...

    def read_small_many(self, dir_path: str, names: Sequence[str], limit: int
                        ) -> list[bytes | StorageError]: ...

    def prefetch(self, select: Callable[[str], bool], expected: Callable[[str], Sequence[bytes]],
                 limit: int) -> None: ...

    def iter_chunks(self, path: str, chunk_size: int = ...) -> Iterator[bytes]: ...

    def unmodelled(self) -> list[str]: ...

    def open_read(self, path: str) -> BinaryIO: ...

    def describe(self, path: str) -> str: ...


def worker_spec(storage: Storage) -> StorageSpec | None:
    """How a worker process reopens `storage` (None: this backend cannot be reopened
    there, so its work stays in threads). The reading backends (a local `v2` directory, a
    listed bucket) offer `spec()`."""
    spec = getattr(storage, "spec", None)
    return spec() if callable(spec) else None


@dataclass(frozen=True)
class StorageSpec:
    """What a worker process needs to open the same tree again (picklable).

    Worker processes (the deep layer pass, many-small-blob hashing) cannot share the parent's
    storage object: they reopen it from this. `fork_safe` says whether the backend survives
    a fork: a local tree does; an object-store client does not (obstore's runtime threads
    do not exist in a forked child), so its workers are spawned."""

    v2_dir: str | None = None
    s3: S3Location | None = None
    jobs: int | None = None

    @property
    def fork_safe(self) -> bool:
        return self.s3 is None

    def open(self) -> Storage:
        """The storage in a worker: an object store is not listed again (the parent has
        listed it; a worker only streams the objects it is given)."""
        if self.s3 is not None:
            from regfsck.objectstore import ObjectStorage

            return ObjectStorage(self.s3, jobs=self.jobs)
        assert self.v2_dir is not None
        return FilesystemStorage(Path(self.v2_dir))


def _regular_file(fd: int, path: str) -> tuple[int, int]:
    """(`fd`, its size) once it is known to be a regular file (never a FIFO or device:
    reading one could block for ever), in blocking mode; closed and refused otherwise."""
    try:
        st = os.fstat(fd)
        if not stat_module.S_ISREG(st.st_mode):
            raise StorageError(errno.EINVAL, f"{path} is not a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _read_whole(fd: int, size: int, limit: int) -> bytes:
    """The file's bytes, up to `limit` + 1 of them (one more than allowed tells the caller
    it is too large), for a file its stat said holds `size` bytes.

    The first read asks for what the stat promised and one byte more, not for `limit`:
    `os.read(fd, n)` allocates n bytes before it reads, and asking for the 4 MiB manifest
    limit to read a 1 KiB manifest cost an allocation the size of the limit, and with it
    a map and an unmap of memory, per manifest: a third of the walk's system time on a
    300k-file tree (issue 15). A read that returns exactly what the stat promised is the
    whole file; anything else (a short read on a network or FUSE filesystem, a file that
    changed) reads on until the end or past the limit.

    A descriptor opened with O_NONBLOCK (the walk's: a FIFO planted in the tree must not
    block it) does not apply to regular files; should a filesystem still answer EAGAIN,
    that read is made again in blocking mode, keeping what was read before it."""
    data = _read_blocking(fd, min(size, limit) + 1)
    if len(data) == size:
        return data
    chunks, total = [data], len(data)
    while data and total <= limit:
        data = _read_blocking(fd, min(limit + 1 - total, 1 << 20))
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def _read_blocking(fd: int, count: int) -> bytes:
    try:
        return os.read(fd, count)
    except BlockingIOError:
        os.set_blocking(fd, True)
        return os.read(fd, count)


def entry_stat(mode: int, size: int, mtime_ns: int) -> os.stat_result:
    """The stat of an entry in a store that keeps no inode, device or owner (an object, or
    a directory it implies): one device, no inode, owner 0, changed when last written.

    `MutableStorage.lstat_raw` returns an `os.stat_result` on every backend (real on a
    filesystem, this one on object storage): one type, so no protocol restates its fields."""
    return os.stat_result((mode, 0, 0, 1, 0, 0, size, 0, 0, 0),
                          {"st_mtime_ns": mtime_ns, "st_ctime_ns": mtime_ns})


class AppendFile(Protocol):
    """A file only ever appended to: a run's journal.

    `append` with `sync` is the durability point (fsync on a filesystem; an object store
    writes the lines gathered so far as one object before it returns). Errors are OSError
    (StorageError included); the journal writer takes care of torn lines."""

    path: str

    def size(self) -> int: ...

    def read_tail(self, limit: int) -> bytes: ...

    def append(self, data: bytes, *, sync: bool) -> None: ...

    def truncate(self, size: int) -> None: ...

    def close(self) -> None: ...


class MutableStorage(Storage, Protocol):
    """The changes a journaled run (regfsck.quarantine) makes, and only under the root lock;
    paths are relative to ROOT (not to `v2`: the quarantine lives beside `docker/`).

    A backend implements each as one operation; `FilesystemStorage` by renames and
    descriptor-relative calls that never follow a symlink, an object store by server-side
    copy then delete. quarantine.py never knows which backend it talks to."""

    # True where directories are only implied by what lies below them (object storage):
    # they vanish when emptied and come back with their first entry.
    implicit_dirs: bool
    # True where `move_many` is worth more than one `move` per path (object storage: the
    # copies of a batch run in parallel and its sources go in one bulk delete).
    batch_moves: bool
    # True where `move` happens whole or not at all (a rename); False where a crash can
    # leave it half done (copy, then delete) for `settle_move` to finish or take back.
    atomic_moves: bool

    def lstat_raw(self, path: str) -> os.stat_result | None: ...

    def move(self, src: str, dst: str) -> None: ...

    def move_many(self, moves: Sequence[tuple[str, str]]) -> None: ...

    def settle_move(self, src: str, dst: str) -> None: ...

    def make_dir(self, path: str, mode: int = 0o777) -> None: ...

    def remove_empty_dir(self, path: str) -> None: ...

    def remove_file(self, path: str) -> None: ...

    def write_new_file(self, path: str, chunks: Iterable[bytes], *, sync: bool = True) -> int: ...

    def sync_all(self, path: str) -> bool: ...

    def replace_file(self, path: str, data: bytes) -> None: ...

    def fsync_dir(self, path: str) -> None: ...

    def set_times(self, path: str, mtime_ns: int, mode: int | None = None,
                  owner: tuple[int, int] | None = None) -> None: ...

    def neighbours(self, path: str, directory: bool) -> tuple[int, int, int | None]: ...

    def adopt(self, path: str, owner: tuple[int, int], mode: int) -> None: ...

    def open_journal(self, path: str) -> AppendFile: ...

    def remove_tree(self, path: str) -> int: ...

    def tree_size(self, path: str) -> int: ...

    def hold_dirs(self) -> None: ...

    def release_dirs(self) -> None: ...

    def close(self) -> None: ...


def mutable_storage(root: RegistryRoot) -> MutableStorage:
    """The backend a journaled run changes `root` through, rooted at ROOT: the one place
    that picks it (a local directory, or `s3://BUCKET/PREFIX/`: copy+delete moves and
    journal objects, see objectstore.ObjectRootStorage)."""
    if root.s3 is not None:
        from regfsck.objectstore import ObjectRootStorage

        return ObjectRootStorage(root.s3)
    return FilesystemStorage(root.root)


def open_storage_at(root: RegistryRoot, path: str) -> Storage:
    """A reading backend rooted at `path` below ROOT (a quarantine payload, which holds a
    `v2` tree of its own), listed fresh: what an undo judges besides the live tree."""
    if root.s3 is not None:
        from regfsck.objectstore import ObjectStorage

        base = "/".join([*([root.s3.prefix] if root.s3.prefix else []), *check_relative(path)])
        return ObjectStorage(root.s3, base=base + "/")
    return FilesystemStorage(root.root.joinpath(*check_relative(path)))


def local_only(storage: Storage, what: str = "this") -> FilesystemStorage:
    """`storage` for code that reads through file descriptors (deep checks, inspect's
    layer measurements, repair): a local tree only. The CLI refuses those commands on
    object storage before reading anything; this is the backstop, a one-line error."""
    if not isinstance(storage, FilesystemStorage):
        raise StorageError(errno.EOPNOTSUPP, f"{what} is not available on object storage yet", "")
    return storage


def open_storage(root: RegistryRoot, *, jobs: int | None = None) -> Storage:
    """The backend holding `root`'s tree, rooted at its `v2` directory: a local directory
    or an S3 bucket (`s3://BUCKET/PREFIX` or a config with `storage: s3:`).

    `jobs`: requests in flight for object storage (default 64, REGFSCK_S3_JOBS)."""
    if root.s3 is not None:
        from regfsck.objectstore import ObjectStorage

        return ObjectStorage(root.s3, jobs=jobs)
    return FilesystemStorage(root.v2)


def check_relative(path: str) -> list[str]:
    """Split `path` into components, refusing anything that could escape the root.

    (Asked several times per change: list membership tests, not a loop in Python.)"""
    if "\x00" in path:
        raise UnsafePathError(f"NUL byte in path {path!r}")
    if path.startswith("/"):
        raise UnsafePathError(f"absolute path {path!r}")
    parts = path.split("/")
    if "" in parts:
        parts = [p for p in parts if p]
    if "." in parts or ".." in parts:
        raise UnsafePathError(f"path with '.' or '..' component: {path!r}")
    return parts


def _kind_of_mode(mode: int) -> EntryKind:
    if stat_module.S_ISREG(mode):
        return EntryKind.FILE
    if stat_module.S_ISDIR(mode):
        return EntryKind.DIR
    if stat_module.S_ISLNK(mode):
        return EntryKind.SYMLINK
    return EntryKind.OTHER


def to_stat(st: os.stat_result) -> Stat:
    """The seam's Stat of an lstat result."""
    return Stat(_kind_of_mode(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _kind_of_entry(entry: os.DirEntry[str]) -> EntryKind:
    if entry.is_symlink():
        return EntryKind.SYMLINK
    if entry.is_dir(follow_symlinks=False):
        return EntryKind.DIR
    if entry.is_file(follow_symlinks=False):
        return EntryKind.FILE
    return EntryKind.OTHER


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


IO_THREADS_ENV = "REGFSCK_IO_THREADS"


def io_threads() -> int:
    """How many metadata reads (listings, link files, manifests) to keep in flight.

    1 by default: on a local filesystem with warm caches each read takes microseconds and
    threads only fight over the GIL (measured 30-40% slower with 4-8 threads, see
    docs/scale.md). Raise it through REGFSCK_IO_THREADS for high-latency storage (NFS,
    spinning disks, cold caches) where many outstanding reads finish sooner."""
    value = os.environ.get(IO_THREADS_ENV, "")
    return max(1, min(64, int(value))) if value.isdigit() else 1


class FilesystemStorage:
    """A registry tree on a local (or mounted) filesystem, rooted at the `v2` directory."""

    implicit_dirs = False  # `MutableStorage`: directories are made and removed explicitly
    batch_moves = False  # a rename is one system call: the journal follows each one
    atomic_moves = True  # `MutableStorage`: moves are renames

    def __init__(self, v2_dir: Path) -> None:
        self.base = Path(v2_dir)
        self._base_str = os.fspath(self.base)
        self._base_dir_fd: int | None = None  # opened at the first use: `_base_fd`
        # Directories kept open between `hold_dirs` and `release_dirs` (see there): path
        # below the base -> descriptor, least recently used first; the thread holding them.
        self._kept: dict[str, int] = {}
        self._kept_fds: set[int] = set()
        # Each directory kept since `hold_dirs` and each of its parents, those closed early
        # too (a superset, emptied by `release_dirs`): a move asks in one look whether
        # anything kept may go with it (`_forget`), and keeping one more directory adds
        # only the parents not there yet (a link's directory: one, its own).
        self._kept_below: set[str] = set()
        self._keeper: int | None = None
        # What closes the base, and the kept directories, if this object is collected
        # first (`close` runs the first itself); made with what they close.
        self._base_closer: weakref.finalize[Any, Any] | None = None
        self._kept_closer: weakref.finalize[Any, Any] | None = None
        self.io_threads = io_threads()
        self.scan_threads = self.io_threads

    def prefetch(self, select: Callable[[str], bool], expected: Callable[[str], Sequence[bytes]],
                 limit: int) -> None:
        """Nothing to do: on a filesystem the walk reads each small file when it meets it."""

    def unmodelled(self) -> list[str]:
        """Nothing: every name in a directory is a path the walk meets."""
        return []

    def iter_chunks(self, path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes in pieces (the generic streaming read; hashing uses readv)."""
        fd = self._open_fd(path)
        try:
            while True:
                try:
                    chunk = os.read(fd, chunk_size)
                except OSError as exc:
                    raise StorageError(exc.errno, f"cannot read {path}: {exc.strerror}", path) from exc
                if not chunk:
                    return
                yield chunk
        finally:
            os.close(fd)

    # -- paths ---------------------------------------------------------------
    def full_path(self, path: str) -> str:
        """Absolute path of a relative one (validated, not resolved)."""
        # Fast path for the millions of clean paths a walk produces: no NUL, not absolute,
        # no empty component and no component starting with "." (so no "." or "..").
        if path and "\x00" not in path and path[0] != "/" and path[-1] != "/" and (
                "/." not in path and "//" not in path and path[0] != "."):
            return f"{self._base_str}/{path}"
        parts = check_relative(path)
        return os.path.join(self._base_str, *parts) if parts else self._base_str

    def describe(self, path: str) -> str:
        return self.full_path(path)

    def spec(self) -> StorageSpec:
        return StorageSpec(v2_dir=self._base_str)

    # -- reading -------------------------------------------------------------
    def list_dir(self, path: str) -> list[Entry]:
        """List a directory (sorted by name); symlinks are reported, never entered."""
        full = self.full_path(path)
        try:
            with os.scandir(full) as it:
                entries = [Entry(e.name, _kind_of_entry(e)) for e in it]
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot list {path or '.'}: {exc.strerror}", path) from exc
        entries.sort(key=lambda e: e.name)
        return entries

    def scandir(self, path: str) -> list[os.DirEntry[str]]:
        """Raw scandir for the hot walk (callers check kinds); a list, not a generator:
        the walk takes every entry of a few hundred thousand directories, and resuming a
        generator per entry was a tenth of its time (issue 15)."""
        full = self.full_path(path)
        try:
            with os.scandir(full) as it:
                return list(it)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot list {path or '.'}: {exc.strerror}", path) from exc

    def stat(self, path: str) -> Stat | None:
        """lstat; None when the path does not exist."""
        try:
            st = os.lstat(self.full_path(path))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot stat {path}: {exc.strerror}", path) from exc
        return Stat(_kind_of_mode(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def _open_fd(self, path: str) -> int:
        """Open a regular file for reading, refusing symlinks in any component."""
        return self._open_sized(path)[0]

    def _open_sized(self, path: str) -> tuple[int, int]:
        """`_open_fd`, and the size of the file it opened."""
        parts = check_relative(path)
        if not parts:
            raise StorageError(errno.EISDIR, "cannot open the root directory", path)
        dir_fd = -1
        try:
            # One openat2 below the held base where the kernel has it, not one open per
            # level (13 for a link: most of what reading a link before rewriting it cost).
            dir_fd = self._dir(parts[:-1])
            fd = os.open(parts[-1], _OPEN_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StorageError(exc.errno, f"symbolic link on the way to {path}", path) from exc
            raise StorageError(exc.errno, f"cannot open {path}: {exc.strerror}", path) from exc
        finally:
            if dir_fd >= 0:
                self._done(dir_fd)
        return _regular_file(fd, path)

    def open_read(self, path: str) -> BinaryIO:
        """Open a regular file for streaming (never a FIFO, device or symlink)."""
        fd = self._open_fd(path)
        return os.fdopen(fd, "rb", buffering=0)

    def open_fd(self, path: str) -> int:
        """Open a regular file and return the raw descriptor (caller closes it)."""
        return self._open_fd(path)

    def read_small(self, path: str, limit: int) -> bytes:
        """Read a whole small file; raises StorageError if it is larger than `limit`."""
        fd, size = self._open_sized(path)
        try:
            data = _read_whole(fd, size, limit)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot read {path}: {exc.strerror}", path) from exc
        finally:
            os.close(fd)
        if len(data) > limit:
            raise StorageError(errno.EFBIG, f"{path} is larger than {limit} bytes", path)
        return data

    def open_fd_fast(self, path: str) -> int:
        """Open a regular file found by the walk (only the last component is checked).

        The walk never enters symlinked directories, so O_NOFOLLOW on the file itself
        is enough and saves one open per directory level on millions of files."""
        try:
            fd = os.open(self.full_path(path), _OPEN_FLAGS)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot open {path}: {exc.strerror}", path) from exc
        return _regular_file(fd, path)[0]

    def read_link_fast(self, path: str, limit: int = 256) -> bytes:
        """Read a small file found by the walk (see `open_fd_fast`).

        Hot path (once per link file): lstat, open, fstat, one read, close. The walk does
        not list a link's directory, so the lstat is what keeps a device node named `link`
        from ever being opened (opening runs its driver: a watchdog arms, a tape rewinds).
        O_NONBLOCK is left set because it does not apply to regular files; should a
        filesystem still answer EAGAIN, the read is retried in blocking mode."""
        full = self.full_path(path)
        try:
            mode = os.lstat(full).st_mode
            if not stat_module.S_ISREG(mode):
                if stat_module.S_ISLNK(mode):
                    raise StorageError(errno.ELOOP, f"{path} is a symbolic link", path)
                raise StorageError(errno.EINVAL, f"{path} is not a regular file", path)
            fd = os.open(full, _OPEN_FLAGS)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(exc.errno, f"cannot open {path}: {exc.strerror}", path) from exc
        try:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode):
                raise StorageError(errno.EINVAL, f"{path} is not a regular file", path)
            data = _read_whole(fd, st.st_size, limit)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(exc.errno, f"cannot read {path}: {exc.strerror}", path) from exc
        finally:
            os.close(fd)
        return data

    # -- batches for the walk -----------------------------------------------
    # A registry is millions of tiny files in directories the walk has just listed. Doing
    # each directory's files through one directory descriptor keeps every path lookup two
    # components long and costs one Python call per directory, not per file.

    def _walked_dir_fd(self, dir_path: str) -> int:
        try:
            return os.open(self.full_path(dir_path), _DIR_FLAGS)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot open {dir_path}: {exc.strerror}",
                               dir_path) from exc

    def _each_in(self, dir_path: str, names: Sequence[str], verb: str,
                 one: Callable[[str, int], _T]) -> list[_T | StorageError]:
        """`one(name, dir_fd)` for each name, relative to one open descriptor of the walked
        directory (one path lookup per directory, not per file); an OSError is returned in
        place as a StorageError ("cannot <verb> <path>"), so one bad file stops nothing."""
        dir_fd = self._walked_dir_fd(dir_path)
        results: list[_T | StorageError] = []
        try:
            for name in names:
                try:
                    results.append(one(name, dir_fd))
                except OSError as exc:
                    path = f"{dir_path}/{name}"
                    results.append(StorageError(exc.errno, f"cannot {verb} {path}: {exc.strerror}",
                                                path))
        finally:
            os.close(dir_fd)
        return results

    def lstat_many(self, dir_path: str, names: Sequence[str]) -> list[os.stat_result | StorageError | None]:
        """lstat `dir_path/name` for each name (None: absent); paths as the walk found them."""

        def lstat(name: str, dir_fd: int) -> os.stat_result | None:
            try:
                return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return None

        return self._each_in(dir_path, names, "stat", lstat)

    def read_small_many(self, dir_path: str, names: Sequence[str], limit: int
                        ) -> list[bytes | StorageError]:
        """Read `dir_path/name` for each name, as `read_link_fast` does (up to limit+1 bytes).

        Each file is lstat'ed first and opened only when it is a regular file, so no device
        or FIFO is ever opened; a failure is returned in place, with read_link_fast's errnos
        (ENOENT absent, ELOOP symlink, EINVAL not a regular file)."""
        return [r if isinstance(r, StorageError) else r[1]
                for r in self.read_small_many_stated(dir_path, names, limit)]

    def read_small_many_stated(self, dir_path: str, names: Sequence[str], limit: int
                               ) -> list[tuple[os.stat_result, bytes] | StorageError]:
        """`read_small_many`, each content with the lstat it was opened after: the walk's
        workers read manifests so and hand gc's dry run their blobs' sizes and times."""

        def read(name: str, dir_fd: int) -> tuple[os.stat_result, bytes] | StorageError:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            mode = st.st_mode
            if not stat_module.S_ISREG(mode):
                code = errno.ELOOP if stat_module.S_ISLNK(mode) else errno.EINVAL
                what = "a symbolic link" if code == errno.ELOOP else "not a regular file"
                path = f"{dir_path}/{name}"
                return StorageError(code, f"{path} is {what}", path)
            fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
            try:
                return st, _read_whole(fd, st.st_size, limit)
            finally:
                os.close(fd)

        return self._each_in(dir_path, names, "read", read)

    # -- mutation (`MutableStorage`) ------------------------------------------
    # Used only by regfsck.quarantine and the root lock (under the lock): every directory on
    # the way is opened with O_NOFOLLOW, so no write, rename or delete can land outside the base.

    def _base_fd(self) -> int:
        """The base directory, opened once (O_NOFOLLOW) and held while this object lives.

        Every change is made relative to it: the tree the run locked and planned stays the
        one it changes, even if the base's path is made to name another directory meanwhile,
        and no change pays for resolving the base's own path again."""
        fd = self._base_dir_fd
        if fd is None:
            fd = self._base_dir_fd = os.open(self._base_str, _DIR_FLAGS)
            self._base_closer = weakref.finalize(self, os.close, fd)
        return fd

    def close(self) -> None:
        """Close the base and every kept directory now, not when the garbage collector
        frees this object: it may never, once a scan has frozen a cycle of garbage that
        points at it (`Scanner.scan`'s `gc.freeze`; an undo plan's closures are one), and
        each such storage kept its descriptor open for the rest of the process. The owner
        of a storage calls it at its end (a mutation session); a later use opens the base
        again."""
        self.release_dirs()
        if self._base_closer is not None and self._base_closer.alive:
            self._base_dir_fd = None
            self._base_closer()  # os.close, once: the finalizer is spent

    def _open_dir(self, parts: list[str]) -> int:
        """Open the directory `parts` below the base, refusing a symlink at every level.

        One `openat2` where the kernel has it (Linux 5.6): it resolves the whole path
        below the base and refuses any symlink or escape on the way itself, in one system
        call where the walk below makes one `open` per level (15 for a repository's link
        directory: most of what a batch of link rewrites cost, issue 15). Elsewhere, or
        where a sandbox forbids it, the walk, level by level with O_NOFOLLOW. The caller
        closes the descriptor returned."""
        base = self._base_fd()
        if not parts:
            return os.open(".", _DIR_FLAGS, dir_fd=base)  # its own: callers close it
        opened = _open_beneath(base, "/".join(parts))
        if opened is not None:
            return opened
        fd = os.open(parts[0], _DIR_FLAGS, dir_fd=base)
        try:
            for part in parts[1:]:
                # `fd` names the open descriptor before the old one is closed: a Ctrl-C
                # (KeyboardInterrupt) landing between the two steps may leak one descriptor
                # but never closes one twice (the second close failed with EBADF and turned
                # an interrupted undo into "cannot open the directory of ...").
                fd, parent_fd = os.open(part, _DIR_FLAGS, dir_fd=fd), fd
                os.close(parent_fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- directories kept open for a batch of changes ----------------------------
    def hold_dirs(self) -> None:
        """Keep the directories this thread opens for changes open until `release_dirs`.

        A journaled replace reaches the same few directories five to ten times: the
        link's own directory (read, stat, move out, owner, rename in), its quarantine
        copy's parent, the run's `new/`. Each reach was an `openat2` and a `close`, half
        of the system calls a link rewrite made (issue 15). Held, each directory is opened
        once per batch. At most `kept_dirs_limit()` at once (the least recently used is closed).

        A descriptor names the directory it was opened on, not its path: a directory this
        object moves or removes is forgotten at once, with everything kept below it, so
        none outlives its path through our own changes. Nothing else may change the tree
        meanwhile, which holds where a batch of changes runs: under the root lock, with
        no registry writing (each batch already reads the disk once and trusts it until
        its flush). Only the holding thread reuses them: hashing threads open their own."""
        if self._keeper is None:
            self._keeper = threading.get_ident()
            if self._kept_closer is None:
                self._kept_closer = weakref.finalize(self, _close_all, self._kept_fds)

    def release_dirs(self) -> None:
        """Close every directory kept since `hold_dirs` (idempotent)."""
        self._keeper = None
        self._kept.clear()
        self._kept_below.clear()
        _close_all(self._kept_fds)

    def _dir(self, parts: list[str]) -> int:
        """`_open_dir`, or the directory kept open for this thread (see `hold_dirs`);
        hand it back with `_done`."""
        if self._keeper is None or self._keeper != threading.get_ident():
            return self._open_dir(parts)
        key = "/".join(parts)
        kept = self._kept
        fd = kept.pop(key, None)
        if fd is None:
            fd = self._open_dir(parts)
            if len(kept) >= kept_dirs_limit():  # the least recently used: never one in use now,
                self._drop_kept(next(iter(kept)))  # which was just used (a move holds two)
            self._kept_fds.add(fd)
            below = self._kept_below
            prefix = key
            while prefix not in below:
                below.add(prefix)
                prefix = prefix[:max(prefix.rfind("/"), 0)]
        kept[key] = fd  # the most recently used last
        return fd

    def _drop_kept(self, key: str) -> None:
        fd = self._kept.pop(key)
        self._kept_fds.discard(fd)
        os.close(fd)

    def _done(self, fd: int) -> None:
        """Close a directory from `_dir` unless it is kept."""
        if fd not in self._kept_fds:
            os.close(fd)

    def _forget(self, path: str) -> None:
        """Close the kept directories at `path` and below it: it was moved or removed."""
        if not self._kept_below:
            return
        if "//" in path or path.endswith("/"):  # (as `_dir` keys them: "a//b" is "a/b")
            path = "/".join(check_relative(path))
        if path not in self._kept_below:  # (a file, or nothing kept there: one look)
            return  # else whatever is kept there now, if anything: a look at each
        below = path + "/"
        for key in [k for k in self._kept if k == path or k.startswith(below)]:
            self._drop_kept(key)

    def _parent(self, path: str) -> tuple[int, str]:
        """(descriptor of the parent directory, last component) of a non-root path;
        hand the descriptor back with `_done`."""
        parts = check_relative(path)
        if not parts:
            raise UnsafePathError("the root directory itself cannot be changed")
        try:
            return self._dir(parts[:-1]), parts[-1]
        except OSError as exc:
            raise self._error(exc, "open the directory of", path) from exc

    @staticmethod
    def _error(exc: OSError, what: str, path: str) -> StorageError:
        if exc.errno == errno.ELOOP or exc.errno == errno.ENOTDIR:
            return StorageError(exc.errno, f"cannot {what} {path}: symbolic link or file on the way",
                                path)
        return StorageError(exc.errno, f"cannot {what} {path}: {exc.strerror}", path)

    @contextmanager
    def _in_parent(self, path: str, what: str) -> Iterator[tuple[int, str]]:
        """(descriptor of the parent directory, name) of `path` for one change made there:
        an OSError in the block is the StorageError "cannot <what> <path>", and the parent
        is closed after it (the one way every change below reaches its entry)."""
        dir_fd, name = self._parent(path)
        try:
            yield dir_fd, name
        except OSError as exc:
            raise self._error(exc, what, path) from exc
        finally:
            self._done(dir_fd)

    def lstat_raw(self, path: str) -> os.stat_result | None:
        """Full lstat (mode, owner, times); None when absent. Symlinks on the way are refused."""
        parts = check_relative(path)
        if not parts:
            return os.lstat(self._base_str)
        try:
            dir_fd = self._dir(parts[:-1])
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(exc, "stat", path) from exc
        try:
            return os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(exc, "stat", path) from exc
        finally:
            self._done(dir_fd)

    def rename_noreplace(self, src: str, dst: str) -> None:
        """Rename `src` to `dst` (same filesystem); never replaces an existing `dst`."""
        src_fd, src_name = self._parent(src)
        try:
            dst_fd, dst_name = self._parent(dst)
        except BaseException:
            self._done(src_fd)
            raise
        try:
            if not _renameat2_noreplace(src_fd, src_name, dst_fd, dst_name):
                # No renameat2 here: check, then rename (callers hold the root lock).
                try:
                    os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
                os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot move {src} to {dst}: {exc.strerror}", src) from exc
        finally:
            self._done(src_fd)
            self._done(dst_fd)
        self._forget(src)  # (a directory moved: what was kept there is elsewhere now)

    def move(self, src: str, dst: str) -> None:
        """The seam's move: a rename that never replaces `dst` (see `rename_noreplace`)."""
        self.rename_noreplace(src, dst)

    def move_many(self, moves: Sequence[tuple[str, str]]) -> None:
        """Each move in turn (`batch_moves` is False: callers journal them one by one)."""
        for src, dst in moves:
            self.rename_noreplace(src, dst)

    def settle_move(self, src: str, dst: str) -> None:
        """Nothing to settle: a rename happened whole or not at all."""

    def make_dir(self, path: str, mode: int = 0o777) -> None:
        """Create one directory (the umask applies, as for the registry's own directories)."""
        with self._in_parent(path, "create directory") as (dir_fd, name):
            os.mkdir(name, mode, dir_fd=dir_fd)

    def remove_empty_dir(self, path: str) -> None:
        """Remove a directory that must be empty (rmdir fails otherwise)."""
        with self._in_parent(path, "remove directory") as (dir_fd, name):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat_module.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            os.rmdir(name, dir_fd=dir_fd)
            self._forget(path)

    def remove_file(self, path: str) -> None:
        """Unlink a file (or a symlink itself, never its target)."""
        with self._in_parent(path, "remove") as (dir_fd, name):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat_module.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            os.unlink(name, dir_fd=dir_fd)

    def set_times(self, path: str, mtime_ns: int, mode: int | None = None,
                  owner: tuple[int, int] | None = None) -> None:
        """Set the mtime (atime kept) and optionally the mode and owner of a file or directory."""
        with self._in_parent(path, "set the times of") as (dir_fd, name):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if owner is not None and os.geteuid() == 0 and owner != (st.st_uid, st.st_gid):
                os.chown(name, owner[0], owner[1], dir_fd=dir_fd, follow_symlinks=False)
            if mode is not None and not stat_module.S_ISLNK(st.st_mode):
                os.chmod(name, stat_module.S_IMODE(mode), dir_fd=dir_fd)
            os.utime(name, ns=(st.st_atime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    def neighbours(self, path: str, directory: bool) -> tuple[int, int, int | None]:
        """(uid, gid, mode of an entry of that kind) in directory `path`: what a new entry
        there should look like. Reads only until the first such entry (big fan-out dirs)."""
        try:
            fd = self._dir(check_relative(path))
        except OSError as exc:
            raise self._error(exc, "open", path) from exc
        try:
            st = os.fstat(fd)
            mode = None
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.name.startswith(".") or entry.is_symlink():
                        continue  # our own temp files; never a symlink's target
                    if entry.is_dir(follow_symlinks=False) == directory and (
                            directory or entry.is_file(follow_symlinks=False)):
                        mode = stat_module.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                        break
        except OSError as exc:
            raise self._error(exc, "list", path) from exc
        finally:
            self._done(fd)
        return st.st_uid, st.st_gid, mode

    def adopt(self, path: str, owner: tuple[int, int], mode: int) -> None:
        """Give a file or directory we just made `owner` and exactly `mode` (no umask).

        Unprivileged, giving a file away is not permitted: it then stays ours (regfsck
        runs as the tree's owner, or the group change alone is allowed)."""
        with self._in_parent(path, "set the owner and mode of") as (dir_fd, name):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat_module.S_ISLNK(st.st_mode):
                raise StorageError(errno.ELOOP, f"cannot adopt {path}: it is a symbolic link", path)
            if owner != (st.st_uid, st.st_gid):
                try:
                    os.chown(name, owner[0], owner[1], dir_fd=dir_fd, follow_symlinks=False)
                except PermissionError:
                    if os.geteuid() == 0:
                        raise
                    with contextlib.suppress(PermissionError):
                        os.chown(name, -1, owner[1], dir_fd=dir_fd, follow_symlinks=False)
            if stat_module.S_IMODE(st.st_mode) != mode:
                os.chmod(name, mode, dir_fd=dir_fd)

    def fsync_dir(self, path: str) -> None:
        """Make renames and creations inside directory `path` durable."""
        try:
            fd = self._dir(check_relative(path))
        except OSError as exc:
            raise self._error(exc, "open", path) from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise self._error(exc, "sync", path) from exc
        finally:
            self._done(fd)

    def sync_all(self, path: str) -> bool:
        """Make every write on the filesystem holding directory `path` (a run's: its
        journal and the files it writes ahead, on the tree's filesystem as `Run.begin`
        checks, whatever ROOT itself is on) durable at once (syncfs(2)).

        One cache flush for a whole batch of new files and renames, where an fsync of each
        costs a flush apiece (a few ms each on most disks: the difference between writing
        at the disk's speed and not). Without syncfs (not Linux), sync(2) of everything.

        True when every file there is durable when it returns, a run's journal too (syncfs,
        or Linux's sync, which waits): the caller needs no fsync of its own after it.
        Elsewhere sync(2) may return before the writes are done: False."""
        try:
            fd = self._open_dir(check_relative(path))
        except OSError as exc:
            raise self._error(exc, "open", path) from exc
        try:
            if _syncfs(fd):
                return True
            os.sync()
            return sys.platform.startswith("linux")
        except OSError as exc:
            raise self._error(exc, "sync the filesystem of", path) from exc
        finally:
            os.close(fd)

    def write_new_file(self, path: str, chunks: Iterable[bytes], *, sync: bool = True) -> int:
        """Write a file that must not exist yet (O_EXCL), fsync it; returns its size.

        `sync=False` leaves the flush to the caller (a batch made durable by one
        `sync_filesystem`)."""
        dir_fd, name = self._parent(path)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | getattr(os, "O_CLOEXEC", 0), 0o666, dir_fd=dir_fd)
        except OSError as exc:
            self._done(dir_fd)
            raise self._error(exc, "create", path) from exc
        size = 0
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                    size += written
            if sync:
                os.fsync(fd)
        except OSError as exc:
            raise self._error(exc, "write", path) from exc
        finally:
            os.close(fd)
            self._done(dir_fd)
        return size

    def replace_file(self, path: str, data: bytes) -> None:
        """Atomically (re)write a small bookkeeping file: temp file, fsync, rename over."""
        parts = check_relative(path)
        tmp = "/".join([*parts[:-1], f".{parts[-1]}.{os.getpid()}.tmp"])
        if self.stat(tmp) is not None:
            self.remove_file(tmp)
        self.write_new_file(tmp, [data])
        src_fd, src_name = self._parent(tmp)
        try:
            dst_fd, dst_name = self._parent(path)
        except BaseException:
            self._done(src_fd)
            raise
        try:
            os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as exc:
            raise self._error(exc, "replace", path) from exc
        finally:
            self._done(src_fd)
            self._done(dst_fd)

    def open_append(self, path: str) -> int:
        """Open (creating) a file for appending; returns the raw descriptor (caller closes)."""
        with self._in_parent(path, "open") as (dir_fd, name):
            return os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                           | getattr(os, "O_CLOEXEC", 0), 0o644, dir_fd=dir_fd)

    def open_journal(self, path: str) -> FileAppender:
        """Open (creating, mode 0644) an append-only file such as a run's journal."""
        return FileAppender(self, path)

    def remove_tree(self, path: str) -> int:
        """Delete a directory tree for good without following symlinks; returns bytes freed."""
        dir_fd, name = self._parent(path)
        try:
            return _remove_tree_at(dir_fd, name, path)
        finally:
            self._done(dir_fd)
            self._forget(path)

    def tree_size(self, path: str) -> int:
        """Bytes of the regular files below `path` (symlinks not followed)."""
        try:
            fd = self._open_dir(check_relative(path))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise self._error(exc, "open", path) from exc
        try:
            return _tree_size_fd(fd)
        finally:
            os.close(fd)


class FileAppender:
    """`AppendFile` on a filesystem: one O_APPEND descriptor, each line written whole by
    `os.write` (retried on short writes), fsynced when asked to."""

    def __init__(self, storage: FilesystemStorage, path: str) -> None:
        self.storage = storage
        self.path = path
        self.fd = storage.open_append(path)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read_tail(self, limit: int) -> bytes:
        """The last `limit` bytes, read through a descriptor of its own."""
        size = self.size()
        reader = self.storage.open_fd(self.path)
        try:
            return os.pread(reader, min(size, limit), max(0, size - limit))
        finally:
            os.close(reader)

    def append(self, data: bytes, *, sync: bool) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        if sync:
            os.fsync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _tree_size_fd(fd: int) -> int:
    total = 0
    with os.scandir(fd) as it:
        entries = list(it)
    for entry in entries:
        st = entry.stat(follow_symlinks=False)
        if stat_module.S_ISDIR(st.st_mode):
            child = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
            try:
                total += _tree_size_fd(child)
            finally:
                os.close(child)
        elif stat_module.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def _remove_tree_at(parent_fd: int, name: str, shown: str) -> int:
    """rm -r of `name` in `parent_fd`: descends by O_NOFOLLOW descriptors only."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if not stat_module.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent_fd)
            return st.st_size if stat_module.S_ISREG(st.st_mode) else 0
        freed = 0
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            with os.scandir(fd) as it:
                names = [e.name for e in it]
            for child in names:
                freed += _remove_tree_at(fd, child, f"{shown}/{child}")
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)
        return freed
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot delete {shown}: {exc.strerror}", shown) from exc


_RENAME_NOREPLACE = 1


@functools.cache
def kept_dirs_limit() -> int:
    """How many directories a storage keeps open at once between `hold_dirs` and
    `release_dirs`: every one a batch of changes reaches (a batch of 1024 changes that
    rewrite links, 512 rewrites: each link's own directory, each quarantine copy's
    parent, `new/`, about 1030), within a quarter of the descriptors this process may
    open (256 under the usual limit of 1024)."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(8, min(1024, soft // 4))


def _close_all(fds: set[int]) -> None:
    """Close and forget every descriptor of `fds` (kept directories; see `hold_dirs`)."""
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def release_freed_memory() -> None:
    """Hand the memory the process has freed back to the system (glibc's `malloc_trim`;
    nothing elsewhere). After the walk of a big tree the parent has freed the workers'
    results and the fragments it merged, but the allocator keeps those pages, scattered
    among the inventory's, as part of the process's resident memory, and the
    inventory is all the plan needs from then on (memory, issue 15: at 300k files 10 MB
    less resident after the walk)."""
    trim = _libc_call("malloc_trim", ctypes.c_size_t)
    if trim is not None:
        trim(0)


@functools.cache
def _libc_call(name: str, *argtypes: Any) -> Any:
    """libc's `name` with its argument types, looked up once; None where this system's libc
    lacks it (callers then fall back, as on an old kernel)."""
    try:
        func = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    func.argtypes = list(argtypes)
    func.restype = ctypes.c_int
    return func


def _call_or_unsupported(func: Any, unsupported: tuple[int, ...], *args: Any) -> bool:
    """Call a libc function: True on success, False when it or its operation is not
    supported here (`unsupported` errnos), any other failure an OSError."""
    if func is None:
        return False
    if func(*args) == 0:
        return True
    err = ctypes.get_errno()
    if err in unsupported:
        return False
    raise OSError(err, os.strerror(err))


@functools.cache
def _renameat2() -> Any:
    return _libc_call("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                      ctypes.c_char_p, ctypes.c_uint)


def _renameat2_noreplace(src_fd: int, src_name: str, dst_fd: int, dst_name: str) -> bool:
    """renameat2(RENAME_NOREPLACE) through libc; False when the system lacks it. (Once
    or twice per change: the function is looked up once, `_renameat2`.)"""
    return _call_or_unsupported(_renameat2(), (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP),
                                src_fd, os.fsencode(src_name), dst_fd, os.fsencode(dst_name),
                                _RENAME_NOREPLACE)


# openat2(2): one number on every architecture sharing the generic system call table
# since Linux 5.1 (not alpha or ia64: there the walk is used).
_SYS_OPENAT2 = 437
_OPENAT2_MACHINES = frozenset({"x86_64", "amd64", "aarch64", "arm64", "armv7l", "armv8l",
                               "i386", "i686", "riscv64", "ppc64le", "ppc64", "s390x",
                               "loongarch64"})
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


@functools.cache
def _openat2() -> Any:
    """libc's `syscall` set up for openat2, or None where this system cannot have it."""
    if not sys.platform.startswith("linux") or platform.machine() not in _OPENAT2_MACHINES:
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                     ctypes.c_size_t]
    func.restype = ctypes.c_long
    return func


# What every directory open asks of openat2 (the kernel only reads it: one for all calls).
_BENEATH_HOW = _OpenHow(_DIR_FLAGS, 0,
                        _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)

_openat2_usable = True  # cleared once the kernel or a sandbox refuses openat2 itself


def _open_beneath(base_fd: int, relative: str) -> int | None:
    """Open directory `relative` below `base_fd` with openat2, allowing no symbolic link
    (nor /proc magic link) on the way and no escape above the base; None when openat2 is
    not available here (the caller walks instead). Errors as from os.open."""
    global _openat2_usable
    func = _openat2() if _openat2_usable else None
    if func is None:
        return None
    fd = int(func(_SYS_OPENAT2, base_fd, os.fsencode(relative), ctypes.byref(_BENEATH_HOW),
                  ctypes.sizeof(_BENEATH_HOW)))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM, errno.E2BIG):
        # No openat2 (old kernel), or a seccomp filter refusing it (EPERM: opening a
        # directory read-only raises EACCES, never EPERM): the walk from now on.
        _openat2_usable = False
        return None
    if err in (errno.EAGAIN, errno.EXDEV, errno.ENAMETOOLONG):
        # A rename raced the lookup, a path the kernel judged unsafe, or one longer than
        # PATH_MAX (the walk opens it a level at a time): walk.
        return None
    raise OSError(err, os.strerror(err))


def _syncfs(fd: int) -> bool:
    """syncfs(fd) through libc; False when the system lacks it (errors raise OSError)."""
    return _call_or_unsupported(_libc_call("syncfs", ctypes.c_int),
                                (errno.ENOSYS, errno.EOPNOTSUPP), fd)
