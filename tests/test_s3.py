"""regfsck on registries stored in S3, against a real S3 API server (moto) on loopback.

The trees are written by the REAL registry's s3 driver (distribution 2.8 and v3.1.1), by
copying the session's sample images into an s3-backed registry, deleting one image through
the API and leaving one upload unfinished. Each test compares regfsck on the bucket with
regfsck on the same bucket mirrored to disk key for key: the JSON documents (findings, plans,
reports) must be identical, and the official collector run against the bucket is the gc
oracle.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests import realtools
from tests.support import REPO_ROOT
from tests.support.cli import run as regfsck  # a process each: request counts are per process
from tests.support.objectstore import (
    Bucket,
    MotoServer,
    differential,
    iter_keys,
    needs_server,
    run_json,
    s3_registry_config,
    upload_tree,
    without_requests,
)


@needs_server
@pytest.mark.parametrize("which", ["bucket28", "bucket3"])
def test_scan_verify_gc_match_the_mirror(which: str, request: pytest.FixtureRequest,
                                         tmp_path: Path) -> None:
    bucket: Bucket = request.getfixturevalue(which)
    scan = differential(bucket, tmp_path / "scan", "scan")
    assert "gone/app" not in {r["name"] for r in scan["repositories"] if r["manifests"]}
    verify = differential(bucket, tmp_path / "verify", "verify")
    assert verify["summary"]["blobs_verified"] == verify["summary"]["blobs_total"] > 0
    structure = differential(bucket, tmp_path / "nodata", "verify", "--no-data")
    assert structure["summary"]["blobs_verified"] == 0
    assert structure["requests"].get("get", 0) < verify["requests"]["get"]
    plan = differential(bucket, tmp_path / "gc", "gc", "--grace", "0")
    differential(bucket, tmp_path / "gcm", "gc", "--grace", "0", "--delete-untagged",
                  "--uploads-older-than", "0")
    # The official collector, run against the bucket, is the oracle for the blobs to go.
    code, out = bucket.registry().garbage_collect("--dry-run")
    assert code == 0, out
    official = realtools.parse_gc_output(out)
    assert {b["digest"] for b in plan["blobs"]} == official.blobs == bucket.doomed_blobs


@needs_server
def test_corruptions_are_found_as_on_disk(moto: MotoServer, bucket28: Bucket,
                                         real_sample: tuple[Path, realtools.SampleInfo],
                                         tmp_path: Path) -> None:
    """A flipped byte in a layer, a deleted blob and a garbage link: same findings as on disk."""
    damaged = bucket28.clone("regfsck-damaged")
    client = moto.client()
    blobs = sorted((o["Key"], o["Size"]) for o in iter_keys(client, damaged.name,
                                                            damaged.key("blobs/")))
    layer_key, _ = max(blobs, key=lambda item: item[1])  # the largest blob: a layer
    body = bytearray(damaged.read(layer_key))
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=damaged.name, Key=layer_key, Body=bytes(body))
    link = damaged.read(damaged.key("repositories/a/b/_manifests/tags/latest/current/link"))
    config = json.loads(damaged.read(damaged.blob_key(link.decode())))["config"]["digest"]
    client.delete_object(Bucket=damaged.name, Key=damaged.blob_key(config))
    links = [o["Key"] for o in iter_keys(client, damaged.name,
                                         damaged.key("repositories/a/b/_layers/"))]
    client.put_object(Bucket=damaged.name, Key=links[0], Body=b"not a digest\n")

    report = differential(damaged, tmp_path / "verify", "verify")
    kinds = {f["kind"] for f in report["findings"]}
    flipped = "sha256:" + layer_key.split("/")[-2]
    assert any(f["kind"] == "blob_digest_mismatch" and f["digest"] == flipped
               for f in report["findings"]), report["findings"]
    assert any(f["path"].endswith(links[0].split("docker/registry/v2/")[1])
               for f in report["findings"]), report["findings"]
    assert any(f["digest"] == config for f in report["findings"]), report["findings"]
    assert len(kinds) >= 3, kinds
    assert all(f["path"].startswith("docker/registry/v2/") for f in report["findings"])
    differential(damaged, tmp_path / "gc", "gc", "--grace", "0")


@needs_server
def test_config_and_env_overrides(bucket28: Bucket, tmp_path: Path) -> None:
    """`--config` with the registry's `storage: s3:` section, REGISTRY_STORAGE_S3_* overriding it."""
    config = s3_registry_config(tmp_path / "config.yml", bucket28.moto.endpoint,
                                        "no-such-bucket", "/elsewhere")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(REGISTRY_STORAGE_S3_BUCKET=bucket28.name,
               REGISTRY_STORAGE_S3_ROOTDIRECTORY="/" + bucket28.prefix)
    by_config = regfsck("scan", "--json", "--config", str(config), env=env)
    assert by_config.returncode == 0, by_config.stderr
    by_url = regfsck("scan", "--json", bucket28.url, env=bucket28.moto.env())
    assert without_requests(json.loads(by_config.stdout)) == without_requests(json.loads(by_url.stdout))
    wrong = regfsck("scan", "--config", str(config), env={k: v for k, v in env.items()
                                                          if not k.startswith("REGISTRY_")})
    assert wrong.returncode == 3
    assert len(wrong.stderr.strip().splitlines()) == 1 and "no-such-bucket" in wrong.stderr


@needs_server
def test_mutations_and_other_commands_refuse(bucket28: Bucket) -> None:
    """Mutations without --registry-url (regfsck cannot see a registry on S3), and the
    commands not yet available there: one line, exit 3, not one key changed."""
    client = bucket28.moto.client()
    before = {o["Key"]: o["ETag"] for o in iter_keys(client, bucket28.name)}
    env = bucket28.moto.env()
    for args in (["gc", "--apply", "--grace", "0", bucket28.url],
                 ["gc", "--apply", "--json", bucket28.url],
                 ["rm", "--apply", bucket28.url, "a/b:latest"]):
        proc = regfsck(*args, env=env)
        assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
        # --json: the error as JSON on stdout (and nothing else); otherwise stdout is empty
        expected = {"error": proc.stderr.strip().removeprefix("regfsck: "), "exit_code": 3}
        assert (json.loads(proc.stdout) == expected if "--json" in args else proc.stdout == ""), args
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert {o["Key"]: o["ETag"] for o in iter_keys(client, bucket28.name)} == before


@needs_server
def test_missing_bucket_or_prefix_is_one_line(bucket28: Bucket) -> None:
    for url in (f"s3://{bucket28.name}/no/such/prefix", "s3://regfsck-no-such-bucket"):
        proc = regfsck("verify", url, env=bucket28.moto.env())
        assert proc.returncode == 3, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@needs_server
def test_pagination_and_partitions(moto: MotoServer, tmp_path: Path) -> None:
    """Partitions holding more than one page (1,000 keys) of objects: nothing is lost."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import synth

    root = tmp_path / "synth"
    synth.generate(root, synth.SynthConfig(repositories=1, tags_per_repo=1, unique_layers=1050,
                                           layer_sizes=(64,), seed=7))
    bucket = Bucket(moto, "regfsck-pages", "", realtools.REGISTRY_BIN)
    moto.make_bucket(bucket.name)
    upload_tree(moto.client(), root, bucket.name, "")
    for directory, _, _ in sorted(os.walk(root), reverse=True):  # S3 keeps no empty directory
        if not os.listdir(directory):
            os.rmdir(directory)
    code_s3, on_s3 = run_json(bucket, "verify", "--no-data", f"s3://{bucket.name}")
    code_disk, on_disk = run_json(bucket, "verify", "--no-data", str(root))
    assert without_requests(on_s3) == on_disk and code_s3 == code_disk
    _, scan = run_json(bucket, "scan", f"s3://{bucket.name}")
    assert scan["blobs"]["count"] > 1000
    assert max(r["layer_links"] for r in scan["repositories"]) > 1000  # one partition, 2+ pages


def test_s3_location_from_config_and_env() -> None:
    """The registry's parameters and its REGISTRY_STORAGE_S3_* overrides (no server needed)."""
    from regfsck.root import RootError, parse_s3_url, s3_location_from_config

    section = {"bucket": "b", "region": "eu-west-1", "regionendpoint": "minio:9000",
               "rootdirectory": "/x/y/", "accesskey": "k", "secretkey": "s",
               "forcepathstyle": "true", "secure": False}
    loc = s3_location_from_config(section, {})
    assert (loc.bucket, loc.prefix, loc.endpoint, loc.force_path_style) == (
        "b", "x/y", "http://minio:9000", True)
    assert loc.v2_prefix == "x/y/docker/registry/v2/"
    loc = s3_location_from_config(section, {"REGISTRY_STORAGE_S3_BUCKET": "other",
                                            "REGISTRY_STORAGE_S3_ROOTDIRECTORY": "",
                                            "REGISTRY_STORAGE_S3_SECURE": "true"})
    assert (loc.bucket, loc.prefix, loc.endpoint) == ("other", "x/y", "https://minio:9000")
    assert parse_s3_url("s3://bkt").v2_prefix == "docker/registry/v2/"
    assert parse_s3_url("s3:/bkt/p//q/").prefix == "p/q"  # typer's Path folds s3:// to s3:/
    with pytest.raises(RootError):
        parse_s3_url("s3://bkt/../x")
    with pytest.raises(RootError):
        s3_location_from_config({"region": "r"}, {})


def test_keys_no_path_can_name_are_findings(moto: MotoServer, tmp_path: Path) -> None:
    """`a//b`, `a/./b` (obstore refuses to list them) and a key that is also a directory:
    each is one unexpected_entry finding; everything else is read as before."""
    bucket = Bucket(moto, "regfsck-odd-keys", "odd", realtools.REGISTRY_BIN)
    moto.make_bucket(bucket.name)
    client = moto.client()
    upload_tree(client, REPO_ROOT / "fixtures" / "registry", bucket.name, bucket.prefix)
    _, before = run_json(bucket, "verify", "--no-data", bucket.url)
    odd = ["repositories/a/b/_layers/sha256//x", "blobs/sha256/00/./y", "repositories/library"]
    for rel in odd:
        client.put_object(Bucket=bucket.name, Key=bucket.key(rel), Body=b"odd")
    code, after = run_json(bucket, "verify", "--no-data", bucket.url)
    assert code in (0, 1)
    new = [f for f in after["findings"] if f not in before["findings"]]
    assert sorted((f["kind"], f["path"]) for f in new) == sorted(
        ("unexpected_entry", f"docker/registry/v2/{rel}") for rel in odd)
    assert len(after["findings"]) == len(before["findings"]) + len(odd)


@needs_server
def test_incremental_verify_keeps_its_record_on_the_local_disk(
        moto: MotoServer, bucket28: Bucket, tmp_path: Path) -> None:
    """--changed-only on S3: the record lives under --state-dir (or $XDG_STATE_HOME/regfsck),
    never in the bucket; an unchanged blob is not fetched again, a rewritten one is."""
    bucket = Bucket(moto, "regfsck-incremental", bucket28.prefix, bucket28.binary)
    moto.make_bucket(bucket.name)
    client = moto.client()
    upload_tree(client, bucket28.mirror(tmp_path / "copy"), bucket.name, bucket.prefix)
    keys = {o["Key"] for o in iter_keys(client, bucket.name)}
    state = tmp_path / "state"
    _, first = run_json(bucket, "verify", "--changed-only", "--state-dir", str(state), bucket.url)
    total = first["summary"]["blobs_total"]
    assert first["summary"]["blobs_verified"] == total > 0 and not first["findings"]
    record = Path(first["summary"]["record"])
    assert record.is_file() and state in record.parents
    _, second = run_json(bucket, "verify", "--changed-only", "--state-dir", str(state), bucket.url)
    assert second["summary"]["blobs_verified"] == 0 and second["summary"]["blobs_skipped"] == total
    # Nothing hashed: only what the structural checks read (as --no-data), no blob fetched.
    _, structure = run_json(bucket, "verify", "--no-data", bucket.url)
    assert second["requests"]["get"] == structure["requests"]["get"] < first["requests"]["get"]
    blob_keys = sorted((o["Size"], o["Key"]) for o in iter_keys(
        client, bucket.name, bucket.key("blobs/")))
    _, layer_key = blob_keys[-1]
    body = bytearray(client.get_object(Bucket=bucket.name, Key=layer_key)["Body"].read())
    body[0] ^= 0x01
    time.sleep(1.1)  # S3 mtimes have a resolution of one second
    client.put_object(Bucket=bucket.name, Key=layer_key, Body=bytes(body))
    code, third = run_json(bucket, "verify", "--changed-only", "--state-dir", str(state), bucket.url)
    assert code == 1 and third["summary"]["blobs_verified"] == 1
    assert [f["kind"] for f in third["findings"]] == ["blob_digest_mismatch"]
    # XDG_STATE_HOME is the default place; nothing was ever written to the bucket.
    env = {**moto.env(), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    proc = regfsck("verify", "--changed-only", "--json", bucket.url, env=env)
    assert (tmp_path / "xdg" / "regfsck" / "s3" / bucket.name / bucket.prefix).is_dir(), proc.stderr
    assert {o["Key"] for o in iter_keys(client, bucket.name)} == keys
    local = regfsck("verify", "--state-dir", str(state), str(tmp_path / "copy"))
    assert local.returncode == 2 and len(local.stderr.strip().splitlines()) == 1


@needs_server
@pytest.mark.parametrize("which", ["bucket28", "bucket3"])
def test_verify_gets_each_blob_once(which: str, request: pytest.FixtureRequest) -> None:
    """Plain `verify` on a bucket reads every blob with exactly one GET: a manifest is hashed
    from the bytes its structural checks read (fetched once, checked against its listed size),
    not fetched again by the hashing pass. Beyond the blobs only the uploads' `startedat` are
    read (every link is known from its listed ETag), so the GETs and their bytes are exactly
    those of the blobs plus those files: a manifest read twice would add one GET and its size."""
    bucket: Bucket = request.getfixturevalue(which)
    code, doc = run_json(bucket, "verify", bucket.url)
    summary, requests = doc["summary"], doc["requests"]
    assert code == 0 and summary["blobs_verified"] == summary["blobs_total"] > 0, doc
    blobs = {k: len(v) for k, v in _bodies(bucket, "blobs/").items() if k.endswith("/data")}
    started = {k: len(v) for k, v in _bodies(bucket, "repositories/").items()
               if k.endswith("/startedat")}
    assert summary["blobs_total"] == len(blobs) and summary["bytes_total"] == sum(blobs.values())
    assert requests["get"] == len(blobs) + len(started), requests
    assert requests["get_bytes"] == sum(blobs.values()) + sum(started.values()), requests


@needs_server
def test_a_damaged_manifest_is_still_read_again_and_reported(bucket28: Bucket,
                                                            tmp_path: Path) -> None:
    """A manifest whose stored bytes are not its digest (one byte flipped inside a JSON
    string, so it still parses) is not vouched for by the structural read: the hashing pass
    reads it again, as any blob, and reports the mismatch as it does on the disk copy."""
    damaged = bucket28.clone("regfsck-manifest-flip")
    link = damaged.read(damaged.key("repositories/a/b/_manifests/tags/latest/current/link"))
    key = damaged.blob_key(link.decode())
    body = damaged.read(key)
    at = body.index(b'"sha256:') + 20  # a hex digit of a digest: still JSON, still a manifest
    flipped = body[:at] + (b"0" if body[at:at + 1] != b"0" else b"1") + body[at + 1:]
    damaged.client().put_object(Bucket=damaged.name, Key=key, Body=flipped)
    report = differential(damaged, tmp_path / "verify", "verify")
    assert ("blob_digest_mismatch", link.decode()) in {
        (f["kind"], f["digest"]) for f in report["findings"]}, report["findings"]


def _bodies(bucket: Bucket, rel: str) -> dict[str, bytes]:
    """The bytes of every key below `docker/registry/v2/rel`."""
    client = bucket.client()
    return {o["Key"]: bucket.read(o["Key"])
            for o in iter_keys(client, bucket.name, bucket.key(rel))}
