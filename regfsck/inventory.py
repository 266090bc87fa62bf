"""Plain data describing what a scan of the tree found (facts, no judgement).

Digests are kept as their `alg:hex` strings; every digest stored in a dict key here was
parsed from a path component and is valid. Link contents are parsed strictly; the raw
bytes are kept only when they are not a valid digest, so findings can show them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from regfsck.root import RegistryRoot


class Link:
    """A `link` file: where it is, and the digest it holds (or why it holds none).

    A registry holds millions of these, so a link found where a directory listing put it
    (`<dir>/<hex>/link`) keeps its directory string, shared by every link there, and its
    digest, and makes its path when asked: no path string per link (memory, issue 15)."""

    __slots__ = ("_digest", "_where", "error", "mtime_ns", "raw", "target")

    def __init__(self, path: str, target: str | None, error: str | None = None,
                 raw: bytes | None = None, mtime_ns: int = 0) -> None:
        self._where = path
        self._digest: str | None = None
        self.target = target  # parsed digest content; None when invalid or unreadable
        self.error = error  # why the content is not a digest / could not be read
        self.raw = raw  # the content, only when invalid
        self.mtime_ns = mtime_ns

    @classmethod
    def listed(cls, alg_dir: str, digest: str, target: str | None) -> Link:
        """The link `<alg_dir>/<hex of digest>/link` (alg_dir shared by its neighbours)."""
        link = cls.__new__(cls)
        link._where = alg_dir
        link._digest = digest
        link.target = target
        link.error = None
        link.raw = None
        link.mtime_ns = 0
        return link

    @property
    def path(self) -> str:
        if self._digest is None:
            return self._where
        return f"{self._where}/{self._digest.partition(':')[2]}/link"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Link):
            return NotImplemented
        return (self.path, self.target, self.error, self.raw, self.mtime_ns) == (
            other.path, other.target, other.error, other.raw, other.mtime_ns)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return (f"Link(path={self.path!r}, target={self.target!r}, error={self.error!r}, "
                f"raw={self.raw!r}, mtime_ns={self.mtime_ns!r})")


class Blob:
    """A `blobs/<alg>/<xx>/<hex>/data` file.

    Its path is made from the digest when asked (one string fewer per blob); only a blob
    found elsewhere (a wrong fan-out directory) keeps the path it was found at."""

    __slots__ = ("_path", "ctime_ns", "digest", "inode", "mtime_ns", "size")

    def __init__(self, digest: str, path: str | None, size: int, mtime_ns: int,
                 ctime_ns: int = 0, inode: int = 0) -> None:
        self.digest = digest
        self._path = None if path is None or path == _blob_data(digest) else path
        self.size = size
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.inode = inode

    @property
    def path(self) -> str:
        return self._path if self._path is not None else _blob_data(self.digest)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Blob):
            return NotImplemented
        return (self.digest, self.path, self.size, self.mtime_ns, self.ctime_ns, self.inode) == (
            other.digest, other.path, other.size, other.mtime_ns, other.ctime_ns, other.inode)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Blob(digest={self.digest!r}, path={self.path!r}, size={self.size!r}, "
                f"mtime_ns={self.mtime_ns!r}, ctime_ns={self.ctime_ns!r}, inode={self.inode!r})")


def _blob_data(digest: str) -> str:
    """`blobs/<alg>/<xx>/<hex>/data` (layout.blob_data without its checks: the digest
    came from the path the scan walked)."""
    alg, _, hex_part = digest.partition(":")
    return f"blobs/{alg}/{hex_part[:2]}/{hex_part}/data"


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
    # The `_layers/sha256` links were only lstat'ed (gc's plan): their targets are the
    # digests their paths name until `scanner.read_deferred_layers` reads them.
    layers_unread: bool = False

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
    # Manifests the walk's worker processes read (revision links' digests): digest ->
    # (bytes read, Manifest or Unloadable), taken once by the ManifestStore when the size
    # read is the blob's. A cache, not a fact about the tree.
    manifests: dict[str, tuple[int, Any]] = field(default_factory=dict, compare=False,
                                                  repr=False)

    @property
    def blob_bytes(self) -> int:
        return sum(b.size for b in self.blobs.values())

    def uploads(self) -> list[Upload]:
        return [u for repo in self.repositories.values() for u in repo.uploads]
