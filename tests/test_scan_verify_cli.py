"""scan and verify end to end: against the registry's own API, through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from regfsck import layout
from regfsck.root import RootError, locate, rootdir_from_config
from tests.realtools import RealRegistry, SampleInfo
from tests.support import V2
from tests.support.cli import invoke as cli
from tests.support.snapshot import snapshot


def test_scan_agrees_with_the_registry_api(sample_root: Path, sample_info: SampleInfo) -> None:
    with RealRegistry(sample_root) as registry:
        catalog = registry.catalog()
        api_tags = {repo: {tag: registry.manifest_digest(repo, tag) for tag in registry.tags(repo)}
                    for repo in catalog}
    result = cli("scan", str(sample_root), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    repos = {r["name"]: r for r in report["repositories"]}
    assert sorted(repos) == sorted(catalog)
    assert {name: r["tags"] for name, r in repos.items()} == api_tags
    for name, revisions in sample_info.revisions.items():
        assert sorted(repos[name]["manifests"]) == sorted(revisions)
    assert report["blobs"]["count"] == len(sample_info.all_blobs)
    assert report["unreferenced_blobs"]["count"] == len(sample_info.unreferenced_blobs)
    assert [(u["repo"], u["id"]) for u in report["uploads"]] == [sample_info.upload[:2]]
    base_layer = sample_info.shared_layers[0]
    # Every image repository shares the base layer; the Helm chart shares nothing with images.
    assert all(r["shared_bytes"] > 0 for r in report["repositories"]
               if r["name"] != "charts/demo"), base_layer


def test_unique_and_shared_bytes(sample_root: Path, sample_info: SampleInfo) -> None:
    report = json.loads(cli("scan", str(sample_root), "--json").stdout)
    sizes = {d: (sample_root / V2 / layout.blob_data(d)).stat().st_size
             for d in sample_info.all_blobs}
    total_used = sum(r["unique_bytes"] for r in report["repositories"])
    shared_digests = {d for d in sample_info.all_blobs if d not in sample_info.unreferenced_blobs}
    assert total_used <= sum(sizes[d] for d in shared_digests) + sum(
        sizes[d] for d in sample_info.unreferenced_blobs)
    zstd_repo, _, zstd_layer = sample_info.zstd
    zstd = next(r for r in report["repositories"] if r["name"] == zstd_repo)
    assert zstd["unique_bytes"] >= sizes[zstd_layer]


def test_verify_clean_exit_0_and_json_only(sample_root: Path) -> None:
    result = cli("verify", str(sample_root), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["summary"]["errors"] == 0
    assert doc["summary"]["blobs_verified"] > 0 and doc["summary"]["bytes_verified"] > 0
    assert set(doc) == {"findings", "summary"}


def test_verify_damaged_exit_1(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, _manifest, layer = sample_info.zstd
    (sample_root / V2 / layout.layer_link(repo, layer)).write_bytes(b"")
    result = cli("verify", str(sample_root), "--json", "--jobs", "1")
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert {f["kind"] for f in doc["findings"] if f["severity"] == "error"} == {
        "link_invalid", "reference_not_linked"}
    human = cli("verify", str(sample_root))
    assert human.returncode == 1 and "reference_not_linked" in human.stdout


def test_verify_never_writes(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, manifest, _layer = sample_info.zstd
    (sample_root / V2 / layout.revision_link(repo, manifest)).write_bytes(b"junk\n")
    before = snapshot(sample_root)
    assert cli("verify", str(sample_root)).returncode == 1
    assert cli("verify", str(sample_root), "--json").returncode == 1
    assert cli("scan", str(sample_root)).returncode == 0
    assert snapshot(sample_root) == before


def test_repo_filter(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, _manifest, layer = sample_info.zstd
    (sample_root / V2 / layout.layer_link(repo, layer)).unlink()
    other = cli("verify", str(sample_root), "--repo", "a/b", "--json")
    assert other.returncode == 0
    assert all(f.get("repo") in (None, "a/b") for f in json.loads(other.stdout)["findings"])
    mine = cli("verify", str(sample_root), "--repo", repo, "--json")
    assert mine.returncode == 1
    unknown = cli("verify", str(sample_root), "--repo", "no/such")
    assert unknown.returncode == 2 and "no such repository" in unknown.stderr


def test_v2_dir_and_config_are_accepted(sample_root: Path, tmp_path: Path) -> None:
    assert cli("verify", str(sample_root / V2), "--no-data").returncode == 0
    config = tmp_path / "config.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {sample_root}\n")
    result = cli("scan", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    env = {**os.environ, "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(tmp_path / "nowhere")}
    overridden = cli("scan", "--config", str(config), env=env)
    assert overridden.returncode == 3 and "nowhere" in overridden.stderr
    assert rootdir_from_config(config, {}) == sample_root


@pytest.mark.parametrize("make", ["missing", "file", "empty-dir"])
def test_not_a_registry_root_exits_3(tmp_path: Path, make: str) -> None:
    target = tmp_path / "target"
    if make == "file":
        target.write_text("x")
    elif make == "empty-dir":
        target.mkdir()
    for command in ("scan", "verify"):
        result = cli(command, str(target))
        assert result.returncode == 3
        assert result.stderr.count("\n") == 1 and "registry" in result.stderr
        assert "Traceback" not in result.stderr
    with pytest.raises(RootError):
        locate(target)


def test_usage_error_exits_2(tmp_path: Path) -> None:
    assert cli("verify", str(tmp_path), "--jobs", "many").returncode == 2
    assert cli("frobnicate").returncode == 2


def test_shipped_fixture_verifies_clean(fixture_root: Path) -> None:
    result = cli("verify", str(fixture_root), "--json")
    assert result.returncode == 0, result.stdout
    kinds = {f["kind"] for f in json.loads(result.stdout)["findings"]}
    assert "upload_stale" in kinds  # the shipped upload is dated 2024-01-01
