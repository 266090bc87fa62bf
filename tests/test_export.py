"""export: what lands in the OCI layout / archives, byte for byte, and how failures behave.

These tests run on a copy of the shipped fixture (a tree written by the real registry), so
they need no binaries; tests/test_export_realtools.py hands the outputs to skopeo, umoci and
a real registry.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from regfsck import layout
from regfsck.errors import Interrupted
from regfsck.export import (
    REF_NAME_ANNOTATION,
    ExportError,
    ExportFormat,
    compression_for,
    default_format,
    parse_platform,
)
from tests.realtools import SampleInfo
from tests.support import REPO_ROOT, V2
from tests.support.cli import invoke as cli
from tests.support.export import export, read_archive, read_layout_dir


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An empty directory for outputs (the tree copy lives beside it)."""
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def info() -> SampleInfo:
    return SampleInfo.from_json(json.loads((REPO_ROOT / "fixtures" / "registry.json").read_text()))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tree_blob(root: Path, digest: str) -> bytes:
    return (root / V2 / layout.blob_data(digest)).read_bytes()


def layout_refs(files: dict[str, bytes]) -> dict[str, str]:
    index = json.loads(files["index.json"])
    return {m["annotations"][REF_NAME_ANNOTATION]: m["digest"] for m in index["manifests"]}


def closure(files: dict[str, bytes], digest: str) -> set[str]:
    """Digests a manifest needs (children, configs, layers), read from the layout itself."""
    needed = {digest}
    doc = json.loads(files["blobs/" + digest.replace(":", "/")])
    if "manifests" in doc:
        for child in doc["manifests"]:
            needed |= closure(files, child["digest"])
    elif "fsLayers" in doc:
        needed |= {layer["blobSum"] for layer in doc["fsLayers"]}
    else:
        needed |= {doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])}
    return needed


def assert_blobs_intact(files: dict[str, bytes], root: Path) -> None:
    blobs = {name: data for name, data in files.items() if name.startswith("blobs/")}
    assert blobs
    for name, data in blobs.items():
        digest = name.removeprefix("blobs/").replace("/", ":", 1)
        assert sha256(data) == digest, name
        assert data == tree_blob(root, digest)


def test_oci_layout_holds_every_tag_byte_for_byte(fixture_root: Path, info: SampleInfo,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "layout"
    result = export(fixture_root, ["library/base", "multi/oci:latest", "a/b/c:v2"], out)
    files = read_layout_dir(out)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    refs = layout_refs(files)
    expected = {f"library/base:{t}": d for t, d in info.tags["library/base"].items()}
    expected |= {"multi/oci:latest": info.oci_index[2], "a/b/c:v2": info.tags["a/b/c"]["v2"]}
    sbom = info.artifact[1]  # untagged SBOM referrer of library/base: taken along by digest
    expected |= {f"library/base@{sbom}": sbom}
    assert refs == expected
    assert_blobs_intact(files, fixture_root)
    needed = set().union(*(closure(files, d) for d in refs.values()))
    assert {n.removeprefix("blobs/").replace("/", ":", 1) for n in files if n.startswith("blobs/")} == needed
    assert set(info.index_children[info.oci_index[2]]) <= needed  # the index exports whole
    index = json.loads(files["index.json"])
    types = {m["digest"]: m["mediaType"] for m in index["manifests"]}
    assert all(types[d] == info.media_types[d] for d in refs.values())
    assert result.to_json()["blobs"] == len(needed)
    assert any("docker media types" in note for note in result.plan.notes)  # a/b/c is docker-typed


@pytest.mark.parametrize("suffix", [".tar", ".tar.zst", ".tar.gz"])
def test_archives_hold_the_same_files_as_the_directory(fixture_root: Path, tmp_path: Path,
                                                       suffix: str) -> None:
    refs = ["library/base:latest", "compress/zstd:latest", "multi/oci"]
    export(fixture_root, refs, tmp_path / "dir")
    result = export(fixture_root, refs, tmp_path / f"out{suffix}")
    assert result.format is ExportFormat.OCI_ARCHIVE
    archive = tmp_path / f"out{suffix}"
    magic = archive.read_bytes()[:4]
    assert {".tar": magic != b"\x28\xb5\x2f\xfd" and magic[:2] != b"\x1f\x8b",
            ".tar.zst": magic == b"\x28\xb5\x2f\xfd", ".tar.gz": magic[:2] == b"\x1f\x8b"}[suffix]
    assert read_archive(archive) == read_layout_dir(tmp_path / "dir")
    assert result.output_bytes == archive.stat().st_size
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_archive_is_deterministic(fixture_root: Path, tmp_path: Path) -> None:
    export(fixture_root, ["library/base"], tmp_path / "one.tar")
    export(fixture_root, ["library/base"], tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()


def test_platform_picks_one_child(fixture_root: Path, info: SampleInfo, tmp_path: Path) -> None:
    out = tmp_path / "arm"
    export(fixture_root, ["multi/oci:latest"], out, platform=parse_platform("linux/arm64"))
    files = read_layout_dir(out)
    index = json.loads(files["index.json"])
    [entry] = index["manifests"]
    assert entry["platform"] == {"architecture": "arm64", "os": "linux", "variant": "v8"}
    assert entry["digest"] in info.index_children[info.oci_index[2]]
    assert f"blobs/{info.oci_index[2].replace(':', '/')}" not in files
    other = set(info.index_children[info.oci_index[2]]) - {entry["digest"]}
    assert all(f"blobs/{d.replace(':', '/')}" not in files for d in other)
    config = json.loads(files["blobs/" + json.loads(
        files["blobs/" + entry["digest"].replace(":", "/")])["config"]["digest"].replace(":", "/")])
    assert config["architecture"] == "arm64"


def test_platform_mismatch_fails_for_a_named_image(fixture_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not linux/s390x"):
        export(fixture_root, ["library/base:latest"], tmp_path / "x", platform=parse_platform("linux/s390x"))
    with pytest.raises(ExportError, match="no linux/s390x image"):
        export(fixture_root, ["multi/oci:latest"], tmp_path / "x", platform=parse_platform("linux/s390x"))
    assert not (tmp_path / "x").exists()


def test_docker_archive_layout(fixture_root: Path, info: SampleInfo, tmp_path: Path) -> None:
    out = tmp_path / "d.tar"
    result = export(fixture_root, ["library/base", "multi/docker:latest", "a/b/c:latest"], out,
                    fmt=ExportFormat.DOCKER_ARCHIVE, platform=parse_platform("linux/amd64"))
    files = read_archive(out)
    manifest = json.loads(files["manifest.json"])
    by_tags = {tuple(entry["RepoTags"]): entry for entry in manifest}
    base = by_tags[("library/base:1", "library/base:1.0", "library/base:latest")]
    base_manifest = json.loads(tree_blob(fixture_root, info.tags["library/base"]["latest"]))
    assert base["Config"] == "blobs/" + base_manifest["config"]["digest"].replace(":", "/")
    assert base["Layers"] == ["blobs/" + d["digest"].replace(":", "/") for d in base_manifest["layers"]]
    assert ("multi/docker:latest",) in by_tags and ("a/b/c:latest",) in by_tags
    for entry in manifest:
        for name in [entry["Config"], *entry["Layers"]]:
            assert sha256(files[name]) == name.removeprefix("blobs/").replace("/", ":")
    # the signature artifact tag cannot be a docker image: skipped, and said so
    assert [ref for ref, _ in result.plan.skipped] == [f"library/base:{info.referrer[1]}"]
    assert not any(name.endswith(".json") and name != "manifest.json" for name in files)


def test_docker_archive_needs_platform_for_multi_arch(fixture_root: Path, out_dir: Path) -> None:
    result = cli("export", str(fixture_root), "multi/oci:latest", "-o", str(out_dir / "d.tar"),
                 "--format", "docker-archive")
    assert result.returncode == 2
    assert "give --platform" in result.stderr and "linux/arm64/v8" in result.stderr
    assert list(out_dir.iterdir()) == []


def test_schema1_refused_in_docker_archive(fixture_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="schema1 cannot go into a docker-archive"):
        export(fixture_root, ["legacy/schema1:latest"], tmp_path / "d.tar", fmt=ExportFormat.DOCKER_ARCHIVE)


def test_corrupt_blob_stops_export_and_leaves_nothing(fixture_root: Path, info: SampleInfo,
                                                      out_dir: Path) -> None:
    layer = info.blobs["layer/base"]
    data = fixture_root / V2 / layout.blob_data(layer)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    for name in ("layout", "a.tar.zst"):
        result = cli("export", str(fixture_root), "a/b:latest", "-o", str(out_dir / name))
        assert result.returncode == 1, result.stderr
        assert "a/b:latest" in result.stderr and layer in result.stderr and "corrupt" in result.stderr
        assert "Traceback" not in result.stderr
    assert list(out_dir.iterdir()) == []


def test_missing_blob_names_the_image(fixture_root: Path, info: SampleInfo, out_dir: Path) -> None:
    zstd_repo, _, layer = info.zstd
    (fixture_root / V2 / layout.blob_data(layer)).unlink()
    with pytest.raises(ExportError, match=f"{zstd_repo}:latest: blob {layer} is missing") as caught:
        export(fixture_root, [f"{zstd_repo}:latest"], out_dir / "o.tar")
    assert caught.value.reason == "damage"
    assert list(out_dir.iterdir()) == []


def test_interrupt_removes_partial_output(fixture_root: Path, out_dir: Path) -> None:
    stop = threading.Event()
    calls = []

    def on_bytes(n: int) -> None:
        calls.append(n)
        stop.set()

    with pytest.raises(Interrupted):
        export(fixture_root, ["library/base", "multi/oci"], out_dir / "o.tar.gz", on_bytes=on_bytes,
               stop=stop)
    assert calls and list(out_dir.iterdir()) == []


def test_refuses_existing_output_and_output_inside_tree(fixture_root: Path, tmp_path: Path) -> None:
    existing = tmp_path / "exists.tar"
    existing.write_bytes(b"keep me")
    result = cli("export", str(fixture_root), "a/b:latest", "-o", str(existing))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert existing.read_bytes() == b"keep me"
    inside = fixture_root / V2 / "repositories" / "x.tar"
    result = cli("export", str(fixture_root), "a/b:latest", "-o", str(inside))
    assert result.returncode == 2 and "inside the registry tree" in result.stderr
    assert not inside.exists()
    beside_v2 = fixture_root / "docker" / "registry" / "backup"
    result = cli("export", str(fixture_root), "a/b:latest", "-o", str(beside_v2))
    assert result.returncode == 2 and "inside the registry tree" in result.stderr
    assert not beside_v2.exists()
    result = cli("export", str(fixture_root), "a/b:latest", "-o", str(tmp_path / "d.zst"), "--format", "oci")
    assert result.returncode == 2 and "cannot be compressed" in result.stderr


@pytest.mark.parametrize(("ref", "message"), [
    ("nope/nothing:latest", "no repository 'nope/nothing'"),
    ("a/b:nope", "no such tag"),
    ("a/b@sha256:" + "0" * 64, "is not a manifest of repository a/b"),
    ("Bad Name", "breaks the reference grammar"),
])
def test_unknown_references_are_usage_errors(fixture_root: Path, tmp_path: Path, ref: str,
                                             message: str) -> None:
    result = cli("export", str(fixture_root), ref, "-o", str(tmp_path / "o"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_digest_reference_and_json_output(fixture_root: Path, info: SampleInfo, tmp_path: Path) -> None:
    repo, digest, _, _ = info.artifact
    result = cli("export", str(fixture_root), f"{repo}@{digest}", "-o", str(tmp_path / "a.tar"), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # exactly one JSON object
    assert [i["ref_name"] for i in doc["images"]] == [f"{repo}@{digest}"]
    assert doc["format"] == "oci-archive" and doc["compression"] == "none"
    files = read_archive(tmp_path / "a.tar")
    assert layout_refs(files) == {f"{repo}@{digest}": digest}
    assert doc["output_bytes"] == (tmp_path / "a.tar").stat().st_size


def test_names_choose_format_and_compression() -> None:
    assert default_format(Path("x")) is ExportFormat.OCI
    assert default_format(Path("x.tar.zst")) is ExportFormat.OCI_ARCHIVE
    assert [str(compression_for(Path(n))) for n in ("a.tar", "a.tar.zst", "a.tgz", "a.gz")] == [
        "none", "zstd", "gzip", "gzip"]
