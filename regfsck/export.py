"""Take images out of a stopped registry's tree: OCI layouts, oci-archive and docker-archive.

Two steps, kept apart: `plan_export` resolves the references against the inventory and
decides exactly which blobs go where (reading only); `write_export` streams them out.
Blobs are copied byte for byte, so every digest is preserved, and each one is re-hashed
while it is copied: a corrupt or missing blob stops the export with an error naming the
image. Output is assembled under a temporary name beside OUTPUT and renamed into place only
when complete, so a failed export never leaves anything under the final name.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import secrets
import shutil
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zstandard

from regfsck import deflate, layout
from regfsck.artifacts import referrers_of
from regfsck.checks import valid_revisions
from regfsck.errors import REASON_EXIT, Interrupted, RegfsckError
from regfsck.graph import ManifestStore, Unloadable
from regfsck.hashing import DigestMismatch, ProgressFn, verified
from regfsck.inventory import Inventory, Repository
from regfsck.manifest import DOCKER_CONFIG, OCI_CONFIG, OCI_INDEX, Manifest, ManifestKind
from regfsck.refs import ImageRef
from regfsck.storage import FilesystemStorage, Storage, StorageError

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
OCI_LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'
COPY_BUFFER = 1 << 20
READ_AHEAD = 16  # object storage: blob streams started ahead of their turn (one chunk each)
CONFIG_LIMIT = 16 << 20  # image configs are JSON: refuse anything absurd before parsing
TAR_RECORD = 10240  # tar(1) pads archives to whole records
ZSTD_LEVEL = 3
GZIP_THREADS = min(4, os.cpu_count() or 1)
ZSTD_THREADS = min(4, os.cpu_count() or 1)  # parallel, with memory bounded on many-core hosts
IMAGE_CONFIG_TYPES = frozenset({DOCKER_CONFIG, OCI_CONFIG})
DOCKER_TYPES = frozenset({ManifestKind.DOCKER_MANIFEST, ManifestKind.DOCKER_LIST})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".gz", ".zst")



class ExportFormat(enum.StrEnum):
    OCI = "oci"
    OCI_ARCHIVE = "oci-archive"
    DOCKER_ARCHIVE = "docker-archive"


class Compression(enum.StrEnum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


class ExportError(RegfsckError):
    """The export cannot be done; `reason` is "usage" (bad request), "damage" (the tree) or
    "io", and decides the exit code (2, 1, 3)."""

    def __init__(self, message: str, reason: str = "usage") -> None:
        super().__init__(message, exit_code=REASON_EXIT[reason])
        self.reason = reason


def compression_for(output: Path) -> Compression:
    """Compression implied by OUTPUT's name: `.zst` is zstandard, `.gz`/`.tgz` gzip."""
    name = output.name.lower()
    if name.endswith((".zst", ".tzst")):
        return Compression.ZSTD
    if name.endswith((".gz", ".tgz")):
        return Compression.GZIP
    return Compression.NONE


def default_format(output: Path) -> ExportFormat:
    """An OUTPUT named like an archive gets `oci-archive`, anything else an OCI directory."""
    return ExportFormat.OCI_ARCHIVE if output.name.lower().endswith(ARCHIVE_SUFFIXES) else ExportFormat.OCI


# -- platforms ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, other: Platform, *, exact: bool) -> bool:
        """Same OS and architecture; a missing variant matches any unless `exact`."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if not exact and self.variant is None:
            return True
        return _norm_variant(self) == _norm_variant(other)


def _norm_variant(p: Platform) -> str | None:
    """arm64 without a variant means v8 (as containerd and docker treat it)."""
    if p.architecture == "arm64" and p.variant in (None, "v8"):
        return "v8"
    return p.variant


def parse_platform(text: str) -> Platform:
    """Parse `OS/ARCH[/VARIANT]` (e.g. `linux/arm64/v8`)."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ExportError(f"platform {text!r} is not OS/ARCH[/VARIANT] (e.g. linux/amd64)")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def platform_of(value: Any) -> Platform | None:
    """Platform of an index descriptor's `platform` object or of an image config."""
    if not isinstance(value, dict):
        return None
    os_name, arch = value.get("os"), value.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        return None
    variant = value.get("variant")
    return Platform(os_name, arch, variant if isinstance(variant, str) and variant else None)


# -- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlobCopy:
    """One blob to copy: its digest, stored size, where it is, and the image needing it."""

    digest: str
    size: int
    path: str
    image: str
    # The bytes, when planning already read them (manifests, configs checked for --platform):
    # written from here, still hashed against the digest, instead of read a second time.
    data: bytes | None = None


@dataclass
class ExportImage:
    """One named image in the output."""

    ref_name: str  # `repo:tag` or `repo@digest`: the ref.name annotation
    repo: str
    tag: str | None
    digest: str  # the manifest written (the chosen child when --platform picked one)
    media_type: str
    size: int
    platform: dict[str, Any] | None = None  # from the index descriptor, when picked from one
    index_digest: str | None = None  # the index the platform was picked from
    config: str | None = None  # docker-archive: config digest
    layers: tuple[str, ...] = ()  # docker-archive: layer digests, in order
    repo_tags: list[str] = field(default_factory=list)  # docker-archive: RepoTags

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ref_name": self.ref_name, "repo": self.repo, "tag": self.tag,
                                "digest": self.digest, "media_type": self.media_type}
        if self.index_digest is not None:
            data["index_digest"] = self.index_digest
            data["platform"] = str(platform_of(self.platform) or "")
        if self.config is not None:
            data["repo_tags"] = list(self.repo_tags)
        return data


@dataclass
class ExportPlan:
    format: ExportFormat
    images: list[ExportImage] = field(default_factory=list)
    blobs: list[BlobCopy] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (ref, why)
    notes: list[str] = field(default_factory=list)
    referrers: int = 0  # referrer manifests taken along (--with-referrers)

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blobs)


@dataclass
class ExportResult:
    output: str
    format: ExportFormat
    compression: Compression
    plan: ExportPlan
    output_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "format": str(self.format),
            "compression": str(self.compression),
            "images": [image.to_json() for image in self.plan.images],
            "skipped": [{"ref": ref, "reason": why} for ref, why in self.plan.skipped],
            "blobs": len(self.plan.blobs),
            "blob_bytes": self.plan.total_bytes,
            "output_bytes": self.output_bytes,
            "notes": list(self.plan.notes),
            "referrers": self.plan.referrers,
        }


class _Skip(Exception):
    """A tag reached through a whole-repository reference does not fit: skip it, say why."""


class _Planner:
    """Resolves references into images and the blobs they need (reads manifests only)."""

    def __init__(self, storage: Storage, inventory: Inventory, store: ManifestStore,
                 fmt: ExportFormat, platform: Platform | None, explicit: set[str]) -> None:
        self.storage = storage
        self.inv = inventory
        self.store = store
        self.plan = ExportPlan(fmt)
        self.platform = platform
        self.explicit = explicit  # references named one by one: failing them is an error
        self._blobs_seen: set[str] = set()
        self._names_seen: set[str] = set()
        self._docker_images: dict[str, ExportImage] = {}
        self._notes_seen: set[str] = set()
        self._configs: dict[str, bytes] = {}  # configs read for --platform, written from here

    # -- references ----------------------------------------------------------------
    def add_ref(self, ref: ImageRef) -> None:
        repo = self.inv.repositories.get(ref.repository)
        if repo is None:
            raise ExportError(f"{ref}: no repository {ref.repo!r} in the tree")
        if ref.digest is not None:
            link = repo.revisions.get(ref.digest)
            if link is None or link.target != ref.digest:
                raise ExportError(f"{ref}: {ref.digest} is not a manifest of repository {ref.repo}")
            self._add_image(repo, None, ref.digest, str(ref))
            return
        if ref.tag is not None:
            self._add_image(repo, ref.tag, self._tag_target(repo, ref.tag, str(ref)), str(ref))
            return
        if not repo.tags:
            raise ExportError(f"{ref}: the repository has no tags (name a manifest as "
                              f"{ref}@sha256:...)")
        for tag in sorted(repo.tags):
            name = f"{ref.repo}:{tag}"
            try:
                self._add_image(repo, tag, self._tag_target(repo, tag, name), name)
            except _Skip as why:
                self.plan.skipped.append((name, str(why)))

    def _tag_target(self, repo: Repository, tag: str, name: str) -> str:
        found = repo.tags.get(tag)
        if found is None:
            raise ExportError(f"{name}: no such tag")
        if found.current is None or found.current.target is None:
            self._refuse(name, "the tag's current/link is missing or invalid (see `regfsck verify`)",
                         damage=True)
        assert found.current is not None and found.current.target is not None
        return found.current.target

    def _refuse(self, name: str, why: str, *, damage: bool = False) -> None:
        """An explicit reference fails the export; a tag of a whole repository is skipped."""
        if name in self.explicit:
            raise ExportError(f"{name}: {why}", "damage" if damage else "usage")
        raise _Skip(why)

    def _manifest(self, digest: str, name: str) -> Manifest:
        loaded = self.store.load(digest)
        if isinstance(loaded, Unloadable):
            raise ExportError(f"{name}: manifest {digest}: {loaded.message}", "damage")
        return loaded

    def _add_image(self, repo: Repository, tag: str | None, digest: str, name: str) -> None:
        manifest = self._manifest(digest, name)
        platform: dict[str, Any] | None = None
        index_digest: str | None = None
        wants_one = self.platform is not None or self.plan.format is ExportFormat.DOCKER_ARCHIVE
        if manifest.kind.is_index and wants_one:
            index_digest = digest
            digest, platform = self._pick_platform(digest, name)
            manifest = self._manifest(digest, name)
        elif self.platform is not None:
            self._check_platform(manifest, name)
        if self.plan.format is ExportFormat.DOCKER_ARCHIVE:
            self._add_docker_image(repo.name, tag, digest, manifest, name)
            return
        if manifest.kind is ManifestKind.SCHEMA1:
            self._note("schema1", f"{name} is a schema1 manifest: it is stored as is, and only "
                       "`regfsck import` reads it back from an OCI layout")
        elif manifest.kind in DOCKER_TYPES:
            self._note("docker", "images with docker media types are stored byte for byte (digests "
                       "kept): skopeo 1.9 and umoci skip them in an OCI layout, `regfsck import` "
                       "restores them; use --format docker-archive to hand them to docker/skopeo")
        if name in self._names_seen:
            return
        self._names_seen.add(name)
        self.plan.images.append(ExportImage(name, repo.name, tag, digest, manifest.media_type,
                                            self._blob(digest, name).size, platform, index_digest))
        self._collect(digest, manifest, name)

    def _note(self, key: str, text: str) -> None:
        if key not in self._notes_seen:
            self._notes_seen.add(key)
            self.plan.notes.append(text)

    # -- platforms -----------------------------------------------------------------
    def _index_children(self, index_digest: str, name: str) -> list[tuple[str, dict[str, Any]]]:
        try:
            doc = json.loads(self.store.raw(index_digest))
        except (StorageError, ValueError, RecursionError) as exc:
            raise ExportError(f"{name}: cannot read index {index_digest}: {exc}", "damage") from exc
        children = []
        for child in doc.get("manifests") or []:
            if isinstance(child, dict) and isinstance(child.get("digest"), str):
                platform = child.get("platform")
                children.append((child["digest"], platform if isinstance(platform, dict) else {}))
        return children

    def _pick_platform(self, index_digest: str, name: str) -> tuple[str, dict[str, Any]]:
        children = self._index_children(index_digest, name)
        listed = ", ".join(sorted({str(p) for _, raw in children if (p := platform_of(raw))}))
        if self.platform is None:
            self._refuse(name, "a multi-platform image: a docker-archive holds one platform, give "
                         f"--platform (one of: {listed or 'none listed'})")
        wanted = self.platform
        assert wanted is not None
        for exact in (True, False):
            hits = [(d, raw) for d, raw in children
                    if (p := platform_of(raw)) is not None and wanted.matches(p, exact=exact)]
            if len(hits) > 1:
                plain = [(d, raw) for d, raw in hits if not raw.get("variant")]
                if len(plain) != 1:
                    raise ExportError(f"{name}: --platform {wanted} matches several images "
                                      f"({listed}); add the variant")
                hits = plain
            if hits:
                return hits[0]
        self._refuse(name, f"no {wanted} image in it (it has: {listed or 'none listed'})")
        raise AssertionError("unreachable")

    def _check_platform(self, manifest: Manifest, name: str) -> None:
        assert self.platform is not None
        found = platform_of(self._read_config(manifest, name))
        if found is None or not self.platform.matches(found, exact=False):
            self._refuse(name, f"it is {found or 'not a platform image'}, not {self.platform}")

    def _read_config(self, manifest: Manifest, name: str) -> dict[str, Any] | None:
        if manifest.config is None or manifest.config.media_type not in IMAGE_CONFIG_TYPES:
            return None
        blob = self._blob(manifest.config.digest, name)
        try:
            raw = self._configs.get(blob.digest) or self.storage.read_small(blob.path, CONFIG_LIMIT)
            self._configs[blob.digest] = raw
            doc = json.loads(raw)
        except (StorageError, ValueError, RecursionError) as exc:
            raise ExportError(f"{name}: cannot read config {blob.digest}: {exc}", "damage") from exc
        return doc if isinstance(doc, dict) else None

    # -- blobs ---------------------------------------------------------------------
    def _blob(self, digest: str, name: str) -> BlobCopy:
        """The blob a descriptor names, under the digest the manifest uses (a sha512 layer
        is stored as its sha256 and found through its alias link: `ReachGraph.resolve`)."""
        stored = self.store.reach.resolve(digest)
        blob = self.inv.blobs.get(stored) if stored is not None else None
        if blob is None:
            raise ExportError(f"{name}: blob {digest} is missing from the tree "
                              f"({layout.V2_PREFIX}/{layout.blob_data(digest)})", "damage")
        return BlobCopy(digest, blob.size, blob.path, name)

    def _add_blob(self, digest: str, name: str) -> None:
        if digest not in self._blobs_seen:
            self._blobs_seen.add(digest)
            blob = self._blob(digest, name)
            data = self.store.kept(digest) or self._configs.get(digest)
            if data is not None and len(data) == blob.size:
                blob = replace(blob, data=data)  # read while planning: not read again
            self.plan.blobs.append(blob)

    def _collect(self, root: str, manifest: Manifest, name: str) -> None:
        """Every blob the manifest needs, each once, manifests after what they reference."""
        stack: list[tuple[str, Manifest]] = [(root, manifest)]
        queued = {root}
        manifests: list[str] = []
        while stack:
            digest, _ = stack.pop()
            manifests.append(digest)
            for edge in self.store.reach.edges(digest):
                ref = edge.descriptor
                if edge.blob is None and edge.optional:
                    continue  # a foreign layer not stored here: its `urls` serve it
                if ref.role != "manifest":
                    self._add_blob(ref.digest, name)
                elif ref.digest not in queued:  # a cycle is cut, not followed
                    queued.add(ref.digest)
                    stack.append((ref.digest, self._manifest(ref.digest, name)))
        for digest in reversed(manifests):
            self._add_blob(digest, name)

    def _add_docker_image(self, repo: str, tag: str | None, digest: str, manifest: Manifest,
                          name: str) -> None:
        if manifest.kind not in (ManifestKind.DOCKER_MANIFEST, ManifestKind.OCI_MANIFEST):
            self._refuse(name, f"a {manifest.kind.value} cannot go into a docker-archive")
        config = manifest.config
        if config is None or config.media_type not in IMAGE_CONFIG_TYPES:
            self._refuse(name, "not a container image (config type "
                         f"{config.media_type if config else 'none'!r})")
        assert config is not None
        if any(layer.is_foreign and self.store.reach.resolve(layer.digest) is None
               for layer in manifest.layers):
            self._refuse(name, "foreign (non-distributable) layers not in the store cannot go "
                         "into a docker-archive")
        image = self._docker_images.get(digest)
        if image is None:
            image = ExportImage(name, repo, tag, digest, manifest.media_type,
                                self._blob(digest, name).size, config=config.digest,
                                layers=tuple(layer.digest for layer in manifest.layers))
            self._docker_images[digest] = image
            self.plan.images.append(image)
            self._add_blob(config.digest, name)
            for layer in manifest.layers:
                self._add_blob(layer.digest, name)
        if tag is not None and name not in image.repo_tags:
            image.repo_tags.append(name)


    # -- referrers -----------------------------------------------------------------
    def add_referrers(self) -> None:
        """Take along every referrer of every exported manifest (signatures, attestations,
        SBOMs: by `subject` field or cosign's `sha256-<hex>.sig` tags), and theirs in turn.

        A tagged referrer is named `repo:tag` (one entry per tag, so import restores the
        cosign tags), an untagged one `repo@digest`. A docker-archive holds images only."""
        if self.plan.format is ExportFormat.DOCKER_ARCHIVE:
            self._note("referrers", "a docker-archive holds images only: signatures, "
                       "attestations and SBOMs attached to them are not exported")
            return
        queue = [(image.repo, d) for image in self.plan.images
                 for d in (image.digest, image.index_digest) if d is not None]
        done: set[tuple[str, str]] = set()
        while queue:
            repo_name, subject = queue.pop(0)
            if (repo_name, subject) in done:
                continue
            done.add((repo_name, subject))
            repo = self.inv.repositories[repo_name]
            found = referrers_of(subject, valid_revisions(repo), repo.tag_targets(), self.store.get)
            for referrer in found:
                names = [f"{repo_name}:{t}" for t in referrer.tags] or [
                    f"{repo_name}@{referrer.digest}"]
                manifest = self._manifest(referrer.digest, names[0])
                for name in names:
                    if name in self._names_seen:
                        continue
                    self._names_seen.add(name)
                    tag = name.rpartition(":")[2] if referrer.tags else None
                    self.plan.images.append(ExportImage(
                        name, repo_name, tag, referrer.digest, manifest.media_type,
                        self._blob(referrer.digest, name).size))
                self._collect(referrer.digest, manifest, names[0])
                self.plan.referrers += 1
                queue.append((repo_name, referrer.digest))


def plan_export(storage: Storage, inventory: Inventory, store: ManifestStore,
                refs: list[ImageRef], fmt: ExportFormat, platform: Platform | None = None,
                with_referrers: bool = True) -> ExportPlan:
    """Resolve `refs` into images and the exact blobs to copy; raises ExportError."""
    explicit = {str(r) for r in refs if not r.is_whole_repo}
    planner = _Planner(storage, inventory, store, fmt, platform, explicit)
    for ref in refs:
        planner.add_ref(ref)
    if with_referrers and planner.plan.images:
        planner.add_referrers()
    if not planner.plan.images:
        reasons = "; ".join(f"{r}: {why}" for r, why in planner.plan.skipped)
        raise ExportError(f"nothing to export ({reasons or 'no images'})")
    return planner.plan


# -- writing ------------------------------------------------------------------------------


def verified_chunks(storage: Storage, blob: BlobCopy, on_bytes: ProgressFn | None = None,
                    stop: threading.Event | None = None,
                    chunks: Iterator[bytes] | None = None) -> Iterator[bytes]:
    """Yield a blob's bytes in bounded chunks; raise ExportError at the end if they are wrong.

    `chunks`: the blob's stream if already opened (`_read_ahead`), else it is opened here
    through the storage seam (a descriptor on a local tree, a streaming GET on S3). The
    check happens after the last chunk, so consumers must treat the data as good only
    once the generator is exhausted without error."""
    source = chunks if chunks is not None else storage.iter_chunks(blob.path, COPY_BUFFER)

    def read() -> Iterator[bytes]:
        try:
            while True:
                try:
                    chunk = next(source, b"")
                except StorageError as exc:
                    raise ExportError(f"{blob.image}: blob {blob.digest}: {exc.message}",
                                      "damage") from exc
                if not chunk:
                    return
                yield chunk
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    try:
        yield from verified(read(), blob.digest, blob.size, on_bytes=on_bytes, stop=stop)
    except Interrupted as exc:  # the caller removes the partial output
        raise Interrupted("interrupted: nothing was written") from exc
    except DigestMismatch as exc:
        raise ExportError(
            f"{blob.image}: blob {blob.digest} is corrupt (its data hashes to {exc.actual}, "
            f"{exc.total} bytes read, {blob.size} expected); nothing was exported "
            "(run `regfsck verify`)", "damage") from exc


class _Opened:
    """A blob stream started ahead of its turn: its first chunk (or its error) is here."""

    def __init__(self, storage: Storage, blob: BlobCopy) -> None:
        self.chunks = storage.iter_chunks(blob.path, COPY_BUFFER)
        self.first: bytes | StorageError = b""
        try:
            self.first = next(self.chunks, b"")
        except StorageError as exc:
            self.first = exc

    def stream(self) -> Iterator[bytes]:
        try:
            if isinstance(self.first, StorageError):
                raise self.first
            if self.first:
                yield self.first
                yield from self.chunks
        finally:
            self.close()

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


def _read_ahead(storage: Storage, blobs: list[BlobCopy],
                stop: threading.Event | None) -> Iterator[tuple[BlobCopy, Iterator[bytes] | None]]:
    """The blobs in order, each with its stream. On object storage up to READ_AHEAD streaming
    GETs are started ahead (their first chunk fetched), so the output is written in order
    while the next requests' latency passes: memory stays at READ_AHEAD chunks. A local tree
    opens each blob when its turn comes (None: verified_chunks opens it)."""
    if isinstance(storage, FilesystemStorage) or len(blobs) < 2:
        for blob in blobs:
            yield blob, (iter((blob.data,)) if blob.data is not None else None)
        return
    from concurrent.futures import Future, ThreadPoolExecutor

    ahead = min(READ_AHEAD, getattr(storage, "io_threads", 1) or 1)
    pending: list[tuple[BlobCopy, Future[_Opened] | None]] = []
    with ThreadPoolExecutor(ahead, thread_name_prefix="regfsck-export") as pool:

        def start(blob: BlobCopy) -> Future[_Opened] | None:
            # bytes read while planning need no request
            return None if blob.data is not None else pool.submit(_Opened, storage, blob)

        try:
            queue = iter(blobs)
            for blob in queue:
                pending.append((blob, start(blob)))
                if sum(f is not None for _, f in pending) >= ahead:
                    break
            while pending:
                if stop is not None and stop.is_set():
                    raise Interrupted("interrupted: nothing was written")
                blob, future = pending.pop(0)
                while sum(f is not None for _, f in pending) < ahead:
                    nxt = next(queue, None)
                    if nxt is None:
                        break
                    pending.append((nxt, start(nxt)))
                if future is None:
                    assert blob.data is not None
                    yield blob, iter((blob.data,))
                else:
                    yield blob, future.result().stream()
        finally:
            for _, future in pending:
                if future is None:
                    continue
                future.cancel()
                if future.done() and not future.cancelled() and future.exception() is None:
                    future.result().close()


class _Sink:
    """Where the files of the output go; subclasses write a directory or a tar stream."""

    def add_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def add_stream(self, name: str, size: int, chunks: Iterator[bytes]) -> None:
        raise NotImplementedError

    def finish(self) -> int:
        """Publish the output under its final name; returns its size in bytes."""
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


def _partial_name(output: Path) -> Path:
    return output.parent / f".{output.name}.regfsck-partial-{secrets.token_hex(4)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _DirSink(_Sink):
    """An OCI layout directory, built under a temporary name and renamed into place."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.tmp = _partial_name(output)
        os.mkdir(self.tmp, 0o755)
        self._dirs: set[Path] = {self.tmp}
        self.bytes = 0

    def _open(self, name: str) -> int:
        path = self.tmp.joinpath(*name.split("/"))
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add_stream(name, len(data), iter([data]))

    def add_stream(self, name: str, size: int, chunks: Iterator[bytes]) -> None:
        fd = self._open(name)
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
                self.bytes += len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)

    def finish(self) -> int:
        for directory in sorted(self._dirs, key=lambda p: len(p.parts), reverse=True):
            _fsync_dir(directory)
        if self.output.exists() or self.output.is_symlink():
            raise ExportError(f"{self.output} appeared while exporting; the export is left in "
                              f"{self.tmp}", "io")
        os.rename(self.tmp, self.output)
        _fsync_dir(self.output.parent)
        return self.bytes

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _CountingFile:
    """The raw output file: counts bytes and writes through the descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        _write_all(self.fd, data)
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


class _TarSink(_Sink):
    """A tar stream (optionally gzip- or zstd-compressed) into a file renamed into place."""

    def __init__(self, output: Path, compression: Compression) -> None:
        self.output = output
        self.tmp = _partial_name(output)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        self.raw = _CountingFile(self.fd)
        self.stream: Any
        if compression is Compression.ZSTD:
            compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS)
            self.stream = compressor.stream_writer(self.raw, closefd=False)  # type: ignore[arg-type]
        elif compression is Compression.GZIP:
            # Parallel gzip members (ISA-L when installed): several times gzip -6's speed;
            # concatenated members are one gzip stream to every reader (Go's included).
            self.stream = deflate.ParallelGzipWriter(self.raw, GZIP_THREADS)
        else:
            self.stream = self.raw
        self.tar_bytes = 0
        self._dirs: set[str] = set()

    def _write(self, data: bytes | memoryview) -> None:
        self.stream.write(data)
        self.tar_bytes += len(data)

    def _header(self, name: str, size: int, directory: bool = False) -> None:
        info = tarfile.TarInfo(name + ("/" if directory else ""))
        info.size = 0 if directory else size
        info.mode = 0o755 if directory else 0o644
        info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        info.mtime = 0  # the same images give the same archive
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i])
            if directory not in self._dirs:
                self._dirs.add(directory)
                self._header(directory, 0, directory=True)

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add_stream(name, len(data), iter([data]))

    def add_stream(self, name: str, size: int, chunks: Iterator[bytes]) -> None:
        self._parents(name)
        self._header(name, size)
        written = 0
        for chunk in chunks:
            if written + len(chunk) > size:
                raise ExportError(f"{name} grew while it was being exported", "damage")
            self._write(chunk)
            written += len(chunk)
        if written != size:
            raise ExportError(f"{name} shrank while it was being exported", "damage")
        if size % tarfile.BLOCKSIZE:
            self._write(bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def finish(self) -> int:
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        if self.tar_bytes % TAR_RECORD:
            self._write(bytes(TAR_RECORD - self.tar_bytes % TAR_RECORD))
        if self.stream is not self.raw:
            self.stream.close()  # ends the gzip member / zstd frame; the fd stays open
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        _publish_file(self.tmp, self.output)
        return self.raw.bytes

    def abort(self) -> None:
        if isinstance(self.stream, deflate.ParallelGzipWriter):
            self.stream.abort()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


def _publish_file(tmp: Path, output: Path) -> None:
    """Give the finished file its final name without ever replacing an existing file."""
    try:
        os.link(tmp, output)
    except FileExistsError as exc:
        raise ExportError(f"{output} appeared while exporting; the export is left in {tmp}",
                          "io") from exc
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if output.exists() or output.is_symlink():  # no hard links here: check, then rename
            raise ExportError(f"{output} appeared while exporting; the export is left in {tmp}",
                              "io") from exc
        os.rename(tmp, output)
    else:
        tmp.unlink()
    _fsync_dir(output.parent)


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def oci_index(plan: ExportPlan) -> bytes:
    """index.json: one entry per image, named by `org.opencontainers.image.ref.name`."""
    entries = []
    for image in plan.images:
        entry: dict[str, Any] = {"mediaType": image.media_type, "digest": image.digest,
                                 "size": image.size}
        if image.platform:
            entry["platform"] = image.platform
        entry["annotations"] = {REF_NAME_ANNOTATION: image.ref_name}
        entries.append(entry)
    return _compact({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})


def docker_manifest(plan: ExportPlan) -> bytes:
    """manifest.json of a docker-archive: config, RepoTags and layers of every image."""
    return _compact([{"Config": blob_name(image.config or ""), "RepoTags": image.repo_tags,
                      "Layers": [blob_name(d) for d in image.layers]} for image in plan.images])


def blob_name(digest: str) -> str:
    """Where a blob lives inside the output: `blobs/<alg>/<hex>` (the OCI layout rule)."""
    return "/".join(("blobs", *layout.split_digest(digest)))


def check_output(output: Path, fmt: ExportFormat, compression: Compression, v2_dir: Path) -> None:
    """Refuse outputs that exist, sit inside the registry tree or cannot be compressed."""
    if fmt is ExportFormat.OCI and compression is not Compression.NONE:
        raise ExportError(f"{output}: an oci directory cannot be compressed; use "
                          "--format oci-archive (or a name without .gz/.zst)")
    if output.exists() or output.is_symlink():
        raise ExportError(f"{output} already exists; regfsck never overwrites an export")
    parent = output.parent.resolve()
    if not parent.is_dir():  # exit 3 as documented: a place we cannot write, not a bad option
        why = "does not exist" if not parent.exists() else "is not a directory"
        raise ExportError(f"cannot write {output}: {output.parent} {why}", "io")
    tree = v2_dir.resolve().parent.parent  # ROOT/docker: the registry's own territory
    if parent == tree or tree in parent.parents:
        raise ExportError(f"{output} is inside the registry tree {tree}; export elsewhere")


def write_export(storage: Storage, plan: ExportPlan, output: Path,
                 compression: Compression, *, on_bytes: ProgressFn | None = None,
                 stop: threading.Event | None = None) -> ExportResult:
    """Stream the plan into OUTPUT; on any error nothing is left under OUTPUT's name."""
    try:
        sink: _Sink = (_DirSink(output) if plan.format is ExportFormat.OCI
                       else _TarSink(output, compression))
    except OSError as exc:
        raise ExportError(f"cannot create {output}: {exc.strerror}", "io") from exc
    try:
        if plan.format is not ExportFormat.DOCKER_ARCHIVE:
            sink.add_bytes("oci-layout", OCI_LAYOUT_BYTES)
        for blob, chunks in _read_ahead(storage, plan.blobs, stop):
            sink.add_stream(blob_name(blob.digest), blob.size,
                            verified_chunks(storage, blob, on_bytes, stop, chunks))
        if plan.format is ExportFormat.DOCKER_ARCHIVE:
            sink.add_bytes("manifest.json", docker_manifest(plan))
        else:
            sink.add_bytes("index.json", oci_index(plan))  # last: a reader sees all or nothing
        size = sink.finish()
    except OSError as exc:
        sink.abort()
        if isinstance(exc, StorageError):
            raise ExportError(str(exc), "damage") from exc
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}", "io") from exc
    except BaseException:
        sink.abort()
        raise
    return ExportResult(str(output), plan.format, compression, plan, size)


def _prefetch(storage: Storage, inventory: Inventory, store: ManifestStore,
              refs: list[ImageRef], *, configs: bool) -> None:
    """Object storage: read the manifests the refs name (level by level down their indexes)
    and, when `configs` (--platform checks them), their image configs with concurrent GETs,
    before the planner asks for them one by one. Only what the refs reach is read, not
    every revision of a repository. A local tree reads each one when asked."""
    if isinstance(storage, FilesystemStorage):
        return
    roots: set[str] = set()
    for ref in refs:
        repo = inventory.repositories.get(ref.repo) if ref.repo is not None else None
        if ref.digest is not None:
            roots.add(ref.digest)
        elif repo is not None:
            targets = repo.tag_targets()
            roots.update(targets.values() if ref.tag is None else
                         [targets[ref.tag]] if ref.tag in targets else [])
    paths: set[str] = set()
    for digest in store.preload_tree(roots):
        manifest = store.get(digest)
        config = manifest.config if manifest is not None else None
        blob = inventory.blobs.get(config.digest) if config is not None else None
        if configs and blob is not None and config is not None and \
                config.media_type in IMAGE_CONFIG_TYPES:
            paths.add(blob.path)
    if paths:
        storage.prefetch(paths.__contains__, lambda _: (), CONFIG_LIMIT)


def export_images(storage: Storage, inventory: Inventory, refs: list[ImageRef],
                  output: Path, v2_dir: Path, *, fmt: ExportFormat | None = None,
                  platform: Platform | None = None, on_start: Callable[[int], None] | None = None,
                  on_bytes: ProgressFn | None = None,
                  stop: threading.Event | None = None,
                  with_referrers: bool = True) -> ExportResult:
    """Plan and write an export (`on_start` receives the total bytes before copying)."""
    fmt = fmt or default_format(output)
    compression = compression_for(output)
    check_output(output, fmt, compression, v2_dir)
    store = ManifestStore(storage, inventory, keep_raw=True)
    _prefetch(storage, inventory, store, refs, configs=platform is not None)
    plan = plan_export(storage, inventory, store, refs, fmt, platform, with_referrers)
    if on_start is not None:
        on_start(plan.total_bytes)
    return write_export(storage, plan, output, compression, on_bytes=on_bytes, stop=stop)

