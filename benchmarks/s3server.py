"""moto's S3 server with S3's listing cost, preloaded from a local tree (for bench_s3.py).

Why not plain `moto_server`: moto answers every ListObjects by copying and scanning the whole
bucket, then sorting what matched (`S3Backend.list_objects`), so a listing of one "directory"
costs time proportional to the bucket. On a 100k-object bucket that is tens of ms of CPU per
listing, and the official collector makes one listing per directory (~70k of them): the
benchmark would measure moto's scan, not the collectors. Real S3 serves a page from an index,
at a cost that does not grow with the bucket. Here the bucket's key store keeps a sorted list
of its names (updated on every put/delete), and ListObjects/ListObjectsV2 walk it from the
prefix or marker with `bisect`, jumping over a whole common prefix when a delimiter groups it.
The answers are S3's (sorted keys and common prefixes, `max-keys` over both, continuation
tokens as moto makes them). moto then spends about 1 ms of CPU per listed key turning the
page into XML through its generic botocore-model serializer (a 1,000-key page: ~1 s, where
S3 answers in tens of ms); the two listing responses are written here with a plain XML
template instead (same elements and values). Everything else (GET, PUT, copy, multipart,
conditional writes, DeleteObjects) is moto's own code.

Loading 100k objects with PUTs through HTTP costs moto several ms of CPU each; `--preload
ROOT` puts the files of a local tree (e.g. one `synth.py` wrote) straight into the backend
before the server answers: keys `PREFIX/docker/registry/v2/...`, the same bytes and the same
MD5 ETags a PutObject gives. The real registry can then push into the same bucket over HTTP.

    python benchmarks/s3server.py --port 9000 --bucket bench --prefix registry --preload ROOT

prints `ready OBJECTS` on stdout once it serves; stop it with SIGTERM.
"""

from __future__ import annotations

import argparse
import bisect
import os
import signal
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any
from xml.sax.saxutils import escape

from moto import settings
from moto.core import DEFAULT_ACCOUNT_ID
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.s3 import models as s3_models
from moto.s3 import responses as s3_responses
from moto.s3.utils import _VersionedKeyStore
from moto.utilities.utils import md5_hash
from werkzeug.serving import WSGIRequestHandler, make_server

REGION = "us-east-1"
_LOCK = threading.RLock()


# -- the sorted index of a bucket's names, kept beside moto's dict -----------------------------
def _names(store: Any) -> list[str]:
    names: list[str] | None = store.__dict__.get("_sorted_names")
    if names is None:
        names = sorted(dict.keys(store))
        store.__dict__["_sorted_names"] = names
    return names


def _added(store: Any, key: str) -> None:
    names = store.__dict__.get("_sorted_names")
    if names is not None:
        at = bisect.bisect_left(names, key)
        if at == len(names) or names[at] != key:
            names.insert(at, key)


def _removed(store: Any, key: str) -> None:
    names = store.__dict__.get("_sorted_names")
    if names is not None:
        at = bisect.bisect_left(names, key)
        if at < len(names) and names[at] == key:
            del names[at]


_orig_setitem = _VersionedKeyStore.__setitem__
_orig_setlist = _VersionedKeyStore.setlist
_orig_pop = _VersionedKeyStore.pop


def _setitem(self: Any, key: str, value: Any) -> None:
    with _LOCK:
        new = not dict.__contains__(self, key)
        _orig_setitem(self, key, value)
        if new:
            _added(self, key)


def _setlist(self: Any, key: str, list_: Any) -> None:
    with _LOCK:
        new = not dict.__contains__(self, key)
        _orig_setlist(self, key, list_)
        if new:
            _added(self, key)


def _pop(self: Any, key: str) -> None:
    with _LOCK:
        _orig_pop(self, key)
        _removed(self, key)


def _delitem(self: Any, key: str) -> None:
    with _LOCK:
        dict.__delitem__(self, key)
        _removed(self, key)


_VersionedKeyStore.__setitem__ = _setitem  # type: ignore[method-assign]
_VersionedKeyStore.setlist = _setlist  # type: ignore[method-assign]
_VersionedKeyStore.pop = _pop  # type: ignore[method-assign,assignment]
_VersionedKeyStore.__delitem__ = _delitem  # type: ignore[method-assign,assignment]


def _entries(store: Any, prefix: str, delimiter: str | None,
             after: str | None) -> Iterator[Any]:
    """FakeKeys and common-prefix strings below `prefix`, in S3's order, each > `after`."""
    names = _names(store)
    start = prefix if after is None or after < prefix else after
    at = bisect.bisect_right(names, start) if start == after else bisect.bisect_left(names, start)
    while at < len(names):
        name = names[at]
        if not name.startswith(prefix):
            return
        if delimiter:
            cut = name.find(delimiter, len(prefix))
            if cut >= 0:
                folder = name[:cut + len(delimiter)]
                if after is None or folder > after:
                    yield folder
                # every name starting with `folder` sorts before folder's successor
                upper = folder[:-1] + chr(ord(folder[-1]) + 1)
                at = bisect.bisect_left(names, upper, at + 1)
                continue
        versions = dict.__getitem__(store, name)
        if versions and not isinstance(versions[-1], s3_models.FakeDeleteMarker):
            yield versions[-1]
        at += 1


def _page(backend: Any, bucket: Any, prefix: str | None, delimiter: str | None,
          after: str | None, max_keys: int | None) -> tuple[list[Any], bool, str | None]:
    with _LOCK:
        items: list[Any] = []
        truncated = False
        for entry in _entries(bucket.keys, prefix or "", delimiter, after):
            if max_keys is not None and len(items) >= max_keys:
                truncated = True
                break
            items.append(entry)
    token = None
    if truncated and items:
        last = items[-1]
        name = last.name if isinstance(last, s3_models.FakeKey) else last
        token = md5_hash(name.encode("utf-8")).hexdigest()
        backend._pagination_tokens[token] = name
    return items, truncated, token


def list_objects(self: Any, bucket: Any, prefix: str | None, delimiter: str | None,
                 marker: str | None, max_keys: int | None) -> Any:
    """ListObjects (v1): keys and common prefixes, `max-keys` over both (as S3 does)."""
    after = (self._pagination_tokens.get(marker) or marker) if marker else None
    items, truncated, token = _page(self, bucket, prefix, delimiter, after, max_keys)
    keys = [i for i in items if isinstance(i, s3_models.FakeKey)]
    folders = [i for i in items if not isinstance(i, s3_models.FakeKey)]
    return keys, folders, truncated, token


def list_objects_v2(self: Any, bucket: Any, prefix: str | None, delimiter: str | None,
                    continuation_token: str | None, start_after: str | None,
                    max_keys: int) -> Any:
    after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
    return _page(self, bucket, prefix, delimiter, after, max_keys)


# -- the two listing responses, written as XML directly ---------------------------------------
_OWNER = ("<Owner><ID>75aa57f09aa0c8caeab4f8c24e99d10f8e7faeebf76c078efc7c6caea54ba06a</ID>"
          "<DisplayName>webfile</DisplayName></Owner>")


def _el(tag: str, value: Any) -> str:
    return f"<{tag}>{escape(str(value))}</{tag}>"


def _contents(key: Any, encoding_type: str | None, owner: bool) -> str:
    return ("<Contents>" + _el("Key", key.safe_name(encoding_type))
            + _el("LastModified", key.last_modified_ISO8601) + _el("ETag", key.etag)
            + _el("Size", key.size) + _el("StorageClass", key.storage_class)
            + (_OWNER if owner else "") + "</Contents>")


def _respond(self: Any, parts: list[str]) -> Any:
    body = ('<?xml version="1.0" encoding="utf-8"?>\n'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            + "".join(parts) + "</ListBucketResult>")
    headers = {"Content-Type": "application/xml"}
    headers.update(self.response_headers)
    return 200, headers, body.encode("utf-8")


def _query(self: Any) -> tuple[str | None, str | None, int, str | None]:
    querystring = self._get_querystring(self.request, self.uri)
    prefix = querystring.get("prefix", [None])[0]
    if prefix and isinstance(prefix, bytes):
        prefix = prefix.decode("utf-8")
    delimiter = self.querystring.get("delimiter", [None])[0]
    max_keys = int(self.querystring.get("max-keys", [settings.get_s3_default_max_keys()])[0])
    encoding_type = self.querystring.get("encoding-type", [None])[0]
    return prefix, delimiter, max_keys, encoding_type


def response_list_objects(self: Any) -> Any:
    bucket = self.backend.get_bucket(self.bucket_name)
    prefix, delimiter, max_keys, encoding_type = _query(self)
    marker = self.querystring.get("marker", [None])[0]
    keys, folders, truncated, next_marker = self.backend.list_objects(
        bucket=bucket, prefix=prefix, delimiter=delimiter, marker=marker, max_keys=max_keys)
    parts = [_el("IsTruncated", "true" if truncated else "false")]
    if next_marker:
        parts.append(_el("NextMarker", next_marker))
    parts += [_contents(key, encoding_type, True) for key in keys]
    parts.append(_el("Name", bucket.name))
    if prefix is not None:
        parts.append(_el("Prefix", prefix))
    if delimiter:
        parts.append(_el("Delimiter", delimiter))
    parts.append(_el("MaxKeys", max_keys))
    if delimiter:
        parts += [f"<CommonPrefixes>{_el('Prefix', f)}</CommonPrefixes>" for f in folders]
    if encoding_type:
        parts.append(_el("EncodingType", encoding_type))
    self.data["Action"] = "ListObjects"
    return _respond(self, parts)


def response_list_objects_v2(self: Any) -> Any:
    bucket = self.backend.get_bucket(self.bucket_name)
    token = self.querystring.get("continuation-token", [None])[0]
    if token is not None and token == "":
        raise s3_responses.InvalidContinuationToken()
    prefix, delimiter, max_keys, encoding_type = _query(self)
    fetch_owner = self.querystring.get("fetch-owner", [False])[0]
    start_after = self.querystring.get("start-after", [None])[0]
    items, truncated, next_token = self.backend.list_objects_v2(
        bucket=bucket, prefix=prefix, delimiter=delimiter, continuation_token=token,
        start_after=start_after, max_keys=max_keys)
    keys = [i for i in items if isinstance(i, s3_models.FakeKey)]
    folders = [i for i in items if not isinstance(i, s3_models.FakeKey)]
    if encoding_type == "url":
        prefix = urllib.parse.quote(prefix) if prefix else ""
        folders = [urllib.parse.quote(folder) for folder in folders]
    parts = [_el("IsTruncated", "true" if truncated else "false")]
    parts += [_contents(key, encoding_type, bool(fetch_owner)) for key in keys]
    parts += [_el("Name", bucket.name), _el("Prefix", prefix or "")]
    if delimiter:
        parts.append(_el("Delimiter", delimiter))
    parts.append(_el("MaxKeys", max_keys))
    if delimiter:
        parts += [f"<CommonPrefixes>{_el('Prefix', f)}</CommonPrefixes>" for f in folders]
    if encoding_type:
        parts.append(_el("EncodingType", encoding_type))
    parts.append(_el("KeyCount", len(keys) + len(folders)))
    if next_token:
        parts.append(_el("NextContinuationToken", next_token))
    if not token and start_after:
        parts.append(_el("StartAfter", start_after))
    self.data["Action"] = "ListObjectsV2"
    return _respond(self, parts)


s3_responses.S3Response.list_objects = response_list_objects  # type: ignore[method-assign]
s3_responses.S3Response.list_objects_v2 = response_list_objects_v2  # type: ignore[method-assign]
s3_models.S3Backend.list_objects = list_objects  # type: ignore[method-assign]
s3_models.S3Backend.list_objects_v2 = list_objects_v2  # type: ignore[method-assign]


def backend() -> Any:
    return s3_models.s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def preload(bucket: str, prefix: str, root: str) -> int:
    """Put every file below ROOT/docker/registry/v2 into the bucket (no HTTP)."""
    s3 = backend()
    s3.create_bucket(bucket, REGION)
    base = os.path.join(root, "docker", "registry", "v2")
    head = (prefix.strip("/") + "/" if prefix.strip("/") else "") + "docker/registry/v2/"
    count = 0
    for dirpath, _dirs, files in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        for name in files:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            with open(os.path.join(dirpath, name), "rb") as handle:
                data = handle.read()
            s3.put_object(bucket, head + rel.replace(os.sep, "/"), data,
                          disable_notification=True)
            count += 1
    return count


class _Quiet(WSGIRequestHandler):
    disable_nagle_algorithm = True  # no delayed-ACK stall between headers and body

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", default="bench")
    parser.add_argument("--prefix", default="registry", help="the registry's rootdirectory")
    parser.add_argument("--preload", help="a storage root (holding docker/registry/v2)")
    args = parser.parse_args(argv)
    count = preload(args.bucket, args.prefix, args.preload) if args.preload else 0
    server = make_server("127.0.0.1", args.port, DomainDispatcherApplication(create_backend_app),
                         threaded=True, request_handler=_Quiet)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"ready {count}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
