"""End to end with the real registry: gc --apply, then the registry serves every tag.

A tree built by the real registry + skopeo is collected by `regfsck gc --apply` (both
modes); the real registry is started on the result and every tag that must survive is
pulled with skopeo (`--all`: every platform of the multi-arch images); the official
`garbage-collect --dry-run` afterwards finds nothing more to delete (with -m: only what
2.8 deletes wrongly); `regfsck undo` restores the original tree byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import realtools
from tests.realtools import SampleInfo
from tests.support.cli import invoke as cli
from tests.support.oracle import closure, official, tag_targets
from tests.support.snapshot import registry_snapshot

pytestmark = pytest.mark.realtools


@pytest.mark.parametrize("delete_untagged", [False, True], ids=["default", "delete-untagged"])
def test_gc_apply_real_registry_serves_every_tag_and_undo_restores(
        sample_root: Path, sample_info: SampleInfo, tmp_path: Path, delete_untagged: bool) -> None:
    before = registry_snapshot(sample_root)
    mode = ["--delete-untagged"] if delete_untagged else []
    result = cli("gc", str(sample_root), "--grace", "0", "--uploads-older-than", "0", *mode,
                 "--apply", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["applied"] and plan["apply"]["moved"] > 0
    assert plan["uploads"] and plan["blobs"]

    with realtools.RealRegistry(sample_root) as reg:
        pulled = realtools.pull_every_tag(reg, tmp_path / "pulled")
        assert sorted(pulled) == sorted(f"{r}:{t}" for r, tags in sample_info.tags.items() for t in tags)
        for repo, tags in sample_info.tags.items():
            for tag, digest in tags.items():
                assert reg.manifest_digest(repo, tag) == digest, f"{repo}:{tag} changed"
        for repo, _, index in (sample_info.oci_index, sample_info.docker_list):
            for child in sample_info.index_children[index]:
                assert reg.manifest_exists(repo, child), f"platform image {repo}@{child} lost"
        repo, sbom, _, _ = sample_info.artifact
        assert reg.manifest_exists(repo, sbom), "the referrer of a kept image was lost"
        realtools.skopeo_copy(f"docker://{reg.host}/{repo}@{sbom}", f"dir:{tmp_path / 'sbom'}")
        untagged_repo, _, untagged = sample_info.untagged
        assert reg.manifest_exists(untagged_repo, untagged) is not delete_untagged

    assert official(sample_root, tmp_path, delete_untagged=False).blobs == set()
    if delete_untagged:
        # Only what 2.8 deletes wrongly is left for its -m: the platform images and the SBOM.
        theirs = official(sample_root, tmp_path, delete_untagged=True)
        children = {(r, c) for r, _, i in (sample_info.oci_index, sample_info.docker_list)
                    for c in sample_info.index_children[i]}
        assert theirs.manifests == children | {(repo, sbom)}
        kept = closure(sample_root, sample_info, tag_targets(sample_info) | {sbom})
        assert theirs.blobs <= kept

    undone = cli("undo", str(sample_root))
    assert undone.returncode == 0, undone.stderr
    assert registry_snapshot(sample_root) == before
