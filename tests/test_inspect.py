"""`regfsck inspect` against skopeo reading the same images from the real registry.

The oracle is `skopeo inspect` (--raw, --config, --config --raw and the default summary) on
a real `docker-registry serve` started on the same tree; plus independent decompression of
the layers for the uncompressed totals, and real damage for the health section.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from regfsck import layout
from regfsck.refs import ImageRef, RefError, parse_ref
from tests.realtools import RealRegistry, SampleInfo, read_stored_blob, skopeo
from tests.support import V2
from tests.support.cli import invoke


def inspect_json(root: Path, ref: str, *extra: str) -> tuple[int, dict[str, Any]]:
    result = invoke("inspect", str(root), ref, "--json", *extra, text=False)
    assert result.stdout, result.stderr.decode()
    return result.returncode, json.loads(result.stdout)


def all_tags(info: SampleInfo) -> list[tuple[str, str, str]]:
    return [(repo, tag, digest) for repo, tags in sorted(info.tags.items())
            for tag, digest in sorted(tags.items())]


@pytest.fixture(scope="module")
def served(real_sample: tuple[Path, SampleInfo],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, SampleInfo, str]]:
    """A read-only copy of the real sample served by the real registry."""
    root = tmp_path_factory.mktemp("inspect") / "root"
    shutil.copytree(real_sample[0], root, symlinks=True)
    with RealRegistry(root) as registry:
        yield root, real_sample[1], registry.host


def skopeo_inspect(host: str, repo: str, ref: str, *flags: str) -> bytes:
    sep = "@" if ref.startswith("sha256:") else ":"
    return skopeo("inspect", "--tls-verify=false", *flags,
                  f"docker://{host}/{repo}{sep}{ref}").encode()


def platform_args(platform: str) -> list[str]:
    os_name, arch, *variant = platform.split("/")
    args = ["--override-os", os_name, "--override-arch", arch]
    return args + (["--override-variant", variant[0]] if variant else [])


# -- REF parsing ------------------------------------------------------------------------


def test_parse_ref_forms() -> None:
    """inspect reads a REF as one image: a bare name is `repo:latest`, a digest alone is
    allowed (any repository)."""
    digest = "sha256:" + "a" * 64

    def image(text: str) -> ImageRef:
        return parse_ref(text, bare="latest", digest_alone=True)

    assert image("a/b:v1") == ImageRef("a/b", "v1")
    assert image("a/b") == ImageRef("a/b", "latest")
    assert image("localhost:5000/a") == ImageRef("localhost:5000/a", "latest")
    assert image("localhost:5000/a:x") == ImageRef("localhost:5000/a", "x")
    assert image(f"a/b@{digest}") == ImageRef("a/b", None, digest)
    assert image(digest) == ImageRef(None, None, digest)
    assert image("sha256:6d7e7209") == ImageRef(None, None, "sha256:6d7e7209")
    with pytest.raises(RefError):
        image("a/b@sha256:XYZ")
    with pytest.raises(RefError):
        image("")


def test_the_caller_says_what_a_bare_name_means() -> None:
    """One parser: rm and export read a bare name as the whole repository, inspect as
    `repo:latest`; only inspect takes a digest alone."""
    assert parse_ref("a/b", bare="repository").is_whole_repo
    assert parse_ref("a/b", bare="latest") == ImageRef("a/b", "latest")
    digest = "sha256:" + "a" * 64
    assert parse_ref(digest, bare="repository") == ImageRef("sha256", "a" * 64)
    with pytest.raises(RefError, match="give the repository"):
        _ = parse_ref(digest, bare="latest", digest_alone=True).repository


# -- against skopeo -----------------------------------------------------------------------


@pytest.mark.realtools
def test_raw_manifest_and_config_bytes_equal_skopeo(served: tuple[Path, SampleInfo, str]) -> None:
    root, info, host = served
    for repo, tag, digest in all_tags(info):
        ours = invoke("inspect", str(root), f"{repo}:{tag}", "--raw", text=False)
        assert ours.returncode == 0, ours.stderr
        if digest == info.schema1[2]:  # the registry re-signs schema1 on every GET
            assert json.loads(ours.stdout)["fsLayers"] == json.loads(
                skopeo_inspect(host, repo, tag, "--raw"))["fsLayers"]
            continue
        assert ours.stdout == skopeo_inspect(host, repo, tag, "--raw"), f"{repo}:{tag}"
        children = info.index_children.get(digest)
        platforms = (["linux/amd64", "linux/arm64/v8"] if children else [""])
        for platform in platforms:
            extra = ["--platform", platform] if platform else []
            config = invoke("inspect", str(root), f"{repo}:{tag}", "--image-config", *extra, text=False)
            assert config.returncode == 0, config.stderr
            theirs = skopeo_inspect(host, repo, tag, "--config", "--raw",
                                    *(platform_args(platform) if platform else []))
            assert config.stdout == theirs, f"{repo}:{tag} {platform}"


@pytest.mark.realtools
def test_tree_agrees_with_skopeo_inspect(served: tuple[Path, SampleInfo, str]) -> None:
    root, info, host = served
    for repo, tag, digest in all_tags(info):
        if digest == info.schema1[2]:
            continue
        code, report = inspect_json(root, f"{repo}:{tag}")
        assert code == 0, report["health"]
        assert report["digest"] == digest
        raw = json.loads(skopeo_inspect(host, repo, tag, "--raw"))
        node = report["manifest"]
        assert node["media_type"] == raw.get("mediaType")
        images: list[tuple[dict[str, Any], str]] = []
        if "manifests" in raw:
            assert [m["digest"] for m in node["manifests"]] == [m["digest"] for m in raw["manifests"]]
            for child, desc in zip(node["manifests"], raw["manifests"], strict=True):
                platform = desc["platform"]
                expected = "/".join(platform[k] for k in ("os", "architecture", "variant")
                                    if platform.get(k))
                assert child["platform"] == expected
                assert child["media_type"] == desc["mediaType"] and child["size"] == desc["size"]
                images.append((child, expected))
        else:
            images.append((node, ""))
        for image, platform in images:
            flags = platform_args(platform) if platform else []
            image_raw = json.loads(skopeo_inspect(host, repo, image["digest"], "--raw"))
            assert [(layer["digest"], layer["media_type"], layer["size"])
                    for layer in image["layers"]] == [
                (d["digest"], d["mediaType"], d["size"]) for d in image_raw["layers"]]
            assert image["config"]["digest"] == image_raw["config"]["digest"]
            assert image["config"]["size"] == image_raw["config"]["size"]
            config_type = image_raw["config"]["mediaType"]
            if image_raw.get("artifactType") or config_type not in (
                    "application/vnd.oci.image.config.v1+json",
                    "application/vnd.docker.container.image.v1+json"):
                # OCI 1.1: the artifact type is `artifactType`, else a non-image config's type
                want = image_raw.get("artifactType") or (
                    None if config_type.endswith("empty.v1+json") else config_type)
                assert image.get("artifact_type") == want
                continue  # skopeo cannot summarize an artifact ("image-specific operation")
            summary = json.loads(skopeo_inspect(host, repo, tag, *flags))
            config = json.loads(skopeo_inspect(host, repo, tag, "--config", *flags))
            assert [layer["digest"] for layer in image["layers"]] == summary["Layers"]
            assert report["tags"] == sorted(f"{repo}:{t}" for t in summary["RepoTags"]
                                            if info.tags[repo][t] == digest)
            ours = image["config"]["info"]
            assert ours.get("created") == config.get("created")  # a cosign signature has none
            if "created" in config:
                assert config["created"] == summary["Created"]
            assert (ours["os"], ours["architecture"]) == (config["os"], config["architecture"])
            assert (ours["os"], ours["architecture"]) == (summary["Os"], summary["Architecture"])
            assert ours.get("env") == summary.get("Env") and ours.get("labels") == summary.get("Labels")
            assert ours["history"] == config.get("history", [])
            assert ours["diff_ids"] == config["rootfs"]["diff_ids"]


# -- relations, totals, health ----------------------------------------------------------


def uncompressed_len(data: bytes) -> int:
    if data[:2] == b"\x1f\x8b":
        return len(gzip.decompress(data))
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return len(zstandard.ZstdDecompressor().stream_reader(data).read())
    return len(data)


def test_index_totals_tags_and_relations(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, tag, index = sample_info.oci_index
    code, report = inspect_json(sample_root, f"{repo}:{tag}")
    assert code == 0
    assert report["tags"] == [f"{repo}:{tag}"] and report["repositories"] == [repo]
    children = sample_info.index_children[index]
    assert [m["digest"] for m in report["manifest"]["manifests"]] == children
    layers = {d for child in children for d in sample_info.references[child][1:]}
    blobs = {d: read_stored_blob(sample_root, d) for d in layers}
    totals = report["totals"]
    assert totals["layers"] == len(layers)
    assert totals["compressed_bytes"] == sum(len(b) for b in blobs.values())
    assert totals["uncompressed_bytes"] == sum(uncompressed_len(b) for b in blobs.values())
    every = {index, *children, *(d for c in children for d in sample_info.references[c])}
    assert totals["stored_bytes"] == sum(len(read_stored_blob(sample_root, d)) for d in every)
    # A child seen on its own names the index that lists it.
    code, child = inspect_json(sample_root, f"{repo}@{children[0]}")
    assert code == 0 and child["tags"] == []
    assert child["parents"] == [{"repo": repo, "digest": index, "tags": [tag]}]


def test_zstd_layer_is_measured(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, manifest, layer = sample_info.zstd
    code, report = inspect_json(sample_root, f"{repo}@{manifest}")
    assert code == 0
    found = {entry["digest"]: entry for entry in report["manifest"]["layers"]}
    assert found[layer]["compression"] == "zstd"
    assert found[layer]["uncompressed_size"] == uncompressed_len(read_stored_blob(sample_root, layer))


def test_referrers_and_bare_digest(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, sbom, subject, artifact_type = sample_info.artifact
    code, report = inspect_json(sample_root, subject)  # a bare digest: found in its repository
    assert code == 0 and report["repo"] == repo
    assert {"repo": repo, "digest": sbom, "artifact_type": artifact_type, "kind": "sbom",
            "via": "subject", "tags": []} in report["referrers"]
    assert sorted(report["tags"]) == sorted(f"{repo}:{t}" for t, d in sample_info.tags[repo].items()
                                            if d == subject)


def test_corrupt_layer_shows_in_health(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, _, layer = sample_info.zstd
    path = sample_root / V2 / layout.blob_data(layer)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    code, report = inspect_json(sample_root, f"{repo}:latest")
    assert code == 1 and report["healthy"] is False
    assert ("blob_digest_mismatch", layer) in {(f["kind"], f.get("digest")) for f in report["health"]}
    code, report = inspect_json(sample_root, f"{repo}:latest", "--no-data")
    assert code == 0 and report["data_checked"] is False
    # Another image that does not use the layer stays healthy.
    other = "a/b"
    code, report = inspect_json(sample_root, f"{other}:latest")
    assert code == 0, report["health"]


def test_missing_layer_link_shows_in_tree_and_health(sample_root: Path,
                                                     sample_info: SampleInfo) -> None:
    repo, _, layer = sample_info.zstd
    shutil.rmtree(sample_root / V2 / layout.layer_link(repo, layer).rsplit("/", 1)[0])
    code, report = inspect_json(sample_root, f"{repo}:latest", "--no-data")
    assert code == 1
    entry = next(x for x in report["manifest"]["layers"] if x["digest"] == layer)
    assert entry["linked"] is False
    assert "reference_not_linked" in {f["kind"] for f in report["health"]}


@pytest.mark.parametrize("ref, message", [
    ("no/such:latest", "no such repository"),
    ("a/b:nope", "has no tag"),
    ("a/b@sha256:" + "0" * 64, "has no revision"),
    ("a/b@sha256:zz", "bad digest"),
])
def test_bad_refs_exit_2(fixture_root: Path, ref: str, message: str) -> None:
    result = invoke("inspect", str(fixture_root), ref, text=False)
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_damaged_tag_link_is_one_line_error(fixture_root: Path) -> None:
    link = fixture_root / V2 / layout.tag_current_link("a/b", "latest")
    link.write_bytes(b"")
    result = invoke("inspect", str(fixture_root), "a/b:latest", text=False)
    assert result.returncode == 2
    assert "cannot be resolved" in result.stderr.decode()


def test_human_output_mentions_the_tree(fixture_root: Path) -> None:
    result = invoke("inspect", str(fixture_root), "multi/oci:latest", text=False)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    for expected in ("linux/amd64", "linux/arm64/v8", "ADD base", "uncompressed", "healthy"):
        assert expected in text
