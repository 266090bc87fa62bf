"""Offline `rm`: the deletions the registry API cannot do, planned from one scan.

`repo:tag` removes that tag only (other tags on the same digest stay), `repo@digest`
removes the manifest from that repository together with the tags pointing at it and its
entries in other tags' history, `repo` removes the whole repository. Blobs are never
removed here: the next `gc` frees what nothing needs any more (the plan says how much).
Removing a manifest that a remaining index of the same repository lists as a child
would break that multi-arch image, so it is refused unless forced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from regfsck import layout
from regfsck.digest import DigestError, expand_digest, is_digest
from regfsck.graph import ManifestStore
from regfsck.inventory import Inventory, LinkMap, Repository
from regfsck.reach import mark
from regfsck.refs import ImageRef, RefError, parse_ref
from regfsck.removal import Removal
from regfsck.root import RegistryRoot
from regfsck.scanner import Scanner
from regfsck.storage import EntryKind, Storage, open_storage


@dataclass(frozen=True)
class RmPlan:
    """What an rm removes (judgement only: `sweep.Applied` wraps the outcome)."""

    refs: list[str]
    tags: list[tuple[str, str, str | None]] = field(default_factory=list)  # (repo, tag, digest)
    manifests: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (repo, digest, tags)
    repositories: list[str] = field(default_factory=list)
    layer_links: list[tuple[str, str]] = field(default_factory=list)  # of removed repositories
    uploads: list[tuple[str, str, int]] = field(default_factory=list)  # of removed repositories
    refused: list[str] = field(default_factory=list)  # why a REF would break a kept image
    orphaned_referrers: list[tuple[str, str, str]] = field(default_factory=list)  # repo, digest, subject
    reclaimable_bytes: int = 0  # what the next `gc` frees because of this rm
    reclaimable_bytes_delete_untagged: int = 0  # ... and the next `gc --delete-untagged`
    force: bool = False
    removal_list: list[Removal] = field(default_factory=list)
    empty_dirs: list[str] = field(default_factory=list)

    @property
    def is_blocked(self) -> bool:
        return bool(self.refused) and not self.force

    def to_json(self) -> dict[str, Any]:
        return {
            "refs": self.refs,
            "blobs": [],  # rm never removes blobs: gc does, see reclaimable_bytes
            "manifests": [{"repo": r, "digest": d, "tags": t} for r, d, t in self.manifests],
            "tags": [{"repo": r, "tag": t, "digest": d} for r, t, d in self.tags],
            "repositories": self.repositories,
            "layer_links": [{"repo": r, "digest": d} for r, d in self.layer_links],
            "uploads": [{"repo": r, "id": i, "size": s} for r, i, s in self.uploads],
            "orphaned_referrers": [{"repo": r, "digest": d, "subject": s}
                                   for r, d, s in self.orphaned_referrers],
            "refused": self.refused,
            "reclaimable_bytes": self.reclaimable_bytes,
            "reclaimable_bytes_delete_untagged": self.reclaimable_bytes_delete_untagged,
            "applied": False,  # a plan; `sweep.Applied.to_json` fills in the outcome
            "run_id": None,
        }


def resolve_ref(text: str, inv: Inventory) -> ImageRef:
    """Parse a REF and check it names something in the tree.

    A whole repository whose on-disk name breaks the grammar (it aborts the official GC)
    can still be named exactly as it is on disk, so it can be removed."""
    try:
        ref = parse_ref(text, bare="repository")
    except RefError:
        if text in inv.repositories:
            return ImageRef(text)
        raise
    repo = inv.repositories.get(ref.repository)
    if repo is None:
        raise RefError(f"{text!r}: no repository {ref.repo!r} in this tree")
    if ref.tag is not None and ref.tag not in repo.tags:
        raise RefError(f"{text!r}: repository {ref.repo} has no tag {ref.tag!r}")
    if ref.digest is not None and ref.digest not in repo.revisions:
        if is_digest(ref.digest):
            raise RefError(f"{text!r}: repository {ref.repo} has no manifest {ref.digest}")
        try:  # a short digest, as git takes them
            ref = ImageRef(ref.repo, None, expand_digest(ref.digest, repo.revisions,
                                                        f"manifest of {ref.repo}"))
        except DigestError as exc:
            raise RefError(f"{text!r}: {exc}") from exc
    return ref


def _without(repo: Repository, tags: set[str], digests: set[str]) -> Repository:
    """The repository as it would be after removing `tags` and the manifests `digests`."""
    kept_tags = {}
    for name, tag in repo.tags.items():
        if name in tags:
            continue
        index = LinkMap(tag.index.base, ((d, link) for d, link in tag.index.items()
                                         if d not in digests))
        kept_tags[name] = dataclasses.replace(tag, index=index)
    revisions = LinkMap(repo.revisions.base, ((d, link) for d, link in repo.revisions.items()
                                              if d not in digests))
    return dataclasses.replace(repo, tags=kept_tags, revisions=revisions)


class _RmPlanner:
    def __init__(self, inv: Inventory, store: ManifestStore, storage: Storage,
                 refs: list[ImageRef], force: bool) -> None:
        self.inv = inv
        self.store = store
        self.storage = storage
        self.refs = refs
        self.plan = RmPlan([str(r) for r in refs], force=force)
        self.removals: list[Removal] = []

    def _removal(self, path: str, phase: str) -> None:
        st = self.storage.stat(path)
        checks = (("", st.mtime_ns),) if st is not None else ()
        self.removals.append(Removal(path, phase, checks, grace_applies=False))

    def build(self) -> RmPlan:
        whole = {r.repository for r in self.refs if r.is_whole_repo}
        tags: dict[str, set[str]] = {}
        digests: dict[str, set[str]] = {}
        for ref in self.refs:
            if ref.repository in whole:
                continue
            if ref.tag is not None:
                tags.setdefault(ref.repository, set()).add(ref.tag)
            elif ref.digest is not None:
                digests.setdefault(ref.repository, set()).add(ref.digest)
        for name, removed in sorted(digests.items()):
            repo = self.inv.repositories[name]
            for tag_name, tag in repo.tags.items():
                if tag.current is not None and tag.current.target in removed:
                    tags.setdefault(name, set()).add(tag_name)
        for name in sorted(whole):
            self._whole_repository(self.inv.repositories[name])
        for name in sorted(set(tags) | set(digests)):
            self._repository_parts(self.inv.repositories[name], tags.get(name, set()),
                                   digests.get(name, set()))
        self._reclaimable(whole, tags, digests)
        self.plan = dataclasses.replace(
            self.plan, removal_list=sorted(self.removals, key=lambda r: (
                ("tags", "manifests", "repositories").index(r.phase), r.path)),
            empty_dirs=sorted(set(self.plan.empty_dirs)))
        return self.plan

    def _repository_parts(self, repo: Repository, tags: set[str], digests: set[str]) -> None:
        for tag_name in sorted(tags):
            tag = repo.tags[tag_name]
            current = tag.current.target if tag.current is not None else None
            self.plan.tags.append((repo.name, tag_name, current))
            self._removal(tag.path, "tags")
        for digest in sorted(digests):
            history = sorted(t for t, tag in repo.tags.items() if digest in tag.index)
            pointing = {t for t in tags if repo.tags[t].current is not None
                        and repo.tags[t].current.target == digest}  # type: ignore[union-attr]
            self.plan.manifests.append((repo.name, digest, sorted(set(history) | pointing)))
            self._removal(layout.revision_dir(repo.name, digest), "manifests")
            for tag_name in history:
                if tag_name not in tags:
                    self._removal(layout.tag_index_dir(repo.name, tag_name, digest), "manifests")
            self._check_parents(repo, digest, digests)
        for digest, manifest_digest in ((d, m) for m in sorted(digests) for d in repo.revisions):
            manifest = self.store.get(digest)
            if (manifest is not None and manifest.subject is not None
                    and manifest.subject.digest == manifest_digest and digest not in digests):
                self.plan.orphaned_referrers.append((repo.name, digest, manifest_digest))

    def _check_parents(self, repo: Repository, digest: str, removed: set[str]) -> None:
        for other in sorted(repo.revisions):
            if other in removed:
                continue
            manifest = self.store.get(other)
            if manifest is not None and any(c.digest == digest for c in manifest.children):
                self.plan.refused.append(
                    f"{repo.name}@{digest} is a child of the index {repo.name}@{other}, which "
                    f"stays: removing it breaks that image (remove {repo.name}@{other} in the "
                    "same command, or pass --force)")

    def _whole_repository(self, repo: Repository) -> None:
        self.plan.repositories.append(repo.name)
        self.plan.layer_links.extend((repo.name, d) for d in sorted(repo.layers))
        self.plan.uploads.extend((repo.name, u.id, u.size) for u in repo.uploads)
        nested = any(e.kind is EntryKind.DIR and not e.name.startswith("_")
                     for e in self.storage.list_dir(repo.path))
        if nested:  # `a/b` is also the parent of `a/b/c`: move only a/b's own parts
            for part in (layout.LAYERS_DIR, layout.MANIFESTS_DIR, layout.UPLOADS_DIR):
                if self.storage.stat(layout.join(repo.path, part)) is not None:
                    self._removal(layout.join(repo.path, part), "repositories")
            return
        self._removal(repo.path, "repositories")
        parent = repo.path.rpartition("/")[0]
        while parent and parent != layout.REPOSITORIES:
            self.plan.empty_dirs.append(parent)
            parent = parent.rpartition("/")[0]

    def _reclaimable(self, whole: set[str], tags: dict[str, set[str]],
                     digests: dict[str, set[str]]) -> None:
        """Bytes gc would free after this rm that it would not free before."""
        after = dataclasses.replace(self.inv, repositories={
            name: _without(repo, tags.get(name, set()), digests.get(name, set()))
            for name, repo in self.inv.repositories.items() if name not in whole})
        for delete_untagged in (False, True):
            before = mark(self.inv, self.store, delete_untagged).blobs
            now = mark(after, self.store, delete_untagged).blobs
            freed = sum(self.inv.blobs.size(d) for d in before
                        if d not in now and d in self.inv.blobs)
            freed += sum(size for _, _, size in self.plan.uploads)
            if delete_untagged:
                self.plan = dataclasses.replace(self.plan, reclaimable_bytes_delete_untagged=freed)
            else:
                self.plan = dataclasses.replace(self.plan, reclaimable_bytes=freed)


def plan_rm(root: RegistryRoot, refs: list[str], *, force: bool = False) -> RmPlan:
    """Scan the tree and plan removing `refs` (raises RefError for a bad or unknown REF)."""
    storage = open_storage(root)
    inv = Scanner(storage, root).scan()
    store = ManifestStore(storage, inv)
    resolved = list(dict.fromkeys(resolve_ref(text, inv) for text in refs))
    return _RmPlanner(inv, store, storage, resolved, force).build()
