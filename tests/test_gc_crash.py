"""Crash safety of real `regfsck gc --apply` runs, killed with SIGKILL at several points.

After each kill every tagged image must still be complete (verify finds no error, and at
one point the real registry serves every tag), and the next `gc --apply` must finish the
job (same tree as an uninterrupted gc) while `undo` must put the original tree back.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests import realtools
from tests.realtools import SampleInfo
from tests.support.cli import KillPoint, run_killed
from tests.support.cli import invoke as cli
from tests.support.oracle import errors_after
from tests.support.snapshot import Snapshot, registry_snapshot
from tests.support.tree import copy_tree

pytestmark = pytest.mark.realtools

GC_ARGS = ["--grace", "0", "--uploads-older-than", "0", "--delete-untagged", "--apply"]


# (storage method, substring of the path it is given, which matching call, before/after)
KILL_POINTS = [
    ("rename_noreplace", "/_manifests/tags/", 1, "after"),  # a tag directory moved
    ("rename_noreplace", "/_manifests/revisions/", 1, "after"),  # an untagged manifest moved
    ("rename_noreplace", "repositories/compress", 1, "before"),  # a whole repository announced
    ("rename_noreplace", "/_layers/", 2, "after"),  # in the middle of the layer links
    ("rename_noreplace", "blobs/", 1, "before"),  # blob batch journaled, nothing moved yet
    ("rename_noreplace", "blobs/", 3, "after"),  # blob batch half moved
    ("rename_noreplace", "/_uploads/", 1, "after"),  # an upload moved
    ("remove_empty_dir", "repositories/compress", 1, "after"),  # empty parent removed
    ("replace_file", "meta.json", 2, "before"),  # journal finished, bookkeeping not
]


Content = dict[str, tuple[str, str]]
CrashTree = tuple[Path, Snapshot, Content]


def prepare(root: Path, info: SampleInfo) -> None:
    """Give gc every kind of victim: untag compress/zstd (its repository goes whole)."""
    repo = info.zstd[0]
    tag_dir = root / "docker/registry/v2/repositories" / repo / "_manifests/tags/latest"
    shutil.rmtree(tag_dir)


def content(snapshot: Snapshot) -> Content:
    """Paths and bytes, without mtimes (two gc runs at different times differ in those)."""
    return {path: (kind, digest) for path, (kind, _, _, digest) in snapshot.items()}


def killed_gc(root: Path, point: KillPoint) -> subprocess.CompletedProcess[str]:
    return run_killed("regfsck.storage.FilesystemStorage", point, "gc", str(root), *GC_ARGS,
                      timeout=120)


@pytest.fixture(scope="module")
def prepared(real_sample: tuple[Path, SampleInfo],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Content]:
    """The sample with every kind of victim, and the content an uninterrupted gc leaves."""
    base = tmp_path_factory.mktemp("crash-base")
    prepared_root = copy_tree(real_sample[0], base / "prepared")
    prepare(prepared_root, real_sample[1])
    clean = copy_tree(prepared_root, base / "clean")
    assert cli("gc", str(clean), *GC_ARGS).returncode == 0
    return prepared_root, content(registry_snapshot(clean))


@pytest.fixture
def crash_tree(prepared: tuple[Path, Content],
               tmp_path: Path) -> CrashTree:
    """(a private copy to kill gc in, its snapshot, the content an uninterrupted gc leaves)."""
    root = copy_tree(prepared[0], tmp_path / "root")
    return root, registry_snapshot(root), prepared[1]


@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: f"{p[0]}-{p[1].strip('/')}-{p[2]}-{p[3]}")
def test_killed_gc_then_gc_again_finishes(crash_tree: CrashTree,
                                          point: tuple[str, str, int, str]) -> None:
    root, _, after_clean_gc = crash_tree
    killed = killed_gc(root, point)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert errors_after(root) == []  # every tagged image is complete
    again = cli("gc", str(root), *GC_ARGS)
    assert again.returncode == 0, again.stderr
    assert "recovered:" in again.stderr
    assert content(registry_snapshot(root)) == after_clean_gc
    assert errors_after(root) == []


@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: f"{p[0]}-{p[1].strip('/')}-{p[2]}-{p[3]}")
def test_killed_gc_then_undo_restores(crash_tree: CrashTree,
                                      point: tuple[str, str, int, str]) -> None:
    root, before, _ = crash_tree
    killed = killed_gc(root, point)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    undone = cli("undo", str(root))
    assert undone.returncode == 0, undone.stderr
    assert registry_snapshot(root) == before


def test_killed_gc_leaves_a_tree_the_real_registry_serves(
        crash_tree: CrashTree, sample_info: SampleInfo, tmp_path: Path) -> None:
    root, _, _ = crash_tree
    killed = killed_gc(root, ("rename_noreplace", "blobs/", 3, "after"))
    assert killed.returncode == -signal.SIGKILL
    survivors = {r: t for r, t in sample_info.tags.items() if r != sample_info.zstd[0]}
    with realtools.RealRegistry(root) as reg:
        pulled = realtools.pull_every_tag(reg, tmp_path / "pulled")
        assert sorted(pulled) == sorted(f"{r}:{t}" for r, tags in survivors.items() for t in tags)


def test_ctrl_c_stops_cleanly_between_batches(crash_tree: CrashTree) -> None:
    root, before, after_clean_gc = crash_tree
    stopped = killed_gc(root, ("rename_noreplace", "/_layers/", 1, "ctrl-c"))
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert errors_after(root) == []
    runs = json.loads(cli("runs", str(root), "--json").stdout)["runs"]
    assert [r["status"] for r in runs] == ["complete"] and "stopped on request" in runs[0]["note"]
    rest = json.loads(cli("gc", str(root), *GC_ARGS[:-1], "--json").stdout)
    assert rest["blobs"] and not rest["layer_links"]  # stopped after the layer-link batch
    again = cli("gc", str(root), *GC_ARGS)  # the rest, in a second run
    assert again.returncode == 0, again.stderr
    assert content(registry_snapshot(root)) == after_clean_gc
    for _ in range(2):
        assert cli("undo", str(root)).returncode == 0
    assert registry_snapshot(root) == before
