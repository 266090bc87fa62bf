"""Each repair kind on a damaged copy of a tree written by the real registry.

For every kind: damage the copy, `regfsck repair --apply` it, then
* verify no longer reports the repaired findings (and reports nothing new),
* the real registry serves every affected tag with its original digest (pulled by skopeo),
* `undo` puts the damaged tree back byte for byte (contents, modes, file mtimes).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from regfsck import layout
from tests.realtools import RealRegistry, RealToolError, SampleInfo, skopeo_copy
from tests.support import V2
from tests.support.cli import invoke as cli
from tests.support.repairing import findings, repair, repaired
from tests.support.snapshot import registry_snapshot

pytestmark = pytest.mark.realtools

def write(root: Path, rel: str, data: bytes) -> None:
    path = root / V2 / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# -- link content derivable from the path ------------------------------------------------


@pytest.mark.parametrize("junk", [b"", b"\n", b"{d}\n", b"{d}\r\n", b"{D}", b"{d}garbage",
                                  b"{d}\x00\x00\x00"])
def test_revision_link_junk_is_rewritten(sample_root: Path, sample_info: SampleInfo,
                                         tmp_path: Path, junk: bytes) -> None:
    repo, tag, digest = sample_info.oci_index
    content = junk.replace(b"{d}", digest.encode()).replace(b"{D}", digest.upper().encode())

    def damage(root: Path) -> None:
        write(root, layout.revision_link(repo, digest), content)

    result = repaired(sample_root, sample_info, tmp_path, damage, [(repo, tag)],
                      {"rewrite_link": 1})
    assert result["fixes"][0]["content"] == digest


def test_tag_index_and_layer_links_are_rewritten(sample_root: Path, sample_info: SampleInfo,
                                                 tmp_path: Path) -> None:
    repo, manifest, layer = sample_info.zstd
    other = "sha256:" + "0" * 64

    def damage(root: Path) -> None:
        write(root, layout.tag_index_link(repo, "latest", manifest), b"")
        write(root, layout.layer_link(repo, layer), layer.upper().encode())
        write(root, layout.layer_link("a/b", sample_info.blobs["layer/a-b"]), other.encode())

    result = repaired(sample_root, sample_info, tmp_path, damage,
                      [(repo, "latest"), ("a/b", "latest")], {"rewrite_link": 3})
    assert {f["content"] for f in result["fixes"]} == {manifest, layer,
                                                       sample_info.blobs["layer/a-b"]}


# -- tag current links ---------------------------------------------------------------


def test_damaged_current_link_with_one_candidate(sample_root: Path, sample_info: SampleInfo,
                                                 tmp_path: Path) -> None:
    repo, tag, digest = sample_info.docker_list

    def damage(root: Path) -> None:
        write(root, layout.tag_current_link(repo, tag), digest.encode() + b"\n")

    result = repaired(sample_root, sample_info, tmp_path, damage, [(repo, tag)],
                      {"rewrite_link": 1})
    assert result["fixes"][0]["path"] == f"{V2}/{layout.tag_current_link(repo, tag)}"


def test_missing_current_link_is_recreated(sample_root: Path, sample_info: SampleInfo,
                                           tmp_path: Path) -> None:
    def damage(root: Path) -> None:
        (root / V2 / layout.tag_current_link("a/b", "latest")).unlink()

    repaired(sample_root, sample_info, tmp_path, damage, [("a/b", "latest")], {"create_link": 1})


def test_ambiguous_current_link_is_reported_not_guessed(sample_root: Path,
                                                        sample_info: SampleInfo) -> None:
    repo, tag, old = sample_info.untagged  # a/b/c:latest was pushed twice: two candidates
    link = sample_root / V2 / layout.tag_current_link(repo, tag)
    link.write_bytes(b"")
    before = registry_snapshot(sample_root, mtimes="files")
    code, result = repair(sample_root, "--apply")
    assert code == 1
    assert not any(f["path"].endswith(layout.tag_current_link(repo, tag)) for f in result["fixes"])
    unfixable = [u for u in result["unfixable"] if u.get("tag") == tag and u["repo"] == repo]
    assert unfixable and "cannot choose" in unfixable[0]["advice"]
    assert old in unfixable[0]["advice"] and sample_info.tags[repo][tag] in unfixable[0]["advice"]
    assert registry_snapshot(sample_root, mtimes="files") == before and link.read_bytes() == b""


def test_readable_but_conflicting_current_is_not_overwritten(sample_root: Path,
                                                             sample_info: SampleInfo) -> None:
    """A junk-suffixed content naming another digest than the history's only candidate."""
    repo, tag, _digest = sample_info.docker_list
    other = sample_info.oci_index[2]
    write(sample_root, layout.tag_current_link(repo, tag), other.encode() + b"\n")
    code, result = repair(sample_root)
    assert code == 1
    assert not any(f["path"].endswith(layout.tag_current_link(repo, tag)) for f in result["fixes"])
    assert any("content names" in u["advice"] for u in result["unfixable"])


# -- missing links -------------------------------------------------------------------


def test_missing_layer_links_are_created(sample_root: Path, sample_info: SampleInfo,
                                         tmp_path: Path) -> None:
    repo, manifest, layer = sample_info.zstd
    config = sample_info.references[manifest][0]

    def damage(root: Path) -> None:
        for digest in (layer, config):
            shutil.rmtree(root / V2 / layout.layer_link(repo, digest).rpartition("/")[0])

    result = repaired(sample_root, sample_info, tmp_path, damage, [(repo, "latest")],
                      {"create_link": 2})
    assert {f["digest"] for f in result["fixes"]} == {layer, config}


def test_missing_layers_dir_of_a_repository(sample_root: Path, sample_info: SampleInfo,
                                            tmp_path: Path) -> None:
    """A repository without `_layers` (2.8's GC would sweep it) gets every link back."""
    def damage(root: Path) -> None:
        shutil.rmtree(root / V2 / "repositories/a/b/_layers")

    repaired(sample_root, sample_info, tmp_path, damage, [("a/b", "latest")], {"create_link": 3})


def test_tag_without_revision_link(sample_root: Path, sample_info: SampleInfo,
                                   tmp_path: Path) -> None:
    digest = sample_info.tags["a/b"]["latest"]

    def damage(root: Path) -> None:
        (root / V2 / layout.revision_link("a/b", digest)).unlink()

    repaired(sample_root, sample_info, tmp_path, damage, [("a/b", "latest")], {"create_link": 1})


def test_index_child_without_revision_and_layer_links(sample_root: Path, sample_info: SampleInfo,
                                                      tmp_path: Path) -> None:
    repo, tag, index = sample_info.oci_index
    child = sample_info.index_children[index][1]
    unique = sample_info.blobs["layer/arm64"]

    def damage(root: Path) -> None:
        shutil.rmtree(root / V2 / layout.revision_dir(repo, child))
        shutil.rmtree(root / V2 / layout.layer_link(repo, unique).rpartition("/")[0])

    # Without a revision link the child reads as deleted on purpose: only brought back
    # when asked (issue 10, item 10).
    result = repaired(sample_root, sample_info, tmp_path, damage, [(repo, tag)],
                      {"create_link": 2}, "--restore-deleted")
    assert {f["digest"] for f in result["fixes"]} == {child, unique}


# -- blobs -----------------------------------------------------------------------------


def test_blob_under_wrong_fanout_is_moved_home(sample_root: Path, sample_info: SampleInfo,
                                               tmp_path: Path) -> None:
    layer = sample_info.blobs["layer/arm64"]
    hex_part = layer.split(":")[1]

    def damage(root: Path) -> None:
        wrong = root / V2 / "blobs/sha256/00" / hex_part
        wrong.parent.mkdir(exist_ok=True)
        (root / V2 / layout.blob_dir(layer)).rename(wrong)

    result = repaired(sample_root, sample_info, tmp_path, damage,
                      [("multi/oci", "latest"), ("multi/docker", "latest")],
                      {"move_blob_home": 1})
    assert result["fixes"][0]["from_path"].endswith(f"blobs/sha256/00/{hex_part}/data")


def test_stray_duplicate_and_corrupt_stray(sample_root: Path, sample_info: SampleInfo,
                                           tmp_path: Path) -> None:
    good = sample_info.blobs["layer/a-b"]
    junk = sample_info.blobs["layer/amd64"]

    def damage(root: Path) -> None:
        for digest, data in ((good, None), (junk, b"not the blob")):
            stray = root / V2 / "blobs/sha256/ff" / digest.split(":")[1] / "data"
            stray.parent.mkdir(parents=True)
            stray.write_bytes(data if data is not None
                              else (root / V2 / layout.blob_data(digest)).read_bytes())

    repaired(sample_root, sample_info, tmp_path, damage, [],
             {"drop_stray_copy": 1, "quarantine_blob": 1})


def test_corrupt_blob_is_quarantined_and_a_push_heals_it(sample_root: Path,
                                                         sample_info: SampleInfo,
                                                         tmp_path: Path) -> None:
    """No source: the corrupt layer goes to the quarantine, the images to re-push are listed,
    and pushing one of them again (the registry re-uploads the blob) makes everything whole."""
    layer = sample_info.blobs["layer/app-v2"]
    repo = "a/b/c"
    clean = findings(sample_root)
    with RealRegistry(sample_root) as registry:  # a backup of the image, before the damage
        skopeo_copy(f"docker://{registry.host}/{repo}:latest", f"dir:{tmp_path / 'backup'}")
    path = sample_root / V2 / layout.blob_data(layer)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    code, result = repair(sample_root, "--apply")
    assert code == 1  # the layer is lost until the push
    assert [f["action"] for f in result["fixes"]] == ["quarantine_blob"]
    assert result["lost_blobs"] == [{"digest": layer, "why": "corrupt (quarantined)",
                                     "images": [f"{repo}:latest", f"{repo}:v2"]}]
    assert result["repush"] == [f"{repo}:latest", f"{repo}:v2"]
    remaining = {(f["kind"], f.get("digest")) for f in result["remaining"]}
    assert ("reference_missing", layer) in remaining
    assert not (sample_root / V2 / layout.blob_dir(layer)).exists()
    with RealRegistry(sample_root) as registry:
        with pytest.raises(RealToolError):
            skopeo_copy(f"docker://{registry.host}/{repo}:latest", f"dir:{tmp_path / 'fails'}")
        skopeo_copy(f"dir:{tmp_path / 'backup'}", f"docker://{registry.host}/{repo}:latest")
        assert registry.manifest_digest(repo, "latest") == sample_info.tags[repo]["latest"]
        skopeo_copy(f"docker://{registry.host}/{repo}:v2", f"dir:{tmp_path / 'pulled'}")
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == layer
    assert findings(sample_root) == clean


def test_plan_only_and_clean_tree(sample_root: Path) -> None:
    before = registry_snapshot(sample_root, mtimes="files")
    code, result = repair(sample_root)
    assert code == 0 and result["fixes"] == [] and result["lost_blobs"] == []
    assert {u["kind"] for u in result["unfixable"]} <= {"manifest_schema1", "upload_stale"}
    assert registry_snapshot(sample_root, mtimes="files") == before
    assert not (sample_root / "regfsck-quarantine").exists()


def test_refuses_while_the_registry_serves_the_root(sample_root: Path,
                                                    sample_info: SampleInfo) -> None:
    repo, _tag, digest = sample_info.oci_index
    write(sample_root, layout.revision_link(repo, digest), b"")
    before = registry_snapshot(sample_root, mtimes="files")
    with RealRegistry(sample_root):
        result = cli("repair", str(sample_root), "--apply")
    assert result.returncode == 3
    assert "docker-registry" in result.stderr or "in use" in result.stderr
    assert registry_snapshot(sample_root, mtimes="files") == before


def test_changed_only_rehashes_only_what_the_record_does_not_vouch_for(
        sample_root: Path, sample_info: SampleInfo, tmp_path: Path) -> None:
    """verify, then repair --changed-only: the layer verify found corrupt (a bad verdict)
    and nothing else is hashed again; the plan and its apply are those of a full re-hash,
    the dry run says the apply may skip the re-hash too, and the other images still pull."""
    layer = sample_info.blobs["layer/app-v2"]
    index_repo, _tag, index_digest = sample_info.oci_index
    blob_count = len(list((sample_root / V2 / "blobs/sha256").glob("*/*/data")))
    path = sample_root / V2 / layout.blob_data(layer)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    write(sample_root, layout.revision_link(index_repo, index_digest), b"junk")
    assert cli("verify", str(sample_root), "--changed-only").returncode == 1
    _, full = repair(sample_root)
    code, plan = repair(sample_root, "--changed-only")
    assert code == 1 and plan["blobs_skipped"] == blob_count - 1
    assert plan["verdicts_recorded"] is True
    assert ([(f["action"], f["path"]) for f in plan["fixes"]]
            == [(f["action"], f["path"]) for f in full["fixes"]])
    assert sorted(f["action"] for f in plan["fixes"]) == ["quarantine_blob", "rewrite_link"]
    human = cli("repair", str(sample_root), "--changed-only")
    assert f"{blob_count - 1} blobs" in human.stdout + human.stderr
    assert "--apply --changed-only" in human.stdout + human.stderr
    code, result = repair(sample_root, "--apply", "--changed-only")
    assert result["applied"] is True and result["blobs_skipped"] == blob_count - 1
    assert all(f["status"] == "applied" for f in result["fixes"]), result["fixes"]
    assert result["repush"] == ["a/b/c:latest", "a/b/c:v2"]
    assert not path.exists()
    with RealRegistry(sample_root) as registry:
        skopeo_copy(f"docker://{registry.host}/{index_repo}@{index_digest}",
                    f"dir:{tmp_path / 'index'}", "--all")


def test_changed_only_cannot_skip_the_data_check(sample_root: Path) -> None:
    result = cli("repair", str(sample_root), "--no-data", "--changed-only")
    assert result.returncode == 2 and "--no-data" in result.stderr
