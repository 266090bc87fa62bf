"""Scan's report: what the tree holds and who uses the disk (unique vs shared bytes)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from regfsck.artifacts import KINDS, classify
from regfsck.checks import DEFAULT_UPLOAD_AGE, linked_layers, valid_revisions
from regfsck.document import Document
from regfsck.graph import ManifestStore, reachable
from regfsck.inventory import Inventory, Repository


@dataclass
class ObjectInfo(Document):
    """One manifest revision as an operator names it: image, index, signature, attestation,
    sbom, artifact (with its artifactType) or referrers index, and what it attaches to."""

    digest: str
    kind: str
    artifact_type: str | None
    subject: str | None
    subject_via: str | None  # "subject" field or cosign "tag" convention
    tags: list[str]


@dataclass
class RepoUsage:
    name: str
    tags: dict[str, str]
    manifests: list[str]
    layer_links: int
    unique_bytes: int
    shared_bytes: int
    uploads: int
    objects: list[ObjectInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "objects": [o.to_json() for o in self.objects]}


@dataclass
class UploadInfo(Document):
    repo: str
    id: str
    size: int
    started_at: str | None
    stale: bool


@dataclass
class ScanReport:
    repositories: list[RepoUsage] = field(default_factory=list)
    blob_count: int = 0
    blob_bytes: int = 0
    referenced_bytes_logical: int = 0  # sum over repositories of the bytes each uses
    unreferenced_count: int = 0
    unreferenced_bytes: int = 0
    uploads: list[UploadInfo] = field(default_factory=list)
    files_seen: int = 0
    anomalies: int = 0

    def kind_counts(self) -> dict[str, int]:
        """Manifest revisions per kind (image, index, signature, ...), every kind listed."""
        counts = dict.fromkeys(KINDS, 0)
        for repo in self.repositories:
            for obj in repo.objects:
                counts[obj.kind] = counts.get(obj.kind, 0) + 1
        return counts

    @property
    def dedup_ratio(self) -> float:
        used = self.blob_bytes - self.unreferenced_bytes
        return self.referenced_bytes_logical / used if used else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "repositories": [r.to_json() for r in self.repositories],
            "blobs": {"count": self.blob_count, "bytes": self.blob_bytes},
            "unreferenced_blobs": {"count": self.unreferenced_count,
                                   "bytes": self.unreferenced_bytes},
            "uploads": [u.to_json() for u in self.uploads],
            "stale_uploads": {"count": sum(1 for u in self.uploads if u.stale),
                              "bytes": sum(u.size for u in self.uploads if u.stale)},
            "dedup_ratio": round(self.dedup_ratio, 4),
            "kinds": self.kind_counts(),
            "files_seen": self.files_seen,
            "anomalies": self.anomalies,
        }


def repo_blobs(store: ManifestStore, repo: Repository) -> set[str]:
    """Blobs a repository uses: reachable from its manifests, or linked in `_layers`."""
    used = reachable(store, valid_revisions(repo))
    used |= linked_layers(repo)
    return {d for d in used if d in store.inventory.blobs}


def repo_objects(store: ManifestStore, repo: Repository) -> list[ObjectInfo]:
    """Every readable manifest revision of a repository, classified (see artifacts.py)."""
    tags_of: dict[str, list[str]] = {}
    for tag, target in sorted(repo.tag_targets().items()):
        tags_of.setdefault(target, []).append(tag)
    objects = []
    for digest in sorted(valid_revisions(repo)):
        manifest = store.get(digest)
        if manifest is None:
            continue  # verify reports why it cannot be read
        found = classify(manifest, tags_of.get(digest, ()))
        objects.append(ObjectInfo(digest, found.kind, found.artifact_type, found.subject,
                                  found.subject_via, tags_of.get(digest, [])))
    return objects


def build_scan_report(inv: Inventory, store: ManifestStore, now: datetime,
                      upload_age: timedelta = DEFAULT_UPLOAD_AGE) -> ScanReport:
    report = ScanReport(blob_count=len(inv.blobs), blob_bytes=inv.blob_bytes,
                        files_seen=inv.files_seen, anomalies=len(inv.anomalies))
    used_by: dict[str, set[str]] = {name: repo_blobs(store, repo)
                                    for name, repo in inv.repositories.items()}
    users: Counter[str] = Counter()
    for used in used_by.values():
        users.update(used)
    manifest_reachable = reachable(store, {d for repo in inv.repositories.values()
                                           for d in valid_revisions(repo)})
    unreferenced = [b for d, b in inv.blobs.items() if d not in manifest_reachable]
    report.unreferenced_count = len(unreferenced)
    report.unreferenced_bytes = sum(b.size for b in unreferenced)
    for name, repo in sorted(inv.repositories.items()):
        unique = shared = 0
        for digest in used_by[name]:
            size = inv.blobs[digest].size
            if users[digest] == 1:
                unique += size
            else:
                shared += size
        report.referenced_bytes_logical += unique + shared
        report.repositories.append(RepoUsage(
            name=name, tags=repo.tag_targets(), manifests=sorted(valid_revisions(repo)),
            layer_links=len(repo.layers), unique_bytes=unique, shared_bytes=shared,
            uploads=len(repo.uploads), objects=repo_objects(store, repo)))
    for upload in inv.uploads():
        stale = upload.started_at is None or now - upload.started_at > upload_age
        report.uploads.append(UploadInfo(
            upload.repo, upload.id, upload.size,
            upload.started_at.isoformat() if upload.started_at else None, stale))
    return report
