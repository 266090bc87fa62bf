"""The synthetic tree generator (benchmarks/synth.py) is faithful to the real registry.

The benchmarks' figures mean something only if the trees they time are what a registry
writes: the real `docker-registry` serves them, its collector accepts them and agrees with
the generator's own account, regfsck finds no damage in them, and `regfsck gc` plans the
same sweep as the official collector.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from tests import realtools

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import synth

from tests.support import V2
from tests.support.cli import invoke as regfsck

SMALL = synth.SynthConfig(repositories=30, seed=7)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthResult]:
    root = tmp_path_factory.mktemp("synthetic") / "root"
    return root, synth.generate(root, SMALL)


@pytest.fixture(scope="module")
def gc_config(synthetic: tuple[Path, synth.SynthResult],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(f"real registry tools unavailable: {missing}")
    return realtools.write_registry_config(tmp_path_factory.mktemp("gc") / "config.yml",
                                           synthetic[0])


def tree_digest(root: Path, skip_names: tuple[str, ...] = ()) -> str:
    """A hash of every path and content under root (for determinism checks)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            h.update(str(path.relative_to(root)).encode())
            if name not in skip_names:
                h.update(path.read_bytes())
    return h.hexdigest()


def test_go_hash_states_match_the_ones_the_registry_wrote(fixture_root: Path) -> None:
    uploads = next((fixture_root / V2 / "repositories").glob("*/*/*/_uploads/*/"))
    data = (uploads / "data").read_bytes()
    for state_file in (uploads / "hashstates" / "sha256").iterdir():
        offset = int(state_file.name)
        assert synth.go_sha256_state(data[:offset]) == state_file.read_bytes()


@pytest.mark.parametrize("size", [0, 1, 55, 56, 64, 119, 3000])
def test_go_hash_state_resumes_to_the_real_sha256(size: int) -> None:
    data = realtools.pseudo_random_bytes("state", size + 77)
    state = synth.go_sha256_state(data[:size])
    assert synth.sha256_from_state(state, data[size:]) == realtools.sha256_digest(data)


def test_every_link_and_blob_is_in_the_exact_byte_format(synthetic: tuple[Path, synth.SynthResult]) -> None:
    root, result = synthetic
    links = list((root / V2 / "repositories").rglob("link"))
    assert len(links) == result.link_files
    for link in links:
        content = link.read_bytes()
        assert len(content) == 71 and content.startswith(b"sha256:")  # no newline, lower hex
        if link.parent.name != "current":
            assert content.decode()[7:] == link.parent.name
    blobs = list((root / V2 / "blobs").rglob("data"))
    assert len(blobs) == result.blob_files
    for data in blobs[:: max(1, len(blobs) // 200)]:
        assert hashlib.sha256(data.read_bytes()).hexdigest() == data.parent.name
        assert data.parent.parent.name == data.parent.name[:2]


def test_generator_is_deterministic(tmp_path: Path) -> None:
    config = synth.SynthConfig(repositories=12, seed=3)
    a = synth.generate(tmp_path / "a", config)
    b = synth.generate(tmp_path / "b", config)
    assert a.files == b.files and a.unreferenced == b.unreferenced and a.tags == b.tags
    # Only a fresh upload's start time depends on the clock.
    assert tree_digest(tmp_path / "a", ("startedat",)) == tree_digest(tmp_path / "b", ("startedat",))


def test_for_files_sizes_the_tree(tmp_path: Path) -> None:
    config = synth.SynthConfig.for_files(4000)
    result = synth.generate(tmp_path / "root", config, jobs=2)
    counted = sum(len(files) for _, _, files in os.walk(tmp_path / "root"))
    assert counted == result.files
    assert abs(counted - 4000) < 4000 * 0.05


def test_regfsck_finds_no_damage_only_the_planted_normal_states(
        synthetic: tuple[Path, synth.SynthResult]) -> None:
    root, result = synthetic
    verify = regfsck("verify", str(root), "--json")
    assert verify.returncode == 0, verify.stderr
    doc = json.loads(verify.stdout)
    counts: dict[str, int] = {}
    for finding in doc["findings"]:
        counts[finding["kind"]] = counts.get(finding["kind"], 0) + 1
    stale = sum(1 for *_, is_stale in result.uploads if is_stale)
    expected = {"empty_dir": result.deleted_revision_dirs, "upload_stale": stale}
    assert counts == {k: v for k, v in expected.items() if v}
    assert doc["summary"]["blobs_verified"] == result.blob_files
    scan = json.loads(regfsck("scan", str(root), "--json").stdout)
    assert scan["unreferenced_blobs"]["count"] == len(result.unreferenced)


def test_official_collector_accepts_it_and_agrees_with_the_generator(
        gc_config: Path, synthetic: tuple[Path, synth.SynthResult]) -> None:
    result = synthetic[1]
    plan = realtools.gc_dry_run(gc_config)
    assert plan.blobs == result.unreferenced
    assert {repo for repo, _ in plan.marked_manifests} == set(result.repositories)
    untagged = realtools.gc_dry_run(gc_config, delete_untagged=True)
    # 2.8 -m also deletes the untagged children of tagged lists and referrers (section 9).
    assert untagged.blobs >= result.untagged_unreachable
    assert {d for _, d in untagged.manifests} >= {d for _, d in result.untagged_revisions}


def test_regfsck_gc_plans_the_official_sweep(gc_config: Path,
                                             synthetic: tuple[Path, synth.SynthResult]) -> None:
    root, result = synthetic
    official = realtools.gc_dry_run(gc_config).blobs
    plan = regfsck("gc", str(root), "--json", "--grace", "0")
    assert plan.returncode == 0, plan.stderr
    assert {b["digest"] for b in json.loads(plan.stdout)["blobs"]} == official == result.unreferenced
    untagged = regfsck("gc", str(root), "--json", "--grace", "0", "--delete-untagged")
    assert untagged.returncode == 0, untagged.stderr
    assert {b["digest"] for b in json.loads(untagged.stdout)["blobs"]} == result.untagged_unreachable


def test_the_real_registry_serves_the_synthetic_tree(synthetic: tuple[Path, synth.SynthResult],
                                                     tmp_path: Path) -> None:
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(f"real registry tools unavailable: {missing}")
    root, result = synthetic
    with realtools.RealRegistry(root) as registry:
        assert sorted(registry.catalog()) == sorted(result.repositories)
        multi = [repo for repo, tags in result.tags.items() if "multi" in tags][:2]
        plain = [repo for repo in result.repositories if repo not in multi][:2]
        for repo in multi + plain:
            assert {t: registry.manifest_digest(repo, t) for t in registry.tags(repo)} == result.tags[repo]
        pulled = 0
        for repo in multi + plain:
            for tag in ("multi", "latest") if repo in multi else ("latest", "v1.0"):
                realtools.skopeo_copy(f"docker://{registry.host}/{repo}:{tag}",
                                      f"dir:{tmp_path / f'pull{pulled}'}", "--all")
                pulled += 1
        assert pulled == 8


def _inventory_facts(root: Path, threads: int) -> tuple[object, ...]:
    from regfsck.root import locate
    from regfsck.scanner import Scanner
    from regfsck.storage import FilesystemStorage

    registry = locate(root)
    inv = Scanner(FilesystemStorage(registry.v2), registry, threads=threads).scan()
    repos = {name: (sorted((d, ln.path, ln.target) for d, ln in r.layers.items()),
                    sorted((d, ln.path, ln.target) for d, ln in r.revisions.items()),
                    sorted((t.name, t.current.target if t.current else None, sorted(t.index))
                           for t in r.tags.values()),
                    sorted((u.id, u.size, u.started_at) for u in r.uploads))
             for name, r in inv.repositories.items()}
    return (sorted((b.digest, b.path, b.size, b.inode) for b in inv.blobs.values()), repos,
            list(inv.repositories), inv.anomalies, inv.files_seen, inv.dirs_seen)


def test_parallel_scan_gives_the_same_inventory_as_the_sequential_one(
        synthetic: tuple[Path, synth.SynthResult], sample_root: Path) -> None:
    """REGFSCK_IO_THREADS only changes the schedule: same inventory, same anomaly order."""
    junk = sample_root / V2 / "repositories" / "a" / "b" / "_layers" / "sha256" / "zz"
    junk.mkdir()
    (sample_root / V2 / "blobs" / "sha256" / "ab" / "not-hex").mkdir(parents=True)
    (sample_root / V2 / "repositories" / "a" / "stray.txt").write_text("x")
    for root in (synthetic[0], sample_root):
        sequential = _inventory_facts(root, 1)
        assert _inventory_facts(root, 8) == sequential
        assert _inventory_facts(root, 3) == sequential
    assert len(sequential[3]) >= 3  # the planted anomalies are in the compared data  # type: ignore[arg-type]
