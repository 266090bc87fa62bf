"""Re-hash blob data in parallel with bounded memory.

hashlib releases the GIL while hashing buffers larger than a few KiB, so plain threads
use every core. Each worker owns one reusable buffer (1 MiB); small blobs are handed out
in batches so that per-task overhead does not dominate stores made of small configs and
manifests. A mismatch is re-read once before it is reported: a flaky read is not damage.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from regfsck.inventory import Blob
from regfsck.storage import FilesystemStorage, StorageError

BUFFER_SIZE = 1 << 20
BATCH_BYTES = 8 << 20
BATCH_FILES = 256

ProgressFn = Callable[[int], None]
_HASHERS: dict[str, Callable[[], hashlib._Hash]] = {
    "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
_SEQUENTIAL: int | None = getattr(os, "POSIX_FADV_SEQUENTIAL", None)


@dataclass(frozen=True, slots=True)
class HashOutcome:
    """The result for one blob: `actual` is None when it could not be read."""

    blob: Blob
    actual: str | None
    bytes_read: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.actual == self.blob.digest


class Interrupted(Exception):
    """Hashing stopped early because the stop event was set."""


_local = threading.local()


def _buffer() -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = memoryview(bytearray(BUFFER_SIZE))
        _local.buf = buf
    return buf


def hash_file(storage: FilesystemStorage, path: str, algorithm: str,
              on_bytes: ProgressFn | None = None, stop: threading.Event | None = None
              ) -> tuple[str, int]:
    """Stream one file through `algorithm`; returns (`alg:hex`, bytes read)."""
    buf = _buffer()
    new = _HASHERS.get(algorithm)
    hasher = new() if new is not None else hashlib.new(algorithm)
    total = 0
    fd = storage.open_fd_fast(path)
    try:
        while True:
            if stop is not None and stop.is_set():
                raise Interrupted
            try:
                n = os.readv(fd, [buf])
            except OSError as exc:
                raise StorageError(exc.errno, f"cannot read {path}: {exc.strerror}", path) from exc
            if n == 0:
                break
            if total == 0 and n == BUFFER_SIZE and _SEQUENTIAL is not None:
                # A large blob: ask for a larger read-ahead, so the disk reads the next
                # part while this one is hashed.
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, _SEQUENTIAL)
            hasher.update(buf[:n])
            total += n
            if on_bytes is not None:
                on_bytes(n)
    finally:
        os.close(fd)
    return f"{algorithm}:{hasher.hexdigest()}", total


def _check_blob(storage: FilesystemStorage, blob: Blob, on_bytes: ProgressFn | None,
                stop: threading.Event | None) -> HashOutcome:
    algorithm = blob.digest.partition(":")[0]
    try:
        actual, read = hash_file(storage, blob.path, algorithm, on_bytes, stop)
        if actual != blob.digest:
            # Re-read once: report only damage that is really on the disk.
            actual, read = hash_file(storage, blob.path, algorithm, None, stop)
    except StorageError as exc:
        return HashOutcome(blob, None, 0, exc.message)
    return HashOutcome(blob, actual, read)


def _batches(blobs: Iterable[Blob]) -> Iterator[list[Blob]]:
    batch: list[Blob] = []
    size = 0
    for blob in blobs:
        batch.append(blob)
        size += blob.size
        if size >= BATCH_BYTES or len(batch) >= BATCH_FILES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def verify_blobs(storage: FilesystemStorage, blobs: Iterable[Blob], *, jobs: int,
                 on_bytes: ProgressFn | None = None,
                 stop: threading.Event | None = None) -> Iterator[HashOutcome]:
    """Hash every blob with `jobs` threads, yielding each outcome as it completes.

    At most `2 * jobs` batches are in flight, so memory stays bounded however many
    blobs there are. When `stop` is set, running batches end at the next buffer.
    """
    jobs = max(1, jobs)
    halt = stop if stop is not None else threading.Event()

    def run_batch(batch: list[Blob]) -> list[HashOutcome]:
        outcomes = []
        for blob in batch:
            if halt.is_set():
                break
            try:
                outcomes.append(_check_blob(storage, blob, on_bytes, halt))
            except Interrupted:
                break  # the blob in progress has no verdict; the finished ones keep theirs
        return outcomes

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="regfsck-hash") as pool:
        pending: set[Future[list[HashOutcome]]] = set()
        try:
            for batch in _batches(blobs):
                if halt.is_set():
                    break
                pending.add(pool.submit(run_batch, batch))
                if len(pending) >= 2 * jobs:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield from _outcomes(future)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield from _outcomes(future)
        finally:
            if pending:  # left early (interrupt or the consumer stopped): wind down
                halt.set()
            for future in pending:
                future.cancel()


def _outcomes(future: Future[list[HashOutcome]]) -> list[HashOutcome]:
    if future.cancelled():
        return []
    return future.result()
