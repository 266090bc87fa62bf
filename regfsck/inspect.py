"""What `skopeo inspect` shows, offline and deeper: one image's manifest tree and health.

The tree is index -> platform manifests -> config and layers, read straight from the
blobs. For each node: media type, size, whether the blob is there and linked in the
repository; for images: the config's platform, created time and history; for layers: the
compression found in the bytes and the uncompressed size (streamed, bounded memory).
Around it: every tag and repository that points at the manifest, the indexes that list
it, and its health from verify's checks restricted to the image's blobs.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, ParamSpec, TypeVar

import zstandard

from regfsck import layout
from regfsck.artifacts import artifact_type_of, classify, tag_subject
from regfsck.checks import TreeChecker, linked_layers
from regfsck.compression import MAGIC_BYTES, sniff_compression
from regfsck.digest import (
    EMPTY_SHA256,
    DigestError,
    expand_digest,
    is_digest,
)
from regfsck.document import Document, SparseDocument
from regfsck.errors import ExitCode, RegfsckError
from regfsck.findings import Finding, Severity, make_finding
from regfsck.graph import ManifestStore, Unloadable
from regfsck.hashing import verify_blobs
from regfsck.inventory import Blob, Inventory
from regfsck.manifest import Descriptor, Manifest, ManifestKind
from regfsck.refs import ImageRef, RefError
from regfsck.storage import Storage, StorageError
from regfsck.why import ReferenceGraph

MAX_CONFIG_BYTES = 32 * 1024 * 1024
# A hostile tree can nest indexes thousands deep, or list one child twice at every level
# (2^n paths): past these bounds the tree is cut with a `problem`, never a crash or a hang.
MAX_INDEX_DEPTH = 32
MAX_TREE_NODES = 10_000
READ_CHUNK = 1 << 20


class ImageDamaged(RegfsckError):
    """The image cannot be read whole (a missing or unreadable blob, a manifest or config
    that does not parse): inspect reports it as damage, exit 1."""

    exit_code = ExitCode.FINDINGS


P = ParamSpec("P")
T = TypeVar("T")


def _damage_is_findings(function: Callable[P, T]) -> Callable[P, T]:
    """Reading an image: an I/O error or a value that does not parse is `ImageDamaged`
    (a REF naming nothing stays the usage error it is)."""
    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return function(*args, **kwargs)
        except RefError:
            raise
        except (StorageError, ValueError) as exc:
            raise ImageDamaged(str(exc)) from exc
    return wrapper


# -- the report ----------------------------------------------------------------------


@dataclass
class BlobNode:
    """A config or layer as the manifest describes it and as the disk has it."""

    role: str
    digest: str
    media_type: str
    size: int | None  # from the descriptor
    stored_size: int | None = None  # on disk; None when missing
    linked: bool | None = None  # has a `_layers` link in the repository
    foreign: bool = False
    urls: list[str] = field(default_factory=list)
    compression: str | None = None  # found in the bytes: gzip, zstd, none
    uncompressed_size: int | None = None
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if v is not None and v != []}
        data["present"] = self.stored_size is not None
        return data


@dataclass
class ConfigInfo(SparseDocument):
    created: str | None = None
    architecture: str | None = None
    os: str | None = None
    variant: str | None = None
    author: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] | None = None
    labels: dict[str, str] | None = None
    diff_ids: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ManifestNode:
    digest: str
    media_type: str
    size: int | None  # stored blob size
    platform: str | None = None  # from the index descriptor, or the config
    in_repository: bool | None = None  # has a revision link in the repository
    artifact_type: str | None = None
    subject: str | None = None
    config: BlobNode | None = None
    config_info: ConfigInfo | None = None
    layers: list[BlobNode] = field(default_factory=list)
    children: list[ManifestNode] = field(default_factory=list)
    problem: str | None = None

    def blob_nodes(self) -> list[BlobNode]:
        return ([self.config] if self.config else []) + self.layers

    def walk(self) -> list[ManifestNode]:
        nodes = [self]
        for child in self.children:
            nodes.extend(child.walk())
        return nodes

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"digest": self.digest, "media_type": self.media_type,
                                "size": self.size}
        for key in ("platform", "in_repository", "artifact_type", "subject", "problem"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.config is not None:
            data["config"] = self.config.to_json()
        if self.config_info is not None:
            data["config"]["info"] = self.config_info.to_json()
        if self.layers or self.config is not None:
            data["layers"] = [layer.to_json() for layer in self.layers]
        if self.children:
            data["manifests"] = [child.to_json() for child in self.children]
        return data


@dataclass
class Totals(Document):
    """Unique blobs of the whole tree (a layer shared by two platforms counts once)."""

    layers: int = 0
    compressed_bytes: int = 0
    uncompressed_bytes: int | None = 0  # None when some layer could not be measured
    stored_bytes: int = 0  # manifests + configs + layers present on disk


@dataclass
class InspectReport:
    ref: str
    repo: str | None
    digest: str
    root: ManifestNode
    tags: list[str] = field(default_factory=list)  # "repo:tag" whose current link is `digest`
    repositories: list[str] = field(default_factory=list)  # holding a revision of `digest`
    parents: list[dict[str, Any]] = field(default_factory=list)  # indexes listing it
    referrers: list[dict[str, Any]] = field(default_factory=list)  # by subject field or cosign tag
    kind: str | None = None  # image / index / signature / ... (artifacts.classify)
    subject: str | None = None  # what this manifest attaches to (subject field or cosign tag)
    subject_via: str | None = None
    totals: Totals = field(default_factory=Totals)
    health: list[Finding] = field(default_factory=list)
    data_checked: bool = False

    @property
    def healthy(self) -> bool:
        return not any(f.severity is Severity.ERROR for f in self.health)

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "repo": self.repo, "digest": self.digest,
            "media_type": self.root.media_type, "tags": self.tags,
            "repositories": self.repositories, "parents": self.parents,
            "referrers": self.referrers, "kind": self.kind, "subject": self.subject,
            "subject_via": self.subject_via, "manifest": self.root.to_json(),
            "totals": self.totals.to_json(), "healthy": self.healthy,
            "data_checked": self.data_checked,
            "health": [f.to_json() for f in self.health],
        }


# -- reading blobs --------------------------------------------------------------------


def _count(stream: IO[bytes]) -> int:
    total = 0
    while chunk := stream.read(READ_CHUNK):
        total += len(chunk)
    return total


def measure_layer(storage: Storage, path: str) -> tuple[str, int]:
    """(compression, uncompressed size) of a layer blob, decompressing as a stream (one read
    through the storage seam: a file, or one streaming GET on object storage).

    Raises ValueError / StorageError when the bytes are not the stream they claim to be."""
    with storage.open_read(path) as opened:
        raw: Any = opened if isinstance(opened, io.BufferedReader) else \
            io.BufferedReader(opened, READ_CHUNK)
        kind = sniff_compression(raw.peek(MAGIC_BYTES)[:MAGIC_BYTES])
        try:
            if kind == "gzip":
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return kind, _count(stream)  # type: ignore[arg-type]
            if kind == "zstd":
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                with reader:
                    return kind, _count(reader)
            return kind, _count(raw)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            if isinstance(exc, StorageError):
                raise
            raise ValueError(f"{kind} stream is damaged: {exc}") from exc


def _expected_compression(media_type: str) -> str | None:
    if media_type.endswith(("+gzip", ".tar.gzip")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    if media_type.endswith((".tar", "tar")):
        return "none"
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _str_list(value: Any) -> list[str] | None:
    return [str(v) for v in value] if isinstance(value, list) else None


def parse_config(raw: bytes) -> ConfigInfo:
    """Pick the fields people look at from an image config (docker or OCI)."""
    try:
        doc = json.loads(raw)
    except RecursionError as exc:
        raise ValueError("JSON nested too deep") from exc
    if not isinstance(doc, dict):
        raise ValueError("config is not a JSON object")
    inner: dict[str, Any] = doc["config"] if isinstance(doc.get("config"), dict) else {}
    rootfs: dict[str, Any] = doc["rootfs"] if isinstance(doc.get("rootfs"), dict) else {}
    labels = inner.get("Labels")
    history = doc.get("history")
    return ConfigInfo(
        created=_text(doc.get("created")), architecture=_text(doc.get("architecture")),
        os=_text(doc.get("os")), variant=_text(doc.get("variant")),
        author=_text(doc.get("author")), entrypoint=_str_list(inner.get("Entrypoint")),
        cmd=_str_list(inner.get("Cmd")), env=_str_list(inner.get("Env")),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else None,
        diff_ids=_str_list(rootfs.get("diff_ids")) or [],
        history=[h for h in history if isinstance(h, dict)] if isinstance(history, list) else [],
    )


# -- building the tree ---------------------------------------------------------------


class Inspector:
    """Builds the report for one REF over a scanned tree."""

    def __init__(self, inventory: Inventory, store: ManifestStore, *,
                 measure_layers: bool = True, graph: ReferenceGraph | None = None) -> None:
        self.inv = inventory
        self.store = store
        self.storage = store.storage
        self.measure_layers = measure_layers
        self._graph = graph
        self._measured: dict[str, tuple[str | None, int | None, str | None]] = {}
        self._nodes = 0  # manifest nodes built for the current tree (MAX_TREE_NODES)

    @property
    def graph(self) -> ReferenceGraph:
        if self._graph is None:
            self._graph = ReferenceGraph(self.inv, self.store)
        return self._graph

    def _expand(self, ref: ImageRef) -> ImageRef:
        """A short digest (`repo@6d7e7209`, `sha256:6d7e7209`) made whole, or RefError."""
        assert ref.digest is not None
        if ref.repo is not None:
            repo = self.inv.repositories.get(ref.repo)
            if repo is None:
                raise RefError(f"no such repository: {ref.repo}")
            candidates: Iterable[str] = repo.revisions
            what = f"manifest of {ref.repo}"
        else:
            candidates = set(self.graph.holders) | set(self.inv.blobs)
            what = "manifest or blob"
        try:
            return ImageRef(ref.repo, None, expand_digest(ref.digest, candidates, what))
        except DigestError as exc:
            raise RefError(str(exc)) from exc

    @_damage_is_findings
    def resolve(self, ref: ImageRef) -> tuple[str | None, str]:
        """(repository, manifest digest) the REF names; RefError says what is there instead."""
        if ref.digest is not None and not is_digest(ref.digest):
            ref = self._expand(ref)
        if ref.repo is None:
            assert ref.digest is not None
            holders = sorted(self.graph.holders.get(ref.digest, ()))
            if holders:
                return holders[0], ref.digest
            if ref.digest in self.inv.blobs:
                return None, ref.digest
            raise RefError(f"no repository holds manifest {ref.digest} and no such blob exists")
        repo = self.inv.repositories.get(ref.repo)
        if repo is None:
            raise RefError(f"no such repository: {ref.repo}")
        if ref.digest is not None:
            if ref.digest not in repo.revisions:
                raise RefError(f"{ref.repo} has no revision {ref.digest}")
            return ref.repo, ref.digest
        assert ref.tag is not None
        tag = repo.tags.get(ref.tag)
        if tag is None:
            known = ", ".join(sorted(repo.tags)[:20]) or "none"
            raise RefError(f"{ref.repo} has no tag {ref.tag!r} (tags: {known})")
        if tag.current is None or tag.current.target is None:
            why = "no current/link" if tag.current is None else tag.current.error
            raise RefError(f"tag {ref} cannot be resolved ({why}); see `regfsck verify` / "
                           "`regfsck repair`")
        return ref.repo, tag.current.target

    @_damage_is_findings
    def build(self, ref: ImageRef, *, check_data: bool = True, jobs: int = 1,
              stop: threading.Event | None = None) -> InspectReport:
        repo, digest = self.resolve(ref)
        self._prefetch(digest, stop)
        self._nodes = 0
        root = self._manifest_node(repo, digest, None, frozenset())
        report = InspectReport(ref=str(ref), repo=repo, digest=digest, root=root)
        self._relations(report)
        report.totals = self._totals(root)
        report.health = self._health(report, check_data, jobs, stop)
        report.data_checked = check_data
        return report

    def _prefetch(self, root: str, stop: threading.Event | None) -> None:
        """Read ahead, `storage.io_threads` at a time, what building the tree then asks for one
        by one: the manifests down the indexes (a level at a time), the image configs, and
        each layer's measure (one streaming GET each). On object storage a tree of N images
        then costs a few rounds of latency instead of ~3N; on a local tree (io_threads 1)
        everything is read when the walk meets it, as before."""
        threads = self.storage.io_threads
        if threads <= 1:
            return
        reached = self.store.preload_tree([root])
        configs: set[str] = set()
        layers: dict[str, Blob] = {}
        for digest in sorted(reached):
            manifest = self.store.get(digest)
            if manifest is None:
                continue
            if manifest.config is not None and \
                    (blob := self.inv.blobs.get(manifest.config.digest)) is not None:
                configs.add(blob.path)
            if self.measure_layers:
                for layer in manifest.layers:
                    stored = self.store.reach.resolve(layer.digest)
                    if stored is not None and (blob := self.inv.blobs.get(stored)) is not None:
                        layers.setdefault(blob.digest, blob)
        if configs:
            self.storage.prefetch(configs.__contains__, lambda _: (), MAX_CONFIG_BYTES)
        if len(layers) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(threads, len(layers)),
                                    thread_name_prefix="regfsck-inspect") as pool:
                # after Ctrl-C the rest is left to the walk, which the caller stops
                list(pool.map(lambda blob: None if stop is not None and stop.is_set()
                              else self._measure(blob), layers.values()))

    def _manifest_node(self, repo: str | None, digest: str, platform: str | None,
                       path: frozenset[str]) -> ManifestNode:
        blob = self.inv.blobs.get(digest)
        in_repo = None
        if repo is not None:
            in_repo = digest in self.graph.revisions.get(repo, set())
        node = ManifestNode(digest=digest, media_type="", size=blob.size if blob else None,
                            platform=platform, in_repository=in_repo)
        loaded = self.store.load(digest)
        if isinstance(loaded, Unloadable):
            node.problem = loaded.message
            return node
        node.media_type = loaded.media_type
        node.artifact_type = artifact_type_of(loaded)
        node.subject = loaded.subject.digest if loaded.subject else None
        if loaded.kind.is_index:
            for child in loaded.children:
                cut = None
                if child.digest in path or child.digest == digest:
                    cut = "index cycle"
                elif len(path) + 1 >= MAX_INDEX_DEPTH:
                    cut = f"not expanded: indexes nested deeper than {MAX_INDEX_DEPTH} levels"
                elif self._nodes >= MAX_TREE_NODES:
                    cut = f"not expanded: tree larger than {MAX_TREE_NODES} manifests"
                self._nodes += 1
                if cut is not None:
                    node.children.append(ManifestNode(child.digest, child.media_type, child.size,
                                                      child.platform, problem=cut))
                    continue
                node.children.append(self._manifest_node(repo, child.digest, child.platform,
                                                         path | {digest}))
            return node
        self._image_parts(repo, node, loaded)
        return node

    def _image_parts(self, repo: str | None, node: ManifestNode, manifest: Manifest) -> None:
        linked: set[str] | None = None
        if repo is not None:  # by content, and by path (a sha512 alias link names its sha256)
            repository = self.inv.repositories[repo]
            linked = linked_layers(repository) | {
                d for d, link in repository.layers.items() if link.target is not None}
        if manifest.config is not None:
            node.config = self._blob_node(manifest.config, linked, measure=False)
            info = self._config_info(manifest.config.digest)
            if isinstance(info, ConfigInfo):
                node.config_info = info
                if node.platform is None and info.os and info.architecture:
                    node.platform = "/".join(x for x in (info.os, info.architecture,
                                                         info.variant) if x)
            elif info is not None and node.config.stored_size is not None:
                node.config.problem = info
        if manifest.kind is ManifestKind.SCHEMA1:
            self._schema1_info(node)
        for layer in manifest.layers:
            node.layers.append(self._blob_node(layer, linked, measure=True))

    def _schema1_info(self, node: ManifestNode) -> None:
        """Schema1 keeps its config as JSON strings in `history[].v1Compatibility`."""
        try:
            doc = json.loads(self.store.raw(node.digest))
            first = json.loads(doc["history"][0]["v1Compatibility"])
        except (StorageError, ValueError, RecursionError, KeyError, IndexError, TypeError):
            return
        if isinstance(first, dict):
            node.config_info = ConfigInfo(created=_text(first.get("created")),
                                          architecture=_text(doc.get("architecture")),
                                          os=_text(first.get("os")))
            if node.platform is None and node.config_info.os and node.config_info.architecture:
                node.platform = f"{node.config_info.os}/{node.config_info.architecture}"

    def _config_info(self, digest: str) -> ConfigInfo | str | None:
        blob = self.inv.blobs.get(digest)
        if blob is None:
            return None
        try:
            return parse_config(self.storage.read_small(blob.path, MAX_CONFIG_BYTES))
        except StorageError as exc:
            return exc.message
        except (ValueError, UnicodeDecodeError) as exc:
            return f"config is not a JSON object: {exc}"[:200]

    def _blob_node(self, desc: Descriptor, linked: set[str] | None, *, measure: bool) -> BlobNode:
        stored = self.store.reach.resolve(desc.digest)  # a sha512 alias: its stored blob
        blob = self.inv.blobs.get(stored) if stored is not None else None
        node = BlobNode(role=desc.role, digest=desc.digest, media_type=desc.media_type,
                        size=desc.size, stored_size=blob.size if blob else None,
                        linked=(desc.digest in linked) if linked is not None else None,
                        foreign=desc.is_foreign, urls=list(desc.urls))
        if blob is None:
            if not desc.is_foreign:
                node.problem = "blob missing"
            return node
        if measure and self.measure_layers:
            node.compression, node.uncompressed_size, node.problem = self._measure(blob)
            expected = _expected_compression(desc.media_type)
            if node.problem is None and expected and node.compression != expected:
                node.problem = f"media type says {expected}, bytes are {node.compression}"
        return node

    def _measure(self, blob: Blob) -> tuple[str | None, int | None, str | None]:
        cached = self._measured.get(blob.digest)
        if cached is None:
            try:
                kind, size = measure_layer(self.storage, blob.path)
                cached = (kind, size, None)
            except (ValueError, StorageError) as exc:
                cached = (None, None, str(exc))
            self._measured[blob.digest] = cached
        return cached

    # -- around the image --------------------------------------------------------------
    def _relations(self, report: InspectReport) -> None:
        graph = self.graph
        digest = report.digest
        report.repositories = sorted(graph.holders.get(digest, ()))
        report.tags = sorted(f"{name}:{tag}" for name, repo in self.inv.repositories.items()
                             for tag, target in repo.tag_targets().items() if target == digest)
        for parent, role in sorted(graph.parents.get(digest, ())):
            if role != "manifest":
                continue
            for repo in sorted(graph.holders.get(parent, ())):
                report.parents.append({"repo": repo, "digest": parent,
                                       "tags": graph.tags_of(repo, parent)})
        if report.repo is not None and (loaded := self.store.get(digest)) is not None:
            found = classify(loaded, graph.tags_of(report.repo, digest))
            report.kind, report.subject_via = found.kind, found.subject_via
            if found.subject is not None:
                report.subject = found.subject
        seen: set[tuple[str, str]] = set()
        for referrer, subject in sorted(graph.subject_of.items()):
            if subject == digest:
                for repo in sorted(graph.holders.get(referrer, ())):
                    self._add_referrer(report, repo, referrer, "subject", seen)
        for repo in report.repositories:  # cosign's tags: sha256-<hex>.sig/.att/.sbom, sha256-<hex>
            for tag, target in sorted(self.inv.repositories[repo].tag_targets().items()):
                named = tag_subject(tag)
                if named is not None and named[0] == digest and target in graph.revisions[repo]:
                    self._add_referrer(report, repo, target, "tag", seen)

    def _add_referrer(self, report: InspectReport, repo: str, referrer: str, via: str,
                      seen: set[tuple[str, str]]) -> None:
        if (repo, referrer) in seen:
            return
        seen.add((repo, referrer))
        loaded = self.store.get(referrer)
        tags = self.graph.tags_of(repo, referrer)
        found = classify(loaded, tags) if loaded is not None else None
        report.referrers.append({
            "repo": repo, "digest": referrer,
            "artifact_type": (found.artifact_type or "") if found else "",
            "kind": found.kind if found else "", "via": via, "tags": tags})

    def _totals(self, root: ManifestNode) -> Totals:
        totals = Totals()
        seen: set[str] = set()
        for node in root.walk():
            if node.digest not in seen:
                seen.add(node.digest)
                totals.stored_bytes += node.size or 0
            if node.config is not None and node.config.digest not in seen:
                seen.add(node.config.digest)
                totals.stored_bytes += node.config.stored_size or 0
            for layer in node.layers:
                if layer.digest in seen:
                    continue
                seen.add(layer.digest)
                totals.layers += 1
                totals.compressed_bytes += layer.size or layer.stored_size or 0
                totals.stored_bytes += layer.stored_size or 0
                if totals.uncompressed_bytes is not None:
                    if layer.uncompressed_size is None:
                        totals.uncompressed_bytes = None
                    else:
                        totals.uncompressed_bytes += layer.uncompressed_size
        return totals

    def image_digests(self, root: ManifestNode) -> set[str]:
        digests: set[str] = set()
        for node in root.walk():
            digests.add(node.digest)
            digests.update(b.digest for b in node.blob_nodes() if not b.foreign)
        return digests

    def _health(self, report: InspectReport, check_data: bool, jobs: int,
                stop: threading.Event | None) -> list[Finding]:
        """Verify's findings that concern this image: its blobs, its links, its tags."""
        digests = self.image_digests(report.root)
        tags = {t.split(":", 1)[1] for t in report.tags if t.split(":", 1)[0] == report.repo}
        found: dict[tuple[str, str, str | None], Finding] = {}
        if report.repo is not None:
            checker = TreeChecker(self.inv, self.store, now=datetime.now(UTC))
            for finding in checker.run({report.repo}):
                if finding.digest in digests or (finding.tag in tags and finding.tag is not None):
                    found[(finding.kind, finding.path, finding.digest)] = finding
        present = [self.inv.blobs[d] for d in sorted(digests) if d in self.inv.blobs]
        for blob in present:
            if blob.size == 0 and blob.digest != EMPTY_SHA256:
                finding = make_finding("blob_empty", blob.path, "zero-byte blob data",
                                       digest=blob.digest)
                found[(finding.kind, finding.path, finding.digest)] = finding
        for node in report.root.walk():
            loaded = self.store.load(node.digest)
            if isinstance(loaded, Unloadable) and node.digest in self.inv.blobs:
                kind = "revision_not_manifest" if loaded.kind == "blob_unreadable" else loaded.kind
                finding = make_finding(kind, layout.blob_data(node.digest),
                                       f"manifest {node.digest}: {loaded.message}",
                                       repo=report.repo, digest=node.digest)
                found.setdefault((finding.kind, finding.path, finding.digest), finding)
        if check_data:
            for outcome in verify_blobs(self.storage, [b for b in present if b.size],
                                        jobs=jobs, stop=stop):
                if outcome.ok:
                    continue
                blob = outcome.blob
                if outcome.actual is None:
                    finding = make_finding("blob_unreadable", blob.path, outcome.error or "",
                                           digest=blob.digest)
                else:
                    finding = make_finding("blob_digest_mismatch", blob.path,
                                           f"data hashes to {outcome.actual}, not to its name",
                                           digest=blob.digest)
                found[(finding.kind, finding.path, finding.digest)] = finding
        order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
        return sorted(found.values(), key=lambda f: (order[f.severity], f.kind, f.path))


@_damage_is_findings
def read_manifest_bytes(store: ManifestStore, digest: str) -> bytes:
    """The manifest exactly as stored (what `skopeo inspect --raw` prints for non-schema1)."""
    if digest not in store.inventory.blobs:
        raise StorageError(None, f"manifest blob {digest} is missing", layout.blob_data(digest))
    return store.raw(digest)


@_damage_is_findings
def read_config_bytes(inventory: Inventory, store: ManifestStore, digest: str) -> bytes:
    """The config blob of an image manifest, exactly as stored."""
    manifest = store.get(digest)
    if manifest is None or manifest.config is None:
        raise ValueError(f"{digest} is not an image manifest with a config"
                         + (" (it is an index: pick a platform)" if manifest and manifest.kind.is_index
                            else ""))
    blob = inventory.blobs.get(manifest.config.digest)
    if blob is None:
        raise StorageError(None, f"config blob {manifest.config.digest} is missing",
                           layout.blob_data(manifest.config.digest))
    return store.storage.read_small(blob.path, MAX_CONFIG_BYTES)


@_damage_is_findings
def pick_platform(store: ManifestStore, digest: str, platform: str) -> str:
    """The child of index `digest` for `os/arch[/variant]` (the manifest itself if not an index)."""
    manifest = store.get(digest)
    if manifest is None or not manifest.kind.is_index:
        return digest
    wanted = platform.strip("/")
    matches = [c.digest for c in manifest.children if c.platform == wanted]
    if not matches:
        matches = [c.digest for c in manifest.children
                   if c.platform and c.platform.split("/")[:2] == wanted.split("/")[:2]]
    if not matches:
        known = ", ".join(sorted({c.platform or "?" for c in manifest.children}))
        raise RefError(f"index {digest} has no {wanted} manifest (platforms: {known})")
    return matches[0]

