"""The one reachability oracle: what a manifest needs, what is kept, what is still in use.

Every question of the form "does something need this blob?" is answered here, over one
graph, so gc's mark, verify's reference checks, export's closure, `why`, and the undo /
recover / rm / repair "is this still used" checks cannot disagree:

* **Every digest algorithm the registry accepts.** An upload with `digest=sha512:...` (or
  sha384) is stored under its canonical sha256 (`blobs/sha256/...`) and made readable by a
  `_layers/sha512/<hex>/link` *alias* whose content is that sha256 (a second link,
  `_layers/sha256/<hex>/link`, holds the same). A descriptor naming `sha512:...` is satisfied
  by the blob its alias link names (`ReachGraph.resolve`). Both official collectors mark the
  sha512 digest and then delete the sha256 data; regfsck keeps it.
* **`urls`.** A descriptor's blob is followed and kept whenever it is in the store, whatever
  its `urls`. Only a *missing* blob of a foreign-marked descriptor (`Descriptor.is_foreign`:
  `urls` on a non-distributable / OCI layer, which the registry never checks) is not an
  error (`Edge.optional`).
* **Index children** are followed recursively (a child of a kept index is kept, tagged or
  not), **referrers** (a manifest with a `subject`, or one cosign's tags name a subject
  for: `sha256-<hex>.sig/.att/.sbom`, the `sha256-<hex>` referrers index) are kept when
  their subject is kept in the same repository, to a fixpoint; those whose subject is gone
  are reported (`OrphanReferrer`).
* **Unknown = keep.** When part of `repositories/` could not be read or judged (a symbolic
  link the scan does not follow, an unreadable directory or link, an unreadable manifest),
  what it references is unknown, so every stored blob counts as referenced
  (`ReachGraph.unknown`). `gc --force` therefore never sweeps a blob such a part may need.

Functions for other commands (all read-only):

* `blobs_in_use(inventory, store, ignore_links=...)`: the blob digests something uses *now*:
  referenced from any revision of any repository (through the graph above) or made readable
  by any `_layers` link not in `ignore_links` (an upload in flight or a cross-repository
  mount links blobs before a manifest names them). This is the "may this created / restored
  blob go?" question of undo and recover: a blob in this set stays.
* `is_blob_in_use(...)`: the same for one digest.
* `layer_link_in_use(inventory, store, repo, path_digest)`: does a manifest of `repo` name
  the blob this `_layers` link makes readable?
* `mark(inventory, store, delete_untagged)`: gc's mark phase (`Marks`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from regfsck import layout
from regfsck.artifacts import tag_subject
from regfsck.document import Document
from regfsck.findings import kinds_where
from regfsck.inventory import BlobTable, Inventory, Repository
from regfsck.manifest import Descriptor, Manifest

if TYPE_CHECKING:  # graph.py hands out one ReachGraph per store (`ManifestStore.reach`)
    from regfsck.graph import ManifestStore

_NO_SUBJECTS: dict[str, str] = {}  # shared by the repositories without cosign tags (memory)

# Anomalies after which part of a repository's content is unknown to the scan.
UNKNOWN_KINDS = kinds_where(lambda info: info.unknown)


@dataclass(frozen=True, slots=True)
class Edge:
    """One reference from a manifest to a blob, resolved against the store."""

    parent: str  # the referring manifest's digest
    descriptor: Descriptor
    blob: str | None  # the stored blob satisfying it (its digest, or the canonical digest
    #                    an alias link names); None when the store has no such blob

    @property
    def digest(self) -> str:
        """The digest the manifest names (what a client asks the registry for)."""
        return self.descriptor.digest

    @property
    def role(self) -> str:
        return self.descriptor.role

    @property
    def optional(self) -> bool:
        """Foreign-marked: the registry never checks it exists, so missing is no error."""
        return self.descriptor.is_foreign

    @property
    def node(self) -> str:
        """The digest this edge reaches in the graph: the stored blob when there is one."""
        return self.blob if self.blob is not None else self.descriptor.digest


def _alias_map(inventory: Inventory) -> dict[str, str]:
    """Digest named by a `_layers` link path -> the stored blob its content names, for
    every link whose path differs from its content (sha512/sha384 aliases), in any
    repository. Only links naming an existing blob count."""
    aliases: dict[str, str] = {}
    for repo in inventory.repositories.values():
        for path_digest, link in repo.layers.odd().items():  # a plain link is no alias
            target = link.target
            if target is not None and target != path_digest and target in inventory.blobs:
                aliases.setdefault(path_digest, target)
    return aliases


def unknown_parts(inventory: Inventory) -> list[str]:
    """Paths the scan could not read or would not follow (symlink, unreadable): under
    `repositories/` what they reference is unknown; under `blobs/` which blobs exist is
    unknown (a `_layers` link to a blob not seen may name one there). `ReachGraph` adds
    revision manifests that could not be read."""
    return sorted(a.path for a in inventory.anomalies if a.kind in UNKNOWN_KINDS)


class ReachGraph:
    """The reference graph of one scan, resolved against its store (see the module doc)."""

    def __init__(self, inventory: Inventory, store: ManifestStore) -> None:
        self.inv = inventory
        self.store = store
        self.aliases = _alias_map(inventory)
        self.unknown: list[str] = unknown_parts(inventory)
        self._seen_unreadable: set[str] = set()
        self._tag_subjects: dict[str, dict[str, str]] = {}  # repo -> revision -> cosign subject

    # -- resolution ----------------------------------------------------------------
    def resolve(self, digest: str) -> str | None:
        """The stored blob a descriptor digest names: itself when stored, else the blob an
        alias link (`_layers/<alg>/<hex>/link`, any repository) names; None: not stored."""
        if digest in self.inv.blobs:
            return digest
        return self.aliases.get(digest)

    def edges(self, manifest_digest: str) -> tuple[Edge, ...]:
        """The references of one manifest (config, layers, index children; not `subject`),
        each resolved; () when it cannot be loaded. Not cached: the store caches the
        parsed manifest, and edges are cheap to rebuild (memory stays the store's)."""
        loaded = self.store.load(manifest_digest)
        if not isinstance(loaded, Manifest):
            self._not_loaded(manifest_digest, loaded.kind)
            return ()
        return self.edges_of(manifest_digest, loaded)

    def _not_loaded(self, manifest_digest: str, why: str) -> None:
        """A manifest that cannot be loaded references nothing; one that cannot be *read*
        may be readable to the registry: what it references is unknown."""
        if why == "blob_unreadable" and manifest_digest not in self._seen_unreadable:
            self._seen_unreadable.add(manifest_digest)
            self.unknown.append(layout.blob_data(manifest_digest))

    def edges_of(self, manifest_digest: str, manifest: Manifest) -> tuple[Edge, ...]:
        """The resolved references of a manifest given as parsed (one not in the store yet:
        repair's copy from a backup)."""
        return tuple(Edge(manifest_digest, ref, self.resolve(ref.digest))
                     for ref in manifest.references())

    def subject(self, manifest_digest: str) -> str | None:
        return self.store.subject(manifest_digest)

    def subject_in(self, repo: Repository, manifest_digest: str) -> str | None:
        """What a revision of `repo` is attached to: its `subject` field, else the digest
        cosign's tag convention names for it (a `sha256-<hex>.sig/.att/.sbom` tag, or the
        `sha256-<hex>` referrers index, pointing at it: see artifacts.tag_subject)."""
        subject = self.subject(manifest_digest)
        if subject is not None:
            return subject
        by_tag = self._tag_subjects.get(repo.name)
        if by_tag is None:
            by_tag = {}
            for tag, target in sorted(repo.tag_targets().items()):
                named = tag_subject(tag)
                if named is not None:
                    by_tag.setdefault(target, named[0])
            self._tag_subjects[repo.name] = by_tag or _NO_SUBJECTS
        return by_tag.get(manifest_digest)

    # -- walks -----------------------------------------------------------------------
    def walk(self, roots: Iterable[str]) -> Iterator[tuple[str, str, str | None]]:
        """Yield (digest, role, parent) for every blob reachable from the manifest `roots`.

        `digest` is the stored blob when there is one (an alias resolved to its canonical
        digest), else the digest the manifest names. Roles: "manifest" for the roots and
        index children, "config", "layer", "fslayer". Each digest once; cycles are cut."""
        seen: set[str] = set()
        stack: list[tuple[str, str, str | None]] = [(d, "manifest", None) for d in roots]
        while stack:
            digest, role, parent = stack.pop()
            if digest in seen:
                continue
            seen.add(digest)
            yield digest, role, parent
            if role != "manifest":
                continue
            for edge in self.edges(digest):
                node = edge.node
                if node not in seen:
                    stack.append((node, edge.role, digest))

    def reachable(self, roots: Iterable[str]) -> set[str]:
        """Every digest reachable from `roots` (roots included; for an alias, both the
        digest named and the stored blob)."""
        # `walk`'s traversal over the digests each manifest names (`store.references`:
        # no `Edge` or `Manifest` per manifest; the mark of a big tree is mostly this loop).
        out: set[str] = set()
        seen: set[str] = set()
        stack: list[tuple[str, bool]] = [(d, True) for d in roots]  # (digest, a manifest?)
        references = self.store.references
        stored = self.inv.blobs.digests()
        aliases = self.aliases
        while stack:
            digest, is_manifest = stack.pop()
            if digest in seen:
                continue
            seen.add(digest)
            out.add(digest)
            if not is_manifest:
                continue
            refs = references(digest)
            if not isinstance(refs, tuple):
                self._not_loaded(digest, refs.kind)
                continue
            for named_manifests, group in enumerate(refs):
                for named in group:
                    # `resolve`, inlined: the stored blob, else the blob an alias names.
                    node = named if named in stored else aliases.get(named, named)
                    if node != named:
                        out.add(named)
                    if node not in seen:
                        stack.append((node, named_manifests == 1))
        return out

    def closure(self, repo: Repository, roots: Iterable[str]) -> set[str]:
        """`reachable(roots)` plus, to a fixpoint, the referrers among `repo`'s revisions
        whose subject is reached and is a revision of `repo` (a signature of an SBOM)."""
        roots = set(roots)
        reached = self.reachable(roots)
        while True:
            referrers = {d for d in repo.revisions if d not in reached
                         and (s := self.subject_in(repo, d)) in reached and s in repo.revisions}
            if not referrers:
                return reached
            roots |= referrers
            reached = self.reachable(roots)

    def referenced(self) -> set[str]:
        """Every digest any revision of any repository reaches (referrers included: every
        revision is a root). With unknown parts in the tree, every stored blob too."""
        roots = {d for repo in self.inv.repositories.values() for d in revision_roots(repo)}
        out = self.reachable(roots)
        if self.unknown:
            out |= set(self.inv.blobs)
        return out


def revision_roots(repo: Repository) -> set[str]:
    """Every revision of `repo`, by its path and (if it differs, damage forced through)
    by its content."""
    return set(repo.revisions.named())


# --------------------------------------------------------------------------- gc's mark


@dataclass
class OrphanReferrer(Document):
    """A manifest whose `subject` is not kept in its repository."""

    repo: str
    digest: str
    subject: str
    kept: bool  # kept anyway (tagged, or every revision is a root)


class KeptDigests(Collection[str]):
    """The digests gc's mark keeps (`Marks.blobs`), kept small (memory, issue 15).

    Nearly every stored blob is kept, so a set of them (~40 bytes a blob) was the largest
    table of the plan: this holds the stored blobs the mark did not reach and the digests
    it reached that are not stored blobs (aliases, missing blobs). A blob stored after the
    mark counts as kept (the safe side)."""

    __slots__ = ("_dropped", "_extra", "_stored")

    def __init__(self, stored: BlobTable, dropped: set[str], extra: set[str]) -> None:
        self._stored = stored
        self._dropped = dropped
        self._extra = extra

    def __contains__(self, digest: object) -> bool:
        return digest in self._extra or (digest in self._stored and digest not in self._dropped)

    def not_kept(self, digests: Iterable[str]) -> list[str]:
        """Those of `digests` not kept (in order), without a call per digest: the plan
        asks it of every blob and every layer link of the tree."""
        stored = self._stored.digests()
        dropped = self._dropped
        extra = self._extra
        if digests is self._stored:  # the stored blobs: the ones the mark dropped
            return [d for d in stored if d in dropped]
        return [d for d in digests if d in dropped or (d not in stored and d not in extra)]

    def __iter__(self) -> Iterator[str]:
        yield from (d for d in self._stored if d not in self._dropped)
        yield from self._extra

    def __len__(self) -> int:
        return sum(1 for d in self._stored if d not in self._dropped) + len(self._extra)


class _Marker:
    """Collects the digests a mark reaches: one byte per row of the blob table, a set for
    the rest; `kept()` is the `KeptDigests`."""

    def __init__(self, stored: BlobTable) -> None:
        self.stored = stored
        self.rows = bytearray(stored.row_count())
        self.other: set[str] = set()

    def add(self, digests: Iterable[str]) -> None:
        row_of = self.stored.row_of
        rows = self.rows
        other = self.other
        for digest in digests:
            row = row_of(digest)
            if row is None or row < 0:
                other.add(digest)
            else:
                rows[row] = 1

    def kept(self) -> KeptDigests:
        rows = self.rows
        other = self.other
        dropped = {d for d, row in self.stored.digest_rows()
                   if (not rows[row] if row >= 0 else d not in other)}
        stored = self.stored
        return KeptDigests(stored, dropped, {d for d in other if d not in stored})


@dataclass
class Marks:
    blobs: KeptDigests  # every digest kept, globally (aliases and their stored blobs)
    kept_manifests: dict[str, set[str]]  # repo -> revision digests kept in that repo
    orphan_referrers: list[OrphanReferrer]
    unknown: list[str]  # unjudgeable parts of the tree: every stored blob is kept


def _repo_roots(repo: Repository, delete_untagged: bool, unknown: bool) -> set[str]:
    """Mark roots of one repository. With `delete_untagged`, the tags' targets; a tag
    whose `current` link is missing or unreadable wants one of the digests its history
    (`index/`) names, so all of those are roots (every revision when it has none)."""
    if not delete_untagged or unknown:
        return revision_roots(repo)
    roots = set(repo.tag_targets().values())
    for tag in repo.tags.values():
        if tag.current is None or tag.current.target is None:
            history = set(tag.index) | {link.target for link in tag.index.values()
                                        if link.target is not None}
            roots |= history if history else revision_roots(repo)
    return roots


def repo_has_unknown(unknown: Collection[str], repo: Repository) -> bool:
    """True when a path of `unknown` (`ReachGraph.unknown`) lies inside `repo`."""
    prefix = repo.path + "/"
    return any(p.startswith(prefix) for p in unknown)


def mark(inventory: Inventory, store: ManifestStore, delete_untagged: bool,
         graph: ReachGraph | None = None) -> Marks:
    """gc's mark phase: what every repository keeps, and the global set of kept blobs.

    Roots are every revision, or with `delete_untagged` only the tags' targets (but every
    revision of a repository with an unknown part: which of its manifests a tag wants is
    unknown). With unknown parts anywhere, every stored blob is kept."""
    graph = graph or store.reach
    kept_manifests: dict[str, set[str]] = {}
    orphan_referrers: list[OrphanReferrer] = []
    marker = _Marker(inventory.blobs)
    for name, repo in sorted(inventory.repositories.items()):
        roots = _repo_roots(repo, delete_untagged, repo_has_unknown(graph.unknown, repo))
        reached = graph.closure(repo, roots)
        revisions = repo.revisions
        kept = reached.intersection(revisions.plain()) | {d for d in revisions.odd() if d in reached}
        kept_manifests[name] = kept
        marker.add(reached)
        for digest in sorted(repo.revisions):
            subject = graph.subject_in(repo, digest)
            if subject is not None and subject not in kept:
                orphan_referrers.append(OrphanReferrer(name, digest, subject, digest in kept))
    unknown = _mark_unknown(graph, delete_untagged)
    if unknown:
        marker.add(inventory.blobs)
    return Marks(marker.kept(), kept_manifests, orphan_referrers, sorted(set(unknown)))


def _mark_unknown(graph: ReachGraph, delete_untagged: bool) -> list[str]:
    """The unknown parts that count for this mark: without `delete_untagged` every
    revision is a root, so what a tag's history holds decides nothing (gc does not read
    it then; a full scan that did must mark the same)."""
    if delete_untagged or not graph.unknown:
        return graph.unknown
    return [path for path in graph.unknown if not layout.in_tag_history(path)]


# --------------------------------------------------------------------------- in use now


def blobs_in_use(inventory: Inventory, store: ManifestStore, *,
                 ignore_links: Collection[str] = (),
                 graph: ReachGraph | None = None) -> set[str]:
    """The blob digests something uses now (see the module doc): referenced from any
    revision of any repository, or the target of any `_layers` link whose path (relative
    to `v2`, e.g. `layout.layer_link(repo, digest)`) is not in `ignore_links`. With unknown
    parts in the tree, every stored blob. The answer to "may this blob go?" for undo,
    recover, rm and repair: never remove a blob in this set."""
    graph = graph or store.reach
    used = graph.referenced()
    ignored = set(ignore_links)
    for repo in inventory.repositories.values():
        for link in repo.layers.values():
            if link.target is not None and link.path not in ignored:
                used.add(link.target)
    return used


def is_blob_in_use(inventory: Inventory, store: ManifestStore, digest: str, *,
                   ignore_links: Collection[str] = ()) -> bool:
    """True when `digest` (any algorithm; an alias counts as its stored blob) is in
    `blobs_in_use`."""
    graph = store.reach
    used = blobs_in_use(inventory, store, ignore_links=ignore_links, graph=graph)
    return digest in used or graph.resolve(digest) in used


def layer_link_in_use(inventory: Inventory, store: ManifestStore, repo: str,
                      path_digest: str, graph: ReachGraph | None = None) -> bool:
    """True when a revision of `repo` reaches the digest this `_layers` link is named by,
    or the blob it makes readable (a pull through `repo` needs the link). Unknown parts
    inside the repository count as a use."""
    repository = inventory.repositories.get(repo)
    if repository is None:
        return False
    graph = graph or store.reach
    if repo_has_unknown(graph.unknown, repository):
        return True
    reached = graph.closure(repository, revision_roots(repository))
    link = repository.layers.get(path_digest)
    return path_digest in reached or (link is not None and link.target in reached)
