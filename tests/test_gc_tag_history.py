"""A tag's history (`tags/<t>/index/`) and gc, against the real registry.

Without `--delete-untagged` every revision is a root: the history decides nothing, the
official collector never reads it, and neither does regfsck's gc (issue 15: it was a third
of the walk). So damage there does not block that gc; it still blocks `--delete-untagged`
(a tag without a current link keeps what its history names) and `verify` reports it.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from regfsck import layout
from regfsck.gc import GcOptions, plan_from_inventory
from regfsck.graph import ManifestStore
from regfsck.root import resolve
from regfsck.scanner import Scanner
from regfsck.storage import open_storage
from tests import realtools
from tests.realtools import SampleInfo
from tests.support.cli import invoke as cli
from tests.support.oracle import official
from tests.support.snapshot import registry_snapshot

pytestmark = pytest.mark.realtools
SCHEMA1_REPO = "legacy/schema1"


def _damage_history(root: Path, info: SampleInfo) -> tuple[str, str]:
    """One history link garbled, another made a symbolic link (to a valid link file):
    the paths (below `docker/registry/v2`)."""
    (repo, tags), (other_repo, other_tags) = [
        item for item in info.tags.items() if item[0] != SCHEMA1_REPO][:2]
    tag, digest = next(iter(tags.items()))
    other_tag, other_digest = next(iter(other_tags.items()))
    v2 = root / layout.V2_PREFIX
    garbled = layout.tag_index_link(repo, tag, digest)
    (v2 / garbled).write_bytes(b"sha256:not-a-digest")
    linked = layout.tag_index_link(other_repo, other_tag, other_digest)
    (v2 / linked).unlink()
    os.symlink(v2 / layout.tag_current_link(other_repo, other_tag), v2 / linked)
    return garbled, linked


def _gc(root: Path, *args: str) -> tuple[int, dict[str, object]]:
    result = cli("gc", str(root), "--grace", "0", "--json", *args)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_history_damage_blocks_only_delete_untagged_and_the_apply_keeps_every_tag(
        sample_root: Path, sample_info: SampleInfo, tmp_path: Path) -> None:
    # Registry v3 neither serves nor collects a tree holding a schema1 manifest: that
    # repository goes first (deleted by hand: its blobs are orphans to every collector).
    shutil.rmtree(sample_root / layout.V2_PREFIX / layout.repo_dir(SCHEMA1_REPO))
    expected = sorted(f"{r}:{t}" for r, tags in sample_info.tags.items() for t in tags
                      if r != SCHEMA1_REPO)
    garbled, linked = _damage_history(sample_root, sample_info)
    theirs = official(sample_root, tmp_path, delete_untagged=False)
    v3 = realtools.shared_registry3()
    binaries = [realtools.REGISTRY_BIN] + ([v3] if v3 else [])
    if v3:  # registry v3's collector reads no tag history either without -m
        (tmp_path / "v3").mkdir()
        assert official(sample_root, tmp_path / "v3", delete_untagged=False,
                        binary=v3).blobs == theirs.blobs

    code, plan = _gc(sample_root)
    assert code == 0 and plan["blocked_by"] == [], plan["blocked_by"]
    assert {b["digest"] for b in plan["blobs"]} == theirs.blobs  # type: ignore[index, union-attr]

    code, plan = _gc(sample_root, "--delete-untagged")
    blocked = {(f["kind"], f["path"]) for f in plan["blocked_by"]}  # type: ignore[index, union-attr]
    assert code == 3
    assert ("link_invalid", f"{layout.V2_PREFIX}/{garbled}") in blocked
    assert ("symlink", f"{layout.V2_PREFIX}/{linked}") in blocked

    # A plan judged from a full scan (history read: the scan, metrics and disk-map
    # outlooks) marks and blocks as gc's own walk does.
    registry = resolve(sample_root, None)
    storage = open_storage(registry)
    inventory = Scanner(storage, registry).scan()
    assert any(a.kind == "symlink" for a in inventory.anomalies)
    full = plan_from_inventory(inventory, ManifestStore(storage, inventory), storage,
                               GcOptions(grace=timedelta(0)), now=datetime.now(UTC))
    assert full.blocked == [] and {b.digest for b in full.blobs} == theirs.blobs

    verified = cli("verify", str(sample_root), "--no-data", "--json")
    found = {(f["kind"], f["path"]) for f in json.loads(verified.stdout)["findings"]}
    assert ("link_invalid", f"{layout.V2_PREFIX}/{garbled}") in found
    assert ("symlink", f"{layout.V2_PREFIX}/{linked}") in found

    before = registry_snapshot(sample_root)
    pulled_by: list[str] = []
    code, applied = _gc(sample_root, "--apply")
    assert code == 0 and applied["applied"]
    assert {b["digest"] for b in applied["blobs"]} == theirs.blobs  # type: ignore[index, union-attr]
    assert (sample_root / layout.V2_PREFIX / linked).is_symlink()  # untouched
    assert (sample_root / layout.V2_PREFIX / garbled).read_bytes() == b"sha256:not-a-digest"
    for binary in binaries:  # both registry versions serve every tag
        with realtools.RealRegistry(sample_root, binary=binary) as reg:
            pulled = realtools.pull_every_tag(reg, tmp_path / f"pulled-{len(pulled_by)}")
            pulled_by.append(binary)
            assert sorted(pulled) == expected
        after = tmp_path / f"after-{len(pulled_by)}"
        after.mkdir()
        assert official(sample_root, after, delete_untagged=False, binary=binary).blobs == set()
    undone = cli("undo", str(sample_root))
    assert undone.returncode == 0, undone.stderr
    assert registry_snapshot(sample_root) == before
