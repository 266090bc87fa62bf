"""export checked by the real consumers: skopeo, umoci and a fresh real registry.

The source is the session's tree written by the real registry (`real_sample`); every format
is read by skopeo, and copying out of the export into a new registry on 127.0.0.1 must give
back the same manifest digests (OCI formats) or the same layer contents (docker-archive).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from regfsck.export import ExportFormat, parse_platform
from tests.realtools import RealRegistry, SampleInfo, sha256_digest, skopeo, skopeo_copy
from tests.support.export import export, read_archive

pytestmark = pytest.mark.realtools

OCI_REFS = ["library/base:latest", "multi/oci:latest", "compress/zstd:latest", "a/b:latest"]


@pytest.fixture(scope="module")
def exports(real_sample: tuple[Path, SampleInfo],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One export per format, made once for the module."""
    root, _ = real_sample
    out = tmp_path_factory.mktemp("exports")
    made = {"oci": out / "layout", "tar": out / "images.tar", "zst": out / "images.tar.zst",
            "gz": out / "images.tar.gz"}
    for path in made.values():
        export(root, OCI_REFS, path)
    made["docker"] = out / "docker.tar.zst"
    export(root, ["library/base:latest", "compress/zstd:latest", "a/b/c:latest"], made["docker"],
           fmt=ExportFormat.DOCKER_ARCHIVE)
    made["docker-arm64"] = out / "arm64.tar"
    export(root, ["multi/docker:latest"], made["docker-arm64"], fmt=ExportFormat.DOCKER_ARCHIVE,
           platform=parse_platform("linux/arm64"))
    return made


def transport(kind: str, path: Path, name: str) -> str:
    return f"oci:{path}:{name}" if kind == "oci" else f"oci-archive:{path}:{name}"


@pytest.mark.parametrize("kind", ["oci", "tar", "zst", "gz"])
def test_skopeo_reads_every_oci_format(exports: dict[str, Path], sample_info: SampleInfo,
                                       kind: str) -> None:
    for ref in OCI_REFS:
        repo, tag = ref.split(":")
        raw = skopeo("inspect", "--raw", transport(kind, exports[kind], ref)).encode()
        assert sha256_digest(raw) == sample_info.tags[repo][tag]


def test_skopeo_copies_oci_archives_into_a_fresh_registry(exports: dict[str, Path],
                                                          sample_info: SampleInfo,
                                                          tmp_path: Path) -> None:
    with RealRegistry(tmp_path / "fresh") as registry:
        for kind in ("zst", "oci"):
            for ref in OCI_REFS:
                repo, tag = ref.split(":")
                target = f"docker://{registry.host}/{kind}/{repo}:{tag}"
                skopeo_copy(transport(kind, exports[kind], ref), target, "--all",
                            "--preserve-digests")
                assert registry.manifest_digest(f"{kind}/{repo}", tag) == sample_info.tags[repo][tag]
        index = sample_info.oci_index[2]
        for child in sample_info.index_children[index]:
            assert registry.manifest_exists("zst/multi/oci", child)


def test_skopeo_copies_docker_archive(exports: dict[str, Path], real_sample: tuple[Path, SampleInfo],
                                      tmp_path: Path) -> None:
    root, info = real_sample
    archive = exports["docker"]
    names = {"library/base:latest": info.tags["library/base"]["latest"],
             "compress/zstd:latest": info.tags["compress/zstd"]["latest"],
             "a/b/c:latest": info.tags["a/b/c"]["latest"]}
    with RealRegistry(tmp_path / "fresh") as registry:
        for name, original in names.items():
            inspected = json.loads(skopeo("inspect", f"docker-archive:{archive}:{name}"))
            original_manifest = json.loads(_tree_blob(root, original))
            config = json.loads(_tree_blob(root, original_manifest["config"]["digest"]))
            assert inspected["Layers"] == config["rootfs"]["diff_ids"]  # layers decompress right
            repo, tag = name.split(":")
            skopeo_copy(f"docker-archive:{archive}:{name}", f"docker://{registry.host}/{repo}:{tag}")
            body, _, _ = registry.get_manifest(repo, tag)
            pushed = json.loads(body)
            # the image ID (config) survives byte for byte
            assert pushed["config"]["digest"] == original_manifest["config"]["digest"]
        # the platform picked from the docker list is arm64
        inspected = json.loads(skopeo("inspect", f"docker-archive:{exports['docker-arm64']}"))
        assert inspected["Architecture"] == "arm64"
        [entry] = json.loads(read_archive(exports["docker-arm64"])["manifest.json"])
        assert entry["RepoTags"] == ["multi/docker:latest"]


def _tree_blob(root: Path, digest: str) -> bytes:
    hex_part = digest.split(":")[1]
    return (root / "docker/registry/v2/blobs/sha256" / hex_part[:2] / hex_part / "data").read_bytes()


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed")
def test_umoci_unpacks_the_oci_layout(exports: dict[str, Path], sample_info: SampleInfo,
                                      tmp_path: Path) -> None:
    listed = subprocess.run(["umoci", "ls", "--layout", str(exports["oci"])], capture_output=True,
                            text=True, check=True).stdout.split()
    # The images named, and the referrers of library/base taken along (--with-referrers):
    # its cosign signature tag and its untagged SBOM.
    referrers = [f"library/base:{sample_info.referrer[1]}", f"library/base@{sample_info.artifact[1]}"]
    assert sorted(listed) == sorted(OCI_REFS + referrers)
    bundle = tmp_path / "bundle"
    # umoci 0.4.7 reads neither zstd layers nor nested indexes: a gzip OCI image
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{exports['oci']}:a/b:latest",
                    str(bundle)], capture_output=True, check=True)
    assert (bundle / "rootfs/etc/os-release").read_bytes().startswith(b'NAME="regfsck-base"')
    assert (bundle / "rootfs/usr/share/regfsck/a-b.txt").read_text() == "regfsck sample layer a-b\n"
