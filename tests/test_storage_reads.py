"""Reading small files whole: every reader returns the file's first `limit` + 1 bytes
(one more than allowed says "too large"), whatever the stat said and however the
filesystem splits its reads, and asks the kernel for no more than the file holds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regfsck import storage as storage_module
from regfsck.storage import FilesystemStorage, StorageError

_real_read = os.read
_CONTENT = st.binary(max_size=3000)
_LIMIT = st.integers(min_value=0, max_value=2500)
_SETTINGS = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@contextmanager
def _reads(monkeypatch: pytest.MonkeyPatch, most: int | None) -> Iterator[list[int]]:
    """os.read as the storage module sees it, recording what each call asked for and (a
    network or FUSE filesystem) returning at most `most` bytes a call."""
    asked: list[int] = []

    def read(fd: int, n: int) -> bytes:
        asked.append(n)
        return _real_read(fd, n if most is None else min(n, most))

    with monkeypatch.context() as patch:
        patch.setattr(storage_module.os, "read", read)
        yield asked


def _storage(tmp_path: Path, content: bytes) -> FilesystemStorage:
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "f").write_bytes(content)
    return FilesystemStorage(tmp_path)


@_SETTINGS
@given(content=_CONTENT, limit=_LIMIT, most=st.none() | st.integers(min_value=1, max_value=700))
def test_every_reader_returns_the_first_limit_plus_one_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, limit: int,
        most: int | None) -> None:
    storage = _storage(tmp_path, content)
    with _reads(monkeypatch, most):
        [many] = storage.read_small_many_stated("d", ["f"], limit)
        link = storage.read_link_fast("d/f", limit)
        try:
            whole: bytes | None = storage.read_small("d/f", limit)
        except StorageError:
            whole = None
    assert not isinstance(many, StorageError)
    assert many[1] == content[:limit + 1]
    assert link == content[:limit + 1]
    assert whole == (content if len(content) <= limit else None)


@_SETTINGS
@given(before=_CONTENT, after=_CONTENT, limit=_LIMIT)
def test_a_file_that_changed_after_its_stat_is_read_as_it_is_now(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: bytes, after: bytes,
        limit: int) -> None:
    """The batch reader sizes its read by an lstat taken before the open: a file rewritten
    in between (longer or shorter) is still read whole, never cut at the old size."""
    storage = _storage(tmp_path, before)
    real_open = os.open

    def open_after_rewrite(path: str, flags: int, mode: int = 0o777, *,
                           dir_fd: int | None = None) -> int:
        (tmp_path / "d" / "f").write_bytes(after)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    with monkeypatch.context() as patch:
        patch.setattr(storage_module.os, "open", open_after_rewrite)
        [read] = storage.read_small_many_stated("d", ["f"], limit)
    assert not isinstance(read, StorageError)
    assert read[1] == after[:limit + 1]


def test_a_small_file_under_a_large_limit_costs_a_read_of_its_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`os.read(fd, n)` allocates n bytes before it reads: a 1 KiB manifest read against
    the 4 MiB manifest limit must not ask for 4 MiB (a map and an unmap per manifest)."""
    content = b"{}" * 500
    storage = _storage(tmp_path, content)
    limit = 4 << 20
    with _reads(monkeypatch, None) as asked:
        [many] = storage.read_small_many_stated("d", ["f"], limit)
        whole = storage.read_small("d/f", limit)
    assert not isinstance(many, StorageError)
    assert many[1] == whole == content
    assert asked == [len(content) + 1, len(content) + 1]


def test_a_read_answered_eagain_is_made_again_keeping_what_came_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """O_NONBLOCK does not apply to regular files, but should a filesystem answer EAGAIN
    in the middle of a file, the bytes read before it are kept."""
    content = bytes(range(256)) * 8
    storage = _storage(tmp_path, content)
    calls = [0]

    def read(fd: int, n: int) -> bytes:
        calls[0] += 1
        if calls[0] == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return _real_read(fd, min(n, 700))  # short reads: the file comes in pieces

    with monkeypatch.context() as patch:
        patch.setattr(storage_module.os, "read", read)
        [many] = storage.read_small_many_stated("d", ["f"], 4096)
    assert not isinstance(many, StorageError)
    assert many[1] == content
