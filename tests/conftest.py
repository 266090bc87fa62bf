"""Shared fixtures: registry trees written by the real registry, copied per test."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests import realtools
from tests.support import REPO_ROOT, objectstore
from tests.support.deep_images import Crafted, build_crafted
from tests.support.tree import copy_tree

FIXTURE_ROOT = REPO_ROOT / "fixtures" / "registry"

settings.register_profile("ci", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


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


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Crafted:
    """Images with one defect each that only `verify --deep` sees (tests/support/deep_images.py)."""
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(f"real registry tools unavailable: {missing}")
    return build_crafted(tmp_path_factory.mktemp("deep"))


@pytest.fixture(scope="module")
def moto() -> Iterator[objectstore.MotoServer]:
    """An S3 API server (moto) on loopback for the test module (tests/support/objectstore.py)."""
    missing = objectstore.moto_missing()
    if missing:
        pytest.skip(missing)
    with objectstore.MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def azurite() -> Iterator[objectstore.Azurite]:
    """An Azure Blob server (Azurite) on loopback for the test module."""
    missing = objectstore.azurite_missing()
    if missing:
        pytest.skip(missing)
    with objectstore.Azurite() as server:
        yield server


@pytest.fixture(scope="module")
def bucket28(moto: objectstore.MotoServer,
             real_sample: tuple[Path, realtools.SampleInfo]) -> objectstore.Bucket:
    """A bucket the real registry 2.8 filled through its s3 driver (the sample's images, one
    image deleted through the API, one upload left open): objectstore.push_into_bucket."""
    return objectstore.push_into_bucket(moto, real_sample[0], "2.8", "regfsck-v28")


@pytest.fixture(scope="module")
def bucket3(moto: objectstore.MotoServer,
            real_sample: tuple[Path, realtools.SampleInfo]) -> objectstore.Bucket:
    """The same written by registry 3 (skipped when its binary is absent)."""
    return objectstore.push_into_bucket(moto, real_sample[0], "3", "regfsck-v3")


@pytest.fixture
def running_registry() -> Iterator[type[realtools.RealRegistry]]:
    """The RealRegistry class, skipping when the binaries are absent."""
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(f"real registry tools unavailable: {missing}")
    yield realtools.RealRegistry


# The fast tier, `python -m pytest -m "not realtools and not slow"` (README), runs in well
# under a minute: it leaves out every test that needs the real registry tools and every test
# marked slow. A test needs the real tools when it takes one of these fixtures (or its
# module says `pytestmark = pytest.mark.realtools`); it is slow when its module is listed
# below (it fuzzes, sends signals, mounts filesystems, builds images or drives a browser)
# or it carries `@pytest.mark.slow` itself (measured: `--durations=0`, over ~1 s). CI runs
# everything.
REAL_TOOL_FIXTURES = frozenset({"real_sample", "sample_root", "sample_info", "running_registry",
                                "crafted"})
SLOW_MODULES = frozenset({
    "test_container", "test_fuzz_gc", "test_fuzz_sequences", "test_fuzz_verify",
    "test_hostile_manifests", "test_hostile_paths", "test_interrupt_apply",
    "test_interrupt_verify", "test_readonly_failing_writes", "test_readonly_storage",
    "test_scan_html", "test_s3", "test_synthetic", "test_realtools_smoke",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_TOOL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realtools)
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""  # type: ignore[attr-defined]
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
