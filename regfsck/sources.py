"""Reading OCI sources: what `import` reads, and where `repair --from` finds good copies.

One reader for every kind of source, so both commands (and the tests) prove bytes the
same way:

* an OCI image layout directory (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`), as
  `regfsck export --format oci` and `skopeo copy ... oci:DIR` write it, read in place;
* a tar of one (`oci-archive`), plain, .gz or .zst (told apart by magic bytes, not by
  name), or any tar holding `blobs/<alg>/<hex>` (regfsck's docker-archive): a tar cannot be
  read at random, so it is streamed: once when opened (its index.json, its manifests and
  the hash of every blob), once more for the blobs a caller copies, each verified again;
* for `repair --from` only: another registry root and a skopeo `dir:` copy (whose manifests
  are found by hashing its `*manifest.json` files).

The caller says what it needs: `open_layout` (import: an OCI layout, with index.json) or
`open_blob_source` (repair: anything that holds blobs). Every byte handed out is checked
against its digest (`hashing.verified`); directories are read through the storage seam (no
symlink is followed, no FIFO blocks); bad or hostile input ends in one `SourceError`
(a one-line message and a reason), never a traceback.
"""

from __future__ import annotations

import json
import secrets
import tarfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, BinaryIO

from regfsck import layout
from regfsck.compression import READ_ERRORS, DecompressedReader
from regfsck.digest import DigestError, parse_digest, quote_bytes
from regfsck.errors import REASON_EXIT, ExitCode, RegfsckError
from regfsck.hashing import (
    DigestMismatch,
    ProgressFn,
    ProvenChunks,
    digest_of,
    hash_file,
    hash_stream,
    proven,
    read_chunks,
)
from regfsck.manifest import MAX_MANIFEST_BYTES
from regfsck.root import RegistryRoot, RootError, locate
from regfsck.storage import FilesystemStorage, StorageError

INDEX_JSON = "index.json"
OCI_LAYOUT = "oci-layout"
CHUNK = 1 << 20
INDEX_LIMIT = 64 << 20
KEPT_MANIFEST_LIMIT = 256 << 20  # manifests held in memory while an archive streams past
SCRATCH_DIR = layout.STATE_DIR  # archive blobs `repair --from` needs are spooled under it
_ARCHIVE_ERRORS: tuple[type[Exception], ...] = (tarfile.TarError, *READ_ERRORS)


class SourceError(RegfsckError):
    """A source that cannot be read as asked; `reason` is "usage" (not such a source),
    "damage" (bad bytes in it) or "io" (cannot be opened), and decides the exit code
    (2, 1, 3) unless the caller knows better (`exit_code`)."""

    def __init__(self, message: str, reason: str = "usage", *,
                 exit_code: ExitCode | None = None) -> None:
        super().__init__(message, exit_code=exit_code or REASON_EXIT[reason])
        self.reason = reason


def oci_blob_path(digest: str) -> str:
    """Where an OCI image layout keeps a blob: `blobs/<alg>/<hex>`."""
    return "/".join(("blobs", *layout.split_digest(digest)))


def oci_blob_digest(name: str) -> str | None:
    """`blobs/<alg>/<hex>` (optionally under `./`) as a digest; None for anything else."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if len(parts) != 3 or parts[0] != "blobs":
        return None
    try:
        return str(parse_digest(f"{parts[1]}:{parts[2]}"))
    except DigestError:
        return None


def check_layout_version(raw: bytes) -> str | None:
    """Why an `oci-layout` file is not one regfsck reads (None: imageLayoutVersion 1.x)."""
    try:
        version = json.loads(raw).get("imageLayoutVersion")
    except (ValueError, RecursionError, AttributeError):
        version = None
    if not isinstance(version, str) or not version.startswith("1."):
        return f"unsupported oci-layout {quote_bytes(raw[:80])} (expected imageLayoutVersion 1.x)"
    return None


def corrupt_message(what: str, mismatch: DigestMismatch) -> str:
    return (f"{what}: blob {mismatch.expected} is corrupt (its {mismatch.total} bytes hash to "
            f"{mismatch.actual})")


class Source:
    """A source of blobs, each proven against its digest before anyone uses it.

    `corrupt` maps the digests whose copy is bad to why; `verify` proves copies (a
    directory hashes them now, an archive did when it was opened). `stream` hands out
    verified chunks (consume them in order); `prepare` + `open` serve `repair`, which
    takes its copies one at a time inside a run (an archive spools them first)."""

    def __init__(self, label: str, kind: str) -> None:
        self.label = label
        self.kind = kind  # "oci-layout", "oci-archive", "registry" or "skopeo-dir"
        self.corrupt: dict[str, str] = {}

    def size(self, digest: str) -> int | None:
        """The size of the source's copy of `digest`; None when it has none."""
        raise NotImplementedError

    def index_bytes(self) -> bytes:
        """The layout's index.json (SourceError when the source is no OCI layout)."""
        raise SourceError(f"{self.label} is not an OCI image layout (no {INDEX_JSON})")

    def read_manifest(self, digest: str) -> bytes:
        """The verified bytes of a manifest (SourceError when corrupt or not a manifest)."""
        raise NotImplementedError

    def verify(self, digests: Iterable[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> set[str]:
        """Prove the copies of `digests`; returns those that are good (the bad ones are in
        `corrupt`, those the source lacks in neither)."""
        raise NotImplementedError

    def stream(self, digests: set[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> Iterator[tuple[str, int, ProvenChunks]]:
        """(digest, size, verified chunks) once for each wanted blob; the chunks raise
        SourceError after the last one when the bytes are not the blob."""
        raise NotImplementedError

    def prepare(self, digests: set[str], root: RegistryRoot) -> None:
        """Make `digests` readable with `open` (directories need nothing)."""

    def open(self, digest: str) -> BinaryIO:
        """The source's copy of `digest` as a file (after `prepare`); StorageError if none."""
        raise NotImplementedError

    def close(self) -> None:
        """Remove anything `prepare` wrote."""

    def _proven(self, chunks: Iterable[bytes], digest: str, size: int,
                on_bytes: ProgressFn | None, stop: threading.Event | None) -> ProvenChunks:
        return proven(chunks, digest, size, on_bytes=on_bytes, stop=stop,
                      failure=lambda exc: SourceError(corrupt_message(self.label, exc), "damage"))


class DirectorySource(Source):
    """A directory read in place: an OCI layout, a registry root or a skopeo `dir:` copy."""

    def __init__(self, label: str, kind: str, storage: FilesystemStorage) -> None:
        super().__init__(label, kind)
        self.storage = storage
        self._sizes: dict[str, int | None] = {}
        self._good: set[str] = set()
        self._manifests: dict[str, str] = {}  # skopeo dir: manifest digest -> file name
        if kind == "skopeo-dir":
            for entry in storage.list_dir(""):
                if entry.kind.value == "file" and (entry.name == "manifest.json"
                                                   or entry.name.endswith(".manifest.json")):
                    with storage.open_read(entry.name) as stream:
                        self._manifests[hash_stream(stream, "sha256")[0]] = entry.name

    def _path(self, digest: str) -> str:
        if self.kind == "registry":
            return layout.blob_data(digest)
        if self.kind == "skopeo-dir":
            return self._manifests.get(digest) or layout.split_digest(digest)[1]
        return oci_blob_path(digest)

    def size(self, digest: str) -> int | None:
        if digest not in self._sizes:
            try:
                st = self.storage.stat(self._path(digest))
            except StorageError:
                st = None
            self._sizes[digest] = st.size if st is not None and st.kind.value == "file" else None
        return self._sizes[digest]

    def index_bytes(self) -> bytes:
        if self.kind != "oci-layout":
            return super().index_bytes()
        return self.storage.read_small(INDEX_JSON, INDEX_LIMIT)

    def read_manifest(self, digest: str) -> bytes:
        try:
            raw = self.storage.read_small(self._path(digest), MAX_MANIFEST_BYTES)
        except StorageError as exc:
            raise SourceError(f"{self.label}: manifest {digest}: {exc.message}", "damage") from exc
        actual = digest_of(raw, digest.partition(":")[0])
        if actual != digest:
            raise SourceError(f"{self.label}: manifest {digest} is corrupt (its bytes hash to "
                              f"{actual})", "damage")
        return raw

    def verify(self, digests: Iterable[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> set[str]:
        wanted = set(digests)
        for digest in sorted(wanted - self._good - set(self.corrupt)):
            size = self.size(digest)
            if size is None:
                continue
            try:
                actual, total = hash_file(self.storage, self._path(digest),
                                          digest.partition(":")[0], on_bytes, stop)
            except StorageError as exc:
                self.corrupt[digest] = exc.message
                continue
            if actual == digest and total == size:
                self._good.add(digest)
            else:
                self.corrupt[digest] = corrupt_message(
                    self.label, DigestMismatch(digest, actual, total, size))
        return wanted & self._good

    def _chunks(self, digest: str) -> Iterator[bytes]:
        with self.storage.open_read(self._path(digest)) as stream:
            yield from read_chunks(stream)

    def stream(self, digests: set[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> Iterator[tuple[str, int, ProvenChunks]]:
        for digest in sorted(digests):
            size = self.size(digest)
            if size is None:
                raise SourceError(f"{self.label}: blob {digest} disappeared", "damage")
            yield digest, size, self._proven(self._chunks(digest), digest, size, on_bytes, stop)

    def open(self, digest: str) -> BinaryIO:
        return self.storage.open_read(self._path(digest))


class ArchiveSource(Source):
    """A tar of blobs (an oci-archive; plain, gzip or zstd), read as a stream.

    Opening reads it whole once: index.json and oci-layout, the size and hash of every
    `blobs/<alg>/<hex>` member, and the bytes of the manifests (bounded). Later passes
    (`stream`, `prepare`) take each blob from the member that proved good."""

    def __init__(self, path: Path, on_bytes: ProgressFn | None = None,
                 stop: threading.Event | None = None) -> None:
        super().__init__(str(path), "oci-archive")
        self.path = path
        self.blob_sizes: dict[str, int] = {}
        self._member: dict[str, int] = {}  # digest -> position of the member that holds it
        self._manifests: dict[str, bytes] = {}
        self._index: bytes | None = None
        self._layout_seen = False
        self._not_a_layout: str | None = None  # why index.json cannot be used
        self._scratch: FilesystemStorage | None = None
        self._dir = ""
        self._spooled: set[str] = set()
        self._scan(on_bytes, stop)

    def _members(self, on_bytes: ProgressFn | None, stop: threading.Event | None
                 ) -> Iterator[tuple[int, str, tarfile.TarInfo, tarfile.TarFile]]:
        """(position, normalised name, member, tar) for every member, in order (a fresh
        stream each call)."""
        try:
            raw = open(self.path, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise SourceError(f"cannot open {self.path}: {exc.strerror}", "io") from exc
        reader: DecompressedReader | None = None
        try:
            reader = DecompressedReader(raw, on_bytes, stop)
            if reader.compression in ("bzip2", "xz"):
                raise SourceError(f"the archive {self.path} is {reader.compression}-compressed; "
                                  "regfsck reads plain, gzip and zstd archives", "damage")
            with tarfile.open(fileobj=reader.stream, mode="r|", bufsize=CHUNK) as tar:
                for position, member in enumerate(tar):
                    name = "/".join(p for p in member.name.split("/") if p not in ("", "."))
                    yield position, name, member, tar
                    tar.members = []  # type: ignore[attr-defined]  # stream mode keeps every header otherwise
            why = reader.damage()
            if why is not None:
                raise SourceError(f"the archive {self.path} is damaged: {why}", "damage")
        except _ARCHIVE_ERRORS as exc:
            cause = (reader.damage() if reader is not None else None) or exc
            raise SourceError(f"cannot read the archive {self.path}: {cause}", "damage") from exc
        finally:
            raw.close()

    def _data(self, extracted: IO[bytes]) -> Iterator[bytes]:
        """A member's bytes; the archive failing under them (it changed since it was opened,
        or breaks mid-member) is a SourceError wherever the chunks are consumed."""
        try:
            yield from read_chunks(extracted)
        except _ARCHIVE_ERRORS as exc:
            raise SourceError(f"cannot read the archive {self.path}: {exc}", "damage") from exc

    def _scan(self, on_bytes: ProgressFn | None, stop: threading.Event | None) -> None:
        kept = 0
        for position, name, member, tar in self._members(on_bytes, stop):
            if name in (OCI_LAYOUT, INDEX_JSON) and member.isfile():
                self._layout_file(name, member, tar)
                continue
            digest = oci_blob_digest(name)
            if digest is None or (digest in self.blob_sizes and digest not in self.corrupt):
                continue
            if not member.isfile():
                self.corrupt[digest] = f"{name} is not a regular file in the archive"
                continue
            self.corrupt.pop(digest, None)
            self.blob_sizes[digest] = member.size
            self._member[digest] = position
            small = member.size <= MAX_MANIFEST_BYTES
            body = bytearray()
            extracted = tar.extractfile(member)
            assert extracted is not None
            try:
                for chunk in self._proven(self._data(extracted), digest, member.size, None, stop):
                    if small and (body or chunk[:1] == b"{"):
                        body += chunk
            except SourceError as exc:
                self.corrupt[digest] = str(exc)
                continue
            if body and b'"schemaVersion"' in body:  # a manifest (configs have no schemaVersion)
                kept += len(body)
                if kept > KEPT_MANIFEST_LIMIT:
                    raise SourceError(f"{self.label}: more than {KEPT_MANIFEST_LIMIT >> 20} MiB of "
                                      "manifests; unpack it and use the directory")
                self._manifests[digest] = bytes(body)

    def _layout_file(self, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        """Note index.json and oci-layout (only an import needs them: problems wait for it)."""
        if member.size > INDEX_LIMIT:
            self._not_a_layout = self._not_a_layout or (
                f"{member.name} is larger than {INDEX_LIMIT} bytes")
            return
        extracted = tar.extractfile(member)
        assert extracted is not None
        data = extracted.read()
        if name == INDEX_JSON:
            if self._index is not None:
                self._not_a_layout = self._not_a_layout or f"{self.label} holds two index.json files"
            self._index = data
        else:
            self._not_a_layout = self._not_a_layout or check_layout_version(data)
            self._layout_seen = True

    def size(self, digest: str) -> int | None:
        return self.blob_sizes.get(digest)

    def index_bytes(self) -> bytes:
        if self._not_a_layout is not None:
            raise SourceError(self._not_a_layout)
        if self._index is None or not self._layout_seen:
            missing = INDEX_JSON if self._index is None else OCI_LAYOUT
            raise SourceError(f"{self.label} is not an OCI archive (no {missing} in it); "
                              "regfsck imports OCI layouts and oci-archives")
        return self._index

    def read_manifest(self, digest: str) -> bytes:
        if digest in self.corrupt:
            raise SourceError(self.corrupt[digest], "damage")
        found = self._manifests.get(digest)
        if found is None:
            raise SourceError(f"{self.label}: blob {digest} is not a manifest", "damage")
        return found

    def verify(self, digests: Iterable[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> set[str]:
        return {d for d in digests if d in self.blob_sizes and d not in self.corrupt}

    def stream(self, digests: set[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> Iterator[tuple[str, int, ProvenChunks]]:
        left = {self._member[d]: d for d in digests if d in self._member}
        missing = sorted(set(digests) - set(left.values()))
        if missing:
            raise SourceError(f"{self.label} has no blob {missing[0]}", "damage")
        if not left:
            return
        for position, _, member, tar in self._members(None, stop):
            digest = left.pop(position, None)
            if digest is None:
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None
            yield digest, member.size, self._proven(self._data(extracted), digest, member.size,
                                                    on_bytes, stop)
            if not left:
                return
        raise SourceError(f"{self.label} changed while it was read: {sorted(left.values())[0]} "
                          "is gone", "damage")

    def _spool_path(self, digest: str) -> str:
        return f"{self._dir}/{digest.replace(':', '-')}"

    def prepare(self, digests: set[str], root: RegistryRoot) -> None:
        """Copy the wanted blobs, verified, into a scratch directory in regfsck-state on the
        local disk (one pass); a copy that does not verify is dropped (`open` then has none).

        A local tree's regfsck-state is in ROOT (same filesystem); a tree in object storage
        keeps its state on the local disk (`record.record_base`), never in the bucket."""
        wanted = {d for d in digests if d in self.blob_sizes and d not in self.corrupt}
        wanted -= self._spooled
        if not wanted:
            return
        if self._scratch is None:
            from regfsck.record import RecordError, record_base

            try:
                base = record_base(root, create=True)
            except RecordError as exc:
                raise SourceError(str(exc), "io") from exc
            self._scratch = FilesystemStorage(base)
        if self._scratch.stat(SCRATCH_DIR) is None:
            self._scratch.make_dir(SCRATCH_DIR, 0o700)
        if not self._dir:
            self._dir = f"{SCRATCH_DIR}/repair-spool-{secrets.token_hex(4)}"
            self._scratch.make_dir(self._dir, 0o700)
        for digest, _, chunks in self.stream(wanted):
            path = self._spool_path(digest)
            try:
                self._scratch.write_new_file(path, chunks)
            except SourceError as exc:
                self.corrupt[digest] = str(exc)
                self._scratch.remove_file(path)
                continue
            self._spooled.add(digest)

    def open(self, digest: str) -> BinaryIO:
        if self._scratch is None or digest not in self._spooled:
            raise StorageError(None, f"{digest} is not in {self.label} (or its copy is corrupt)",
                               digest)
        return self._scratch.open_read(self._spool_path(digest))

    def close(self) -> None:
        if self._scratch is not None and self._dir:
            self._scratch.remove_tree(self._dir)
            self._dir = ""
            self._spooled.clear()


def open_layout(path: Path, on_bytes: ProgressFn | None = None,
                stop: threading.Event | None = None) -> Source:
    """What `import` reads: an OCI layout directory or an (optionally compressed) archive
    of one. `on_bytes` counts the archive's bytes as it is read."""
    if path.is_symlink() and path.is_dir():
        raise SourceError(f"{path} is a symbolic link; give the real directory")
    if path.is_dir():
        storage = FilesystemStorage(path)
        for name in (OCI_LAYOUT, INDEX_JSON):
            st = storage.stat(name)
            if st is None or st.kind.value != "file":
                raise SourceError(f"{path} is not an OCI image layout (no {name} file)")
        problem = check_layout_version(storage.read_small(OCI_LAYOUT, 4096))
        if problem is not None:
            raise SourceError(problem)
        return DirectorySource(str(path), "oci-layout", storage)
    if path.is_file():
        return ArchiveSource(path, on_bytes, stop)
    raise SourceError(f"{path} does not exist (expected an OCI layout directory or archive)")


def open_blob_source(path: Path) -> Source:
    """What `repair --from` takes blobs from: a registry root or v2 dir, an OCI layout
    directory, a skopeo `dir:` copy, or a tar of blobs (an OCI archive)."""
    if path.is_symlink():
        raise SourceError(f"{path} is a symbolic link; give the real path")
    if path.is_dir():
        try:
            root = locate(path)
            return DirectorySource(str(path), "registry", FilesystemStorage(root.v2))
        except RootError:
            pass
        if (path / "blobs").is_dir() and ((path / OCI_LAYOUT).is_file()
                                          or (path / INDEX_JSON).is_file()):
            return DirectorySource(str(path), "oci-layout", FilesystemStorage(path))
        version = path / "version"
        if version.is_file() and version.read_bytes().startswith(b"Directory Transport Version"):
            return DirectorySource(str(path), "skopeo-dir", FilesystemStorage(path))
        raise SourceError(f"{path} is neither a registry root (docker/registry/v2), an OCI "
                          "layout (oci-layout, index.json, blobs/) nor a skopeo dir: copy")
    if path.is_file():
        source = ArchiveSource(path)
        if not source.blob_sizes:
            raise SourceError(f"{path}: no blobs/<alg>/<hex> entries (not an OCI archive)")
        return source
    raise SourceError(f"{path} does not exist")
