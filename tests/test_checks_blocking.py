"""gc's plan checks only what can block it (`TreeChecker(blocking_only=True)`): on trees
damaged at random (links garbled, truncated, deleted, pointed elsewhere or made symbolic
links; manifests garbled or deleted; tags emptied), every finding that blocks gc, with or
without `--delete-untagged`, is the full checker's, to the affected tags."""

from __future__ import annotations

import random
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from regfsck.checks import TreeChecker
from regfsck.gc import blocking_findings
from regfsck.graph import ManifestStore
from regfsck.root import resolve
from regfsck.scanner import Scanner
from regfsck.storage import open_storage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import synth

from tests.support import V2

DAMAGES = ("garble", "truncate", "delete", "other_digest", "symlink", "empty_dir")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("blocking") / "root"
    synth.generate(root, synth.SynthConfig(repositories=8, seed=11))
    return root


def _damage(v2: Path, rng: random.Random) -> list[str]:
    """One to three random damages to links and manifests; what was done, for the report."""
    repos = v2 / "repositories"
    links = sorted(repos.glob("*/*/_manifests/revisions/sha256/*/link"))
    links += sorted(repos.glob("*/*/_manifests/tags/*/current/link"))
    links += sorted(repos.glob("*/*/_manifests/tags/*/index/sha256/*/link"))
    links += sorted(repos.glob("*/*/_layers/sha256/*/link"))[:40]
    manifests = sorted({v2 / "blobs/sha256" / p.parent.name[:2] / p.parent.name / "data"
                        for p in repos.glob("*/*/_manifests/revisions/sha256/*/link")})
    digests = [f"sha256:{p.parent.name}" for p in manifests]
    done = []
    for _ in range(rng.randint(1, 3)):
        target = rng.choice(links + manifests)
        if not target.exists() or target.is_symlink():
            continue
        damage = rng.choice(DAMAGES)
        done.append(f"{damage} {target.relative_to(v2)}")
        if damage == "garble":
            target.write_bytes(b"{not json or a digest")
        elif damage == "truncate":
            target.write_bytes(target.read_bytes()[:7])
        elif damage == "delete":
            target.unlink()
        elif damage == "other_digest":
            target.write_text(rng.choice(digests))
        elif damage == "symlink":
            target.rename(target.with_name("moved"))
            target.symlink_to("moved")
        else:
            target.unlink()
            target.parent.rename(target.parent.with_name(target.parent.name + "x"))
    return done


def _blocking(root: Path, blocking_only: bool) -> list[list[dict[str, object]]]:
    registry = resolve(root, None)
    storage = open_storage(registry)
    inv = Scanner(storage, registry).scan()
    findings = TreeChecker(inv, ManifestStore(storage, inv), now=datetime.now(UTC),
                           blocking_only=blocking_only).run()
    return [[f.to_json() for f in blocking_findings(findings, untagged)]
            for untagged in (False, True)]


@pytest.mark.parametrize("seed", range(24))
def test_blocking_only_checks_find_every_blocking_finding(base: Path, tmp_path: Path,
                                                          seed: int) -> None:
    root = tmp_path / "root"
    shutil.copytree(base, root, symlinks=True)
    done = _damage(root / V2, random.Random(seed))
    full = _blocking(root, blocking_only=False)
    assert _blocking(root, blocking_only=True) == full, done


def test_the_healthy_tree_blocks_nothing(base: Path) -> None:
    assert _blocking(base, blocking_only=True) == _blocking(base, blocking_only=False) == [[], []]


@pytest.mark.parametrize("blocking_only", [True, False])
def test_a_healthy_tree_walks_no_tag_for_findings_it_does_not_have(
        base: Path, monkeypatch: pytest.MonkeyPatch, blocking_only: bool) -> None:
    """The tags a finding names are walked only for a finding: gc's plan on a healthy tree
    (every revision checked) walked every tag of every repository for nothing, its
    checks' largest cost at 300k files."""
    import regfsck.checks as checks
    walked: list[list[str]] = []
    original = checks.walk

    def counting_walk(store: ManifestStore, roots: list[str]):  # type: ignore[no-untyped-def]
        walked.append(roots)
        return original(store, roots)

    monkeypatch.setattr(checks, "walk", counting_walk)
    assert _blocking(base, blocking_only=blocking_only) == [[], []]
    assert walked == []
