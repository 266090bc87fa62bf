"""Judging an undo: the tree as it would be after reverting a run, and what in it is used.

An undo (or the revert that recovers a killed run) must not take away anything the tree
uses *now*, and must not bring back a tag that cannot be pulled. Both questions are
asked of the tree as it would be after the undo, built in memory before anything moves:
the inventory of the live tree, minus the files the run created (which the undo would
move away), plus what the run's quarantine holds (which the undo would move back).

"Used now" means reachable from a root that appeared after the run started: a revision
or tag link written since (its mtime is at least the run's start). Roots that were
already there when the run ran do not count, so undoing a repair or an import that
filled a hole in an existing image still puts the tree back exactly as it was (the image
goes back to being broken, as it was); but a push, a cross-repository mount or another
import made since keeps every blob, revision and layer link it needs.

The marking itself is `graph.reachable` over a `ManifestStore`, the same walk gc's mark
uses (config, layers, index children; foreign layers skipped unless stored)."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from regfsck import layout
from regfsck.graph import ManifestStore, reachable
from regfsck.inventory import Blob, Inventory, Link, Repository, Tag
from regfsck.manifest import MAX_MANIFEST_BYTES
from regfsck.root import RegistryRoot
from regfsck.scanner import Scanner
from regfsck.storage import Storage, StorageError, open_storage, open_storage_at


class _ViewStore(ManifestStore):
    """Reads each manifest from wherever the view found it: the tree or a quarantine."""

    def __init__(self, storage: Storage, inventory: Inventory,
                 sources: dict[str, Storage]) -> None:
        super().__init__(storage, inventory)
        self.sources = sources

    def _read(self, blob: Blob) -> bytes:
        return self.sources.get(blob.digest, self.storage).read_small(blob.path, MAX_MANIFEST_BYTES)


@dataclass
class UndoView:
    """The tree as it would be after the undo (inventory + where each manifest is read)."""

    inv: Inventory
    store: ManifestStore
    tree: Storage  # the live tree, as listed for this view
    restored_tags: list[tuple[str, str, str]] = field(default_factory=list)  # repo, tag, target
    removed: dict[str, layout.LayoutPath] = field(default_factory=dict)
    _saved: dict[str, object] = field(default_factory=dict)


def _repo(inv: Inventory, name: str) -> Repository:
    repo = inv.repositories.get(name)
    if repo is None:
        repo = inv.repositories[name] = Repository(name, f"{layout.REPOSITORIES}/{name}")
    return repo


def restored_tags(root: RegistryRoot, payload: str) -> bool:
    """Does this quarantine payload (ROOT-relative) hold any tag (so undoing it brings tags
    back)?"""
    storage = _payload(root, payload)
    if storage is None or storage.stat(layout.REPOSITORIES) is None:
        return False
    held = Scanner(storage, root).scan()
    return any(repo.tags for repo in held.repositories.values())


def _payload(root: RegistryRoot, payload: str) -> Storage | None:
    """The payload's tree, or None when it holds nothing (an emptied payload does not
    exist on object storage, where directories are only what objects imply)."""
    storage = open_storage_at(root, payload)
    try:
        if storage.stat("") is None:
            return None
    except StorageError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return storage


def build_view(root: RegistryRoot, removals: list[str], payloads: list[str]) -> UndoView:
    """The live tree without `removals` (v2-relative files) and with every payload's
    content (payloads: ROOT-relative directories holding a `v2` tree of their own)."""
    tree_storage = open_storage(root)
    try:
        inv = Scanner(tree_storage, root).scan()
    except StorageError as exc:
        # On object storage a tree whose every key went (an import into an empty prefix,
        # reverted) does not exist at all, where a filesystem keeps its empty directories:
        # that is an empty tree, not a missing one.
        if not (root.is_object_storage and exc.errno == errno.ENOENT):
            raise
        inv = Inventory(root=root)
    sources: dict[str, Storage] = {}
    # The store reads from every blob known, those the undo would take away included:
    # what a manifest references does not depend on whether it stays.
    known = Inventory(root=root, blobs=inv.blobs.copy(), repositories=inv.repositories)
    view = UndoView(inv, _ViewStore(tree_storage, known, sources), tree_storage)
    for payload in payloads:
        storage = _payload(root, payload)
        if storage is None:
            continue
        held = Scanner(storage, root).scan()
        for digest, blob in held.blobs.items():
            if digest not in inv.blobs:
                inv.blobs[digest] = known.blobs[digest] = blob
                sources[digest] = storage
        for name, src in held.repositories.items():
            repo = _repo(inv, name)
            for digest, link in src.revisions.items():
                repo.revisions.setdefault(digest, link)
            for digest, link in src.layers.items():
                repo.layers.setdefault(digest, link)
            for tag_name, tag in src.tags.items():
                mine = repo.tags.get(tag_name)
                if mine is None:
                    repo.tags[tag_name] = mine = Tag(tag.name, tag.path, None)
                if tag.current is not None:
                    if mine.current is None:
                        mine.current = tag.current
                    if tag.current.target is not None:
                        view.restored_tags.append((name, tag_name, tag.current.target))
                for digest, link in tag.index.items():
                    mine.index.setdefault(digest, link)
    for rel in removals:
        view.removed[rel] = kind = layout.parse_path(rel)
        _take(view, rel, kind)
    return view


def _take(view: UndoView, rel: str, kind: layout.LayoutPath) -> None:
    inv = view.inv
    repo = inv.repositories.get(kind.repo or "") if kind.repo is not None else None
    saved: object = None
    if (kind.kind == "blob" and kind.digest is not None and kind.digest in inv.blobs
            and inv.blobs[kind.digest].path == rel):
        saved = inv.blobs.pop(kind.digest)
    elif repo is not None and kind.digest is not None and kind.kind == "revision":
        saved = repo.revisions.pop(kind.digest, None)
    elif repo is not None and kind.digest is not None and kind.kind == "layer":
        saved = repo.layers.pop(kind.digest, None)
    elif repo is not None and kind.tag in repo.tags:
        tag = repo.tags[kind.tag or ""]
        if kind.kind == "tag_current" and tag.current is not None and tag.current.path == rel:
            saved, tag.current = tag.current, None
        elif kind.kind == "tag_index" and kind.digest is not None:
            saved = tag.index.pop(kind.digest, None)
    if saved is not None:
        view._saved[rel] = saved


def _put_back(view: UndoView, rel: str) -> None:
    saved = view._saved.pop(rel, None)
    kind = view.removed.pop(rel, None)
    if saved is None or kind is None:
        return
    inv = view.inv
    if isinstance(saved, Blob):
        inv.blobs[saved.digest] = saved
        return
    assert isinstance(saved, Link) and kind.repo is not None
    repo = _repo(inv, kind.repo)
    if kind.kind == "revision" and kind.digest:
        repo.revisions[kind.digest] = saved
    elif kind.kind == "layer" and kind.digest:
        repo.layers[kind.digest] = saved
    elif kind.kind == "tag_current" and kind.tag in repo.tags:
        repo.tags[kind.tag or ""].current = saved
    elif kind.kind == "tag_index" and kind.tag in repo.tags and kind.digest:
        repo.tags[kind.tag or ""].index[kind.digest] = saved


def used_now(root: RegistryRoot, view: UndoView, since_ns: int) -> set[str]:
    """The removals that something written since `since_ns` uses; they go back into the
    view (the undo keeps them). Roots are revision and tag links of the live tree whose
    mtime is at least `since_ns` (a moved-back link keeps its old mtime: not a new root)."""
    tree = view.tree
    reach: dict[str, set[str]] = {}
    for name, repo in view.inv.repositories.items():
        roots: set[str] = set()
        for digest, link in repo.revisions.items():
            if _is_new(tree, link.path, since_ns):
                roots.add(digest)
        for tag in repo.tags.values():
            if tag.current is not None and tag.current.target is not None \
                    and _is_new(tree, tag.current.path, since_ns):
                roots.add(tag.current.target)
        if roots:
            reach[name] = reachable(view.store, roots)
    everywhere = set().union(*reach.values()) if reach else set()
    # A `_layers` link written since to a blob the run created makes it readable there (a
    # cross-repository mount or an upload whose manifest has not come yet): the blob is
    # used, as the reachability oracle's `blobs_in_use` counts links.
    candidates = {k.digest for k in view.removed.values() if k.kind == "blob"}
    for repo in view.inv.repositories.values():
        for link in repo.layers.values():
            target = link.target
            if target is not None and target in candidates and target not in everywhere \
                    and _is_new(tree, link.path, since_ns):
                everywhere.add(target)
    used: set[str] = set()
    for rel, kind in list(view.removed.items()):
        mine = reach.get(kind.repo or "", set())
        if (kind.kind == "blob" and kind.digest in everywhere) or (
                kind.kind in ("revision", "layer") and kind.digest in mine):
            used.add(rel)
    for rel in used:
        _put_back(view, rel)
    return used


def _is_new(tree: Storage, path: str, since_ns: int) -> bool:
    st = tree.stat(path)
    return st is not None and st.mtime_ns >= since_ns


def missing_parts(view: UndoView, repo_name: str, target: str) -> list[str]:
    """The v2-relative paths a pull of `repo@target` needs that the view lacks."""
    repo = view.inv.repositories.get(repo_name)
    missing: list[str] = []
    seen: set[str] = set()
    stack = [target]
    while stack:
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        if repo is None or digest not in repo.revisions:
            missing.append(layout.revision_link(repo_name, digest))
        if digest not in view.inv.blobs:
            missing.append(layout.blob_data(digest))
            continue
        manifest = view.store.get(digest)
        if manifest is None:
            continue  # unreadable or not a manifest: damage verify reports, not the undo's
        for ref in manifest.references():
            if ref.role == "manifest":
                stack.append(ref.digest)
                continue
            if ref.digest in seen:
                continue
            seen.add(ref.digest)
            present = ref.digest in view.inv.blobs
            if ref.is_foreign and not present:
                continue
            if not present:
                missing.append(layout.blob_data(ref.digest))
            if repo is None or ref.digest not in repo.layers:
                missing.append(layout.layer_link(repo_name, ref.digest))
    return missing
