"""Plain data describing what a scan of the tree found (facts, no judgement).

Digests are kept as their `alg:hex` strings; every digest stored in a dict key here was
parsed from a path component and is valid. Link contents are parsed strictly; the raw
bytes are kept only when they are not a valid digest, so findings can show them.

A registry holds millions of blobs and links, so the inventory keeps them as tables, not
one Python object each (memory, issue 15): `BlobTable` holds a blob's four numbers in one
`array('q')` row and `LinkMap` holds the links that say what their path names (nearly
all of them) as one sorted list of digest strings (shared with the blobs'). Both are
mappings that make the `Blob` or `Link` object when asked, so every command reads them
as it read the dicts they replace.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import (
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    Sequence,
    ValuesView,
)
from dataclasses import dataclass, field
from datetime import datetime
from heapq import merge
from sys import intern
from typing import Any, TypeVar

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

    @classmethod
    def current_of(cls, tag_path: str, target: str) -> Link:
        """The link `<tag_path>/current/link` holding `target` (tag_path shared with its
        Tag)."""
        link = cls.__new__(cls)
        link._where = tag_path
        link._digest = ""
        link.target = target
        link.error = None
        link.raw = None
        link.mtime_ns = 0
        return link

    @property
    def path(self) -> str:
        digest = self._digest
        if digest is None:
            return self._where
        if not digest:
            return f"{self._where}/current/link"
        return f"{self._where}/{digest.partition(':')[2]}/link"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Link):
            return NotImplemented
        return (self.path, self.target, self.error, self.raw, self.mtime_ns) == (
            other.path, other.target, other.error, other.raw, other.mtime_ns)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return (f"Link(path={self.path!r}, target={self.target!r}, error={self.error!r}, "
                f"raw={self.raw!r}, mtime_ns={self.mtime_ns!r})")


UNSTATED = -1  # the size of a blob known by its directory's name only (scanner.Depth.LIST)


class Blob:
    """A `blobs/<alg>/<xx>/<hex>/data` file.

    `size` is UNSTATED (and the times 0) for a blob gc's dry run listed but never looked
    inside (`scanner.settle_blobs` fills it in where the plan needs it).

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


def _listed_path(base: str, digest: str) -> str:
    alg, _, hex_part = digest.partition(":")
    return f"{base}/{alg}/{hex_part}/link"


_V = TypeVar("_V")


class _CompactTable(MutableMapping[str, _V]):
    """A mapping kept packed (LinkMap, BlobTable): items() and values() build each object
    once from the packed rows, instead of Mapping's default views, which look every key
    up again."""

    def _iter_items(self) -> Iterator[tuple[str, _V]]:
        raise NotImplementedError

    def items(self) -> ItemsView[str, _V]:
        return _Items(self)

    def values(self) -> ValuesView[_V]:
        return _Values(self)


class LinkMap(_CompactTable[Link]):
    """The links under one directory (`<base>/<alg>/<hex>/link`), by the digest their
    path names: a mapping of digest -> `Link`, kept compact.

    A link holding exactly the digest its path names (the normal case) is only its digest,
    in one sorted list (a pointer per link; the string is shared with the blob table's);
    any other link (damaged, unreadable, found elsewhere) is kept as its `Link` object.
    Iteration is in digest order, the order the walk lists them in."""

    __slots__ = ("_odd", "_parent", "_plain", "_sub")

    def __init__(self, base: str,
                 links: Mapping[str, Link] | Iterable[tuple[str, Link]] = (), *,
                 sub: str = "") -> None:
        # The directory is `<base>/<sub>` (`sub`: a constant such as "index"): the map
        # shares its owner's path string instead of making one more per tag.
        self._parent = base
        self._sub = sub
        self._plain: list[str] = []
        self._odd: dict[str, Link] | None = None
        if links:
            for digest, link in (links.items() if isinstance(links, Mapping) else links):
                self[digest] = link

    @property
    def base(self) -> str:
        return f"{self._parent}/{self._sub}" if self._sub else self._parent

    def settle(self, parent: str, sub: str) -> bool:
        """Make this map the one of `<parent>/<sub>` if it is already, or still empty (an
        owner's default: no second map per owner); False: it holds links elsewhere."""
        if self._parent == parent and self._sub == sub:
            return True
        if self._plain or self._odd:
            return self.base == f"{parent}/{sub}"
        self._parent = parent
        self._sub = sub
        return True

    def add_listed(self, digest: str) -> None:
        """Add the link `<base>/<alg>/<hex of digest>/link` holding `digest` (the walk,
        which lists them in order: appended)."""
        plain = self._plain
        if self._odd is not None:
            self._odd.pop(digest, None)
        if not plain or plain[-1] < digest:
            plain.append(digest)
            return
        i = bisect_left(plain, digest)
        if i == len(plain) or plain[i] != digest:
            plain.insert(i, digest)

    def extend_listed(self, digests: list[str]) -> None:
        """`add_listed` of each of `digests` (sorted, as a directory listing gives them): an
        empty map (the usual case, one directory per map) takes the list as it is."""
        if not self._plain and not self._odd and digests == sorted(digests) and (
                len(set(digests)) == len(digests)):  # both checks at C speed
            self._plain = digests
            return
        for digest in digests:
            self.add_listed(digest)

    def plain(self) -> list[str]:
        """The digests whose link holds what its path names (sorted; do not change it)."""
        return self._plain

    def odd(self) -> dict[str, Link]:
        """The links kept as objects (not holding what their path names; do not change it)."""
        return self._odd if self._odd is not None else {}

    def named(self) -> Iterator[str]:
        """Every digest the links name, by their path and by their content (a digest may
        come twice): the manifests a map of revision or tag-history links can lead to."""
        yield from self._plain
        if self._odd:
            for digest, link in self._odd.items():
                yield digest
                if link.target is not None:
                    yield link.target

    def targets(self) -> Iterator[str]:
        """The digest each link holds (a link whose content is unusable: none), without
        making a `Link` per plain link: what the mark and the plan ask of every link."""
        yield from self._plain
        if self._odd:
            for link in self._odd.values():
                if link.target is not None:
                    yield link.target

    def _has_plain(self, digest: str) -> bool:
        plain = self._plain
        i = bisect_left(plain, digest)
        return i != len(plain) and plain[i] == digest

    def _listed(self, digest: str) -> Link:
        return Link.listed(f"{self.base}/{digest.partition(':')[0]}", digest, digest)

    def __getitem__(self, digest: str) -> Link:
        if self._has_plain(digest):
            return self._listed(digest)
        if self._odd is not None:
            return self._odd[digest]
        raise KeyError(digest)

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, str):
            return False
        return self._has_plain(digest) or (self._odd is not None and digest in self._odd)

    def __setitem__(self, digest: str, link: Link) -> None:
        if (link.target == digest and link.error is None and link.raw is None
                and link.mtime_ns == 0 and link.path == _listed_path(self.base, digest)):
            self.add_listed(digest)
            return
        plain = self._plain
        i = bisect_left(plain, digest)
        if i != len(plain) and plain[i] == digest:
            del plain[i]
        if self._odd is None:
            self._odd = {}
        self._odd[digest] = link

    def __delitem__(self, digest: str) -> None:
        plain = self._plain
        i = bisect_left(plain, digest)
        if i != len(plain) and plain[i] == digest:
            del plain[i]
        elif self._odd is not None and digest in self._odd:
            del self._odd[digest]
        else:
            raise KeyError(digest)

    def __iter__(self) -> Iterator[str]:
        if not self._odd:
            return iter(self._plain)
        return merge(self._plain, sorted(self._odd))

    def __len__(self) -> int:
        return len(self._plain) + (len(self._odd) if self._odd is not None else 0)

    def _iter_items(self) -> Iterator[tuple[str, Link]]:
        listed = Link.listed
        base = self.base
        dirs: dict[str, str] = {}
        odd = self._odd
        for digest in self:
            link = odd.get(digest) if odd else None
            if link is None:
                alg = digest.partition(":")[0]
                alg_dir = dirs.get(alg)
                if alg_dir is None:
                    alg_dir = dirs[alg] = f"{base}/{alg}"
                link = listed(alg_dir, digest, digest)
            yield digest, link

    def __eq__(self, other: object) -> bool:
        if (isinstance(other, LinkMap) and other.base == self.base and not self._odd
                and not other._odd):
            return self._plain == other._plain
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> LinkMap:
        new = LinkMap(self._parent, sub=self._sub)
        new._plain = list(self._plain)
        new._odd = dict(self._odd) if self._odd else None
        return new

    def __repr__(self) -> str:
        return f"LinkMap({self.base!r}, {dict(self.items())!r})"


class _Items(ItemsView[str, _V]):
    """items() of a compact table (LinkMap, BlobTable) without the per-key lookups of
    Mapping's default view: objects are built from the packed rows in one pass."""

    _mapping: _CompactTable[_V]

    def __iter__(self) -> Iterator[tuple[str, _V]]:
        return self._mapping._iter_items()


class _Values(ValuesView[_V]):
    _mapping: _CompactTable[_V]

    def __iter__(self) -> Iterator[_V]:
        return (value for _, value in self._mapping._iter_items())


_NO_ROW = -1  # a BlobTable row of a blob kept as its object (not at its usual path)


class BlobTable(_CompactTable[Blob]):
    """The blobs of a tree by digest: a mapping of digest -> `Blob`, kept compact.

    A blob at its usual path is a row of four numbers (size, mtime, ctime, inode) in one
    `array('q')`, found through a dict of digest -> row; only a blob kept at another path
    is an object. Insertion order is kept, as a dict keeps it."""

    __slots__ = ("_nums", "_odd", "_rows")

    def __init__(self, blobs: Mapping[str, Blob] | Iterable[tuple[str, Blob]] = ()) -> None:
        self._rows: dict[str, int] = {}
        self._nums = array("q")
        self._odd: dict[str, Blob] | None = None
        for digest, blob in (blobs.items() if isinstance(blobs, Mapping) else blobs):
            self[digest] = blob

    def add(self, digest: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> None:
        """Add (or replace) the blob `blobs/<alg>/<xx>/<hex>/data` of `digest`."""
        row = self._rows.get(digest)
        if row is None or row == _NO_ROW:
            if row == _NO_ROW and self._odd is not None:
                self._odd.pop(digest, None)
            self._rows[digest] = len(self._nums) // 4
            self._nums.extend((size, mtime_ns, ctime_ns, inode))
        else:
            self._nums[4 * row:4 * row + 4] = array("q", (size, mtime_ns, ctime_ns, inode))

    def extend_rows(self, digests: Sequence[str], numbers: array[int]) -> None:
        """Add blobs at their usual paths: `numbers` holds four per digest, in order.
        `digests` are distinct (a directory listing's, a table's rows)."""
        rows = self._rows
        nums = self._nums
        if len(numbers) == 4 * len(digests) and rows.keys().isdisjoint(digests):
            # The usual case (new blobs): one update at C speed, not a call per blob.
            first = len(nums) // 4
            rows.update(zip(digests, range(first, first + len(digests)), strict=True))
            nums.extend(numbers)
            return
        for i, digest in enumerate(digests):
            n = 4 * i
            if digest in rows:
                self.add(digest, *numbers[n:n + 4])
                continue
            rows[digest] = len(nums) // 4
            nums.extend(numbers[n:n + 4])

    def _in_order(self) -> bool:
        """Only blobs at their usual paths, row i the i-th digest: the rows as they are
        are the table (no per-blob copy to send or merge it)."""
        return not self._odd and len(self._nums) == 4 * len(self._rows) and all(
            row == i for i, row in enumerate(self._rows.values()))

    def rows(self) -> tuple[list[str], array[int], list[Blob]]:
        """The blobs at their usual paths (digests, and their four numbers each, in
        order) and the others as objects: what a walk's worker sends back."""
        if self._in_order():
            return list(self._rows), self._nums, []
        digests: list[str] = []
        numbers = array("q")
        odd: list[Blob] = []
        nums = self._nums
        for digest, row in self._rows.items():
            if row == _NO_ROW:
                odd.append(self._blob(digest, row))
            else:
                digests.append(digest)
                numbers.extend(nums[4 * row:4 * row + 4])
        return digests, numbers, odd

    def extend_packed(self, digests: str, numbers: bytes) -> None:
        """`extend_rows` from a worker's packed rows (see `Inventory.packed_blobs`)."""
        if not digests:
            return
        unpacked = array("q")
        unpacked.frombytes(numbers)
        self.extend_rows([intern(d) for d in digests.split("\n")], unpacked)

    def row_of(self, digest: str) -> int | None:
        """The blob's row number (< `row_count()`), -1 for a blob kept as its object,
        None when absent: for a table of one mark per blob (reach.KeptDigests)."""
        return self._rows.get(digest)

    def row_count(self) -> int:
        return len(self._nums) // 4

    def digest_rows(self) -> Iterator[tuple[str, int]]:
        """(digest, `row_of(digest)`) for every blob, in order."""
        return iter(self._rows.items())

    def size(self, digest: str) -> int:
        """The blob's size (KeyError when absent), without making its object."""
        row = self._rows[digest]
        if row == _NO_ROW:
            assert self._odd is not None
            return self._odd[digest].size
        return self._nums[4 * row]

    def total_size(self) -> int:
        return sum(self.size(d) for d in self._rows) if self._odd else sum(
            self._nums[4 * row] for row in self._rows.values())

    def _blob(self, digest: str, row: int) -> Blob:
        if row == _NO_ROW:
            assert self._odd is not None
            return self._odd[digest]
        n = 4 * row
        nums = self._nums
        return Blob(digest, None, nums[n], nums[n + 1], nums[n + 2], nums[n + 3])

    def __getitem__(self, digest: str) -> Blob:
        return self._blob(digest, self._rows[digest])

    def __contains__(self, digest: object) -> bool:
        return digest in self._rows

    def digests(self) -> KeysView[str]:
        """The digests, as a view whose `in` runs at C speed (the mark's inner loop)."""
        return self._rows.keys()

    def __setitem__(self, digest: str, blob: Blob) -> None:
        if blob.digest == digest and blob._path is None:
            self.add(digest, blob.size, blob.mtime_ns, blob.ctime_ns, blob.inode)
            return
        if self._odd is None:
            self._odd = {}
        self._odd[digest] = blob
        self._rows[digest] = _NO_ROW

    def __delitem__(self, digest: str) -> None:
        row = self._rows.pop(digest)  # the row's numbers stay, unused
        if row == _NO_ROW and self._odd is not None:
            del self._odd[digest]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def _iter_items(self) -> Iterator[tuple[str, Blob]]:
        make = self._blob
        for digest, row in self._rows.items():
            yield digest, make(digest, row)

    def update_from(self, other: BlobTable) -> None:
        """Add every blob of `other` (the walk's merge of its fragments)."""
        if other._in_order():
            self.extend_rows(list(other._rows), other._nums)
            return
        add = self.add
        nums = other._nums
        for digest, row in other._rows.items():
            if row == _NO_ROW:
                self[digest] = other._blob(digest, row)
            else:
                n = 4 * row
                add(digest, nums[n], nums[n + 1], nums[n + 2], nums[n + 3])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return len(self) == len(other) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> BlobTable:
        new = BlobTable()
        new._rows = dict(self._rows)
        new._nums = array("q", self._nums)
        new._odd = dict(self._odd) if self._odd else None
        return new

    def __repr__(self) -> str:
        return f"BlobTable({dict(self.items())!r})"


def _no_links() -> LinkMap:
    return LinkMap("")


@dataclass(slots=True)
class Tag:
    name: str
    path: str
    current: Link | None
    index: LinkMap = field(default_factory=_no_links)  # path digest -> link
    mtime_ns: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.index, LinkMap) and self.index.settle(self.path, "index")):
            self.index = LinkMap(self.path, self.index, sub="index")


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
    revisions: LinkMap = field(default_factory=_no_links)  # path digest -> link
    layers: LinkMap = field(default_factory=_no_links)  # path digest -> link
    tags: dict[str, Tag] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)
    mtime_ns: int = 0
    # The `_layers/sha256` links were only lstat'ed (gc's plan): their targets are the
    # digests their paths name until `scanner.read_deferred_layers` reads them.
    layers_unread: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.revisions, LinkMap)
                and self.revisions.settle(self.path, "_manifests/revisions")):
            self.revisions = LinkMap(self.path, self.revisions, sub="_manifests/revisions")
        if not (isinstance(self.layers, LinkMap) and self.layers.settle(self.path, "_layers")):
            self.layers = LinkMap(self.path, self.layers, sub="_layers")

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
    blobs: BlobTable = field(default_factory=BlobTable)
    misplaced_blobs: list[Blob] = field(default_factory=list)  # under a wrong fan-out dir
    repositories: dict[str, Repository] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)
    files_seen: int = 0
    dirs_seen: int = 0
    # The directories under repositories/ the walk found holding nothing but plain
    # subdirectories (no repository part, no file, no link): path -> how many. Only these
    # can be empty name directories (a repository moved away leaves its namespace), so
    # gc's plan judges those from here instead of listing the whole namespace tree again.
    name_dirs: dict[str, int] = field(default_factory=dict)
    # Whether the tags' history (`tags/<t>/index/`) was read into `Tag.index`: gc without
    # --delete-untagged marks nothing from it and does not read it (`Scanner(tag_history=)`).
    tag_history: bool = True
    # Manifests the walk's worker processes read (revision links' digests): digest ->
    # (bytes read, what `ManifestStore._parse` keeps of them: the manifest packed, parsed,
    # or Unloadable), taken once by the ManifestStore when the size read is the blob's.
    # A cache, not a fact about the tree.
    manifests: dict[str, tuple[int, Any]] = field(default_factory=dict, compare=False,
                                                  repr=False)
    # Blobs a walk's worker sent (scanpool): digests joined by newlines and their numbers'
    # bytes, unpacked only when the fragment is merged, so the parent never holds a table
    # per fragment beside the merged one. Always empty in a merged inventory.
    packed_blobs: list[tuple[str, bytes]] = field(default_factory=list, compare=False,
                                                  repr=False)

    @property
    def blob_bytes(self) -> int:
        return self.blobs.total_size()

    def __post_init__(self) -> None:
        if not isinstance(self.blobs, BlobTable):
            self.blobs = BlobTable(self.blobs)

    def uploads(self) -> list[Upload]:
        return [u for repo in self.repositories.values() for u in repo.uploads]
