"""Put images from an OCI layout or archive into a registry tree, as the registry would.

Three layers, kept apart:
* reading the SOURCE: an OCI image layout directory, or a tar of one (`oci-archive`, plain,
  .gz or .zst). An archive cannot be read at random, so it is streamed twice: once to
  read index.json and the manifests and to hash every blob (the plan), once more to copy
  the blobs the tree lacks, each verified again while it is written;
* planning against the tree (`plan_import`): which blobs to add, which `_layers`,
  revision and tag links to create, which tags move; nothing is written;
* applying the plan (`apply_import`) through the journaled quarantine run, under the
  root lock, in the order a registry push writes: blobs, `_layers` links, revisions
  (children before their index), then tag history and `current` links last, so at no
  moment does a tag point at something incomplete; every change can be undone.

Files are byte-identical to the registry's own: blob `data` holds the exact bytes, link
files hold the bare digest with no newline.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard

from regfsck import layout
from regfsck.deep import LayerFormatError, ZstdFrameChecker
from regfsck.digest import DigestError, parse_digest, quote_bytes
from regfsck.inventory import Inventory, Repository
from regfsck.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError, parse_manifest
from regfsck.names import is_valid_tag, repo_name_problem
from regfsck.quarantine import Run, recover
from regfsck.refs import split_ref
from regfsck.root import RegistryRoot, RootError, locate
from regfsck.safety import mutation_guard
from regfsck.scanner import Scanner
from regfsck.storage import FilesystemStorage, StorageError

INDEX_JSON = "index.json"
OCI_LAYOUT = "oci-layout"
REF_NAME = "org.opencontainers.image.ref.name"
CHUNK = 1 << 20
INDEX_LIMIT = 64 << 20
KEPT_MANIFEST_LIMIT = 256 << 20  # manifests held in memory while an archive streams past
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"

ProgressFn = Callable[[int], None]


class ImportFailed(Exception):
    """The import cannot go ahead; `reason` is "usage", "damage" (bad data) or "io"."""

    def __init__(self, message: str, reason: str = "usage") -> None:
        super().__init__(message)
        self.reason = reason


class ImportInterrupted(Exception):
    """Ctrl-C: reading stopped (and an --apply run was reverted)."""


def _checked(chunks: Iterable[bytes], digest: str, size: int, what: str,
             on_bytes: ProgressFn | None = None, stop: threading.Event | None = None
             ) -> Iterator[bytes]:
    """Pass chunks through, raising ImportFailed at the end unless they hash to `digest`."""
    algorithm = digest.partition(":")[0]
    hasher = hashlib.new(algorithm)
    total = 0
    for chunk in chunks:
        if stop is not None and stop.is_set():
            raise ImportInterrupted
        hasher.update(chunk)
        total += len(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))
        yield chunk
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != digest or total != size:
        raise ImportFailed(f"{what}: blob {digest} is corrupt (its {total} bytes hash to {actual})",
                           "damage")


def _blob_digest(name: str) -> str | None:
    """`blobs/<alg>/<hex>` (optionally under `./`) as a digest; None for anything else."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if len(parts) != 3 or parts[0] != "blobs":
        return None
    try:
        return str(parse_digest(f"{parts[1]}:{parts[2]}"))
    except DigestError:
        return None


def _read_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


# -- sources ----------------------------------------------------------------------------


class Source:
    """An OCI layout to import from: index.json, manifests and blob streams, all verified."""

    label: str
    blob_sizes: dict[str, int]
    corrupt: dict[str, str]  # digest -> why (found while reading; an archive is hashed whole)

    def index_bytes(self) -> bytes:
        raise NotImplementedError

    def size(self, digest: str) -> int | None:
        """The blob's size in the source; None when the source does not have it."""
        raise NotImplementedError

    def read_manifest(self, digest: str) -> bytes:
        raise NotImplementedError

    def verify(self, digests: Iterable[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> None:
        """Hash these blobs now (a directory is read in place; archives were hashed whole)."""

    def stream(self, digests: set[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> Iterator[tuple[str, int, Iterator[bytes]]]:
        """Yield (digest, size, verified chunks) once for each wanted blob; consume in order."""
        raise NotImplementedError


class DirectorySource(Source):
    """An OCI image layout directory, read in place (no symlink is followed)."""

    def __init__(self, path: Path) -> None:
        self.label = str(path)
        self.storage = FilesystemStorage(path)
        for name in (OCI_LAYOUT, INDEX_JSON):
            st = self.storage.stat(name)
            if st is None or st.kind.value != "file":
                raise ImportFailed(f"{path} is not an OCI image layout (no {name} file)")
        self._check_layout(self.storage.read_small(OCI_LAYOUT, 4096))
        self.corrupt = {}
        self.blob_sizes = {}

    @staticmethod
    def _check_layout(raw: bytes) -> None:
        try:
            version = json.loads(raw).get("imageLayoutVersion")
        except (ValueError, RecursionError, AttributeError):
            version = None
        if not isinstance(version, str) or not version.startswith("1."):
            raise ImportFailed(f"unsupported oci-layout {quote_bytes(raw[:80])} "
                               "(expected imageLayoutVersion 1.x)")

    def _path(self, digest: str) -> str:
        return "/".join(("blobs", *layout.split_digest(digest)))

    def size(self, digest: str) -> int | None:
        if digest not in self.blob_sizes:
            st = self.storage.stat(self._path(digest))
            if st is None or st.kind.value != "file":
                return None
            self.blob_sizes[digest] = st.size
        return self.blob_sizes[digest]

    def index_bytes(self) -> bytes:
        return self.storage.read_small(INDEX_JSON, INDEX_LIMIT)

    def read_manifest(self, digest: str) -> bytes:
        try:
            raw = self.storage.read_small(self._path(digest), MAX_MANIFEST_BYTES)
        except StorageError as exc:
            raise ImportFailed(f"{self.label}: manifest {digest}: {exc.message}", "damage") from exc
        algorithm = digest.partition(":")[0]
        actual = f"{algorithm}:{hashlib.new(algorithm, raw).hexdigest()}"
        if actual != digest:
            raise ImportFailed(f"{self.label}: manifest {digest} is corrupt (its bytes hash to "
                               f"{actual})", "damage")
        return raw

    def _chunks(self, digest: str) -> Iterator[bytes]:
        with self.storage.open_read(self._path(digest)) as stream:
            yield from _read_chunks(stream)

    def verify(self, digests: Iterable[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> None:
        for digest in digests:
            size = self.size(digest)
            if size is None or digest in self.corrupt:
                continue
            try:
                for _ in _checked(self._chunks(digest), digest, size, self.label, on_bytes, stop):
                    pass
            except ImportFailed as exc:
                self.corrupt[digest] = str(exc)
            except StorageError as exc:
                self.corrupt[digest] = exc.message

    def stream(self, digests: set[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> Iterator[tuple[str, int, Iterator[bytes]]]:
        for digest in sorted(digests):
            size = self.size(digest)
            if size is None:
                raise ImportFailed(f"{self.label}: blob {digest} disappeared", "damage")
            yield digest, size, _checked(self._chunks(digest), digest, size, self.label, on_bytes, stop)


class _CountingReader(io.RawIOBase):
    """The archive file, counting compressed bytes for the progress bar (and zstd frames)."""

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
            raise ImportInterrupted
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        if n and self.frames is not None:
            self.frames.feed(memoryview(buffer)[:n])
        if n and self.on_bytes is not None:
            self.on_bytes(n)
        return n or 0


def _truncation(frames: ZstdFrameChecker | None, counted: io.BufferedIOBase) -> str | None:
    """Why a zstd archive ended early (None when it did not, or is not zstd)."""
    if frames is None:
        return None
    try:
        while counted.read(CHUNK):
            pass
        frames.finish()
    except (LayerFormatError, OSError) as exc:
        return str(exc)
    return None


class ArchiveSource(Source):
    """A tar of an OCI layout (plain, gzip or zstd, told apart by magic bytes), streamed."""

    def __init__(self, path: Path, on_bytes: ProgressFn | None = None,
                 stop: threading.Event | None = None) -> None:
        self.label = str(path)
        self.path = path
        self.blob_sizes = {}
        self.corrupt = {}
        self._manifests: dict[str, bytes] = {}
        self._index: bytes | None = None
        self.compressed_size = path.stat().st_size
        self._scan(on_bytes, stop)

    def _members(self, on_bytes: ProgressFn | None, stop: threading.Event | None
                 ) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
        """Every member of the archive, in order (a fresh stream each call)."""
        try:
            raw = open(self.path, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise ImportFailed(f"cannot open {self.path}: {exc.strerror}", "io") from exc
        frames = None
        try:
            head = raw.read(4)
            raw.seek(0)
            source = _CountingReader(raw, on_bytes, stop)
            counted = io.BufferedReader(source, CHUNK)
            stream: IO[bytes]
            if head.startswith(GZIP_MAGIC):
                stream = gzip.GzipFile(fileobj=counted, mode="rb")  # type: ignore[assignment]
            elif head == ZSTD_MAGIC:
                # the zstd decoder ends quietly at a truncated frame: walk the frames too
                frames = source.frames = ZstdFrameChecker()
                stream = zstandard.ZstdDecompressor().stream_reader(counted, read_size=CHUNK,
                                                                    read_across_frames=True)
            else:
                stream = counted
            with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
                for member in tar:
                    yield member, tar
                    tar.members = []  # type: ignore[attr-defined]  # stream mode keeps every header otherwise
            why = _truncation(frames, counted)
            if why is not None:
                raise ImportFailed(f"the archive {self.path} is damaged: {why}", "damage")
        except (tarfile.TarError, EOFError, OSError, zstandard.ZstdError, LayerFormatError) as exc:
            raise ImportFailed(f"cannot read the archive {self.path}: "
                               f"{_truncation(frames, counted) or exc}", "damage") from exc
        finally:
            raw.close()

    def _scan(self, on_bytes: ProgressFn | None, stop: threading.Event | None) -> None:
        kept = 0
        layout_seen = False
        for member, tar in self._members(on_bytes, stop):
            name = "/".join(p for p in member.name.split("/") if p not in ("", "."))
            if name in (OCI_LAYOUT, INDEX_JSON) and member.isfile():
                data = self._read_member(tar, member, INDEX_LIMIT)
                if name == INDEX_JSON:
                    if self._index is not None:
                        raise ImportFailed(f"{self.label} holds two index.json files")
                    self._index = data
                else:
                    DirectorySource._check_layout(data)
                    layout_seen = True
                continue
            digest = _blob_digest(name)
            if digest is None or (digest in self.blob_sizes and digest not in self.corrupt):
                continue
            if not member.isfile():
                self.corrupt[digest] = f"{name} is not a regular file in the archive"
                continue
            self.corrupt.pop(digest, None)
            self.blob_sizes[digest] = member.size
            small = member.size <= MAX_MANIFEST_BYTES
            body = bytearray()
            extracted = tar.extractfile(member)
            assert extracted is not None
            try:
                for chunk in _checked(_read_chunks(extracted), digest, member.size, self.label,
                                      stop=stop):
                    if small and (body or chunk[:1] == b"{"):
                        body += chunk
            except ImportFailed as exc:
                self.corrupt[digest] = str(exc)
                continue
            if body and b'"schemaVersion"' in body:  # a manifest (configs have no schemaVersion)
                kept += len(body)
                if kept > KEPT_MANIFEST_LIMIT:
                    raise ImportFailed(f"{self.label}: more than {KEPT_MANIFEST_LIMIT >> 20} MiB of "
                                       "manifests; unpack it and import the directory")
                self._manifests[digest] = bytes(body)
        if self._index is None or not layout_seen:
            missing = INDEX_JSON if self._index is None else OCI_LAYOUT
            raise ImportFailed(f"{self.label} is not an OCI archive (no {missing} in it); "
                               "regfsck imports OCI layouts and oci-archives")

    @staticmethod
    def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
        if member.size > limit:
            raise ImportFailed(f"{member.name} is larger than {limit} bytes")
        extracted = tar.extractfile(member)
        assert extracted is not None
        return extracted.read()

    def size(self, digest: str) -> int | None:
        return self.blob_sizes.get(digest)

    def index_bytes(self) -> bytes:
        assert self._index is not None
        return self._index

    def read_manifest(self, digest: str) -> bytes:
        if digest in self.corrupt:
            raise ImportFailed(self.corrupt[digest], "damage")
        found = self._manifests.get(digest)
        if found is None:
            raise ImportFailed(f"{self.label}: blob {digest} is not a manifest", "damage")
        return found

    def stream(self, digests: set[str], on_bytes: ProgressFn | None = None,
               stop: threading.Event | None = None) -> Iterator[tuple[str, int, Iterator[bytes]]]:
        left = set(digests)
        for member, tar in self._members(None, stop):
            digest = _blob_digest("/".join(p for p in member.name.split("/") if p not in ("", ".")))
            if digest not in left or not member.isfile():
                continue
            left.discard(digest)
            extracted = tar.extractfile(member)
            assert extracted is not None
            yield digest, member.size, _checked(_read_chunks(extracted), digest, member.size,
                                                self.label, on_bytes, stop)
            if not left:
                return
        if left:
            raise ImportFailed(f"{self.label} changed while importing: {sorted(left)[0]} is gone",
                               "damage")


def open_source(path: Path, on_bytes: ProgressFn | None = None,
                stop: threading.Event | None = None) -> Source:
    """An OCI layout directory or an (optionally compressed) oci-archive."""
    if path.is_symlink() and path.is_dir():
        raise ImportFailed(f"{path} is a symbolic link; give the real directory")
    if path.is_dir():
        return DirectorySource(path)
    if path.is_file():
        return ArchiveSource(path, on_bytes, stop)
    raise ImportFailed(f"{path} does not exist (expected an OCI layout directory or archive)")


# -- what index.json names ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceImage:
    """One index.json entry and where it goes: repository and tag (None: by digest only)."""

    repo: str
    tag: str | None
    digest: str
    media_type: str
    size: int
    ref_name: str | None

    def __str__(self) -> str:
        return f"{self.repo}:{self.tag}" if self.tag is not None else f"{self.repo}@{self.digest}"

    def to_json(self) -> dict[str, Any]:
        return {"repo": self.repo, "tag": self.tag, "digest": self.digest,
                "media_type": self.media_type, "ref_name": self.ref_name}


def _target_of(ref_name: str | None, digest: str) -> tuple[str | None, str | None]:
    """(repository, tag) a ref.name annotation names; a bare word is a tag (skopeo's oci:DIR:TAG)."""
    if ref_name is None:
        return None, None
    repo, tag, ref_digest = split_ref(ref_name)
    if ref_digest is not None:
        if ref_digest != digest:
            raise ImportFailed(f"index.json entry {ref_name!r} names {ref_digest} but points at {digest}")
        return repo, None
    if tag is not None:
        return repo, tag
    if "/" in repo:
        return repo, None
    return None, repo


def images_from_index(raw: bytes, repo: str | None, label: str) -> list[SourceImage]:
    """The images index.json lists, each with its target repository and tag."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested absurdly deep
        raise ImportFailed(f"{label}: index.json is not JSON: {exc}", "damage") from exc
    entries = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ImportFailed(f"{label}: index.json has no manifests list", "damage")
    images: dict[tuple[str, str | None, str], SourceImage] = {}
    tags: dict[tuple[str, str], str] = {}
    nameless: list[str] = []
    for entry in entries:
        digest = entry.get("digest") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        try:
            parse_digest(digest if isinstance(digest, str) else "")
        except DigestError as exc:
            raise ImportFailed(f"{label}: index.json entry without a valid digest: {exc}", "damage") from exc
        assert isinstance(digest, str) and isinstance(entry, dict)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImportFailed(f"{label}: index.json entry {digest} has no valid size", "damage")
        annotations = entry.get("annotations")
        ref_name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
        ref_name = ref_name if isinstance(ref_name, str) and ref_name else None
        named_repo, tag = _target_of(ref_name, digest)
        target = repo or named_repo
        if target is None:
            nameless.append(ref_name or digest)
            continue
        problem = repo_name_problem(target)
        if problem:
            raise ImportFailed(f"{label}: {ref_name or digest}: repository {target!r}: {problem}")
        if tag is not None and not is_valid_tag(tag):
            raise ImportFailed(f"{label}: {ref_name!r}: {tag!r} is not a valid tag")
        if tag is not None:
            other = tags.setdefault((target, tag), digest)
            if other != digest:
                raise ImportFailed(f"{label}: {target}:{tag} is named twice, for {other} and {digest}")
        media_type = entry.get("mediaType")
        image = SourceImage(target, tag, digest, media_type if isinstance(media_type, str) else "",
                            size, ref_name)
        images.setdefault((target, tag, digest), image)
    if nameless:
        shown = ", ".join(repr(n) for n in nameless[:5])
        raise ImportFailed(f"{label}: {len(nameless)} index.json entries name no repository "
                           f"({shown}); give --repo NAME")
    if not images:
        raise ImportFailed(f"{label}: index.json lists no images")
    return list(images.values())


# -- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkWrite:
    """A link file to create (or, with `replaces`, to put in place of a tag's old one)."""

    path: str  # relative to v2
    digest: str
    kind: str  # "layer", "revision", "tag-index", "tag-current"
    repo: str
    tag: str | None = None
    replaces: str | None = None  # the old current digest (or "damaged") when a tag moves

    def to_json(self) -> dict[str, Any]:
        data = {"path": f"{layout.V2_PREFIX}/{self.path}", "digest": self.digest, "kind": self.kind,
                "repo": self.repo}
        if self.tag is not None:
            data["tag"] = self.tag
        if self.replaces is not None:
            data["replaces"] = self.replaces
        return data


@dataclass
class ImportPlan:
    source: str
    root: str
    images: list[SourceImage] = field(default_factory=list)
    new_blobs: dict[str, int] = field(default_factory=dict)  # digest -> size, to copy
    existing_blobs: dict[str, int] = field(default_factory=dict)  # already in the tree
    links: list[LinkWrite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    applied: bool = False
    run_id: str | None = None

    @property
    def bytes_to_write(self) -> int:
        return sum(self.new_blobs.values())

    @property
    def retags(self) -> list[LinkWrite]:
        return [link for link in self.links if link.replaces is not None]

    @property
    def is_empty(self) -> bool:
        return not self.new_blobs and not self.links

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "root": self.root,
            "images": [image.to_json() for image in self.images],
            "blobs": [{"digest": d, "size": s} for d, s in self.new_blobs.items()],
            "existing_blobs": len(self.existing_blobs),
            "links": [link.to_json() for link in self.links],
            "retagged": [{"repo": link.repo, "tag": link.tag, "from": link.replaces,
                          "to": link.digest} for link in self.retags],
            "bytes_to_write": self.bytes_to_write,
            "applied": self.applied,
            "run_id": self.run_id,
            "notes": list(self.notes),
        }


class _Planner:
    """Decides what an import adds to the tree; reads the source and the tree, writes nothing."""

    def __init__(self, source: Source, inventory: Inventory | None,
                 storage: FilesystemStorage | None, plan: ImportPlan) -> None:
        self.source = source
        self.inv = inventory
        self.storage = storage
        self.plan = plan
        self._paths: set[str] = set()
        self._manifests: dict[str, Manifest] = {}

    # -- blobs ---------------------------------------------------------------------
    def _tree_size(self, digest: str) -> int | None:
        blob = self.inv.blobs.get(digest) if self.inv is not None else None
        return blob.size if blob is not None else None

    def _need_blob(self, digest: str, size: int | None, image: SourceImage) -> None:
        """Record where a blob comes from: the tree if it has it, else the source."""
        if digest in self.plan.new_blobs or digest in self.plan.existing_blobs:
            return
        in_tree = self._tree_size(digest)
        if in_tree is not None:
            if size is not None and in_tree != size:
                raise ImportFailed(f"{image}: the tree's blob {digest} is {in_tree} bytes, the "
                                   f"manifest says {size} (run `regfsck verify`)", "damage")
            self.plan.existing_blobs[digest] = in_tree
            return
        in_source = self.source.size(digest)
        if in_source is None:
            raise ImportFailed(f"{image}: blob {digest} is neither in {self.source.label} nor in the "
                               "tree", "damage")
        if digest in self.source.corrupt:
            raise ImportFailed(f"{image}: {self.source.corrupt[digest]}", "damage")
        if size is not None and in_source != size:
            raise ImportFailed(f"{image}: {self.source.label} has blob {digest} with {in_source} "
                               f"bytes, the manifest says {size}", "damage")
        self.plan.new_blobs[digest] = in_source

    def _manifest(self, digest: str, size: int | None, image: SourceImage) -> Manifest:
        cached = self._manifests.get(digest)
        if cached is not None:
            return cached
        self._need_blob(digest, size, image)
        if digest in self.plan.new_blobs:
            raw = self.source.read_manifest(digest)
        else:
            assert self.storage is not None
            try:
                raw = self.storage.read_small(layout.blob_data(digest), MAX_MANIFEST_BYTES)
            except StorageError as exc:
                raise ImportFailed(f"{image}: the tree's manifest {digest}: {exc.message}", "damage") from exc
            algorithm = digest.partition(":")[0]
            if f"{algorithm}:{hashlib.new(algorithm, raw).hexdigest()}" != digest:
                raise ImportFailed(f"{image}: the tree's copy of manifest {digest} is corrupt "
                                   f"(repair it: regfsck repair ROOT --from {self.source.label})", "damage")
        try:
            manifest = parse_manifest(raw)
        except ManifestError as exc:
            raise ImportFailed(f"{image}: manifest {digest}: {exc}", "damage") from exc
        self._manifests[digest] = manifest
        return manifest

    # -- links ---------------------------------------------------------------------
    def _repo(self, name: str) -> Repository | None:
        return self.inv.repositories.get(name) if self.inv is not None else None

    def _link(self, write: LinkWrite) -> None:
        if write.path not in self._paths:
            self._paths.add(write.path)
            self.plan.links.append(write)

    def _digest_link(self, kind: str, repo_name: str, digest: str, existing: dict[str, Any],
                     path: str, tag: str | None = None) -> None:
        link = existing.get(digest)
        if link is None:
            self._link(LinkWrite(path, digest, kind, repo_name, tag))
        elif link.target != digest:
            raise ImportFailed(f"the tree's link {layout.V2_PREFIX}/{link.path} is damaged "
                               f"({link.error or f'holds {link.target}'}); run `regfsck repair` "
                               "first", "damage")

    def add_image(self, image: SourceImage) -> None:
        order: list[str] = []
        blobs: list[tuple[str, int | None]] = []
        stack: list[tuple[str, int | None, bool]] = [(image.digest, image.size, False)]
        seen: set[str] = set()
        while stack:  # depth first, each manifest after its children
            digest, size, children_done = stack.pop()
            if children_done:
                order.append(digest)
                continue
            if digest in seen:
                continue
            seen.add(digest)
            manifest = self._manifest(digest, size, image)
            stack.append((digest, size, True))
            for ref in manifest.references():
                if ref.is_foreign:
                    continue
                if ref.role == "manifest":
                    stack.append((ref.digest, ref.size, False))
                else:
                    blobs.append((ref.digest, ref.size))
        for digest, size in blobs:
            self._need_blob(digest, size, image)
        repo = self._repo(image.repo)
        layers = repo.layers if repo is not None else {}
        revisions = repo.revisions if repo is not None else {}
        for digest, _ in blobs:
            self._digest_link("layer", image.repo, digest, layers, layout.layer_link(image.repo, digest))
        for digest in order:
            self._digest_link("revision", image.repo, digest, revisions,
                              layout.revision_link(image.repo, digest))
        if image.tag is not None:
            self._tag(image, repo)

    def _tag(self, image: SourceImage, repo: Repository | None) -> None:
        assert image.tag is not None
        tag = repo.tags.get(image.tag) if repo is not None else None
        self._digest_link("tag-index", image.repo, image.digest, tag.index if tag else {},
                          layout.tag_index_link(image.repo, image.tag, image.digest), image.tag)
        current = tag.current if tag is not None else None
        path = layout.tag_current_link(image.repo, image.tag)
        if current is None:
            self._link(LinkWrite(path, image.digest, "tag-current", image.repo, image.tag))
        elif current.target != image.digest and path not in self._paths:
            old = current.target or "damaged"
            self._link(LinkWrite(path, image.digest, "tag-current", image.repo, image.tag, old))
            self.plan.notes.append(f"{image.repo}:{image.tag} moves from {old} to {image.digest} "
                                   "(as a push would; the old manifest stays, untagged)")

    def check_tree_copies(self, on_bytes: ProgressFn | None, stop: threading.Event | None) -> None:
        """Re-hash the blobs the tree already has and the import relies on."""
        assert self.storage is not None or not self.plan.existing_blobs
        for digest, size in self.plan.existing_blobs.items():
            assert self.storage is not None
            try:
                with self.storage.open_read(layout.blob_data(digest)) as stream:
                    for _ in _checked(_read_chunks(stream), digest, size, "the tree", on_bytes, stop):
                        pass
            except ImportFailed as exc:
                raise ImportFailed(f"{exc}; repair it first: regfsck repair ROOT --from "
                                   f"{self.source.label}", "damage") from exc
            except StorageError as exc:
                raise ImportFailed(f"the tree's blob {digest}: {exc.message}", "damage") from exc


def plan_import(source: Source, images: list[SourceImage], root: RegistryRoot,
                inventory: Inventory | None, *, verify: bool = True,
                on_bytes: ProgressFn | None = None, stop: threading.Event | None = None) -> ImportPlan:
    """What importing `images` from `source` adds to the tree (raises ImportFailed).

    With `verify`, the source blobs to copy (directory sources; archives were hashed when
    read) and the tree's blobs the images rely on are re-hashed now, so the plan is proven;
    applying re-verifies every blob while it is written anyway."""
    plan = ImportPlan(source.label, str(root.root), list(images))
    storage = FilesystemStorage(root.v2) if inventory is not None else None
    planner = _Planner(source, inventory, storage, plan)
    for image in images:
        planner.add_image(image)
    if verify:
        source.verify(list(plan.new_blobs), on_bytes, stop)
        bad = [d for d in plan.new_blobs if d in source.corrupt]
        if bad:
            raise ImportFailed(source.corrupt[bad[0]] + (f" (and {len(bad) - 1} more)" if len(bad) > 1
                                                         else ""), "damage")
        planner.check_tree_copies(on_bytes, stop)
    return plan


# -- applying -------------------------------------------------------------------------------

STATE_ENTRIES = frozenset({"regfsck-state", "regfsck-quarantine", "lost+found"})


def target_root(path: Path) -> tuple[RegistryRoot, bool]:
    """The registry root to import into, and whether its tree must be created first.

    An existing registry root, or an empty directory (nothing but regfsck's own state, or
    an empty `docker/` skeleton): importing into any other directory is refused."""
    try:
        return locate(path), False
    except RootError as exc:
        path = Path(os.path.abspath(path))
        if not path.is_dir() or path.is_symlink():
            raise ImportFailed(str(exc), "io") from exc
        v2 = path / layout.V2_PREFIX
        for current, dirs, files in os.walk(path / "docker") if (path / "docker").is_dir() else ():
            if files or any(Path(current, d).is_symlink() for d in dirs):
                raise ImportFailed(f"{path} is not a registry root and not empty ({current} holds "
                                   "files); import into a registry root or an empty directory",
                                   "io") from exc
        others = [e.name for e in os.scandir(path) if e.name not in STATE_ENTRIES | {"docker"}]
        if others:
            raise ImportFailed(f"{path} is not a registry root and not empty (it holds "
                               f"{', '.join(sorted(others)[:3])}); import into a registry root or an "
                               "empty directory", "io") from exc
        return RegistryRoot(path, v2), True


def apply_import(root: RegistryRoot, plan: ImportPlan, source: Source, *,
                 on_bytes: ProgressFn | None = None, stop: threading.Event | None = None) -> ImportPlan:
    """Write the plan through a journaled run (call under `mutation_guard`).

    Blobs first, then `_layers` and revision links, then tag history and `current` links.
    Any failure (a blob that no longer verifies, Ctrl-C) reverts the whole run."""
    def created(run: Run, rel: str, data: Any) -> None:
        run.create_file(rel, data)  # owner, group and modes of the neighbours (quarantine)

    details = {"source": plan.source, "images": [str(i) for i in plan.images],
               "blobs": len(plan.new_blobs), "links": len(plan.links)}
    with Run.begin(root, "import", details, on_crash="revert") as run:
        for digest, _, chunks in source.stream(set(plan.new_blobs), on_bytes, stop):
            created(run, layout.blob_data(digest), chunks)
        for link in plan.links:
            if stop is not None and stop.is_set():
                raise ImportInterrupted
            if link.replaces is not None:
                run.quarantine(link.path)
            created(run, link.path, link.digest.encode("ascii"))
        run.finish(f"imported {len(plan.images)} images from {plan.source}")
    plan.applied = True
    plan.run_id = run.run_id
    return plan


def run_import(root_path: Path, source_path: Path, *, repo: str | None = None, apply: bool = False,
               on_bytes: ProgressFn | None = None, stop: threading.Event | None = None) -> ImportPlan:
    """Plan an import (and with `apply`, do it under the root lock, re-planned there)."""
    root, fresh = target_root(root_path)
    source = open_source(source_path, on_bytes, stop)
    images = images_from_index(source.index_bytes(), repo, source.label)

    def plan_now(verify: bool) -> ImportPlan:
        inventory = None
        if root.v2.is_dir():
            inventory = Scanner(FilesystemStorage(root.v2), root).scan()
        return plan_import(source, images, root, inventory, verify=verify, on_bytes=on_bytes,
                           stop=stop)

    if not apply:
        return plan_now(verify=True)
    plan_now(verify=False)  # refuse bad input before taking the lock or creating anything
    with mutation_guard(root):
        recover(root)
        plan = plan_now(verify=False)  # again under the lock; blobs are verified as they are written
        if plan.is_empty:
            plan.applied = True
            return plan
        check_free_space(root.root, plan.bytes_to_write)
        if fresh:
            os.makedirs(root.v2, exist_ok=True)
        return apply_import(root, plan, source, on_bytes=on_bytes, stop=stop)


# Room kept beyond the blobs themselves: links, the journal and the run's metadata.
FREE_SPACE_MARGIN = 16 * 1024 * 1024


def check_free_space(root: Path, needed: int, *, margin: int = FREE_SPACE_MARGIN) -> None:
    """Refuse before writing anything when the file system holding ROOT cannot take the
    blobs: a disk filled half way through an import fills it for the registry too."""
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return  # no figure to judge by; the writes themselves report ENOSPC
    free = st.f_bavail * st.f_frsize
    if free < needed + margin:
        raise ImportFailed(
            f"not enough free space on the file system holding {root}: the import writes "
            f"{needed} bytes (+{margin // (1024 * 1024)} MiB for links and the journal), "
            f"{free} bytes are free; nothing was written", "io")
