"""regfsck on a registry stored in Azure Blob Storage (the registry's `azure` driver), against
a real Azure Blob server on loopback (Azurite, from npm).

The tree is written by the REAL registry 3.1.1 through its azure driver (`serviceurl` names
Azurite's account URL): the session's sample images are copied in with skopeo, one image is
DELETEd through the API and one upload is left unfinished. Debian's docker-registry 2.8.2 has
no azure driver, so 2.8 cannot write such a tree. Every command is run on the container and
on the container mirrored to disk key for key: the JSON documents must be identical (minus
`requests`); the official `garbage-collect --dry-run` run against the container is the gc
oracle. Changing commands: tests/test_azure_mutations.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests import realtools
from tests.support.cli import run as regfsck
from tests.support.objectstore import (
    Azurite,
    Container,
    differential,
    fill_container,
    needs_azure,
    registry_api,
)


@pytest.fixture(scope="module")
def container(azurite: Azurite, real_sample: tuple[Path, realtools.SampleInfo]) -> Container:
    return fill_container(azurite, real_sample[0], "regfsck-v3")


@needs_azure
def test_read_commands_match_the_mirror(container: Container,
                                        real_sample: tuple[Path, realtools.SampleInfo],
                                        tmp_path: Path) -> None:
    """scan, verify (plain, --no-data, --deep), gc (plan), inspect, why on the container: the
    documents of the disk copy; gc's blobs are the official collector's."""
    disk = container.mirror(tmp_path / "mirror")
    scan = differential(container, disk, "scan")
    assert "gone/app" not in {r["name"] for r in scan["repositories"] if r["manifests"]}
    verify = differential(container, disk, "verify")
    assert verify["summary"]["blobs_verified"] == verify["summary"]["blobs_total"] > 0
    differential(container, disk, "verify", "--no-data")
    deep = differential(container, disk, "verify", "--deep")
    assert deep["deep"]["layers_checked"] == deep["deep"]["layers_total"] > 0
    plan = differential(container, disk, "gc", "--grace", "0")
    code, out = container.registry().garbage_collect("--dry-run")
    assert code == 0, out
    assert {b["digest"] for b in plan["blobs"]} == realtools.parse_gc_output(out).blobs \
        == container.doomed_blobs
    repo, tag, _ = real_sample[1].oci_index
    differential(container, disk, "inspect", ref=f"{repo}:{tag}")
    differential(container, disk, "inspect", ref="a/b:latest")
    differential(container, disk, "why", ref=sorted(container.doomed_blobs)[0])


@needs_azure
def test_export_from_azure_is_accepted_by_skopeo(container: Container, tmp_path: Path) -> None:
    disk = container.mirror(tmp_path / "mirror")
    for where, root in (("azure", container.url), ("disk", str(disk))):
        proc = regfsck("export", root, "a/b", "-o", str(tmp_path / f"{where}.tar"),
                       env=container.env())
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "azure.tar").read_bytes() == (tmp_path / "disk.tar").read_bytes()
    with container.registry() as reg:
        expected = realtools.RealRegistry.manifest_digest(registry_api(reg.host), "a/b", "latest")
    target = tmp_path / "dir"
    realtools.skopeo_copy(f"oci-archive:{tmp_path / 'azure.tar'}:a/b:latest", f"dir:{target}",
                          "--preserve-digests")
    assert "sha256:" + hashlib.sha256((target / "manifest.json").read_bytes()).hexdigest() == expected


@needs_azure
def test_corruption_found_and_changes_refused(container: Container, tmp_path: Path) -> None:
    """A flipped byte in a layer blob of a copy of the container: the same findings as on disk;
    gc --apply and rm --apply without a registry check refuse (exit 3, one line: regfsck
    cannot see the registry's processes there) and change nothing."""
    import obstore

    box = container.clone("regfsck-v3-damaged")
    src = container.mirror(tmp_path / "copy")
    store = box.store()
    blobs = sorted((p.stat().st_size, p) for p in (src / "docker/registry/v2/blobs").rglob("data"))
    layer = blobs[-1][1]
    key = f"{box.prefix}/{layer.relative_to(src).as_posix()}"
    body = bytearray(layer.read_bytes())
    body[len(body) // 2] ^= 0x01
    obstore.put(store, key, bytes(body))
    disk = box.mirror(tmp_path / "mirror")
    report = differential(box, disk, "verify", "--deep")
    digest = "sha256:" + layer.parent.name
    assert any(f["kind"] == "blob_digest_mismatch" and f["digest"] == digest
               for f in report["findings"]), report["findings"]

    before = box.etags()
    for args in (["gc", "--apply", "--grace", "0", box.url],
                 ["rm", "--apply", box.url, "a/b:latest"]):
        proc = regfsck(*args, env=box.env())
        assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "--registry-url" in proc.stderr, \
            proc.stderr
    assert box.etags() == before


def test_azure_location_from_config_and_env() -> None:
    from regfsck.objectstore import azure_client_config
    from regfsck.root import RootError, azure_location_from_config, parse_s3_url

    section = {"accountname": "acct", "accountkey": "k", "container": "c", "realm": "core.chinacloudapi.cn",
               "rootdirectory": "/x/y/"}
    loc = azure_location_from_config(section, {})
    assert (loc.provider, loc.bucket, loc.prefix, loc.endpoint) == (
        "azure", "c", "x/y", "https://acct.blob.core.chinacloudapi.cn")
    assert loc.url == "azure://c/x/y" and loc.v2_prefix == "x/y/docker/registry/v2/"
    loc = azure_location_from_config(section, {"REGISTRY_STORAGE_AZURE_CONTAINER": "d",
                                               "REGISTRY_STORAGE_AZURE_SERVICEURL": "http://h:1/acct"})
    assert (loc.bucket, loc.endpoint) == ("d", "http://h:1/acct")
    assert azure_client_config(loc, {}) == {"account_name": "acct", "account_key": "k",
                                            "endpoint": "http://h:1/acct"}
    url = parse_s3_url("azure:/c/p//q")  # typer's Path folds azure:// to azure:/
    assert (url.provider, url.bucket, url.prefix) == ("azure", "c", "p/q")
    assert azure_client_config(url, {"AZURE_STORAGE_ACCOUNT": "a", "AZURE_STORAGE_KEY": "s"}) == {
        "account_name": "a", "account_key": "s"}
    with pytest.raises(RootError):
        azure_location_from_config({"accountname": "a"}, {})
