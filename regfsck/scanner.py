"""One pass over the `v2` tree that records what is there (see `inventory`).

The walk uses `os.scandir`, never follows or enters a symbolic link, and avoids listing
leaf directories that should hold a single known file (`data`, `link`): it opens or stats
that file directly and lists the directory only when the file is not there. Everything
odd it meets becomes an `Anomaly`; judging severity is the checker's job.

The walk is split into tasks (one per blob fan-out directory, one per directory under
`repositories/`). With `storage.io_threads` > 1 (REGFSCK_IO_THREADS) a pool of threads runs
them, for storage where a read takes long enough that several in flight pay off (NFS,
spinning disks, cold caches; threads release the GIL in every system call). Each task fills
its own partial inventory; they are merged in path order, so the result never depends on
the schedule.
"""

from __future__ import annotations

import enum
import errno
import gc
import os
import re
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from operator import attrgetter
from stat import S_ISLNK, S_ISREG
from sys import intern
from time import perf_counter
from typing import TypeVar, cast

from regfsck import layout, scanpool
from regfsck.digest import HEX_LENGTHS, DigestError, is_valid_hex, parse_link_content
from regfsck.hashing import ProgressFn
from regfsck.inventory import (
    UNSTATED,
    Anomaly,
    Blob,
    Inventory,
    Link,
    LinkMap,
    Repository,
    Tag,
    Upload,
)
from regfsck.root import RegistryRoot
from regfsck.storage import (
    DirEntryLike,
    FilesystemStorage,
    Stat,
    Storage,
    StorageError,
    open_storage,
    release_freed_memory,
    to_stat,
)

LINK_READ_LIMIT = 4096
# Reads in flight when gc looks at the blobs and links a dry run only listed (its victims'
# are not in the page cache: each is a disk read; the walk's workers read the rest).
SETTLE_THREADS = 16
# A read the page cache answers takes a few microseconds; one the disk answers, 100 or more.
WARM_READ_SECONDS = 40e-6
PROBE_READS = 64
DEFERRED_CHUNK = 256  # links of one repository read as one item (one directory's)
# The blob fan-out fragments a merge takes between two trims of freed memory: each one's
# packed rows (its digests joined, their numbers) are freed to malloc's heap as its rows
# become the table's strings in pymalloc's arenas, and at 1M files those freed pieces,
# unused by pymalloc and untrimmed, were 22 MB of the peak (issue 15).
TRIM_EVERY_PACKED = 16
STARTEDAT_LIMIT = 4096
MAX_REPO_DEPTH = 64
KNOWN_REPO_DIRS = (layout.LAYERS_DIR, layout.MANIFESTS_DIR, layout.UPLOADS_DIR)

Task = tuple[str, Callable[["Scanner"], "list[Task]"]]  # (sort key, work on a child scanner)


class Depth(enum.Enum):
    """How far the walk looks into the leaf directories of blobs and `_layers` links: the
    three quarters of a tree's files that only a few of gc's decisions need.

    READ: every link read, every blob's `data` lstat'ed (verify and every other command).
    STAT: `_layers/sha256/<hex>/link` lstat'ed, not read: its Link says the digest its path
      names; `read_deferred_layers` reads the links the plan could act on (gc --apply).
    LIST: blob and `_layers/sha256` directories known by their names in the listing of their
      parent only; nothing inside them is looked at until the plan needs it
      (`settle_blobs`: manifests and victims; `read_deferred_layers`). gc's dry run: on a
      cold cache each of those leaves costs two or three disk reads (its directory's inode
      and block, the file's inode), more than all the rest of the walk. What it does not
      see: what is inside the directory of a blob or layer link that nothing would act on
      (a symbolic link placed there by hand, a missing `data`); `gc --apply` walks at STAT
      and refuses on it before moving anything, `verify` reports it."""

    READ = "read"
    STAT = "stat"
    LIST = "list"


def parse_startedat(raw: bytes) -> datetime | None:
    """Parse the RFC 3339 time the registry writes into `startedat`; None if unparsable."""
    try:
        text = raw.decode("ascii").strip()
        when = datetime.fromisoformat(text)
    except (UnicodeDecodeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when


def _is_tmp_leftover(name: str) -> bool:
    return name.endswith(".tmp")


_entry_name: Callable[[DirEntryLike], str] = attrgetter("name")


_HEX_RE = {alg: re.compile(f"[a-f0-9]{{{n}}}") for alg, n in HEX_LENGTHS.items()}
_SHA256_LINK = re.compile(rb"sha256:[a-f0-9]{64}")  # a link's content, the normal case
# A whole directory listing of hex names at once (names joined by newlines).
_HEX_LINES = {alg: re.compile(f"(?:[a-f0-9]{{{n}}}\n)*[a-f0-9]{{{n}}}")
              for alg, n in HEX_LENGTHS.items()}


class Scanner:
    """Walks one tree into an `Inventory`; create one per scan."""

    def __init__(self, storage: Storage, root: RegistryRoot,
                 on_progress: ProgressFn | None = None, threads: int | None = None,
                 *, depth: Depth = Depth.READ, tag_history: bool = True) -> None:
        self.storage = storage
        self.inv = Inventory(root=root, tag_history=tag_history)
        self.on_progress = on_progress
        self.threads = max(1, threads or storage.scan_threads)
        self.depth = depth
        # `tag_history=False`: each tag's `index/` is seen in its listing (a symbolic link
        # or a file there is still an anomaly) but not entered. Only gc without
        # --delete-untagged asks for it: its mark takes every revision as a root, and a
        # tag's history decides nothing there (issue 15: it was a third of the walk).
        self.tag_history = tag_history

    # -- helpers -------------------------------------------------------------
    def _anomaly(self, kind: str, path: str, detail: str = "", **kw: str | None) -> None:
        self.inv.anomalies.append(Anomaly(kind, path, detail, **kw))

    def _entries(self, path: str, repo: str | None = None) -> list[DirEntryLike] | None:
        """List a directory; an unreadable one becomes an anomaly and yields None."""
        try:
            found = self.storage.scandir(path)
            entries = found if type(found) is list else list(found)
            entries.sort(key=_entry_name)
        except StorageError as exc:
            self._anomaly("unreadable", path, exc.message, repo=repo)
            return None
        self.inv.dirs_seen += 1
        return entries

    def _subdirs(self, path: str, expected: str,
                 repo: str | None = None) -> Iterator[tuple[DirEntryLike, str]]:
        """The real subdirectories of `path` with their paths; anything else found there (a
        file, a symbolic link, a FIFO) is recorded as not what the layout puts there."""
        for entry in self._entries(path, repo) or ():
            child = layout.join(path, entry.name)
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                self._odd_entry(entry, child, expected, repo)
            else:
                yield entry, child

    def _odd_entry(self, entry: DirEntryLike, path: str, expected: str,
                   repo: str | None = None) -> None:
        """Record an entry that is not what the layout puts there."""
        if entry.is_symlink():
            self._anomaly("symlink", path, f"symbolic link where {expected} was expected "
                          "(not followed)", repo=repo)
        elif _is_tmp_leftover(entry.name):
            self._anomaly("tmp_leftover", path, "temporary file left by an interrupted write",
                          repo=repo)
        else:
            what = "directory" if entry.is_dir(follow_symlinks=False) else (
                "file" if entry.is_file(follow_symlinks=False) else "special file")
            self._anomaly("unexpected_entry", path, f"unexpected {what} (expected {expected})",
                          repo=repo)

    def _link(self, raw: bytes | StorageError, path: str, repo: str | None, dir_path: str,
              expected: str | None = None) -> Link | None:
        """The Link for what reading `path` gave (content or error); None: no link there.

        `expected` is the digest the path names: content equal to it (the normal case,
        millions of times) is accepted with one comparison and shares its string."""
        if isinstance(raw, StorageError):
            if raw.errno == errno.ENOENT:
                self._missing_link(dir_path, repo)
                return None
            if raw.errno == errno.ELOOP:
                self._anomaly("symlink", path, "link file is a symbolic link (not followed)",
                              repo=repo)
                return Link(path, None, "symbolic link")
            if raw.errno in (errno.EINVAL, errno.EISDIR):
                self._anomaly("link_not_file", path, "link is not a regular file", repo=repo)
                return Link(path, None, "not a regular file")
            self._anomaly("unreadable", path, raw.message, repo=repo)
            return Link(path, None, raw.message)
        self.inv.files_seen += 1
        if expected is not None and raw.decode("latin-1") == expected:
            return Link(path, expected)
        try:
            target = str(parse_link_content(raw))
        except DigestError as exc:
            return Link(path, None, str(exc), raw[:LINK_READ_LIMIT])
        return Link(path, target)

    def _leaf_is_empty(self, dir_path: str, expected_file: str, repo: str | None) -> bool:
        """A leaf directory lacks its one file: report what else it holds; True if empty."""
        entries = self._entries(dir_path, repo)
        if entries is None:
            return False
        for entry in entries:
            self._odd_entry(entry, layout.join(dir_path, entry.name), expected_file, repo)
        return not entries

    def _missing_link(self, dir_path: str, repo: str | None) -> None:
        if self._leaf_is_empty(dir_path, layout.LINK, repo):
            self._anomaly("empty_dir", dir_path, "empty directory (no link)", repo=repo)
        else:
            self._anomaly("missing_link", dir_path, "directory has no link file", repo=repo)

    # -- blobs ---------------------------------------------------------------
    def _blob_tasks(self) -> list[Task]:
        tasks: list[Task] = []
        top = self._entries(layout.BLOBS)
        for alg_entry in top or ():
            alg_path = layout.join(layout.BLOBS, alg_entry.name)
            if not alg_entry.is_dir(follow_symlinks=False) or alg_entry.is_symlink():
                self._odd_entry(alg_entry, alg_path, "an algorithm directory")
                continue
            if alg_entry.name not in HEX_LENGTHS:
                self._anomaly("blob_bad_name", alg_path, "unknown digest algorithm directory")
                continue
            tasks.extend(self._blob_algorithm_tasks(alg_entry.name, alg_path))
        return tasks

    def _blob_algorithm_tasks(self, algorithm: str, alg_path: str) -> list[Task]:
        tasks: list[Task] = []
        for fan_entry in self._entries(alg_path) or ():
            fan = fan_entry.name
            fan_path = f"{alg_path}/{fan}"
            if not fan_entry.is_dir(follow_symlinks=False):
                self._odd_entry(fan_entry, fan_path, "a two-character fan-out directory")
                continue
            if len(fan) != 2 or not is_valid_hex("sha256", fan * 32):
                self._anomaly("blob_bad_name", fan_path, "fan-out directory is not two hex chars")
                continue
            tasks.append((fan_path, _fanout_task(algorithm, fan, fan_path)))
        return tasks

    def _scan_fanout(self, algorithm: str, fan: str, fan_path: str) -> None:
        """The hot loop over blob directories: one lstat of `data` each, no leaf listing."""
        hex_re = _HEX_RE[algorithm]
        candidates: list[tuple[str, str, str]] = []  # (hex, digest, blob dir path)
        for entry in self._entries(fan_path) or ():
            hex_part = entry.name
            path = f"{fan_path}/{hex_part}"
            if not entry.is_dir(follow_symlinks=False):
                self._odd_entry(entry, path, "a blob directory")
                continue
            if hex_re.fullmatch(hex_part) is None:
                self._anomaly("blob_bad_name", path, f"not a valid {algorithm} hex name")
                continue
            # Interned: every link and manifest descriptor naming it shares this string.
            candidates.append((hex_part, intern(f"{algorithm}:{hex_part}"), path))
        if self.depth is Depth.LIST:  # known by name; `settle_blobs` looks inside later
            placed = [c[1] for c in candidates if c[0].startswith(fan)]
            self.inv.blobs.extend_rows(placed, array("q", (UNSTATED, 0, 0, 0)) * len(placed))
            self.inv.files_seen += len(placed)
            candidates = [c for c in candidates if not c[0].startswith(fan)]
        if candidates:
            self._stat_blobs(fan, fan_path, candidates)

    def _stat_blobs(self, fan: str, fan_path: str, candidates: Sequence[tuple[str, str, str]],
                    settling: bool = False,
                    stats: list[os.stat_result | StorageError | None] | StorageError | None = None
                    ) -> None:
        """lstat `<hex>/data` of each (hex, digest, blob dir path) of one fan-out directory
        (or take `stats`, made so): a regular file at its place is a blob row, anything else
        what `_odd_blob` says. `settling`: the blobs are already in the inventory, listed by
        name (Depth.LIST)."""
        if stats is None:
            try:
                stats = self.storage.lstat_many(fan_path, [f"{c[0]}/data" for c in candidates])
            except StorageError as exc:
                stats = exc
        if isinstance(stats, StorageError):
            self._anomaly("unreadable", fan_path, stats.message)
            if settling:
                for _, digest, _ in candidates:
                    del self.inv.blobs[digest]
            return
        add_blob = self.inv.blobs.add
        files = 0
        for (hex_part, digest, path), st in zip(candidates, stats, strict=True):
            data_path = f"{path}/data"
            if st is not None and not isinstance(st, StorageError) and S_ISREG(st.st_mode) \
                    and hex_part.startswith(fan):
                files += 1
                add_blob(digest, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                continue
            if settling:
                del self.inv.blobs[digest]
                self.inv.files_seen -= 1
            if isinstance(st, StorageError):
                self._anomaly("unreadable", data_path, st.message, digest=digest)
                continue
            self._odd_blob(digest, fan, hex_part, path, data_path,
                           None if st is None else to_stat(st))
        if not settling:
            self.inv.files_seen += files

    def _odd_blob(self, digest: str, fan: str, hex_part: str, path: str, data_path: str,
                  st: Stat | None) -> None:
        if st is None:
            self._leaf_is_empty(path, layout.DATA, None)
            self._anomaly("blob_missing_data", path, "blob directory without data", digest=digest)
            return
        self.inv.files_seen += 1
        kind = st.kind.value
        if kind == "symlink":
            self._anomaly("symlink", data_path, "blob data is a symbolic link (not followed)",
                          digest=digest)
            return
        if kind != "file":
            self._anomaly("blob_data_not_file", data_path, f"blob data is a {kind}", digest=digest)
            return
        self._anomaly("blob_wrong_fanout", data_path,
                      f"blob is under fan-out {fan}/ instead of {hex_part[:2]}/", digest=digest)
        self.inv.misplaced_blobs.append(
            Blob(digest, data_path, st.size, st.mtime_ns, st.ctime_ns, st.inode))

    # -- repositories ----------------------------------------------------------
    def _walk_repository_dir(self, path: str, parts: tuple[str, ...]) -> list[Task]:
        """One directory under `repositories/`: a repository (its parts are scanned here)
        and/or the parent of more; returns the tasks for its child directories."""
        entries = self._entries(path)
        if entries is None:
            return []
        by_name = {e.name: e for e in entries}
        name = "/".join(parts)
        markers = {n for n in (layout.LAYERS_DIR, layout.MANIFESTS_DIR)
                   if n in by_name and by_name[n].is_dir(follow_symlinks=False)
                   and not by_name[n].is_symlink()}
        repo: Repository | None = None
        if parts and markers:
            repo = Repository(name=name, path=path,
                              has_manifests=layout.MANIFESTS_DIR in markers,
                              has_layers=layout.LAYERS_DIR in markers)
            self.inv.repositories[name] = repo
        children: list[Task] = []
        bare = repo is None
        for entry in entries:
            child_path = f"{path}/{entry.name}"
            if entry.name.startswith("_"):
                bare = False
                if repo is not None and entry.name in KNOWN_REPO_DIRS:
                    self._scan_repo_part(repo, entry, child_path)
                elif entry.name == layout.UPLOADS_DIR:
                    self._anomaly("upload_outside_repo", child_path,
                                  "_uploads outside a repository", repo=name or None)
                else:
                    self._odd_entry(entry, child_path, "a repository name component",
                                    name or None)
                continue
            if entry.is_dir(follow_symlinks=False) and not entry.is_symlink():
                if len(parts) >= MAX_REPO_DEPTH:
                    self._anomaly("repo_bad_name", child_path, "repository nesting too deep")
                    bare = False  # not walked: nothing is known of what it holds
                    continue
                children.append((child_path, _walk_task(child_path, (*parts, entry.name))))
            else:
                bare = False
                self._odd_entry(entry, child_path, "a repository directory", name or None)
        if bare and parts:
            self.inv.name_dirs[path] = len(entries)
        return children

    def _scan_repo_part(self, repo: Repository, entry: DirEntryLike, path: str) -> None:
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            self._odd_entry(entry, path, "a directory", repo.name)
            return
        if entry.name == layout.LAYERS_DIR:
            self._scan_digest_links(repo, path, repo.layers, allow_legacy=("tarsum",))
        elif entry.name == layout.MANIFESTS_DIR:
            self._scan_manifests(repo, path)
        else:
            self._scan_uploads(repo, path)

    def _scan_digest_links(self, repo: Repository, path: str, into: LinkMap,
                           allow_legacy: tuple[str, ...] = (), tag: str | None = None) -> None:
        """Scan `<alg>/<hex>/link` below `path` (`into`'s own directory) into `into` (keyed
        by the path's digest)."""
        assert path == into.base, (path, into.base)
        repo_name = repo.name
        for alg_entry in self._entries(path, repo_name) or ():
            alg = alg_entry.name
            alg_path = f"{path}/{alg}"
            if not alg_entry.is_dir(follow_symlinks=False):
                self._odd_entry(alg_entry, alg_path, "an algorithm directory", repo_name)
                continue
            if alg in allow_legacy:
                self._anomaly("legacy_entry", alg_path, "legacy tarsum links (ignored)",
                              repo=repo_name)
                continue
            hex_re = _HEX_RE.get(alg)
            if hex_re is None:
                self._anomaly("link_bad_path", alg_path, "unknown digest algorithm directory",
                              repo=repo_name, tag=tag)
                continue
            hexes = self._digest_dirs(alg_path, alg, hex_re, repo_name, tag)
            if not hexes:
                continue
            prefix = f"{alg}:"
            digests = [intern(prefix + h) for h in hexes]
            names = [f"{h}/link" for h in hexes]
            try:
                if self.depth is not Depth.READ and alg == "sha256" and into is repo.layers:
                    repo.layers_unread = True
                    contents = (None if self.depth is Depth.LIST else _as_read(
                        self.storage.lstat_many(alg_path, names), digests, alg_path, names))
                else:
                    contents = self.storage.read_small_many(alg_path, names, LINK_READ_LIMIT)
            except StorageError as exc:
                self._anomaly("unreadable", alg_path, exc.message, repo=repo_name)
                continue
            if contents is None or _all_name_their_path(contents, digests):  # the normal case
                into.extend_listed(digests)
                self.inv.files_seen += len(digests)
                continue
            make_link = self._link
            add_listed = into.add_listed
            files = 0
            for hex_part, digest, raw in zip(hexes, digests, contents, strict=True):
                if type(raw) is bytes and raw.decode("latin-1") == digest:
                    files += 1
                    add_listed(digest)
                    continue
                hex_path = f"{alg_path}/{hex_part}"
                link = make_link(raw, f"{hex_path}/link", repo_name, hex_path, digest)
                if link is not None:
                    into[digest] = link
            self.inv.files_seen += files

    def _digest_dirs(self, alg_path: str, alg: str, hex_re: re.Pattern[str], repo: str,
                     tag: str | None) -> list[str]:
        """The `<hex>` directory names under `alg_path` (sorted); anything else found there
        is recorded as an anomaly. A directory of only well-named subdirectories (the
        normal case) is judged at once, by one regular expression over all its names."""
        entries = self._entries(alg_path, repo) or ()
        names = [e.name for e in entries]
        if all([e.is_dir(follow_symlinks=False) for e in entries]) and (
                _HEX_LINES[alg].fullmatch("\n".join(names)) is not None):
            return names
        valid: list[str] = []
        for entry, name in zip(entries, names, strict=True):
            hex_path = f"{alg_path}/{name}"
            if not entry.is_dir(follow_symlinks=False):
                self._odd_entry(entry, hex_path, "a digest directory", repo)
            elif hex_re.fullmatch(name) is None:
                self._anomaly("link_bad_path", hex_path, f"not a valid {alg} hex name",
                              repo=repo, tag=tag)
            else:
                valid.append(name)
        return valid

    def _scan_manifests(self, repo: Repository, path: str) -> None:
        for entry, child in self._subdirs(path, "revisions/ or tags/", repo.name):
            if entry.name == layout.REVISIONS:
                self._scan_digest_links(repo, child, repo.revisions)
            elif entry.name == layout.TAGS:
                self._scan_tags(repo, child)
            else:
                self._odd_entry(entry, child, "revisions/ or tags/", repo.name)

    def _scan_tags(self, repo: Repository, path: str) -> None:
        with_current: list[Tag] = []
        for entry, tag_path in self._subdirs(path, "a tag directory", repo.name):
            tag = Tag(name=entry.name, path=tag_path, current=None)
            repo.tags[entry.name] = tag
            for part, part_path in self._subdirs(tag_path, "current/ or index/", repo.name):
                if part.name == layout.CURRENT:
                    with_current.append(tag)
                elif part.name == layout.INDEX:
                    if self.tag_history:
                        self._scan_digest_links(repo, part_path, tag.index, tag=entry.name)
                else:
                    self._odd_entry(part, part_path, "current/ or index/", repo.name)
        if with_current:
            self._read_currents(repo, path, with_current)

    def _read_currents(self, repo: Repository, path: str, tags: list[Tag]) -> None:
        """Read the `current/link` of `tags` (their directories listed: `current` is a real
        directory), relative to one descriptor of `tags/`; a link holding one sha256
        digest (the normal case) becomes the tag's link with no parsing."""
        names = [f"{tag.name}/{layout.CURRENT}/{layout.LINK}" for tag in tags]
        try:
            contents = self.storage.read_small_many(path, names, LINK_READ_LIMIT)
        except StorageError as exc:
            self._anomaly("unreadable", path, exc.message, repo=repo.name)
            return
        plain = _SHA256_LINK.fullmatch
        for tag, raw in zip(tags, contents, strict=True):
            if type(raw) is bytes and plain(raw) is not None:
                self.inv.files_seen += 1
                tag.current = Link.current_of(tag.path, intern(raw.decode("ascii")))
                continue
            part_path = f"{tag.path}/{layout.CURRENT}"
            current = self._link(raw, f"{part_path}/{layout.LINK}", repo.name, part_path)
            if (current is not None and current.target is not None
                    and current.error is None and current.raw is None
                    and current.mtime_ns == 0):  # no path string per tag
                current = Link.current_of(tag.path, intern(current.target))
            tag.current = current

    def _scan_uploads(self, repo: Repository, path: str) -> None:
        for entry, upload_path in self._subdirs(path, "an upload directory", repo.name):
            repo.uploads.append(self._scan_upload(repo, entry, upload_path))

    def _scan_upload(self, repo: Repository, entry: DirEntryLike, path: str) -> Upload:
        size = 0
        startedat_raw: bytes | None = None
        hashstates: list[str] = []
        try:
            mtime_ns = entry.stat(follow_symlinks=False).st_mtime_ns
        except OSError:
            mtime_ns = 0
        for item in self._entries(path, repo.name) or ():
            item_path = layout.join(path, item.name)
            if item.is_symlink():
                self._odd_entry(item, item_path, "an upload file", repo.name)
            elif item.name == layout.STARTEDAT and item.is_file(follow_symlinks=False):
                try:
                    startedat_raw = self.storage.read_link_fast(item_path, STARTEDAT_LIMIT)
                except StorageError as exc:
                    self._anomaly("unreadable", item_path, exc.message, repo=repo.name)
                self.inv.files_seen += 1
            elif item.name == layout.DATA and item.is_file(follow_symlinks=False):
                size += item.stat(follow_symlinks=False).st_size
                self.inv.files_seen += 1
            elif item.name == layout.HASHSTATES and item.is_dir(follow_symlinks=False):
                size += self._scan_hashstates(repo, item_path, hashstates)
            else:
                self._odd_entry(item, item_path, "startedat, data or hashstates/", repo.name)
        started_at = parse_startedat(startedat_raw) if startedat_raw is not None else None
        return Upload(repo.name, entry.name, path, started_at, startedat_raw, size, mtime_ns,
                      hashstates)

    def _scan_hashstates(self, repo: Repository, path: str, names: list[str]) -> int:
        size = 0
        for alg, alg_path in self._subdirs(path, "a hash algorithm directory", repo.name):
            for state in self._entries(alg_path, repo.name) or ():
                state_path = layout.join(alg_path, state.name)
                if state.is_symlink() or not state.is_file(follow_symlinks=False):
                    self._odd_entry(state, state_path, "a hash state file", repo.name)
                    continue
                self.inv.files_seen += 1
                size += state.stat(follow_symlinks=False).st_size
                names.append(f"{alg.name}/{state.name}")
        return size

    # -- top level -------------------------------------------------------------
    def scan(self) -> Inventory:
        """Walk the tree into the inventory.

        The walk runs without the cyclic garbage collector and freezes what it made
        (`gc.freeze`): millions of objects with no cycle among them, which reference
        counting frees (tests/test_scanpool.py checks that a dropped inventory leaves the
        collector nothing). Left in its sight, they cost gc's plan three collection passes
        over the whole inventory, 0.2 s of 3 at 300k files (issue 15). What is made after
        the walk is collected as usual."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            inv = self._walk()
        finally:
            if collecting:
                gc.enable()
        gc.freeze()
        return inv

    def _walk(self) -> Inventory:
        # Object storage: the flat listing, then every link and startedat in one burst of
        # concurrent GETs (none when the listing proves the content); a filesystem does
        # nothing. A bucket that cannot be listed raises StorageError (exit 3, as a
        # missing ROOT); a single object that cannot be read is reported by the walk.
        self.storage.prefetch(_prefetched, _link_contents(self.storage), LINK_READ_LIMIT)
        for key in self.storage.unmodelled():
            self._anomaly("unexpected_entry", key, "object whose key no path can name (an "
                          "empty, '.' or '..' component, or a key that is also a directory)")
        top = self._entries("")
        names = {e.name: e for e in top or ()}
        for entry in top or ():
            if entry.name not in (layout.BLOBS, layout.REPOSITORIES):
                self._odd_entry(entry, entry.name, "blobs/ or repositories/")
        tasks: list[Task] = []
        for name in (layout.BLOBS, layout.REPOSITORIES):
            found = names.get(name)
            if found is None:
                continue
            entry = found
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                self._odd_entry(entry, name, "a directory")
                continue
            if name == layout.BLOBS:
                tasks.extend(self._blob_tasks())
            else:
                tasks.append((layout.REPOSITORIES, _walk_task(layout.REPOSITORIES, ())))
        processes = self._processes(tasks)
        if processes > 1:
            self._run_processes(tasks, processes)
            release_freed_memory()  # the workers' results and the merged fragments
        else:
            self._run_tasks(tasks)
        return self.inv

    # -- running tasks -----------------------------------------------------------
    def _child(self) -> Scanner:
        return Scanner(self.storage, self.inv.root, threads=1, depth=self.depth,
                       tag_history=self.tag_history)

    def _run_tasks(self, tasks: list[Task]) -> None:
        """Run `tasks` (and the tasks they spawn) and merge their inventories in key order."""
        done: list[tuple[str, Inventory]] = []
        if self.threads == 1 or len(tasks) == 0:
            stack = list(reversed(tasks))
            while stack:
                key, work = stack.pop()
                child = self._child()
                stack.extend(reversed(work(child)))
                done.append((key, child.inv))
                self._progress(key)
        else:
            self._run_parallel(tasks, done)
        done.sort(key=_fragment_key, reverse=True)
        while done:  # popping frees each fragment's tables as soon as it is merged
            self._merge(done.pop()[1])

    def _processes(self, tasks: list[Task]) -> int:
        """How many worker processes walk this tree (1: this process alone, see scanpool).

        Only a local tree walked without threads; by default only when the blob fan-out
        directories hold enough (their link counts say how many subdirectories, no listing)
        for the workers' start to pay off."""
        if self.threads > 1 or not isinstance(self.storage, FilesystemStorage):
            return 1
        forced = scanpool.scan_processes()
        if forced is not None:
            return forced
        fanouts = [key for key, _ in tasks if key.startswith(layout.BLOBS + "/")]
        if not fanouts:
            return 1
        try:
            subdirs = os.lstat(self.storage.full_path(fanouts[0])).st_nlink - 2
        except OSError:
            return 1
        return scanpool.DEFAULT_PROCESSES if subdirs * len(fanouts) >= scanpool.MIN_BLOBS else 1

    def _run_processes(self, tasks: list[Task], processes: int) -> None:
        """`_run_tasks` in worker processes: the directories under `repositories/` are
        opened here first (to the depth of one namespace), so a registry whose repositories
        share one namespace still spreads them over every worker."""
        done: list[tuple[str, Inventory]] = []
        queue: list[Task] = []
        for key, work in tasks:
            if key.startswith(layout.BLOBS + "/"):
                queue.append((key, work))
                continue
            level = [(key, work)]
            for _depth in range(2):
                if len(level) >= 4 * processes:
                    break
                spawned: list[Task] = []
                for sub_key, sub_work in level:
                    child = self._child()
                    spawned.extend(sub_work(child))
                    done.append((sub_key, child.inv))
                level = spawned
            queue.extend(level)
        fragments, manifests, stated = scanpool.run_in_processes(self, queue, processes,
                                                                 self._progress)
        done.extend(fragments)
        del fragments  # `done` alone holds them: each is freed as soon as it is merged
        if self.inv.manifests:
            self.inv.manifests.update(manifests)
        else:
            self.inv.manifests = manifests  # not a copy (memory)
        del manifests
        done.sort(key=_fragment_key, reverse=True)
        packed = 0
        while done:
            fragment = done.pop()[1]
            self._merge(fragment)
            packed += bool(fragment.packed_blobs)
            del fragment  # freed before a trim can hand its memory back
            if packed == TRIM_EVERY_PACKED:
                release_freed_memory()
                packed = 0
        blobs = self.inv.blobs
        while stated:  # the manifests' rows the workers lstat'ed (Depth.LIST)
            digests, raw = stated.pop()
            numbers = array("q")
            numbers.frombytes(raw)
            for i, digest in enumerate(digests.split("\n")):
                if digest in blobs and blobs.size(digest) == UNSTATED:
                    blobs.add(digest, *numbers[4 * i:4 * i + 4])

    def _progress(self, key: str) -> None:
        if self.on_progress is not None and key.startswith(layout.BLOBS):
            self.on_progress(0)  # one blob fan-out directory done

    def _run_parallel(self, tasks: list[Task], done: list[tuple[str, Inventory]]) -> None:
        def run(key: str, work: Callable[[Scanner], list[Task]]) -> list[Task]:
            child = self._child()
            spawned = work(child)
            done.append((key, child.inv))  # list.append is atomic
            return spawned

        with ThreadPoolExecutor(self.threads, thread_name_prefix="regfsck-scan") as pool:
            pending: dict[Future[list[Task]], str] = {pool.submit(run, k, w): k for k, w in tasks}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    self._progress(pending.pop(future))
                    pending.update({pool.submit(run, k, w): k for k, w in future.result()})

    def _merge(self, fragment: Inventory) -> None:
        inv = self.inv
        for digests, numbers in fragment.packed_blobs:
            inv.blobs.extend_packed(digests, numbers)
        inv.blobs.update_from(fragment.blobs)
        inv.misplaced_blobs.extend(fragment.misplaced_blobs)
        inv.repositories.update(fragment.repositories)
        inv.anomalies.extend(fragment.anomalies)
        inv.files_seen += fragment.files_seen
        inv.dirs_seen += fragment.dirs_seen
        inv.name_dirs.update(fragment.name_dirs)


def _all_name_their_path(contents: Sequence[bytes | StorageError], digests: list[str]) -> bool:
    """Does every link hold exactly the digest its path names? One comparison of the joined
    contents (links are a digest each, with no newline) instead of one per link."""
    if not all([type(raw) is bytes for raw in contents]):
        return False
    return b"\n".join(cast("list[bytes]", contents)) == "\n".join(digests).encode("latin-1")


def _as_read(stats: list[os.stat_result | StorageError | None], digests: list[str],
             dir_path: str, names: list[str]) -> list[bytes | StorageError]:
    """What `read_small_many` would say of link files only lstat'ed: the errors it would
    give (absent, symbolic link, not a regular file), else the digest the path names."""
    out: list[bytes | StorageError] = []
    for digest, st, name in zip(digests, stats, names, strict=True):
        path = f"{dir_path}/{name}"
        if st is None:
            out.append(StorageError(errno.ENOENT, f"cannot read {path}: no such file", path))
        elif isinstance(st, StorageError):
            out.append(st)
        elif S_ISLNK(st.st_mode):
            out.append(StorageError(errno.ELOOP, f"{path} is a symbolic link", path))
        elif not S_ISREG(st.st_mode):
            out.append(StorageError(errno.EINVAL, f"{path} is not a regular file", path))
        else:
            out.append(digest.encode("ascii"))
    return out


_T = TypeVar("_T")
_R = TypeVar("_R")


def _in_flight(read: Callable[[_T], _R], items: Sequence[_T],
               reads_of: Callable[[_T], int]) -> Iterator[_R]:
    """`read` of each item, in order, as each is read (so the caller holds one at a time:
    the lstat results of a plan's victims were 10 MB at 1M files); `reads_of(item)`: the
    files its read touches.

    What gc reads after a dry run's walk may or may not be in the page cache. Cached, each
    read takes microseconds and threads only hand the GIL over on every system call (16
    threads made these reads 2x slower at 300k files). Not cached, each is a disk read,
    and threads keep many in flight (os.stat and os.read release the GIL). So the reads
    start here, in the calling thread, and the moment a stretch of PROBE_READS of them
    averages more than WARM_READ_SECONDS each (the disk, or the network, answers them),
    the rest go to SETTLE_THREADS threads."""
    reads, spent = 0, 0.0
    for done, item in enumerate(items):
        if reads >= PROBE_READS:
            if spent > reads * WARM_READ_SECONDS:
                rest = items[done:]
                with ThreadPoolExecutor(min(SETTLE_THREADS, len(rest)),
                                        thread_name_prefix="regfsck-settle") as pool:
                    yield from pool.map(read, rest)
                return
            reads, spent = 0, 0.0
        started = perf_counter()
        result = read(item)
        spent += perf_counter() - started
        reads += reads_of(item)
        yield result


def read_deferred_layers(storage: Storage, inv: Inventory,
                         select: Callable[[list[str]], list[str]],
                         repos: Iterable[str] | None = None) -> None:
    """Read the content of the deferred `_layers/sha256` links (`Depth.STAT`/`LIST`: only lstat'ed or listed)
    whose path digests `select` picks (of one repository's, in order: a filter over a
    list, so that the 100,000s of links of a tree are judged in one comprehension, not a
    call each), replacing their Link by what the content says.

    gc asks this for every link whose blob is not stored (its content may name another
    blob: an alias kept by the mark) before marking, and for every link whose digest the
    mark did not keep before planning: the links the plan could act on. A link that
    cannot be read now (it changed since the scan) holds no digest: the plan keeps it.
    `repos`: only these repositories (gc reads every link of a repository it removes whole,
    so the plan names what each held)."""
    chosen = (inv.repositories.values() if repos is None
              else [inv.repositories[name] for name in repos if name in inv.repositories])
    # The links holding what their paths name (the others' content was read), by repository.
    work: list[tuple[Repository, list[str]]] = []
    for repo in chosen:
        if repo.layers_unread:
            plain = repo.layers.plain()  # sorted: the sha256 ones are one slice of it
            sha256 = plain[bisect_left(plain, "sha256:"):bisect_left(plain, "sha256;")]
            todo = select(sha256)
            # In pieces, so that a repository of 100,000 links is not read in one go
            # before `_in_flight` can tell a cold cache from a warm one.
            work.extend((repo, todo[start:start + DEFERRED_CHUNK])
                        for start in range(0, len(todo), DEFERRED_CHUNK))

    def read(item: tuple[Repository, list[str]]) -> Sequence[bytes | StorageError]:
        repo, todo = item
        names = [f"{d[7:]}/{layout.LINK}" for d in todo]
        try:
            return storage.read_small_many(f"{repo.path}/{layout.LAYERS_DIR}/sha256", names,
                                           LINK_READ_LIMIT)
        except StorageError as exc:
            return [exc] * len(todo)

    for (repo, todo), contents in zip(work, _in_flight(read, work, lambda item: len(item[1])), strict=True):
        for digest, raw in zip(todo, contents, strict=True):
            path = repo.layers[digest].path
            if isinstance(raw, StorageError):
                repo.layers[digest] = Link(path, None, raw.message)
                continue
            if raw.decode("latin-1") == digest:
                continue
            try:
                target = str(parse_link_content(raw))
            except DigestError as exc:
                repo.layers[digest] = Link(path, None, str(exc), raw[:LINK_READ_LIMIT])
                continue
            repo.layers[digest] = Link(path, intern(target))


def settle_blobs(storage: Storage, inv: Inventory, digests: Iterable[str]) -> None:
    """Look inside the blob directories the walk only listed (Depth.LIST) for `digests`:
    each becomes what a full walk makes of it, a row with its size and times, or, where
    `data` is missing, a symbolic link, not a file or unreadable, no blob and the same
    anomaly. gc asks this for every manifest it reads and every blob it would remove.

    The lstat's of one call run in threads, a fan-out directory each (os.stat releases
    the GIL): on a cold cache a victim's inode is a disk read, and a plan has thousands."""
    blobs = inv.blobs
    wanted: dict[str, list[tuple[str, str, str]]] = {}
    for digest in digests:
        if digest not in blobs or blobs.size(digest) != UNSTATED:
            continue
        algorithm, _, hex_part = digest.partition(":")  # a name the walk accepted: valid
        fan_path = f"{layout.BLOBS}/{algorithm}/{hex_part[:2]}"
        wanted.setdefault(fan_path, []).append((hex_part, digest, f"{fan_path}/{hex_part}"))
    if not wanted:
        return

    def stat_fanout(fan_path: str) -> list[os.stat_result | StorageError | None] | StorageError:
        try:
            return storage.lstat_many(fan_path, [f"{c[0]}/data" for c in wanted[fan_path]])
        except StorageError as exc:
            return exc

    order = sorted(wanted)
    results = _in_flight(stat_fanout, order, lambda fan_path: len(wanted[fan_path]))
    scanner = Scanner(storage, inv.root, threads=1)
    scanner.inv = inv  # the anomalies and rows go straight into the scanned inventory
    for fan_path, stats in zip(order, results, strict=True):
        scanner._stat_blobs(fan_path.rpartition("/")[2], fan_path, wanted[fan_path],
                            settling=True, stats=stats)


def _fragment_key(item: tuple[str, Inventory]) -> str:
    return item[0]


def _prefetched(path: str) -> bool:
    """The small files the walk reads: link files and uploads' startedat."""
    name = path.rpartition("/")[2]
    return name == layout.LINK or name == layout.STARTEDAT


def _implied_link_content(path: str) -> bytes | None:
    """The content a `.../<alg>/<hex>/link` must hold (its path names it); None elsewhere."""
    parts = path.split("/")
    if len(parts) < 3 or parts[-1] != layout.LINK:
        return None
    regex = _HEX_RE.get(parts[-3])
    if regex is None or regex.fullmatch(parts[-2]) is None:
        return None
    return f"{parts[-3]}:{parts[-2]}".encode("ascii")


def _link_contents(storage: Storage) -> Callable[[str], Sequence[bytes]]:
    """What a link file may hold, known from the tree without reading it: the digest its
    path names (`.../<alg>/<hex>/link`); for a tag's `current/link`, one of the digests its
    `index/` holds (the registry writes a tag's target there too). On object storage a link
    whose ETag is the MD5 of one of them needs no GET (`Storage.prefetch`); a current link
    pointing anywhere else matches none and is read."""
    def contents(path: str) -> Sequence[bytes]:
        implied = _implied_link_content(path)
        if implied is not None:
            return (implied,)
        where = layout.parse_path(path)
        if where.kind != "tag_current" or where.repo is None or where.tag is None:
            return ()
        index = layout.join(layout.tag_dir(where.repo, where.tag), layout.INDEX)
        found: list[bytes] = []
        try:
            for alg in storage.scandir(index):
                for entry in storage.scandir(layout.join(index, alg.name)):
                    content = _implied_link_content(
                        layout.join(index, alg.name, entry.name, layout.LINK))
                    if content is not None:
                        found.append(content)
        except StorageError:
            return ()  # not a directory, or none: the link is read
        return found
    return contents


def _fanout_task(algorithm: str, fan: str, fan_path: str) -> Callable[[Scanner], list[Task]]:
    def work(scanner: Scanner) -> list[Task]:
        scanner._scan_fanout(algorithm, fan, fan_path)
        return []
    return work


def _walk_task(path: str, parts: tuple[str, ...]) -> Callable[[Scanner], list[Task]]:
    def work(scanner: Scanner) -> list[Task]:
        return scanner._walk_repository_dir(path, parts)
    return work


def scan_tree(root: RegistryRoot, on_progress: ProgressFn | None = None,
              threads: int | None = None) -> Inventory:
    """Scan the registry tree at `root` into an inventory."""
    return Scanner(open_storage(root), root, on_progress, threads).scan()


def now_utc() -> datetime:
    return datetime.now(UTC)
