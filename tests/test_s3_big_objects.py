"""Objects above S3's single-copy limit (CopyObject refuses a source above 5 GiB) move like
any other: gc's quarantine moves, undo's moves back, import's staged copies, and the
recovery of a run killed between the parts of a copy, against a real S3 API server (moto)
on loopback with a tree the REAL registry 2.8.2 wrote through its s3 driver.

moto takes a CopyObject of any size (it never checks S3's limit) and holds every object in
memory, so neither the limit nor a 5 GiB object can be shown with it on this machine. The
server here is moto with S3's refusal added at a lowered limit (`LimitedMotoServer`:
CopyObject of a larger source, UploadPartCopy of a larger range: S3's InvalidRequest), and
regfsck is given the same limit (REGFSCK_S3_COPY_LIMIT): objects above it must be copied in
parts, as objects above 5 GiB must be on S3. Before the multipart copy, every move of such
an object failed there with S3's error, as on S3.

The registry copies an upload into place with CopyObject; above its
`multipartcopythresholdsize` (set to the same limit) it makes a multipart copy of
`multipartcopychunksize` parts, so its large blobs are multipart objects (ETag `<md5>-N`),
as every object above 5 GiB on S3 is (one PutObject takes at most 5 GiB).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import realtools
from tests.support.cli import run as regfsck
from tests.support.cli import run_killed
from tests.support.objectstore import (
    ACCESS_KEY,
    PREFIX,
    REGION,
    SECRET_KEY,
    Bucket,
    BucketRegistry,
    LimitedMotoServer,
    blob_digests,
    dead_url,
    fill,
    iter_keys,
    moto_missing,
    needs_server,
    s3_storage_section,
    serves_every_tag,
)

LIMIT = 5 << 20  # the lowered single-copy limit (S3's smallest part: no part may be smaller)
COPY_LIMIT_ENV = "REGFSCK_S3_COPY_LIMIT"
QUARANTINE = "regfsck-quarantine/"
LOCK = "regfsck-state/lock"
BIG = {"big/kept": ("latest", 12 << 20), "big/gone": ("doomed", 11 << 20)}  # repo: tag, layer
# Killed right after the second UploadPartCopy the process makes (botocore's one method
# every request of a boto3 client goes through: its first argument is the operation).
KILL_BETWEEN_PARTS = ("_make_api_call", "UploadPartCopy", 2, "after")
BOTO = "botocore.client.BaseClient"


class BigBucket(Bucket):
    """A bucket on the limited server: its registry copies above LIMIT in parts, regfsck is
    told the same limit."""

    def env(self) -> dict[str, str]:
        return {**self.moto.env(), COPY_LIMIT_ENV: str(LIMIT)}

    def registry(self, *, readonly: bool = False, port: int = 0,
                 binary: str | None = None) -> BucketRegistry:
        section = s3_storage_section(self.moto.endpoint, self.name, "/" + self.prefix)
        section.update(multipartcopythresholdsize=LIMIT, multipartcopychunksize=LIMIT)
        return BucketRegistry(binary or self.binary, "s3", section, readonly=readonly,
                              port=port)

    def clone(self, name: str | None = None) -> BigBucket:
        """A private copy keeping every ETag: an object above LIMIT is copied part for part
        (moto's CopyObject would give it a one-part ETag, and the server refuses it)."""
        name = name or f"{self.name}-c{next(_CLONES)}"
        client = self.client()
        client.create_bucket(Bucket=name)
        for obj in iter_keys(client, self.name):
            _copy_keeping_parts(client, self.name, name, obj["Key"], obj["Size"])
        copy = BigBucket(self.moto, name, self.prefix, self.binary, set(self.doomed_blobs))
        assert _etags(copy) == _etags(self)
        return copy

    def sizes(self) -> dict[str, int]:
        """key -> size of every key of the tree."""
        return {o["Key"]: o["Size"] for o in iter_keys(self.client(), self.name, self.key(""))}

    def open_uploads(self) -> list[str]:
        """The keys of the multipart uploads open anywhere in the bucket."""
        found = self.client().list_multipart_uploads(Bucket=self.name).get("Uploads", [])
        return sorted(str(u["Key"]) for u in found)


_CLONES = iter(range(1, 1000))


def _etags(bucket: Bucket) -> dict[str, str]:
    return {o["Key"]: o["ETag"] for o in iter_keys(bucket.client(), bucket.name)}


def _copy_keeping_parts(client: Any, src: str, dst: str, key: str, size: int) -> None:
    if size <= LIMIT:
        client.copy_object(Bucket=dst, Key=key, CopySource={"Bucket": src, "Key": key})
        return
    first = client.head_object(Bucket=src, Key=key, PartNumber=1)
    sizes = [first["ContentLength"]] + [
        client.head_object(Bucket=src, Key=key, PartNumber=n)["ContentLength"]
        for n in range(2, int(first.get("PartsCount", 1)) + 1)]
    upload = client.create_multipart_upload(Bucket=dst, Key=key)["UploadId"]
    parts, start = [], 0
    for number, part in enumerate(sizes, 1):
        answer = client.upload_part_copy(Bucket=dst, Key=key, UploadId=upload, PartNumber=number,
                                         CopySource={"Bucket": src, "Key": key},
                                         CopySourceRange=f"bytes={start}-{start + part - 1}")
        parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
        start += part
    client.complete_multipart_upload(Bucket=dst, Key=key, UploadId=upload,
                                     MultipartUpload={"Parts": parts})


@pytest.fixture(scope="module")
def limited() -> Iterator[LimitedMotoServer]:
    """moto refusing copies above the limit the test sets (none until then)."""
    missing = moto_missing()
    if missing:
        pytest.skip(missing)
    with LimitedMotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def big_bucket(limited: LimitedMotoServer, real_sample: tuple[Path, realtools.SampleInfo],
               tmp_path_factory: pytest.TempPathFactory) -> BigBucket:
    """The sample's images (one more deleted through the API, one upload left open) pushed
    by the real 2.8 registry, plus `big/kept:latest` and `big/gone:doomed` with one layer
    above the limit each (big/gone's manifest then DELETEd: its blobs are gc's); from then on
    the server refuses copies above LIMIT."""
    limited.make_bucket("regfsck-big")
    bucket = BigBucket(limited, "regfsck-big", PREFIX, realtools.REGISTRY_BIN)
    lay = realtools.OCILayoutWriter(tmp_path_factory.mktemp("big-layout") / "layout")
    images = {}
    for repo, (tag, size) in BIG.items():
        layer = lay.add_layer({f"{tag}.bin": realtools.pseudo_random_bytes(repo, size)}, "none")
        images[repo] = lay.add_image([layer], tag=tag, history=[f"ADD {tag}.bin"])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    gone = images["big/gone"]["digest"]
    with bucket.registry() as reg:
        bucket.doomed_blobs = fill(real_sample[0], reg.host, "big-doomed")
        for repo, (tag, _) in BIG.items():
            realtools.skopeo_copy(lay.ref(tag), f"docker://{reg.host}/{repo}:{tag}",
                                  "--preserve-digests")
        request = urllib.request.Request(f"http://{reg.host}/v2/big/gone/manifests/{gone}",
                                         method="DELETE")
        assert opener.open(request, timeout=30).status == 202
    doc = json.loads(lay.read_blob(gone))
    bucket.doomed_blobs |= {gone, doc["config"]["digest"], *(d["digest"] for d in doc["layers"])}
    limited.limit_copies(LIMIT)
    big = {k: bucket.client().head_object(Bucket=bucket.name, Key=k)["ETag"]
           for k, size in bucket.sizes().items() if size > LIMIT}
    assert len(big) == 2 and all(e.strip('"').endswith("-3") for e in big.values()), big
    return bucket


def run(bucket: Bucket, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = regfsck(*args, "--json", env=bucket.env())
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, doc, proc.stderr


def _statuses(bucket: Bucket) -> dict[str, str]:
    code, doc, err = run(bucket, "runs", bucket.url)
    assert code == 0, (doc, err)
    return {r["run_id"]: r["status"] for r in doc["runs"]}


# -- the commands on a tree the real registry wrote ---------------------------------------------


@needs_server
def test_gc_moves_objects_above_the_copy_limit_in_parts_and_undo_restores_them(
        big_bucket: BigBucket) -> None:
    """gc --apply (the registry read-only as --registry-url) removes exactly what the
    official collector names, big/gone's 11 MiB layer among them: copied into the
    quarantine in parts with the source's part sizes (so with its ETag), checked, its
    source deleted. The registry serves every kept tag (big/kept's 12 MiB layer too); undo
    copies the layer back in parts: every key of the tree byte for byte with its ETag; no
    multipart upload is left open."""
    bucket = big_bucket.clone()
    before = bucket.tree()
    sizes = bucket.sizes()
    code, out = bucket.registry().garbage_collect("--dry-run")
    assert code == 0, out
    oracle = realtools.parse_gc_output(out).blobs
    assert oracle == bucket.doomed_blobs
    big = [bucket.blob_key(d) for d in oracle if sizes[bucket.blob_key(d)] > LIMIT]
    assert len(big) == 1
    with bucket.registry(readonly=True) as reg:
        code, doc, err = run(bucket, "gc", bucket.url, "--grace", "0", "--apply",
                             "--registry-url", f"http://{reg.host}")
    assert code == 0, (doc, err)
    assert blob_digests(before) - blob_digests(bucket.tree()) == oracle
    requests = doc["requests"]
    assert requests["multipart_create"] == requests["multipart_complete"] == 1, requests
    assert requests["copy_part"] == 3, requests  # the registry's 3 parts, mirrored
    held = f"{bucket.prefix}/{QUARANTINE}{doc['run_id']}/v2/{big[0].split('/v2/', 1)[1]}"
    assert bucket.everything()[held] == before[big[0]]  # same bytes, same 3-part ETag
    assert not bucket.open_uploads()
    serves_every_tag(bucket.registry(), bucket.tags())
    assert "big/kept" in bucket.tags()

    code, undone, err = run(bucket, "undo", bucket.url, doc["run_id"], "--registry-url",
                            dead_url())
    assert code == 0, (undone, err)  # (the server refuses a CopyObject of the layer)
    assert bucket.tree() == before  # every key, byte for byte, and its ETag
    assert not bucket.open_uploads()


@needs_server
def test_gc_killed_between_the_parts_of_a_copy_is_recovered(big_bucket: BigBucket) -> None:
    """rm big/kept:latest, then gc --delete-untagged --apply SIGKILLed right after the second
    part copy of its blob phase (the two large layers are copied into the quarantine in
    parts): multipart uploads are left open below the run's quarantine, the lock stays.
    undo --break-lock recovers the run (every move settled as not done) and aborts those
    uploads; undoing rm too, every key of the tree is back byte for byte with its ETag, no
    upload is open, and the registry serves big/kept:latest again."""
    bucket = big_bucket.clone()
    before = bucket.tree()
    code, removed, err = run(bucket, "rm", bucket.url, "big/kept:latest", "--apply",
                             "--no-registry-check")
    assert code == 0, (removed, err)
    killed = run_killed(BOTO, KILL_BETWEEN_PARTS, "gc", bucket.url, "--grace", "0",
                        "--delete-untagged", "--apply", "--no-registry-check", "--json",
                        env=bucket.env())
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    left = bucket.open_uploads()
    assert left and all(f"/{QUARANTINE}" in k and "/v2/blobs/" in k for k in left), left
    assert bucket.keys_below(LOCK)
    assert "running" in _statuses(bucket).values()

    code, doc, err = run(bucket, "undo", bucket.url, "--no-registry-check", "--break-lock")
    assert code == 0, (doc, err)
    assert not bucket.open_uploads()
    for run_id, status in sorted(_statuses(bucket).items(), reverse=True):
        if status != "reverted":  # newest first
            code, doc, err = run(bucket, "undo", bucket.url, run_id, "--no-registry-check")
            assert code == 0, (doc, err)
    assert set(_statuses(bucket).values()) == {"reverted"}
    assert bucket.tree() == before
    assert not bucket.open_uploads() and not bucket.keys_below(LOCK)
    serves_every_tag(bucket.registry(), bucket.tags())
    assert "big/kept" in bucket.tags()


@needs_server
def test_undo_killed_between_the_parts_of_a_copy_back_is_finished_by_the_next(
        big_bucket: BigBucket) -> None:
    """gc --apply moves the 11 MiB layer into the quarantine; its undo is SIGKILLed right
    after the second part copy back into the tree: the upload is open at the layer's key in
    the tree, the layer not there yet. The next `undo --break-lock` copies it back again,
    aborting the upload left at that key first: every key of the tree byte for byte with its
    ETag, no upload open, no lock."""
    bucket = big_bucket.clone()
    before = bucket.tree()
    code, doc, err = run(bucket, "gc", bucket.url, "--grace", "0", "--apply",
                         "--no-registry-check")
    assert code == 0, (doc, err)
    killed = run_killed(BOTO, KILL_BETWEEN_PARTS, "undo", bucket.url, doc["run_id"],
                        "--no-registry-check", "--json", env=bucket.env())
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    left = bucket.open_uploads()
    assert len(left) == 1 and "/docker/registry/v2/blobs/" in left[0], left
    assert left[0] not in bucket.tree()
    code, undone, err = run(bucket, "undo", bucket.url, doc["run_id"], "--no-registry-check",
                            "--break-lock")
    assert code == 0, (undone, err)
    assert bucket.tree() == before
    assert not bucket.open_uploads() and not bucket.keys_below(LOCK)


@needs_server
def test_import_of_a_layer_above_the_copy_limit(big_bucket: BigBucket, tmp_path: Path) -> None:
    """import --apply of an image with a 13 MiB layer: written ahead into the run's `new/`
    (a multipart upload of 8 MiB parts), then copied into the tree in parts (our own 5 MiB
    parts: the staged 8 MiB part is above the limit); the registry serves it and every
    other tag. Killed between the parts of that copy, `undo --break-lock` reverts the run
    and aborts the upload left open in the tree. Both times undo restores every key."""
    bucket = big_bucket.clone()
    before = bucket.tree()
    lay = realtools.OCILayoutWriter(tmp_path / "layout")
    layer = lay.add_layer({"big.bin": realtools.pseudo_random_bytes("big-import", 13 << 20)},
                          "none")
    lay.add_image([layer], tag="v1", history=["ADD big.bin"])
    archive = tmp_path / "big.tar"
    realtools.skopeo_copy(lay.ref("v1"), f"oci-archive:{archive}:v1")
    args = ("import", bucket.url, str(archive), "--repo", "imported/big", "--apply",
            "--no-registry-check")

    killed = run_killed(BOTO, KILL_BETWEEN_PARTS, *args, "--json", env=bucket.env())
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    left = bucket.open_uploads()
    assert left and all("/docker/registry/v2/blobs/" in k for k in left), left
    code, doc, err = run(bucket, "undo", bucket.url, "--no-registry-check", "--break-lock")
    assert code == 0, (doc, err)
    assert not bucket.open_uploads()
    assert bucket.tree() == before

    code, doc, err = run(bucket, *args)
    assert code == 0, (doc, err)
    assert doc["requests"]["copy_part"] == 3, doc["requests"]  # 5 + 5 + 3 MiB
    assert not bucket.open_uploads()
    assert not [k for k in bucket.keys_below(QUARANTINE) if "/new/" in k]
    tags = bucket.tags()
    assert tags["imported/big"] == ["v1"]
    serves_every_tag(bucket.registry(), tags)
    code, undone, err = run(bucket, "undo", bucket.url, "--no-registry-check")
    assert code == 0, (undone, err)
    assert bucket.tree() == before


# -- the seam ---------------------------------------------------------------------------------


@pytest.mark.skipif(moto_missing() is not None, reason=moto_missing() or "-")
def test_copies_in_parts_are_proven_by_their_etags(limited: LimitedMotoServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With the limit at 8 MiB: a 13 MiB multipart object of 5+7+1 MiB parts is copied with
    those parts (3 part HEADs learn them) and its copy has its ETag; a 13 MiB one-part object
    is copied in our own 8+5 MiB parts and its copy has the ETag those parts make. A source
    rewritten after it was listed (same size, other bytes) fails the check: the copy is
    deleted, the source kept, no upload left. A copy killed between its parts (an upload
    open at the destination) is aborted when the move is settled."""
    limit = 8 << 20
    monkeypatch.setenv(COPY_LIMIT_ENV, str(limit))
    limited.limit_copies(limit)
    try:
        _copies_in_parts(limited, limit)
    finally:
        limited.limit_copies(LIMIT)


def _copies_in_parts(limited: LimitedMotoServer, limit: int) -> None:
    from regfsck.objectstore import REQUESTS, KeyInfo, ObjectMutator
    from regfsck.root import S3Location
    from regfsck.storage import StorageError

    name = limited.make_bucket("regfsck-seam")
    client = limited.client()
    location = S3Location(name, "p", endpoint=limited.endpoint, access_key=ACCESS_KEY,
                          secret_key=SECRET_KEY, region=REGION, force_path_style=True)
    mutator = ObjectMutator(location, jobs=4)
    data = os.urandom(13 << 20)

    def multipart(key: str, cuts: list[int], body: bytes) -> str:
        upload = client.create_multipart_upload(Bucket=name, Key=key)["UploadId"]
        bounds = [0, *cuts, len(body)]
        parts = [{"PartNumber": n, "ETag": client.upload_part(
            Bucket=name, Key=key, UploadId=upload, PartNumber=n,
            Body=body[bounds[n - 1]:bounds[n]])["ETag"]} for n in range(1, len(bounds))]
        client.complete_multipart_upload(Bucket=name, Key=key, UploadId=upload,
                                         MultipartUpload={"Parts": parts})
        return str(client.head_object(Bucket=name, Key=key)["ETag"])

    def body(key: str) -> bytes:
        return bytes(client.get_object(Bucket=name, Key=key)["Body"].read())

    source_etag = multipart("p/src/multi", [5 << 20, 12 << 20], data)
    client.put_object(Bucket=name, Key="p/src/plain", Body=data)
    REQUESTS.take()
    assert mutator.move([("src", "dst")]) == [["src/multi", "src/plain"]]
    counts = REQUESTS.take()
    assert counts["copy_part"] == 3 + 2 and counts["multipart_complete"] == 2, counts
    assert client.head_object(Bucket=name, Key="p/dst/multi")["ETag"] == source_etag
    plain = client.head_object(Bucket=name, Key="p/dst/plain")["ETag"].strip('"')
    own = hashlib.md5(hashlib.md5(data[:limit]).digest() + hashlib.md5(data[limit:]).digest())
    assert plain == f"{own.hexdigest()}-2"  # the ETag of our own two parts
    assert body("p/dst/multi") == body("p/dst/plain") == data
    assert not mutator.list_below("src")

    listed = mutator.head("dst/multi")
    assert listed is not None
    multipart("p/dst/multi", [5 << 20, 12 << 20], bytes(reversed(data)))  # rewritten since
    with pytest.raises(StorageError, match="does not match"):
        mutator.copy_checked(listed, "again/multi")
    assert mutator.head("again/multi") is None and body("p/dst/multi") == bytes(reversed(data))
    assert not client.list_multipart_uploads(Bucket=name).get("Uploads")

    upload = client.create_multipart_upload(Bucket=name, Key="p/back/multi")["UploadId"]
    client.upload_part_copy(Bucket=name, Key="p/back/multi", UploadId=upload, PartNumber=1,
                            CopySource={"Bucket": name, "Key": "p/dst/multi"},
                            CopySourceRange=f"bytes=0-{(5 << 20) - 1}")
    assert mutator.settle_move("dst", "back") is False  # the copy never completed
    assert not client.list_multipart_uploads(Bucket=name).get("Uploads")
    assert mutator.copy_checked(KeyInfo("dst/plain", len(data), 0, None), "back/plain").size \
        == len(data)  # no ETag known: size and the parts' ETag only
