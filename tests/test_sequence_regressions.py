"""Operator sequences the randomized hunt (`test_fuzz_sequences.py` with
REGFSCK_FUZZ_RANDOM=1) found losing the undo's promise, replayed exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import realtools
from tests import test_fuzz_sequences as fuzz
from tests.realtools import SampleInfo
from tests.support.snapshot import content_snapshot
from tests.test_fuzz_sequences import World, _check, _step, undo_every_run

pytestmark = pytest.mark.realtools


@pytest.mark.skipif(bool(realtools.real_tools_missing()), reason="real registry tools unavailable")
@pytest.mark.parametrize("first_pick", [0, 29])
def test_import_repair_import_gc_import_undo_then_undo_all(
        sample_root: Path, real_sample: tuple[Path, SampleInfo], tmp_path: Path,
        first_pick: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fuzz, "event", lambda *_: None)  # hypothesis' notes: not a hypothesis test
    info = real_sample[1]
    expected = {f"{repo}:{tag}" for repo, tags in info.tags.items() for tag in tags}
    world = World(sample_root, tmp_path / "scratch", expected)
    world.scratch.mkdir()
    original = content_snapshot(sample_root / "docker")
    ops = [("import", first_pick), ("repair", 0), ("import", 29), ("gc_untagged", 0),
           ("import_again", 0), ("undo_any", 0)]
    for number, (op, pick) in enumerate(ops):
        _step(world, op, pick)
        _check(world, f"step {number} ({op})")
    undo_every_run(sample_root)
    assert content_snapshot(sample_root / "docker") == original
