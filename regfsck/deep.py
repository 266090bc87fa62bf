"""`verify --deep`: decompress every layer and prove it is the tar its image config promises.

Plain verify proves each blob hashes to its name; that says nothing about whether a layer
was *built* right: a registry accepts a layer whose uncompressed content differs from the
`rootfs.diff_ids` its config declares, and every pull then fails at unpack time. This
engine streams each layer once, decompressing by media type (falling back to the magic
bytes), hashes the uncompressed stream against every diff_id that names it, and walks the
tar headers as strictly as Go's archive/tar (what docker and containerd unpack with).

Each layer is read once: the compressed bytes are hashed against the blob's own digest as
they go by (so `verify --deep` need not re-read layers for its plain re-hash), then inflated
(ISA-L when installed, see regfsck.deflate; zstandard), hashed again and walked as a tar.

Only layers whose media type says "filesystem tar" (docker rootfs diffs, OCI
`image.layer.v1.tar[+gzip|+zstd]`, their non-distributable variants, schema1 fsLayers) are
held to the tar rules. Anything else under an image config is an artifact blob (a cosign
signature's simple-signing JSON, a DSSE envelope): verify proves its digest and size, and
here only a diff_id its config lists is compared (cosign's config names the payload's own
digest). Holding such a blob to the tar rules paged operators for every signature.

Reading is bounded (1 MiB buffers, zstd frames and tar headers parsed incrementally) and
runs one layer per thread: the inflaters and hashlib release the GIL.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

import zstandard

from regfsck import deflate, layout
from regfsck.checks import FindingSet, valid_revisions
from regfsck.compression import MAGIC_BYTES, LayerFormatError, ZstdFrameChecker, sniff_compression
from regfsck.document import Document
from regfsck.errors import Interrupted
from regfsck.findings import Finding, Severity, make_finding
from regfsck.graph import ManifestStore, walk
from regfsck.hashing import HASHERS, ProgressFn, new_hasher
from regfsck.inventory import Inventory
from regfsck.manifest import DOCKER_CONFIG, OCI_CONFIG, Manifest, ManifestKind
from regfsck.root import RegistryRoot
from regfsck.scanner import Scanner
from regfsck.storage import (
    FilesystemStorage,
    Storage,
    StorageError,
    StorageSpec,
    open_storage,
    worker_spec,
)

BUFFER = 1 << 20
CONFIG_LIMIT = 16 << 20
TAR_BLOCK = 512
MAX_SPECIAL_ENTRY = 1 << 20  # Go's archive/tar refuses pax headers / long names above 1 MiB
REMOTE_SMALL_LAYER = 4 << 20  # object storage: layers up to this size are read by threads
IMAGE_CONFIG_TYPES = frozenset({DOCKER_CONFIG, OCI_CONFIG})

# Media types of filesystem layers: the only ones held to the tar rules. The empty type is
# a schema1 fsLayer (schema1 has only filesystem layers).
TAR_LAYER_TYPES = frozenset({
    "",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})



# -- what the media type says ---------------------------------------------------------


def declared_compression(media_type: str) -> str | None:
    """Compression a layer media type declares; None when the type does not say (or is odd)."""
    if "+encrypted" in media_type:
        return None
    if media_type.endswith(("+gzip", ".tar.gzip", "tar.gzip")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    if media_type.endswith((".tar", "v1.tar", "diff.tar")):
        return "none"
    return None


def is_tar_layer(media_type: str) -> bool:
    """True when the media type promises a filesystem tar (see TAR_LAYER_TYPES)."""
    return media_type in TAR_LAYER_TYPES


# -- strict streaming tar walker ----------------------------------------------------------


def _parse_octal(field: bytes) -> int:
    text = field.strip(b" \x00").split(b"\x00", 1)[0]
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise LayerFormatError(f"invalid octal field {field!r}") from None


def _parse_numeric(field: bytes) -> int:
    """Octal, or GNU base-256 when the high bit of the first byte is set (as Go reads it)."""
    if field and field[0] & 0x80:
        invert = 0xFF if field[0] & 0x40 else 0
        value = 0
        for i, byte in enumerate(field):
            byte ^= invert
            if i == 0:
                byte &= 0x7F
            if value >> 56:
                raise LayerFormatError("base-256 number overflows")
            value = (value << 8) | byte
        if value >> 63:
            raise LayerFormatError("base-256 number overflows")
        return ~value if invert else value
    return _parse_octal(field)


_HEADER_ONLY = frozenset(b"123456")  # hard link, symlink, char, block, dir, fifo: no data
_ZERO_BLOCK = bytes(TAR_BLOCK)
_PAX = frozenset(b"xg")
_GNU_LONG = frozenset(b"LK")
_PAX_LOCAL, _SPARSE = ord("x"), ord("S")


def _byte_sum(block: bytes) -> int:
    """sum(block) of a 512-byte header, computed in C: the low half of Adler-32 is
    1 + sum(bytes) mod 65521, and 256 bytes sum to at most 65280, so each half is exact.
    (A header is summed for every tar entry: this is several times faster than sum().)"""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


class TarStreamChecker:
    """Push parser over an uncompressed tar stream, as strict as Go's archive/tar reader.

    It verifies every header checksum and numeric field, follows pax `size` overrides,
    GNU long names and old GNU sparse extension blocks, and requires every member's data
    and padding to be present. A stream may end at a header boundary, after one or two
    zero blocks (Go accepts all three); anything after the end-of-archive marker is not
    read by unpackers and is ignored here too (it still counts for the diff_id)."""

    def __init__(self) -> None:
        self.entries = 0
        self.offset = 0
        self.ended = False
        self._header = bytearray()
        self._data_left = 0
        self._pad_left = 0
        self._collect: bytearray | None = None
        self._pax_size: int | None = None
        self._zero_blocks = 0
        self._sparse_extension = False
        self._deferred_data = 0

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end and not self.ended:
            if self._data_left:
                take = min(self._data_left, end - pos)
                if self._collect is not None:
                    self._collect += view[pos:pos + take]
                self._data_left -= take
                pos += take
                if not self._data_left and self._collect is not None:
                    self._pax_records(bytes(self._collect))
                    self._collect = None
                continue
            if self._pad_left:
                take = min(self._pad_left, end - pos)
                self._pad_left -= take
                pos += take
                continue
            if not self._header and end - pos >= TAR_BLOCK:
                block = view[pos:pos + TAR_BLOCK].tobytes()  # a whole header here: no copying twice
                pos += TAR_BLOCK
            else:
                take = min(TAR_BLOCK - len(self._header), end - pos)
                self._header += view[pos:pos + take]
                pos += take
                if len(self._header) < TAR_BLOCK:
                    continue
                block = bytes(self._header)
                self._header.clear()
            self._block(block)
            self.offset += TAR_BLOCK
        self.offset += pos if not self.ended else 0

    def finish(self) -> None:
        """Call at the end of the stream; raises LayerFormatError when it stopped mid-member."""
        if self.ended:
            return
        if self._header:
            raise LayerFormatError(f"stream ends inside a tar header (entry {self.entries + 1})")
        if self._data_left or self._pad_left or self._sparse_extension:
            raise LayerFormatError(f"stream ends inside the data of tar entry {self.entries}")

    def _start_data(self, size: int, *, collect: bool = False) -> None:
        self._data_left = size
        self._pad_left = -size % TAR_BLOCK
        self._collect = bytearray() if collect and size else None

    def _block(self, block: bytes) -> None:
        if self._sparse_extension:
            self._sparse_extension = block[504] != 0
            if not self._sparse_extension:
                self._start_data(self._deferred_data)
            return
        if block == _ZERO_BLOCK:
            self._zero_blocks += 1
            self.ended = self._zero_blocks == 2
            return
        if self._zero_blocks:
            raise LayerFormatError(f"a zero block is followed by a header at entry {self.entries + 1}")
        field = block[148:156]
        stored = _parse_octal(field)
        unsigned = _byte_sum(block) - sum(field) + 8 * 0x20
        if stored != unsigned:
            signed = unsigned - 256 * sum(1 for i, b in enumerate(block) if b > 127 and not 148 <= i < 156)
            if stored != signed:
                raise LayerFormatError(f"bad header checksum at entry {self.entries + 1} "
                                       f"(byte {self.offset} of the tar)")
        typeflag = block[156]
        size = _parse_numeric(block[124:136])
        if size < 0:
            raise LayerFormatError(f"negative size in tar entry {self.entries + 1}")
        if typeflag in _PAX:
            if size > MAX_SPECIAL_ENTRY:
                raise LayerFormatError("pax header larger than 1 MiB")
            self._start_data(size, collect=typeflag == _PAX_LOCAL)
            return
        if typeflag in _GNU_LONG:
            if size > MAX_SPECIAL_ENTRY:
                raise LayerFormatError("GNU long name larger than 1 MiB")
            self._start_data(size)
            return
        if self._pax_size is not None:
            size, self._pax_size = self._pax_size, None
        self.entries += 1
        if typeflag in _HEADER_ONLY:
            size = 0
        if typeflag == _SPARSE and block[482]:
            self._sparse_extension = True
            self._deferred_data = size
            return
        self._start_data(size)

    def _pax_records(self, data: bytes) -> None:
        """Read `<len> key=value\\n` records; only `size` matters for walking the stream."""
        pos = 0
        while pos < len(data):
            space = data.find(b" ", pos)
            if space < 0 or not data[pos:space].isdigit():
                raise LayerFormatError(f"malformed pax record in entry {self.entries + 1}")
            length = int(data[pos:space])
            record = data[space + 1:pos + length]
            if length <= space - pos or pos + length > len(data) or not record.endswith(b"\n") \
                    or b"=" not in record:
                raise LayerFormatError(f"malformed pax record in entry {self.entries + 1}")
            key, _, value = record[:-1].partition(b"=")
            if key == b"size":
                if not value.isdigit():
                    raise LayerFormatError(f"invalid pax size {value[:40]!r}")
                self._pax_size = int(value)
            pos += length


# -- one layer ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerUse:
    """One image that uses a layer: where, at which position, and which diff_id it expects."""

    repo: str
    manifest: str
    position: int
    media_type: str
    expected: str | None  # None: no config diff_id to compare with (schema1)
    config: str | None
    tags: tuple[str, ...]
    tar: bool = True  # False: an artifact blob (only the diff_id is compared, if any)


@dataclass
class LayerJob:
    digest: str
    path: str
    size: int
    uses: list[LayerUse] = field(default_factory=list)

    @property
    def tar(self) -> bool:
        """Walk the stream as a tar: some image uses the blob as a filesystem layer (a job
        without uses is a layer checked on its own: a tar too)."""
        return not self.uses or any(use.tar for use in self.uses)


@dataclass(frozen=True, slots=True)
class LayerOutcome:
    job: LayerJob
    compression: str  # what the bytes are
    diff_id: str | None  # sha256 of the uncompressed stream; None when it could not be read
    uncompressed_bytes: int
    tar_entries: int
    read_error: str | None = None
    decompress_error: str | None = None
    tar_error: str | None = None
    # What the blob's own bytes hash to (`alg:hex`, the algorithm of its name) and how many
    # were read: the plain re-hash, done in the same pass. None when unreadable or stopped.
    blob_digest: str | None = None
    bytes_read: int = 0


def blob_hasher(digest: str) -> Any:
    """A hasher for the algorithm `digest` is named with (None if regfsck does not know it)."""
    algorithm = digest.partition(":")[0]
    return new_hasher(algorithm) if algorithm in HASHERS else None


class _ChunkFeed:
    """A streaming read of an object (`Storage.iter_chunks`) as `readinto` calls, with the
    first bytes available to sniff before reading starts (no second request)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")

    def _fill(self) -> bool:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return False
        return True

    def head(self, n: int) -> bytes:
        """The first `n` bytes (fewer for a shorter object), left to be read again."""
        got = bytes(self._pending)
        while len(got) < n:
            try:
                got += next(self._chunks)
            except StopIteration:
                break
        self._pending = memoryview(got)
        return got[:n]

    def readinto(self, buffer: memoryview) -> int:
        """Fill `buffer` whole unless the object ends, as a read of a regular file does: the
        inflater then sees the same pieces as on disk, so even where a damaged stream
        stops (and how many bytes it gave before) is the same on both."""
        n = 0
        while n < len(buffer) and self._fill():
            take = min(len(buffer) - n, len(self._pending))
            buffer[n:n + take] = self._pending[:take]
            self._pending = self._pending[take:]
            n += take
        return n

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class _Source(io.RawIOBase):
    """The layer blob as a raw stream (a file descriptor or a streaming GET): hashes the
    compressed bytes, counts progress, feeds a frame checker, honours stop."""

    def __init__(self, read_into: Callable[[memoryview], int], frames: ZstdFrameChecker | None,
                 on_bytes: ProgressFn | None, stop: threading.Event | None, hasher: Any) -> None:
        self.read_into = read_into
        self.frames = frames
        self.on_bytes = on_bytes
        self.stop = stop
        self.hasher = hasher
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.stop is not None and self.stop.is_set():
            raise Interrupted
        n = self.read_into(memoryview(buffer).cast("B"))
        if n:
            view = memoryview(buffer)[:n]
            self.total += n
            if self.hasher is not None:
                self.hasher.update(view)
            if self.frames is not None:
                self.frames.feed(view)
            if self.on_bytes is not None:
                self.on_bytes(n)
        return n

    def drain(self, buffered: io.BufferedIOBase) -> None:
        """Read to the end (the bytes still count for the blob digest), checking no frames."""
        self.frames = None
        while buffered.read(BUFFER):
            pass


class GzipTrailingGarbage(ValueError):
    """Bytes after a gzip member that are neither zero padding nor another member."""


def gunzip(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """Inflate a gzip stream of one or more members, as Python's gzip module reads it.

    Members follow one another (pigz and parallel writers make such streams); zero bytes
    after a member are padding; a stream that stops inside a member raises EOFError; each
    member's CRC-32 and length are checked by the inflater. Output comes in chunks of at
    most BUFFER bytes, so a decompression bomb is walked in bounded memory."""
    member = deflate.gzip_decompressor()
    fed = False  # has the current member seen any byte?
    while True:
        data = read(BUFFER)
        if not data:
            break
        while data:
            if not fed:
                data = data.lstrip(b"\x00")
                if not data:
                    break
                if data[:1] != b"\x1f":
                    raise GzipTrailingGarbage(f"not a gzip member after the end of one "
                                              f"(bytes {data[:4]!r})")
                fed = True
            out = member.decompress(data, BUFFER)
            while True:
                if out:
                    yield out
                tail = member.unconsumed_tail
                if not tail or member.eof:
                    break
                out = member.decompress(tail, BUFFER)
            if member.eof:
                data = member.unused_data
                member, fed = deflate.gzip_decompressor(), False
            else:
                data = b""
    if fed:
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")


def _decompressed(buffered: io.BufferedIOBase, compression: str) -> Iterator[bytes]:
    if compression == "gzip":
        yield from gunzip(buffered.read1)
        return
    stream: Any
    if compression == "zstd":
        stream = zstandard.ZstdDecompressor().stream_reader(cast(BinaryIO, buffered), read_size=BUFFER,
                                                           read_across_frames=True)
    else:
        stream = buffered
    while True:
        chunk = stream.read(BUFFER)
        if not chunk:
            break
        yield chunk


_DECOMPRESS_ERRORS: tuple[type[Exception], ...] = (
    EOFError, GzipTrailingGarbage, zstandard.ZstdError, *deflate.ERRORS)


def _open_layer(storage: Storage, path: str) -> tuple[Callable[[memoryview], int], bytes,
                                                     Callable[[], None]]:
    """(read_into, first MAGIC_BYTES bytes, close) of a layer blob: a descriptor on a local tree, a
    streaming GET (`iter_chunks`, one request) on object storage."""
    if isinstance(storage, FilesystemStorage):
        fd = storage.open_fd_fast(path)
        try:
            head = os.pread(fd, MAGIC_BYTES, 0)
        except OSError as exc:
            os.close(fd)
            raise StorageError(exc.errno, f"cannot read {path}: {exc.strerror}", path) from exc
        return (lambda buffer: os.readv(fd, [buffer])), head, lambda: os.close(fd)
    feed = _ChunkFeed(storage.iter_chunks(path, BUFFER))
    try:
        head = feed.head(MAGIC_BYTES)
    except BaseException:
        feed.close()
        raise
    return feed.readinto, head, feed.close


def check_layer(storage: Storage, job: LayerJob, on_bytes: ProgressFn | None = None,
                stop: threading.Event | None = None) -> LayerOutcome:
    """Read one layer blob once: hash its bytes, decompress them, hash the result and walk it
    as a tar (bounded memory). A layer that cannot be decompressed is still read to its end,
    so its blob digest is known whatever the data is."""
    try:
        read_into, head, close = _open_layer(storage, job.path)
    except StorageError as exc:
        return LayerOutcome(job, "?", None, 0, 0, read_error=exc.message)
    hasher: Any = hashlib.sha256()
    tar = TarStreamChecker()
    tar_error: str | None = None
    decompress_error: str | None = None
    total = 0
    compression = "?"
    source = _Source(read_into, None, on_bytes, stop, blob_hasher(job.digest))
    try:
        compression = sniff_compression(head)
        frames = source.frames = ZstdFrameChecker() if compression == "zstd" else None
        buffered = io.BufferedReader(source, BUFFER)
        if compression in ("bzip2", "xz"):
            decompress_error = (f"{compression}-compressed: registries and runtimes expect gzip, "
                                "zstd or plain tar")
        else:
            try:
                # A plain tar named by sha256 is its own diff_id: one hash serves both.
                same = compression == "none" and job.digest.startswith("sha256:")
                if same:
                    hasher = source.hasher
                for chunk in _decompressed(buffered, compression):
                    if not same:
                        hasher.update(chunk)
                    total += len(chunk)
                    if tar_error is None and job.tar:
                        try:
                            tar.feed(chunk)
                        except LayerFormatError as exc:
                            tar_error = str(exc)
                if frames is not None:
                    while buffered.read(BUFFER):  # what follows the last frame must be frames too
                        pass
                    frames.finish()
            except LayerFormatError as exc:
                decompress_error = str(exc)
            except _DECOMPRESS_ERRORS as exc:
                decompress_error = (f"{compression} stream is truncated" if isinstance(exc, EOFError)
                                    else f"{compression} data is corrupt: {exc or type(exc).__name__}")
        source.drain(buffered)
    except OSError as exc:
        why = exc.message if isinstance(exc, StorageError) else \
            f"cannot read {job.path}: {exc.strerror or exc}"
        return LayerOutcome(job, compression, None, total, tar.entries, read_error=why)
    finally:
        close()
    blob_digest = (f"{job.digest.partition(':')[0]}:{source.hasher.hexdigest()}"
                   if source.hasher is not None else None)
    if decompress_error is not None:
        return LayerOutcome(job, compression, None, total, tar.entries,
                            decompress_error=decompress_error, blob_digest=blob_digest,
                            bytes_read=source.total)
    if tar_error is None and job.tar:
        try:
            tar.finish()
        except LayerFormatError as exc:
            tar_error = str(exc)
    return LayerOutcome(job, compression, f"sha256:{hasher.hexdigest()}", total, tar.entries,
                        tar_error=tar_error, blob_digest=blob_digest, bytes_read=source.total)


# -- which layers, and what each image expects of them --------------------------------------


@dataclass
class DeepSummary(Document):
    images: int = 0
    layers_total: int = 0
    layers_checked: int = 0
    bytes_total: int = 0
    bytes_read: int = 0
    bytes_uncompressed: int = 0
    tar_entries: int = 0
    interrupted: bool = False


@dataclass
class DeepReport:
    findings: list[Finding] = field(default_factory=list)
    summary: DeepSummary = field(default_factory=DeepSummary)

    def to_json(self) -> dict[str, Any]:
        return {"findings": [f.to_json() for f in self.findings], "summary": self.summary.to_json()}


class DeepProgress:
    """Callbacks a renderer implements (bytes of compressed layers read)."""

    def start(self, total_bytes: int, total_layers: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


def _manifest_tags(inv: Inventory, store: ManifestStore, repo_name: str) -> dict[str, set[str]]:
    """For each manifest of a repository, the tags that reach it (through indexes too)."""
    reach: dict[str, set[str]] = {}
    for tag, target in inv.repositories[repo_name].tag_targets().items():
        for digest, role, _ in walk(store, [target]):
            if role == "manifest":
                reach.setdefault(digest, set()).add(tag)
    return reach


class _Collector:
    """Builds one job per layer blob from every image manifest in scope (reads configs)."""

    def __init__(self, storage: Storage, inv: Inventory, store: ManifestStore) -> None:
        self.storage = storage
        self.inv = inv
        self.store = store
        self.jobs: dict[str, LayerJob] = {}
        self.findings = FindingSet()
        self.images = 0
        self._configs: dict[str, list[str] | str] = {}  # digest -> diff_ids or why unusable

    def add_repository(self, name: str) -> None:
        tags = _manifest_tags(self.inv, self.store, name)
        for digest in sorted(valid_revisions(self.inv.repositories[name])):
            manifest = self.store.get(digest)
            if manifest is not None:
                self._add_manifest(name, digest, manifest, tuple(sorted(tags.get(digest, ()))))

    def _add_manifest(self, repo: str, digest: str, manifest: Manifest, tags: tuple[str, ...]) -> None:
        if manifest.kind is ManifestKind.SCHEMA1:
            self.images += 1
            for position, layer in enumerate(manifest.layers):
                self._use(layer.digest, LayerUse(repo, digest, position, "", None, None, tags))
            return
        if manifest.kind not in (ManifestKind.DOCKER_MANIFEST, ManifestKind.OCI_MANIFEST):
            return
        config = manifest.config
        if config is None or config.media_type not in IMAGE_CONFIG_TYPES:
            return  # an artifact: its "layers" are not filesystem tars
        diff_ids = self._diff_ids(config.digest)
        if diff_ids is None:
            return  # config blob missing: verify's structural checks report it
        if isinstance(diff_ids, str):
            self._config_finding(repo, digest, config.digest, diff_ids, tags)
            return
        if len(diff_ids) != len(manifest.layers):
            self._config_finding(repo, digest, config.digest,
                                 f"lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers",
                                 tags)
            return
        self.images += 1
        for position, (layer, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True)):
            if "+encrypted" in layer.media_type:
                continue  # stored `urls` layers are checked too
            tar = is_tar_layer(layer.media_type)
            if not tar and diff_id == layer.digest:
                continue  # an uncompressed artifact blob: verify's digest check is the diff_id check
            self._use(layer.digest, LayerUse(repo, digest, position, layer.media_type, diff_id,
                                             config.digest, tags, tar))

    def _use(self, digest: str, use: LayerUse) -> None:
        digest = self.store.reach.resolve(digest) or digest  # a sha512 alias: its stored blob
        blob = self.inv.blobs.get(digest)
        if blob is None:
            return  # missing layers are verify's reference_missing findings
        job = self.jobs.get(digest)
        if job is None:
            job = self.jobs[digest] = LayerJob(digest, blob.path, blob.size)
        job.uses.append(use)

    def _diff_ids(self, config_digest: str) -> list[str] | str | None:
        if config_digest in self._configs:
            return self._configs[config_digest]
        blob = self.inv.blobs.get(config_digest)
        if blob is None:
            return None
        result: list[str] | str
        try:
            doc = json.loads(self.storage.read_small(blob.path, CONFIG_LIMIT))
        except StorageError as exc:
            result = f"cannot be read: {exc.message}"
        except (ValueError, RecursionError) as exc:  # a config nested absurdly deep, too
            result = f"is not JSON: {exc}"[:200]
        else:
            rootfs = doc.get("rootfs") if isinstance(doc, dict) else None
            ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
            if not isinstance(ids, list) or not all(isinstance(d, str) for d in ids):
                result = "has no rootfs.diff_ids list"
            else:
                result = list(ids)
        self._configs[config_digest] = result
        return result

    def _config_finding(self, repo: str, manifest: str, config: str, why: str,
                        tags: tuple[str, ...]) -> None:
        self.findings.add(make_finding(
            "config_diff_ids_invalid", layout.blob_data(config),
            f"config {config} of image {manifest} {why}: its layers cannot be checked and "
            "runtimes refuse the image", repo=repo, digest=config, affected_tags=tags))


def _image_name(use: LayerUse) -> str:
    tags = f" (tags {', '.join(use.tags)})" if use.tags else " (untagged)"
    return f"image {use.manifest}{tags}"


def outcome_findings(outcome: LayerOutcome) -> list[Finding]:
    """Judge one layer's outcome against every image that uses it."""
    job = outcome.job
    path = layout.blob_data(job.digest)
    found: list[Finding] = []
    for use in job.uses:
        where = f"layer {use.position} ({job.digest}) of {_image_name(use)}"

        def add(kind: str, message: str, use: LayerUse = use) -> None:
            found.append(make_finding(kind, path, message, repo=use.repo, digest=job.digest,
                                      affected_tags=use.tags))

        if outcome.read_error is not None:
            add("blob_unreadable", f"{where}: {outcome.read_error}")
            continue
        if not use.tar:  # an artifact blob: only the diff_id its config lists
            if outcome.decompress_error is not None:
                add("layer_diff_id_mismatch", f"{where}: artifact blob ({use.media_type}) cannot "
                    f"be decompressed ({outcome.decompress_error}) to check the diff_id "
                    f"{use.expected} config {use.config} declares")
            elif use.expected is not None and outcome.diff_id != use.expected:
                add("layer_diff_id_mismatch",
                    f"{where}: artifact blob ({use.media_type}) hashes to {outcome.diff_id} "
                    f"uncompressed, but config {use.config} declares {use.expected}")
            continue
        declared = declared_compression(use.media_type)
        if declared is not None and outcome.compression not in ("?", declared):
            add("layer_compression_mismatch", f"{where}: media type {use.media_type} says "
                f"{declared} but the data is {outcome.compression}")
        if outcome.decompress_error is not None:
            add("layer_decompress_error", f"{where}: {outcome.decompress_error}")
            continue
        if outcome.tar_error is not None:
            add("layer_not_tar", f"{where}: not a readable tar stream: {outcome.tar_error}")
        if use.expected is not None and outcome.diff_id != use.expected:
            add("layer_diff_id_mismatch",
                f"{where}: uncompressed content hashes to {outcome.diff_id} "
                f"({outcome.uncompressed_bytes} bytes) but config {use.config} declares "
                f"{use.expected}")
    return found


def _bounded_map(submit: Callable[[LayerJob], Future[Any]],
                 jobs: Iterable[LayerJob], limit: int,
                 stop: threading.Event, tick: Callable[[], None] | None = None
                 ) -> Iterator[Any]:
    """Run `submit`ted work over `jobs` with at most `limit` in flight, yielding results as
    they finish. `tick` runs while waiting, every 0.1 s (to pass a stop on to worker processes)."""
    pending: set[Future[Any]] = set()

    def finished() -> set[Future[Any]]:
        nonlocal pending
        while True:
            done, pending = wait(pending, timeout=0.1 if tick else None,
                                 return_when=FIRST_COMPLETED)
            if tick is not None:
                tick()
            if done:
                return done

    try:
        for job in jobs:
            if stop.is_set():
                break
            pending.add(submit(job))
            if len(pending) >= limit:
                yield from _results(finished())
        while pending:
            yield from _results(finished())
    finally:
        if pending:  # left early (an error in the consumer): running layers stop at the next read
            stop.set()
            if tick is not None:
                tick()
        for future in pending:
            future.cancel()


def _results(done: Iterable[Future[Any]]) -> Iterator[Any]:
    for future in done:
        try:
            yield future.result()
        except Interrupted:
            continue


@dataclass
class DeepPlan:
    """What --deep will read: one job per layer blob (largest first), and what was already
    found reading the image configs."""

    jobs: list[LayerJob]
    images: int
    findings: FindingSet


def _prefetch_configs(storage: Storage, inv: Inventory, store: ManifestStore,
                      repos: set[str] | None) -> None:
    """Object storage: read every image config in scope with concurrent GETs before the
    collector asks for them one by one (a local tree reads each when asked)."""
    if isinstance(storage, FilesystemStorage):
        return
    paths: set[str] = set()
    for name, repo in inv.repositories.items():
        if repos is not None and name not in repos:
            continue
        for digest in valid_revisions(repo):
            manifest = store.get(digest)
            config = manifest.config if manifest is not None else None
            blob = inv.blobs.get(config.digest) if config is not None and \
                config.media_type in IMAGE_CONFIG_TYPES else None
            if blob is not None:
                paths.add(blob.path)
    if paths:
        storage.prefetch(paths.__contains__, lambda _: (), CONFIG_LIMIT)


def plan_deep(storage: Storage, inv: Inventory, store: ManifestStore,
              repos: set[str] | None = None) -> DeepPlan:
    """Collect the layers of every image manifest (in `repos`, or everywhere)."""
    collector = _Collector(storage, inv, store)
    _prefetch_configs(storage, inv, store, repos)
    for name in sorted(inv.repositories):
        if repos is None or name in repos:
            collector.add_repository(name)
    jobs = sorted(collector.jobs.values(), key=lambda j: j.size, reverse=True)
    return DeepPlan(jobs, collector.images, collector.findings)


def check_layers(storage: Storage, plan: DeepPlan, *, jobs: int = 1,
                 progress: DeepProgress | None = None, stop: threading.Event | None = None,
                 on_outcome: Callable[[LayerOutcome], None] | None = None) -> DeepReport:
    """Read every planned layer once (`jobs` at a time) and judge it.

    `on_outcome` sees each layer's outcome as it completes, on the calling thread: verify
    takes the blob digests from it instead of reading the layers a second time."""
    summary = DeepSummary(images=plan.images, layers_total=len(plan.jobs))
    summary.bytes_total = sum(j.size for j in plan.jobs)
    findings = FindingSet()
    findings.extend(plan.findings.findings())
    halt = stop if stop is not None else threading.Event()
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            summary.bytes_read += n
        if progress is not None:
            progress.advance(n)

    if progress is not None:
        progress.start(summary.bytes_total, summary.layers_total)
    workers = max(1, jobs)
    remote = not isinstance(storage, FilesystemStorage)
    if remote:
        # Object storage: a small layer costs a request's latency, not CPU, so `jobs` threads
        # keep that many GETs in flight; large layers cost CPU (inflate, hash, tar walk under
        # the GIL) and go to one spawned process per CPU, each streaming its own GET.
        big = [j for j in plan.jobs if j.size > REMOTE_SMALL_LAYER]
        procs = (_process_pool(storage, min(workers, os.cpu_count() or 1))
                 if len(big) > 1 and workers > 1 else None)
    else:
        procs = _process_pool(storage, workers) if workers > 1 and len(plan.jobs) > 1 else None
    threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="regfsck-deep")
    tick: Callable[[], None] | None = None

    def submit(job: LayerJob) -> Future[Any]:
        if procs is not None and (not remote or job.size > REMOTE_SMALL_LAYER):
            return procs[0].submit(_check_in_worker, job)
        return threads.submit(check_layer, storage, job, advance, halt)

    if procs is not None:
        process_stop = procs[1]

        def tick() -> None:
            if halt.is_set():
                process_stop.set()

    try:
        for result in _bounded_map(submit, plan.jobs, 2 * workers, halt, tick):
            if isinstance(result, tuple):  # from a worker process: progress per layer
                outcome, requests = result
                if requests:
                    _merge_requests(requests)
                advance(outcome.bytes_read or outcome.job.size)
            else:
                outcome = result
            summary.layers_checked += 1
            summary.bytes_uncompressed += outcome.uncompressed_bytes
            summary.tar_entries += outcome.tar_entries
            findings.extend(outcome_findings(outcome))
            if on_outcome is not None:
                on_outcome(outcome)
    finally:
        threads.shutdown(wait=True, cancel_futures=True)
        if procs is not None:
            procs[0].shutdown(wait=True, cancel_futures=True)
        if progress is not None:
            progress.finish()
    summary.interrupted = stop is not None and stop.is_set()
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    result = sorted(findings.findings(), key=lambda f: (order[f.severity], f.kind, f.path, f.repo or ""))
    return DeepReport(result, summary)


def _merge_requests(counts: dict[str, int]) -> None:
    from regfsck.objectstore import REQUESTS

    REQUESTS.merge(counts)


_worker_storage: Storage | None = None
_worker_stop: Any = None


def _worker_init(spec: StorageSpec, stop: Any) -> None:
    """A deep worker process: Ctrl-C is the parent's to handle (it sets `stop`). It reopens
    the parent's tree from `spec`: a local directory, or the bucket (not listed again)."""
    global _worker_storage, _worker_stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_storage = spec.open()
    _worker_stop = stop


def _check_in_worker(job: LayerJob) -> tuple[LayerOutcome, dict[str, int]]:
    """One layer in a worker process, with the requests it made (object storage bills them:
    the parent adds them to its own count)."""
    assert _worker_storage is not None
    outcome = check_layer(_worker_storage, job, None, _worker_stop)
    counter = sys.modules.get("regfsck.objectstore")
    return outcome, counter.REQUESTS.take() if counter is not None else {}


def _process_pool(storage: Storage, jobs: int) -> tuple[ProcessPoolExecutor, Any] | None:
    """`jobs` worker processes for the layers, and the event that stops them.

    Threads do not scale here: the tar walk and the glue between inflater and hashers run
    under the GIL, and on a busy machine two threads handing it back and forth ran slower
    than one. Processes share nothing; they run only check_layer (os, hashlib, the
    inflaters, streaming GETs). On a local tree they are forked (nothing is re-imported,
    and no lock another thread may hold at fork time is taken); for object storage they
    are spawned, because the object-store client's runtime does not survive a fork.
    Where processes cannot start, threads do the work. REGFSCK_DEEP_PROCESSES=0 forces
    threads."""
    if os.environ.get("REGFSCK_DEEP_PROCESSES") == "0":
        return None
    spec = worker_spec(storage)
    if spec is None:
        return None
    try:
        context = multiprocessing.get_context("fork" if spec.fork_safe else "spawn")
    except ValueError:
        return None
    stop = context.Event()
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                               initargs=(spec, stop))
    try:
        pool.submit(os.getpid).result()  # starts every worker now
    except Exception:  # cannot start processes here (limits, sandbox): threads only
        pool.shutdown(wait=False, cancel_futures=True)
        return None
    return pool, stop


def run_deep(root: RegistryRoot, *, jobs: int = 1, repos: set[str] | None = None,
             inventory: Inventory | None = None, progress: DeepProgress | None = None,
             stop: threading.Event | None = None) -> DeepReport:
    """Check every layer of every image manifest (in `repos`, or everywhere)."""
    storage = open_storage(root)
    inv = inventory if inventory is not None else Scanner(storage, root).scan()
    plan = plan_deep(storage, inv, ManifestStore(storage, inv), repos)
    return check_layers(storage, plan, jobs=jobs, progress=progress, stop=stop)
