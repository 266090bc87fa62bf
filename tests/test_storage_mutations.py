"""The seam's changes never go through a symbolic link, whichever way the directory of a
change is opened: in one `openat2` (the kernel refuses symlinks on the way) or level by
level with O_NOFOLLOW (kernels and sandboxes without it). Each test runs both ways."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regfsck import storage as storage_module
from regfsck.storage import FilesystemStorage, StorageError, UnsafePathError

_DEPTH = ["a", "b", "c", "d", "e"]


@pytest.fixture(params=["openat2", "walk"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Which way directories are opened; "openat2" is skipped where the kernel lacks it."""
    if request.param == "walk":
        monkeypatch.setattr(storage_module, "_open_beneath", lambda base_fd, relative: None)
    else:
        probe = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            if storage_module._open_beneath(probe, "tmp") is None:
                pytest.skip("openat2 is not available on this kernel or in this sandbox")
        finally:
            os.close(probe)
        calls: list[str] = []
        real = storage_module._open_beneath

        def counted(base_fd: int, relative: str) -> int | None:
            calls.append(relative)
            return real(base_fd, relative)

        monkeypatch.setattr(storage_module, "_open_beneath", counted)
        yield request.param
        assert calls, "the openat2 way was never taken"
        return
    yield request.param


def _tree(tmp_path: Path) -> tuple[FilesystemStorage, Path, Path]:
    base = tmp_path / "base"
    deep = base.joinpath(*_DEPTH)
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(b"inside")
    outside = tmp_path / "outside"
    outside.joinpath(*_DEPTH).mkdir(parents=True)
    outside.joinpath(*_DEPTH, "file").write_bytes(b"outside")
    return FilesystemStorage(base), base, outside


def _changes(storage: FilesystemStorage, prefix: str) -> list[Callable[[], object]]:
    """Every kind of change the seam makes, each inside `prefix`."""
    return [
        lambda: storage.make_dir(f"{prefix}/newdir"),
        lambda: storage.write_new_file(f"{prefix}/new", [b"x"]),
        lambda: storage.remove_file(f"{prefix}/file"),
        lambda: storage.move(f"{prefix}/file", "moved"),
        lambda: storage.set_times(f"{prefix}/file", 0),
        lambda: storage.replace_file(f"{prefix}/file", b"replaced"),
        lambda: storage.fsync_dir(prefix),
        lambda: storage.lstat_raw(f"{prefix}/file"),
        lambda: storage.remove_tree(f"{prefix}/sub"),
    ]


@pytest.mark.parametrize("level", range(len(_DEPTH)))
def test_a_symlink_at_any_level_refuses_every_change(tmp_path: Path, way: str, level: int) -> None:
    """Level `level` of a/b/c/d/e replaced by a symlink to the same place outside: every
    change below it is refused and nothing outside moves."""
    storage, base, outside = _tree(tmp_path)
    swapped = base.joinpath(*_DEPTH[:level + 1])
    os.rename(swapped, tmp_path / "set-aside")
    swapped.symlink_to(outside.joinpath(*_DEPTH[:level + 1]))
    before = sorted((str(p), p.read_bytes() if p.is_file() else b"") for p in outside.rglob("*"))
    for change in _changes(storage, "/".join(_DEPTH)):
        with pytest.raises(StorageError) as raised:
            change()
        assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR), raised.value
    assert sorted((str(p), p.read_bytes() if p.is_file() else b"")
                  for p in outside.rglob("*")) == before


def test_changes_land_where_asked_without_symlinks(tmp_path: Path, way: str) -> None:
    storage, base, _ = _tree(tmp_path)
    deep = "/".join(_DEPTH)
    storage.make_dir(f"{deep}/newdir")
    storage.write_new_file(f"{deep}/newdir/new", [b"new"])
    storage.replace_file(f"{deep}/file", b"replaced")
    storage.move(f"{deep}/file", "a/moved")
    assert (base / "a/moved").read_bytes() == b"replaced"
    assert base.joinpath(*_DEPTH, "newdir", "new").read_bytes() == b"new"
    assert storage.lstat_raw(f"{deep}/missing") is None
    assert storage.lstat_raw("a/missing/deeper") is None
    with pytest.raises(StorageError) as raised:
        storage.make_dir("a/missing/deeper")
    assert raised.value.errno == errno.ENOENT


def test_a_path_longer_than_path_max_is_changed_a_level_at_a_time(tmp_path: Path, way: str) -> None:
    """openat2 refuses a path over PATH_MAX (ENAMETOOLONG); the walk opens it level by level."""
    storage, base, _ = _tree(tmp_path)
    levels = ["x" * 200] * 24  # 4,800 bytes
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in levels:
            os.mkdir(level, dir_fd=fd)
            fd, parent = os.open(level, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
    finally:
        os.close(fd)
    long_dir = "/".join(levels)
    storage.write_new_file(f"{long_dir}/new", [b"far"])
    stat = storage.lstat_raw(f"{long_dir}/new")
    assert stat is not None and stat.st_size == 3
    storage.remove_file(f"{long_dir}/new")
    assert storage.lstat_raw(f"{long_dir}/new") is None


def test_a_sandbox_refusing_openat2_falls_back_to_the_walk_for_good(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seccomp filter answering EPERM (or an old kernel ENOSYS): the walk, from then on."""
    storage, base, _ = _tree(tmp_path)
    asked: list[int] = []

    def refused(*args: object) -> int:
        asked.append(1)
        storage_module.ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(storage_module, "_openat2", lambda: refused)
    monkeypatch.setattr(storage_module, "_openat2_usable", True)
    storage.write_new_file("a/b/c/d/e/one", [b"1"])
    storage.write_new_file("a/b/c/d/e/two", [b"2"])
    assert base.joinpath(*_DEPTH, "two").read_bytes() == b"2"
    assert len(asked) == 1


def test_changes_stay_in_the_tree_first_changed_when_its_path_is_moved(
        tmp_path: Path, way: str) -> None:
    """The base is opened at the first change and held: a run whose tree is moved away
    (and another put at its path) goes on in the tree it began in, where its journal is,
    never half here and half there."""
    storage, base, _ = _tree(tmp_path)
    storage.write_new_file("a/first", [b"1"])
    moved = tmp_path / "moved"
    os.rename(base, moved)
    base.mkdir()
    (base / "a").mkdir()
    storage.write_new_file("a/second", [b"2"])
    storage.move("a/first", "a/b/first")
    assert (moved / "a/second").read_bytes() == b"2"
    assert (moved / "a/b/first").read_bytes() == b"1"
    assert list(base.rglob("*")) == [base / "a"]


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("held") / "base"
    (base / "a" / "b").mkdir(parents=True)
    for rel in ("top", "a/file", "a/b/file"):
        (base / rel).write_bytes(rel.encode())
    return base


def _looked_up(storage: FilesystemStorage, path: str) -> object:
    """What the storage makes of `path`: refused, or the entry and the parent it names."""
    try:
        found = storage.lstat_raw(path)
        dir_fd, name = storage._parent(path)
    except UnsafePathError:
        return "refused"
    except StorageError as exc:
        return exc.errno
    try:
        return (found.st_ino if found else None, os.fstat(dir_fd).st_ino, name)
    finally:
        storage._done(dir_fd)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "file", "top", "missing", ".", "..", "", "x\x00"]),
                min_size=1, max_size=4))
def test_a_path_is_refused_or_found_alike_through_a_directory_held_open(
        small_tree: Path, segments: list[str]) -> None:
    """Directories held open for a batch (`hold_dirs`) are found again by the path they
    were kept under: every path, clean or not (empty, '.', '..', NUL, doubled or leading
    slashes), is refused or resolved exactly as by a storage holding nothing."""
    path = "/".join(segments)
    fresh = FilesystemStorage(small_tree)
    held = FilesystemStorage(small_tree)
    held.hold_dirs()
    try:
        for warm in ("top", "a/file", "a/b/file"):  # "", "a" and "a/b" held
            held.lstat_raw(warm)
        for variant in (path, "/" + path, path + "/", path.replace("/", "//")):
            assert _looked_up(held, variant) == _looked_up(fresh, variant), variant
    finally:
        held.close()
        fresh.close()
