"""Re-hash blob data in parallel with bounded memory.

hashlib and readv release the GIL on large buffers, so for large blobs plain threads use
every core (one thread's read overlaps another's hashing). Each worker owns one reusable
buffer (1 MiB), so memory does not depend on blob sizes. Blobs are handed out in batches
(256 blobs or 8 MiB) so per-task overhead does not dominate stores made of small configs
and manifests; and when there are many small blobs, their batches go to worker processes
(`jobs` of them, forked): hashing a few KiB is mostly per-file Python work that threads
would do one at a time under the GIL. A mismatch is re-read once before it is reported: a flaky
read is not damage.

It is also the one place that hashes bytes while they stream past (`verified`,
`hash_stream`): import, `repair --from`, export and the sources all prove blobs this way.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from regfsck.errors import Interrupted
from regfsck.inventory import Blob
from regfsck.storage import FilesystemStorage, Storage, StorageError

BUFFER_SIZE = 1 << 20
BATCH_BYTES = 8 << 20
BATCH_FILES = 256
SMALL_BLOB = 256 << 10  # at most this: hashed in a worker process when there are many
PROCESS_MIN_BLOBS = 20_000  # fewer small blobs than this do not pay for starting processes
HASH_PROCESSES_ENV = "REGFSCK_HASH_PROCESSES"  # "0": threads only, "1": always (jobs > 1)

# Told how much more was just done (bytes read or hashed, entries listed): what progress
# bars and counters receive. The one definition; every engine takes it from here.
ProgressFn = Callable[[int], None]
# The algorithms registries name blobs with, by their direct (faster) constructors.
HASHERS: dict[str, Callable[[], hashlib._Hash]] = {
    "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
_SEQUENTIAL: int | None = getattr(os, "POSIX_FADV_SEQUENTIAL", None)


def new_hasher(algorithm: str) -> hashlib._Hash:
    """A hasher for `algorithm` (the direct constructors of the usual ones are faster)."""
    new = HASHERS.get(algorithm)
    return new() if new is not None else hashlib.new(algorithm)


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


# -- hashing while the bytes stream past ---------------------------------------------------


class DigestMismatch(Exception):
    """Streamed bytes that are not the blob they claim to be; callers word the message."""

    def __init__(self, expected: str, actual: str, total: int, size: int | None) -> None:
        super().__init__(f"{expected}: {total} bytes hash to {actual}")
        self.expected = expected
        self.actual = actual
        self.total = total  # bytes read (for a longer blob: up to the chunk that overran)
        self.size = size


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """`alg:hex` of bytes in memory (a manifest, a small file)."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return f"{algorithm}:{hasher.hexdigest()}"


def read_chunks(stream: IO[bytes], size: int = BUFFER_SIZE) -> Iterator[bytes]:
    """A file object as bounded chunks."""
    while chunk := stream.read(size):
        yield chunk


def _hashed(chunks: Iterable[bytes], hasher: hashlib._Hash, on_bytes: ProgressFn | None,
            stop: threading.Event | None, limit: int | None = None) -> Generator[bytes, None, int]:
    """Hash each chunk and pass it on; returns the byte count. Ends at a chunk that takes
    the count past `limit` (not passed on); raises Interrupted when `stop` is set."""
    total = 0
    for chunk in chunks:
        if stop is not None and stop.is_set():
            raise Interrupted
        hasher.update(chunk)
        total += len(chunk)
        if limit is not None and total > limit:
            break
        if on_bytes is not None:
            on_bytes(len(chunk))
        yield chunk
    return total


def _drain(chunks: Generator[bytes, None, int]) -> int:
    """Run a `_hashed` generator to its end; its byte count."""
    while True:
        try:
            next(chunks)
        except StopIteration as end:
            return int(end.value)


def verified(chunks: Iterable[bytes], digest: str, size: int | None = None, *,
             on_bytes: ProgressFn | None = None,
             stop: threading.Event | None = None) -> Iterator[bytes]:
    """Pass `chunks` on while hashing them; after the last one raise DigestMismatch unless
    they hash to `digest` (and add up to `size`, when given).

    The verdict comes only at the end, so a consumer trusts the bytes once the generator
    is exhausted without error (a journaled write reverts otherwise). A chunk that takes
    the count past `size` is not passed on: a longer stream is never copied whole.
    Raises Interrupted when `stop` is set."""
    algorithm = digest.partition(":")[0]
    hasher = new_hasher(algorithm)
    total = yield from _hashed(chunks, hasher, on_bytes, stop, size)
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != digest or (size is not None and total != size):
        raise DigestMismatch(digest, actual, total, size)


class ProvenChunks:
    """The chunks of blob `digest` from a stream that proves them: iterating raises after
    the last chunk unless they hash to `digest` (what `verified` does). A consumer that
    drains them without error holds exactly that blob, so a journaled write need not hash
    the bytes once more for its record (import: a third sha256 pass over every byte).
    Made only by `proven`, around `verified`'s generator."""

    __slots__ = ("_chunks", "digest")

    def __init__(self, chunks: Iterator[bytes], digest: str) -> None:
        self._chunks = chunks
        self.digest = digest

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks


def proven(chunks: Iterable[bytes], digest: str, size: int | None = None, *,
           on_bytes: ProgressFn | None = None, stop: threading.Event | None = None,
           failure: Callable[[DigestMismatch], Exception] | None = None) -> ProvenChunks:
    """`verified` as ProvenChunks; `failure` turns a mismatch into the caller's error."""

    def checked() -> Iterator[bytes]:
        try:
            yield from verified(chunks, digest, size, on_bytes=on_bytes, stop=stop)
        except DigestMismatch as exc:
            if failure is None:
                raise
            raise failure(exc) from exc

    return ProvenChunks(checked(), digest)


def hash_stream(stream: IO[bytes], algorithm: str, on_bytes: ProgressFn | None = None,
                stop: threading.Event | None = None) -> tuple[str, int]:
    """(`alg:hex`, bytes read) of a file object read to its end."""
    hasher = new_hasher(algorithm)
    total = _drain(_hashed(read_chunks(stream), hasher, on_bytes, stop))
    return f"{algorithm}:{hasher.hexdigest()}", total


_local = threading.local()


def _buffer() -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = memoryview(bytearray(BUFFER_SIZE))
        _local.buf = buf
    return buf


def _hash_stream(storage: Storage, path: str, hasher: hashlib._Hash,
                 on_bytes: ProgressFn | None, stop: threading.Event | None) -> int:
    """Object storage: one streaming GET, hashed chunk by chunk (memory: one chunk)."""
    chunks = storage.iter_chunks(path)
    try:
        return _drain(_hashed(chunks, hasher, on_bytes, stop))
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def hash_file(storage: Storage, path: str, algorithm: str,
              on_bytes: ProgressFn | None = None, stop: threading.Event | None = None
              ) -> tuple[str, int]:
    """Stream one file through `algorithm`; returns (`alg:hex`, bytes read)."""
    hasher = new_hasher(algorithm)
    if not isinstance(storage, FilesystemStorage):
        total = _hash_stream(storage, path, hasher, on_bytes, stop)
        return f"{algorithm}:{hasher.hexdigest()}", total
    buf = _buffer()
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


def _check_blob(storage: Storage, blob: Blob, on_bytes: ProgressFn | None,
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


def _batches(blobs: Iterable[Blob], split_small: bool,
             batch_files: int = BATCH_FILES) -> Iterator[tuple[bool, list[Blob]]]:
    """(small?, batch) in about the order given; small and large blobs never share a batch
    when `split_small` (they go to different pools)."""
    open_batches: dict[bool, tuple[list[Blob], int]] = {}
    for blob in blobs:
        small = split_small and blob.size <= SMALL_BLOB
        batch, size = open_batches.get(small, ([], 0))
        batch.append(blob)
        size += blob.size
        if size >= BATCH_BYTES or len(batch) >= batch_files:
            open_batches.pop(small, None)
            yield small, batch
        else:
            open_batches[small] = (batch, size)
    for small, (batch, _) in open_batches.items():
        yield small, batch


_worker_storage: FilesystemStorage | None = None


def _worker_init(base: str) -> None:
    """A hashing worker process: Ctrl-C is the parent's to handle."""
    global _worker_storage
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_storage = FilesystemStorage(Path(base))


def _hash_in_worker(items: list[tuple[str, str]]) -> list[tuple[str | None, int, str | None]]:
    """In a worker process: (path, digest) -> (actual digest, bytes read, error)."""
    storage = _worker_storage
    assert storage is not None
    out: list[tuple[str | None, int, str | None]] = []
    for path, digest in items:
        algorithm = digest.partition(":")[0]
        try:
            actual, read = hash_file(storage, path, algorithm)
            if actual != digest:
                actual, read = hash_file(storage, path, algorithm)  # re-read once
        except StorageError as exc:
            out.append((None, 0, exc.message))
            continue
        out.append((actual, read, None))
    return out


def _process_pool(storage: FilesystemStorage, jobs: int) -> ProcessPoolExecutor | None:
    """`jobs` worker processes, forked now, before this call starts any hashing thread.

    fork, not spawn or forkserver: nothing is re-imported (no fragile re-run of the main
    module) and the workers start at once. They run nothing but `_hash_in_worker` (os and
    hashlib calls), so no lock another thread may hold at fork time is ever taken."""
    try:
        context = multiprocessing.get_context("fork")
    except ValueError:
        return None  # no fork on this platform: threads do it all
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                               initargs=(os.fspath(storage.base),))
    try:
        pool.submit(_hash_in_worker, []).result()  # forks every worker
    except Exception:  # cannot start processes here (limits, sandbox): threads only
        pool.shutdown(wait=False, cancel_futures=True)
        return None
    return pool


def _want_processes(blobs: Iterable[Blob], jobs: int) -> bool:
    """Many small blobs and more than one job; REGFSCK_HASH_PROCESSES=0/1 overrides."""
    forced = os.environ.get(HASH_PROCESSES_ENV)
    if forced in ("0", "1"):
        return forced == "1" and jobs > 1
    if jobs < 2 or not isinstance(blobs, Sequence):
        return False
    return sum(1 for b in blobs if b.size <= SMALL_BLOB) >= PROCESS_MIN_BLOBS


def verify_blobs(storage: Storage, blobs: Iterable[Blob], *, jobs: int,
                 on_bytes: ProgressFn | None = None,
                 stop: threading.Event | None = None,
                 processes: bool | None = None) -> Iterator[HashOutcome]:
    """Hash every blob with `jobs` threads (and, for many small blobs, `jobs` processes),
    yielding each outcome as it completes.

    `processes`: None decides from the blobs (a sequence with at least PROCESS_MIN_BLOBS
    small ones). At most `2 * jobs` batches per pool are in flight, so memory stays bounded
    however many blobs there are. When `stop` is set, no new batch starts and running
    thread batches end at the next buffer (a process batch of small blobs finishes).
    """
    jobs = max(1, jobs)
    halt = stop if stop is not None else threading.Event()
    local = isinstance(storage, FilesystemStorage)
    use_processes = local and (_want_processes(blobs, jobs) if processes is None else processes)
    # Object storage: one blob per task, so `jobs` GETs are in flight whatever the sizes.
    batch_files = BATCH_FILES if local else 1

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

    procs = _process_pool(storage, jobs) if use_processes and isinstance(
        storage, FilesystemStorage) else None
    threads = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="regfsck-hash")
    pending: dict[Future[Any], tuple[bool, list[Blob]]] = {}
    in_flight = {True: 0, False: 0}

    def collect(finished: Iterable[Future[Any]]) -> Iterator[HashOutcome]:
        for future in finished:
            from_process, batch = pending.pop(future)
            in_flight[from_process] -= 1
            yield from _outcomes(future, from_process, batch, on_bytes)

    try:
        for small, batch in _batches(blobs, procs is not None, batch_files):
            if halt.is_set():
                break
            to_process = small and procs is not None
            future: Future[Any]
            if procs is not None and to_process:
                future = procs.submit(_hash_in_worker, [(b.path, b.digest) for b in batch])
            else:
                future = threads.submit(run_batch, batch)
            pending[future] = (to_process, batch)
            in_flight[to_process] += 1
            while in_flight[to_process] >= 2 * jobs:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                yield from collect(done)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            yield from collect(done)
    finally:
        if pending:  # left early (interrupt or the consumer stopped): wind down
            halt.set()
        for future in pending:
            future.cancel()
        threads.shutdown(wait=True)
        if procs is not None:
            procs.shutdown(wait=True, cancel_futures=True)


def _outcomes(future: Future[Any], from_process: bool, batch: list[Blob],
              on_bytes: ProgressFn | None) -> list[HashOutcome]:
    if future.cancelled():
        return []
    results = future.result()
    if not from_process:
        return list(results)
    outcomes = [HashOutcome(blob, actual, read, error)
                for blob, (actual, read, error) in zip(batch, results, strict=True)]
    if on_bytes is not None:
        on_bytes(sum(o.bytes_read for o in outcomes))
    return outcomes
