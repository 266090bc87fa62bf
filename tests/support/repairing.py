"""The repair round trip shared by the repair tests: damage a tree written by the real
registry, plan, apply, check verify and the real registry, undo, compare byte for byte."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from regfsck.quarantine import undo
from regfsck.root import locate
from regfsck.session import mutation_session
from regfsck.verify import VerifyOptions, run_verify
from tests.realtools import RealRegistry, SampleInfo, skopeo_copy
from tests.support.cli import invoke as cli
from tests.support.snapshot import Snapshot, registry_snapshot


def repair(root: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = cli("repair", str(root), "--json", *extra)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def tree_state(root: Path) -> Snapshot:
    """What repair must not touch without --apply and undo must restore: the registry tree
    with contents, modes and file mtimes (directories' mtimes change with their entries)."""
    return registry_snapshot(root, mtimes="files")


def findings(root: Path) -> set[tuple[str, str]]:
    report = run_verify(locate(root), VerifyOptions(jobs=2))
    return {(f.kind, f.path) for f in report.findings if f.kind != "empty_dir"}


def undo_last(root: Path) -> None:
    registry = locate(root)
    with mutation_session(registry, command="undo") as session:
        undo(session)


def assert_served(root: Path, info: SampleInfo, tags: list[tuple[str, str]], tmp: Path) -> None:
    """The real registry serves every tag with its original digest; the affected ones pull."""
    with RealRegistry(root) as registry:
        for repo, repo_tags in info.tags.items():
            for tag, digest in repo_tags.items():
                assert registry.manifest_digest(repo, tag) == digest, f"{repo}:{tag}"
        for n, (repo, tag) in enumerate(tags):
            skopeo_copy(f"docker://{registry.host}/{repo}:{tag}", f"dir:{tmp / f'pull-{n}'}",
                        "--all")


def repaired(root: Path, info: SampleInfo, tmp: Path, damage: Callable[[Path], None],
             affected: list[tuple[str, str]], expect_fixes: dict[str, int],
             *extra: str) -> dict[str, Any]:
    """Damage, repair, check verify + registry + undo; returns the applied repair's JSON."""
    clean = findings(root)
    damage(root)
    broken = findings(root)
    assert broken - clean, "the damage must be visible to verify"
    damaged = tree_state(root)
    code, plan = repair(root, *extra)
    assert code == 1 and plan["applied"] is False
    counts: dict[str, int] = {}
    for fix in plan["fixes"]:
        counts[fix["action"]] = counts.get(fix["action"], 0) + 1
    assert counts == expect_fixes, plan["fixes"]
    assert tree_state(root) == damaged, "a plan without --apply must not touch the tree"
    code, result = repair(root, "--apply", *extra)
    assert result["applied"] is True and result["run_id"]
    assert all(f["status"] == "applied" for f in result["fixes"]), result["fixes"]
    assert findings(root) == clean, "verify after repair must equal verify before the damage"
    assert code == 0
    assert_served(root, info, affected, tmp)
    undo_last(root)
    assert tree_state(root) == damaged, "undo must restore the damaged tree byte for byte"
    return result
