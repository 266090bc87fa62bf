"""What compression a byte stream is in, and reading one decompressed with proof it is whole.

One place for the magic bytes (deep verify, inspect, import and `repair --from` sniff
with `sniff_compression`) and for reading a compressed file as a stream
(`DecompressedReader`): counted for the progress bar, stoppable, and, for zstd, walked
frame by frame alongside the decoder, because the zstd decoder ends quietly at a
truncated frame: without the walk a cut-off archive reads as a shorter, valid one.
"""

from __future__ import annotations

import gzip
import io
import threading
from typing import IO, Any, BinaryIO, cast

import zstandard

from regfsck.errors import Interrupted
from regfsck.hashing import ProgressFn

MAGIC_BYTES = 8  # enough for every magic below
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
ZSTD_MAX_BLOCK = 128 << 10
CHUNK = 1 << 20


class LayerFormatError(ValueError):
    """The bytes break the container format (tar header, zstd frame structure)."""


def sniff_compression(head: bytes) -> str:
    """What the first bytes say: gzip, zstd, bzip2, xz, or none (plain data, maybe a tar)."""
    for magic, name in MAGIC.items():
        if head.startswith(magic):
            return name
    return "none"


class ZstdFrameChecker:
    """Push parser over the frame structure of a zstd stream (headers and block sizes only).

    The decompressor quietly stops at a truncated frame; walking the frame and block
    headers alongside it proves that every frame is complete, that skippable frames are
    well formed and that nothing but frames follows."""

    def __init__(self) -> None:
        self.frames = 0
        self._need = 4
        self._state = "magic"
        self._buf = bytearray()
        self._skip = 0
        self._checksum = False

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += view[pos:pos + take]
            pos += take
            if len(self._buf) == self._need:
                chunk = bytes(self._buf)
                self._buf.clear()
                self._advance(chunk)

    def _advance(self, chunk: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(chunk, "little")
            if magic == 0xFD2FB528:
                self._state, self._need = "descriptor", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skippable", 4
            else:
                raise LayerFormatError(f"not a zstd frame after {self.frames} frame(s) "
                                       f"(bytes {chunk!r})")
        elif state == "skippable":
            self._skip = int.from_bytes(chunk, "little")
            self._state, self._need = "magic", 4
        elif state == "descriptor":
            descriptor = chunk[0]
            if descriptor & 0x08:
                raise LayerFormatError("zstd frame header has the reserved bit set")
            single = bool(descriptor & 0x20)
            self._checksum = bool(descriptor & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
            rest = (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs
            self._skip = rest
            self._state, self._need = "block", 3
        elif state == "block":
            header = int.from_bytes(chunk, "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise LayerFormatError("zstd block of the reserved type")
            if kind != 1 and size > ZSTD_MAX_BLOCK:
                raise LayerFormatError(f"zstd block of {size} bytes (limit {ZSTD_MAX_BLOCK})")
            self._skip = 1 if kind == 1 else size
            if last:
                self.frames += 1
                self._skip += 4 if self._checksum else 0
                self._state, self._need = "magic", 4

    def finish(self) -> None:
        if self._skip or self._buf or self._state != "magic":
            raise LayerFormatError("zstd stream is truncated (its last frame is incomplete)")
        if not self.frames:
            raise LayerFormatError("zstd stream holds no frame")


class _Tap(io.RawIOBase):
    """The compressed file as read: counted for progress, fed to a frame checker, stoppable."""

    def __init__(self, raw: IO[bytes], on_bytes: ProgressFn | None,
                 stop: threading.Event | None) -> None:
        self.raw = raw
        self.on_bytes = on_bytes
        self.stop = stop
        self.frames: ZstdFrameChecker | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.stop is not None and self.stop.is_set():
            raise Interrupted
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        if n and self.frames is not None:
            self.frames.feed(memoryview(buffer)[:n])
        if n and self.on_bytes is not None:
            self.on_bytes(n)
        return n or 0


# What reading a damaged compressed stream can raise.
READ_ERRORS: tuple[type[Exception], ...] = (EOFError, OSError, zstandard.ZstdError, LayerFormatError)


class DecompressedReader:
    """A file read as the plain stream inside it: gzip and zstd (told by their magic bytes)
    are decompressed, anything else is passed through as it is.

    `stream` is the decompressed data; after reading what it needs, the caller asks
    `damage()`, which reads the rest of the compressed file and says why it is not whole
    (a truncated or malformed zstd frame), or None. `on_bytes` counts compressed bytes."""

    def __init__(self, raw: IO[bytes], on_bytes: ProgressFn | None = None,
                 stop: threading.Event | None = None) -> None:
        head = raw.read(MAGIC_BYTES)
        raw.seek(0)
        self.compression = sniff_compression(head)
        self._tap = _Tap(raw, on_bytes, stop)
        self._counted = io.BufferedReader(self._tap, CHUNK)
        self.stream: IO[bytes]
        if self.compression == "gzip":
            self.stream = cast(IO[bytes], gzip.GzipFile(fileobj=self._counted, mode="rb"))
        elif self.compression == "zstd":
            self._tap.frames = ZstdFrameChecker()
            self.stream = cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(
                cast(BinaryIO, self._counted), read_size=CHUNK, read_across_frames=True))
        else:
            self.stream = self._counted

    def damage(self) -> str | None:
        """Why the compressed file is not whole (None when it is, or is not zstd)."""
        frames = self._tap.frames
        if frames is None:
            return None
        try:
            while self._counted.read(CHUNK):
                pass
            frames.finish()
        except (LayerFormatError, OSError) as exc:
            return str(exc)
        return None
