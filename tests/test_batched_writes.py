"""Batched writes (`Run.batch`) killed mid-batch: `import --apply` and `repair --apply` of
hundreds of files (several batches of BATCH changes), SIGKILLed at every kind of point of
a batch after the first: while the new files are written ahead (nothing journaled yet),
right after the batch's one flush (all journaled, nothing applied), between a directory
made and its file, between owner change and rename, and after half the renames.

After each kill the journal and the disk together must say exactly what happened:
`recover` reverts the run to the tree as it was (byte for byte, the real registry serves
every tag), leaves nothing written ahead behind, the command run again finishes the job,
and `undo` of everything puts the original tree back.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from regfsck.quarantine import BATCH, QUARANTINE_DIR, list_runs
from regfsck.root import locate
from tests import realtools
from tests.hostile import all_refs, assert_clean_exit, intact_images, run_cli, undo_everything
from tests.realtools import OCILayoutWriter, SampleInfo
from tests.support.cli import run_killed
from tests.support.sessions import recover
from tests.support.snapshot import content_snapshot
from tests.support.tree import copy_tree

pytestmark = pytest.mark.realtools

# x (3 layers + config + manifest) blobs, and their links: 3,300 files, more than three
# batches; 1,200 link rewrites to repair (two changes each): more than two batches.
IMAGES = 300
REPO = "many/images"


Point = tuple[str, str, int, str]
MIDDLE = BATCH + BATCH // 2  # a file of the second batch, halfway through it
# A link rewrite is two changes (the old link out, the new one in): the rewrite halfway
# through the second batch.
REWRITE_MIDDLE = 3 * BATCH // 4

# (storage method, substring of its path argument, which matching call, before/after it)
POINTS: list[Point] = [
    ("write_new_file", "/new/", MIDDLE, "after"),  # writing ahead: batch 2 not journaled yet
    ("sync_all", "", 2, "after"),  # batch 2 journaled and durable, none of it applied
    ("move", "/new/", BATCH + 1, "before"),  # the same, seen from its first rename
    ("make_dir", "/blobs/sha256/", MIDDLE, "after"),  # a blob's directory made, not its file
    ("adopt", "/new/", MIDDLE, "after"),  # a new file given its owner, not renamed yet
    ("move", "/new/", MIDDLE, "after"),  # half of batch 2 in place, no "done" journaled
]


def killed(point: Point, *args: str) -> subprocess.CompletedProcess[str]:
    return run_killed("regfsck.storage.FilesystemStorage", point, *args, timeout=300)


def point_id(point: Point) -> str:
    return f"{point[0]}-{point[1].strip('/') or 'fs'}-{point[2]}-{point[3]}"


@pytest.fixture(scope="module")
def many_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    writer = OCILayoutWriter(tmp_path_factory.mktemp("many") / "layout")
    for i in range(IMAGES):
        layers = [writer.add_layer({f"f{i}-{j}.txt": f"{i} {j}".encode() * (j + 1)}, "none")
                  for j in range(3)]
        writer.add_image(layers, tag=f"t{i}", history=[f"ADD {j}" for j in range(3)])
    return writer.path


def imported_refs() -> list[tuple[str, str]]:
    return [(REPO, f"t{i}") for i in range(IMAGES)]


def assert_reverted_exactly(root: Path, original: dict[str, tuple[str, str]]) -> None:
    """`recover` puts back the tree as it was and leaves no file written ahead."""
    messages = recover(locate(root))
    assert len(messages) == 1 and "reverted" in messages[0], messages
    assert content_snapshot(root / "docker") == original
    assert not list((root / QUARANTINE_DIR).glob("*/new/*"))
    assert list_runs(locate(root))[-1].status == "reverted"


@pytest.mark.parametrize("point", POINTS, ids=point_id)
def test_import_killed_mid_batch(sample_root: Path, sample_info: SampleInfo, many_layout: Path,
                                 point: Point) -> None:
    refs = all_refs(sample_info)
    original = content_snapshot(sample_root / "docker")
    args = ["import", str(sample_root), str(many_layout), "--repo", REPO, "--apply"]
    result = killed(point, *args)
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert intact_images(sample_root, refs) == set(refs)
    assert_reverted_exactly(sample_root, original)
    again = run_cli(*args, timeout=300)
    assert_clean_exit(again, (0,), "import after the kill")
    assert intact_images(sample_root, imported_refs()) == set(imported_refs())
    undo_everything(sample_root)
    assert content_snapshot(sample_root / "docker") == original


def test_killed_import_leaves_a_tree_the_real_registry_serves(
        sample_root: Path, sample_info: SampleInfo, many_layout: Path, tmp_path: Path) -> None:
    result = killed(("move", "/new/", MIDDLE, "after"), "import", str(sample_root),
                    str(many_layout), "--repo", REPO, "--apply")
    assert result.returncode == -signal.SIGKILL
    recover(locate(sample_root))
    with realtools.RealRegistry(sample_root) as reg:
        pulled = realtools.pull_every_tag(reg, tmp_path / "pulled")
    assert sorted(pulled) == sorted(f"{r}:{t}" for r, tags in sample_info.tags.items() for t in tags)


@pytest.fixture(scope="module")
def damaged(real_sample: tuple[Path, SampleInfo], many_layout: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample with the many images imported, then every one of their `_layers` and
    revision links holding junk: hundreds of link rewrites for repair (several batches)."""
    root = copy_tree(real_sample[0], tmp_path_factory.mktemp("damaged") / "root")
    done = run_cli("import", str(root), str(many_layout), "--repo", REPO, "--apply", timeout=300)
    assert_clean_exit(done, (0,), "import")
    repo = root / "docker/registry/v2/repositories" / REPO
    links = [p for p in repo.rglob("link") if "/_layers/" in str(p) or "/revisions/" in str(p)]
    assert 2 * len(links) > 2 * BATCH  # two changes each: more than two batches
    for link in links:
        link.write_bytes(b"junk")
    return root


REPAIR_POINTS: list[Point] = [
    ("sync_all", "", 2, "after"),  # batch 2 journaled and durable, none of it applied
    ("move", "/_layers/", REWRITE_MIDDLE, "after"),  # an old link out, its new one not in yet
    ("move", "/new/", REWRITE_MIDDLE, "after"),  # half of batch 2 in place, no "done" journaled
]


@pytest.mark.parametrize("point", REPAIR_POINTS, ids=point_id)
def test_repair_killed_mid_batch(damaged: Path, tmp_path: Path, point: Point) -> None:
    root = copy_tree(damaged, tmp_path / "root")
    original = content_snapshot(root / "docker")
    result = killed(point, "repair", str(root), "--no-data", "--apply")
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert_reverted_exactly(root, original)
    again = run_cli("repair", str(root), "--no-data", "--apply", timeout=300)
    assert_clean_exit(again, (0,), "repair after the kill")
    assert intact_images(root, imported_refs()) == set(imported_refs())
    for run in list_runs(locate(root)):
        if run.command == "repair" and run.status == "complete":
            assert_clean_exit(run_cli("undo", str(root), run.run_id), (0,), "undo")
    assert content_snapshot(root / "docker") == original
