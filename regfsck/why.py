"""Why a blob exists: who reaches it, whether gc keeps it, what deleting a tag would free.

Everything here is read-only. The reverse graph is built once from every manifest that
some repository holds a (valid) revision of; answers are derived from it:

* paths: every repository revision whose manifest tree reaches the blob, with the chain
  of manifests (through indexes) and the tags pointing at that revision;
* gc verdicts: regfsck gc's two modes (its own mark phase, `gc.mark`: from every revision,
  or only from tags with `--delete-untagged`) and, for comparison, what the official 2.8
  collector would do;
* freed bytes: for each tag, the bytes `rm repo:tag` followed by gc would actually give
  back (only blobs no other root reaches), found by labelling every digest with the one
  root reaching it (or "shared") in a single pass over the graph: one reach per root
  would be quadratic on chains of nested index revisions, where each root reaches all
  the ones below it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from regfsck import layout
from regfsck.artifacts import IMAGE, INDEX, classify
from regfsck.checks import valid_revisions
from regfsck.digest import EMPTY_SHA256
from regfsck.document import SparseDocument
from regfsck.durations import format_duration
from regfsck.gc import DEFAULT_GRACE
from regfsck.graph import ManifestStore, Unloadable
from regfsck.inventory import Inventory
from regfsck.layout import V2_PREFIX
from regfsck.manifest import Manifest
from regfsck.reach import Marks, mark

# A root of the mark: (repository, manifest digest).
Root = tuple[str, str]
SHARED = ""  # the label of a digest that more than one root digest reaches


class ReferenceGraph:
    """Forward and reverse reference edges of every manifest the repositories hold.

    Nodes are digests; an edge parent -> child carries the role of the child (config,
    layer, fslayer, manifest). Referrers (a manifest with a `subject`) are kept apart:
    gc keeps them through their subject, not through a reference.
    """

    def __init__(self, inventory: Inventory, store: ManifestStore) -> None:
        self.inv = inventory
        self.store = store
        self.revisions: dict[str, set[str]] = {}  # repo -> valid revision digests
        self.holders: dict[str, set[str]] = {}  # manifest digest -> repos holding a revision
        self.children: dict[str, list[tuple[str, str]]] = {}  # manifest -> [(child, role)]
        self.parents: dict[str, set[tuple[str, str]]] = {}  # digest -> {(manifest, role)}
        self.subject_of: dict[str, str] = {}  # referrer manifest -> its subject digest
        self.unloadable: dict[str, Unloadable] = {}
        self._tags: dict[str, dict[str, list[str]]] = {}  # repo -> target digest -> tags
        for name, repo in inventory.repositories.items():
            revs = valid_revisions(repo)
            self.revisions[name] = revs
            for digest in revs:
                self.holders.setdefault(digest, set()).add(name)
        pending = deque(sorted(self.holders))
        while pending:
            digest = pending.popleft()
            if digest in self.children or digest in self.unloadable:
                continue
            loaded = store.load(digest)
            if isinstance(loaded, Unloadable):
                self.unloadable[digest] = loaded
                self.children[digest] = []
                continue
            self._add_manifest(digest, loaded, pending)

    def _add_manifest(self, digest: str, manifest: Manifest, pending: deque[str]) -> None:
        edges: list[tuple[str, str]] = []
        for edge in self.store.reach.edges(digest):  # the one oracle's edges: aliases
            node = edge.node                           # resolved, stored `urls` layers kept
            edges.append((node, edge.role))
            self.parents.setdefault(node, set()).add((digest, edge.role))
            if edge.role == "manifest" and node not in self.children:
                pending.append(node)
        self.children[digest] = edges
        if manifest.subject is not None:
            self.subject_of[digest] = manifest.subject.digest

    # -- reach -------------------------------------------------------------------
    def reach(self, digests: Iterable[str]) -> set[str]:
        """Every digest reachable from `digests` through references (they included):
        the oracle's walk (`ReachGraph.reachable`)."""
        return self.store.reach.reachable(digests)

    def referrers_in(self, repo: str) -> dict[str, list[str]]:
        """subject digest -> referrer revisions of `repo` attached to it."""
        out: dict[str, list[str]] = {}
        for digest in self.revisions.get(repo, ()):
            subject = self.subject_of.get(digest)
            if subject is not None:
                out.setdefault(subject, []).append(digest)
        return out

    def tags_of(self, repo: str, digest: str) -> list[str]:
        by_target = self._tags.get(repo)
        if by_target is None:  # once per repository: asked once per path, and paths are many
            by_target = self._tags[repo] = {}
            for tag, target in sorted(self.inv.repositories[repo].tag_targets().items()):
                by_target.setdefault(target, []).append(tag)
        return list(by_target.get(digest, ()))

    def tag_roots(self) -> list[Root]:
        """(repo, digest) of every tag's current link that names a valid revision."""
        roots: set[Root] = set()
        for name, repo in self.inv.repositories.items():
            revs = self.revisions[name]
            roots.update((name, d) for d in repo.tag_targets().values() if d in revs)
        return sorted(roots)

    def revision_roots(self) -> list[Root]:
        """(repo, digest) of every valid revision whose manifest blob exists."""
        return sorted((name, d) for name, revs in self.revisions.items() for d in revs
                      if d in self.inv.blobs)

    def sole_roots(self, roots: Iterable[Root], with_referrers: bool) -> dict[str, str]:
        """Every stored digest some root reaches -> the one root digest reaching it, or SHARED.

        The same answer as counting, over the oracle's reach of each root (`reachable`, or
        `closure` with referrers), how many distinct root digests reach each digest (a
        digest that is a root in two repositories counts once), but in time linear in the
        graph: it walks the oracle's edges and referrer rule once, labelling states, and a
        state is walked again only when its label changes, at most twice (unset -> one root
        -> SHARED). With referrers the rule depends on the root's repository (a reached
        revision of it brings in its referrers), so the state is (repository, digest)."""
        oracle = self.store.reach
        labels: dict[tuple[str, str], str] = {}
        by_subject: dict[str, dict[str, list[str]]] = {}
        stack = [(repo, digest, digest, True) for repo, digest in roots]
        while stack:
            repo, node, label, is_manifest = stack.pop()
            key = (repo if with_referrers else "", node)
            old = labels.get(key)
            if old in (label, SHARED):
                continue
            new = label if old is None else SHARED
            labels[key] = new
            if is_manifest:
                stack.extend((repo, edge.node, new, edge.role == "manifest")
                             for edge in oracle.edges(node))
            if with_referrers:
                revisions = self.inv.repositories[repo].revisions
                if node in revisions:
                    subjects = by_subject.get(repo)
                    if subjects is None:
                        subjects = by_subject[repo] = {}
                        repository = self.inv.repositories[repo]
                        for revision in revisions:  # the oracle's rule: field or cosign tag
                            subject = oracle.subject_in(repository, revision)
                            if subject is not None:
                                subjects.setdefault(subject, []).append(revision)
                    stack.extend((repo, r, new, True) for r in subjects.get(node, ()))
        sole: dict[str, str] = {}
        for (_, node), label in labels.items():
            seen = sole.get(node)
            sole[node] = label if seen is None or seen == label else SHARED
        return sole


# -- the answer -------------------------------------------------------------------------


@dataclass
class ReferencePath:
    """One repository revision whose manifest tree reaches the blob, with its chain of
    manifests down to the blob told once: a chain stops where it meets another revision
    that reaches the blob (`via`), whose own path goes on. Every path spelled out whole
    would be quadratic: on N nested index revisions each level's chain holds all the
    levels below it (N(N+1)/2 digests, 666 MB of JSON at 4,000 levels)."""

    repo: str
    manifest: str  # the revision (root of this path)
    chain: list[str]  # manifests from the revision down to `via`, or to the blob's parent
    role: str  # how the blob is referred to at the end of the whole chain ("self": the root)
    tags: list[str]  # tags of `repo` whose current link is `manifest`
    via: str | None = None  # a revision listed among the paths: the chain goes on as its own
    length: int = 0  # manifests in the whole chain, down to the blob's parent

    def to_json(self) -> dict[str, Any]:
        return {"repo": self.repo, "manifest": self.manifest, "chain": self.chain,
                "via": self.via, "length": self.length, "role": self.role,
                "tags": self.tags, "tagged": bool(self.tags)}


def full_chain(path: ReferencePath, paths: Iterable[ReferencePath]) -> list[str]:
    """The whole chain of `path`, down to the blob's direct parent: its own chain, then
    each `via`'s, in turn (for one path; spelling out every path is quadratic)."""
    by_manifest = {p.manifest: p for p in paths}
    chain = list(path.chain)
    via = path.via
    while via is not None:
        below = by_manifest[via]
        chain.extend(below.chain)
        via = below.via
    return chain


@dataclass
class LayerLinkInfo(SparseDocument):
    repo: str
    path: str  # relative to ROOT
    content: str | None  # the digest it holds; None when invalid
    error: str | None = None


@dataclass
class GcVerdict:
    """Would a collector keep the blob? `reason` says by which root or why not."""

    mode: str
    keep: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "keep": self.keep, "reason": self.reason}


@dataclass
class FreedBytes:
    """What deleting one reference and then running gc would give back."""

    action: str  # "rm repo:tag" or "rm repo@digest"
    gc_mode: str
    blobs: int
    bytes: int
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"action": self.action, "gc_mode": self.gc_mode,
                                "blobs": self.blobs, "bytes": self.bytes}
        if self.note:
            data["note"] = self.note
        return data


@dataclass
class WhyReport:
    digest: str
    exists: bool
    size: int | None
    path: str  # blob data path relative to ROOT
    misplaced_at: str | None = None  # stored under a wrong fan-out directory
    stored_as: str | None = None  # an alias digest (sha512): the canonical blob it names
    roles: list[str] = field(default_factory=list)
    revision_of: list[str] = field(default_factory=list)  # repos holding it as a manifest
    paths: list[ReferencePath] = field(default_factory=list)
    direct_parents: list[dict[str, str]] = field(default_factory=list)
    layer_links: list[LayerLinkInfo] = field(default_factory=list)
    gc: list[GcVerdict] = field(default_factory=list)
    freed: list[FreedBytes] = field(default_factory=list)
    expected_size: int | None = None  # the largest size a referencing descriptor gives
    damage: str | None = None  # "truncated", "longer than its descriptors", "empty"

    @property
    def referenced(self) -> bool:
        return bool(self.paths or self.direct_parents or self.revision_of)

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "exists": self.exists,
            "size": self.size,
            "path": self.path,
            "misplaced_at": self.misplaced_at,
            "stored_as": self.stored_as,
            "expected_size": self.expected_size,
            "damage": self.damage,
            "roles": self.roles,
            "revision_of": self.revision_of,
            "paths": [p.to_json() for p in self.paths],
            "direct_parents": self.direct_parents,
            "layer_links": [link.to_json() for link in self.layer_links],
            "gc": [v.to_json() for v in self.gc],
            "freed": [f.to_json() for f in self.freed],
        }


def _root_path(path: str) -> str:
    return f"{V2_PREFIX}/{path}"


def paths_to(graph: ReferenceGraph, digest: str) -> list[ReferencePath]:
    """Every (repo, revision) reaching `digest`, each with one shortest chain down to it
    (told up to the next revision on the way: see ReferencePath), in time and size
    linear in the graph."""
    # BFS upwards; `below[m]` = (next manifest towards the blob, role of that hop). The
    # hops form a tree, and whole chains follow it: shortest, and shared below a meeting.
    below: dict[str, tuple[str | None, str]] = {digest: (None, "self")}
    queue = deque([digest])
    while queue:
        current = queue.popleft()
        for parent, role in sorted(graph.parents.get(current, ())):
            if parent not in below:
                below[parent] = (current, role)
                queue.append(parent)
    # In BFS order each manifest's next hop was met before it: one pass gives every
    # whole chain's length and the role at its end.
    length: dict[str, int] = {digest: 0}
    end_role: dict[str, str] = {digest: "self"}
    for upper, (nxt, role) in below.items():
        if nxt is not None:
            length[upper] = length[nxt] + 1
            end_role[upper] = role if nxt == digest else end_role[nxt]
    paths: list[ReferencePath] = []
    for manifest in below:
        repos = sorted(graph.holders.get(manifest, ()))
        if not repos:
            continue
        chain: list[str] = []
        via: str | None = None
        node: str | None = manifest
        while node is not None and node != digest:
            if node != manifest and node in graph.holders:
                via = node  # a revision: listed among the paths, its chain goes on
                break
            chain.append(node)
            node = below[node][0]
        for repo in repos:
            paths.append(ReferencePath(repo, manifest, chain, end_role[manifest],
                                       graph.tags_of(repo, manifest), via, length[manifest]))
    paths.sort(key=lambda p: (not p.tags, p.repo, p.length, p.manifest))
    return paths


def _layer_links(inv: Inventory, digest: str) -> list[LayerLinkInfo]:
    found: list[LayerLinkInfo] = []
    for name, repo in sorted(inv.repositories.items()):
        for path_digest, link in sorted(repo.layers.items()):
            if path_digest == digest or link.target == digest:
                found.append(LayerLinkInfo(name, _root_path(link.path), link.target, link.error))
    return found


def _exclusive(graph: ReferenceGraph, sole: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Root digest -> blobs (count, bytes) that it alone reaches."""
    out: dict[str, tuple[int, int]] = {}
    blobs = graph.inv.blobs
    for digest, root in sole.items():
        blob = blobs.get(digest)
        if root != SHARED and blob is not None:
            count, size = out.get(root, (0, 0))
            out[root] = (count + 1, size + blob.size)
    return out


def _what(graph: ReferenceGraph, repo: str, manifest: str) -> str:
    """` (signature of sha256:...)`, ` (artifact application/...)`: what a manifest is, for
    anything but a plain image or index (see artifacts.classify)."""
    loaded = graph.store.get(manifest)
    if loaded is None:
        return ""
    found = classify(loaded, graph.tags_of(repo, manifest))
    if found.kind in (IMAGE, INDEX):
        return ""
    what = found.kind + (f" {found.artifact_type}" if found.artifact_type else "")
    return f" ({what}{f' of {found.subject}' if found.subject else ''})"


def _kept_referrer(graph: ReferenceGraph, paths: list[ReferencePath], kept: Marks) -> str:
    """Name the referrer that keeps the blob and the tag that keeps its subject."""
    for path in paths:
        repository = graph.inv.repositories[path.repo]
        subject = graph.store.reach.subject_in(repository, path.manifest)
        seen: set[str] = set()
        while subject is not None and subject not in seen:
            seen.add(subject)
            tags = graph.tags_of(path.repo, subject) if subject in graph.revisions.get(
                path.repo, set()) else []
            if tags and path.manifest in kept.kept_manifests.get(path.repo, set()):
                return (f"referrer {path.repo}@{path.manifest}"
                        f"{_what(graph, path.repo, path.manifest)}, kept because tag "
                        f"{path.repo}:{tags[0]} keeps its subject")
            subject = graph.store.reach.subject_in(repository, subject)
    return "a referrer whose subject a tag keeps"


def _gc_verdicts(graph: ReferenceGraph, digest: str, paths: list[ReferencePath],
                 marks: dict[bool, Marks]) -> list[GcVerdict]:
    """regfsck gc's verdict in both modes (its own mark phase), then the official 2.8 one."""
    inv = graph.inv
    verdicts: list[GcVerdict] = []
    grace = f"; swept unless younger than gc's --grace ({format_duration(DEFAULT_GRACE)})"
    if digest in marks[False].blobs:
        via = next((f"revision {p.repo}@{p.manifest}" for p in paths), "a revision link")
        verdicts.append(GcVerdict("gc", True, f"reached from {via}"))
    else:
        verdicts.append(GcVerdict("gc", False, "no revision of any repository reaches it" + grace))
    if digest in marks[True].blobs:
        tagged = next((p for p in paths if p.tags), None)
        via = (f"tag {tagged.repo}:{tagged.tags[0]}{_what(graph, tagged.repo, tagged.manifest)}"
               if tagged else _kept_referrer(graph, paths, marks[True]))
        verdicts.append(GcVerdict("gc --delete-untagged", True, f"reached from {via}"))
    else:
        verdicts.append(GcVerdict("gc --delete-untagged", False, "no tag reaches it" + grace))
    # The official 2.8 collector (by code reading): repositories need `_layers`; a marked
    # manifest marks its direct references only (no recursion into index children).
    for untagged_too, mode in ((True, "registry garbage-collect (2.8)"),
                               (False, "registry garbage-collect --delete-untagged (2.8)")):
        marked_by: str | None = None
        for name, repo in sorted(inv.repositories.items()):
            if not repo.has_layers:
                continue
            tagged_revs = set(repo.tag_targets().values())
            for rev in sorted(graph.revisions[name]):
                if rev not in inv.blobs or (not untagged_too and rev not in tagged_revs):
                    continue
                if rev == digest or any(c == digest for c, _ in graph.children.get(rev, ())):
                    marked_by = f"{name}@{rev}"
                    break
            if marked_by:
                break
        verdicts.append(GcVerdict(mode, marked_by is not None,
                                  f"marked by {marked_by}" if marked_by else
                                  "not marked (no direct reference from a kept manifest)"))
    return verdicts


def _freed(graph: ReferenceGraph, paths: list[ReferencePath],
           tag_roots: list[Root]) -> list[FreedBytes]:
    """Bytes each referencing tag / revision deletion would give back after gc.

    A tag removal is measured against `gc --delete-untagged` only: under the default gc the
    revision stays and keeps everything, so it frees nothing by construction. A root's
    exclusive blobs are those only its digest reaches; that is what it alone holds, since
    a root whose digest is also a root in another repository is answered with a note."""
    tag_alone = _exclusive(graph, graph.sole_roots(tag_roots, with_referrers=True))
    rev_roots = graph.revision_roots()
    rev_alone = _exclusive(graph, graph.sole_roots(rev_roots, with_referrers=False))
    tag_repos: dict[str, set[str]] = {}  # root digest -> repositories where it is a root
    for repo, digest in tag_roots:
        tag_repos.setdefault(digest, set()).add(repo)
    rev_repos: dict[str, set[str]] = {}
    for repo, digest in rev_roots:
        rev_repos.setdefault(digest, set()).add(repo)
    out: list[FreedBytes] = []
    seen_tags: set[tuple[str, str]] = set()
    for path in paths:
        for tag in path.tags:
            if (path.repo, tag) in seen_tags:
                continue
            seen_tags.add((path.repo, tag))
            action = f"rm {path.repo}:{tag}"
            others = [t for t in graph.tags_of(path.repo, path.manifest) if t != tag]
            if others:
                out.append(FreedBytes(action, "gc --delete-untagged", 0, 0,
                                      f"still tagged {', '.join(others)}"))
                continue
            repos = tag_repos.get(path.manifest, set())
            elsewhere = sorted(repos - {path.repo})
            if elsewhere:
                out.append(FreedBytes(action, "gc --delete-untagged", 0, 0,
                                      f"also tagged in {elsewhere[0]}"))
                continue
            blobs, size = tag_alone.get(path.manifest, (0, 0)) if path.repo in repos else (0, 0)
            out.append(FreedBytes(action, "gc --delete-untagged", blobs, size))
    for path in paths:
        repos = rev_repos.get(path.manifest, set())
        if path.repo not in repos:
            continue
        action = f"rm {path.repo}@{path.manifest}"
        if repos - {path.repo}:
            out.append(FreedBytes(action, "gc", 0, 0, "the same manifest is in another repository"))
            continue
        blobs, size = rev_alone.get(path.manifest, (0, 0))
        out.append(FreedBytes(action, "gc", blobs, size))
    return out


def _size_damage(store: ManifestStore, digest: str, size: int | None,
                 parents: list[tuple[str, str]]) -> tuple[int | None, str | None]:
    """The size the referencing descriptors give, and what the stored size says: a blob
    shorter than its descriptors was truncated (an interrupted copy, a full disk)."""
    sizes = {ref.size for manifest_digest, _ in parents
             if (manifest := store.get(manifest_digest)) is not None
             for ref in manifest.references() if ref.digest == digest and ref.size is not None}
    expected = max(sizes) if sizes else None
    if size is None:
        return expected, None
    if size == 0 and digest != EMPTY_SHA256:
        return expected, "empty"
    if expected is not None and size < expected:
        return expected, "truncated"
    if expected is not None and size > expected:
        return expected, "longer than its descriptors"
    return expected, None


def explain_blob(inventory: Inventory, store: ManifestStore, digest: str,
                 graph: ReferenceGraph | None = None) -> WhyReport:
    """Answer `regfsck why` for `digest` (validated by the caller)."""
    graph = graph or ReferenceGraph(inventory, store)
    asked = digest
    stored = store.reach.resolve(digest)
    digest = stored if stored is not None else digest  # a sha512 alias: its stored blob
    blob = inventory.blobs.get(digest)
    report = WhyReport(digest=asked, exists=blob is not None,
                       size=blob.size if blob else None,
                       path=_root_path(layout.blob_data(digest)))
    if digest != asked:
        report.stored_as = digest
    misplaced = [b for b in inventory.misplaced_blobs if b.digest == digest]
    if misplaced:
        report.misplaced_at = _root_path(misplaced[0].path)
        if report.size is None:
            report.size = misplaced[0].size
    parents = sorted(graph.parents.get(digest, ()))
    report.direct_parents = [{"manifest": m, "role": r} for m, r in parents]
    roles = {r for _, r in parents}
    report.revision_of = sorted(graph.holders.get(digest, ()))
    if report.revision_of:
        roles.add("manifest")
    report.roles = sorted(roles)
    report.expected_size, report.damage = _size_damage(store, digest, report.size, parents)
    report.paths = paths_to(graph, digest)
    report.layer_links = _layer_links(inventory, digest)
    marks = {untagged: mark(inventory, store, delete_untagged=untagged) for untagged in (False, True)}
    report.gc = _gc_verdicts(graph, digest, report.paths, marks)
    report.freed = _freed(graph, report.paths, graph.tag_roots())
    return report
