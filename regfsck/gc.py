"""gc's judgement: which blobs every kept image needs (mark), and what may go (sweep plan).

Mark roots are every revision link (default) or, with `--delete-untagged`, only what the
tags' `current` links point at. From the roots the walk follows configs, layers and
index/list children recursively (a child of a kept index is kept, tagged or not), and a
manifest with a `subject` (an OCI referrer: signature, SBOM) is kept when its subject is
kept in the same repository; so is one cosign's tags name (`sha256-<hex>.sig` ...) for
it. The mark set is global: a blob any repository uses stays.
Marking is the reachability oracle's (`reach.mark`): aliases (sha512/sha384 `_layers`
links) resolve to their stored blob, `urls` descriptors are kept when stored.

The plan is plain data; nothing here changes the tree (`sweep` does, through the
quarantine). A tree with damage that makes marking unreliable (a manifest that cannot
be read, a bad tag or revision link, a symlink or unreadable directory hiding part of
the tree) blocks the plan unless forced: sweeping a damaged store loses more data.
Forced, a part of the tree that could not be read or judged (symlink, unreadable) still
keeps every blob: what it references is unknown (`reach.unknown_parts`).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

from regfsck import layout
from regfsck.checks import DEFAULT_UPLOAD_AGE, TreeChecker
from regfsck.document import Document
from regfsck.durations import format_duration
from regfsck.findings import Finding, blocks_gc
from regfsck.graph import ManifestStore, reachable
from regfsck.inventory import Inventory, LinkMap, Upload
from regfsck.names import is_upload_id
from regfsck.reach import Marks, OrphanReferrer, mark, repo_has_unknown, revision_roots
from regfsck.removal import Removal, Revalidate
from regfsck.root import RegistryRoot
from regfsck.scanner import Depth, Scanner, read_deferred_layers, settle_blobs
from regfsck.storage import EntryKind, Storage, open_storage, release_freed_memory

DEFAULT_GRACE = timedelta(hours=1)



@dataclass
class GcOptions:
    delete_untagged: bool = False
    uploads_older_than: timedelta = DEFAULT_UPLOAD_AGE
    grace: timedelta = DEFAULT_GRACE
    force: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"delete_untagged": self.delete_untagged,
                "uploads_older_than": format_duration(self.uploads_older_than),
                "grace": format_duration(self.grace), "force": self.force}


# --------------------------------------------------------------------------- mark


# The mark phase is the reachability oracle's (`reach.mark`): every command asks it.


def blocking_findings(findings: Iterable[Finding], delete_untagged: bool) -> list[Finding]:
    """The findings that make marking unreliable (gc refuses unless forced): the catalogue's
    `blocks_gc` policy of each kind (damage after which the mark set cannot be trusted)."""
    blocking = [f for f in findings if blocks_gc(f, delete_untagged)]
    return sorted(blocking, key=lambda f: (f.kind, f.path))


# --------------------------------------------------------------------------- the plan


@dataclass(slots=True)
class BlobVictim(Document):
    digest: str
    size: int
    reason: str
    repos: list[str]  # repositories that linked it or had it as a revision


@dataclass(slots=True)
class ManifestVictim(Document):
    repo: str
    digest: str
    reason: str
    tags: list[str]  # tags whose history (index/) names it; those entries go too


@dataclass(slots=True)
class LayerLinkVictim(Document):
    repo: str
    digest: str  # the digest in the link's path
    target: str  # the blob it makes readable
    reason: str


@dataclass(slots=True)
class UploadVictim(Document):
    repo: str
    id: str
    size: int
    reason: str


@dataclass
class RepoUsage:
    """Per-repository share of the plan (blobs go to the one repository that used them)."""

    manifests: int = 0
    layer_links: int = 0
    uploads: int = 0
    tag_dirs: int = 0
    blob_bytes: int = 0
    upload_bytes: int = 0

    @property
    def reclaimable_bytes(self) -> int:
        return self.blob_bytes + self.upload_bytes

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "reclaimable_bytes": self.reclaimable_bytes}


SHARED = "(several repositories)"
UNLINKED = "(no repository)"


@dataclass(frozen=True)
class GcPlan:
    """What a collection removes and why (judgement only: `sweep.Applied` wraps the outcome
    of carrying it out)."""

    options: GcOptions
    blobs: list[BlobVictim] = field(default_factory=list)
    manifests: list[ManifestVictim] = field(default_factory=list)
    layer_links: list[LayerLinkVictim] = field(default_factory=list)
    uploads: list[UploadVictim] = field(default_factory=list)
    tag_dirs: list[tuple[str, str]] = field(default_factory=list)  # (repo, tag) left empty
    repositories: list[str] = field(default_factory=list)  # left empty: removed whole
    orphan_referrers: list[OrphanReferrer] = field(default_factory=list)
    young: list[tuple[str, str]] = field(default_factory=list)  # (path, what) kept by the grace
    blocked: list[Finding] = field(default_factory=list)
    empty_link_dirs: list[str] = field(default_factory=list)  # empty link and name dirs
    removal_list: list[Removal] = field(default_factory=list)
    seen_links: Container[str] = frozenset()  # link paths the plan saw (see `seen_links`)
    empty_dirs: list[str] = field(default_factory=list)  # removed at the end if still empty
    per_repository: dict[str, RepoUsage] = field(default_factory=dict)

    @property
    def reclaimable_bytes(self) -> int:
        return sum(b.size for b in self.blobs) + sum(u.size for u in self.uploads)

    @property
    def is_blocked(self) -> bool:
        return bool(self.blocked) and not self.options.force

    @property
    def empty(self) -> bool:
        return not self.removal_list and not self.empty_dirs

    def to_json(self) -> dict[str, Any]:
        return {
            "blobs": [b.to_json() for b in self.blobs],
            "manifests": [m.to_json() for m in self.manifests],
            "layer_links": [link.to_json() for link in self.layer_links],
            "uploads": [u.to_json() for u in self.uploads],
            "tag_dirs": [{"repo": r, "tag": t} for r, t in self.tag_dirs],
            "repositories": list(self.repositories),
            "empty_link_dirs": [f"{layout.V2_PREFIX}/{d}" for d in self.empty_link_dirs],
            "reclaimable_bytes": self.reclaimable_bytes,
            "per_repository": {k: v.to_json() for k, v in sorted(self.per_repository.items())},
            "orphan_referrers": [o.to_json() for o in self.orphan_referrers],
            "kept_by_grace": [{"path": f"{layout.V2_PREFIX}/{p}", "what": w} for p, w in self.young],
            "blocked_by": [f.to_json() for f in self.blocked],
            "options": self.options.to_json(),
            "applied": False,  # a plan; `sweep.Applied.to_json` fills in the outcome
            "run_id": None,
        }


def _ns(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000_000)


class _Planner:
    """Builds a GcPlan from one scan (see `plan_gc`)."""

    def __init__(self, inv: Inventory, store: ManifestStore, storage: Storage,
                 options: GcOptions, now: datetime) -> None:
        self.inv = inv
        self.store = store
        self.storage = storage
        self.options = options
        self.now = now
        self.cutoff_ns = _ns(now - options.grace)
        self.plan = GcPlan(options)
        self.removals: list[Removal] = []

    # -- helpers -------------------------------------------------------------
    def _mtime(self, path: str) -> int | None:
        st = self.storage.stat(path)
        return st.mtime_ns if st is not None else None

    def _old_enough(self, path: str, what: str, checks: list[tuple[str, int]],
                    names: Iterable[str]) -> bool:
        """Record the mtimes of `names` below `path` ("": `path` itself) as a Removal's
        checks; False (and noted) when one is within the grace."""
        for name in names:
            mtime = self._mtime(f"{path}/{name}" if name else path)
            if mtime is None:
                continue
            checks.append((name, mtime))
            if mtime > self.cutoff_ns:
                self.plan.young.append((path, what))
                return False
        return True

    def _usage(self, repo: str) -> RepoUsage:
        return self.plan.per_repository.setdefault(repo, RepoUsage())

    # -- victims ---------------------------------------------------------------
    def manifests(self, marks: Marks) -> set[tuple[str, str]]:
        """Untagged manifests (only with --delete-untagged): revision dir + tag history."""
        gone: set[tuple[str, str]] = set()
        if not self.options.delete_untagged:
            return gone
        for name, repo in sorted(self.inv.repositories.items()):
            kept = marks.kept_manifests.get(name, set())
            for digest, link in sorted(repo.revisions.items()):
                if digest in kept or link.target is None:
                    continue
                rev_dir = layout.revision_dir(name, digest)
                checks: list[tuple[str, int]] = []
                if not self._old_enough(rev_dir, f"manifest {name}@{digest}", checks, [layout.LINK]):
                    continue
                tags = sorted(t for t, tag in repo.tags.items() if digest in tag.index)
                self.plan.manifests.append(ManifestVictim(
                    name, digest, f"untagged: no tag of {name} reaches it", tags))
                self._usage(name).manifests += 1
                self.removals.append(Removal(rev_dir, "manifests", tuple(checks)))
                for tag in tags:
                    self.removals.append(Removal(layout.tag_index_dir(name, tag, digest), "manifests"))
                gone.add((name, digest))
        return gone

    def layer_links(self, marks: Marks) -> set[tuple[str, str]]:
        gone: set[tuple[str, str]] = set()
        kept = marks.blobs
        for name, repo in sorted(self.inv.repositories.items()):
            layers = repo.layers
            # Only links whose blob is not kept can go: a plain link holds its path's digest.
            candidates = sorted([*kept.not_kept(layers.plain()),
                                 *(d for d, link in layers.odd().items()
                                   if link.target is not None and link.target not in kept)])
            for digest in candidates:
                link = layers[digest]
                target = link.target
                if target is None or target in kept:
                    continue
                if marks.unknown and target not in self.inv.blobs:
                    continue  # its blob may be in the part of the tree that could not be read
                link_dir = link.path.rpartition("/")[0]
                checks: list[tuple[str, int]] = []
                if not self._old_enough(link_dir, f"layer link {name} -> {target}", checks, [layout.LINK]):
                    continue
                reason = ("its blob is not referenced" if target in self.inv.blobs
                          else "its blob does not exist")
                self.plan.layer_links.append(LayerLinkVictim(name, digest, target, reason))
                self._usage(name).layer_links += 1
                self.removals.append(Removal(link_dir, "layer_links", tuple(checks)))
                gone.add((name, digest))
        return gone

    def blobs(self, marks: Marks) -> None:
        # Which repositories used each victim (only victims: a set per blob of the tree
        # was the plan's largest table).
        users: dict[str, set[str]] = {d: set() for d in marks.blobs.not_kept(self.inv.blobs)}
        for name, repo in self.inv.repositories.items():
            for target in repo.layers.targets():
                if target in users:
                    users[target].add(name)
            for digest in repo.revisions:
                if digest in users:
                    users[digest].add(name)
        referenced: set[str] = set()
        if self.options.delete_untagged:
            referenced = reachable(self.store, {d for repo in self.inv.repositories.values()
                                                for d in revision_roots(repo)})
        for digest in sorted(users):
            blob = self.inv.blobs[digest]
            blob_dir = layout.blob_dir(digest)
            checks: list[tuple[str, int]] = []
            if not self._old_enough(blob_dir, f"blob {digest}", checks, [layout.DATA]):
                continue
            reason = ("only untagged manifests reference it" if digest in referenced
                      else "no manifest references it")
            repos = sorted(users.get(digest, ()))
            self.plan.blobs.append(BlobVictim(digest, blob.size, reason, repos))
            owner = repos[0] if len(repos) == 1 else (SHARED if repos else UNLINKED)
            self._usage(owner).blob_bytes += blob.size
            self.removals.append(Removal(blob_dir, "blobs", tuple(checks)))

    def _upload_reason(self, upload: Upload) -> str | None:
        if upload.started_at is None:
            return ("no startedat: the registry never purges it" if upload.startedat_raw is None
                    else "unparsable startedat: the registry never purges it")
        age = self.now - upload.started_at
        if age > self.options.uploads_older_than:
            return (f"started {upload.started_at.isoformat()} "
                    f"(older than {format_duration(self.options.uploads_older_than)})")
        return None

    def uploads(self) -> set[tuple[str, str]]:
        gone: set[tuple[str, str]] = set()
        for upload in sorted(self.inv.uploads(), key=lambda u: (u.repo, u.id)):
            if not is_upload_id(upload.id):
                continue
            reason = self._upload_reason(upload)
            if reason is None:
                continue
            checks: list[tuple[str, int]] = []
            parts = ["", layout.DATA, layout.STARTEDAT]
            parts += [layout.join(layout.HASHSTATES, h.partition("/")[0])
                      for h in upload.hashstates]
            if not self._old_enough(upload.path, f"upload {upload.repo}/{upload.id}", checks,
                                    dict.fromkeys(parts)):
                continue
            self.plan.uploads.append(UploadVictim(upload.repo, upload.id, upload.size, reason))
            usage = self._usage(upload.repo)
            usage.uploads += 1
            usage.upload_bytes += upload.size
            self.removals.append(Removal(upload.path, "uploads", tuple(checks)))
            gone.add((upload.repo, upload.id))
        return gone

    def _files_below(self, path: str, skip_nested: bool = False) -> tuple[list[str], int]:
        """Non-directory entries below `path`, and the newest mtime seen (dirs included).

        With `skip_nested`, name components of nested repositories are not entered."""
        files: list[str] = []
        newest = self._mtime(path) or 0
        stack = [path]
        while stack:
            current = stack.pop()
            for entry in self.storage.list_dir(current):
                child = layout.join(current, entry.name)
                if entry.kind is EntryKind.DIR:
                    if skip_nested and current == path and not entry.name.startswith("_"):
                        continue
                    newest = max(newest, self._mtime(child) or 0)
                    stack.append(child)
                else:
                    files.append(child)
                    newest = max(newest, self._mtime(child) or 0)
        return files, newest

    def tag_dirs(self, gone_manifests: set[tuple[str, str]]) -> None:
        """Tag directories the sweep leaves without any file: removed whole."""
        for name, repo in sorted(self.inv.repositories.items()):
            for tag_name, tag in sorted(repo.tags.items()):
                if tag.current is not None:
                    continue
                leaving = {tag.index[d].path for d in tag.index if (name, d) in gone_manifests}
                files, newest = self._files_below(tag.path)
                if any(f not in leaving for f in files):
                    continue
                if newest > self.cutoff_ns:
                    self.plan.young.append((tag.path, f"tag directory {name}:{tag_name}"))
                    continue
                self.plan.tag_dirs.append((name, tag_name))
                self._usage(name).tag_dirs += 1
                self.removals.append(Removal(tag.path, "tags", (("", self._mtime(tag.path) or 0),)))

    def repositories(self, gone_manifests: set[tuple[str, str]], gone_links: set[tuple[str, str]],
                     gone_uploads: set[tuple[str, str]]) -> None:
        """Repositories left with nothing to serve (no revision, no tag, no upload) go whole.

        Their remaining layer links (to blobs other repositories still use) serve nothing
        and go with them; anything else in the directory, or anything within the grace,
        keeps the repository."""
        removed_tags = set(self.plan.tag_dirs)
        for name, repo in sorted(self.inv.repositories.items()):
            if repo_has_unknown(self.store.reach.unknown, repo):
                continue  # looks empty only because part of it could not be read
            if any((name, d) not in gone_manifests for d in repo.revisions):
                continue
            if any((name, t) not in removed_tags for t in repo.tags):
                continue
            if any((name, u.id) not in gone_uploads for u in repo.uploads):
                continue
            files, newest = self._files_below(repo.path, skip_nested=True)
            known = {link.path for link in repo.revisions.values()}
            known |= {link.path for link in repo.layers.values()}
            known |= {link.path for tag in repo.tags.values() for link in tag.index.values()}
            known |= {t.current.path for t in repo.tags.values() if t.current is not None}
            upload_dirs = tuple(u.path + "/" for u in repo.uploads)
            if any(f not in known and not f.startswith(upload_dirs) for f in files):
                continue
            if newest > self.cutoff_ns:
                self.plan.young.append((repo.path, f"repository {name}"))
                continue
            read_deferred_layers(self.storage, self.inv, list, [name])
            for digest, link in sorted(repo.layers.items()):
                if (name, digest) not in gone_links and link.target is not None:
                    self.plan.layer_links.append(LayerLinkVictim(
                        name, digest, link.target, f"repository {name} is left empty"))
                    self._usage(name).layer_links += 1
            self.plan.repositories.append(name)
            nested = any(e.kind is EntryKind.DIR and not e.name.startswith("_")
                         for e in self.storage.list_dir(repo.path))
            if nested:
                for part in (layout.LAYERS_DIR, layout.MANIFESTS_DIR, layout.UPLOADS_DIR):
                    if self.storage.stat(layout.join(repo.path, part)) is not None:
                        self.removals.append(Removal(layout.join(repo.path, part), "repositories"))
            else:
                self.removals.append(Removal(repo.path, "repositories"))
                parent = repo.path.rpartition("/")[0]
                while parent and parent != layout.REPOSITORIES:
                    self.plan.empty_dirs.append(parent)
                    parent = parent.rpartition("/")[0]

    def empty_link_dirs(self) -> None:
        """Link directories left empty by API deletes (`revisions/<alg>/<hex>/` ...): removed.

        Only leaf directories the scan found empty and older than the grace; the
        `_layers` and `_manifests` skeletons of a repository are never removed."""
        for anomaly in self.inv.anomalies:
            if anomaly.kind != "empty_dir":
                continue
            mtime = self._mtime(anomaly.path)
            if mtime is None or mtime > self.cutoff_ns:
                continue
            self.plan.empty_link_dirs.append(anomaly.path)
            self.plan.empty_dirs.append(anomaly.path)

    def empty_name_dirs(self) -> None:
        """Directories under repositories/ holding nothing at all (a crash between moving a
        repository and removing its empty parent leaves one), older than the grace:
        removed, deepest first. A directory is empty when every entry the walk found in
        it is such a directory (`Inventory.name_dirs`: listing the namespace tree again
        here was a tenth of the plan at 300k files); the apply looks again before each
        removal (`remove_empty_dirs`)."""
        holds = self.inv.name_dirs
        removable_below: dict[str, int] = {}
        # Children before their parent, siblings by name: the order a depth-first walk
        # of the sorted listings meets them when it leaves them.
        for path in sorted(holds, key=lambda p: [*((0, part) for part in p.split("/")), (1, "")]):
            if removable_below.get(path, 0) != holds[path]:
                continue
            mtime = self._mtime(path)
            if mtime is None or mtime > self.cutoff_ns:
                continue
            self.plan.empty_dirs.append(path)
            self.plan.empty_link_dirs.append(path)
            parent = path.rpartition("/")[0]
            removable_below[parent] = removable_below.get(parent, 0) + 1

    def finish(self) -> None:
        """Order the removals and drop any nested in another one (moved with it)."""
        first: dict[str, Removal] = {}  # by path: the first planned there
        for removal in self.removals:
            first.setdefault(removal.path, removal)
        # Nested in another removal: a proper prefix of its path is one (if that one is
        # itself nested, so is this: one table answers both).
        chosen = [removal for path, removal in first.items()
                  if not any("/".join(parts[:i]) in first
                             for parts in (path.split("/"),) for i in range(1, len(parts)))]
        order = {phase: i for i, phase in enumerate(("tags", "manifests", "repositories",
                                                      "layer_links", "blobs", "uploads"))}
        # Within a phase, what refers goes before what is referred to: a tag's history entry
        # before the revision it names, so a crash in between leaves nothing dangling.
        # (Three stable sorts on one key each: one by a tuple made a tuple per removal,
        # the top of the plan's memory at 1M files.)
        chosen.sort(key=attrgetter("path"))
        chosen.sort(key=lambda r: f"/{layout.TAGS}/" not in r.path)
        chosen.sort(key=lambda r: order[r.phase])
        self.plan = replace(self.plan, removal_list=chosen,
                            empty_dirs=sorted(set(self.plan.empty_dirs)))


def plan_from_inventory(inv: Inventory, store: ManifestStore, storage: Storage,
                        options: GcOptions, *, now: datetime,
                        findings: Sequence[Finding] | None = None,
                        for_apply: bool = False) -> GcPlan:
    """The sweep plan for one scan (pure judgement: reads only manifests and mtimes, and
    the deferred `_layers` links the plan could act on, and inside the blob directories
    a dry run only listed, its manifests and victims: see `plan_gc`).

    `for_apply`: the plan will be applied, so it records every link it saw (`seen_links`,
    what the apply's re-checks compare with; a plan without them would have every link
    count as new, and keep what they name). A plan only shown does without (memory)."""
    if options.delete_untagged and not inv.tag_history:
        raise ValueError("--delete-untagged needs the tags' history: scan with tag_history")
    # Every manifest a revision or tag names is looked at before anything is judged (its
    # size and kind decide how it is read and whether the plan is blocked).
    settle_blobs(storage, inv, _manifest_candidates(inv))
    # A link whose blob is not stored may be an alias the mark follows: read before marking.
    stored = inv.blobs.digests()
    read_deferred_layers(storage, inv, lambda digests: [d for d in digests if d not in stored])
    release_freed_memory()  # the candidates' tables (see below)
    while True:
        seen = len(inv.anomalies)
        marks = mark(inv, store, options.delete_untagged)
        # The victims: what their directories hold decides whether and what the plan
        # removes; damage found there (or in a manifest the mark met late) is part of the
        # tree the mark must know (a symbolic link makes it keep everything): mark again.
        settle_blobs(storage, inv, marks.blobs.not_kept(inv.blobs))
        if len(inv.anomalies) == seen:
            break
        store.anomalies_added()
    read_deferred_layers(storage, inv, marks.blobs.not_kept)
    if findings is None:
        findings = TreeChecker(inv, store, now=now, blocking_only=True).run()
    # The mark's and the checks' tables are freed; what the plan allocates from here on
    # (its victims: small objects in pymalloc's arenas) cannot use the pages they leave in
    # malloc's heap, which stay resident unless handed back (at 1M files, 5-8 MB).
    release_freed_memory()
    planner = _Planner(inv, store, storage, options, now)
    planner.plan = replace(planner.plan,
                           blocked=blocking_findings(findings, options.delete_untagged),
                           orphan_referrers=marks.orphan_referrers)
    gone_manifests = planner.manifests(marks)
    gone_links = planner.layer_links(marks)
    planner.blobs(marks)
    gone_uploads = planner.uploads()
    planner.tag_dirs(gone_manifests)
    planner.repositories(gone_manifests, gone_links, gone_uploads)
    planner.empty_link_dirs()
    planner.empty_name_dirs()
    planner.finish()
    return replace(planner.plan, seen_links=seen_links(inv)) if for_apply else planner.plan


def plan_gc(root: RegistryRoot, options: GcOptions, *, now: datetime | None = None,
            depth: Depth = Depth.STAT) -> GcPlan:
    """Scan the tree and plan a collection (nothing is changed).

    Depth.STAT (`gc --apply`): the scan only lstat's `_layers/sha256/<hex>/link` files (a
    symbolic link, a missing or odd file is still found): most of them name a blob some
    manifest keeps, and the plan never acts on such a link, whatever it holds. The content
    of the others (blob not stored, or not kept by the mark) is read before the plan judges
    them. The one difference from reading them all: a damaged link (content naming another
    digest) at the path of a kept blob is kept; `verify` reports it.

    Depth.LIST (the dry run): neither those links nor the `data` of blobs are looked at
    until the plan needs them (`scanner.Depth`): every manifest and every victim is, so
    the victims and every finding about them, their manifests and the mark are the same;
    not seen is what sits inside the directory of a blob or layer link the plan keeps (a
    symbolic link planted there blocks `--apply`, which walks at STAT, not the dry run).

    Without `--delete-untagged` (both depths) the tags' history is not read: every
    revision is a root, so it decides nothing, and its damage does not block
    (`findings.blocks_gc`)."""
    storage = open_storage(root)
    inv = Scanner(storage, root, depth=depth, tag_history=options.delete_untagged).scan()
    store = ManifestStore(storage, inv)
    return plan_from_inventory(inv, store, storage, options, now=now or datetime.now(UTC),
                               for_apply=depth is not Depth.LIST)


def _manifest_candidates(inv: Inventory) -> list[str]:
    """Every digest a revision or tag link of the tree names, by path or content: the
    manifests the checks and the mark read."""
    found: dict[str, None] = {}
    for repo in inv.repositories.values():
        for links in (repo.revisions, *(tag.index for tag in repo.tags.values())):
            found.update(dict.fromkeys(links.named()))
        for tag in repo.tags.values():
            if tag.current is not None and tag.current.target is not None:
                found[tag.current.target] = None
    return list(found)


# --------------------------------------------------------------------------- revalidation
#
# Between the plan and each move a registry (started despite the refusal, or one regfsck
# could not see) may push. A push writes, in order: the blob (kept as it is when the
# bytes exist: its mtime does not change), the layer link `_layers/<alg>/<hex>/link`
# (creating its directory), then the manifest's revision directory and the tag. Every one
# of those creates a directory entry, so it changes the mtime of a directory regfsck can
# stat: a repository's `_layers/<alg>` or `_manifests/revisions/<alg>`, `tags` and the
# repository's own and its parents' directories (a new repository). The fingerprint is
# those mtimes; it is compared before every batch of blob moves, and any difference means
# a fresh scan and mark, in which every link or revision the plan did not see keeps what
# it names.

STABLE_TRIES = 3
CLOCK_SLACK_NS = 50_000_000  # file times come from a coarse clock, a few ms behind
Fingerprint = dict[str, int | None]


def _fingerprint_paths(inv: Inventory, delete_untagged: bool) -> list[str]:
    """The directories a push must change: per repository its own directory (and those of
    its namespace: a new repository), and each `_layers/<alg>` and `_manifests/revisions/<alg>`
    (their parents too where it has no sha256 one yet: a push always writes the sha256
    link, whatever other digest it also links)."""
    paths = {layout.REPOSITORIES}
    for repo in inv.repositories.values():
        parts = repo.path.split("/")
        paths.update("/".join(parts[:depth]) for depth in range(2, len(parts) + 1))
        layers = layout.join(repo.path, layout.LAYERS_DIR)
        revisions = layout.join(repo.path, layout.MANIFESTS_DIR, layout.REVISIONS)
        for parent, digests in ((layers, repo.layers), (revisions, repo.revisions)):
            algs = {d.partition(":")[0] for d in digests}
            if "sha256" not in algs:  # the registry links every blob by its sha256 too
                paths.add(parent)
            paths.update(layout.join(parent, alg) for alg in algs | {"sha256"})
        if delete_untagged:  # which tag names which manifest decides what is kept
            paths.add(layout.join(repo.path, layout.MANIFESTS_DIR, layout.TAGS))
            for tag in repo.tags.values():
                current = layout.join(tag.path, layout.CURRENT)
                paths.update((current, layout.join(current, layout.LINK)))
    return sorted(paths)


def _fingerprint(storage: Storage, paths: Iterable[str]) -> Fingerprint:
    result: Fingerprint = {}
    for path in paths:
        st = storage.stat(path)
        result[path] = st.mtime_ns if st is not None else None
    return result


class SeenLinks:
    """A set of link paths (`<alg dir>/<hex>/link`) kept as digests per directory: one
    string per directory instead of one per link (a plan holds every link of the tree),
    and the digests of a directory as one sorted tuple (the inventory's own strings: a
    pointer per link) where it has them all at once."""

    def __init__(self) -> None:
        self._sorted: dict[str, tuple[str, ...]] = {}
        self._by_dir: dict[str, set[str]] = {}

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        """(`<alg dir>`, `alg:hex`) of `<alg dir>/<hex>/link`."""
        alg_dir, _, hex_part = path.removesuffix("/" + layout.LINK).rpartition("/")
        return alg_dir, f"{alg_dir.rpartition('/')[2]}:{hex_part}"

    def add(self, path: str, digest: str | None = None) -> None:
        """Add a link path; `digest`: the `alg:hex` its path names, if at hand (its
        string is shared with the inventory's)."""
        alg_dir, named = self._split(path)
        self._by_dir.setdefault(alg_dir, set()).add(digest if digest == named else named)

    def add_links(self, links: LinkMap) -> None:
        """Add every link of `links`."""
        plain = links.plain()
        start = 0
        while start < len(plain):  # sorted: one run of digests per algorithm
            alg = plain[start].partition(":")[0]
            end = bisect_left(plain, alg + ";", start)  # ';' follows ':'
            alg_dir = f"{links.base}/{alg}"
            run = tuple(plain[start:end])
            old = self._sorted.get(alg_dir)
            self._sorted[alg_dir] = run if old is None else tuple(sorted({*old, *run}))
            start = end
        for digest, link in links.odd().items():
            self.add(link.path, digest)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str) or not path.endswith("/" + layout.LINK):
            return False
        alg_dir, named = self._split(path)
        run = self._sorted.get(alg_dir, ())
        i = bisect_left(run, named)
        return (i < len(run) and run[i] == named) or named in self._by_dir.get(alg_dir, ())

    def __len__(self) -> int:
        return len({(d, n) for d, names in self._sorted.items() for n in names}
                   | {(d, n) for d, names in self._by_dir.items() for n in names})


def seen_links(inv: Inventory) -> SeenLinks:
    """Layer and revision links the plan saw: any other one found later was written since."""
    seen = SeenLinks()
    for repo in inv.repositories.values():
        seen.add_links(repo.layers)
        seen.add_links(repo.revisions)
    return seen


def _moved_links(plan: GcPlan) -> Callable[[str], bool]:
    """Is this link inside something the plan moves before the blob phase? Found again in
    the blob phase, it was written again after gc moved it (or gc left it: kept anyway)."""
    moved = {r.path for r in plan.removal_list
             if r.phase in ("manifests", "repositories", "layer_links")}

    def inside(path: str) -> bool:
        parts = path.split("/")
        return any("/".join(parts[:depth]) in moved for depth in range(2, len(parts)))
    return inside


@dataclass
class _Fresh:
    """One re-scan and mark, with what links and revisions the plan did not see keep."""

    inv: Inventory
    marks: Marks
    keep: set[str]  # digests a link or revision newer than the plan names or reaches
    paths: list[str]
    seen: Fingerprint
    stable: bool


def _fresh(root: RegistryRoot, storage: Storage, plan: GcPlan,
           previous: Inventory | None, blob_phase: bool) -> _Fresh:
    """Scan and mark again until no repository changed during the scan (a few tries)."""
    delete_untagged = plan.options.delete_untagged
    moved = _moved_links(plan) if blob_phase else (lambda path: False)

    def new(path: str) -> bool:
        return path not in plan.seen_links or moved(path)

    fresh: _Fresh | None = None
    for _ in range(STABLE_TRIES):
        prev_paths = _fingerprint_paths(previous, delete_untagged) if previous else [layout.REPOSITORIES]
        before = _fingerprint(storage, prev_paths)
        started_ns = time.time_ns() - CLOCK_SLACK_NS
        inv = Scanner(storage, root, tag_history=delete_untagged).scan()  # as `plan_gc`'s
        store = ManifestStore(storage, inv)
        marks = mark(inv, store, delete_untagged)
        paths = _fingerprint_paths(inv, delete_untagged)
        seen = _fingerprint(storage, paths)
        stable = _fingerprint(storage, prev_paths) == before and not any(
            mtime is not None and mtime >= started_ns for path, mtime in seen.items()
            if path not in before)
        keep: set[str] = set()
        new_revisions: set[str] = set()
        for repo in inv.repositories.values():
            for digest, link in repo.layers.items():
                if new(link.path):
                    keep.add(digest)
                    if link.target is not None:
                        keep.add(link.target)
            for digest, link in repo.revisions.items():
                if new(link.path):
                    new_revisions.add(digest)
                    if link.target is not None:
                        new_revisions.add(link.target)
        keep |= reachable(store, new_revisions)
        fresh = _Fresh(inv, marks, keep, paths, seen, stable)
        if stable:
            break
        previous = inv
    assert fresh is not None
    return fresh


def revalidator(root: RegistryRoot, plan: GcPlan) -> Revalidate:
    """A `sweep.Revalidate`: before manifests, layer links and blobs move, mark again from a
    fresh scan and refuse every victim the fresh marks keep, or that a link or revision the
    plan did not see names or reaches (a push since the plan).

    One fresh mark serves the manifest and layer-link phases; the blob phase, the one that
    frees data, gets its own, taken right before it, and before each batch of blob moves
    the repositories' fingerprint is compared with it: any change means a new fresh mark."""
    storage = open_storage(root)
    fresh: dict[str, _Fresh] = {}

    def current(phase: str) -> _Fresh:
        key = "blobs" if phase == "blobs" else "links"
        known = fresh.get(key)
        if known is None:
            previous = fresh["links"].inv if "links" in fresh else None
            # Object storage answers from one listing: a fresh mark needs a fresh listing.
            source = open_storage(root) if root.is_object_storage else storage
            known = fresh[key] = _fresh(root, source, plan, previous, key == "blobs")
        elif key == "blobs" and not root.is_object_storage \
                and _fingerprint(storage, known.paths) != known.seen:
            # (object storage: a fingerprint would be a listing of every repository per
            # batch; there the registry check between batches is what sees a writer)
            known = fresh[key] = _fresh(root, storage, plan, known.inv, True)
        return known

    def revalidate(phase: str, items: Sequence[Removal]) -> dict[str, str]:
        if phase not in ("manifests", "repositories", "layer_links", "blobs"):
            return {}
        state = current(phase)
        inv, marks = state.inv, state.marks
        refused: dict[str, str] = {}
        why = "referenced again (kept by a fresh mark)"
        newer = "a link or manifest written since the plan uses it"
        for item in items:
            if not state.stable:
                refused[item.path] = "the repositories kept changing while gc re-checked them"
                continue
            if phase == "blobs":
                digest = layout.blob_dir_digest(item.path)
                if digest in marks.blobs:
                    refused[item.path] = why
                elif digest in state.keep:
                    refused[item.path] = newer
                continue
            if phase == "repositories":
                name = item.path.removeprefix(layout.REPOSITORIES + "/")
                for part in (layout.LAYERS_DIR, layout.MANIFESTS_DIR, layout.UPLOADS_DIR):
                    name = name.removesuffix("/" + part)
                repo = inv.repositories.get(name)
                if repo is not None and (repo.tags or marks.kept_manifests.get(name)):
                    refused[item.path] = "no longer empty (a fresh scan finds content)"
                continue
            repo_name, digest = layout.link_dir_owner(item.path)
            if phase == "manifests" and digest in marks.kept_manifests.get(repo_name, set()):
                refused[item.path] = why
            elif phase == "layer_links":
                link = (inv.repositories[repo_name].layers.get(digest)
                        if repo_name in inv.repositories else None)
                if link is not None and link.target in marks.blobs:
                    refused[item.path] = why
                elif link is not None and link.target in state.keep:
                    refused[item.path] = newer
        return refused
    return revalidate
