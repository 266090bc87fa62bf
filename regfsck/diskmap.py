"""Where the disk went: scan's usage broken down to tags, and what gc would reclaim in both
modes, as plain data for `scan --html` (judging only: nothing here writes).

Each repository's bytes (the blobs it uses, as in `usage.repo_blobs`) are split into parts
that add up to them, so a treemap drawn from them is honest:

- `tag:<name>`: blobs only this tag's image needs, in the whole registry (removing the tag
  and `gc --delete-untagged` would free them),
- `tags`: blobs several tags of this repository need, and no other repository,
- `shared`: blobs other repositories use too (counted in each: the dedup),
- `untagged`: blobs only untagged manifests or `_layers` links of this repository keep.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from regfsck.gc import GcOptions, GcPlan, plan_from_inventory
from regfsck.graph import ManifestStore, reachable
from regfsck.inventory import Inventory
from regfsck.storage import Storage
from regfsck.usage import ScanReport, UploadInfo, build_scan_report, repo_blobs


@dataclass(frozen=True)
class ImageUse:
    """One tagged image: every blob its manifest reaches (itself, config, layers, children)."""

    repo: str
    tags: tuple[str, ...]
    digest: str
    bytes: int
    only_bytes: int  # blobs no other tag of any repository needs


@dataclass(frozen=True)
class Part:
    kind: str  # "tag", "tags", "shared", "untagged"
    label: str
    bytes: int


@dataclass(frozen=True)
class RepoMap:
    name: str
    unique_bytes: int
    shared_bytes: int
    manifests: int
    images: tuple[ImageUse, ...]
    parts: tuple[Part, ...]  # add up to unique_bytes + shared_bytes


@dataclass(frozen=True)
class GcOutlook:
    mode: str  # "default" or "delete_untagged"
    plan: GcPlan


@dataclass(frozen=True)
class DiskMap:
    scan: ScanReport
    repos: tuple[RepoMap, ...]
    images: tuple[ImageUse, ...]  # largest first
    gc: tuple[GcOutlook, ...]
    stale_uploads: tuple[UploadInfo, ...] = field(default=())


def build_disk_map(inv: Inventory, storage: Storage, now: datetime) -> DiskMap:
    store = ManifestStore(storage, inv)
    scan = build_scan_report(inv, store, now)
    sizes = {d: b.size for d, b in inv.blobs.items()}
    used_by_repo = {name: repo_blobs(store, repo) for name, repo in inv.repositories.items()}
    repo_users: Counter[str] = Counter()
    for used in used_by_repo.values():
        repo_users.update(used)

    # Per tagged image (a digest tagged several times is one image with several tags).
    image_blobs: dict[tuple[str, str], set[str]] = {}
    image_tags: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, repo in inv.repositories.items():
        for tag, digest in sorted(repo.tag_targets().items()):
            key = (name, digest)
            if key not in image_blobs:
                image_blobs[key] = {d for d in reachable(store, [digest]) if d in sizes}
            image_tags[key].append(tag)
    image_users: Counter[str] = Counter()
    for blobs in image_blobs.values():
        image_users.update(blobs)

    images: dict[str, list[ImageUse]] = defaultdict(list)
    for (name, digest), blobs in image_blobs.items():
        images[name].append(ImageUse(
            repo=name, tags=tuple(image_tags[(name, digest)]), digest=digest,
            bytes=sum(sizes[d] for d in blobs),
            only_bytes=sum(sizes[d] for d in blobs if image_users[d] == 1)))

    repos: list[RepoMap] = []
    usage = {u.name: u for u in scan.repositories}
    for name in sorted(inv.repositories):
        used = used_by_repo[name]
        tagged_here: Counter[str] = Counter()
        owner: dict[str, str] = {}
        for (image_repo, digest), blobs in image_blobs.items():
            if image_repo != name:
                continue
            tagged_here.update(blobs)
            for d in blobs:
                owner[d] = ", ".join(image_tags[(image_repo, digest)])
        by_tag: Counter[str] = Counter()
        tags_shared = shared = untagged = 0
        for d in used:
            size = sizes[d]
            if repo_users[d] > 1:
                shared += size
            elif tagged_here[d] == 0:
                untagged += size
            elif tagged_here[d] == 1:
                by_tag[owner[d]] += size
            else:
                tags_shared += size
        parts = [Part("tag", tag, n) for tag, n in sorted(by_tag.items(), key=lambda i: -i[1])]
        parts += [p for p in (Part("tags", "shared by tags of this repository", tags_shared),
                              Part("shared", "shared with other repositories", shared),
                              Part("untagged", "only untagged manifests / layer links", untagged))
                  if p.bytes]
        repos.append(RepoMap(
            name=name, unique_bytes=usage[name].unique_bytes, shared_bytes=usage[name].shared_bytes,
            manifests=len(usage[name].manifests),
            images=tuple(sorted(images[name], key=lambda i: (-i.bytes, i.tags))),
            parts=tuple(parts)))

    outlooks = tuple(
        GcOutlook(mode, plan_from_inventory(inv, store, storage, GcOptions(delete_untagged=untag),
                                            now=now))
        for mode, untag in (("default", False), ("delete_untagged", True)))
    largest = sorted((i for group in images.values() for i in group),
                     key=lambda i: (-i.bytes, i.repo, i.tags))
    return DiskMap(scan=scan, repos=tuple(repos), images=tuple(largest), gc=outlooks,
                   stale_uploads=tuple(u for u in scan.uploads if u.stale))
