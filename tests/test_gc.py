"""gc's judgement and its refusals, against trees written by the real registry 2.8.

The oracle is the real `docker-registry garbage-collect --dry-run`: without
--delete-untagged regfsck's blob set must equal it; with it, it must equal the official
set minus what 2.8 wrongly deletes (the platform images of tagged lists and the referrers
of kept manifests), which is also computed independently from the stored manifests.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from regfsck import layout
from regfsck.gc import GcOptions, plan_gc, revalidator
from regfsck.root import RegistryRoot, locate
from regfsck.safety import RootLock
from regfsck.session import mutation_session
from regfsck.sweep import sweep
from tests import realtools
from tests.realtools import SampleInfo
from tests.support import REPO_ROOT, V2
from tests.support.cli import invoke as cli
from tests.support.oracle import closure, errors_after, official, tag_targets
from tests.support.snapshot import registry_snapshot

NO_GRACE = GcOptions(grace=timedelta(0))
NO_GRACE_M = GcOptions(delete_untagged=True, grace=timedelta(0))


def blob_digests(plan_json: dict[str, Any]) -> set[str]:
    return {b["digest"] for b in plan_json["blobs"]}


def backdate(root: Path, hours: float) -> None:
    when = (datetime.now(UTC) - timedelta(hours=hours)).timestamp()
    for dirpath, dirnames, filenames in os.walk(root / "docker"):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (when, when), follow_symlinks=False)


# --------------------------------------------------------------------------- the oracle


@pytest.mark.realtools
def test_default_mode_equals_the_official_gc(sample_root: Path, sample_info: SampleInfo,
                                             tmp_path: Path) -> None:
    plan = plan_gc(locate(sample_root), NO_GRACE)
    theirs = official(sample_root, tmp_path, delete_untagged=False)
    assert theirs.blobs, "the sample must give the official gc something to collect"
    assert blob_digests(plan.to_json()) == theirs.blobs
    assert blob_digests(plan.to_json()) == set(sample_info.unreferenced_blobs)
    assert plan.manifests == [] and theirs.manifests == set()
    assert not plan.blocked
    assert plan.reclaimable_bytes == sum(
        len(realtools.read_stored_blob(sample_root, d)) for d in theirs.blobs)


@pytest.mark.realtools
def test_delete_untagged_is_the_official_set_minus_the_28_bug(sample_root: Path, sample_info: SampleInfo,
                                                               tmp_path: Path) -> None:
    plan = plan_gc(locate(sample_root), NO_GRACE_M).to_json()
    theirs = official(sample_root, tmp_path, delete_untagged=True)
    children = {c for index in sample_info.index_children for c in sample_info.index_children[index]}
    repo, sbom, subject, _ = sample_info.artifact
    assert subject in tag_targets(sample_info)  # the SBOM's subject is tagged: the SBOM stays
    # 2.8 marks a tagged manifest and what it references directly, never recursing into
    # the children of a list, and ignores `subject`: this is what it wrongly deletes.
    marked_by_28 = tag_targets(sample_info) | {
        r for d in tag_targets(sample_info) for r in sample_info.references[d]}
    wrongly_deleted = closure(sample_root, sample_info, children | {sbom}) - marked_by_28
    assert wrongly_deleted and wrongly_deleted <= theirs.blobs  # 2.8 does delete them
    assert blob_digests(plan) == theirs.blobs - wrongly_deleted
    # Independently: exactly the blobs no tag reaches (children and kept referrers count).
    kept = closure(sample_root, sample_info, tag_targets(sample_info) | {sbom})
    assert blob_digests(plan) == set(sample_info.all_blobs) - kept
    # Manifests: the one untagged by the re-push, not the children nor the SBOM.
    untagged_repo, _, untagged = sample_info.untagged
    assert [(m["repo"], m["digest"]) for m in plan["manifests"]] == [(untagged_repo, untagged)]
    assert (untagged_repo, untagged) in theirs.manifests
    assert {(r, d) for r, d in theirs.manifests} - {(untagged_repo, untagged)} == (
        {(r, c) for r, _, i in (sample_info.oci_index, sample_info.docker_list)
         for c in sample_info.index_children[i]} | {(repo, sbom)})


@pytest.mark.realtools
def test_json_plan_shape_and_dry_run_changes_nothing(sample_root: Path) -> None:
    before = registry_snapshot(sample_root)
    result = cli("gc", str(sample_root), "--grace", "0", "--delete-untagged", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for key in ("blobs", "manifests", "layer_links", "uploads", "reclaimable_bytes", "applied",
                "run_id"):
        assert key in plan
    assert plan["applied"] is False and plan["run_id"] is None
    assert all(set(b) >= {"digest", "size"} for b in plan["blobs"])
    assert all(set(m) >= {"repo", "digest"} for m in plan["manifests"])
    assert all(set(link) >= {"repo", "digest"} for link in plan["layer_links"])
    assert plan["reclaimable_bytes"] == sum(b["size"] for b in plan["blobs"]) + sum(
        u["size"] for u in plan["uploads"])
    assert registry_snapshot(sample_root) == before
    assert not (sample_root / "regfsck-quarantine").exists()
    human = cli("gc", str(sample_root), "--grace", "0")
    assert human.returncode == 0 and "Reclaimable" in human.stdout and "--apply" in human.stdout


# --------------------------------------------------------------------------- grace and uploads


@pytest.mark.realtools
def test_grace_keeps_young_things(sample_root: Path) -> None:
    fresh = plan_gc(locate(sample_root), GcOptions())  # everything was written minutes ago
    assert fresh.blobs == [] and fresh.layer_links == [] and fresh.young
    backdate(sample_root, hours=2)
    old = plan_gc(locate(sample_root), GcOptions())
    assert blob_digests(old.to_json()) == blob_digests(plan_gc(locate(sample_root), NO_GRACE).to_json())
    assert old.young == []
    assert plan_gc(locate(sample_root), GcOptions(grace=timedelta(hours=3))).blobs == []


@pytest.mark.realtools
def test_uploads_by_age_and_without_startedat(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, uuid, size = sample_info.upload
    root = locate(sample_root)
    assert plan_gc(root, NO_GRACE).uploads == []  # started minutes ago: not stale at 168h
    everything = plan_gc(root, GcOptions(grace=timedelta(0), uploads_older_than=timedelta(0)))
    upload_dir = sample_root / V2 / layout.upload_dir(repo, uuid)
    held = sum(p.stat().st_size for p in upload_dir.rglob("*") if p.is_file() and p.name != "startedat")
    assert held > size  # the data and the saved hash states
    assert [(u.repo, u.id, u.size) for u in everything.uploads] == [(repo, uuid, held)]
    (upload_dir / "startedat").unlink()
    [orphan] = plan_gc(root, NO_GRACE).uploads
    assert "no startedat" in orphan.reason
    assert plan_gc(root, GcOptions()).uploads == []  # ... but it is younger than the grace


# --------------------------------------------------------------------------- applying


@pytest.mark.realtools
def test_apply_then_tree_is_healthy_official_gc_agrees_and_undo_restores(
        sample_root: Path, sample_info: SampleInfo, tmp_path: Path) -> None:
    before = registry_snapshot(sample_root)
    result = cli("gc", str(sample_root), "--grace", "0", "--apply", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["applied"] is True and plan["run_id"]
    assert plan["apply"]["moved"] > 0 and plan["apply"]["skipped"] == []
    for digest in sample_info.unreferenced_blobs:
        assert not (sample_root / V2 / layout.blob_dir(digest)).exists()
        assert (sample_root / "regfsck-quarantine" / plan["run_id"] / "v2" / layout.blob_dir(digest)).is_dir()
    assert errors_after(sample_root) == []
    assert official(sample_root, tmp_path, delete_untagged=False).blobs == set()
    again = plan_gc(locate(sample_root), NO_GRACE)
    assert again.empty
    undone = cli("undo", str(sample_root), plan["run_id"], "--json")
    assert undone.returncode == 0, undone.stderr
    assert registry_snapshot(sample_root) == before


@pytest.mark.realtools
def test_apply_prints_the_cache_reminder_and_how_to_undo(sample_root: Path) -> None:
    result = cli("gc", str(sample_root), "--grace", "0", "--apply")
    assert result.returncode == 0, result.stderr
    assert "Restart the registry" in result.stderr and "regfsck undo" in result.stderr
    runs = json.loads(cli("runs", str(sample_root), "--json").stdout)["runs"]
    assert [(r["command"], r["status"]) for r in runs] == [("gc", "complete")]


@pytest.mark.realtools
def test_referrers_follow_their_subject(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, sbom, subject, _ = sample_info.artifact
    _, sig_tag, sig, _ = sample_info.referrer
    root = locate(sample_root)
    assert plan_gc(root, NO_GRACE_M).orphan_referrers == []
    tags = [t for t, d in sample_info.tags[repo].items() if d == subject]
    assert cli("rm", str(sample_root), *(f"{repo}:{t}" for t in tags), "--apply").returncode == 0
    plan = plan_gc(root, NO_GRACE_M)
    gone = {(m.repo, m.digest) for m in plan.manifests}
    assert {(repo, subject), (repo, sbom)} <= gone  # the subject is untagged now, its SBOM follows
    assert (repo, sig) not in gone  # the signature is tagged itself
    orphans = {(o.digest, o.kept) for o in plan.orphan_referrers}
    assert orphans == {(sbom, False), (sig, True)}
    assert sig_tag in sample_info.tags[repo]


@pytest.mark.realtools
def test_repository_left_empty_goes_whole(sample_root: Path, sample_info: SampleInfo) -> None:
    repo, digest, _ = sample_info.zstd
    assert cli("rm", str(sample_root), f"{repo}:latest", "--apply").returncode == 0
    before = registry_snapshot(sample_root)
    plan = plan_gc(locate(sample_root), NO_GRACE_M)
    assert plan.repositories == [repo]
    assert (repo, digest) in [(m.repo, m.digest) for m in plan.manifests]
    zstd_links = {link.digest for link in plan.layer_links if link.repo == repo}
    assert zstd_links == set(sample_info.layer_links[repo])  # shared ones too: nothing to serve
    result = cli("gc", str(sample_root), "--grace", "0", "--delete-untagged", "--apply", "--json")
    assert result.returncode == 0, result.stderr
    assert not (sample_root / V2 / "repositories/compress").exists()  # the parent went too
    assert errors_after(sample_root) == []
    assert cli("undo", str(sample_root)).returncode == 0
    assert registry_snapshot(sample_root) == before


@pytest.mark.realtools
def test_nested_repository_parent_left_empty_keeps_its_child(sample_root: Path,
                                                             sample_info: SampleInfo) -> None:
    assert cli("rm", str(sample_root), "a/b:latest", "--apply").returncode == 0
    plan = plan_gc(locate(sample_root), NO_GRACE_M)
    assert plan.repositories == ["a/b"]
    moved = {r.path for r in plan.removal_list if r.phase == "repositories"}
    assert moved == {f"repositories/a/b/{p}" for p in ("_layers", "_manifests", "_uploads")}
    assert cli("gc", str(sample_root), "--grace", "0", "--delete-untagged", "--apply").returncode == 0
    assert (sample_root / V2 / "repositories/a/b/c/_manifests").is_dir()
    assert errors_after(sample_root) == []


# --------------------------------------------------------------------------- re-checks


@pytest.mark.realtools
def test_victim_changed_after_planning_is_left_alone(sample_root: Path, sample_info: SampleInfo) -> None:
    root = locate(sample_root)
    plan = plan_gc(root, NO_GRACE)
    changed = sample_info.unreferenced_blobs[0]
    data = sample_root / V2 / layout.blob_data(changed)
    os.utime(data, (1_000_000_000, 1_000_000_000))  # something wrote it since the scan
    with mutation_session(root, command="gc") as session:
        result = sweep(session, {}, plan.removal_list, plan.empty_dirs, grace=timedelta(0),
                       revalidate=revalidator(root, plan))
    assert (layout.blob_dir(changed), f"{layout.blob_data(changed)} changed since the scan") in result.skipped
    assert data.exists()


@pytest.mark.realtools
def test_victims_gone_or_emptied_after_planning_are_told_apart(
        sample_root: Path, sample_info: SampleInfo) -> None:
    """A blob directory removed since the scan is "gone"; one whose `data` alone is
    missing "changed" (the directory is still there: not moved, nothing to move)."""
    root = locate(sample_root)
    plan = plan_gc(root, NO_GRACE)
    gone, emptied = sample_info.unreferenced_blobs[:2]
    shutil.rmtree(sample_root / V2 / layout.blob_dir(gone))
    (sample_root / V2 / layout.blob_data(emptied)).unlink()
    with mutation_session(root, command="gc") as session:
        result = sweep(session, {}, plan.removal_list, plan.empty_dirs, grace=timedelta(0),
                       revalidate=revalidator(root, plan))
    skipped = dict(result.skipped)
    assert skipped[layout.blob_dir(gone)] == "gone since the scan"
    assert skipped[layout.blob_dir(emptied)] == f"{layout.blob_data(emptied)} changed since the scan"
    assert (sample_root / V2 / layout.blob_dir(emptied)).is_dir()


@pytest.mark.realtools
def test_victims_referenced_again_before_the_sweep_are_kept(sample_root: Path,
                                                            sample_info: SampleInfo) -> None:
    root = locate(sample_root)
    plan = plan_gc(root, NO_GRACE_M)
    repo, _, untagged = sample_info.untagged
    assert (repo, untagged) in {(m.repo, m.digest) for m in plan.manifests}
    # A push in flight tags the old manifest again after the plan was made.
    current = sample_root / V2 / layout.tag_current_link(repo, "again")
    current.parent.mkdir(parents=True)
    current.write_text(untagged)
    with mutation_session(root, command="gc") as session:
        result = sweep(session, {}, plan.removal_list, plan.empty_dirs, grace=timedelta(0),
                       revalidate=revalidator(root, plan))
    kept = {p for p, why in result.skipped if "referenced again" in why}
    needed = closure(sample_root, sample_info, {untagged})
    assert layout.revision_dir(repo, untagged) in kept
    assert {layout.blob_dir(d) for d in needed} & {r.path for r in plan.removal_list} <= kept
    assert {p for p in kept if p.startswith("blobs/")}  # its layers were victims, and stay
    assert errors_after(sample_root) == []  # the re-tagged image is complete
    assert result.moved  # everything else still went


# --------------------------------------------------------------------------- refusals


DAMAGE = {
    "manifest_not_json": lambda root, info: (
        root / V2 / layout.blob_data(info.untagged[2])).write_bytes(b"{not json"),
    "revision_blob_missing": lambda root, info: os.remove(
        root / V2 / layout.blob_data(info.untagged[2])),
    "tag_link_newline": lambda root, info: (
        root / V2 / layout.tag_current_link("a/b", "latest")).write_text(info.tags["a/b"]["latest"] + "\n"),
    "symlinked_repository": lambda root, info: (root / V2 / "repositories/elsewhere").symlink_to(
        root / V2 / "repositories/a/b/c"),
}


@pytest.mark.realtools
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_blocks_gc_unless_forced(sample_root: Path, sample_info: SampleInfo, damage: str) -> None:
    DAMAGE[damage](sample_root, sample_info)
    before = registry_snapshot(sample_root)
    refused = cli("gc", str(sample_root), "--grace", "0", "--apply", "--json")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert json.loads(refused.stdout)["blocked_by"]
    assert registry_snapshot(sample_root) == before
    assert not (sample_root / "regfsck-quarantine").exists()
    human = cli("gc", str(sample_root), "--grace", "0")
    assert human.returncode == 3 and "--force" in human.stdout
    forced = cli("gc", str(sample_root), "--grace", "0", "--force", "--apply", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["applied"] is True


@pytest.mark.realtools
def test_refuses_while_the_real_registry_serves_the_tree(sample_root: Path, tmp_path: Path) -> None:
    before = registry_snapshot(sample_root)
    with realtools.RealRegistry(sample_root) as reg:
        assert reg.request("GET", "/v2/").status == 200
        result = cli("gc", str(sample_root), "--grace", "0", "--apply")
    assert result.returncode == 3
    assert "docker-registry serve" in result.stderr and "Stop the registry" in result.stderr
    assert registry_snapshot(sample_root) == before
    assert sorted(p.name for p in sample_root.iterdir()) == ["docker"]  # not even a lock file
    dry = cli("gc", str(sample_root), "--grace", "0")  # a plan is still allowed (read only)
    assert dry.returncode == 0


def test_refuses_while_another_run_holds_the_lock(fixture_root: Path) -> None:
    root = locate(fixture_root)
    with RootLock(root):
        for args in (["gc", "--apply"], ["rm", "a/b", "--apply"], ["undo"]):
            result = cli(args[0], str(fixture_root), *args[1:])
            assert result.returncode == 3, result.stdout + result.stderr
            assert "another regfsck run" in result.stderr


def test_bad_durations_are_usage_errors(fixture_root: Path) -> None:
    for option in ("--grace", "--uploads-older-than"):
        result = cli("gc", str(fixture_root), option, "ten minutes")
        assert result.returncode == 2 and "not a duration" in result.stderr


def test_shipped_fixture_plan_matches_its_recorded_official_gc(fixture_root: Path) -> None:
    meta = json.loads((REPO_ROOT / "fixtures" / "registry.json").read_text())
    plan = plan_gc(locate(fixture_root), NO_GRACE)
    assert blob_digests(plan.to_json()) == set(meta["gc_dry_run"]["blobs"])


def registry_root_of(path: Path) -> RegistryRoot:
    return locate(path)
