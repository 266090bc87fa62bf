"""Where `repair --from` finds good copies of blobs: registry roots, OCI layouts, archives.

A source only answers "do you have digest D?" and hands out a stream of its bytes; the
caller verifies every byte against D before anything reaches the tree. Directory sources
(another registry root, an OCI image layout such as `skopeo copy ... oci:DIR`, a
`skopeo copy ... dir:DIR` copy, whose manifests are found by hashing `*manifest.json`) are read
in place through the storage seam (no symlink is followed). Archives (`oci-archive`, a
tar of a layout, plain or .gz/.zst compressed) cannot be read at random, so the blobs a
repair needs are spooled, verified, into a scratch directory under ROOT/regfsck-state
in one streaming pass and served from there.
"""

from __future__ import annotations

import gzip
import hashlib
import secrets
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

import zstandard

from regfsck import layout
from regfsck.digest import DigestError, parse_digest
from regfsck.root import RegistryRoot, RootError, locate
from regfsck.storage import FilesystemStorage, StorageError

SCRATCH_DIR = "regfsck-state"
CHUNK = 1 << 20


class SourceError(Exception):
    """A --from SOURCE that cannot be read (the message says what was expected)."""


def _layout_blob(digest: str) -> str:
    algorithm, hex_part = layout.split_digest(digest)
    return f"blobs/{algorithm}/{hex_part}"


def _member_digest(name: str) -> str | None:
    """`blobs/<alg>/<hex>` (optionally under `./`) as a digest; None for anything else."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if len(parts) != 3 or parts[0] != "blobs":
        return None
    try:
        return str(parse_digest(f"{parts[1]}:{parts[2]}"))
    except DigestError:
        return None


def hash_stream(stream: IO[bytes], algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    while chunk := stream.read(CHUNK):
        hasher.update(chunk)
    return f"{algorithm}:{hasher.hexdigest()}"


class BlobSource:
    """One --from SOURCE: `size(d)` to ask, `verify` to prove copies good, `open(d)` to read."""

    label: str = ""
    kind: str = ""

    def __init__(self) -> None:
        self.verified: set[str] = set()
        self.bad: set[str] = set()

    def size(self, digest: str) -> int | None:
        """Size of the source's copy of `digest`, None when it has none."""
        raise NotImplementedError

    def verify(self, digests: set[str]) -> set[str]:
        """Hash the source's copies of `digests`; returns those whose bytes match."""
        raise NotImplementedError

    def read_small(self, digest: str, limit: int) -> bytes:
        """The bytes of a verified small blob (a manifest), for planning."""
        raise NotImplementedError

    def open(self, digest: str) -> BinaryIO:
        raise NotImplementedError

    def prepare(self, digests: set[str], root: RegistryRoot) -> None:
        """Make `digests` readable with `open` (archives spool them); directories need nothing."""

    def close(self) -> None:
        """Remove anything `prepare` wrote."""


class DirectorySource(BlobSource):
    """A registry root (blobs under `blobs/<alg>/<xx>/<hex>/data`) or an OCI layout."""

    def __init__(self, label: str, kind: str, storage: FilesystemStorage) -> None:
        super().__init__()
        self.label = label
        self.kind = kind
        self.storage = storage
        self.manifests: dict[str, str] = {}  # skopeo dir: manifest digest -> file name
        if kind == "skopeo-dir":
            for entry in storage.list_dir(""):
                if entry.kind.value == "file" and (entry.name == "manifest.json"
                                                   or entry.name.endswith(".manifest.json")):
                    with storage.open_read(entry.name) as stream:
                        self.manifests[hash_stream(stream, "sha256")] = entry.name

    def _path(self, digest: str) -> str:
        if self.kind == "registry":
            return layout.blob_data(digest)
        if self.kind == "skopeo-dir":
            return self.manifests.get(digest) or layout.split_digest(digest)[1]
        return _layout_blob(digest)

    def size(self, digest: str) -> int | None:
        try:
            st = self.storage.stat(self._path(digest))
        except StorageError:
            return None
        return st.size if st is not None and st.kind.value == "file" else None

    def verify(self, digests: set[str]) -> set[str]:
        for digest in sorted(digests - self.verified - self.bad):
            if self.size(digest) is None:
                continue
            try:
                with self.open(digest) as stream:
                    good = hash_stream(stream, digest.partition(":")[0]) == digest
            except StorageError:
                good = False
            (self.verified if good else self.bad).add(digest)
        return digests & self.verified

    def read_small(self, digest: str, limit: int) -> bytes:
        return self.storage.read_small(self._path(digest), limit)

    def open(self, digest: str) -> BinaryIO:
        return self.storage.open_read(self._path(digest))


def _open_archive_stream(path: Path) -> tuple[IO[bytes], str]:
    """The tar stream inside `path` (decompressed by magic bytes) and its compression."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the wrapper
    head = raw.read(4)
    raw.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), "gzip"  # type: ignore[return-value]
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                            closefd=True)
        return reader, "zstd"
    return raw, "none"


@contextmanager
def _members(path: Path) -> Iterator[Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]]:
    stream, _ = _open_archive_stream(path)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            yield ((member, tar) for member in tar)
    except (tarfile.TarError, OSError, EOFError, zstandard.ZstdError) as exc:
        raise SourceError(f"{path}: not a readable tar archive ({exc})") from exc
    finally:
        stream.close()


class ArchiveSource(BlobSource):
    """An OCI archive (tar of a layout; plain, gzip or zstd): indexed once, spooled on demand."""

    SMALL = 4 * 1024 * 1024  # manifests are kept in memory when verified (for planning)

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.label = str(path)
        self.kind = "oci-archive"
        self.path = path
        self.sizes: dict[str, int] = {}
        self._small: dict[str, bytes] = {}
        with _members(path) as members:
            for member, _ in members:
                digest = _member_digest(member.name)
                if digest is not None and member.isfile():
                    self.sizes.setdefault(digest, member.size)
        if not self.sizes:
            raise SourceError(f"{path}: no blobs/<alg>/<hex> entries (not an OCI archive)")
        self._scratch: FilesystemStorage | None = None
        self._dir = ""
        self._spooled: set[str] = set()

    def size(self, digest: str) -> int | None:
        return self.sizes.get(digest)

    def verify(self, digests: set[str]) -> set[str]:
        """One streaming pass hashing the wanted members (nothing is written)."""
        wanted = {d for d in digests if d in self.sizes} - self.verified - self.bad
        if wanted:
            with _members(self.path) as members:
                for member, tar in members:
                    digest = _member_digest(member.name)
                    if digest not in wanted or not member.isfile():
                        continue
                    wanted.discard(digest)
                    stream = tar.extractfile(member)
                    if stream is None:
                        self.bad.add(digest)
                        continue
                    small = member.size <= self.SMALL
                    data = stream.read() if small else b""
                    algorithm = digest.partition(":")[0]
                    actual = (f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}" if small
                              else hash_stream(stream, algorithm))
                    if actual == digest:
                        self.verified.add(digest)
                        if small:
                            self._small[digest] = data
                    else:
                        self.bad.add(digest)
        return digests & self.verified

    def read_small(self, digest: str, limit: int) -> bytes:
        data = self._small.get(digest)
        if data is None or len(data) > limit:
            raise StorageError(None, f"{digest} is not a small verified blob of {self.label}",
                               digest)
        return data

    def prepare(self, digests: set[str], root: RegistryRoot) -> None:
        wanted = {d for d in digests if d in self.sizes} - self._spooled
        if not wanted:
            return
        self._scratch = FilesystemStorage(root.root)
        if self._scratch.stat(SCRATCH_DIR) is None:
            self._scratch.make_dir(SCRATCH_DIR, 0o700)
        if not self._dir:
            self._dir = f"{SCRATCH_DIR}/repair-spool-{secrets.token_hex(4)}"
            self._scratch.make_dir(self._dir, 0o700)
        with _members(self.path) as members:
            for member, tar in members:
                digest = _member_digest(member.name)
                if digest not in wanted or not member.isfile() or digest in self._spooled:
                    continue
                stream = tar.extractfile(member)
                if stream is not None and self._spool(digest, stream):
                    self._spooled.add(digest)

    def _spool(self, digest: str, stream: IO[bytes]) -> bool:
        """Copy one member into the scratch dir; keep it only if it hashes to `digest`."""
        assert self._scratch is not None
        algorithm = digest.partition(":")[0]
        hasher = hashlib.new(algorithm)

        def chunks() -> Iterator[bytes]:
            while chunk := stream.read(CHUNK):
                hasher.update(chunk)
                yield chunk

        path = f"{self._dir}/{digest.replace(':', '-')}"
        self._scratch.write_new_file(path, chunks())
        if f"{algorithm}:{hasher.hexdigest()}" != digest:
            self._scratch.remove_file(path)
            return False
        return True

    def open(self, digest: str) -> BinaryIO:
        if self._scratch is None or digest not in self._spooled:
            raise StorageError(None, f"{digest} is not in {self.label} (or its copy is corrupt)",
                               digest)
        return self._scratch.open_read(f"{self._dir}/{digest.replace(':', '-')}")

    def close(self) -> None:
        if self._scratch is not None and self._dir:
            self._scratch.remove_tree(self._dir)
            self._dir = ""
            self._spooled.clear()


def open_source(path: Path) -> BlobSource:
    """Recognise SOURCE: a registry root or v2 dir, an OCI layout dir, or an OCI archive."""
    if path.is_symlink():
        raise SourceError(f"{path} is a symbolic link; give the real path")
    if path.is_dir():
        try:
            root = locate(path)
            return DirectorySource(str(path), "registry", FilesystemStorage(root.v2))
        except RootError:
            pass
        if (path / "blobs").is_dir() and ((path / "oci-layout").is_file()
                                          or (path / "index.json").is_file()):
            return DirectorySource(str(path), "oci-layout", FilesystemStorage(path))
        version = path / "version"
        if version.is_file() and version.read_bytes().startswith(b"Directory Transport Version"):
            return DirectorySource(str(path), "skopeo-dir", FilesystemStorage(path))
        raise SourceError(f"{path} is neither a registry root (docker/registry/v2), an OCI "
                          "layout (oci-layout, index.json, blobs/) nor a skopeo dir: copy")
    if path.is_file():
        return ArchiveSource(path)
    raise SourceError(f"{path} does not exist")
