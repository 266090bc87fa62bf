"""`regfsck why` against the official collector and an independent reading of the sample.

Oracles: `docker-registry garbage-collect --dry-run` (with and without
`--delete-untagged`) for the 2.8 verdicts and for the bytes a deletion frees (run on a copy
where the tag or revision was really removed), and SampleInfo (what was pushed) for the
paths and regfsck gc's own modes.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from regfsck import layout
from regfsck.graph import ManifestStore
from regfsck.root import locate
from regfsck.scanner import Scanner
from regfsck.storage import FilesystemStorage
from regfsck.why import ReferenceGraph, WhyReport, explain_blob, full_chain
from tests.realtools import SampleInfo, gc_dry_run, read_stored_blob, write_registry_config
from tests.support import V2
from tests.support.cli import invoke as cli


def explain_all(root: Path, digests: list[str]) -> dict[str, WhyReport]:
    registry = locate(root)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    store = ManifestStore(storage, inventory)
    graph = ReferenceGraph(inventory, store)
    return {d: explain_blob(inventory, store, d, graph) for d in digests}


def check_chains(root: Path, digest: str) -> WhyReport:
    """Every path's whole chain (its own, then each `via`'s) against an independent walk
    down the manifests' references: it starts at the revision, each hop is a reference,
    the last one refers to the blob in the path's role, and it is a shortest one. Told
    once, the chains of all paths together hold each manifest at most once per path."""
    registry = locate(root)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    store = ManifestStore(storage, inventory)
    graph = ReferenceGraph(inventory, store)
    report = explain_blob(inventory, store, digest, graph)

    def distance(start: str) -> int:
        seen, frontier, hops = {start}, [start], 0
        while frontier:
            if digest in frontier:
                return hops
            hops += 1
            frontier = [c for m in frontier for c, _ in graph.children.get(m, ())
                        if c not in seen and not seen.add(c)]  # type: ignore[func-returns-value]
        raise AssertionError(f"{start} does not reach {digest}")

    listed = {p.manifest for p in report.paths}
    for path in report.paths:
        whole = full_chain(path, report.paths)
        assert len(whole) == path.length == distance(path.manifest)
        assert path.via is None or path.via in listed
        if path.manifest == digest:
            assert whole == [] and path.role == "self"
            continue
        assert whole[0] == path.manifest
        for upper, lower in zip(whole, [*whole[1:], digest], strict=True):
            roles = {r for c, r in graph.children[upper] if c == lower}
            assert roles, f"{upper} does not refer to {lower}"
        assert path.role in {r for c, r in graph.children[whole[-1]] if c == digest}
    assert sum(len(p.chain) for p in report.paths) <= len(report.paths) + len(graph.children)
    return report


def verdict(report: WhyReport, mode: str) -> bool:
    return next(v.keep for v in report.gc if v.mode == mode)


def closure(info: SampleInfo, roots: set[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        digest = stack.pop()
        if digest not in seen:
            seen.add(digest)
            stack.extend(info.references.get(digest, []))
    return seen


def official_plan(root: Path, tmp: Path, delete_untagged: bool) -> set[str]:
    config = write_registry_config(tmp / f"gc-{delete_untagged}.yml", root)
    return gc_dry_run(config, delete_untagged=delete_untagged).blobs


@pytest.mark.realtools
def test_gc_verdicts_match_the_official_collector_and_the_sample(
        sample_root: Path, sample_info: SampleInfo, tmp_path: Path) -> None:
    reports = explain_all(sample_root, sample_info.all_blobs)
    official = official_plan(sample_root, tmp_path, False)
    official_m = official_plan(sample_root, tmp_path, True)
    tagged = {d for tags in sample_info.tags.values() for d in tags.values()}
    _, sbom, subject, _ = sample_info.artifact
    kept_by_tags = closure(sample_info, tagged | ({sbom} if subject in tagged else set()))
    kept_by_revisions = closure(sample_info, {d for ds in sample_info.revisions.values()
                                              for d in ds})
    for digest, report in reports.items():
        assert verdict(report, "registry garbage-collect (2.8)") == (digest not in official)
        assert verdict(report, "registry garbage-collect --delete-untagged (2.8)") == (
            digest not in official_m), digest
        assert verdict(report, "gc") == (digest in kept_by_revisions)
        assert verdict(report, "gc --delete-untagged") == (digest in kept_by_tags), digest
    # The 2.8 bug made visible: a platform layer of a tagged index is kept by regfsck's
    # --delete-untagged but deleted by the official one.
    amd64 = sample_info.blobs["layer/amd64"]
    assert verdict(reports[amd64], "gc --delete-untagged")
    assert not verdict(reports[amd64], "registry garbage-collect --delete-untagged (2.8)")


def fixture_info() -> SampleInfo:
    """The SampleInfo of the shipped fixture (stored in fixtures/registry.json)."""
    meta = Path(__file__).resolve().parent.parent / "fixtures" / "registry.json"
    return SampleInfo.from_json(json.loads(meta.read_text()))


def test_paths_name_every_tag_and_the_index_chain(fixture_root: Path) -> None:
    result = cli("why", str(fixture_root), fixture_info().blobs["layer/amd64"], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    tagged = {(p["repo"], tuple(p["tags"])) for p in report["paths"] if p["tagged"]}
    assert tagged == {("multi/oci", ("latest",)), ("multi/docker", ("latest",))}
    for path in report["paths"]:
        if path["tagged"]:  # index -> image -> layer; the image's own path goes on
            assert path["length"] == 2 and path["chain"] == [path["manifest"]]
            assert path["via"] in {p["manifest"] for p in report["paths"]}
            assert path["role"] == "layer"
    check_chains(fixture_root, fixture_info().blobs["layer/amd64"])
    assert report["roles"] == ["layer"]
    assert sorted(link["repo"] for link in report["layer_links"]) == ["multi/docker", "multi/oci"]


@pytest.mark.realtools
@pytest.mark.parametrize("repo, label", [("a/b", "a-b"), ("compress/zstd", "zstd"),
                                         ("legacy/schema1", "schema1")])
def test_freed_bytes_match_what_the_official_gc_then_deletes(
        sample_root: Path, sample_info: SampleInfo, tmp_path: Path, repo: str, label: str) -> None:
    digest = sample_info.tags[repo]["latest"]
    layer = sample_info.blobs[f"layer/{label}"]
    result = cli("why", str(sample_root), layer, "--json")
    assert result.returncode == 0, result.stderr
    freed = {(f["action"], f["gc_mode"]): f for f in json.loads(result.stdout)["freed"]}
    before_m = official_plan(sample_root, tmp_path, True)
    before = official_plan(sample_root, tmp_path, False)

    def size(digests: set[str], root: Path) -> int:
        return sum(len(read_stored_blob(root, d)) for d in digests)

    # rm repo:latest, then gc --delete-untagged
    untagged = shutil.copytree(sample_root, tmp_path / "untagged", symlinks=True)
    shutil.rmtree(untagged / V2 / layout.tag_dir(repo, "latest"))
    gone = official_plan(untagged, tmp_path, True) - before_m
    entry = freed[(f"rm {repo}:latest", "gc --delete-untagged")]
    assert (entry["blobs"], entry["bytes"]) == (len(gone), size(gone, sample_root))
    assert layer in gone
    # rm repo@digest (revision and its tags), then the default gc
    removed = shutil.copytree(sample_root, tmp_path / "removed", symlinks=True)
    shutil.rmtree(removed / V2 / layout.revision_dir(repo, digest))
    shutil.rmtree(removed / V2 / layout.tag_dir(repo, "latest"))
    gone = official_plan(removed, tmp_path, False) - before
    entry = freed[(f"rm {repo}@{digest}", "gc")]
    assert (entry["blobs"], entry["bytes"]) == (len(gone), size(gone, sample_root))


def test_shared_tag_frees_nothing(fixture_root: Path) -> None:
    base = (fixture_root / V2 / layout.tag_current_link("library/base", "latest")).read_text()
    config = json.loads(read_stored_blob(fixture_root, base))["config"]["digest"]
    result = cli("why", str(fixture_root), config, "--json")
    assert result.returncode == 0, result.stderr
    freed = {f["action"]: f for f in json.loads(result.stdout)["freed"]
             if f["gc_mode"] == "gc --delete-untagged"}
    for tag in ("latest", "1.0", "1"):
        assert freed[f"rm library/base:{tag}"]["bytes"] == 0
        assert "still tagged" in freed[f"rm library/base:{tag}"]["note"]


def test_missing_blob_is_explained_with_exit_1(fixture_root: Path) -> None:
    digest = (fixture_root / V2 / layout.tag_current_link("a/b", "latest")).read_text()
    layer = json.loads(read_stored_blob(fixture_root, digest))["layers"][-1]["digest"]
    (fixture_root / V2 / layout.blob_data(layer)).unlink()
    result = cli("why", str(fixture_root), layer, "--json")
    assert result.returncode == 1
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["exists"] is False and report["size"] is None
    assert [p["repo"] for p in report["paths"] if p["tagged"]] == ["a/b"]
    human = cli("why", str(fixture_root), layer)
    assert "MISSING" in human.stdout


def test_unknown_and_invalid_digests(fixture_root: Path) -> None:
    result = cli("why", str(fixture_root), "sha256:" + "0" * 64)
    assert result.returncode == 1 and "no such blob" in result.stderr
    result = cli("why", str(fixture_root), "sha256:XYZ")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_unreferenced_blob_is_a_gc_candidate(fixture_root: Path) -> None:
    orphans = fixture_info().unreferenced_blobs
    assert orphans == _orphans(fixture_root)
    result = cli("why", str(fixture_root), orphans[0], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["paths"] == [] and report["exists"] is True
    assert all(not v["keep"] for v in report["gc"])


def _orphans(root: Path) -> list[str]:
    registry = locate(root)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    graph = ReferenceGraph(inventory, ManifestStore(storage, inventory))
    reached = graph.reach(d for _, d in graph.revision_roots())
    return sorted(set(inventory.blobs) - reached)


# -- freed bytes: the linear labelling against one reach per root ---------------------------


def _reach(graph: ReferenceGraph, repo: str, digest: str, with_referrers: bool) -> set[str]:
    """The definition, one root at a time: the reachability oracle's own walk."""
    if not with_referrers:
        return graph.reach([digest])
    return graph.store.reach.closure(graph.inv.repositories[repo], [digest])


def _naive_freed(graph: ReferenceGraph, roots: list[tuple[str, str]],
                 with_referrers: bool) -> dict[tuple[str, str], tuple[int, int]]:
    """(repo, digest) root -> (blobs, bytes) in its reach that no other root digest reaches."""
    reaches = {root: _reach(graph, *root, with_referrers) for root in roots}
    by_digest: dict[str, set[str]] = {}
    for (_, digest), reached in reaches.items():
        by_digest.setdefault(digest, set()).update(reached)
    counts = collections.Counter(d for reached in by_digest.values() for d in reached)
    blobs = graph.inv.blobs
    return {root: (sum(1 for d in r if counts[d] == 1 and d in blobs),
                   sum(blobs[d].size for d in r if counts[d] == 1 and d in blobs))
            for root, r in reaches.items()}


def _check_freed_against_the_definition(root: Path, digests: list[str]) -> dict[str, WhyReport]:
    registry = locate(root)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    store = ManifestStore(storage, inventory)
    graph = ReferenceGraph(inventory, store)
    by_tag = _naive_freed(graph, graph.tag_roots(), True)
    by_revision = _naive_freed(graph, graph.revision_roots(), False)
    reports = {}
    for digest in digests:
        report = reports[digest] = explain_blob(inventory, store, digest, graph)
        for freed in report.freed:
            if freed.note:
                continue
            where = freed.action.removeprefix("rm ")
            if freed.gc_mode == "gc":
                repo, _, manifest = where.partition("@")
                expected = by_revision[(repo, manifest)]
            else:
                repo, _, tag = where.rpartition(":")
                manifest = inventory.repositories[repo].tag_targets()[tag]
                expected = by_tag[(repo, manifest)]
            assert (freed.blobs, freed.bytes) == expected, (digest, freed)
    return reports


@pytest.mark.realtools
def test_freed_bytes_equal_one_reach_per_root_on_the_sample(sample_root: Path,
                                                            sample_info: SampleInfo) -> None:
    reports = _check_freed_against_the_definition(sample_root, sample_info.all_blobs)
    assert sum(1 for r in reports.values() for f in r.freed if not f.note) > 20


@pytest.mark.realtools
def test_chain_of_3000_nested_indexes_gives_the_same_answer(sample_root: Path,
                                                            sample_info: SampleInfo) -> None:
    """3 000 index revisions stacked on an image: every level is a path to the layer, and
    the freed bytes of each are what one reach per root gives (each level alone holds
    exactly itself under the default gc)."""
    from tests.support.tree import nested_indexes

    repo = "library/base"
    leaf = sample_info.tags[repo]["latest"]
    top = nested_indexes(sample_root, repo, leaf, 3_000, tag="chain")
    layer = json.loads(read_stored_blob(sample_root, leaf))["layers"][0]["digest"]
    reports = _check_freed_against_the_definition(sample_root, [layer, top])
    report = reports[layer]
    chained = [p for p in report.paths if p.repo == repo]
    assert len(chained) >= 3_001
    top_path = next(p for p in chained if p.manifest == top)
    whole = full_chain(top_path, report.paths)
    assert top_path.tags == ["chain"] and len(whole) == top_path.length == 3_001
    assert whole[0] == top and whole[-1] == leaf
    assert sum(len(p.chain) for p in report.paths) < 2 * len(report.paths)  # told once
    check_chains(sample_root, layer)
    freed = {f.action: f for f in report.freed}
    assert freed[f"rm {repo}:chain"].blobs == 3_000  # the whole chain, nothing below it
    assert freed[f"rm {repo}@{top}"].blobs == 1
    assert sum(1 for f in report.freed if not f.note) > 3_000
