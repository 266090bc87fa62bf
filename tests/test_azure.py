"""regfsck on a registry stored in Azure Blob Storage (the registry's `azure` driver), against
a real Azure Blob server on loopback (Azurite, from npm).

The tree is written by the REAL registry 3.1.1 through its azure driver (`serviceurl` names
Azurite's account URL): the session's sample images are copied in with skopeo, one image is
DELETEd through the API and one upload is left unfinished. Debian's docker-registry 2.8.2 has
no azure driver, so 2.8 cannot write such a tree. Every command is run on the container and
on the container mirrored to disk key for key: the JSON documents must be identical (minus
`requests`); the official `garbage-collect --dry-run` run against the container is the gc
oracle. Changing commands refuse on Azure (nothing changed).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import azuretools, realtools, s3tools

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFIX = "reg/root"


def needs_azure(test: Any) -> Any:
    for mark in (pytest.mark.realtools,
                 pytest.mark.skipif(bool(realtools.REAL_TOOLS_SKIP_REASON),
                                    reason=realtools.REAL_TOOLS_SKIP_REASON or "-")):
        test = mark(test)
    return test


@dataclass
class Container:
    server: azuretools.Azurite
    name: str
    binary: str
    doomed_blobs: set[str]

    @property
    def url(self) -> str:
        return f"azure://{self.name}/{PREFIX}"

    def key(self, rel: str) -> str:
        return f"{PREFIX}/docker/registry/v2/{rel}"

    def mirror(self, dest: Path) -> Path:
        return azuretools.mirror_to_disk(self.server.store(self.name), PREFIX, dest)

    def registry(self) -> azuretools.AzureRegistry:
        return azuretools.AzureRegistry(self.binary, self.server.endpoint, self.name, "/" + PREFIX)


def regfsck(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "regfsck", *args], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO_ROOT)}, timeout=600, check=False)


def run_json(box: Container, *args: str) -> tuple[int, dict[str, Any]]:
    proc = regfsck(*args, "--json", env=box.server.env())
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def azurite() -> Iterator[azuretools.Azurite]:
    missing = azuretools.azurite_missing()
    if missing:
        pytest.skip(missing)
    with azuretools.Azurite() as server:
        yield server


@pytest.fixture(scope="module")
def container(azurite: azuretools.Azurite,
              real_sample: tuple[Path, realtools.SampleInfo]) -> Container:
    binary = s3tools.registry3_binary()
    if binary is None:
        pytest.skip("registry v3 binary not available (/work/shared/bin/unpack-registry3); "
                    "Debian's 2.8.2 has no azure driver")
    box = Container(azurite, azurite.make_container("regfsck-v3"), binary, set())
    with realtools.RealRegistry(real_sample[0]) as src, box.registry() as dst, \
            tempfile.TemporaryDirectory(prefix="regfsck-az-layout-") as tmp:
        for repo in src.catalog():
            if repo.startswith("legacy/"):
                continue  # schema1: registry 3 refuses it
            for tag in src.tags(repo):
                realtools.skopeo_copy(f"docker://{src.host}/{repo}:{tag}",
                                      f"docker://{dst.host}/{repo}:{tag}", "--all",
                                      "--preserve-digests")
        lay = realtools.OCILayoutWriter(Path(tmp) / "layout")
        layer = lay.add_layer({"doomed.bin": realtools.pseudo_random_bytes("az-doomed", 20000)})
        image = lay.add_image([layer], tag="doomed", history=["ADD doomed"])
        realtools.skopeo_copy(lay.ref("doomed"), f"docker://{dst.host}/gone/app:doomed",
                              "--preserve-digests")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(f"http://{dst.host}/v2/gone/app/manifests/{image['digest']}",
                                         method="DELETE")
        assert opener.open(request, timeout=30).status == 202
        doc = json.loads(lay.read_blob(image["digest"]))
        box.doomed_blobs = {image["digest"], doc["config"]["digest"],
                            *(d["digest"] for d in doc["layers"])}
        upload = urllib.request.Request(f"http://{dst.host}/v2/a/b/blobs/uploads/", data=b"",
                                        method="POST")
        assert opener.open(upload, timeout=30).status == 202
    return box


def _differential(box: Container, disk: Path, *args: str, ref: str | None = None) -> dict[str, Any]:
    tail = [ref] if ref is not None else []
    code_az, on_az = run_json(box, *args, box.url, *tail)
    code_disk, on_disk = run_json(box, *args, str(disk), *tail)
    assert on_az.pop("requests")["total"] > 0 and "requests" not in on_disk
    assert on_az == on_disk, args
    assert code_az == code_disk, args
    return on_az


@needs_azure
def test_read_commands_match_the_mirror(container: Container,
                                        real_sample: tuple[Path, realtools.SampleInfo],
                                        tmp_path: Path) -> None:
    """scan, verify (plain, --no-data, --deep), gc (plan), inspect, why on the container: the
    documents of the disk copy; gc's blobs are the official collector's."""
    disk = container.mirror(tmp_path / "mirror")
    scan = _differential(container, disk, "scan")
    assert "gone/app" not in {r["name"] for r in scan["repositories"] if r["manifests"]}
    verify = _differential(container, disk, "verify")
    assert verify["summary"]["blobs_verified"] == verify["summary"]["blobs_total"] > 0
    _differential(container, disk, "verify", "--no-data")
    deep = _differential(container, disk, "verify", "--deep")
    assert deep["deep"]["layers_checked"] == deep["deep"]["layers_total"] > 0
    plan = _differential(container, disk, "gc", "--grace", "0")
    code, out = container.registry().garbage_collect("--dry-run")
    assert code == 0, out
    assert {b["digest"] for b in plan["blobs"]} == realtools.parse_gc_output(out).blobs \
        == container.doomed_blobs
    repo, tag, _ = real_sample[1].oci_index
    _differential(container, disk, "inspect", ref=f"{repo}:{tag}")
    _differential(container, disk, "inspect", ref="a/b:latest")
    _differential(container, disk, "why", ref=sorted(container.doomed_blobs)[0])


@needs_azure
def test_export_from_azure_is_accepted_by_skopeo(container: Container, tmp_path: Path) -> None:
    disk = container.mirror(tmp_path / "mirror")
    for where, root in (("azure", container.url), ("disk", str(disk))):
        proc = regfsck("export", root, "a/b", "-o", str(tmp_path / f"{where}.tar"),
                       env=container.server.env())
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "azure.tar").read_bytes() == (tmp_path / "disk.tar").read_bytes()
    with container.registry() as reg:
        expected = realtools.RealRegistry.manifest_digest(_api(reg.host), "a/b", "latest")
    target = tmp_path / "dir"
    realtools.skopeo_copy(f"oci-archive:{tmp_path / 'azure.tar'}:a/b:latest", f"dir:{target}",
                          "--preserve-digests")
    assert "sha256:" + hashlib.sha256((target / "manifest.json").read_bytes()).hexdigest() == expected


def _api(host: str) -> realtools.RealRegistry:
    api = realtools.RealRegistry("/nonexistent-regfsck-root")
    api.port = int(host.rsplit(":", 1)[1])
    return api


@needs_azure
def test_corruption_found_and_changes_refused(container: Container, tmp_path: Path) -> None:
    """A flipped byte in a layer blob of a copy of the container: the same findings as on disk;
    gc --apply and rm --apply on Azure refuse (exit 3, one line) and change nothing."""
    import obstore

    box = Container(container.server, container.server.make_container("regfsck-v3-damaged"),
                    container.binary, set())
    src = container.mirror(tmp_path / "copy")
    store = box.server.store(box.name)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        obstore.put(store, f"{PREFIX}/{path.relative_to(src).as_posix()}", path.read_bytes())
    blobs = sorted((p.stat().st_size, p) for p in (src / "docker/registry/v2/blobs").rglob("data"))
    layer = blobs[-1][1]
    key = f"{PREFIX}/{layer.relative_to(src).as_posix()}"
    body = bytearray(layer.read_bytes())
    body[len(body) // 2] ^= 0x01
    obstore.put(store, key, bytes(body))
    disk = box.mirror(tmp_path / "mirror")
    report = _differential(box, disk, "verify", "--deep")
    digest = "sha256:" + layer.parent.name
    assert any(f["kind"] == "blob_digest_mismatch" and f["digest"] == digest
               for f in report["findings"]), report["findings"]

    def keys() -> dict[str, Any]:
        return {m["path"]: m["e_tag"] for page in obstore.list(store, None, chunk_size=1000)
                for m in page}

    before = keys()
    for args in (["gc", "--apply", "--grace", "0", "--no-registry-check", box.url],
                 ["rm", "--apply", "--no-registry-check", box.url, "a/b:latest"]):
        proc = regfsck(*args, env=box.server.env())
        assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Azure" in proc.stderr, proc.stderr
    assert keys() == before


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
