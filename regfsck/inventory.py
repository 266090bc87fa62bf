"""Plain data describing what a scan of the tree found (facts, no judgement).

Digests are kept as their `alg:hex` strings; every digest stored in a dict key here was
parsed from a path component and is valid. Link contents are parsed strictly; the raw
bytes are kept only when they are not a valid digest, so findings can show them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from regfsck.root import RegistryRoot


@dataclass(slots=True)
class Link:
    """A `link` file: where it is, and the digest it holds (or why it holds none)."""

    path: str
    target: str | None  # parsed digest content; None when invalid or unreadable
    error: str | None = None  # why the content is not a digest / could not be read
    raw: bytes | None = None  # the content, only when invalid
    mtime_ns: int = 0


@dataclass(slots=True)
class Blob:
    """A `blobs/<alg>/<xx>/<hex>/data` file."""

    digest: str
    path: str
    size: int
    mtime_ns: int
    ctime_ns: int = 0
    inode: int = 0


@dataclass(slots=True)
class Tag:
    name: str
    path: str
    current: Link | None
    index: dict[str, Link] = field(default_factory=dict)  # path digest -> link
    mtime_ns: int = 0


@dataclass(slots=True)
class Upload:
    repo: str
    id: str
    path: str
    started_at: datetime | None
    startedat_raw: bytes | None  # content of `startedat`, None when the file is absent
    size: int  # data + hash states
    mtime_ns: int
    hashstates: list[str] = field(default_factory=list)  # "<alg>/<offset>" names


@dataclass(slots=True)
class Repository:
    name: str
    path: str
    has_manifests: bool = False
    has_layers: bool = False
    revisions: dict[str, Link] = field(default_factory=dict)  # path digest -> link
    layers: dict[str, Link] = field(default_factory=dict)  # path digest -> link
    tags: dict[str, Tag] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)
    mtime_ns: int = 0

    def tag_targets(self) -> dict[str, str]:
        """Tags whose `current` link holds a valid digest, with that digest."""
        return {
            name: tag.current.target
            for name, tag in self.tags.items()
            if tag.current is not None and tag.current.target is not None
        }


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Something structurally out of place seen during the walk; `kind` is a finding kind."""

    kind: str
    path: str
    detail: str = ""
    repo: str | None = None
    digest: str | None = None
    tag: str | None = None


@dataclass
class Inventory:
    root: RegistryRoot
    blobs: dict[str, Blob] = field(default_factory=dict)
    misplaced_blobs: list[Blob] = field(default_factory=list)  # under a wrong fan-out dir
    repositories: dict[str, Repository] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)
    files_seen: int = 0
    dirs_seen: int = 0

    @property
    def blob_bytes(self) -> int:
        return sum(b.size for b in self.blobs.values())

    def uploads(self) -> list[Upload]:
        return [u for repo in self.repositories.values() for u in repo.uploads]
