"""The storage seam: the few operations regfsck needs from wherever the tree lives.

Everything above this module speaks in POSIX paths relative to the `v2` directory.
Only the filesystem backend exists today; an object-storage backend implements the
same `Storage` protocol (listing a prefix, stat, open, read a small object).

Safety lives here: no operation follows a symbolic link, no path may contain `..`,
an absolute part or NUL, and opening a FIFO or device never blocks.
"""

from __future__ import annotations

import enum
import errno
import os
import stat as stat_module
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol


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


class StorageError(OSError):
    """An I/O problem reading the tree, carrying the relative path for findings."""

    def __init__(self, code: int | None, message: str, path: str) -> None:
        super().__init__(code, message, path)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


class UnsafePathError(ValueError):
    """A path that could leave the root (`..`, absolute, NUL, symlink on the way)."""


class Storage(Protocol):
    """What reading a registry tree needs; paths are relative to the `v2` directory."""

    def list_dir(self, path: str) -> list[Entry]: ...

    def stat(self, path: str) -> Stat | None: ...

    def read_small(self, path: str, limit: int) -> bytes: ...

    def open_read(self, path: str) -> BinaryIO: ...

    def describe(self, path: str) -> str: ...


def check_relative(path: str) -> list[str]:
    """Split `path` into components, refusing anything that could escape the root."""
    if "\x00" in path:
        raise UnsafePathError(f"NUL byte in path {path!r}")
    if path.startswith("/"):
        raise UnsafePathError(f"absolute path {path!r}")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
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


class FilesystemStorage:
    """A registry tree on a local (or mounted) filesystem, rooted at the `v2` directory."""

    def __init__(self, v2_dir: Path) -> None:
        self.base = Path(v2_dir)
        self._base_str = os.fspath(self.base)

    # -- paths ---------------------------------------------------------------
    def full_path(self, path: str) -> str:
        """Absolute path of a relative one (validated, not resolved)."""
        parts = check_relative(path)
        return os.path.join(self._base_str, *parts) if parts else self._base_str

    def describe(self, path: str) -> str:
        return self.full_path(path)

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

    def scandir(self, path: str) -> Iterator[os.DirEntry[str]]:
        """Raw scandir for the hot walk (filesystem backend only; callers check kinds)."""
        full = self.full_path(path)
        try:
            with os.scandir(full) as it:
                yield from it
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
        parts = check_relative(path)
        if not parts:
            raise StorageError(errno.EISDIR, "cannot open the root directory", path)
        dir_fd = -1
        try:
            dir_fd = os.open(self._base_str, _DIR_FLAGS)
            for part in parts[:-1]:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = next_fd
            fd = os.open(parts[-1], _OPEN_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StorageError(exc.errno, f"symbolic link on the way to {path}", path) from exc
            raise StorageError(exc.errno, f"cannot open {path}: {exc.strerror}", path) from exc
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        try:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode):
                raise StorageError(errno.EINVAL, f"{path} is not a regular file", path)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_read(self, path: str) -> BinaryIO:
        """Open a regular file for streaming (never a FIFO, device or symlink)."""
        fd = self._open_fd(path)
        return os.fdopen(fd, "rb", buffering=0)  # type: ignore[return-value]

    def open_fd(self, path: str) -> int:
        """Open a regular file and return the raw descriptor (caller closes it)."""
        return self._open_fd(path)

    def read_small(self, path: str, limit: int) -> bytes:
        """Read a whole small file; raises StorageError if it is larger than `limit`."""
        fd = self._open_fd(path)
        try:
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = os.read(fd, min(limit + 1 - total, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise StorageError(errno.EFBIG, f"{path} is larger than {limit} bytes", path)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(exc.errno, f"cannot read {path}: {exc.strerror}", path) from exc
        finally:
            os.close(fd)
        return b"".join(chunks)

    def open_fd_fast(self, path: str) -> int:
        """Open a regular file found by the walk (only the last component is checked).

        The walk never enters symlinked directories, so O_NOFOLLOW on the file itself
        is enough and saves one open per directory level on millions of files."""
        try:
            fd = os.open(self.full_path(path), _OPEN_FLAGS)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot open {path}: {exc.strerror}", path) from exc
        try:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode):
                raise StorageError(errno.EINVAL, f"{path} is not a regular file", path)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_link_fast(self, path: str, limit: int = 256) -> bytes:
        """Read a small file found by the walk (see `open_fd_fast`)."""
        fd = self.open_fd_fast(path)
        try:
            data = os.read(fd, limit + 1)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot read {path}: {exc.strerror}", path) from exc
        finally:
            os.close(fd)
        return data
