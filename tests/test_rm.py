"""Offline rm on trees written by the real registry, checked through the real registry's API."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from regfsck import layout
from regfsck.gc import GcOptions, plan_gc
from regfsck.root import locate
from tests import realtools
from tests.realtools import SampleInfo
from tests.support import V2
from tests.support.cli import invoke as cli
from tests.support.oracle import errors_after
from tests.support.snapshot import registry_snapshot

pytestmark = pytest.mark.realtools


def reclaimable(root: Path, delete_untagged: bool = False) -> int:
    return plan_gc(locate(root), GcOptions(delete_untagged=delete_untagged,
                                           grace=timedelta(0))).reclaimable_bytes


def test_rm_tag_removes_that_tag_only(sample_root: Path, sample_info: SampleInfo) -> None:
    repo = "library/base"
    digest = sample_info.tags[repo]["1.0"]
    result = cli("rm", str(sample_root), f"{repo}:1.0", "--apply", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["tags"] == [{"repo": repo, "tag": "1.0", "digest": digest}]
    assert plan["manifests"] == [] and plan["blobs"] == [] and plan["applied"] and plan["run_id"]
    assert plan["reclaimable_bytes"] == 0 and plan["reclaimable_bytes_delete_untagged"] == 0
    with realtools.RealRegistry(sample_root) as reg:
        assert reg.tags(repo) == sorted(set(sample_info.tags[repo]) - {"1.0"})
        assert reg.manifest_digest(repo, "latest") == digest  # same digest, other tags stay
        assert not reg.manifest_exists(repo, "1.0")
    assert errors_after(sample_root) == []


def test_rm_digest_removes_the_manifest_and_its_tags(sample_root: Path, sample_info: SampleInfo) -> None:
    repo = "a/b/c"
    digest = sample_info.tags[repo]["latest"]
    assert sample_info.tags[repo]["v2"] == digest
    freed_before = reclaimable(sample_root)
    result = cli("rm", str(sample_root), f"{repo}@{digest}", "--apply", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["manifests"] == [{"repo": repo, "digest": digest, "tags": ["latest", "v2"]}]
    assert {(t["tag"], t["digest"]) for t in plan["tags"]} == {("latest", digest), ("v2", digest)}
    assert not (sample_root / V2 / layout.revision_dir(repo, digest)).exists()
    assert not (sample_root / V2 / layout.tag_dir(repo, "latest")).exists()
    with realtools.RealRegistry(sample_root) as reg:
        assert not reg.manifest_exists(repo, digest)
        assert reg.tags(repo) == []
        assert reg.manifest_exists(*sample_info.untagged[::2])  # the old revision is still there
    # What rm said the next gc frees is what it frees now, on top of what it freed before.
    assert plan["reclaimable_bytes"] > 0
    assert reclaimable(sample_root) == freed_before + plan["reclaimable_bytes"]
    assert errors_after(sample_root) == []


def test_rm_child_of_a_kept_index_is_refused(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, _, index = sample_info.oci_index
    child = sample_info.index_children[index][0]
    before = registry_snapshot(sample_root)
    refused = cli("rm", str(sample_root), f"{repo}@{child}", "--apply", "--json")
    assert refused.returncode == 3
    assert "child of the index" in json.loads(refused.stdout)["refused"][0]
    assert registry_snapshot(sample_root) == before
    together = cli("rm", str(sample_root), f"{repo}@{child}", f"{repo}@{index}", "--apply")
    assert together.returncode == 0, together.stderr
    assert errors_after(sample_root) == []  # the other child is untagged, not broken


def test_rm_child_forced(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, _, index = sample_info.docker_list
    child = sample_info.index_children[index][0]
    forced = cli("rm", str(sample_root), f"{repo}@{child}", "--force", "--apply")
    assert forced.returncode == 0, forced.stderr
    # a deliberate removal: that platform cannot be pulled (a warning), not damage
    assert errors_after(sample_root) == []
    from regfsck.verify import VerifyOptions, run_verify
    report = run_verify(locate(sample_root), VerifyOptions(check_data=False))
    assert [f.digest for f in report.findings if f.kind == "index_child_deleted"] == [child]


def test_rm_repository_keeps_nested_ones_and_undo_restores(sample_root: Path,
                                                           sample_info: SampleInfo) -> None:
    before = registry_snapshot(sample_root)
    result = cli("rm", str(sample_root), "a/b", "compress/zstd", "--apply", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["repositories"] == ["a/b", "compress/zstd"]
    assert not (sample_root / V2 / "repositories/compress").exists()
    assert not (sample_root / V2 / "repositories/a/b/_manifests").exists()
    with realtools.RealRegistry(sample_root) as reg:
        assert set(reg.catalog()) == set(sample_info.catalog) - {"a/b", "compress/zstd"}
        assert reg.manifest_digest("a/b/c", "latest") == sample_info.tags["a/b/c"]["latest"]
    assert errors_after(sample_root) == []
    assert plan["reclaimable_bytes"] > 0
    assert cli("undo", str(sample_root)).returncode == 0
    assert registry_snapshot(sample_root) == before


def test_rm_dry_run_changes_nothing(sample_root: Path) -> None:
    before = registry_snapshot(sample_root)
    result = cli("rm", str(sample_root), "a/b/c:latest", "multi/oci")
    assert result.returncode == 0, result.stderr
    assert "Would remove" in result.stdout and "--apply" in result.stdout
    assert registry_snapshot(sample_root) == before
    assert not (sample_root / "regfsck-quarantine").exists()


@pytest.mark.parametrize("ref", ["nope", "a/b/c:nope", "a/b/c@sha256:" + "0" * 64, "a/b/c@sha256:xyz",
                                 "Bad Name", "a/b/c:tag@sha256:" + "0" * 64])
def test_rm_bad_refs_are_usage_errors(sample_root: Path, ref: str) -> None:
    result = cli("rm", str(sample_root), ref, "--apply")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1
    assert not (sample_root / "regfsck-quarantine").exists()


def test_rm_needs_a_ref(sample_root: Path) -> None:
    assert cli("rm", str(sample_root)).returncode == 2


def test_rm_with_config_takes_only_refs(sample_root: Path, tmp_path: Path) -> None:
    config = realtools.write_registry_config(tmp_path / "config.yml", sample_root)
    result = cli("rm", "--config", str(config), "legacy/schema1", "--apply", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["repositories"] == ["legacy/schema1"]


def test_rm_repository_with_a_name_the_grammar_refuses(sample_root: Path) -> None:
    repos = sample_root / V2 / "repositories"
    shutil.copytree(repos / "legacy/schema1", repos / "Legacy", symlinks=True)
    result = cli("rm", str(sample_root), "Legacy", "--apply")
    assert result.returncode == 0, result.stderr
    assert not (repos / "Legacy").exists()
