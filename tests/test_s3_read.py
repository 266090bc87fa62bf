"""The read-only commands on a registry stored in S3: `verify --deep`, `verify --metrics-file`,
`export`, `inspect`, `why`, against a real S3 API server (moto) on loopback.

The trees are written by the REAL registry's s3 driver (distribution 2.8 and v3.1.1): the
session's sample images (objectstore.push_into_bucket), plus an image whose two layers are
larger than deep.REMOTE_SMALL_LAYER (so the deep pass streams them in spawned worker
processes, the small ones in threads) and an SBOM referrer attached to it by subject. Every
command is run on the bucket and on the bucket mirrored to disk key for key: the JSON
documents must be identical (except `requests`, which only object storage reports), and an
export from the bucket must be the same files as an export from the disk copy and be
accepted by skopeo.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests import realtools
from tests.realtools_artifacts import MT_SPDX, push_artifact
from tests.support.cli import run as regfsck
from tests.support.objectstore import (
    Bucket,
    differential,
    needs_server,
    registry_api,
    run_json,
    without_requests,
)

BIG = 5 << 20  # above deep.REMOTE_SMALL_LAYER: read by a spawned worker process


def _with_big_image(bucket: Bucket) -> Bucket:
    """The sample's bucket plus `big/app:latest` (two incompressible 5 MiB gzip layers) and
    an SBOM pushed by digest with that image as its subject (oras-py)."""
    with bucket.registry() as reg, tempfile.TemporaryDirectory(prefix="regfsck-s3r-") as tmp:
        lay = realtools.OCILayoutWriter(Path(tmp) / "layout")
        layers = [lay.add_layer({f"big{i}.bin": realtools.pseudo_random_bytes(f"s3-big-{i}", BIG)})
                  for i in range(2)]
        lay.add_image(layers, tag="big", history=["ADD big0", "ADD big1"])
        realtools.skopeo_copy(lay.ref("big"), f"docker://{reg.host}/big/app:latest",
                              "--preserve-digests")
        api = registry_api(reg.host)
        body, media_type, digest = api.get_manifest("big/app", "latest")
        push_artifact(api, "big/app", None, MT_SPDX,
                      [(json.dumps({"spdxVersion": "SPDX-2.3", "name": "big"}).encode(), MT_SPDX)],
                      subject={"mediaType": media_type, "digest": digest, "size": len(body)})
    return bucket


@pytest.fixture(scope="module")
def read28(bucket28: Bucket) -> Bucket:
    return _with_big_image(bucket28)


@pytest.fixture(scope="module")
def read3(bucket3: Bucket) -> Bucket:
    return _with_big_image(bucket3)


# -- verify --deep ---------------------------------------------------------------------------


@needs_server
@pytest.mark.parametrize("which", ["read28", "read3"])
def test_deep_matches_the_mirror(which: str, request: pytest.FixtureRequest,
                                 tmp_path: Path) -> None:
    """`verify --deep` (and with --no-data) on the bucket: the same document as on disk; every
    layer is read once (one GET each, no second GET for its plain re-hash)."""
    bucket: Bucket = request.getfixturevalue(which)
    deep = differential(bucket, tmp_path / "deep", "verify", "--deep")
    summary = deep["deep"]
    assert summary["layers_checked"] == summary["layers_total"] > 2 and not summary["interrupted"]
    assert summary["bytes_read"] == summary["bytes_total"] > 2 * BIG
    assert deep["summary"]["blobs_verified"] == deep["summary"]["blobs_total"]
    assert not [f for f in deep["findings"] if f["severity"] == "error"], deep["findings"]
    _, plain = run_json(bucket, "verify", bucket.url)
    # The deep pass hashes each layer as it inflates it: beyond plain verify's GETs it reads
    # only image configs (at most one per image), never a layer twice.
    assert plain["requests"]["get"] <= deep["requests"]["get"] <= (
        plain["requests"]["get"] + summary["images"])
    assert deep["requests"]["get_bytes"] < plain["requests"]["get_bytes"] + (
        summary["bytes_total"] // 2)
    structure = differential(bucket, tmp_path / "nodata", "verify", "--deep", "--no-data")
    assert structure["deep"] == summary and structure["summary"]["blobs_verified"] == 0


@needs_server
def test_deep_finds_object_corruptions_as_on_disk(read28: Bucket, tmp_path: Path) -> None:
    """A flipped byte in a big layer (a spawned worker reads it) and a truncated gzip of a
    small one (a thread reads it), applied to the objects: `verify --deep` reports exactly what
    it reports on the disk copy, and `export` of the image refuses with the same error."""
    damaged = read28.clone("regfsck-read-damaged")
    client = damaged.moto.client()
    big = max(damaged.image_layers("big/app", "latest"), key=lambda d: d["size"])
    small = damaged.image_layers("a/b", "latest")[0]
    assert big["size"] > BIG and small["size"] < 1 << 20
    key = damaged.blob_key(big["digest"])
    body = bytearray(client.get_object(Bucket=damaged.name, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=damaged.name, Key=key, Body=bytes(body))
    key = damaged.blob_key(small["digest"])
    body = bytearray(client.get_object(Bucket=damaged.name, Key=key)["Body"].read())
    client.put_object(Bucket=damaged.name, Key=key, Body=bytes(body[:len(body) // 2]))

    report = differential(damaged, tmp_path / "deep", "verify", "--deep")
    found = {(f["kind"], f["digest"]) for f in report["findings"]}
    assert ("blob_digest_mismatch", big["digest"]) in found, found
    assert ("blob_digest_mismatch", small["digest"]) in found, found
    truncated = [f for f in report["findings"] if f["digest"] == small["digest"]
                 and f["kind"] == "layer_decompress_error"]
    assert truncated and "truncated" in truncated[0]["message"], report["findings"]
    assert any(f["digest"] == big["digest"] and f["kind"] in (
        "layer_decompress_error", "layer_diff_id_mismatch") for f in report["findings"])
    assert all(f["path"].startswith("docker/registry/v2/") for f in report["findings"])
    differential(damaged, tmp_path / "nodata", "verify", "--deep", "--no-data")
    # export reads the same bytes: the same refusal, nothing written
    disk = damaged.mirror(tmp_path / "export-mirror")
    on_s3 = regfsck("export", damaged.url, "big/app:latest", "-o", str(tmp_path / "s3.tar"),
                    env=damaged.moto.env())
    on_disk = regfsck("export", str(disk), "big/app:latest", "-o", str(tmp_path / "disk.tar"),
                      env=damaged.moto.env())
    assert on_s3.returncode == on_disk.returncode == 1, (on_s3.stderr, on_disk.stderr)
    assert on_s3.stderr == on_disk.stderr and "is corrupt" in on_s3.stderr
    assert not (tmp_path / "s3.tar").exists()


# -- verify --metrics-file -------------------------------------------------------------------


def _stable_metrics(text: str) -> list[str]:
    """The metrics lines that do not depend on when and where the run was."""
    moving = ("regfsck_verify_last_run_timestamp_seconds", "regfsck_verify_duration_seconds")
    return [line.replace(line[line.find('root="'):line.find('"', line.find('root="') + 6) + 1],
                         'root=""') if 'root="' in line else line
            for line in text.splitlines() if not line.startswith(moving)]


@needs_server
def test_metrics_file_on_s3(read28: Bucket, tmp_path: Path) -> None:
    """The metrics file (a local file) for a tree in a bucket: the same metrics as for the
    disk copy, the bucket's URL as the root label, and the bucket listed once."""
    disk = read28.mirror(tmp_path / "mirror")
    s3_file, disk_file = tmp_path / "s3.prom", tmp_path / "disk.prom"
    code_s3, on_s3 = run_json(read28, "verify", "--metrics-file", str(s3_file), read28.url)
    code_disk, on_disk = run_json(read28, "verify", "--metrics-file", str(disk_file), str(disk))
    assert without_requests(on_s3) == on_disk and code_s3 == code_disk
    s3_text, disk_text = s3_file.read_text(), disk_file.read_text()
    assert f'root="{read28.url}"' in s3_text
    assert _stable_metrics(s3_text) == _stable_metrics(disk_text)
    assert "regfsck_gc_reclaimable_bytes{" in s3_text
    _, plain = run_json(read28, "verify", read28.url)
    assert on_s3["requests"]["list"] == plain["requests"]["list"]  # one listing, not two


# -- export ----------------------------------------------------------------------------------


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _manifest_digest_of_dir(path: Path) -> str:
    return "sha256:" + hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


@needs_server
@pytest.mark.parametrize("which", ["read28", "read3"])
def test_export_from_bucket_is_accepted_by_skopeo(which: str, request: pytest.FixtureRequest,
                                                  real_sample: tuple[Path, realtools.SampleInfo],
                                                  tmp_path: Path) -> None:
    """`export` of images out of the bucket (referrers included) to an OCI layout and an
    oci-archive: byte for byte the export of the disk copy; skopeo copies every image out of
    them with the digests the registry serves."""
    bucket: Bucket = request.getfixturevalue(which)
    info = real_sample[1]
    disk = bucket.mirror(tmp_path / "mirror")
    oci_repo, oci_tag, oci_digest = info.oci_index
    refs = ["big/app:latest", "a/b", f"{oci_repo}:{oci_tag}"]
    outputs: dict[str, dict[str, Any]] = {}
    for where, root in (("s3", bucket.url), ("disk", str(disk))):
        for fmt, name in (("oci", "layout"), ("oci-archive", "image.tar")):
            out = tmp_path / where / name
            out.parent.mkdir(exist_ok=True)
            proc = regfsck("export", root, *refs, "-o", str(out), "--format", fmt, "--json",
                           env=bucket.moto.env())
            assert proc.returncode == 0, proc.stderr
            outputs[f"{where}-{fmt}"] = json.loads(proc.stdout)
    startedat = sum(1 for p in disk.rglob("startedat") if p.is_file())
    for fmt in ("oci", "oci-archive"):
        on_s3, on_disk = outputs[f"s3-{fmt}"], outputs[f"disk-{fmt}"]
        assert on_s3["requests"]["get"] > 0 and "requests" not in on_disk
        # Each blob exported is read once (manifests are written from the bytes parsed while
        # planning, not fetched again); beyond them only the uploads' startedat are read: every
        # link, tag current links included, is known from its listed ETag.
        assert on_s3["requests"]["get"] == on_s3["blobs"] + startedat, on_s3["requests"]
        assert on_s3["requests"]["get_bytes"] - on_s3["blob_bytes"] <= 64 * startedat
        assert {k: v for k, v in on_s3.items() if k not in ("requests", "output")} == {
            k: v for k, v in on_disk.items() if k != "output"}
    assert outputs["s3-oci"]["referrers"] >= 1  # the SBOM attached to big/app by subject
    assert _tree(tmp_path / "s3" / "layout") == _tree(tmp_path / "disk" / "layout")
    assert (tmp_path / "s3" / "image.tar").read_bytes() == (tmp_path / "disk" / "image.tar").read_bytes()

    with bucket.registry() as reg:
        expected = {"big/app:latest": realtools.RealRegistry.manifest_digest(
            registry_api(reg.host), "big/app", "latest")}
        for tag in registry_api(reg.host).tags("a/b"):
            expected[f"a/b:{tag}"] = registry_api(reg.host).manifest_digest("a/b", tag)
    index = json.loads((tmp_path / "s3" / "layout" / "index.json").read_bytes())
    names = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
             for m in index["manifests"] if "annotations" in m}
    for ref, digest in expected.items():
        assert names[ref] == digest, (ref, names)
        target = tmp_path / "dirs" / ref.replace("/", "_").replace(":", "_")
        target.parent.mkdir(exist_ok=True)
        realtools.skopeo_copy(f"oci:{tmp_path / 's3' / 'layout'}:{ref}", f"dir:{target}",
                              "--preserve-digests")
        assert _manifest_digest_of_dir(target) == digest
    assert names[f"{oci_repo}:{oci_tag}"] == oci_digest
    # The archive goes into a filesystem registry (every platform), digests preserved.
    with tempfile.TemporaryDirectory(prefix="regfsck-s3r-fs-") as fs_root, \
            realtools.RealRegistry(Path(fs_root) / "root") as fs_reg:
        for ref in [*expected, f"{oci_repo}:{oci_tag}"]:
            realtools.skopeo_copy(f"oci-archive:{tmp_path / 's3' / 'image.tar'}:{ref}",
                                  f"docker://{fs_reg.host}/{ref}", "--all", "--preserve-digests")
            repo, _, tag = ref.partition(":")
            assert fs_reg.manifest_digest(repo, tag) == names[ref]


# -- inspect and why -------------------------------------------------------------------------


@needs_server
@pytest.mark.parametrize("which", ["read28", "read3"])
def test_inspect_and_why_match_the_mirror(which: str, request: pytest.FixtureRequest,
                                          real_sample: tuple[Path, realtools.SampleInfo],
                                          tmp_path: Path) -> None:
    """`inspect` (layers measured by streaming GETs) and `why` on the bucket: the documents
    and exit codes of the disk copy."""
    bucket: Bucket = request.getfixturevalue(which)
    info = real_sample[1]
    disk = bucket.mirror(tmp_path / "mirror")
    oci_repo, oci_tag, _ = info.oci_index

    def same(*args: str) -> dict[str, Any]:
        return differential(bucket, disk, *args[:-1], ref=args[-1])

    report = same("inspect", "big/app:latest")
    layers = report["manifest"]["layers"]
    assert len(layers) == 2 and all(b["compression"] == "gzip" and b["uncompressed_size"] > BIG
                                    for b in layers), layers
    assert [r["kind"] for r in report["referrers"]] == ["sbom"] and report["healthy"]
    same("inspect", "--no-data", f"{oci_repo}:{oci_tag}")
    same("inspect", "a/b:latest")
    layer = bucket.image_layers("big/app", "latest")[0]["digest"]
    why = same("why", layer)
    assert why["exists"]
    doomed = sorted(bucket.doomed_blobs)[0]
    same("why", doomed)
    same("why", doomed.split(":")[1][:12])


@needs_server
def test_read_commands_on_a_missing_bucket_are_one_line(read28: Bucket, tmp_path: Path) -> None:
    url = "s3://regfsck-no-such-bucket"
    for args in (["verify", "--deep", url], ["export", url, "a/b", "-o", str(tmp_path / "x")],
                 ["inspect", url, "a/b:latest"], ["why", url, "sha256:" + "0" * 64]):
        proc = regfsck(*args, env=read28.moto.env())
        assert proc.returncode == 3, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr

