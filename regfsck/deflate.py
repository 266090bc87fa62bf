"""DEFLATE for gzip streams: ISA-L (python-isal) when it is importable, else Python's zlib;
and a parallel gzip writer for `export` to `.tar.gz`.

Inflating gzip layers (`verify --deep`) and deflating `.tar.gz` exports are the CPU-bound
parts of those commands. ISA-L inflates about 1.6x and deflates several times faster than
zlib, with the same zlib-style API (`compressobj`/`decompressobj`, `unused_data`,
`max_length`), and it checks the gzip CRC-32 and length trailers just as zlib does, so a
damaged stream is refused the same way. It is optional: a machine without the wheel (or
with `REGFSCK_DEFLATE=zlib`, which tests and benchmarks use to compare both) gets zlib.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import Any, Protocol

DEFLATE_ENV = "REGFSCK_DEFLATE"  # "zlib": never use ISA-L
GZIP_WBITS = 31  # a gzip header and trailer around the raw deflate data
ZLIB_LEVEL = 6  # gzip(1)'s default
ISAL_LEVEL = 1  # ISA-L's levels are 0-3; 1 compresses about like zlib's 2-3, many times faster


def _isal() -> ModuleType | None:
    if os.environ.get(DEFLATE_ENV) == "zlib":
        return None
    try:
        from isal import isal_zlib
    except ImportError:  # not installed, or no wheel for this platform
        return None
    return isal_zlib


_LIB = _isal()
NAME = "isal" if _LIB is not None else "zlib"
ERRORS: tuple[type[Exception], ...] = (zlib.error, *((_LIB.error,) if _LIB is not None else ()))


def gzip_decompressor() -> Any:
    """A decompressobj for one gzip member (header, data, CRC-32 and length checked)."""
    lib: Any = _LIB if _LIB is not None else zlib
    return lib.decompressobj(GZIP_WBITS)


def gzip_compressor() -> Any:
    """A compressobj writing one gzip member (mtime 0, no name: reproducible output)."""
    if _LIB is not None:
        return _LIB.compressobj(ISAL_LEVEL, _LIB.DEFLATED, GZIP_WBITS)
    return zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, GZIP_WBITS)


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class ParallelGzipWriter:
    """A gzip stream written as concatenated members, compressed `threads` blocks at a time.

    gzip(1), pigz, Python's gzip and Go's compress/gzip (which docker, containerd and
    skopeo read with) all read a stream of members as one file, so each BLOCK of input
    can be deflated on its own, in parallel: both deflaters release the GIL. Output stays
    in input order; at most 2 * threads blocks are in flight, so memory is bounded
    (~ BLOCK * (2 * threads + 1)). Each member starts a new dictionary, which costs well
    under 0.1% of size at 2 MiB per block."""

    BLOCK = 2 << 20

    def __init__(self, out: _Writable, threads: int) -> None:
        self.out = out
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="regfsck-gzip")
        self.pending: deque[Future[bytes]] = deque()
        self.buffer = bytearray()
        self.members = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.buffer += data
        while len(self.buffer) >= self.BLOCK:
            self._submit(bytes(self.buffer[:self.BLOCK]))
            del self.buffer[:self.BLOCK]
        return len(data)

    def _submit(self, block: bytes) -> None:
        self.pending.append(self.pool.submit(_gzip_member, block))
        self.members += 1
        while len(self.pending) >= 2 * self.threads:
            self.out.write(self.pending.popleft().result())

    def close(self) -> None:
        """Compress what is left and write every member (an empty input: one empty member)."""
        if self.buffer or not self.members:
            self._submit(bytes(self.buffer))
            self.buffer.clear()
        try:
            while self.pending:
                self.out.write(self.pending.popleft().result())
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stop without writing anything more."""
        for future in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _gzip_member(block: bytes) -> bytes:
    compressor = gzip_compressor()
    return bytes(compressor.compress(block) + compressor.flush())
