"""One test per corruption kind, each applied to a copy of a tree the real registry wrote.

Every test asserts the exact error findings (kind, path, digest): the damage is found,
and nothing healthy is reported as broken.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from regfsck import layout
from regfsck.findings import Severity
from regfsck.root import locate
from regfsck.verify import VerifyOptions, VerifyReport, run_verify
from tests.realtools import SampleInfo
from tests.support import V2

Key = tuple[str, str, str | None]


def verify(root: Path, **kw: object) -> VerifyReport:
    return run_verify(locate(root), VerifyOptions(jobs=2, **kw))  # type: ignore[arg-type]


def errors(report: VerifyReport) -> set[Key]:
    return {(f.kind, f.path, f.digest) for f in report.findings if f.severity is Severity.ERROR}


def rel(path: str) -> str:
    return f"{V2}/{path}"


def data_file(root: Path, digest: str) -> Path:
    return root / V2 / layout.blob_data(digest)


def config_of(info: SampleInfo, manifest: str) -> str:
    return info.references[manifest][0]


def first_layer_of(info: SampleInfo, manifest: str) -> str:
    return info.references[manifest][1]


def put_blob(root: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = data_file(root, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def put_link(root: Path, path: str, digest: str) -> None:
    target = root / V2 / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(digest.encode())


def test_clean_tree_has_no_errors(sample_root: Path, sample_info: SampleInfo) -> None:
    report = verify(sample_root)
    assert errors(report) == set()
    assert report.summary.blobs_verified == len(sample_info.all_blobs)
    kinds = {f.kind for f in report.findings}
    assert "manifest_schema1" in kinds  # the schema1 image is readable by 2.8, flagged for 3.x


def test_flipped_byte_is_a_digest_mismatch(sample_root: Path, sample_info: SampleInfo) -> None:
    layer = sample_info.blobs["layer/app-v1"]
    path = data_file(sample_root, layer)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert errors(verify(sample_root)) == {
        ("blob_digest_mismatch", rel(layout.blob_data(layer)), layer)}


def test_no_data_skips_hashing(sample_root: Path, sample_info: SampleInfo) -> None:
    layer = sample_info.blobs["layer/app-v1"]
    path = data_file(sample_root, layer)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify(sample_root, check_data=False)
    assert errors(report) == set()
    assert report.summary.blobs_verified == 0


def test_truncated_blob(sample_root: Path, sample_info: SampleInfo) -> None:
    _repo, _manifest, layer = sample_info.zstd
    path = data_file(sample_root, layer)
    path.write_bytes(path.read_bytes()[:100])
    assert errors(verify(sample_root)) == {
        ("blob_digest_mismatch", rel(layout.blob_data(layer)), layer),
        ("blob_size_mismatch", rel(layout.blob_data(layer)), layer),
    }


def test_zero_byte_blob(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, _manifest, layer = sample_info.zstd
    data_file(sample_root, layer).write_bytes(b"")
    report = verify(sample_root)
    assert errors(report) == {
        ("blob_empty", rel(layout.blob_data(layer)), layer),
        ("blob_size_mismatch", rel(layout.blob_data(layer)), layer),
    }
    size_finding = next(f for f in report.findings if f.kind == "blob_size_mismatch")
    assert size_finding.repo == repo


def test_blob_dir_without_data(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, _manifest, layer = sample_info.zstd
    data_file(sample_root, layer).unlink()
    report = verify(sample_root)
    assert errors(report) == {
        ("blob_missing_data", rel(layout.blob_dir(layer)), layer),
        ("reference_missing", rel(layout.blob_data(layer)), layer),
    }
    missing = next(f for f in report.findings if f.kind == "reference_missing")
    assert missing.repo == repo and missing.affected_tags == (f"{repo}:latest",)
    assert any(f.kind == "layer_link_dangling" and f.severity is Severity.WARNING
               for f in report.findings)


def test_data_that_is_a_directory(sample_root: Path, sample_info: SampleInfo) -> None:
    unreferenced = sample_info.unreferenced_blobs[0]
    path = data_file(sample_root, unreferenced)
    path.unlink()
    path.mkdir()
    assert ("blob_data_not_file", rel(layout.blob_data(unreferenced)), unreferenced) in errors(
        verify(sample_root))


def test_blob_under_wrong_fanout(sample_root: Path, sample_info: SampleInfo) -> None:
    _repo, _manifest, layer = sample_info.zstd
    hex_part = layer.split(":")[1]
    wrong = "00" if hex_part[:2] != "00" else "01"
    src = sample_root / V2 / layout.blob_dir(layer)
    dest = sample_root / V2 / "blobs" / "sha256" / wrong / hex_part
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, dest)
    assert errors(verify(sample_root)) == {
        ("blob_wrong_fanout", f"{V2}/blobs/sha256/{wrong}/{hex_part}/data", layer),
        ("reference_missing", rel(layout.blob_data(layer)), layer),
    }


def test_bad_blob_names(sample_root: Path) -> None:
    (sample_root / V2 / "blobs" / "md5").mkdir()
    bad_hex = sample_root / V2 / "blobs" / "sha256" / "ab" / ("AB" * 32)
    bad_hex.mkdir(parents=True)
    (bad_hex / "data").write_bytes(b"x")
    assert errors(verify(sample_root)) == {
        ("blob_bad_name", f"{V2}/blobs/md5", None),
        ("blob_bad_name", f"{V2}/blobs/sha256/ab/{'AB' * 32}", None),
    }


@pytest.mark.parametrize("junk", [b"\n", b"", b"\r\n", b"junk"])
def test_revision_link_with_bad_content(sample_root: Path, sample_info: SampleInfo,
                                        junk: bytes) -> None:
    repo, tag, digest = sample_info.zstd[0], "latest", sample_info.zstd[1]
    link = sample_root / V2 / layout.revision_link(repo, digest)
    link.write_bytes(digest.encode() + junk if junk else b"")
    assert errors(verify(sample_root)) == {
        ("link_invalid", rel(layout.revision_link(repo, digest)), digest),
        ("tag_revision_missing", rel(layout.tag_current_link(repo, tag)), digest),
    }


def test_upper_case_layer_link(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, _manifest, layer = sample_info.zstd
    link = sample_root / V2 / layout.layer_link(repo, layer)
    link.write_bytes(layer.upper().replace("SHA256", "sha256").encode())
    assert errors(verify(sample_root)) == {
        ("link_invalid", rel(layout.layer_link(repo, layer)), layer),
        ("reference_not_linked", rel(layout.layer_link(repo, layer)), layer),
    }


def test_revision_link_naming_another_digest(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, manifest, _ = sample_info.zstd
    other = sample_info.tags["a/b"]["latest"]
    put_link(sample_root, layout.revision_link(repo, manifest), other)
    assert errors(verify(sample_root)) == {
        ("link_mismatch", rel(layout.revision_link(repo, manifest)), manifest),
        ("tag_revision_missing", rel(layout.tag_current_link(repo, "latest")), manifest),
    }


def test_tag_index_link_mismatch(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, manifest, _ = sample_info.zstd
    other = sample_info.tags["a/b"]["latest"]
    put_link(sample_root, layout.tag_index_link(repo, "latest", manifest), other)
    assert errors(verify(sample_root)) == {
        ("link_mismatch", rel(layout.tag_index_link(repo, "latest", manifest)), manifest)}


def test_tag_without_current_link_is_a_warning(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, _manifest, _ = sample_info.zstd
    (sample_root / V2 / layout.tag_current_link(repo, "latest")).unlink()
    report = verify(sample_root)
    assert errors(report) == set()
    assert any(f.kind == "tag_no_current" and f.tag == "latest" and f.repo == repo
               for f in report.findings)


def test_tag_pointing_at_unknown_digest(sample_root: Path, sample_info: SampleInfo) -> None:
    repo = sample_info.zstd[0]
    ghost = "sha256:" + "ab" * 32
    put_link(sample_root, layout.tag_current_link(repo, "latest"), ghost)
    assert errors(verify(sample_root)) == {
        ("tag_revision_missing", rel(layout.tag_current_link(repo, "latest")), ghost)}


def test_tag_current_link_garbage(sample_root: Path, sample_info: SampleInfo) -> None:
    repo = sample_info.zstd[0]
    (sample_root / V2 / layout.tag_current_link(repo, "latest")).write_bytes(b"\x00\xff garbage")
    report = verify(sample_root)
    assert errors(report) == {("link_invalid", rel(layout.tag_current_link(repo, "latest")), None)}
    assert next(f for f in report.findings if f.kind == "link_invalid").tag == "latest"


def test_manifest_blob_missing(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, manifest, _ = sample_info.zstd
    shutil.rmtree(sample_root / V2 / layout.blob_dir(manifest))
    assert errors(verify(sample_root)) == {
        ("revision_blob_missing", rel(layout.revision_link(repo, manifest)), manifest),
        ("tag_blob_missing", rel(layout.tag_current_link(repo, "latest")), manifest),
    }


@pytest.mark.parametrize(("body", "kind"), [
    (b"{not json", "manifest_invalid_json"),
    (b'{"schemaVersion": 2, "mediaType": "application/x-unknown"}', "manifest_unknown_type"),
    (b'{"schemaVersion": 7}', "manifest_unknown_type"),
])
def test_unusable_manifest_in_a_repository(sample_root: Path, sample_info: SampleInfo,
                                           body: bytes, kind: str) -> None:
    repo = "a/b"
    digest = put_blob(sample_root, body)
    put_link(sample_root, layout.revision_link(repo, digest), digest)
    put_link(sample_root, layout.tag_current_link(repo, "broken"), digest)
    put_link(sample_root, layout.tag_index_link(repo, "broken", digest), digest)
    report = verify(sample_root)
    assert errors(report) == {(kind, rel(layout.blob_data(digest)), digest)}
    assert next(f for f in report.findings if f.kind == kind).affected_tags == (f"{repo}:broken",)


def test_missing_config_blob(sample_root: Path, sample_info: SampleInfo) -> None:
    _repo, manifest, _ = sample_info.zstd
    config = config_of(sample_info, manifest)
    shutil.rmtree(sample_root / V2 / layout.blob_dir(config))
    assert errors(verify(sample_root)) == {
        ("reference_missing", rel(layout.blob_data(config)), config)}


def test_layer_present_but_not_linked(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, _manifest, layer = sample_info.zstd
    (sample_root / V2 / layout.layer_link(repo, layer)).unlink()
    report = verify(sample_root)
    assert errors(report) == {("reference_not_linked", rel(layout.layer_link(repo, layer)), layer)}
    assert next(f for f in report.findings if f.kind == "reference_not_linked").affected_tags == (
        f"{repo}:latest",)


def test_index_child_without_revision(sample_root: Path, sample_info: SampleInfo) -> None:
    """No revision link at all is what a DELETE of the child through the API leaves: a
    warning saying that platform cannot be pulled, not damage (issue 10, item 10)."""
    repo, tag, index = sample_info.oci_index
    child = sample_info.index_children[index][0]
    (sample_root / V2 / layout.revision_link(repo, child)).unlink()
    report = verify(sample_root)
    assert errors(report) == set()
    [finding] = [f for f in report.findings if f.kind == "index_child_deleted"]
    assert (finding.severity, finding.path, finding.digest) == (
        Severity.WARNING, rel(layout.revision_link(repo, child)), child)
    assert finding.affected_tags == (f"{repo}:{tag}",)
    assert "empty revision directory" in finding.message


def test_index_child_with_damaged_revision_link(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, tag, index = sample_info.oci_index
    child = sample_info.index_children[index][0]
    (sample_root / V2 / layout.revision_link(repo, child)).write_bytes(b"sha256:nonsense")
    report = verify(sample_root)
    path = rel(layout.revision_link(repo, child))
    assert errors(report) == {("child_not_in_repo", path, child), ("link_invalid", path, child)}
    child_finding = next(f for f in report.findings if f.kind == "child_not_in_repo")
    assert child_finding.affected_tags == (f"{repo}:{tag}",)


def test_index_child_blob_missing_names_the_tag(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, tag, index = sample_info.docker_list
    child = sample_info.index_children[index][1]
    shutil.rmtree(sample_root / V2 / layout.blob_dir(child))
    report = verify(sample_root)
    assert errors(report) == {
        ("revision_blob_missing", rel(layout.revision_link(repo, child)), child),
        ("reference_missing", rel(layout.blob_data(child)), child),
    }
    assert all(f"{repo}:{tag}" in f.affected_tags for f in report.findings
               if f.severity is Severity.ERROR)


def test_index_cycle_is_reported_not_followed(sample_root: Path, sample_info: SampleInfo) -> None:
    _repo, _tag, index = sample_info.oci_index
    path = data_file(sample_root, index)
    doc = json.loads(path.read_bytes())
    doc["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json",
                             "digest": index, "size": 10})
    path.write_bytes(json.dumps(doc).encode())
    found = errors(verify(sample_root))
    assert ("manifest_cycle", rel(layout.blob_data(index)), index) in found
    assert ("blob_digest_mismatch", rel(layout.blob_data(index)), index) in found


def test_bad_repository_name(sample_root: Path) -> None:
    repos = sample_root / V2 / "repositories"
    shutil.copytree(repos / "a" / "b", repos / "Bad", symlinks=True)
    shutil.rmtree(repos / "Bad" / "c")
    assert errors(verify(sample_root)) == {("repo_bad_name", f"{V2}/repositories/Bad", None)}


def test_bad_tag_name(sample_root: Path, sample_info: SampleInfo) -> None:
    repo = sample_info.zstd[0]
    tags = sample_root / V2 / layout.tags_dir(repo)
    shutil.copytree(tags / "latest", tags / ".hidden")
    assert errors(verify(sample_root)) == {("tag_bad_name", rel(layout.tag_dir(repo, ".hidden")), None)}


def test_upload_without_startedat(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, upload_id, _ = sample_info.upload
    (sample_root / V2 / layout.upload_dir(repo, upload_id) / "startedat").unlink()
    assert errors(verify(sample_root)) == {
        ("upload_no_startedat", rel(layout.upload_dir(repo, upload_id)), None)}


def test_symlinks_are_reported_and_never_followed(sample_root: Path, sample_info: SampleInfo,
                                                   tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(sample_info.tags["a/b"]["latest"].encode())
    repo, _manifest, layer = sample_info.zstd
    link = sample_root / V2 / layout.layer_link(repo, layer)
    link.unlink()
    link.symlink_to(outside)
    (sample_root / V2 / "repositories" / "escape").symlink_to(tmp_path)
    found = errors(verify(sample_root))
    assert ("symlink", rel(layout.layer_link(repo, layer)), None) in found
    assert ("symlink", f"{V2}/repositories/escape", None) in found
    assert ("reference_not_linked", rel(layout.layer_link(repo, layer)), layer) in found


def test_fifo_named_data_does_not_block(sample_root: Path, sample_info: SampleInfo) -> None:
    unreferenced = sample_info.unreferenced_blobs[0]
    path = data_file(sample_root, unreferenced)
    path.unlink()
    os.mkfifo(path)
    assert ("blob_data_not_file", rel(layout.blob_data(unreferenced)), unreferenced) in errors(
        verify(sample_root))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_blob(sample_root: Path, sample_info: SampleInfo) -> None:
    layer = sample_info.blobs["layer/app-v1"]
    data_file(sample_root, layer).chmod(0)
    assert ("blob_unreadable", rel(layout.blob_data(layer)), layer) in errors(verify(sample_root))


def test_strict_makes_unpullable_tags_errors(sample_root: Path, sample_info: SampleInfo) -> None:
    repo = sample_info.zstd[0]
    (sample_root / V2 / layout.tag_current_link(repo, "latest")).unlink()
    assert errors(verify(sample_root)) == set()
    assert errors(verify(sample_root, strict=True)) == {
        ("tag_no_current", rel(layout.tag_current_link(repo, "latest")), None)}
