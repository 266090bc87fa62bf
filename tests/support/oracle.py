"""Verdicts from outside regfsck's judgement, for tests to compare it with: the official
collector's plan, reachability computed from the stored manifests, and what verify still
calls an error after a command changed a tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests import realtools
from tests.realtools import SampleInfo


def official(root: Path, tmp_path: Path, delete_untagged: bool,
             binary: str = realtools.REGISTRY_BIN, **config: Any) -> realtools.GCPlan:
    """The real `garbage-collect --dry-run` plan for `root` (`binary`: registry v3's;
    `config`: write_registry_config's options)."""
    written = realtools.write_registry_config(tmp_path / f"gc-{delete_untagged}.yml", root, **config)
    return realtools.gc_dry_run(written, delete_untagged=delete_untagged, binary=binary)


def closure(root: Path, info: SampleInfo, roots: set[str]) -> set[str]:
    """Every digest reachable from `roots` through the stored manifests (children too)."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        if digest in info.media_types:
            stack += realtools.manifest_references(realtools.read_stored_blob(root, digest))
    return seen


def tag_targets(info: SampleInfo) -> set[str]:
    return {d for tags in info.tags.values() for d in tags.values()}


def errors_after(root: Path) -> list[str]:
    """The error findings of a full verify (data checked) of `root`: `[]` for a sound tree."""
    from regfsck.root import locate
    from regfsck.verify import VerifyOptions, run_verify

    report = run_verify(locate(root), VerifyOptions(check_data=True, jobs=2))
    return [f"{f.kind} {f.path}" for f in report.findings if f.severity == "error"]
