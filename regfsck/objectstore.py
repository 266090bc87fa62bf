"""The object-storage backend of the storage seam: a registry tree in an S3 bucket.

Listing is the whole game on object storage: the official collector lists one "directory"
at a time, one request each. Here the `v2` prefix is listed flat (ListObjectsV2: 1,000 keys
a page, sizes, mtimes and ETags included, never a HEAD per object) in parallel partitions
(`blobs/<alg>/<xx>/` and each first level under `repositories/`), once. That listing is
turned into the same directory model the filesystem backend reads with `os.scandir`
(`scandir`, `list_dir`, `stat`, `lstat_many`), so the scanner walks both with the same code
and a tree in a bucket gives the same inventory as the same tree on disk. S3 has no
directories: a "directory" exists while a key lies below it, and its mtime is the newest
mtime below it (an emptied directory does not exist, as after the registry's own deletes).

Reads are GETs, many in flight (`jobs`, 64 by default): link files and `startedat` are
fetched together right after the listing (`prefetch`), and a link whose listed ETag is the
MD5 of the content its path implies is known without a GET (the ETag of an object written
by one PutObject without SSE-KMS is the MD5 of its bytes; any other ETag means the object
is read). Blobs are hashed from streaming GETs in bounded chunks.

Every request is counted by kind (`request_counts`): S3 bills per request and an operator
wants to know what a run costs. The client is `obstore` (Rust `object_store`: I/O outside
the GIL, paginated listing, retries with backoff).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import stat as stat_module
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from regfsck.layout import STATE_DIR
from regfsck.root import S3Location
from regfsck.safety import LockHeldError
from regfsck.storage import EntryKind, Stat, StorageError, StorageSpec, check_relative, entry_stat

if TYPE_CHECKING:
    from obstore.store import AzureStore, S3Store

    ObjectClient = S3Store | AzureStore

DEFAULT_JOBS = 64
JOBS_ENV = "REGFSCK_S3_JOBS"
TRUST_ETAG_ENV = "REGFSCK_S3_TRUST_ETAG"  # "0": GET every link file
LIST_PAGE = 1000  # keys per ListObjectsV2 page (the S3 maximum)
STREAM_CHUNK = 1 << 20

_FILE_MODE = stat_module.S_IFREG | 0o644
_DIR_MODE = stat_module.S_IFDIR | 0o755


class _Counter:
    """Requests by kind, for the whole process (every storage object adds to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + n

    def take(self) -> dict[str, int]:
        """The counts so far, reset to zero (a worker process hands its requests back)."""
        with self._lock:
            counts, self.counts = self.counts, {}
        return counts

    def merge(self, counts: dict[str, int]) -> None:
        """Add a worker process's counts to this process's."""
        for kind, n in counts.items():
            self.add(kind, n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            counts = dict(sorted(self.counts.items()))
        counts["total"] = sum(v for k, v in counts.items() if k != "get_bytes")
        return counts


REQUESTS = _Counter()


def request_counts() -> dict[str, int]:
    """Requests made so far by kind (`list`, `get`, ...), `get_bytes` and a `total`."""
    return REQUESTS.snapshot()


def _etag_content(size: int, etag: str, candidates: Sequence[bytes]) -> bytes | None:
    """The candidate an object holds, proven by its listed size and ETag (the MD5 of the
    bytes of any object written by one PutObject without SSE-KMS), or None."""
    tag = etag.strip('"')
    for content in candidates:
        if len(content) == size and hashlib.md5(content, usedforsecurity=False).hexdigest() == tag:
            return content
    return None


def default_jobs() -> int:
    value = os.environ.get(JOBS_ENV, "")
    return max(1, min(1024, int(value))) if value.isdigit() else DEFAULT_JOBS


# -- the client ----------------------------------------------------------------


def _aws_profile_credentials() -> tuple[str, str, str | None, str | None] | None:
    """(key, secret, token, region) from the AWS shared files / profile, if boto3 is there."""
    try:
        import boto3  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        session = boto3.Session()
        creds = session.get_credentials()
    except Exception:  # a broken profile: obstore's own chain decides
        return None
    if creds is None:
        return None
    frozen = creds.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token, session.region_name


def client_config(location: S3Location, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """How to reach `location` (obstore's S3 config keys): explicit config first, then the
    AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION), then the shared files and AWS_PROFILE."""
    env = os.environ if environ is None else environ
    config: dict[str, Any] = {}
    endpoint = location.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        config["endpoint"] = endpoint
    region = location.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    key = location.access_key or env.get("AWS_ACCESS_KEY_ID")
    secret = location.secret_key or env.get("AWS_SECRET_ACCESS_KEY")
    token = None if location.access_key else env.get("AWS_SESSION_TOKEN")
    if not (key and secret):
        profile = _aws_profile_credentials()
        if profile is not None:
            key, secret, token, profile_region = profile
            region = region or profile_region
    if key and secret:
        config["access_key_id"] = key
        config["secret_access_key"] = secret
        if token:
            config["token"] = token
    else:
        config["skip_signature"] = True  # a public bucket, or the server says no
    config["region"] = region or "us-east-1"
    if location.force_path_style is not None:
        config["virtual_hosted_style_request"] = not location.force_path_style
    elif not endpoint:
        config["virtual_hosted_style_request"] = True
    return config


def azure_client_config(location: S3Location,
                        environ: dict[str, str] | None = None) -> dict[str, Any]:
    """How to reach an Azure container (obstore's Azure config keys): the registry's
    `azure` parameters first, then AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT,
    AZURE_STORAGE_ACCOUNT_KEY / AZURE_STORAGE_KEY and AZURE_STORAGE_ENDPOINT (the account's
    blob URL, e.g. Azurite's `http://127.0.0.1:10000/devstoreaccount1`)."""
    env = os.environ if environ is None else environ
    config: dict[str, Any] = {}
    account = location.access_key or env.get("AZURE_STORAGE_ACCOUNT_NAME") or \
        env.get("AZURE_STORAGE_ACCOUNT")
    key = location.secret_key or env.get("AZURE_STORAGE_ACCOUNT_KEY") or env.get("AZURE_STORAGE_KEY")
    endpoint = location.endpoint or env.get("AZURE_STORAGE_ENDPOINT")
    if account:
        config["account_name"] = account
    if key:
        config["account_key"] = key
    else:
        config["skip_signature"] = True  # a public container, or the server says no
    if endpoint:
        config["endpoint"] = endpoint
    return config


def make_client(location: S3Location, environ: dict[str, str] | None = None) -> ObjectClient:
    """The obstore client for `location` (see `client_config`)."""
    if location.provider == "azure":
        from obstore.store import AzureStore

        azure = azure_client_config(location, environ)
        options: dict[str, Any] = {"allow_http": str(azure.get("endpoint", "")).startswith("http://"),
                                   "timeout": "300s", "connect_timeout": "10s"}
        return AzureStore(location.bucket, config=azure, client_options=options)  # type: ignore[arg-type]
    from obstore.store import S3Store

    config = client_config(location, environ)
    endpoint = str(config.get("endpoint", ""))
    client_options: dict[str, Any] = {"allow_http": endpoint.startswith("http://"),
                                      "timeout": "300s", "connect_timeout": "10s"}
    # object_store reads AWS_* itself too; everything it needs is passed explicitly above.
    return S3Store(location.bucket, config=config, client_options=client_options)  # type: ignore[arg-type]


def boto_client(location: S3Location, what: str, path: str, *, pool: int = 10) -> Any:
    """A boto3 S3 client for what obstore cannot ask: a listing of keys it refuses to parse,
    and a multipart upload completed only if the key is still absent (object_store sends
    If-None-Match on single PUTs only). Configured from `client_config`, as obstore is."""
    try:
        import boto3
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError as exc:
        raise StorageError(errno.EIO, f"cannot {what} boto3 (needed for it) is not installed",
                           path) from exc
    config = client_config(location)
    style = "virtual" if config.get("virtual_hosted_style_request") else "path"
    return boto3.client("s3", endpoint_url=config.get("endpoint"), region_name=config["region"],
                        aws_access_key_id=config.get("access_key_id"),
                        aws_secret_access_key=config.get("secret_access_key"),
                        aws_session_token=config.get("token"),
                        config=Config(s3={"addressing_style": style}, max_pool_connections=pool,
                                      retries={"mode": "standard"}))


def _list_raw(location: S3Location, prefix: str,
              delimiter: bool) -> tuple[list[dict[str, Any]], list[str], int]:
    """ListObjectsV2 through boto3, for a partition holding a key obstore refuses to parse
    (an empty, `.` or `..` segment: `a//b`, `a/./b`). Such keys are possible on S3 and
    must become findings, not stop the scan. Returns (objects, common prefixes, pages)."""
    if location.provider != "s3":
        raise StorageError(errno.EIO, f"cannot list {prefix}: a key there is not a valid path "
                           f"(only S3 keys of that kind are listed as findings)", prefix)
    client = boto_client(location, f"list {prefix}: a key there is not a valid path and",
                         prefix)
    objects: list[dict[str, Any]] = []
    prefixes: list[str] = []
    pages = 0
    kwargs: dict[str, Any] = {"Bucket": location.bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE}
    if delimiter:
        kwargs["Delimiter"] = "/"
    while True:
        page = client.list_objects_v2(**kwargs)
        pages += 1
        for item in page.get("Contents", []):
            objects.append({"path": item["Key"], "size": item["Size"],
                            "last_modified": item["LastModified"], "e_tag": item.get("ETag")})
        prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
        if not page.get("IsTruncated"):
            return objects, prefixes, pages
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


# -- the directory model of a listing -------------------------------------------


@dataclass(slots=True)
class _File:
    size: int
    mtime_ns: int
    etag: str | None


class ListedStat:
    """What `os.stat_result` offers the scanner, for a listed key or implied directory."""

    __slots__ = ("st_ctime_ns", "st_ino", "st_mode", "st_mtime_ns", "st_size")

    def __init__(self, mode: int, size: int, mtime_ns: int) -> None:
        self.st_mode = mode
        self.st_size = size
        self.st_mtime_ns = mtime_ns
        self.st_ctime_ns = mtime_ns
        self.st_ino = 0


class ListedEntry:
    """What `os.DirEntry` offers the scanner, for one name in a listed directory."""

    __slots__ = ("_stat", "name")

    def __init__(self, name: str, st: ListedStat) -> None:
        self.name = name
        self._stat = st

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return stat_module.S_ISDIR(self._stat.st_mode)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return stat_module.S_ISREG(self._stat.st_mode)

    def is_symlink(self) -> bool:
        return False  # object storage has no symbolic links

    def stat(self, *, follow_symlinks: bool = True) -> ListedStat:
        return self._stat


class _Tree:
    """Files and implied directories of one flat listing, by path relative to `v2`."""

    def __init__(self) -> None:
        self.files: dict[str, _File] = {}
        self.dirs: dict[str, dict[str, bool]] = {"": {}}  # dir -> {child name: is_dir}
        self.dir_mtime: dict[str, int] = {"": 0}
        self.skipped: list[str] = []  # keys no path can name (empty or dot components)

    def add(self, rel: str, meta: _File) -> None:
        parts = rel.split("/")
        if rel.endswith("/"):  # a "directory marker" object some tools create
            parts = parts[:-1]
            meta = _File(-1, meta.mtime_ns, None)
        if not parts or any(p in ("", ".", "..") or "\x00" in p for p in parts):
            self.skipped.append(rel)
            return
        directory = ""
        for part in parts[:-1]:
            self._touch(directory, meta.mtime_ns)
            children = self.dirs[directory]
            if children.get(part) is False:  # a key that is also a "directory": the layout
                other = f"{directory}/{part}" if directory else part  # wins, the file is odd
                del self.files[other]
                self.skipped.append(other)
            children[part] = True
            directory = f"{directory}/{part}" if directory else part
            self.dirs.setdefault(directory, {})
        self._touch(directory, meta.mtime_ns)
        name = parts[-1]
        path = f"{directory}/{name}" if directory else name
        if meta.size < 0:
            self.dirs[directory][name] = True
            self.dirs.setdefault(path, {})
            self._touch(path, meta.mtime_ns)
            return
        if self.dirs[directory].get(name) is True:
            self.skipped.append(rel)
            return
        self.dirs[directory][name] = False
        self.files[path] = meta

    def _touch(self, directory: str, mtime_ns: int) -> None:
        if mtime_ns > self.dir_mtime.get(directory, 0):
            self.dir_mtime[directory] = mtime_ns

    def stat_of(self, path: str) -> ListedStat | None:
        meta = self.files.get(path)
        if meta is not None:
            return ListedStat(_FILE_MODE, meta.size, meta.mtime_ns)
        if path in self.dirs:
            return ListedStat(_DIR_MODE, 0, self.dir_mtime.get(path, 0))
        return None


def _mtime_ns(meta: dict[str, Any]) -> int:
    """LastModified in whole seconds: a HEAD gives it as an HTTP date (seconds) while some
    servers (MinIO) list it to the millisecond, and the re-check before a move compares a
    HEAD with what the listing said (AWS and moto list whole seconds: nothing changes)."""
    when = meta["last_modified"]
    return int(when.timestamp()) * 1_000_000_000


class _ChunkReader(io.RawIOBase):
    """A streaming GET as a read-only binary file (deep.py, export, inspect read these)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(target), len(self._pending))
        target[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _counted(stream: Iterable[Any], failed: Callable[[BaseException], StorageError]
             ) -> Iterator[bytes]:
    """A GET's body as bytes, its size added to `get_bytes` however it ends (S3 bills the
    bytes sent, read to the end or not); a failure midway becomes `failed(exc)`."""
    total = 0
    try:
        for chunk in stream:
            data = bytes(chunk)
            total += len(data)
            yield data
    except Exception as exc:
        raise failed(exc) from exc
    finally:
        REQUESTS.add("get_bytes", total)


class _AtLocation:
    """What the reader and the writer of one location share: its client, made on first
    use, and the key of a path (validated, relative) below their `base`."""

    location: S3Location
    base: str
    _client: ObjectClient | None

    @property
    def client(self) -> ObjectClient:
        if self._client is None:
            self._client = make_client(self.location)
        return self._client

    def key(self, path: str) -> str:
        return self.base + "/".join(check_relative(path))


class ObjectStorage(_AtLocation):
    """A registry tree under `s3://BUCKET/PREFIX/docker/registry/v2/` (read-only).

    The first call that needs the directory model lists the whole prefix; paths are
    relative to the `v2` directory, as for `FilesystemStorage`."""

    scan_threads = 1  # the walk runs on the listing in memory; reads are batched below

    def __init__(self, location: S3Location, *, jobs: int | None = None,
                 client: ObjectClient | None = None, base: str | None = None) -> None:
        self.location = location
        self.base = location.v2_prefix if base is None else base  # a quarantine payload's
        self.jobs = jobs or default_jobs()
        self.io_threads = self.jobs  # manifests: ManifestStore.preload reads this many at once
        self._client = client
        self._tree: _Tree | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, bytes | StorageError] = {}
        self.trust_etag = os.environ.get(TRUST_ETAG_ENV, "1") != "0"

    # -- plumbing ------------------------------------------------------------------
    def describe(self, path: str) -> str:
        return f"{self.location.provider}://{self.location.bucket}/{self.key(path)}"

    def spec(self) -> StorageSpec:
        return StorageSpec(s3=self.location, jobs=self.jobs)

    def _error(self, exc: BaseException, what: str, path: str) -> StorageError:
        if isinstance(exc, FileNotFoundError) or type(exc).__name__ == "NotFoundError":
            return StorageError(errno.ENOENT, f"cannot {what} {path}: no such object", path)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StorageError(errno.EIO, f"cannot {what} {path}: {first}", path)

    # -- listing -------------------------------------------------------------------
    @property
    def tree(self) -> _Tree:
        with self._lock:
            if self._tree is None:
                self._tree = self._list_everything()
            return self._tree

    def _list_flat(self, prefix: str) -> list[dict[str, Any]]:
        """Every key below `prefix`, page by page (never fewer pages than needed)."""
        import obstore
        from obstore.exceptions import InvalidPathError

        metas: list[dict[str, Any]] = []
        try:
            for page in obstore.list(self.client, prefix, chunk_size=LIST_PAGE):
                metas.extend(page)  # type: ignore[arg-type]
        except InvalidPathError:
            metas, _, pages = self._raw(prefix, delimiter=False)
            REQUESTS.add("list", pages)
            return metas
        except Exception as exc:
            raise self._error(exc, "list", prefix[len(self.base):] or ".") from exc
        REQUESTS.add("list", max(1, -(-len(metas) // LIST_PAGE)))
        return metas

    def _raw(self, prefix: str, *, delimiter: bool) -> tuple[list[dict[str, Any]], list[str], int]:
        try:
            return _list_raw(self.location, prefix, delimiter)
        except StorageError:
            raise
        except Exception as exc:
            raise self._error(exc, "list", prefix[len(self.base):] or ".") from exc

    def _list_level(self, prefix: str) -> tuple[list[dict[str, Any]], list[str]]:
        """One delimiter listing: (objects directly at `prefix`, common prefixes)."""
        import obstore
        from obstore.exceptions import InvalidPathError

        try:
            result = obstore.list_with_delimiter(self.client, prefix)
        except InvalidPathError:
            objects, found, pages = self._raw(prefix, delimiter=True)
            REQUESTS.add("list", pages)
            return objects, [p if p.endswith("/") else p + "/" for p in found]
        except Exception as exc:
            raise self._error(exc, "list", prefix[len(self.base):] or ".") from exc
        listed: list[dict[str, Any]] = [dict(meta) for meta in result["objects"]]
        prefixes = [p if p.endswith("/") else p + "/" for p in result["common_prefixes"]]
        REQUESTS.add("list", max(1, -(-(len(listed) + len(prefixes)) // LIST_PAGE)))
        return listed, prefixes

    def _partitions(self, pool: ThreadPoolExecutor) -> tuple[list[dict[str, Any]], list[str]]:
        """Split the `v2` prefix into partitions to list flat in parallel: the fan-outs
        `blobs/<alg>/<xx>/` and the first levels of `repositories/`; anything else below
        `v2/` is listed flat as it is. Returns (keys seen on the way, partitions)."""
        objects, top = self._list_level(self.base)
        flat: list[str] = []
        split = []
        for prefix in top:
            if prefix in (self.base + "blobs/", self.base + "repositories/"):
                split.append(prefix)
            else:
                flat.append(prefix)
        algorithms: list[str] = []
        for found, prefixes in pool.map(self._list_level, split):
            objects.extend(found)
            for prefix in prefixes:
                (algorithms if prefix.startswith(self.base + "blobs/") else flat).append(prefix)
        for found, prefixes in pool.map(self._list_level, algorithms):
            objects.extend(found)
            flat.extend(prefixes)
        return objects, sorted(flat)

    def _list_everything(self) -> _Tree:
        tree = _Tree()
        base_len = len(self.base)
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="regfsck-list") as pool:
            objects, partitions = self._partitions(pool)
            pages = [objects, *pool.map(self._list_flat, partitions)]
        for page in pages:
            for meta in page:
                key = meta["path"]
                if key.startswith(self.base):
                    tree.add(key[base_len:], _File(meta["size"], _mtime_ns(meta), meta.get("e_tag")))
        if not tree.files and len(tree.dirs) == 1:
            raise StorageError(errno.ENOENT, f"no objects under {self.describe('')}/", "")
        return tree

    def exists(self) -> bool:
        """True when the bucket holds a tree at this prefix (lists it)."""
        try:
            return bool(self.tree.files)
        except StorageError:
            return False

    def unmodelled(self) -> list[str]:
        """Keys below `v2/` that no path of the directory model can name (an empty, `.` or
        `..` component, or a key that is also the prefix of other keys): the walk cannot meet
        them, so the scanner reports each one."""
        return sorted(self.tree.skipped)

    # -- the directory model (no requests after the listing) -------------------------
    def scandir(self, path: str) -> Iterator[ListedEntry]:
        tree = self.tree
        directory = "/".join(check_relative(path))
        children = tree.dirs.get(directory)
        if children is None:
            code = errno.ENOTDIR if directory in tree.files else errno.ENOENT
            raise StorageError(code, f"cannot list {path or '.'}: "
                               f"{'not a directory' if code == errno.ENOTDIR else 'no such directory'}",
                               path)
        for name in list(children):
            child = f"{directory}/{name}" if directory else name
            st = tree.stat_of(child)
            if st is not None:
                yield ListedEntry(name, st)

    def list_dir(self, path: str) -> list[Any]:
        from regfsck.storage import Entry

        return [Entry(e.name, EntryKind.DIR if e.is_dir() else EntryKind.FILE)
                for e in sorted(self.scandir(path), key=lambda e: e.name)]

    def stat(self, path: str) -> Stat | None:
        st = self.tree.stat_of("/".join(check_relative(path)))
        if st is None:
            return None
        kind = EntryKind.DIR if stat_module.S_ISDIR(st.st_mode) else EntryKind.FILE
        return Stat(kind, st.st_size, st.st_mtime_ns, st.st_ctime_ns, 0)

    def lstat_many(self, dir_path: str, names: Sequence[str]) -> list[Any]:
        tree = self.tree
        prefix = "/".join(check_relative(dir_path))
        return [tree.stat_of(f"{prefix}/{name}" if prefix else name) for name in names]

    # -- reading ---------------------------------------------------------------------
    def _get(self, path: str, limit: int | None) -> bytes:
        """One GET (a ranged one when only the first `limit`+1 bytes matter)."""
        import obstore

        meta = self.tree.files.get(path)
        if meta is None:
            if path in self.tree.dirs:
                raise StorageError(errno.EISDIR, f"{path} is not a regular file", path)
            raise StorageError(errno.ENOENT, f"cannot open {path}: no such object", path)
        try:
            if limit is not None and meta.size > limit:
                REQUESTS.add("get_range")
                data = bytes(obstore.get_range(self.client, self.base + path, start=0,
                                               end=limit + 1))
            else:
                REQUESTS.add("get")
                data = bytes(obstore.get(self.client, self.base + path).bytes())
        except Exception as exc:
            raise self._error(exc, "read", path) from exc
        REQUESTS.add("get_bytes", len(data))
        return data

    def _get_result(self, path: str, limit: int | None) -> bytes | StorageError:
        try:
            return self._get(path, limit)
        except StorageError as exc:
            return exc

    def _cached(self, path: str) -> bytes | StorageError | None:
        with self._lock:
            return self._cache.pop(path, None)

    def prefetch(self, select: Callable[[str], bool], expected: Callable[[str], Sequence[bytes]],
                 limit: int) -> None:
        """Read every listed file `select` picks (at most `limit`+1 bytes each) with `jobs`
        GETs in flight, before the walk asks for them one by one. A file whose ETag is the
        MD5 of one of `expected(path)` (the contents the tree says it may hold) and whose
        size matches is known without a request."""
        tree = self.tree
        todo: list[str] = []
        known: dict[str, bytes | StorageError] = {}
        for path, meta in tree.files.items():
            if not select(path):
                continue
            content = _etag_content(meta.size, meta.etag, expected(path)) \
                if self.trust_etag and meta.etag is not None else None
            if content is not None:
                known[path] = content
            else:
                todo.append(path)
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="regfsck-get") as pool:
            for path, result in zip(todo, pool.map(lambda p: self._get_result(p, limit), todo),
                                    strict=True):
                known[path] = result
        with self._lock:
            self._cache.update(known)

    def read_small(self, path: str, limit: int) -> bytes:
        path = "/".join(check_relative(path))
        meta = self.tree.files.get(path)
        if meta is not None and meta.size > limit:
            raise StorageError(errno.EFBIG, f"{path} is larger than {limit} bytes", path)
        cached = self._cached(path)
        data = self._get(path, limit) if cached is None else cached
        if isinstance(data, StorageError):
            raise data
        if len(data) > limit:
            raise StorageError(errno.EFBIG, f"{path} is larger than {limit} bytes", path)
        return data

    def read_link_fast(self, path: str, limit: int = 256) -> bytes:
        path = "/".join(check_relative(path))
        cached = self._cached(path)
        data = self._get(path, limit) if cached is None else cached
        if isinstance(data, StorageError):
            raise data
        return data[:limit + 1]

    def read_small_many(self, dir_path: str, names: Sequence[str], limit: int
                        ) -> list[bytes | StorageError]:
        prefix = "/".join(check_relative(dir_path))
        paths = [f"{prefix}/{name}" if prefix else name for name in names]
        results: list[bytes | StorageError | None] = [self._cached(p) for p in paths]
        missing = [i for i, r in enumerate(results) if r is None]
        if len(missing) > 1:
            with ThreadPoolExecutor(min(self.jobs, len(missing))) as pool:
                for i, got in zip(missing, pool.map(lambda i: self._get_result(paths[i], limit),
                                                    missing), strict=True):
                    results[i] = got
        else:
            for i in missing:
                results[i] = self._get_result(paths[i], limit)
        return [r if isinstance(r, StorageError) else r[:limit + 1]
                for r in results if r is not None]

    def iter_chunks(self, path: str, chunk_size: int = STREAM_CHUNK) -> Iterator[bytes]:
        """The object's bytes as a streaming GET, in pieces of about `chunk_size`."""
        import obstore

        path = "/".join(check_relative(path))
        # A worker process (StorageSpec.open) streams what the parent listed without listing
        # the bucket again: there a missing object is the GET's 404.
        if self._tree is not None and path not in self._tree.files:
            raise StorageError(errno.ENOENT, f"cannot open {path}: no such object", path)
        REQUESTS.add("get")
        try:
            result = obstore.get(self.client, self.base + path)
            stream = result.stream(min_chunk_size=chunk_size)
        except Exception as exc:
            raise self._error(exc, "read", path) from exc
        return _counted(stream, lambda exc: self._error(exc, "read", path))

    def open_read(self, path: str) -> BinaryIO:
        """A streaming read of a whole object (for deep checks, export and inspect)."""
        reader: Any = io.BufferedReader(_ChunkReader(self.iter_chunks(path)),
                                        buffer_size=STREAM_CHUNK)
        return reader  # type: ignore[no-any-return]


# -- mutations -------------------------------------------------------------------
# Object storage has no rename and no directories. A quarantine move is a server-side
# CopyObject of every key below the source to the same place below the destination (above
# 5 GiB, S3's limit for one, a multipart copy: `copy_checked`), each
# copy checked (size, and ETag when the source's is a plain MD5), then one DeleteObjects
# for the sources (1,000 keys a request): at every moment each key exists in the tree, in
# the quarantine, or in both (the copy done, the delete not yet) -- never in neither.
# "Directories" need no creation or removal: they exist while a key lies below them.

DELETE_PAGE = 1000  # keys per DeleteObjects request (the S3 maximum)
# A new object longer than PART_SIZE is a multipart upload of parts this long (S3: at least
# 5 MiB but the last, at most 10,000 parts: past each 1,000 parts they double), at most
# PARTS_IN_FLIGHT of them being sent while the next one fills (see `ObjectMutator.put_new`).
PART_SIZE = 8 << 20
PARTS_IN_FLIGHT = 4
# S3's CopyObject refuses a source larger than 5 GiB (InvalidRequest: "The specified copy
# source is larger than the maximum allowable size for a copy source"), and one UploadPartCopy
# copies at most as much. A larger object is copied as a multipart upload of byte ranges
# (`ObjectMutator._copy_multipart`). COPY_LIMIT_ENV may lower the limit (never raise it, never
# below S3's smallest part, MIN_PART): the tests run the multipart copy on small objects
# against a server that refuses CopyObject above the same lowered limit.
SINGLE_COPY_MAX = 5 << 30
COPY_LIMIT_ENV = "REGFSCK_S3_COPY_LIMIT"
MIN_PART = 5 << 20  # S3: every part but the last at least 5 MiB
MAX_PARTS = 10_000  # S3: parts of one multipart upload
COPY_PART_SIZE = 64 << 20  # our own layout's parts (a source's own layout is preferred)
LOCK_PATH = f"{STATE_DIR}/lock"  # relative to ROOT: outside docker/, where the registry looks
LOCK_REFRESH_S = 30.0
LOCK_STALE_S = 300.0


def _plain_md5(etag: str | None) -> bool:
    """An ETag that is the MD5 of the bytes (one PutObject, no SSE-KMS), not a multipart one."""
    value = (etag or "").strip('"')
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value.lower())


def _copy_of(copy: KeyInfo | None, source: KeyInfo | None) -> bool:
    """Is `copy` what `copy_checked` makes of `source`: the same size, and the same ETag
    when the source's is the MD5 of its bytes (a one-part object)?"""
    if copy is None or source is None or copy.size != source.size:
        return False
    return not _plain_md5(source.etag) or \
        (copy.etag or "").strip('"') == (source.etag or "").strip('"')


def _multipart_parts(etag: str | None) -> int | None:
    """N of a multipart upload's ETag (`<md5 of the parts' MD5s>-N`), else None."""
    value, dash, count = (etag or "").strip('"').rpartition("-")
    if dash and _plain_md5(value) and count.isdigit() and 0 < int(count) <= MAX_PARTS:
        return int(count)
    return None


def _composite_etag(part_etags: Sequence[str]) -> str | None:
    """The ETag S3 gives an object completed from parts with these ETags (the MD5 of their
    binary MD5s, `-N`), or None when a part's ETag is not an MD5 (SSE-KMS, another server)."""
    if not part_etags or not all(_plain_md5(e) for e in part_etags):
        return None
    digest = hashlib.md5(b"".join(bytes.fromhex(e.strip('"')) for e in part_etags),
                         usedforsecurity=False)
    return f"{digest.hexdigest()}-{len(part_etags)}"


def single_copy_max() -> int:
    """The largest object one copy request may copy (`SINGLE_COPY_MAX`, or lower by
    `COPY_LIMIT_ENV`): the one place the limit is read."""
    value = os.environ.get(COPY_LIMIT_ENV, "")
    return max(MIN_PART, min(SINGLE_COPY_MAX, int(value))) if value.isdigit() else SINGLE_COPY_MAX


def copy_layout(size: int, limit: int) -> list[int]:
    """Our own part sizes for a multipart copy of `size` bytes: parts of COPY_PART_SIZE (at
    most `limit`, at least MIN_PART), larger when more than MAX_PARTS would be needed."""
    part = max(MIN_PART, min(COPY_PART_SIZE, limit), -(-size // MAX_PARTS))
    whole, rest = divmod(size, part)
    return [part] * whole + ([rest] if rest else [])


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One object as listed or HEADed: ROOT-relative path, size, mtime, ETag."""

    path: str
    size: int
    mtime_ns: int
    etag: str | None


class ObjectMutator(_AtLocation):
    """Writes, copies and deletes below `s3://BUCKET/PREFIX/` (paths relative to ROOT,
    like the filesystem backend rooted at ROOT that the quarantine uses).

    Every request is counted in `REQUESTS` by kind: `list`, `head`, `get`, `put`, `copy`,
    `delete` (one DeleteObjects of up to 1,000 keys), for large new objects
    `multipart_create`, `put_part`, `multipart_complete`, `multipart_abort`, `list_uploads`,
    and for copies above `single_copy_max` `copy_part` (one UploadPartCopy) with the same
    `multipart_*` kinds and the `head`s that learn the source's parts."""

    def __init__(self, location: S3Location, *, jobs: int | None = None,
                 client: ObjectClient | None = None) -> None:
        self.location = location
        self.base = f"{location.prefix}/" if location.prefix else ""
        self.jobs = jobs or default_jobs()
        self._client = client
        self._boto_client: Any = None
        self._part_pool: ThreadPoolExecutor | None = None
        self._setup = threading.Lock()

    def key(self, path: str) -> str:
        if not check_relative(path):
            raise StorageError(errno.EINVAL, "the root itself is not an object", path)
        return super().key(path)

    def describe(self, path: str) -> str:
        return f"{self.location.provider}://{self.location.bucket}/{self.base}{path}"

    @staticmethod
    def _error(exc: BaseException, what: str, path: str) -> StorageError:
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        if isinstance(exc, NotFoundError | FileNotFoundError):
            return StorageError(errno.ENOENT, f"cannot {what} {path}: no such object", path)
        if isinstance(exc, AlreadyExistsError | PreconditionError):
            return StorageError(errno.EEXIST, f"cannot {what} {path}: it exists (or changed)",
                                path)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StorageError(errno.EIO, f"cannot {what} {path}: {first}", path)

    # -- reading the current state (never from a cached listing) ----------------------
    def head(self, path: str) -> KeyInfo | None:
        """The object at `path`, or None (one HEAD)."""
        import obstore
        from obstore.exceptions import NotFoundError

        REQUESTS.add("head")
        try:
            meta = obstore.head(self.client, self.key(path))
        except (NotFoundError, FileNotFoundError):
            return None
        except Exception as exc:
            raise self._error(exc, "stat", path) from exc
        return KeyInfo(path, int(meta["size"]), _mtime_ns(dict(meta)), meta.get("e_tag"))

    def list_below(self, path: str) -> list[KeyInfo]:
        """Every object below the "directory" `path` (flat, every page), sorted by path."""
        import obstore

        prefix = self.key(path) + "/" if check_relative(path) else self.base
        found: list[KeyInfo] = []
        pages = 0
        try:
            for page in obstore.list(self.client, prefix, chunk_size=LIST_PAGE):
                pages += 1
                for meta in page:
                    key = str(meta["path"])
                    if key.startswith(prefix):
                        found.append(KeyInfo(key[len(self.base):], int(meta["size"]),
                                             _mtime_ns(dict(meta)), meta.get("e_tag")))
        except Exception as exc:
            raise self._error(exc, "list", path or ".") from exc
        finally:
            REQUESTS.add("list", max(1, pages))
        return sorted(found, key=lambda k: k.path)

    def objects_at(self, path: str) -> list[KeyInfo]:
        """What `path` names now: every object below it (a "directory", which wins over an
        object of the same name, as in the listing's model), else the object itself; empty
        when neither exists. One listing, plus one HEAD when nothing lies below (most paths
        a run moves are directories: a blob's, a link's, an upload's)."""
        below = self.list_below(path)
        if below:
            return below
        found = self.head(path)
        return [found] if found is not None else []

    def read(self, path: str) -> bytes:
        import obstore

        REQUESTS.add("get")
        try:
            data = bytes(obstore.get(self.client, self.key(path)).bytes())
        except Exception as exc:
            raise self._error(exc, "read", path) from exc
        REQUESTS.add("get_bytes", len(data))
        return data

    # -- writing -----------------------------------------------------------------
    def put(self, path: str, data: bytes, *, create: bool = False,
            if_etag: str | None = None) -> str | None:
        """Write one object; `create`: only if absent (If-None-Match: *), `if_etag`: only if
        unchanged (If-Match). A refused condition is StorageError(EEXIST). Returns the ETag."""
        import obstore

        mode: Any = "create" if create else ({"e_tag": if_etag} if if_etag else "overwrite")
        REQUESTS.add("put")
        try:
            result = obstore.put(self.client, self.key(path), data, mode=mode)
        except Exception as exc:
            raise self._error(exc, "write", path) from exc
        return result.get("e_tag") if isinstance(result, dict) else None

    def put_new(self, path: str, chunks: Iterable[bytes]) -> int:
        """Create the object `path` from a stream of any length, in bounded memory, only if
        no object is there (a refused condition is StorageError(EEXIST)); returns its size.

        Up to `PART_SIZE` bytes go in one PutObject with If-None-Match: * (links, manifests,
        most configs). Anything longer is a multipart upload: parts of `PART_SIZE` bytes (and
        more, past 1,000 parts, to stay within S3's 10,000), at most `PARTS_IN_FLIGHT` of them
        held and sent at once, completed with If-None-Match: * (S3 since 2024, moto 5.2),
        so memory stays near `PART_SIZE * (PARTS_IN_FLIGHT + 1)` whatever the size.
        object_store (obstore) streams multipart uploads but sends that condition only on a
        single PUT, and a single PUT holds the whole object in memory: the multipart upload
        goes through boto3. A stream that raises (a digest that does not match) or a
        refused completion aborts the upload: nothing appears, no parts are left behind."""
        first = bytearray()
        stream = iter(chunks)
        for chunk in stream:
            first += chunk
            if len(first) >= PART_SIZE:
                break
        else:
            self.put(path, bytes(first), create=True)
            return len(first)
        if self.location.provider != "s3":  # (Azure: no conditional multipart path yet)
            data = bytes(first) + b"".join(stream)
            self.put(path, data, create=True)
            return len(data)
        return self._multipart_new(path, first, stream)

    def _boto(self) -> Any:
        with self._setup:
            if self._boto_client is None:  # a connection for every part in flight
                self._boto_client = boto_client(self.location, "write large objects:", "",
                                                pool=max(PARTS_IN_FLIGHT, self.jobs) + 2)
            return self._boto_client

    def _parts(self) -> ThreadPoolExecutor:
        """The pool of the multipart copies' requests, shared by every copy of this mutator:
        `jobs` in flight however many large objects a batch copies at once. Its tasks never
        wait on other tasks, so a copy waiting on its parts from `move`'s pool cannot
        deadlock."""
        with self._setup:
            if self._part_pool is None:
                self._part_pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="regfsck-copy-part")
            return self._part_pool

    def _multipart_new(self, path: str, first: bytearray, stream: Iterator[bytes]) -> int:
        from collections import deque
        from concurrent.futures import Future

        client = self._boto()
        key = self.key(path)
        bucket = self.location.bucket
        upload_id = self._create_upload(client, key, "write", path)

        def send(number: int, data: bytes) -> dict[str, Any]:
            REQUESTS.add("put_part")
            answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                        PartNumber=number, Body=data)
            return {"PartNumber": number, "ETag": answer["ETag"]}

        size = 0

        def send_all() -> list[dict[str, Any]]:
            nonlocal size
            parts: list[dict[str, Any]] = []
            pending: deque[Future[dict[str, Any]]] = deque()
            buffer = first
            with ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="regfsck-part") as pool:
                try:
                    number = 0
                    ended = False
                    while not ended:
                        part_size = PART_SIZE << min(number // 1000, 9)
                        if len(buffer) < part_size:
                            for chunk in stream:
                                buffer += chunk
                                if len(buffer) >= part_size:
                                    break
                            else:
                                ended = True
                        if not buffer and number:
                            break
                        number += 1
                        while len(pending) >= PARTS_IN_FLIGHT:  # bounded: wait for the oldest
                            parts.append(pending.popleft().result())
                        data, buffer = bytes(buffer), bytearray()
                        size += len(data)
                        pending.append(pool.submit(send, number, data))
                        del data
                    while pending:
                        parts.append(pending.popleft().result())
                finally:
                    for future in pending:
                        future.cancel()
            return parts

        self._complete_or_abort(client, key, upload_id, send_all, "write", path)
        return size

    @staticmethod
    def _boto_error(exc: BaseException, what: str, path: str) -> StorageError:
        code = ""
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return StorageError(errno.EEXIST, f"cannot {what} {path}: it exists (or changed)",
                                path)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StorageError(errno.EIO, f"cannot {what} {path}: {first}", path)

    def copy_checked(self, source: KeyInfo, dest: str) -> KeyInfo:
        """Server-side copy of one object, then a HEAD of the copy: same size, and the same
        ETag when the source's is the MD5 of its bytes (a multipart ETag changes on copy).
        A copy that does not match is deleted again and reported as an error.

        On S3 an object above `single_copy_max` (5 GiB: CopyObject refuses more) is copied
        in parts (`_copy_multipart`); its copy must have the size, and the ETag that the
        parts' ETags the server reported make; and when the source's parts were mirrored,
        the source's own ETag: then every part's MD5 is the source part's."""
        import obstore

        if self.location.provider == "s3" and source.size > single_copy_max():
            expected, mirrored = self._copy_multipart(source, dest)
            copied = self.head(dest)
            mine = (copied.etag or "").strip('"') if copied is not None else ""
            if copied is None or copied.size != source.size or (
                    expected is not None and mine != expected) or (
                    mirrored and mine != (source.etag or "").strip('"')):
                with _suppress_storage():
                    self.delete([dest])
                raise StorageError(errno.EIO, f"the copy of {source.path} at {dest} does not "
                                   "match it (size or ETag); nothing was deleted", source.path)
            return copied
        REQUESTS.add("copy")
        try:
            obstore.copy(self.client, self.key(source.path), self.key(dest), overwrite=True)
        except Exception as exc:
            raise self._error(exc, f"copy {source.path} to", dest) from exc
        copied = self.head(dest)
        if copied is None or copied.size != source.size or (
                _plain_md5(source.etag) and (copied.etag or "").strip('"')
                != (source.etag or "").strip('"')) or (
                self.location.provider == "azure" and not self._same_bytes(source.path, dest)):
            with _suppress_storage():
                self.delete([dest])
            raise StorageError(errno.EIO, f"the copy of {source.path} at {dest} does not match "
                               "it (size or ETag); nothing was deleted", source.path)
        return copied

    def _copy_multipart(self, source: KeyInfo, dest: str) -> tuple[str | None, bool]:
        """Copy `source` to `dest` as a multipart upload of byte ranges (UploadPartCopy),
        `jobs` parts in flight, completed only if `dest` is still free (If-None-Match: *).
        Returns (the ETag the parts make, or None when a part's ETag is no MD5; whether the
        source's own part layout was mirrored).

        Each part is copied only from the source as listed (x-amz-copy-source-if-match its
        ETag): a source rewritten meanwhile fails the copy. A failure aborts the upload (after
        the parts in flight end): nothing appears. A process killed meanwhile leaves the
        upload open, invisible: `settle_move` (the recovery of the run) aborts what is open
        at a move's destination, and the next copy to this key aborts it first (an undo
        tried again)."""
        from concurrent.futures import wait

        sizes, mirrored = self._part_layout(source)
        client = self._boto()
        key = self.key(dest)
        self.abort_uploads_at(dest)  # a copy to this key killed earlier (the key is free)
        upload_id = self._create_upload(client, key, f"copy {source.path} to", dest)
        ranges: list[tuple[int, int]] = []
        start = 0
        for size in sizes:
            ranges.append((start, start + size - 1))
            start += size
        futures = [self._parts().submit(self._copy_part, dest, upload_id, number, first, last,
                                        source)
                   for number, (first, last) in enumerate(ranges, 1)]
        def copied() -> list[dict[str, Any]]:
            try:
                return [future.result() for future in futures]
            finally:
                for future in futures:
                    future.cancel()
                wait(futures)  # nothing in flight when the upload is aborted

        parts = self._complete_or_abort(client, key, upload_id, copied,
                                        f"copy {source.path} to", dest)
        return _composite_etag([str(p["ETag"]) for p in parts]), mirrored

    def _create_upload(self, client: Any, key: str, what: str, path: str) -> str:
        """Open a multipart upload at `key` (its id)."""
        try:
            REQUESTS.add("multipart_create")
            return str(client.create_multipart_upload(Bucket=self.location.bucket,
                                                      Key=key)["UploadId"])
        except Exception as exc:
            raise self._boto_error(exc, what, path) from exc

    def _complete_or_abort(self, client: Any, key: str, upload_id: str,
                           send: Callable[[], list[dict[str, Any]]], what: str,
                           path: str) -> list[dict[str, Any]]:
        """Send an open upload's parts (`send`), then complete it only while its key is
        still free (If-None-Match: *); on any failure, an interrupt included, abort it, so
        nothing appears at the key and nothing stays open (a kill leaves it open: the
        recovery aborts it). A boto error becomes a StorageError ("cannot <what> <path>")."""
        bucket = self.location.bucket
        try:
            parts = send()
            REQUESTS.add("multipart_complete")
            client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                             MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                REQUESTS.add("multipart_abort")
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            if isinstance(exc, Exception) and not isinstance(exc, StorageError) and \
                    type(exc).__module__.startswith(("botocore", "boto3")):
                raise self._boto_error(exc, what, path) from exc
            raise
        return parts

    def _copy_part(self, dest: str, upload_id: str, number: int, first: int, last: int,
                   source: KeyInfo) -> dict[str, Any]:
        """One UploadPartCopy: bytes first..last of `source` as part `number` of `dest`."""
        REQUESTS.add("copy_part")
        kwargs: dict[str, Any] = {
            "Bucket": self.location.bucket, "Key": self.key(dest), "UploadId": upload_id,
            "PartNumber": number, "CopySourceRange": f"bytes={first}-{last}",
            "CopySource": {"Bucket": self.location.bucket, "Key": self.key(source.path)}}
        if source.etag:
            kwargs["CopySourceIfMatch"] = source.etag
        answer = self._boto().upload_part_copy(**kwargs)
        return {"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]}

    def _part_layout(self, source: KeyInfo) -> tuple[list[int], bool]:
        """The part sizes to copy `source` in, and whether they are the source's own.

        An object above 5 GiB on S3 is always a multipart upload (a PutObject takes at most
        5 GiB); copied with the same part sizes, its copy gets the same ETag, so comparing
        the ETags proves every part's MD5 equal, as a plain ETag does for a one-part copy.
        The sizes come from HEADs with partNumber (the first gives the parts' count, the
        others go `jobs` at a time). Without that (a one-part source, a server that does not
        answer partNumber, a part above the limit) the parts are our own (`copy_layout`)."""
        limit = single_copy_max()
        count = _multipart_parts(source.etag)
        if count is not None:
            first = self._head_part(source, 1)
            if first is not None and first[1] == count:
                sizes = [first[0], *(found[0] if found is not None else 0 for found in
                                     self._parts().map(lambda n: self._head_part(source, n),
                                                       range(2, count + 1)))]
                if sum(sizes) == source.size and all(0 < s <= limit for s in sizes):
                    return sizes, True
        return copy_layout(source.size, limit), False

    def _head_part(self, source: KeyInfo, number: int) -> tuple[int, int | None] | None:
        """(size of part `number` of `source`, the parts' count the server gives) or None."""
        REQUESTS.add("head")
        try:
            answer = self._boto().head_object(Bucket=self.location.bucket,
                                              Key=self.key(source.path), PartNumber=number)
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise StorageError(errno.ENOENT, f"cannot copy {source.path}: no such object",
                                   source.path) from exc
            return None  # no part answer: our own layout
        count = answer.get("PartsCount")
        return int(answer.get("ContentLength", 0)), int(count) if count is not None else None

    def _same_bytes(self, source: str, dest: str) -> bool:
        """Azure only: do the copy's bytes equal the source's (both streamed, compared in
        step)? Azure's Copy Blob may finish asynchronously (x-ms-copy-status: pending) and
        obstore neither waits for it nor shows the status, so a copy whose size matches may
        still be incomplete; deleting its source then would lose the object. Reading both
        back is what proves the copy before a source goes (it costs the moved bytes twice)."""
        mine = self.iter_chunks(source)
        theirs = self.iter_chunks(dest)
        left = right = b""
        while True:
            if not left:
                left = next(mine, b"")
            if not right:
                right = next(theirs, b"")
            if not left or not right:
                return not left and not right
            n = min(len(left), len(right))
            if left[:n] != right[:n]:
                return False
            left, right = left[n:], right[n:]

    def iter_chunks(self, path: str, chunk_size: int = STREAM_CHUNK) -> Iterator[bytes]:
        """A streaming GET of one object (counted as one `get` and its `get_bytes`)."""
        import obstore

        key = self.key(path)
        REQUESTS.add("get")

        def stream() -> Iterator[Any]:
            yield from obstore.get(self.client, key).stream(min_chunk_size=chunk_size)

        yield from _counted(stream(), lambda exc: self._error(exc, "read", path))

    def delete(self, paths: Sequence[str]) -> None:
        """Delete objects, 1,000 per DeleteObjects request (a missing key is no error).

        Azure's Blob Batch answers 404 for a missing blob and obstore raises it for the whole
        call: the keys of that chunk are then deleted one by one, a missing one skipped."""
        import obstore
        from obstore.exceptions import NotFoundError

        keys = [self.key(p) for p in paths]
        for start in range(0, len(keys), DELETE_PAGE):
            chunk = keys[start:start + DELETE_PAGE]
            REQUESTS.add("delete")
            try:
                obstore.delete(self.client, chunk)
            except (NotFoundError, FileNotFoundError):
                for offset, key in enumerate(chunk):
                    REQUESTS.add("delete")
                    try:
                        obstore.delete(self.client, key)
                    except (NotFoundError, FileNotFoundError):
                        continue
                    except Exception as exc:
                        raise self._error(exc, "delete", paths[start + offset]) from exc
            except Exception as exc:
                raise self._error(exc, "delete", paths[start]) from exc

    def move(self, moves: Sequence[tuple[str, str]]) -> list[list[str]]:
        """Move each (source, destination) path, a file or a "directory": copy every key
        (checked, `jobs` at a time), and only when every copy of the whole batch is in
        place delete the sources. Returns, per move, the source keys moved (ROOT-relative).

        A failed copy deletes the copies this call made and raises: no source was deleted.
        A failed delete raises with some sources still there: each key is then in both
        places, which `settle_move` resolves."""
        plans: list[list[tuple[KeyInfo, str]]] = []
        with ThreadPoolExecutor(max(1, min(self.jobs, len(moves) or 1)),
                                thread_name_prefix="regfsck-move") as pool:
            listed = list(pool.map(lambda m: self.objects_at(m[0]), moves))
            for (source, dest), objects in zip(moves, listed, strict=True):
                if not objects:
                    raise StorageError(errno.ENOENT, f"cannot move {source}: no such object",
                                       source)
                plans.append([(o, dest + o.path[len(source):]) for o in objects])
            copies = [pair for plan in plans for pair in plan]
            futures = [pool.submit(self.copy_checked, info, dest) for info, dest in copies]
            failure: BaseException | None = None
            for future in futures:
                try:
                    future.result()
                except BaseException as exc:  # every copy is waited for
                    failure = failure or exc
            if failure is not None:
                with _suppress_storage():
                    self.delete([dest for _, dest in copies])
                raise failure
        try:
            self.delete([info.path for info, _ in copies])
        except StorageError:
            self._restore(copies)  # put back any source already deleted: nothing moved
            raise
        return [[info.path for info, _ in plan] for plan in plans]

    def _restore(self, copies: Sequence[tuple[KeyInfo, str]]) -> None:
        """After a failed bulk delete: copy back each deleted source, then drop the copies,
        so the move as a whole did not happen (what the journal's `failed` line says). If
        that fails too, the keys stay in both places or the quarantine: `settle_move`."""
        with _suppress_storage():
            for info, dest in copies:
                if self.head(info.path) is None:
                    held = self.head(dest)
                    if held is not None:
                        self.copy_checked(held, info.path)
            self.delete([dest for _, dest in copies])

    def settle_move(self, source: str, dest: str) -> bool | None:
        """After a crash during `move`: did the move of `source` to `dest` happen?

        True: only the destination exists (or the deletes had begun: the remaining
        sources, whose copies are checked equal, are deleted now). False: only the source
        exists (or every source key is still there: the copies are deleted, the move had
        not begun to take effect). None: neither exists.

        The destination is the quarantine for a run's moves, but the live tree for an
        undo's moves back: a key there is deleted, or its source deleted for it, only when
        it is a copy of its source (`_copy_of`: size, and the ETag when the source's is its
        MD5, as `copy_checked` proved it). Anything else at the destination was written
        there since (a push): the settle refuses (StorageError EEXIST), nothing is changed."""
        here = {k.path[len(source):]: k for k in self.objects_at(source)}
        held = {k.path[len(dest):]: k for k in self.objects_at(dest)}
        self.abort_uploads_at(dest)  # a multipart copy killed between its parts
        if not held:
            return False if here else None
        if not here:
            return True
        if set(held) <= set(here):  # copies of a move not yet done
            self._refuse_unless_copies(source, dest, here, held, held)
            self.delete([dest + rest for rest in held])
            return False
        self._refuse_unless_copies(source, dest, here, held, here)  # deletes had begun
        self.delete([source + rest for rest in here])
        return True

    @staticmethod
    def _refuse_unless_copies(source: str, dest: str, here: dict[str, KeyInfo],
                              held: dict[str, KeyInfo], keys: Iterable[str]) -> None:
        for rest in keys:
            if not _copy_of(held.get(rest), here.get(rest)):
                raise StorageError(errno.EEXIST, f"{source}{rest} and {dest}{rest} differ after "
                                   "an interrupted move (one is not a copy of the other); "
                                   "resolve it by hand", source)

    def remove_below(self, path: str) -> int:
        """Delete every object below `path` for good (purge, a run's unused `new/`), and
        abort the multipart uploads left open there (a run killed while writing a large
        object ahead: invisible, but billed); returns the bytes freed."""
        objects = self.objects_at(path)
        self.delete([o.path for o in objects])
        self.abort_uploads_below(path)
        return sum(o.size for o in objects)

    def abort_uploads_below(self, path: str) -> int:
        """Abort every multipart upload open below the "directory" `path`; returns how many."""
        return self._abort_uploads(path, self.key(path) + "/", lambda key: True)

    def abort_uploads_at(self, path: str) -> int:
        """Abort every multipart upload open at the key `path` or below it (what a copy to
        `path`, a file or a "directory", killed between its parts left); returns how many."""
        at = self.key(path)
        return self._abort_uploads(path, at, lambda key: key == at or key.startswith(at + "/"))

    def _abort_uploads(self, path: str, prefix: str, wanted: Callable[[str], bool]) -> int:
        if self.location.provider != "s3":
            return 0
        client = self._boto()
        kwargs: dict[str, Any] = {"Bucket": self.location.bucket, "Prefix": prefix}
        aborted = 0
        try:
            while True:
                REQUESTS.add("list_uploads")
                page = client.list_multipart_uploads(**kwargs)
                for upload in page.get("Uploads", []):
                    if not wanted(str(upload["Key"])):
                        continue
                    REQUESTS.add("multipart_abort")
                    client.abort_multipart_upload(Bucket=self.location.bucket, Key=upload["Key"],
                                                  UploadId=upload["UploadId"])
                    aborted += 1
                if not page.get("IsTruncated"):
                    return aborted
                kwargs.update(KeyMarker=page.get("NextKeyMarker", ""),
                              UploadIdMarker=page.get("NextUploadIdMarker", ""))
        except StorageError:
            raise
        except Exception as exc:
            raise self._boto_error(exc, "abort the uploads below", path) from exc

    def size_below(self, path: str) -> int:
        return sum(o.size for o in self.objects_at(path))


def _suppress_storage() -> contextlib.suppress:
    """Cleaning up after a failure: a second failure must not hide the first."""
    return contextlib.suppress(StorageError)


# -- the lock between regfsck runs ----------------------------------------------------


class LockHeld(LockHeldError):
    """Another regfsck run holds the object lock (the root lock on object storage, so a
    refusal like any other: exit 3, rendered by the CLI's one handler); `holder` says
    who, `stale` whether it has stopped refreshing it (a crash) so that --break-lock may
    take it."""

    def __init__(self, message: str, holder: dict[str, Any], stale: bool) -> None:
        super().__init__(message)
        self.holder = holder
        self.stale = stale


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD: dict[str, ObjectLock] = {}  # the locks this process holds, by ROOT URL
_HELD_GUARD = threading.Lock()


def held_lock(location: S3Location) -> ObjectLock | None:
    with _HELD_GUARD:
        return _HELD.get(location.url)


class ObjectLock:
    """`PREFIX/regfsck-state/lock`: created with a conditional write (If-None-Match: *),
    so of two runs starting at once exactly one gets it; it holds the owner (user, host,
    pid, command) and times. S3 cannot drop it when its holder dies, as the kernel drops a
    flock: the holder rewrites it every LOCK_REFRESH_S (If-Match its own ETag), and a lock
    not refreshed for LOCK_STALE_S, or held by a dead process on this host, is stale.
    A stale lock is still refused unless the operator passes --break-lock; breaking it is
    a conditional write on the stale lock's ETag, so two breakers cannot both win."""

    def __init__(self, location: S3Location, *, command: str = "", break_stale: bool = False,
                 mutator: ObjectMutator | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.location = location
        self.mutator = mutator or ObjectMutator(location)
        self.command = command
        self.break_stale = break_stale
        self.clock = clock or time.time
        self.etag: str | None = None
        self.lost: str | None = None  # why the lock is no longer ours (broken by another run)
        self.broke: dict[str, Any] | None = None  # the stale holder this run broke
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write = threading.Lock()

    @property
    def url(self) -> str:
        return self.mutator.describe(LOCK_PATH)

    def _content(self, acquired: float) -> bytes:
        import getpass
        import socket
        from datetime import UTC, datetime

        def iso(t: float) -> str:
            return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")

        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        now = self.clock()
        return (json.dumps({"owner": f"{user}@{socket.gethostname()} pid {os.getpid()}",
                            "user": user, "host": socket.gethostname(), "pid": os.getpid(),
                            "command": self.command, "acquired_at": iso(acquired),
                            "refreshed_at": iso(now), "refreshed": now,
                            "stale_after_s": LOCK_STALE_S}, sort_keys=True) + "\n").encode()

    def read_holder(self) -> tuple[dict[str, Any], KeyInfo] | None:
        info = self.mutator.head(LOCK_PATH)
        if info is None:
            return None
        try:
            holder = json.loads(self.mutator.read(LOCK_PATH))
        except StorageError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), info

    def staleness(self, holder: dict[str, Any], info: KeyInfo) -> str | None:
        """Why the lock is stale, or None while its holder may be alive."""
        import socket

        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        refreshed = holder.get("refreshed")
        written = info.mtime_ns / 1e9
        last = max(written, float(refreshed)) if isinstance(refreshed, int | float) else written
        age = self.clock() - last
        if age > LOCK_STALE_S:
            return f"not refreshed for {int(age)}s (a live run refreshes it every {int(LOCK_REFRESH_S)}s)"
        return None

    def describe_holder(self, holder: dict[str, Any]) -> str:
        owner = holder.get("owner") or "holder unknown"
        command = f", {holder['command']}" if holder.get("command") else ""
        since = f", since {holder['acquired_at']}" if holder.get("acquired_at") else ""
        return f"{owner}{command}{since}"

    def acquire(self) -> None:
        acquired = self.clock()
        try:
            self.etag = self.mutator.put(LOCK_PATH, self._content(acquired), create=True)
        except StorageError as exc:
            if exc.errno != errno.EEXIST:
                raise
            self._take_over(acquired)
        self._start_refresh(acquired)

    def _take_over(self, acquired: float) -> None:
        found = self.read_holder()
        if found is None:  # released between our write and our read: try once more
            self.etag = self.mutator.put(LOCK_PATH, self._content(acquired), create=True)
            return
        holder, info = found
        stale = self.staleness(holder, info)
        who = self.describe_holder(holder)
        if stale is None:
            raise LockHeld(f"another regfsck run is changing {self.location.url} ({who}; lock "
                           f"{self.url}); wait for it to finish and run again", holder, False)
        if not self.break_stale:
            raise LockHeld(f"{self.location.url} is locked by a regfsck run that looks dead "
                           f"({who}: {stale}); if no regfsck run is changing it, run again with "
                           f"--break-lock (lock {self.url})", holder, True)
        try:
            self.etag = self.mutator.put(LOCK_PATH, self._content(acquired),
                                         if_etag=info.etag or '""')
        except StorageError as exc:
            if exc.errno == errno.EEXIST:
                raise LockHeld(f"another regfsck run took the lock of {self.location.url} "
                               "while this one was breaking it; run again", holder,
                               False) from exc
            raise
        self.broke = holder

    def _start_refresh(self, acquired: float) -> None:
        with _HELD_GUARD:
            _HELD[self.location.url] = self
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, args=(acquired,),
                                        name="regfsck-lock", daemon=True)
        self._thread.start()

    def refresh(self, acquired: float) -> None:
        """Rewrite the lock if it is still ours (If-Match); marks it lost otherwise."""
        with self._write:
            if self.lost is not None or self.etag is None:
                return
            try:
                self.etag = self.mutator.put(LOCK_PATH, self._content(acquired),
                                             if_etag=self.etag)
            except StorageError as exc:
                if exc.errno == errno.EEXIST:
                    self.lost = (f"its lock {self.url} was taken by another run "
                                 "(--break-lock) while this one was running")
                # another error (network): tried again at the next refresh

    def _refresh_loop(self, acquired: float) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            self.refresh(acquired)

    def release(self) -> None:
        """Stop refreshing and delete the lock, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with _HELD_GUARD:
            if _HELD.get(self.location.url) is self:
                del _HELD[self.location.url]
        with self._write:
            if self.lost is None and self.etag is not None:
                current = self.mutator.head(LOCK_PATH)
                if current is not None and (current.etag or "") == self.etag:
                    self.mutator.delete([LOCK_PATH])
            self.etag = None


# -- the mutation seam (`storage.MutableStorage`) on object storage ------------------------


class ObjectJournal:
    """`AppendFile` on object storage: S3 cannot append, so each durability point (`append`
    with `sync`) writes the lines gathered since the last one as a new object
    `<path>.d/<number>` (created with If-None-Match: *, never overwritten); the journal is
    their concatenation in order. Each part is written whole or not at all, so a torn
    line cannot happen; lines appended without `sync` are written with the next part
    (or on `close`), as unsynced lines on a disk may be lost in a crash."""

    def __init__(self, storage: ObjectRootStorage, path: str) -> None:
        self.storage = storage
        self.path = path
        self._parts = storage.journal_parts(path)
        self._size = sum(p.size for p in self._parts)
        self._next = len(self._parts)
        self._pending = bytearray()

    def size(self) -> int:
        return self._size + len(self._pending)

    def read_tail(self, limit: int) -> bytes:
        data = self.storage.read_journal(self.path) + bytes(self._pending)
        return data[-limit:]

    def append(self, data: bytes, *, sync: bool) -> None:
        self._pending += data
        if sync:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        part = journal_part(self.path, self._next)
        self.storage.mutator.put(part, bytes(self._pending), create=True)
        self._next += 1
        self._size += len(self._pending)
        self._pending.clear()

    def truncate(self, size: int) -> None:
        """Only what is not written yet can be dropped (each written part is whole)."""
        if size < self._size:
            raise StorageError(errno.EINVAL, f"cannot shorten the journal {self.path}: its "
                               "parts are written whole", self.path)
        del self._pending[size - self._size:]

    def close(self) -> None:
        self.flush()


JOURNAL_PARTS = ".d"


def journal_part(path: str, number: int) -> str:
    return f"{path}{JOURNAL_PARTS}/{number:08d}"


class ObjectRootStorage:
    """`MutableStorage` on object storage, rooted at ROOT (`s3://BUCKET/PREFIX/`).

    Every answer comes from a request made now, never from a cached listing: a journaled
    run judges the tree as it is at each step. A "directory" exists while an object lies
    below it; its mtime is the newest below (`lstat_raw`: a listing of everything below,
    `stat`: existence only, one page). Directories need no creation or removal, so
    `make_dir`, `remove_empty_dir` (checked empty), `fsync_dir`, `set_times` and `adopt`
    change nothing. `move` is `ObjectMutator.move` and refuses an existing destination."""

    io_threads = 1
    scan_threads = 1
    implicit_dirs = True
    batch_moves = True
    atomic_moves = False  # copy, then delete: a crash between the two is settled by settle_move

    def __init__(self, location: S3Location, *, jobs: int | None = None,
                 mutator: ObjectMutator | None = None) -> None:
        self.location = location
        self.mutator = mutator or ObjectMutator(location, jobs=jobs)

    def describe(self, path: str) -> str:
        return self.mutator.describe(path)

    # -- what is there now -----------------------------------------------------------
    def _dir_entries(self, path: str) -> tuple[list[dict[str, Any]], list[str]]:
        """One delimiter listing of the "directory" `path`: (objects, child prefixes)."""
        import obstore

        parts = check_relative(path)
        prefix = self.mutator.base + ("/".join(parts) + "/" if parts else "")
        REQUESTS.add("list")
        try:
            result = obstore.list_with_delimiter(self.mutator.client, prefix or None)
        except Exception as exc:
            raise self.mutator._error(exc, "list", path or ".") from exc
        return [dict(m) for m in result["objects"]], list(result["common_prefixes"])

    def _has_below(self, path: str) -> bool:
        import obstore

        prefix = self.mutator.key(path) + "/"
        REQUESTS.add("list")
        try:
            for page in obstore.list(self.mutator.client, prefix, chunk_size=1):
                if page:
                    return True
        except Exception as exc:
            raise self.mutator._error(exc, "list", path) from exc
        return False

    def lstat_raw(self, path: str) -> os.stat_result | None:
        if not check_relative(path):
            return entry_stat(_DIR_MODE, 0, 0)
        below = self.mutator.list_below(path)  # a directory wins, as in the listing's model
        if below:
            return entry_stat(_DIR_MODE, 0, max(k.mtime_ns for k in below))
        found = self.mutator.head(path)
        if found is not None:
            return entry_stat(_FILE_MODE, found.size, found.mtime_ns)
        return self._journal_stat(path)

    def _journal_stat(self, path: str) -> os.stat_result | None:
        parts = self.journal_parts(path) if path.endswith(".jsonl") else []
        if not parts:
            return None
        return entry_stat(_FILE_MODE, sum(p.size for p in parts), max(p.mtime_ns for p in parts))

    def stat(self, path: str) -> Stat | None:
        if not check_relative(path):
            return Stat(EntryKind.DIR, 0, 0, 0, 0)
        found = self.mutator.head(path)
        if found is not None:
            return Stat(EntryKind.FILE, found.size, found.mtime_ns, found.mtime_ns, 0)
        if self._has_below(path):
            return Stat(EntryKind.DIR, 0, 0, 0, 0)
        journal = self._journal_stat(path)
        if journal is not None:
            return Stat(EntryKind.FILE, journal.st_size, journal.st_mtime_ns,
                        journal.st_mtime_ns, 0)
        return None

    def list_dir(self, path: str) -> list[Any]:
        from regfsck.storage import Entry

        objects, prefixes = self._dir_entries(path)
        base = len(self.mutator.base + ("/".join(check_relative(path)) + "/"
                                        if check_relative(path) else ""))
        entries = {str(m["path"])[base:]: EntryKind.FILE for m in objects}
        for prefix in prefixes:
            name = prefix[base:].rstrip("/")
            if name.endswith(JOURNAL_PARTS) and name[:-len(JOURNAL_PARTS)].endswith(".jsonl"):
                entries.setdefault(name[:-len(JOURNAL_PARTS)], EntryKind.FILE)
            else:
                entries[name] = EntryKind.DIR
        return [Entry(name, kind) for name, kind in sorted(entries.items()) if name]

    def scandir(self, path: str) -> Iterator[ListedEntry]:
        for entry in self.list_dir(path):
            child = f"{path}/{entry.name}" if path else entry.name
            st = self.lstat_raw(child)
            if st is not None:
                yield ListedEntry(entry.name, ListedStat(st.st_mode, st.st_size, st.st_mtime_ns))

    def lstat_many(self, dir_path: str, names: Sequence[str]) -> list[Any]:
        """Existence (and size) of many entries of one directory from one listing."""
        objects, prefixes = self._dir_entries(dir_path)
        base = len(self.mutator.base + "/".join(check_relative(dir_path)) + "/")
        files = {str(m["path"])[base:]: m for m in objects}
        dirs = {p[base:].rstrip("/") for p in prefixes}
        result: list[Any] = []
        for name in names:
            if name in files:
                meta = files[name]
                result.append(entry_stat(_FILE_MODE, int(meta["size"]), _mtime_ns(meta)))
            elif name in dirs:
                result.append(entry_stat(_DIR_MODE, 0, 0))
            else:
                result.append(None)
        return result

    # -- reading -------------------------------------------------------------------
    def journal_parts(self, path: str) -> list[KeyInfo]:
        return [k for k in self.mutator.list_below(path + JOURNAL_PARTS)
                if k.path.rpartition("/")[2].isdigit()]

    def read_journal(self, path: str) -> bytes:
        return b"".join(self.mutator.read(k.path) for k in self.journal_parts(path))

    def read_small(self, path: str, limit: int) -> bytes:
        try:
            data = self.mutator.read(path)
        except StorageError as exc:
            if exc.errno == errno.ENOENT and path.endswith(".jsonl") and self.journal_parts(path):
                data = self.read_journal(path)
            else:
                raise
        if len(data) > limit:
            raise StorageError(errno.EFBIG, f"{path} is larger than {limit} bytes", path)
        return data

    def read_link_fast(self, path: str, limit: int = 256) -> bytes:
        return self.mutator.read(path)[:limit + 1]

    def read_small_many(self, dir_path: str, names: Sequence[str], limit: int
                        ) -> list[bytes | StorageError]:
        results: list[bytes | StorageError] = []
        for name in names:
            try:
                results.append(self.mutator.read(f"{dir_path}/{name}")[:limit + 1])
            except StorageError as exc:
                results.append(exc)
        return results

    def prefetch(self, select: Callable[[str], bool], expected: Callable[[str], Sequence[bytes]],
                 limit: int) -> None:
        """Nothing: every read here is made when asked (the tree is changing)."""

    def unmodelled(self) -> list[str]:
        return []

    def iter_chunks(self, path: str, chunk_size: int = STREAM_CHUNK) -> Iterator[bytes]:
        return self.mutator.iter_chunks(path, chunk_size)

    def open_read(self, path: str) -> BinaryIO:
        if path.endswith(".jsonl") and self.mutator.head(path) is None and \
                self.journal_parts(path):
            return io.BytesIO(self.read_journal(path))
        reader: Any = io.BufferedReader(_ChunkReader(self.iter_chunks(path)),
                                        buffer_size=STREAM_CHUNK)
        return reader  # type: ignore[no-any-return]

    # -- changing ------------------------------------------------------------------
    def move(self, src: str, dst: str) -> None:
        if self.mutator.objects_at(dst):
            raise StorageError(errno.EEXIST, f"cannot move {src} to {dst}: {dst} exists", src)
        self.mutator.move([(src, dst)])

    def move_many(self, moves: Sequence[tuple[str, str]]) -> None:
        """Several moves as one batch: every destination checked free and every copy made
        (`jobs` requests in flight), then one bulk delete of the sources."""
        if not moves:
            return
        with ThreadPoolExecutor(max(1, min(self.mutator.jobs, len(moves))),
                                thread_name_prefix="regfsck-check") as pool:
            taken = list(pool.map(lambda m: bool(self.mutator.objects_at(m[1])), moves))
        for (_, dst), busy in zip(moves, taken, strict=True):
            if busy:
                raise StorageError(errno.EEXIST, f"cannot move to {dst}: it exists", dst)
        self.mutator.move(moves)

    def settle_move(self, src: str, dst: str) -> None:
        """Resolve a move a crash left in both places (see `ObjectMutator.settle_move`)."""
        self.mutator.settle_move(src, dst)

    def make_dir(self, path: str, mode: int = 0o777) -> None:
        """Nothing to create: a directory exists once an object lies below it."""

    def remove_empty_dir(self, path: str) -> None:
        if self.mutator.head(path) is not None or self._has_below(path):
            raise StorageError(errno.ENOTEMPTY, f"cannot remove directory {path}: not empty",
                               path)

    def remove_file(self, path: str) -> None:
        if self.mutator.head(path) is None:
            raise StorageError(errno.ENOENT, f"cannot remove {path}: no such object", path)
        self.mutator.delete([path])

    def write_new_file(self, path: str, chunks: Iterable[bytes], *, sync: bool = True) -> int:
        """Create an object that must not exist yet, streamed in bounded memory and written
        only if the key is still free (If-None-Match: *, see `ObjectMutator.put_new`);
        durable once the request completes, `sync` or not."""
        return self.mutator.put_new(path, chunks)

    def replace_file(self, path: str, data: bytes) -> None:
        """One PutObject replaces an object atomically."""
        self.mutator.put(path, data)

    def fsync_dir(self, path: str) -> None:
        """Nothing to do: a completed request is durable (S3 is strongly consistent)."""

    def sync_all(self, path: str) -> bool:
        """Nothing to do: every completed request is durable already. False all the same:
        a journal's lines are durable only when it is synced itself (its object written)."""
        return False

    def set_times(self, path: str, mtime_ns: int, mode: int | None = None,
                  owner: tuple[int, int] | None = None) -> None:
        """Nothing: objects keep no settable mtime, mode or owner."""

    def neighbours(self, path: str, directory: bool) -> tuple[int, int, int | None]:
        return 0, 0, None

    def adopt(self, path: str, owner: tuple[int, int], mode: int) -> None:
        """Nothing: objects have no owner or mode."""

    def open_journal(self, path: str) -> ObjectJournal:
        return ObjectJournal(self, path)

    def remove_tree(self, path: str) -> int:
        return self.mutator.remove_below(path)

    def tree_size(self, path: str) -> int:
        return self.mutator.size_below(path)

    def hold_dirs(self) -> None:
        """Nothing to hold: an object store has no directories to open."""

    def release_dirs(self) -> None:
        """Nothing held (see `hold_dirs`)."""

    def close(self) -> None:
        """Nothing to close: no descriptors are held (requests are made as needed)."""
