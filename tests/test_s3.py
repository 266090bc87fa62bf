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
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import realtools, s3tools
from tests.support import REPO_ROOT
from tests.support.cli import run as regfsck  # a process each: request counts are per process


def needs_server(test: Any) -> Any:
    """The real registry, skopeo and moto_server: skipped with the reason when absent."""
    for mark in (pytest.mark.realtools,
                 pytest.mark.skipif(bool(realtools.REAL_TOOLS_SKIP_REASON),
                                    reason=realtools.REAL_TOOLS_SKIP_REASON or "-"),
                 pytest.mark.skipif(s3tools.moto_missing() is not None,
                                    reason=s3tools.moto_missing() or "-")):
        test = mark(test)
    return test


@dataclass
class Bucket:
    moto: s3tools.MotoServer
    name: str
    prefix: str
    binary: str
    doomed_blobs: set[str]  # blobs only the image deleted through the API used

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}"

    def key(self, rel: str) -> str:
        return f"{self.prefix}/docker/registry/v2/{rel}"

    def mirror(self, dest: Path) -> Path:
        return s3tools.mirror_to_disk(self.moto.client(), self.name, self.prefix, dest)

    def registry(self) -> s3tools.S3Registry:
        return s3tools.S3Registry(self.binary, self.moto.endpoint, self.name, "/" + self.prefix)


def run_json(bucket: Bucket, *args: str) -> tuple[int, dict[str, Any]]:
    proc = regfsck(*args, "--json", env=bucket.moto.env())
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def moto() -> Iterator[s3tools.MotoServer]:
    with s3tools.MotoServer() as server:
        yield server


def _push_into_bucket(moto: s3tools.MotoServer, fs_root: Path, binary: str, bucket: str) -> Bucket:
    """Copy the sample's images into an s3-backed registry; delete one image; leave an upload."""
    moto.make_bucket(bucket)
    target = Bucket(moto, bucket, "reg/root", binary, set())
    with realtools.RealRegistry(fs_root) as src, target.registry() as dst, \
            tempfile.TemporaryDirectory(prefix="regfsck-s3-layout-") as tmp:
        for repo in src.catalog():
            if repo.startswith("legacy/"):
                continue  # schema1: not accepted by registry 3, not enabled here
            for tag in src.tags(repo):
                realtools.skopeo_copy(f"docker://{src.host}/{repo}:{tag}",
                                      f"docker://{dst.host}/{repo}:{tag}", "--all", "--preserve-digests")
        lay = realtools.OCILayoutWriter(Path(tmp) / "layout")
        layer = lay.add_layer({"doomed.bin": realtools.pseudo_random_bytes("s3-doomed", 20000)})
        image = lay.add_image([layer], tag="doomed", history=["ADD doomed"])
        realtools.skopeo_copy(lay.ref("doomed"), f"docker://{dst.host}/gone/app:doomed",
                              "--preserve-digests")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(f"http://{dst.host}/v2/gone/app/manifests/{image['digest']}",
                                         method="DELETE")
        assert opener.open(request, timeout=30).status == 202
        doc = json.loads(lay.read_blob(image["digest"]))
        target.doomed_blobs = {image["digest"], doc["config"]["digest"],
                               *(d["digest"] for d in doc["layers"])}
        upload = urllib.request.Request(f"http://{dst.host}/v2/a/b/blobs/uploads/", data=b"",
                                        method="POST")
        assert opener.open(upload, timeout=30).status == 202
    return target


@pytest.fixture(scope="module")
def bucket28(moto: s3tools.MotoServer, real_sample: tuple[Path, realtools.SampleInfo]) -> Bucket:
    return _push_into_bucket(moto, real_sample[0], realtools.REGISTRY_BIN, "regfsck-v28")


@pytest.fixture(scope="module")
def bucket3(moto: s3tools.MotoServer, real_sample: tuple[Path, realtools.SampleInfo]) -> Bucket:
    binary = s3tools.registry3_binary()
    if binary is None:
        pytest.skip("registry v3 binary not available (/work/shared/bin/unpack-registry3)")
    return _push_into_bucket(moto, real_sample[0], binary, "regfsck-v3")


def _without_requests(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "requests"}


def _differential(bucket: Bucket, tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run the command on the bucket and on its key-for-key mirror; the documents must match."""
    disk = bucket.mirror(tmp_path / "mirror")
    code_s3, on_s3 = run_json(bucket, *args, bucket.url)
    code_disk, on_disk = run_json(bucket, *args, str(disk))
    assert "requests" in on_s3 and on_s3["requests"]["total"] > 0
    assert "requests" not in on_disk
    assert _without_requests(on_s3) == on_disk
    assert code_s3 == code_disk
    return on_s3


@needs_server
@pytest.mark.parametrize("which", ["bucket28", "bucket3"])
def test_scan_verify_gc_match_the_mirror(which: str, request: pytest.FixtureRequest,
                                         tmp_path: Path) -> None:
    bucket: Bucket = request.getfixturevalue(which)
    scan = _differential(bucket, tmp_path / "scan", "scan")
    assert "gone/app" not in {r["name"] for r in scan["repositories"] if r["manifests"]}
    verify = _differential(bucket, tmp_path / "verify", "verify")
    assert verify["summary"]["blobs_verified"] == verify["summary"]["blobs_total"] > 0
    structure = _differential(bucket, tmp_path / "nodata", "verify", "--no-data")
    assert structure["summary"]["blobs_verified"] == 0
    assert structure["requests"].get("get", 0) < verify["requests"]["get"]
    plan = _differential(bucket, tmp_path / "gc", "gc", "--grace", "0")
    _differential(bucket, tmp_path / "gcm", "gc", "--grace", "0", "--delete-untagged",
                  "--uploads-older-than", "0")
    # The official collector, run against the bucket, is the oracle for the blobs to go.
    code, out = bucket.registry().garbage_collect("--dry-run")
    assert code == 0, out
    official = realtools.parse_gc_output(out)
    assert {b["digest"] for b in plan["blobs"]} == official.blobs == bucket.doomed_blobs


@needs_server
def test_corruptions_are_found_as_on_disk(moto: s3tools.MotoServer, bucket28: Bucket,
                                         real_sample: tuple[Path, realtools.SampleInfo],
                                         tmp_path: Path) -> None:
    """A flipped byte in a layer, a deleted blob and a garbage link: same findings as on disk."""
    damaged = Bucket(moto, "regfsck-damaged", bucket28.prefix, bucket28.binary, set())
    moto.make_bucket(damaged.name)
    client = moto.client()
    s3tools.upload_tree(client, bucket28.mirror(tmp_path / "copy"), damaged.name, damaged.prefix)
    blobs = sorted((o["Key"], o["Size"]) for o in s3tools.iter_keys(client, damaged.name,
                                                                   damaged.key("blobs/")))
    layer_key, _ = max(blobs, key=lambda item: item[1])  # the largest blob: a layer
    body = bytearray(client.get_object(Bucket=damaged.name, Key=layer_key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=damaged.name, Key=layer_key, Body=bytes(body))
    def read(rel: str) -> bytes:
        return bytes(client.get_object(Bucket=damaged.name, Key=damaged.key(rel))["Body"].read())

    manifest = read("blobs/sha256/{}/{}/data".format(*_fan(
        read("repositories/a/b/_manifests/tags/latest/current/link").decode())))
    config = json.loads(manifest)["config"]["digest"]
    client.delete_object(Bucket=damaged.name, Key=damaged.key(
        "blobs/sha256/{}/{}/data".format(*_fan(config))))
    links = [o["Key"] for o in s3tools.iter_keys(client, damaged.name,
                                                 damaged.key("repositories/a/b/_layers/"))]
    client.put_object(Bucket=damaged.name, Key=links[0], Body=b"not a digest\n")

    report = _differential(damaged, tmp_path / "verify", "verify")
    kinds = {f["kind"] for f in report["findings"]}
    flipped = "sha256:" + layer_key.split("/")[-2]
    assert any(f["kind"] == "blob_digest_mismatch" and f["digest"] == flipped
               for f in report["findings"]), report["findings"]
    assert any(f["path"].endswith(links[0].split("docker/registry/v2/")[1])
               for f in report["findings"]), report["findings"]
    assert any(f["digest"] == config for f in report["findings"]), report["findings"]
    assert len(kinds) >= 3, kinds
    assert all(f["path"].startswith("docker/registry/v2/") for f in report["findings"])
    _differential(damaged, tmp_path / "gc", "gc", "--grace", "0")


def _fan(digest: str) -> tuple[str, str]:
    hex_part = digest.split(":", 1)[1]
    return hex_part[:2], hex_part


@needs_server
def test_config_and_env_overrides(bucket28: Bucket, tmp_path: Path) -> None:
    """`--config` with the registry's `storage: s3:` section, REGISTRY_STORAGE_S3_* overriding it."""
    config = s3tools.s3_registry_config(tmp_path / "config.yml", bucket28.moto.endpoint,
                                        "no-such-bucket", "/elsewhere")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(REGISTRY_STORAGE_S3_BUCKET=bucket28.name,
               REGISTRY_STORAGE_S3_ROOTDIRECTORY="/" + bucket28.prefix)
    by_config = regfsck("scan", "--json", "--config", str(config), env=env)
    assert by_config.returncode == 0, by_config.stderr
    by_url = regfsck("scan", "--json", bucket28.url, env=bucket28.moto.env())
    assert _without_requests(json.loads(by_config.stdout)) == _without_requests(json.loads(by_url.stdout))
    wrong = regfsck("scan", "--config", str(config), env={k: v for k, v in env.items()
                                                          if not k.startswith("REGISTRY_")})
    assert wrong.returncode == 3
    assert len(wrong.stderr.strip().splitlines()) == 1 and "no-such-bucket" in wrong.stderr


@needs_server
def test_mutations_and_other_commands_refuse(bucket28: Bucket) -> None:
    """Mutations without --registry-url (regfsck cannot see a registry on S3), and the
    commands not yet available there: one line, exit 3, not one key changed."""
    client = bucket28.moto.client()
    before = {o["Key"]: o["ETag"] for o in s3tools.iter_keys(client, bucket28.name)}
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
    assert {o["Key"]: o["ETag"] for o in s3tools.iter_keys(client, bucket28.name)} == before


@needs_server
def test_missing_bucket_or_prefix_is_one_line(bucket28: Bucket) -> None:
    for url in (f"s3://{bucket28.name}/no/such/prefix", "s3://regfsck-no-such-bucket"):
        proc = regfsck("verify", url, env=bucket28.moto.env())
        assert proc.returncode == 3, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@needs_server
def test_pagination_and_partitions(moto: s3tools.MotoServer, tmp_path: Path) -> None:
    """Partitions holding more than one page (1,000 keys) of objects: nothing is lost."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import synth

    root = tmp_path / "synth"
    synth.generate(root, synth.SynthConfig(repositories=1, tags_per_repo=1, unique_layers=1050,
                                           layer_sizes=(64,), seed=7))
    bucket = Bucket(moto, "regfsck-pages", "", realtools.REGISTRY_BIN, set())
    moto.make_bucket(bucket.name)
    s3tools.upload_tree(moto.client(), root, bucket.name, "")
    for directory, _, _ in sorted(os.walk(root), reverse=True):  # S3 keeps no empty directory
        if not os.listdir(directory):
            os.rmdir(directory)
    code_s3, on_s3 = run_json(bucket, "verify", "--no-data", f"s3://{bucket.name}")
    code_disk, on_disk = run_json(bucket, "verify", "--no-data", str(root))
    assert _without_requests(on_s3) == on_disk and code_s3 == code_disk
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


@pytest.mark.skipif(s3tools.moto_missing() is not None, reason=s3tools.moto_missing() or "-")
def test_keys_no_path_can_name_are_findings(moto: s3tools.MotoServer, tmp_path: Path) -> None:
    """`a//b`, `a/./b` (obstore refuses to list them) and a key that is also a directory:
    each is one unexpected_entry finding; everything else is read as before."""
    bucket = Bucket(moto, "regfsck-odd-keys", "odd", realtools.REGISTRY_BIN, set())
    moto.make_bucket(bucket.name)
    client = moto.client()
    s3tools.upload_tree(client, REPO_ROOT / "fixtures" / "registry", bucket.name, bucket.prefix)
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
        moto: s3tools.MotoServer, bucket28: Bucket, tmp_path: Path) -> None:
    """--changed-only on S3: the record lives under --state-dir (or $XDG_STATE_HOME/regfsck),
    never in the bucket; an unchanged blob is not fetched again, a rewritten one is."""
    bucket = Bucket(moto, "regfsck-incremental", bucket28.prefix, bucket28.binary, set())
    moto.make_bucket(bucket.name)
    client = moto.client()
    s3tools.upload_tree(client, bucket28.mirror(tmp_path / "copy"), bucket.name, bucket.prefix)
    keys = {o["Key"] for o in s3tools.iter_keys(client, bucket.name)}
    state = tmp_path / "state"
    _, first = run_json(bucket, "verify", "--changed-only", "--state-dir", str(state), bucket.url)
    total = first["summary"]["blobs_total"]
    assert first["summary"]["blobs_verified"] == total > 0 and not first["findings"]
    record = Path(first["summary"]["record"])
    assert record.is_file() and state in record.parents
    _, second = run_json(bucket, "verify", "--changed-only", "--state-dir", str(state), bucket.url)
    assert second["summary"]["blobs_verified"] == 0 and second["summary"]["blobs_skipped"] == total
    assert second["requests"]["get"] < first["requests"]["get"] - total + 1
    blob_keys = sorted((o["Size"], o["Key"]) for o in s3tools.iter_keys(
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
    assert {o["Key"] for o in s3tools.iter_keys(client, bucket.name)} == keys
    local = regfsck("verify", "--state-dir", str(state), str(tmp_path / "copy"))
    assert local.returncode == 2 and len(local.stderr.strip().splitlines()) == 1
