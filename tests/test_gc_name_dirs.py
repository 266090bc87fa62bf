"""Empty name directories under repositories/ (a namespace a crash left behind, empty
directories anywhere in the namespace tree): gc's plan removes exactly those holding
nothing at all and older than the grace, children before their parent, judged from what
the walk saw; serial and process-parallel walks agree.

The oracle is the rule itself, applied by listing the tree: a directory below
repositories/ is removable when it is older than the grace and every entry in it is a
directory whose name does not start with "_" and which is removable itself.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regfsck.gc import GcOptions, plan_gc
from regfsck.root import locate
from tests import realtools
from tests.support import V2

GRACE = timedelta(hours=1)
OLD = time.time() - 3 * 3600


def _removable(repositories: Path, cutoff_ns: int) -> list[str]:
    """The rule, by listing the tree (depth first, sorted, each directory as it is left)."""
    found: list[str] = []

    def walk(path: Path) -> bool:
        empty = True
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if (not entry.is_dir(follow_symlinks=False) or entry.name.startswith("_")
                    or not walk(Path(entry.path))):
                empty = False
        if not empty or path == repositories or path.lstat().st_mtime_ns > cutoff_ns:
            return False
        found.append(str(path.relative_to(repositories.parent)))
        return True

    walk(repositories)
    return found


def _plant(root: Path, dirs: list[str], young: set[str], files: set[str],
           links: set[str]) -> None:
    """`dirs` under repositories/ (with a file or a symbolic link in some), every
    directory old but those in `young` (set last: creating a child changes the time)."""
    repositories = root / V2 / "repositories"
    for rel in dirs:
        (repositories / rel).mkdir(parents=True, exist_ok=True)
    for rel in files:
        (repositories / rel / "stray.txt").write_text("x")
    for rel in links:
        (repositories / rel / "elsewhere").symlink_to("/tmp")
    made = {str(parent) for d in dirs for parent in (Path(d), *Path(d).parents)} - {"."}
    for rel in sorted(made, key=len, reverse=True):
        os.utime(repositories / rel, (OLD, OLD), follow_symlinks=False)
    for rel in young:
        os.utime(repositories / rel)


def _name_dirs_in_plan(root: Path, processes: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("REGFSCK_SCAN_PROCESSES", processes)
    plan = plan_gc(locate(root), GcOptions(grace=GRACE))
    # The plan's empty link directories also hold the `_layers`/`_manifests` leaves the
    # walk found empty (none in this tree); name directories are the others.
    return [d for d in plan.empty_link_dirs if "/_" not in d]


def _cutoff_ns() -> int:
    return time.time_ns() - int(GRACE.total_seconds() * 1e9)


def test_empty_name_directories_and_only_those_go_children_first(
        fixture_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = ["ghost", "deep/a/b/c", "mixed/empty", "mixed/full", "young/old-child",
            "old/young-child", "library/base/nested-empty", "library/empty-beside-a-repo",
            "with-link/x", "a/b/c/empty"]
    _plant(fixture_root, dirs, young={"young", "old/young-child"}, files={"mixed/full"},
           links={"with-link"})
    expected = _removable(fixture_root / V2 / "repositories", _cutoff_ns())
    assert expected == [
        "repositories/a/b/c/empty", "repositories/deep/a/b/c", "repositories/deep/a/b",
        "repositories/deep/a", "repositories/deep", "repositories/ghost",
        "repositories/library/base/nested-empty", "repositories/library/empty-beside-a-repo",
        "repositories/mixed/empty", "repositories/with-link/x", "repositories/young/old-child"]
    for processes in ("1", "3"):
        assert _name_dirs_in_plan(fixture_root, processes, monkeypatch) == expected, processes


_names = st.sampled_from(["n", "m", "_u", "a", "library", "base", "z"])


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(st.lists(_names, min_size=1, max_size=4).map("/".join), max_size=8),
       data=st.data())
def test_the_plan_removes_what_the_rule_says(
        paths: list[str], data: st.DataObject, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Random directory trees planted among the fixture's real repositories (inside them
    too), some young, some holding a file or a symbolic link."""
    root = realtools.materialize_fixture(
        Path(__file__).resolve().parent.parent / "fixtures" / "registry",
        tmp_path_factory.mktemp("names") / "root")
    dirs = [p for p in paths if not (root / V2 / "repositories" / p).exists()
            or (root / V2 / "repositories" / p).is_dir()]
    subset = st.sets(st.sampled_from(dirs)) if dirs else st.just(set())
    young, files, links = data.draw(subset), data.draw(subset), data.draw(subset)
    _plant(root, dirs, young, files, links)
    expected = _removable(root / V2 / "repositories", _cutoff_ns())
    for processes in ("1", "2"):
        assert _name_dirs_in_plan(root, processes, monkeypatch) == expected, processes
