"""One picture of a tree, to compare before and after a command.

`snapshot(top)` maps every path below `top` (relative, `/`-separated, symlinks not followed)
to an `Entry`: kind, mode, mtime and content (the sha256 of a file, the target of a link).
It walks by directory descriptors, so paths longer than PATH_MAX are included, and never
opens anything but regular files (a FIFO or device is recorded, not read).

What a test compares is chosen with the keyword arguments rather than with another helper:
`mtimes="files"` where a command may legitimately touch directory times, `mtimes="none"`
for content and modes only, `skip` for top-level names to leave out (regfsck's own
state next to `docker/`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Collection
from pathlib import Path
from typing import Literal, NamedTuple

STATE_NAMES = ("regfsck-state", "regfsck-quarantine")  # regfsck's own, next to docker/


class Entry(NamedTuple):
    kind: str  # "file", "dir", "link" or "other:<S_IFMT>"
    mode: int
    mtime_ns: int  # 0 where the snapshot leaves times out
    content: str  # sha256 hex of a file, target of a link, "" otherwise


Snapshot = dict[str, Entry]


def _content(name: str, st: os.stat_result, dir_fd: int) -> tuple[str, str]:
    if stat.S_ISLNK(st.st_mode):
        return "link", os.readlink(name, dir_fd=dir_fd)
    if stat.S_ISREG(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        return "file", digest.hexdigest()
    if stat.S_ISDIR(st.st_mode):
        return "dir", ""
    return f"other:{stat.S_IFMT(st.st_mode)}", ""


def snapshot(top: Path, *, mtimes: Literal["all", "files", "none"] = "all",
             skip: Collection[str] = ()) -> Snapshot:
    """Every path below `top` (not `top` itself); `skip`: top-level names left out."""
    out: Snapshot = {}
    if not top.exists():
        return out
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(top, follow_symlinks=False):
        rel_dir = os.path.relpath(dirpath, top)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in dirnames + filenames:
            st = os.lstat(name, dir_fd=dir_fd)
            kind, content = _content(name, st, dir_fd)
            keep_time = mtimes == "all" or (mtimes == "files" and kind != "dir")
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            out[rel] = Entry(kind, st.st_mode, st.st_mtime_ns if keep_time else 0, content)
    return out


def registry_snapshot(root: Path, *, mtimes: Literal["all", "files", "none"] = "all") -> Snapshot:
    """The registry's own tree (`ROOT/docker`), regfsck's state and quarantine left out;
    keys relative to `ROOT/docker`."""
    return snapshot(root / "docker", mtimes=mtimes)


def content_snapshot(top: Path) -> dict[str, tuple[str, str]]:
    """What undo must restore: every path with its kind and content (not modes or times)."""
    return {path: (e.kind, e.content) for path, e in snapshot(top, mtimes="none").items()}
