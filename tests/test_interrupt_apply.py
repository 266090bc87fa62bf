"""Ctrl-C and kill -9 in the middle of the commands that change the tree: gc --apply,
rm --apply, import --apply and undo, each a real subprocess signalled once its journal
shows it is partway through.

After the signal: every image that was whole is whole (an independent oracle reads the
files), Ctrl-C exits 130 at a safe point, and the journal lets the next run finish the job
(the same tree as an uninterrupted run) or `undo` put every byte back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.hostile import (
    GC,
    add_orphan_blobs,
    all_refs,
    assert_clean_exit,
    intact_images,
    run_cli,
    signal_midway,
    strict_json,
    undo_everything,
    why_not_pullable,
)
from tests.realtools import OCILayoutWriter, SampleInfo
from tests.support.snapshot import content_snapshot

ORPHANS = 1500


def check_signalled(result: subprocess.CompletedProcess[bytes], sig: signal.Signals, what: str) -> None:
    if sig is signal.SIGKILL:
        assert result.returncode in (-signal.SIGKILL, 0), f"{what}: exit {result.returncode}"
        return
    assert_clean_exit(result, (130, 0), what)  # 0: it finished before the signal landed
    if "--json" in result.args:
        strict_json(result.stdout)


@pytest.fixture(scope="module")
def gc_work(real_sample: tuple[Path, SampleInfo],
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The sample plus ORPHANS unreferenced blobs; its content, and the content an
    uninterrupted gc leaves."""
    base = tmp_path_factory.mktemp("gc-work")
    tree = base / "tree"
    shutil.copytree(real_sample[0], tree, symlinks=True)
    add_orphan_blobs(tree, ORPHANS)
    reference = base / "reference"
    shutil.copytree(tree, reference, symlinks=True)
    assert_clean_exit(run_cli("gc", str(reference), *GC), (0,), "reference gc")
    return tree, content_snapshot(tree / "docker"), content_snapshot(reference / "docker")


@settings(max_examples=4, deadline=None)
@given(sig=st.sampled_from([signal.SIGINT, signal.SIGKILL]), after=st.integers(1, ORPHANS + 20))
def test_gc_signalled_at_a_random_point(gc_work: tuple[Path, dict[str, str], dict[str, str]],
                                        tmp_path_factory: pytest.TempPathFactory,
                                        real_sample: tuple[Path, SampleInfo],
                                        sig: signal.Signals, after: int) -> None:
    tree, original, collected = gc_work
    refs = all_refs(real_sample[1])
    root = tmp_path_factory.mktemp("gc-signal") / "root"
    shutil.copytree(tree, root, symlinks=True)
    result = signal_midway(["gc", str(root), *GC, "--json"], root, sig, after)
    check_signalled(result, sig, f"gc --apply after {sig.name} at intent {after}")
    if sig is signal.SIGINT and result.returncode == 130:
        assert strict_json(result.stdout)["apply"]["interrupted"] is True
    assert intact_images(root, refs) == set(refs)
    again = run_cli("gc", str(root), *GC, "--json")
    assert_clean_exit(again, (0,), "gc after the signal")
    if sig is signal.SIGKILL and result.returncode != 0:
        assert strict_json(again.stdout)["recovered"], "the killed run was not recovered"
    assert content_snapshot(root / "docker") == collected
    undo_everything(root)
    assert content_snapshot(root / "docker") == original


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_undo_signalled_midway(gc_work: tuple[Path, dict[str, str], dict[str, str]], tmp_path: Path,
                               real_sample: tuple[Path, SampleInfo], sig: signal.Signals) -> None:
    tree, original, _collected = gc_work
    refs = all_refs(real_sample[1])
    root = tmp_path / "root"
    shutil.copytree(tree, root, symlinks=True)
    assert_clean_exit(run_cli("gc", str(root), *GC), (0,), "gc")
    result = signal_midway(["undo", str(root)], root, sig, ORPHANS // 3, event="undo-intent")
    check_signalled(result, sig, f"undo after {sig.name}")
    assert intact_images(root, refs) == set(refs)
    finish = run_cli("undo", str(root))
    assert_clean_exit(finish, (0, 3), "undo again")
    if finish.returncode == 3:  # the first undo had finished after all: nothing left to undo
        assert b"nothing" in finish.stderr.lower() or b"no run" in finish.stderr.lower(), finish.stderr
    assert content_snapshot(root / "docker") == original


@pytest.fixture(scope="module")
def many_blobs_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout with 150 images of 3 small layers each (600 blobs to write)."""
    writer = OCILayoutWriter(tmp_path_factory.mktemp("many") / "layout")
    for i in range(150):
        layers = [writer.add_layer({f"f{i}-{j}.txt": f"{i} {j}".encode()}, "none") for j in range(3)]
        writer.add_image(layers, tag=f"t{i}", history=[f"ADD {j}" for j in range(3)])
    return writer.path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_import_signalled_midway(sample_root: Path, sample_info: SampleInfo, many_blobs_layout: Path,
                                 sig: signal.Signals) -> None:
    refs = all_refs(sample_info)
    original = content_snapshot(sample_root / "docker")
    args = ["import", str(sample_root), str(many_blobs_layout), "--repo", "many/images", "--apply"]
    result = signal_midway(args, sample_root, sig, 200)
    check_signalled(result, sig, f"import after {sig.name}")
    assert intact_images(sample_root, refs) == set(refs)
    if sig is signal.SIGINT and result.returncode == 130:
        assert content_snapshot(sample_root / "docker") == original, "an interrupted import stays"
    again = run_cli(*args)
    assert_clean_exit(again, (0,), "import after the signal")
    imported = [("many/images", f"t{i}") for i in range(150)]
    assert intact_images(sample_root, imported) == set(imported)
    assert intact_images(sample_root, refs) == set(refs)
    undo_everything(sample_root)
    assert content_snapshot(sample_root / "docker") == original


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_rm_signalled_midway(sample_root: Path, sample_info: SampleInfo, sig: signal.Signals) -> None:
    """rm of 600 tags (each its own directory move), signalled after 150."""
    repo = "library/base"
    digest = sample_info.tags[repo]["latest"]
    tags_dir = sample_root / "docker/registry/v2/repositories" / repo / "_manifests/tags"
    extra = [f"extra-{i:04d}" for i in range(600)]
    for tag in extra:
        (tags_dir / tag / "current").mkdir(parents=True)
        (tags_dir / tag / "current" / "link").write_text(digest)
        index = tags_dir / tag / "index" / "sha256" / digest[7:]
        index.mkdir(parents=True)
        (index / "link").write_text(digest)
    refs = all_refs(sample_info)
    original = content_snapshot(sample_root / "docker")
    result = signal_midway(["rm", str(sample_root), *(f"{repo}:{t}" for t in extra), "--apply"],
                           sample_root, sig, 150)
    check_signalled(result, sig, f"rm after {sig.name}")
    assert intact_images(sample_root, refs) == set(refs)
    remaining = [t for t in extra if (tags_dir / t).exists()]
    assert all(why_not_pullable(sample_root, repo, t) is None for t in remaining)
    if result.returncode != 0:
        assert 0 < len(remaining) < len(extra) or sig is signal.SIGKILL
    undo_everything(sample_root)
    assert content_snapshot(sample_root / "docker") == original
    assert os.path.isdir(tags_dir / extra[-1])
