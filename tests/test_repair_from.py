"""`repair --from SOURCE`: missing and corrupt blobs replaced by verified copies.

The sources are backups made by skopeo from the real registry before the damage (an OCI
layout, oci-archives plain and zstd-compressed, a `dir:` copy) and a plain copy of the
registry root. After the repair the real registry serves every affected tag with its
original digest, verify is clean again, and `undo` restores the damaged tree byte for byte.
"""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from regfsck import layout
from regfsck.sources import SourceError, open_blob_source
from tests.realtools import RealRegistry, SampleInfo, skopeo_copy
from tests.support import V2
from tests.support.cli import invoke as cli
from tests.support.repairing import findings, repair, repaired
from tests.support.snapshot import registry_snapshot

pytestmark = pytest.mark.realtools


@dataclass
class Backups:
    layout: Path  # skopeo oci: layout (OCI images with --preserve-digests)
    archive: Path  # skopeo oci-archive of compress/zstd:latest
    archive_zst: Path  # the same archive, zstd-compressed
    index_archive: Path  # skopeo oci-archive of multi/oci:latest (--all)
    dir_copy: Path  # skopeo dir: copy of the docker image a/b/c:latest
    converted: Path  # skopeo oci: layout of a/b/c:latest (docker types converted by skopeo)
    registry: Path  # a plain copy of the whole registry root


@pytest.fixture(scope="module")
def backups(real_sample: tuple[Path, SampleInfo],
            tmp_path_factory: pytest.TempPathFactory) -> Backups:
    base = tmp_path_factory.mktemp("backups")
    root = shutil.copytree(real_sample[0], base / "registry", symlinks=True)
    oci = base / "layout"
    with RealRegistry(root) as registry:
        host = registry.host
        for ref, flags in (("library/base:latest", ["--preserve-digests"]),
                           ("compress/zstd:latest", ["--preserve-digests"]),
                           ("multi/oci:latest", ["--all", "--preserve-digests"])):
            skopeo_copy(f"docker://{host}/{ref}", f"oci:{oci}:{ref}", *flags)
        skopeo_copy(f"docker://{host}/compress/zstd:latest",
                    f"oci-archive:{base / 'zstd.tar'}:compress/zstd:latest", "--preserve-digests")
        skopeo_copy(f"docker://{host}/multi/oci:latest",
                    f"oci-archive:{base / 'index.tar'}:multi/oci:latest", "--all",
                    "--preserve-digests")
        skopeo_copy(f"docker://{host}/a/b/c:latest", f"dir:{base / 'dir'}")
        skopeo_copy(f"docker://{host}/a/b/c:latest", f"oci:{base / 'converted'}:a/b/c:latest")
    compressed = base / "zstd.tar.zst"
    compressed.write_bytes(zstandard.ZstdCompressor(level=3).compress(
        (base / "zstd.tar").read_bytes()))
    return Backups(oci, base / "zstd.tar", compressed, base / "index.tar", base / "dir",
                   base / "converted", root)


def corrupt(root: Path, digest: str) -> None:
    path = root / V2 / layout.blob_data(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def remove(root: Path, digest: str) -> None:
    shutil.rmtree(root / V2 / layout.blob_dir(digest))


def test_from_oci_layout(sample_root: Path, sample_info: SampleInfo, tmp_path: Path,
                         backups: Backups) -> None:
    _, _zstd_manifest, zstd_layer = sample_info.zstd
    base_manifest = sample_info.tags["library/base"]["latest"]
    arm64 = sample_info.blobs["layer/arm64"]

    def damage(root: Path) -> None:
        corrupt(root, zstd_layer)
        remove(root, arm64)
        remove(root, base_manifest)

    affected = [("compress/zstd", "latest"), ("multi/oci", "latest"),
                ("multi/docker", "latest"), ("library/base", "latest"), ("library/base", "1")]
    result = repaired(sample_root, sample_info, tmp_path, damage, affected,
                      {"replace_blob": 1, "restore_blob": 2}, "--from", str(backups.layout))
    assert {f["source"] for f in result["fixes"]} == {str(backups.layout)}
    assert result["lost_blobs"] == [] and result["repush"] == []


@pytest.mark.parametrize("which", ["archive", "archive_zst"])
def test_from_oci_archive(sample_root: Path, sample_info: SampleInfo, tmp_path: Path,
                          backups: Backups, which: str) -> None:
    repo, manifest, layer = sample_info.zstd
    config = sample_info.references[manifest][0]

    def damage(root: Path) -> None:
        corrupt(root, layer)
        remove(root, config)
        remove(root, manifest)

    archive = getattr(backups, which)
    repaired(sample_root, sample_info, tmp_path, damage, [(repo, "latest")],
             {"replace_blob": 1, "restore_blob": 2}, "--from", str(archive))
    assert not any((sample_root / "regfsck-state").glob("repair-spool-*")), "spool left behind"


def test_restored_manifest_brings_its_own_blobs(sample_root: Path, sample_info: SampleInfo,
                                                tmp_path: Path, backups: Backups) -> None:
    """The child manifest is gone and so is its unique layer: restoring the child shows the
    layer is needed too, and both come back from the archive."""
    repo, tag, index = sample_info.oci_index
    child = sample_info.index_children[index][1]
    arm64 = sample_info.blobs["layer/arm64"]

    def damage(root: Path) -> None:
        remove(root, child)
        remove(root, arm64)

    repaired(sample_root, sample_info, tmp_path, damage, [(repo, tag), ("multi/docker", tag)],
             {"restore_blob": 2}, "--from", str(backups.index_archive))


def test_from_skopeo_dir_copy_and_converted_layout(sample_root: Path, sample_info: SampleInfo,
                                                   tmp_path: Path, backups: Backups) -> None:
    """A docker image: skopeo's oci: copy converted its manifest and config, so only the
    layer can come from it; the dir: copy is byte-identical and provides the rest."""
    digest = sample_info.tags["a/b/c"]["latest"]
    config, *layers = sample_info.references[digest]

    def damage(root: Path) -> None:
        remove(root, digest)
        remove(root, config)
        corrupt(root, layers[-1])

    result = repaired(sample_root, sample_info, tmp_path, damage,
                      [("a/b/c", "latest"), ("a/b/c", "v2")],
                      {"replace_blob": 1, "restore_blob": 2},
                      "--from", str(backups.converted), "--from", str(backups.dir_copy))
    by_digest = {f["digest"]: f["source"] for f in result["fixes"]}
    assert by_digest[layers[-1]] == str(backups.converted)  # first source that has it
    assert by_digest[digest] == by_digest[config] == str(backups.dir_copy)


def test_from_registry_root(sample_root: Path, sample_info: SampleInfo, tmp_path: Path,
                            backups: Backups) -> None:
    base_layer = sample_info.shared_layers[0]

    def damage(root: Path) -> None:
        corrupt(root, base_layer)

    tags = [(repo, tag) for repo, repo_tags in sample_info.tags.items() for tag in repo_tags]
    repaired(sample_root, sample_info, tmp_path, damage, tags, {"replace_blob": 1},
             "--from", str(backups.registry))


def test_corrupt_source_copy_is_never_used(sample_root: Path, sample_info: SampleInfo,
                                           backups: Backups, tmp_path: Path) -> None:
    _repo, manifest, layer = sample_info.zstd
    source = shutil.copytree(backups.layout, tmp_path / "bad-layout")
    bad = source / "blobs" / "sha256" / layer.split(":")[1]
    bad.write_bytes(b"x" + bad.read_bytes()[1:])
    config = sample_info.references[manifest][0]
    corrupt(sample_root, layer)
    remove(sample_root, config)
    code, plan = repair(sample_root, "--from", str(source))
    assert code == 1
    actions = {f["digest"]: (f["action"], f.get("source")) for f in plan["fixes"]}
    assert actions[layer] == ("quarantine_blob", None)
    assert actions[config] == ("restore_blob", str(source))
    assert [b["digest"] for b in plan["lost_blobs"]] == [layer]


def test_bad_sources(sample_root: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    for path in (tmp_path / "empty", tmp_path / "junk.tar", tmp_path / "absent"):
        with pytest.raises(SourceError):
            open_blob_source(path)
        result = cli("repair", str(sample_root), "--from", str(path))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr


def zstd_cut_at_a_frame_boundary(archive: Path, after: str, out: Path) -> Path:
    """`archive` zstd-compressed in two frames, the second cut short. The first frame ends
    at a tar member boundary just after the member holding digest `after`, so the decoder
    yields a shorter tar that reads as complete: only the frame walk shows the cut."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    held = next(i for i, name in enumerate(names) if name.endswith(after.split(":")[1]))
    cut = (members[held + 1].offset if held + 1 < len(members)
           else members[held].offset_data + -(-members[held].size // 512) * 512)
    raw = archive.read_bytes()
    first = zstandard.ZstdCompressor(level=3).compress(raw[:cut])
    second = zstandard.ZstdCompressor(level=3).compress(raw[cut:])
    out.write_bytes(first + second[:len(second) // 2])
    return out


def test_truncated_zstd_archive_is_refused(sample_root: Path, sample_info: SampleInfo,
                                           backups: Backups, tmp_path: Path) -> None:
    """The blob is in the part of the archive that survived, but a truncated backup is not a
    backup to trust: repair refuses it (it used to take the blob as if the archive were
    whole; import always refused such an archive)."""
    layer = sample_info.zstd[2]
    cut = zstd_cut_at_a_frame_boundary(backups.archive, layer, tmp_path / "cut.tar.zst")
    corrupt(sample_root, layer)
    before = registry_snapshot(sample_root, mtimes="files")
    result = cli("repair", str(sample_root), "--from", str(cut), "--apply")
    assert result.returncode == 2, result.stderr
    assert "zstd stream is truncated" in result.stderr and result.stderr.count("\n") == 1
    assert registry_snapshot(sample_root, mtimes="files") == before
    with pytest.raises(SourceError, match="truncated"):
        open_blob_source(cut)


def test_plan_with_source_changes_nothing(sample_root: Path, sample_info: SampleInfo,
                                          backups: Backups) -> None:
    corrupt(sample_root, sample_info.zstd[2])
    before = registry_snapshot(sample_root, mtimes="files")
    code, plan = repair(sample_root, "--from", str(backups.archive_zst))
    assert code == 1 and [f["action"] for f in plan["fixes"]] == ["replace_blob"]
    assert registry_snapshot(sample_root, mtimes="files") == before
    assert not (sample_root / "regfsck-state").exists()
    assert ("blob_digest_mismatch", f"{V2}/{layout.blob_data(sample_info.zstd[2])}") in findings(
        sample_root)


