"""Put images from an OCI layout or archive into a registry tree, as the registry would.

Three layers, kept apart:
* reading the SOURCE (`regfsck.sources.open_layout`): an OCI image layout directory, or a
  tar of one (`oci-archive`, plain, .gz or .zst). An archive cannot be read at random, so
  it is streamed twice: once to read index.json and the manifests and to hash every blob
  (the plan), once more to copy the blobs the tree lacks, each verified again while it is
  written;
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

import errno
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regfsck import layout
from regfsck.digest import DigestError, parse_digest
from regfsck.errors import REASON_EXIT, Interrupted, RegfsckError
from regfsck.hashing import (
    DigestMismatch,
    ProgressFn,
    digest_of,
    read_chunks,
    verified,
)
from regfsck.inventory import Inventory, Repository
from regfsck.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError, parse_manifest
from regfsck.names import is_valid_tag, repo_name_problem
from regfsck.quarantine import Run
from regfsck.refs import split_ref
from regfsck.root import RegistryRoot, RootError, locate
from regfsck.scanner import Scanner
from regfsck.session import MutationSession, mutation_session
from regfsck.sources import Source, corrupt_message, open_layout
from regfsck.storage import Storage, StorageError, open_storage

REF_NAME = "org.opencontainers.image.ref.name"


class ImportFailed(RegfsckError):
    """The import cannot go ahead; `reason` is "usage", "damage" (bad data) or "io", and
    decides the exit code (2, 1, 3)."""

    def __init__(self, message: str, reason: str = "usage") -> None:
        super().__init__(message, exit_code=REASON_EXIT[reason])
        self.reason = reason


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


@dataclass(frozen=True)
class ImportPlan:
    """What an import writes (judgement only: `ImportResult` wraps the outcome)."""

    source: str
    root: str
    images: list[SourceImage] = field(default_factory=list)
    new_blobs: dict[str, int] = field(default_factory=dict)  # digest -> size, to copy
    existing_blobs: dict[str, int] = field(default_factory=dict)  # already in the tree
    links: list[LinkWrite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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
            "applied": False,  # a plan; `ImportResult.to_json` fills in the outcome
            "run_id": None,
            "notes": list(self.notes),
            "recovered": [],
        }


@dataclass(frozen=True)
class ImportResult:
    """An import plan and what became of it: applied (in run `run_id`; an empty plan is
    applied without a run), and what recovery did before --apply."""

    plan: ImportPlan
    applied: bool = False
    run_id: str | None = None
    recovered: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "applied": self.applied, "run_id": self.run_id,
                "recovered": list(self.recovered)}


class _Planner:
    """Decides what an import adds to the tree; reads the source and the tree, writes nothing."""

    def __init__(self, source: Source, inventory: Inventory | None,
                 storage: Storage | None, plan: ImportPlan) -> None:
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
            if digest_of(raw, digest.partition(":")[0]) != digest:
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

    def _digest_link(self, kind: str, repo_name: str, digest: str, existing: Mapping[str, Any],
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
                    for _ in verified(read_chunks(stream), digest, size, on_bytes=on_bytes,
                                      stop=stop):
                        pass
            except DigestMismatch as exc:
                raise ImportFailed(f"{corrupt_message('the tree', exc)}; repair it first: "
                                   f"regfsck repair ROOT --from {self.source.label}", "damage") from exc
            except StorageError as exc:
                raise ImportFailed(f"the tree's blob {digest}: {exc.message}", "damage") from exc


def plan_import(source: Source, images: list[SourceImage], root: RegistryRoot,
                inventory: Inventory | None, *, verify: bool = True,
                on_bytes: ProgressFn | None = None, stop: threading.Event | None = None,
                storage: Storage | None = None) -> ImportPlan:
    """What importing `images` from `source` adds to the tree (raises ImportFailed).

    `storage`: the tree `inventory` was scanned from (default: `open_storage(root)`), read
    for the manifests and blobs the tree already has. With `verify`, the source blobs to
    copy (directory sources; archives were hashed when read) and the tree's blobs the
    images rely on are re-hashed now, so the plan is proven; applying re-verifies every
    blob while it is written anyway."""
    plan = ImportPlan(source.label, root.display, list(images))
    if inventory is None:
        storage = None
    elif storage is None:
        storage = open_storage(root)
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

STATE_ENTRIES = frozenset({*layout.OWN_DIRS, "lost+found"})


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


def apply_import(session: MutationSession, plan: ImportPlan, source: Source, *,
                 on_bytes: ProgressFn | None = None, stop: threading.Event | None = None
                 ) -> ImportResult:
    """Write the plan through a journaled run of `session` (regfsck.session).

    Blobs first, then `_layers` and revision links, then tag history and `current` links,
    in batches (`Run.batch`: one filesystem flush per batch, not fsyncs per file; still in
    this order, so a crash never leaves a link to a blob that is not there). Any failure
    (a blob that no longer verifies, Ctrl-C) reverts the whole run."""
    def created(run: Run, rel: str, data: Any) -> None:
        run.create_file(rel, data)  # owner, group and modes of the neighbours (quarantine)

    details = {"source": plan.source, "images": [str(i) for i in plan.images],
               "blobs": len(plan.new_blobs), "links": len(plan.links)}
    with session.begin(details, on_crash="revert") as run:
        with run.batch():
            for digest, _, chunks in source.stream(set(plan.new_blobs), on_bytes, stop):
                created(run, layout.blob_data(digest), chunks)
            if plan.new_blobs and plan.links:
                # Writing the blobs took a while: before anything names them, ask again
                # whether the tree may change (as gc does between its phases): a registry
                # started meanwhile (or, on object storage, one no longer down or read-only)
                # stops the run, which then reverts.
                session.check_unused()
            for link in plan.links:
                if stop is not None and stop.is_set():
                    raise Interrupted
                if link.replaces is not None:
                    run.quarantine(link.path)
                created(run, link.path, link.digest.encode("ascii"))
        run.finish(f"imported {len(plan.images)} images from {plan.source}")
    return ImportResult(plan, applied=True, run_id=run.run_id,
                        recovered=list(session.recovered))


def run_import(root_path: Path | RegistryRoot, source_path: Path, *, repo: str | None = None,
               apply: bool = False,
               on_bytes: ProgressFn | None = None, stop: threading.Event | None = None,
               on_recovered: Callable[[list[str]], None] | None = None) -> ImportResult:
    """Plan an import (and with `apply`, do it in a mutation session, re-planned there).

    What recovery made of runs a crash left open is in `result.recovered` (and handed to
    `on_recovered` as soon as it is known). A stop or an I/O error says what became of
    the import (nothing imported; an --apply run reverted), which only this level knows.

    `root_path`: a local directory (a registry root, or an empty directory to start one
    in), or a resolved `RegistryRoot` (object storage: `s3://BUCKET/PREFIX`, an empty
    prefix included, with what --registry-url / --no-registry-check said)."""
    try:
        return _run_import(root_path, source_path, repo=repo, apply=apply, on_bytes=on_bytes,
                           stop=stop, on_recovered=on_recovered)
    except Interrupted as exc:
        raise Interrupted("interrupted: nothing was imported"
                          + (" (the run was reverted)" if apply else "")) from exc
    except StorageError as exc:
        raise ImportFailed(f"{exc} (nothing was imported)", "io") from exc


def _run_import(root_path: Path | RegistryRoot, source_path: Path, *, repo: str | None,
                apply: bool, on_bytes: ProgressFn | None, stop: threading.Event | None,
                on_recovered: Callable[[list[str]], None] | None) -> ImportResult:
    if isinstance(root_path, RegistryRoot):
        root, fresh = root_path, False  # object storage: directories need no creating
    else:
        root, fresh = target_root(root_path)
    source = open_layout(source_path, on_bytes, stop)
    images = images_from_index(source.index_bytes(), repo, source.label)

    def plan_now(verify: bool) -> ImportPlan:
        inventory = None
        storage = open_storage(root)  # listed afresh: under the lock the tree is read again
        if _has_tree(root, storage):
            inventory = Scanner(storage, root).scan()
        return plan_import(source, images, root, inventory, verify=verify, on_bytes=on_bytes,
                           stop=stop, storage=storage)

    if not apply:
        return ImportResult(plan_now(verify=True))
    plan_now(verify=False)  # refuse bad input before taking the lock or creating anything
    with mutation_session(root, command="import", on_recovered=on_recovered) as session:
        plan = plan_now(verify=False)  # again under the lock; blobs are verified as they are written
        if plan.is_empty:
            return ImportResult(plan, applied=True, recovered=list(session.recovered))
        if not root.is_object_storage:  # a bucket has no free space to run out of
            check_free_space(root.root, plan.bytes_to_write)
        if fresh:
            os.makedirs(root.v2, exist_ok=True)
        return apply_import(session, plan, source, on_bytes=on_bytes, stop=stop)


def _has_tree(root: RegistryRoot, storage: Storage) -> bool:
    """Whether ROOT holds a tree to plan against (else the import starts one). On object
    storage a prefix with no objects holds none (a bucket that cannot be listed is an
    error, not an empty tree: StorageError)."""
    if not root.is_object_storage:
        return root.v2.is_dir()
    from regfsck.objectstore import ObjectStorage

    assert isinstance(storage, ObjectStorage)
    try:
        return bool(storage.tree.files)
    except StorageError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise


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
