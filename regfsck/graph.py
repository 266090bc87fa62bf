"""The reference graph: which blobs each manifest needs, loaded once and walked safely.

Used by everything that asks "what does this image need?": scan's disk-use figures,
verify's reference checks, gc's mark phase, export, inspect and why. The walk itself is
the reachability oracle in `reach.py` (`ManifestStore.reach`: one per store), which
resolves alias digests (sha512/sha384), follows `urls` descriptors whose blob is stored,
index children and referrers. Walks are iterative and cycle-safe, so a manifest that lists
itself cannot make them loop.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

from regfsck.digest import HEX_LENGTHS
from regfsck.inventory import UNSTATED, Blob, Inventory
from regfsck.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    PackedManifest,
    packed_references,
    packed_subject,
    parse_packed,
    unpack_manifest,
)
from regfsck.reach import ReachGraph
from regfsck.scanner import settle_blobs
from regfsck.storage import Storage, StorageError


@dataclass(frozen=True, slots=True)
class Unloadable:
    """Why a manifest digest could not be used (missing blob, bad JSON, I/O error)."""

    kind: str
    message: str


# Parsed manifests the store keeps unpacked (the most recently used): a command walks an
# image's manifests together, several times (checks, the mark), so these are what it asks
# for again; the rest stay packed (memory).
_RECENT = 512


class ManifestStore:
    """Loads and parses manifest blobs on demand, each digest at most once.

    A parsed manifest is kept packed (`manifest.pack_manifest`: ~21 bytes a reference
    instead of ~150 as objects), and unpacked again when asked for: a tree's manifests,
    all of which the mark walks, are a large part of a command's memory (issue 15)."""

    def __init__(self, storage: Storage, inventory: Inventory, *, keep_raw: bool = False,
                 keep_intact: bool = False) -> None:
        self.storage = storage
        self.inventory = inventory
        self._cache: dict[str, PackedManifest | Manifest | Unloadable] = {}
        self._recent: dict[str, Manifest] = {}  # unpacked, least recently used first
        self._reach: ReachGraph | None = None
        # `keep_raw`: the bytes of each manifest read are kept, for a command that writes
        # them out after parsing (export) or reads them again (inspect): on object storage
        # a second read is a second GET. Off for scans of a whole tree (memory).
        self._raw: dict[str, bytes] | None = {} if keep_raw else None
        # `keep_intact`: what a command that hashes every blob afterwards (verify) keeps of
        # the bytes instead: only whether they were the blob, hashed as they were read (a
        # digest per manifest, not its bytes, for a tree of any size). See `intact`.
        self._intact: set[str] | None = set() if keep_intact else None

    @property
    def reach(self) -> ReachGraph:
        """The reachability oracle over this store's inventory (built once)."""
        if self._reach is None:
            # A weak reference back: `del store` must free the parsed manifests at once
            # (verify drops them before hashing), not at the next cycle collection.
            self._reach = ReachGraph(self.inventory, cast("ManifestStore", weakref.proxy(self)))
        return self._reach

    def anomalies_added(self) -> None:
        """The inventory learnt of more damage since the oracle was built (gc's dry run
        looks inside some blob directories after a first mark: `gc.plan_from_inventory`):
        the next `reach` is built again, with the unknown parts that damage makes."""
        self._reach = None

    def load(self, digest: str) -> Manifest | Unloadable:
        cached = self._kept(digest)
        if type(cached) is tuple:
            return self._unpacked(digest, cached)
        return cast("Manifest | Unloadable", cached)

    def _kept(self, digest: str) -> PackedManifest | Manifest | Unloadable:
        """What the store keeps of the manifest (loaded the first time it is asked for)."""
        cached = self._cache.get(digest)
        if cached is None:
            cached = self._cache[digest] = self._load(digest)
        return cached

    def loadable(self, digest: str) -> Unloadable | tuple[str, ...]:
        """Why the manifest cannot be loaded, else its `problems` (a packed one has none),
        without unpacking it: all gc's blocking checks ask of a manifest."""
        cached = self._kept(digest)
        if type(cached) is tuple:
            return ()
        return cached.problems if isinstance(cached, Manifest) else cast("Unloadable", cached)

    def subject(self, digest: str) -> str | None:
        """The digest of the manifest's `subject` (None: none, or not loadable), without
        unpacking it: the mark asks it of every revision."""
        cached = self._kept(digest)
        if type(cached) is tuple:
            return packed_subject(cached)
        if isinstance(cached, Manifest) and cached.subject is not None:
            return cached.subject.digest
        return None

    def _unpacked(self, digest: str, packed: PackedManifest) -> Manifest:
        recent = self._recent
        manifest = recent.pop(digest, None)
        if manifest is None:
            manifest = unpack_manifest(packed)
            if len(recent) >= _RECENT:
                del recent[next(iter(recent))]
        recent[digest] = manifest
        return manifest

    def references(self, digest: str) -> tuple[tuple[str, ...], tuple[str, ...]] | Unloadable:
        """What the manifest names (`Manifest.references()`): (config and layers, index
        children) digests, from the packed form when it is kept packed (no unpacking: the
        mark asks this of every manifest of the tree); or why it cannot be loaded."""
        cached = self._kept(digest)
        if type(cached) is tuple:
            return packed_references(cached)
        if isinstance(cached, Manifest):
            refs = cached.references()
            return (tuple(d.digest for d in refs if d.role != "manifest"),
                    tuple(d.digest for d in refs if d.role == "manifest"))
        return cast("Unloadable", cached)

    def get(self, digest: str) -> Manifest | None:
        found = self.load(digest)
        return found if isinstance(found, Manifest) else None

    def raw(self, digest: str) -> bytes:
        """The manifest's bytes (raises StorageError)."""
        kept = self.kept(digest)
        if kept is not None:
            return kept
        blob = self.inventory.blobs[digest]
        data = self.storage.read_small(blob.path, MAX_MANIFEST_BYTES)
        self._keep(digest, data)
        return data

    def kept(self, digest: str) -> bytes | None:
        """The manifest's bytes as read when it was loaded (a store made with `keep_raw`)."""
        return self._raw.get(digest) if self._raw is not None else None

    def intact(self) -> set[str]:
        """The manifests whose bytes, as read from storage by this store (a store made with
        `keep_intact`), had the blob's listed size and hashed to its digest: the same
        verdict the hashing pass would reach by reading them again, which on object storage
        is a second GET each. A manifest whose bytes were not the blob is not in it (the
        hashing pass reads it again and reports what it finds); nor is one the scan's
        workers parsed (their bytes are not here to hash)."""
        return self._intact if self._intact is not None else set()

    def _keep(self, digest: str, data: bytes) -> None:
        """Every manifest read from storage passes through here, as its bytes were read."""
        if self._raw is not None:
            self._raw[digest] = data
        if self._intact is not None:
            blob = self.inventory.blobs.get(digest)
            algorithm = digest.partition(":")[0]
            if blob is not None and len(data) == blob.size and algorithm in HEX_LENGTHS and \
                    f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}" == blob.digest:
                self._intact.add(blob.digest)

    def _load(self, digest: str) -> PackedManifest | Manifest | Unloadable:
        blob = self.inventory.blobs.get(digest)
        if blob is not None and blob.size == UNSTATED:  # listed only (gc's dry run)
            settle_blobs(self.storage, self.inventory, [digest])
            blob = self.inventory.blobs.get(digest)
        if blob is None:
            return Unloadable("revision_blob_missing", "manifest blob does not exist")
        if blob.size > MAX_MANIFEST_BYTES:
            return Unloadable("manifest_too_large",
                              f"manifest blob is {blob.size} bytes, over the registry's "
                              f"{MAX_MANIFEST_BYTES}-byte limit")
        early = self.inventory.manifests.pop(digest, None)  # read by the walk's workers
        if early is not None and not self.inventory.manifests:
            self.inventory.manifests = {}  # a dict keeps its size when emptied (memory)
        if early is not None and early[0] == blob.size:
            return cast("PackedManifest | Manifest | Unloadable", early[1])
        try:
            raw = self._read(blob)
        except StorageError as exc:
            return Unloadable("blob_unreadable", exc.message)
        self._keep(digest, raw)
        return self._parse(raw)

    @staticmethod
    def _parse(raw: bytes) -> PackedManifest | Manifest | Unloadable:
        """What the store keeps of a manifest's bytes: the manifest packed (or, when it
        cannot be, parsed), or why it cannot be used."""
        try:
            return parse_packed(raw)
        except ManifestError as exc:
            return Unloadable(exc.kind, str(exc))

    def _read(self, blob: Blob) -> bytes:
        """The blob's bytes: one lookup in its (walked) directory, sized by the scan; the
        careful component-by-component read if the file changed size since."""
        directory, _, name = blob.path.rpartition("/")
        raw = self.storage.read_small_many(directory, [name], blob.size)[0]
        if isinstance(raw, bytes) and len(raw) == blob.size:
            return raw
        return self.storage.read_small(blob.path, MAX_MANIFEST_BYTES)

    def preload(self, digests: Iterable[str], threads: int | None = None, chunk: int = 512) -> None:
        """Load many manifests, reading up to `threads` (default: the storage's io_threads)
        at a time: slow storage answers many outstanding reads sooner than one after
        another. Parsing stays in the calling thread."""
        threads = self.storage.io_threads if threads is None else threads
        todo = [d for d in dict.fromkeys(digests) if d not in self._cache]
        settle_blobs(self.storage, self.inventory, todo)  # sized before read (Depth.LIST)
        if threads <= 1 or len(todo) < 2:
            for digest in todo:
                self.load(digest)
            return

        def read(digest: str) -> bytes | StorageError | None:
            blob = self.inventory.blobs.get(digest)
            if blob is None or blob.size > MAX_MANIFEST_BYTES:
                return None  # load() says why
            try:
                return self._read(blob)
            except StorageError as exc:
                return exc

        with ThreadPoolExecutor(threads, thread_name_prefix="regfsck-manifests") as pool:
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                for digest, raw in zip(part, pool.map(read, part), strict=True):
                    if raw is None:
                        self.load(digest)
                    elif isinstance(raw, StorageError):
                        self._cache[digest] = Unloadable("blob_unreadable", raw.message)
                    else:
                        self._keep(digest, raw)
                        self._cache[digest] = self._parse(raw)

    def preload_tree(self, roots: Iterable[str]) -> set[str]:
        """Load the manifests `roots` reach down their indexes, level by level, each level
        with concurrent reads (`preload`); returns the digests reached. On object storage
        an image's tree then costs one round of latency per index level, not one per
        manifest, when a command walks it one manifest at a time."""
        level = set(roots)
        seen: set[str] = set()
        while level:
            seen |= level
            self.preload(level)
            following: set[str] = set()
            for digest in level:
                manifest = self.get(digest)
                if manifest is not None:
                    following.update(child.digest for child in manifest.children)
            level = following - seen
        return seen

    def loaded(self) -> dict[str, Manifest | Unloadable]:
        """Every manifest loaded so far (unpacked: a new dict)."""
        return {digest: self.load(digest) for digest in self._cache}


def walk(store: ManifestStore, roots: Iterable[str]) -> Iterator[tuple[str, str, str | None]]:
    """Yield (digest, role, parent) for every blob reachable from the manifest `roots`
    (`ReachGraph.walk`: the one oracle)."""
    return store.reach.walk(roots)


def reachable(store: ManifestStore, roots: Iterable[str]) -> set[str]:
    """Every blob digest reachable from `roots` (the roots included; `ReachGraph.reachable`)."""
    return store.reach.reachable(roots)


def find_cycle(store: ManifestStore, start: str, done: set[str] | None = None) -> list[str] | None:
    """Return a chain of index digests leading back to one already on the path, if any.

    `done` collects digests proven cycle-free; pass the same set to every call over one
    store, or a chain of n nested indexes costs n^2 steps (minutes on a hostile tree)."""
    path: list[str] = []
    on_path: set[str] = set()
    done = set() if done is None else done
    stack: list[tuple[str, bool]] = [(start, False)]
    while stack:
        digest, leaving = stack.pop()
        if leaving:
            path.pop()
            on_path.discard(digest)
            done.add(digest)
            continue
        if digest in on_path:
            return [*path, digest]
        if digest in done:
            continue
        manifest = store.get(digest)
        if manifest is None or not manifest.children:
            done.add(digest)
            continue
        path.append(digest)
        on_path.add(digest)
        stack.append((digest, True))
        stack.extend((child.digest, False) for child in manifest.children)
    return None


def tag_users(inventory: Inventory, store: ManifestStore, wanted: Iterable[str]) -> dict[str, set[str]]:
    """For each digest of `wanted`, every `repo:tag` whose image needs it (through index
    children too), in every repository: the answer a finding about a blob gives to "what
    breaks?" and the list of images to push again. Each tag's image is walked once (tags
    sharing a target share the walk)."""
    targets = set(wanted)
    users: dict[str, set[str]] = {digest: set() for digest in targets}
    if not targets:
        return users
    hits_of: dict[str, set[str]] = {}
    for name, repo in inventory.repositories.items():
        for tag, target in repo.tag_targets().items():
            hits = hits_of.get(target)
            if hits is None:
                hits = {digest for digest, _, _ in walk(store, [target]) if digest in targets}
                hits_of[target] = hits
            for digest in hits:
                users[digest].add(f"{name}:{tag}")
    return users
