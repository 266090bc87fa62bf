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

import errno
import hashlib
import io
import os
import stat as stat_module
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from regfsck.root import S3Location
from regfsck.storage import EntryKind, Stat, StorageError, check_relative

if TYPE_CHECKING:
    from obstore.store import S3Store

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

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            counts = dict(sorted(self.counts.items()))
        counts["total"] = sum(v for k, v in counts.items() if k != "get_bytes")
        return counts


REQUESTS = _Counter()


def request_counts() -> dict[str, int]:
    """Requests made so far by kind (`list`, `get`, ...), `get_bytes` and a `total`."""
    return REQUESTS.snapshot()


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


def make_client(location: S3Location, environ: dict[str, str] | None = None) -> S3Store:
    """The obstore client for `location` (see `client_config`)."""
    from obstore.store import S3Store

    config = client_config(location, environ)
    endpoint = str(config.get("endpoint", ""))
    client_options: dict[str, Any] = {"allow_http": endpoint.startswith("http://"),
                                      "timeout": "300s", "connect_timeout": "10s"}
    # object_store reads AWS_* itself too; everything it needs is passed explicitly above.
    return S3Store(location.bucket, config=config, client_options=client_options)  # type: ignore[arg-type]


def _list_raw(location: S3Location, prefix: str,
              delimiter: bool) -> tuple[list[dict[str, Any]], list[str], int]:
    """ListObjectsV2 through boto3, for a partition holding a key obstore refuses to parse
    (an empty, `.` or `..` segment: `a//b`, `a/./b`). Such keys are possible on S3 and
    must become findings, not stop the scan. Returns (objects, common prefixes, pages)."""
    try:
        import boto3
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError as exc:
        raise StorageError(errno.EIO, f"cannot list {prefix}: a key there is not a valid path "
                           "and boto3 (needed to list it) is not installed", prefix) from exc
    config = client_config(location)
    style = "virtual" if config.get("virtual_hosted_style_request") else "path"
    client = boto3.client("s3", endpoint_url=config.get("endpoint"), region_name=config["region"],
                          aws_access_key_id=config.get("access_key_id"),
                          aws_secret_access_key=config.get("secret_access_key"),
                          aws_session_token=config.get("token"),
                          config=Config(s3={"addressing_style": style}))
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
    when = meta["last_modified"]
    return int(when.timestamp()) * 1_000_000_000 + int(when.microsecond) * 1000


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


class ObjectStorage:
    """A registry tree under `s3://BUCKET/PREFIX/docker/registry/v2/` (read-only).

    The first call that needs the directory model lists the whole prefix; paths are
    relative to the `v2` directory, as for `FilesystemStorage`."""

    scan_threads = 1  # the walk runs on the listing in memory; reads are batched below

    def __init__(self, location: S3Location, *, jobs: int | None = None,
                 client: S3Store | None = None) -> None:
        self.location = location
        self.base = location.v2_prefix
        self.jobs = jobs or default_jobs()
        self.io_threads = self.jobs  # manifests: ManifestStore.preload reads this many at once
        self._client = client
        self._tree: _Tree | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, bytes | StorageError] = {}
        self.trust_etag = os.environ.get(TRUST_ETAG_ENV, "1") != "0"

    # -- plumbing ------------------------------------------------------------------
    @property
    def client(self) -> S3Store:
        if self._client is None:
            self._client = make_client(self.location)
        return self._client

    def key(self, path: str) -> str:
        parts = check_relative(path)
        return self.base + "/".join(parts)

    def describe(self, path: str) -> str:
        return f"s3://{self.location.bucket}/{self.key(path)}"

    def _error(self, exc: BaseException, what: str, path: str) -> StorageError:
        if isinstance(exc, FileNotFoundError):
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

    def prefetch(self, select: Callable[[str], bool], expected: Callable[[str], bytes | None],
                 limit: int) -> None:
        """Read every listed file `select` picks (at most `limit`+1 bytes each) with `jobs`
        GETs in flight, before the walk asks for them one by one. A file whose ETag is the
        MD5 of `expected(path)` (and whose size matches) is known without a request."""
        tree = self.tree
        todo: list[str] = []
        known: dict[str, bytes | StorageError] = {}
        for path, meta in tree.files.items():
            if not select(path):
                continue
            content = expected(path) if self.trust_etag else None
            if (content is not None and meta.size == len(content) and meta.etag is not None
                    and meta.etag.strip('"') == hashlib.md5(content, usedforsecurity=False).hexdigest()):
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
        if path not in self.tree.files:
            raise StorageError(errno.ENOENT, f"cannot open {path}: no such object", path)
        REQUESTS.add("get")
        try:
            result = obstore.get(self.client, self.base + path)
            stream = result.stream(min_chunk_size=chunk_size)
        except Exception as exc:
            raise self._error(exc, "read", path) from exc
        return self._counted(stream, path)

    def _counted(self, stream: Iterable[Any], path: str) -> Iterator[bytes]:
        total = 0
        try:
            for chunk in stream:
                data = bytes(chunk)
                total += len(data)
                yield data
        except Exception as exc:
            raise self._error(exc, "read", path) from exc
        finally:
            REQUESTS.add("get_bytes", total)

    def open_read(self, path: str) -> BinaryIO:
        """A streaming read of a whole object (for deep checks, export and inspect)."""
        reader: Any = io.BufferedReader(_ChunkReader(self.iter_chunks(path)),
                                        buffer_size=STREAM_CHUNK)
        return reader  # type: ignore[no-any-return]
