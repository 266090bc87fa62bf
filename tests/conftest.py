"""Shared fixtures: registry trees written by the real registry, copied per test."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests import realtools

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_ROOT = REPO_ROOT / "fixtures" / "registry"

settings.register_profile("ci", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def copy_tree(src: Path, dest: Path) -> Path:
    """Copy a registry root keeping mtimes and symlinks as they are."""
    shutil.copytree(src, dest, symlinks=True, copy_function=shutil.copy2)
    return dest


@pytest.fixture(scope="session")
def real_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, realtools.SampleInfo]:
    """A registry root built at test time by the real registry + skopeo (once per session)."""
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(f"real registry tools unavailable: {missing}")
    root = tmp_path_factory.mktemp("real-sample") / "root"
    info = realtools.build_sample_registry(root)
    return root, info


@pytest.fixture
def sample_root(real_sample: tuple[Path, realtools.SampleInfo], tmp_path: Path) -> Path:
    """A private copy of the real sample tree, free to damage."""
    return copy_tree(real_sample[0], tmp_path / "root")


@pytest.fixture
def sample_info(real_sample: tuple[Path, realtools.SampleInfo]) -> realtools.SampleInfo:
    return real_sample[1]


@pytest.fixture
def fixture_root(tmp_path: Path) -> Path:
    """A private copy of the shipped fixture (works without the real tools)."""
    meta = json.loads((REPO_ROOT / "fixtures" / "registry.json").read_text())
    return realtools.materialize_fixture(FIXTURE_ROOT, tmp_path / "root", meta.get("empty_dirs", []))


@pytest.fixture
def running_registry() -> Iterator[type[realtools.RealRegistry]]:
    """The RealRegistry class, skipping when the binaries are absent."""
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(f"real registry tools unavailable: {missing}")
    yield realtools.RealRegistry


# Modules too slow for the inner loop (they build trees with the real tools, fuzz, send
# signals, build images or drive a browser): `python -m pytest -m "not realtools and not
# slow"` leaves them out and runs in well under a minute; CI runs everything.
FAST_MODULES = frozenset({
    "test_parsers", "test_readme", "test_record", "test_export_refs", "test_gc_cli_runs",
    "test_deep", "test_import",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""  # type: ignore[attr-defined]
        if module not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)
