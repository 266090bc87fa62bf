"""The walk in worker processes: shared-nothing shards that return compact fragments.

A registry tree is millions of tiny files. One Python process walks it at one core's
speed, with one read outstanding at a time: on a cold cache (a registry larger than RAM)
every lookup waits for the disk, which could serve many at once. So a big local tree is
walked by forked worker processes (`scan_processes`, default 8 on any machine: the point
is the reads in flight as much as the cores). Each worker runs the same `Scanner` code on
whole tasks (a blob fan-out directory, a directory under `repositories/`), and also reads
the manifest blobs its repositories' revision links name, so the parent never waits for
them one by one.

Threads were tried first and lost (the GIL hand-off on every system call), and so did
pickling the fragments' objects (slower than the walk). What crosses the pipe here is
plain data: digests as strings, a link only as the digest its path names when it holds
exactly that digest (the normal case), numbers in arrays; the rare odd entries (a damaged
link, an anomaly, an upload) as objects. The parent rebuilds the objects and merges the
fragments in task-key order, so the inventory is the one the serial walk builds.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable, Iterator
from sys import intern
from typing import TYPE_CHECKING, Any

from regfsck import layout
from regfsck.inventory import BlobTable, Inventory, Link, LinkMap, Repository, Tag
from regfsck.manifest import (
    MAX_MANIFEST_BYTES,
    Descriptor,
    Manifest,
    ManifestError,
    PackedManifest,
    parse_packed,
    share_descriptors,
)
from regfsck.storage import FilesystemStorage, StorageError

if TYPE_CHECKING:
    from regfsck.scanner import Scanner, Task

PROCESSES_ENV = "REGFSCK_SCAN_PROCESSES"
DEFAULT_PROCESSES = 8
MIN_BLOBS = 4000  # below this (estimated) the serial walk is done before workers start

Fragment = tuple[str, Inventory]
# Blob rows of the manifests a worker read (Depth.LIST), packed as `Inventory.packed_blobs`:
# the digests joined by newlines and their (size, mtime_ns, ctime_ns, inode) as bytes.
Stated = list[tuple[str, bytes]]


def scan_processes() -> int | None:
    """Worker processes for the walk: REGFSCK_SCAN_PROCESSES=N forces N (0 or 1: the serial
    walk, whatever the size); unset: None, meaning DEFAULT_PROCESSES for a big tree."""
    value = os.environ.get(PROCESSES_ENV, "")
    return max(1, min(64, int(value))) if value.isdigit() else None


# --------------------------------------------------------------------------- encoding


def _enc_links(links: LinkMap) -> tuple[str, list[tuple[str, Link]]]:
    """A link map as the digests of its plain links (one string) and its odd links."""
    return "\n".join(links.plain()), list(links.odd().items())


def _dec_links(data: tuple[str, list[tuple[str, Link]]], out: LinkMap) -> LinkMap:
    """Fill the (empty) map `out` (its owner's) with what `_enc_links` made."""
    plain, odd = data
    if plain:
        out.extend_listed([intern(digest) for digest in plain.split("\n")])
    for digest, link in odd:
        if link.target is not None:
            link.target = intern(link.target)
        out[intern(digest)] = link
    return out


def _enc_tag(tag: Tag) -> tuple[Any, ...]:
    current: Any = tag.current
    cur = tag.current
    if (cur is not None and cur.target is not None and cur.error is None and cur.raw is None
            and cur.mtime_ns == 0 and cur.path == f"{tag.path}/{layout.CURRENT}/{layout.LINK}"):
        current = cur.target
    return (tag.name, tag.path, current, _enc_links(tag.index), tag.mtime_ns)


def _dec_tag(data: tuple[Any, ...]) -> Tag:
    name, path, current, index, mtime_ns = data
    if type(current) is str:
        current = Link.current_of(path, intern(current))
    elif current is not None and current.target is not None:
        current.target = intern(current.target)
    tag = Tag(name, path, current, mtime_ns=mtime_ns)
    _dec_links(index, tag.index)
    return tag


def _enc_repo(repo: Repository) -> tuple[Any, ...]:
    return (repo.name, repo.path, repo.has_manifests, repo.has_layers, repo.mtime_ns,
            _enc_links(repo.revisions), _enc_links(repo.layers),
            [_enc_tag(t) for t in repo.tags.values()], repo.uploads, repo.layers_unread)


def _dec_repo(data: tuple[Any, ...]) -> Repository:
    name, path, has_manifests, has_layers, mtime_ns, revisions, layers, tags, uploads, unread = data
    repo = Repository(name, path, has_manifests, has_layers, mtime_ns=mtime_ns,
                      layers_unread=unread)
    _dec_links(revisions, repo.revisions)
    _dec_links(layers, repo.layers)
    for tag_data in tags:
        tag = _dec_tag(tag_data)
        repo.tags[tag.name] = tag
    repo.uploads = uploads
    return repo


def _enc_inv(inv: Inventory) -> tuple[Any, ...]:
    digests, numbers, odd = inv.blobs.rows()
    return ("\n".join(digests), numbers.tobytes(), odd, inv.misplaced_blobs,
            [_enc_repo(r) for r in inv.repositories.values()], inv.anomalies,
            inv.files_seen, inv.dirs_seen, inv.name_dirs)


def _dec_inv(data: tuple[Any, ...], inv: Inventory) -> Inventory:
    digests, raw_numbers, odd, misplaced, repos, anomalies, files_seen, dirs_seen, name_dirs = data
    if digests:
        inv.packed_blobs.append((digests, raw_numbers))
    blobs = inv.blobs
    for blob in odd:
        blobs[intern(blob.digest)] = blob
    inv.misplaced_blobs.extend(misplaced)
    for repo_data in repos:
        repo = _dec_repo(repo_data)
        inv.repositories[repo.name] = repo
    inv.anomalies.extend(anomalies)
    inv.files_seen += files_seen
    inv.dirs_seen += dirs_seen
    inv.name_dirs.update(name_dirs)
    return inv


# --------------------------------------------------------------------------- workers

_JOB: tuple[Scanner, list[Task]] | None = None  # set before the fork, read by the workers


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the pool, workers stay quiet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _manifest_digests(fragments: list[Fragment]) -> list[str]:
    """The digests this worker's revision links name (by path and by content)."""
    wanted: dict[str, None] = {}
    for _, inv in fragments:
        for repo in inv.repositories.values():
            wanted.update(dict.fromkeys(repo.revisions.named()))
    return list(wanted)


def _by_fanout(digests: list[str]) -> dict[str, list[tuple[str, str]]]:
    """The digests by blob fan-out directory: (hex, digest) each.

    A worker reads its manifests through one descriptor per fan-out directory (`<hex>/data`
    relative to it), not one per blob directory: two system calls and a full path lookup
    fewer per manifest. Following a symbolically linked `<hex>` here is harmless: the
    parent uses a manifest read early only for a blob the walk recorded, and the walk
    records a blob only in a real directory (a symlink there is an anomaly, no blob)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for digest in digests:
        try:
            directory = layout.blob_dir(digest)
        except ValueError:
            continue
        fan_dir, _, hex_part = directory.rpartition("/")
        out.setdefault(fan_dir, []).append((hex_part, digest))
    return out


def _work(index: int) -> bytes:
    """Run task `index` and everything it spawns; the fragments and the manifests read."""
    assert _JOB is not None
    scanner, tasks = _JOB
    fragments: list[Fragment] = []
    stack = [tasks[index]]
    while stack:
        key, work = stack.pop()
        child = scanner._child()
        stack.extend(reversed(work(child)))
        fragments.append((key, child.inv))
    manifests: dict[str, bytes | tuple[int, PackedManifest]] = {}
    # A dry run's walk only listed the blob directories (Depth.LIST): what these reads
    # lstat'ed first are the manifests' rows (size, mtime, ctime, inode), so the parent
    # need not look again (`Scanner.settle_blobs` would).
    stated = BlobTable() if scanner.depth.value == "list" else None
    storage = scanner.storage
    assert isinstance(storage, FilesystemStorage)  # workers walk local trees only
    for fan_dir, names in _by_fanout(_manifest_digests(fragments)).items():
        try:
            contents = storage.read_small_many_stated(
                fan_dir, [f"{n}/{layout.DATA}" for n, _ in names], MAX_MANIFEST_BYTES)
        except StorageError:
            continue  # the parent reads them one by one and reports what fails
        for (_, digest), read in zip(names, contents, strict=True):
            if isinstance(read, StorageError):
                continue
            st, raw = read
            if stated is not None:
                stated.add(digest, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            if len(raw) <= MAX_MANIFEST_BYTES:
                manifests[digest] = _packed_or_raw(raw)
    rows = None
    if stated:
        digests, numbers, _ = stated.rows()
        rows = ("\n".join(digests), numbers.tobytes())
    return pickle.dumps(([(key, _enc_inv(inv)) for key, inv in fragments], manifests, rows),
                        protocol=pickle.HIGHEST_PROTOCOL)


def _packed_or_raw(raw: bytes) -> bytes | tuple[int, PackedManifest]:
    """A manifest read by a worker as it crosses to the parent: packed (with its size),
    the form the parent's `ManifestStore` keeps, when it parses cleanly and the string
    numbers it needs are the ones the parent has too; else its bytes, which the parent
    parses and judges itself (`_take`)."""
    try:
        packed = parse_packed(raw, new_strings=False)
    except ManifestError:
        return raw
    return (len(raw), packed) if type(packed) is tuple else raw


def run_in_processes(scanner: Scanner, tasks: list[Task], processes: int,
                     on_fragment: Callable[[str], None]
                     ) -> tuple[list[Fragment], dict[str, tuple[int, Any]], Stated]:
    """Run `tasks` (each with what it spawns) in `processes` forked workers; the fragments
    (unsorted), the manifests the workers read, by digest: (size read, what
    `ManifestStore._parse` made of the bytes), and (Depth.LIST) their blobs' rows."""

    global _JOB
    fragments: list[Fragment] = []
    manifests: dict[str, tuple[int, Any]] = {}
    stated: Stated = []
    descriptors: dict[Descriptor, Descriptor] = {}  # shared by the manifests read
    _JOB = (scanner, tasks)  # (the collector is off: `Scanner.scan`)
    try:
        ctx = multiprocessing.get_context("fork")
        chunk = max(1, len(tasks) // (processes * 16))
        # Results the parent has not taken yet wait, pickled, in the pool's queue: on a
        # machine with fewer cores than workers the parent falls behind, and a whole tree's
        # results would pile up there (memory, issue 15). The feeder hands out a task only
        # when the parent has taken enough results: a bounded window of tasks in flight.
        # (The feeder is the pool's own thread: it must never wait for a parent that has
        # stopped taking results, or closing the pool would wait for it forever.)
        window = threading.Semaphore(chunk * processes * 2)
        stopping = threading.Event()

        def feed() -> Iterator[int]:
            for index in range(len(tasks)):
                while not window.acquire(timeout=0.05):
                    if stopping.is_set():
                        return
                yield index

        with ctx.Pool(processes, initializer=_worker_init) as pool:
            try:
                for data in pool.imap_unordered(_work, feed(), chunksize=chunk):
                    window.release()
                    _take(data, scanner, manifests, stated, descriptors, fragments,
                          on_fragment)
            finally:
                stopping.set()
    finally:
        _JOB = None
    return fragments, manifests, stated


def _take(data: bytes, scanner: Scanner, manifests: dict[str, tuple[int, Any]],
          stated: Stated, descriptors: dict[Descriptor, Descriptor],
          fragments: list[Fragment], on_fragment: Callable[[str], None]) -> None:
    """One worker's result: its manifests parsed, its fragments decoded."""
    from regfsck.graph import ManifestStore

    encoded, read, rows = pickle.loads(data)
    if rows:
        stated.append(rows)
    for digest, raw in read.items():
        if type(raw) is tuple:  # packed by the worker: its digests become the shared strings
            size, packed = raw
            manifests[intern(digest)] = (size, (packed[0], *map(intern, packed[1:])))
            continue
        parsed = ManifestStore._parse(raw)  # parsed at once: no pile of raw bytes
        if isinstance(parsed, Manifest):
            parsed = share_descriptors(parsed, descriptors)
        manifests[intern(digest)] = (len(raw), parsed)
    for key, enc in encoded:
        fragments.append((key, _dec_inv(enc, scanner._child().inv)))
        on_fragment(key)
