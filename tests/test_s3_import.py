"""`regfsck import --apply` onto s3://BUCKET/PREFIX, against a real S3 API server (moto) on
loopback, into trees the REAL registry s3 drivers wrote (2.8.2 and v3.1.1).

The sources are written by real skopeo: an oci-archive of a multi-arch index and an OCI
layout directory pulled from the real registry serving the session's sample, and an
oci-archive of a fresh image whose 12 MiB layer no tree holds yet (a multipart upload).
Each import must:
* plan exactly what the same import plans on a filesystem copy of the bucket (same JSON),
  and write exactly the same files (key for key, byte for byte);
* refuse --apply by the same rules as gc --apply on S3 (no --registry-url, or a writable
  registry: exit 3, not one key changed);
* leave a bucket from which a fresh s3-backed registry of both versions serves every tag
  (`skopeo copy --all` checks every digest), and which `undo` puts back key for key;
* when killed with SIGKILL at any point of writing, be recovered by the next run, which
  then finishes the import: the same tree as an import never interrupted, nothing written
  ahead left behind, no multipart upload left open.

Creating a large object streams it in bounded memory (peak RSS measured on several hundred
MiB) and never overwrites an existing key (If-None-Match: * on PutObject and on
CompleteMultipartUpload, both honoured by moto 5.2).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import realtools
from tests.support import REPO_ROOT
from tests.support.cli import run as regfsck
from tests.support.objectstore import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    Bucket,
    MotoServer,
    dead_url,
    needs_server,
    registry3_binary,
    snapshot,
)

V2 = "docker/registry/v2/"
FRESH_REPO = "imported/fresh"


def run(bucket: Bucket, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = regfsck(*args, "--json", env=bucket.env())
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, doc, proc.stderr


def binaries() -> list[str]:
    """Both registry versions (v3 where its binary is available)."""
    return [b for b in (realtools.REGISTRY_BIN, registry3_binary()) if b]


@pytest.fixture(scope="module")
def sources(real_sample: tuple[Path, realtools.SampleInfo],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """name -> (source written by skopeo, repository to import it into)."""
    out = tmp_path_factory.mktemp("s3-import-sources")
    found = {"multi": (out / "multi.tar", "imported/multi"),
             "layout": (out / "layout", "imported/layout"),
             "fresh": (out / "fresh.tar", FRESH_REPO)}
    with realtools.RealRegistry(real_sample[0]) as registry:
        realtools.skopeo_copy(f"docker://{registry.host}/multi/oci:latest",
                              f"oci-archive:{found['multi'][0]}:latest", "--all",
                              "--preserve-digests")
        for repo, name in [("library/base", "base"), ("a/b/c", "abc")]:
            realtools.skopeo_copy(f"docker://{registry.host}/{repo}:latest",
                                  f"oci:{found['layout'][0]}:{name}")
    writer = realtools.OCILayoutWriter(out / "fresh-layout")
    big = writer.add_layer({"big.bin": realtools.pseudo_random_bytes("s3-import-big", 12 << 20)},
                           "none")  # > 8 MiB: a multipart upload
    small = writer.add_layer({"hello.txt": b"hello from the s3 import test\n"})
    writer.add_image([big, small], tag="v1", history=["ADD big.bin", "ADD hello.txt"])
    realtools.skopeo_copy(writer.ref("v1"), f"oci-archive:{found['fresh'][0]}:v1")
    return found


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """An import document without what differs between a bucket and a directory by nature."""
    return {k: v for k, v in doc.items() if k not in ("root", "requests", "run_id")}


def _files(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file below `directory`."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in directory.rglob("*") if p.is_file()}


def _contents(bucket: Bucket, prefix: str) -> dict[str, str]:
    """key below `prefix/docker/registry/v2/` -> sha256 of its bytes."""
    start = f"{prefix}/{V2}"
    return {k[len(start):]: sha for k, (_, sha) in
            snapshot(bucket.client(), bucket.name, start).items()}


def _import(bucket: Bucket, root: str, source: tuple[Path, str], *extra: str
            ) -> tuple[int, dict[str, Any], str]:
    return run(bucket, "import", root, str(source[0]), "--repo", source[1], *extra)


def _open_uploads(bucket: Bucket) -> list[Any]:
    return bucket.client().list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])


# -- refusals: the same rules as gc --apply ---------------------------------------------------


@needs_server
def test_apply_refuses_by_the_rules_of_gc(bucket28: Bucket, sources: dict[str, tuple[Path, str]],
                                          tmp_path: Path) -> None:
    """No --registry-url, or the URL of a writable registry: exit 3 with gc's words, one
    line, not one key changed (no lock, no run). The plan alone needs no check. On a local
    ROOT the object-storage options are a usage error."""
    bucket = bucket28.clone()
    before = bucket.everything()
    code, doc, err = _import(bucket, bucket.url, sources["fresh"])
    assert code == 0 and doc["applied"] is False and doc["blobs"], (doc, err)
    code, doc, err = _import(bucket, bucket.url, sources["fresh"], "--apply")
    assert code == 3, (doc, err)
    assert "--registry-url" in doc["error"] and "cannot see" in doc["error"]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, gc_doc, _ = run(bucket, "gc", bucket.url, "--apply")
    assert gc_doc["error"] == doc["error"]  # one function decides, for every command
    with bucket.registry() as writable:
        code, doc, err = _import(bucket, bucket.url, sources["fresh"], "--apply",
                                 "--registry-url", f"http://{writable.host}")
    assert code == 3, (doc, err)
    assert "writable" in doc["error"] and "read-only" in doc["error"]
    code, doc, _ = _import(bucket, bucket.url, sources["fresh"], "--apply",
                           "--registry-url", dead_url(), "--no-registry-check")
    assert code == 2, doc
    assert bucket.everything() == before
    local = tmp_path / "local"
    local.mkdir()
    code, doc, _ = _import(bucket, str(local), sources["fresh"], "--apply",
                           "--registry-url", dead_url())
    assert code == 2 and "object storage" in doc["error"], doc
    assert not list(local.iterdir())


# -- the import itself ---------------------------------------------------------------------------


@needs_server
@pytest.mark.parametrize("which", ["bucket28", "bucket3"])
def test_import_matches_a_filesystem_copy_serves_and_undoes(
        which: str, request: pytest.FixtureRequest, sources: dict[str, tuple[Path, str]],
        tmp_path: Path) -> None:
    """Each skopeo source imported into a clone of the registry's bucket (the registry in
    read-only mode, asked by --registry-url) and into a filesystem copy of the same bucket:
    the same plans, the same JSON, the same files afterwards. Fresh s3-backed registries
    of both versions then serve every tag, old and imported; undo of the runs, newest
    first, puts every key back byte for byte."""
    bucket = request.getfixturevalue(which).clone()
    before = bucket.tree()
    local = bucket.mirror(tmp_path / "local")
    runs: list[str] = []
    with bucket.registry(readonly=True) as reg:
        for name in ("fresh", "multi", "layout"):
            code, plan_s3, err = _import(bucket, bucket.url, sources[name])
            assert code == 0, (plan_s3, err)
            code, plan_fs, err = _import(bucket, str(local), sources[name])
            assert code == 0, (plan_fs, err)
            assert _comparable(plan_s3) == _comparable(plan_fs), name
            code, doc, err = _import(bucket, bucket.url, sources[name], "--apply",
                                     "--registry-url", f"http://{reg.host}")
            assert code == 0, (doc, err)
            assert doc["applied"] is True and doc["run_id"], doc
            print(f"import {name} into {which}: requests {doc['requests']}")
            code, local_doc, err = _import(bucket, str(local), sources[name], "--apply")
            assert code == 0, (local_doc, err)
            assert _comparable(doc) == _comparable(local_doc), name
            runs.append(doc["run_id"])
    assert doc["existing_blobs"] > 0  # the layout's images were in the tree already
    assert _contents(bucket, bucket.prefix) == _files(local / V2)
    assert not bucket.keys_below("regfsck-state/lock")
    assert not [k for k in bucket.keys_below("regfsck-quarantine/") if "/new/" in k]
    assert not _open_uploads(bucket)
    tags = bucket.tags()
    assert tags[FRESH_REPO] == ["v1"] and tags["imported/multi"] == ["latest"]
    assert tags["imported/layout"] == ["abc", "base"]
    for binary in binaries():
        bucket.serves_every_tag(binary, tags)

    for run_id in reversed(runs):
        code, undone, err = run(bucket, "undo", bucket.url, run_id, "--registry-url", dead_url())
        assert code == 0, (undone, err)
    assert bucket.tree() == before  # every key, byte for byte (and ETag)


@needs_server
def test_undone_out_of_order_the_imports_restore_the_bucket(
        bucket28: Bucket, sources: dict[str, tuple[Path, str]]) -> None:
    """The fresh image imported into imported/fresh (run A: its blobs), then into
    mirror/fresh (run B: links to A's blobs only). Undo A first: its blobs stay, B's image
    uses them, and the registry serves mirror/fresh:v1. Undo B: B's links go, and B's
    undo finishes A's: the blobs A kept for B go into A's quarantine. Every key of the
    tree is back byte for byte with its ETag."""
    bucket = bucket28.clone("s3-out-of-order")
    before = bucket.tree()
    fresh = sources["fresh"]
    with bucket.registry(readonly=True) as reg:
        url = ("--registry-url", f"http://{reg.host}")
        code, first, err = _import(bucket, bucket.url, fresh, "--apply", *url)
        assert code == 0, (first, err)
        code, second, err = _import(bucket, bucket.url, (fresh[0], "mirror/fresh"), "--apply", *url)
        assert code == 0, (second, err)
    code, undone, err = run(bucket, "undo", bucket.url, first["run_id"], "--registry-url", dead_url())
    assert code == 0 and undone["kept"] and undone["finished"] == [], (undone, err)
    tags = bucket.tags()
    assert tags["mirror/fresh"] == ["v1"] and FRESH_REPO not in tags
    bucket.serves_every_tag(realtools.REGISTRY_BIN, tags)
    code, doc, err = run(bucket, "undo", bucket.url, second["run_id"], "--registry-url", dead_url())
    assert code == 0, (doc, err)
    assert [f["run_id"] for f in doc["finished"]] == [first["run_id"]], doc
    assert bucket.tree() == before


@needs_server
def test_import_into_an_empty_prefix_starts_a_tree(bucket28: Bucket,
                                                   sources: dict[str, tuple[Path, str]]) -> None:
    """s3://BUCKET/NEWPREFIX with no objects: the import starts the tree there, as into an
    empty directory; a registry with that rootdirectory serves it; undo empties it again."""
    bucket = bucket28.clone()
    fresh = Bucket(bucket.moto, bucket.name, "brand/new", bucket.binary)
    for name in ("fresh", "multi"):
        code, doc, err = _import(fresh, fresh.url, sources[name], "--apply",
                                 "--no-registry-check")
        assert code == 0 and doc["applied"], (doc, err)
        assert doc["existing_blobs"] == 0
    for binary in binaries():
        fresh.serves_every_tag(binary, {FRESH_REPO: ["v1"], "imported/multi": ["latest"]})
    for _ in range(2):
        code, undone, err = run(fresh, "undo", fresh.url, "--no-registry-check")
        assert code == 0, (undone, err)
    assert not fresh.keys_below(V2)


# -- a crash ----------------------------------------------------------------------------------------

KILLING = textwrap.dedent("""
    import os, signal, sys
    from regfsck import objectstore
    owner, method, match, nth, when = sys.argv[1:6]
    seen = [0]

    def wrap(original, bound):
        def killing(*args, **kwargs):
            first = (args[0] if args else kwargs.get("Key", "")) if bound else \
                (args[1] if len(args) > 1 else "")
            text = first if isinstance(first, str) else " ".join(map(str, first))
            mine = 0
            if match in text:  # (parts are sent from several threads: count is this call's)
                seen[0] += 1
                mine = seen[0]
            if mine == int(nth) and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if mine == int(nth) and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return killing

    if owner == "boto":  # a method of the boto3 client large objects are uploaded with
        make = objectstore.ObjectMutator._boto

        def boto(self):
            client = make(self)
            if not getattr(client, "_killing", False):
                setattr(client, method, wrap(getattr(client, method), True))
                client._killing = True
            return client

        objectstore.ObjectMutator._boto = boto
    else:
        cls = getattr(objectstore, owner)
        setattr(cls, method, wrap(getattr(cls, method), False))
    sys.argv = ["regfsck", *sys.argv[6:]]
    from regfsck.cli.app import main
    main()
""")

# (class in regfsck.objectstore or "boto", method, substring of its first argument (the
# key for boto), which call, when)
KILL_POINTS = [
    ("ObjectMutator", "_multipart_new", "/new/", 1, "before"),  # nothing staged yet
    ("boto", "upload_part", "/new/", 1, "after"),  # a multipart upload open, one part sent
    ("ObjectRootStorage", "write_new_file", "/new/", 2, "after"),  # staged, not journaled
    ("ObjectMutator", "delete", "/new/", 1, "before"),  # copied into the tree, staged kept
    ("ObjectRootStorage", "move", "/new/", 2, "after"),  # in place, no "done" line
]


@needs_server
@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: f"{p[1]}-{p[3]}-{p[4]}")
def test_import_killed_is_recovered_by_the_next_run(
        bucket28: Bucket, sources: dict[str, tuple[Path, str]],
        point: tuple[str, str, str, int, str]) -> None:
    """SIGKILL at each point of writing an import: the lock object stays (the next run
    needs --break-lock, its holder being gone), the next run reverts the interrupted one
    and imports everything: the bucket then holds exactly what an uninterrupted import
    writes, nothing staged is left, no multipart upload is open (one killed midway is
    aborted by the recovery), the registry serves it."""
    bucket = bucket28.clone()
    reference = Bucket(bucket.moto, bucket.name, "reference", bucket.binary)
    target = Bucket(bucket.moto, bucket.name, "killed", bucket.binary)
    code, doc, err = _import(reference, reference.url, sources["fresh"], "--apply",
                             "--no-registry-check")
    assert code == 0, (doc, err)
    env = {**bucket.env(), "PYTHONPATH": str(REPO_ROOT)}
    source, repo = sources["fresh"]
    proc = subprocess.run([sys.executable, "-c", KILLING, *map(str, point), "import", target.url,
                           str(source), "--repo", repo, "--apply", "--no-registry-check"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert target.keys_below("regfsck-state/lock")  # nothing drops an object lock
    code, doc, _ = _import(target, target.url, sources["fresh"], "--apply", "--no-registry-check")
    assert code == 3 and "--break-lock" in doc["error"], doc
    code, doc, err = _import(target, target.url, sources["fresh"], "--apply",
                             "--no-registry-check", "--break-lock")
    assert code == 0 and doc["applied"], (doc, err)
    assert len(doc["recovered"]) == 1 and "revert" in doc["recovered"][0], doc["recovered"]
    assert _contents(target, target.prefix) == _contents(reference, reference.prefix)
    assert not [k for k in target.keys_below("regfsck-quarantine/") if "/new/" in k]
    assert not target.keys_below("regfsck-state/lock")
    code, runs, _ = run(target, "runs", target.url)
    assert [r["status"] for r in runs["runs"]] == ["reverted", "complete"], runs
    target.serves_every_tag(target.binary, {FRESH_REPO: ["v1"]})
    assert not _open_uploads(target)  # the recovery aborted the one the kill left open


# -- the streaming put ------------------------------------------------------------------------------


@needs_server
def test_new_objects_are_conditional_and_a_failed_stream_leaves_nothing(
        moto: MotoServer) -> None:
    """put_new never overwrites: a small object (one PutObject) and a large one (multipart)
    at a taken key are refused with EEXIST and the key keeps its bytes. A stream that fails
    halfway (a digest that does not match) aborts the upload: no object, no open upload."""
    import errno

    from regfsck.objectstore import PART_SIZE, ObjectMutator
    from regfsck.root import S3Location
    from regfsck.storage import StorageError

    moto.make_bucket("regfsck-put")
    location = S3Location("regfsck-put", "p", endpoint=moto.endpoint, access_key=ACCESS_KEY,
                          secret_key=SECRET_KEY, region=REGION, force_path_style=True)
    mutator = ObjectMutator(location)
    big = [os.urandom(1 << 20) for _ in range(PART_SIZE // (1 << 20) * 2 + 3)]
    assert mutator.put_new("small", [b"one", b"two"]) == 6
    assert mutator.put_new("large", iter(big)) == sum(map(len, big))
    for path, data in (("small", [b"other"]), ("large", big), ("small", big), ("large", [b"x"])):
        with pytest.raises(StorageError) as refused:
            mutator.put_new(path, iter(data))
        assert refused.value.errno == errno.EEXIST
    assert mutator.read("small") == b"onetwo" and mutator.read("large") == b"".join(big)

    def failing() -> Iterator[bytes]:
        yield from big[:PART_SIZE // (1 << 20) + 2]
        raise ValueError("digest mismatch")

    with pytest.raises(ValueError):
        mutator.put_new("broken", failing())
    assert mutator.head("broken") is None
    assert not moto.client().list_multipart_uploads(Bucket="regfsck-put").get("Uploads")


@needs_server
@pytest.mark.slow
def test_a_large_object_is_written_in_bounded_memory() -> None:
    """A 320 MiB object created from 1 MiB chunks made on the fly: the writing process's
    peak RSS grows by far less than the object (measured by benchmarks/bench_stream_put.py,
    ru_maxrss in a fresh process; the whole-object PUT it replaced grew by the object)."""
    size_mib = 320
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_stream_put.py"),
                           "--mb", str(size_mib), "--modes", "stream"],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    print(doc)
    assert doc["bytes"] == size_mib << 20
    assert doc["requests"]["put_part"] == size_mib // 8
    assert doc["above_base_mib"] < size_mib / 3, doc
