"""Writes that fail halfway: a disk that fills up (a small tmpfs taken to its last bytes) or
a directory that refuses writes, during gc, import, undo, repair and export.

Each stops with one line naming the cause (exit 3), never a traceback; leaves no
half-written file under a final name; keeps every whole image whole; and leaves a journal
from which the next run, once there is room, finishes the job (the same tree as an
uninterrupted run) or `undo` puts every byte back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from regfsck import layout
from tests.hostile import (
    GC,
    add_orphan_blobs,
    all_refs,
    assert_clean_exit,
    fill_up,
    intact_images,
    run_cli,
    small_filesystem,
    strict_json,
    undo_everything,
    unprivileged_prefix,
    why_not_pullable,
)
from tests.realtools import OCILayoutWriter, SampleInfo, pseudo_random_bytes
from tests.support import V2
from tests.support.snapshot import content_snapshot


def one_line_about(result_err: bytes, *words: str) -> str:
    text = result_err.decode()
    assert text.count("\n") == 1, text
    assert any(w in text for w in words), text
    return text


def leftovers(root: Path) -> list[str]:
    """Temporary files a writer left in the tree (the registry ignores them; we must not)."""
    return sorted(str(p.relative_to(root)) for p in (root / "docker").rglob("*")
                  if ".tmp" in p.name or p.name.startswith(".regfsck"))


@pytest.mark.parametrize("leave", [0, 8192, 65536])
def test_gc_on_a_disk_that_fills_up(real_sample: tuple[Path, SampleInfo], tmp_path: Path,
                                    leave: int) -> None:
    sample, info = real_sample
    with small_filesystem(tmp_path / "fs") as fs:
        root = fs / "root"
        shutil.copytree(sample, root, symlinks=True)
        add_orphan_blobs(root, 400)
        reference = tmp_path / "reference"
        shutil.copytree(root, reference, symlinks=True)
        assert_clean_exit(run_cli("gc", str(reference), *GC), (0,), "reference gc")
        refs = all_refs(info)
        whole = intact_images(root, refs)
        before = content_snapshot(root / "docker")
        filler = fill_up(fs, leave)
        result = run_cli("gc", str(root), *GC)
        assert_clean_exit(result, (0, 3), f"gc with {leave} bytes free")
        if result.returncode == 3:
            one_line_about(result.stderr, "No space left on device")
        assert intact_images(root, refs) == whole
        assert leftovers(root) == []
        filler.unlink()
        again = run_cli("gc", str(root), *GC)
        assert_clean_exit(again, (0,), "gc once there is room")
        assert content_snapshot(root / "docker") == content_snapshot(reference / "docker")
        undo_everything(root)
        assert content_snapshot(root / "docker") == before


@pytest.fixture(scope="module")
def big_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout with one 6 MiB layer and one tiny one, tagged `big`."""
    writer = OCILayoutWriter(tmp_path_factory.mktemp("big") / "layout")
    small = writer.add_layer({"a.txt": b"hello"}, "none")
    big = writer.add_layer({"big.bin": pseudo_random_bytes("big", 6 << 20)}, "none")
    writer.add_image([small, big], tag="big")
    return writer.path


@pytest.mark.parametrize("leave", [0, 1 << 20, 4 << 20])
def test_import_on_a_disk_that_fills_up(real_sample: tuple[Path, SampleInfo], big_layout: Path,
                                        tmp_path: Path, leave: int) -> None:
    sample, info = real_sample
    with small_filesystem(tmp_path / "fs") as fs:
        root = fs / "root"
        shutil.copytree(sample, root, symlinks=True)
        refs = all_refs(info)
        before = content_snapshot(root / "docker")
        filler = fill_up(fs, leave)
        result = run_cli("import", str(root), str(big_layout), "--repo", "big/one", "--apply")
        assert_clean_exit(result, (3,), f"import with {leave} bytes free")
        # import checks free space first ("not enough free space ... nothing was written");
        # a disk that fills during the write anyway ends on the write error itself.
        one_line_about(result.stderr, "not enough free space", "No space left on device")
        assert content_snapshot(root / "docker") == before, "a failed import left changes"
        assert leftovers(root) == []
        assert intact_images(root, refs) == set(refs)
        filler.unlink()
        done = run_cli("import", str(root), str(big_layout), "--repo", "big/one", "--apply")
        assert_clean_exit(done, (0,), "import once there is room")
        assert why_not_pullable(root, "big/one", "big") is None
        assert intact_images(root, refs) == set(refs)


@pytest.mark.parametrize("output", ["multi", "multi.tar", "multi.tar.zst", "multi.tar.gz"])
def test_export_to_a_disk_that_fills_up(real_sample: tuple[Path, SampleInfo], tmp_path: Path,
                                        output: str) -> None:
    """No file (or directory) is ever left under the final name, nor any partial one."""
    sample, _info = real_sample
    with small_filesystem(tmp_path / "fs", "4m") as fs:
        fill_up(fs, 16 << 10)
        target = fs / output
        fmt = "oci" if "." not in output else "oci-archive"
        result = run_cli("export", str(sample), "multi/oci:latest", "library/base", "a/b/c",
                         "-o", str(target), "--format", fmt)
        assert_clean_exit(result, (3,), f"export to a full disk ({output})")
        one_line_about(result.stderr, "No space left on device")
        assert sorted(p.name for p in fs.iterdir()) == ["filler"]


def test_undo_on_a_disk_that_fills_up(real_sample: tuple[Path, SampleInfo], tmp_path: Path) -> None:
    sample, info = real_sample
    with small_filesystem(tmp_path / "fs") as fs:
        root = fs / "root"
        shutil.copytree(sample, root, symlinks=True)
        add_orphan_blobs(root, 300)
        before = content_snapshot(root / "docker")
        assert_clean_exit(run_cli("gc", str(root), *GC), (0,), "gc")
        collected = content_snapshot(root / "docker")
        filler = fill_up(fs, 0)
        result = run_cli("undo", str(root))
        assert_clean_exit(result, (0, 3), "undo on a full disk")
        if result.returncode == 3:
            one_line_about(result.stderr, "No space left on device")
        else:
            assert content_snapshot(root / "docker") == before  # undo needed no new space
        # Nothing, part or all of it was put back: every image is whole either way.
        assert content_snapshot(root / "docker") != collected or result.returncode == 3
        assert intact_images(root, all_refs(info)) == set(all_refs(info))
        filler.unlink()
        undo_everything(root)
        assert content_snapshot(root / "docker") == before


def test_repair_on_a_disk_that_fills_up(real_sample: tuple[Path, SampleInfo], tmp_path: Path) -> None:
    sample, info = real_sample
    with small_filesystem(tmp_path / "fs") as fs:
        root = fs / "root"
        shutil.copytree(sample, root, symlinks=True)
        repo, manifest, _layer = info.zstd
        (root / V2 / layout.revision_link(repo, manifest)).write_bytes(b"")
        damaged = content_snapshot(root / "docker")
        filler = fill_up(fs, 0)
        result = run_cli("repair", str(root), "--apply")
        assert_clean_exit(result, (3,), "repair on a full disk")
        one_line_about(result.stderr, "No space left on device")
        assert content_snapshot(root / "docker") == damaged
        assert leftovers(root) == []
        filler.unlink()
        assert_clean_exit(run_cli("repair", str(root), "--apply"), (0,), "repair once there is room")
        assert why_not_pullable(root, repo, "latest") is None
        verified = run_cli("verify", str(root), "--json")
        assert_clean_exit(verified, (0,), "verify after the repair")


def test_gc_when_a_directory_refuses_writes(real_sample: tuple[Path, SampleInfo], tmp_path: Path) -> None:
    """Moves out of one fan-out directory fail (EACCES) in the middle of the blob phase."""
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("cannot run without the capabilities that bypass permission bits")
    sample, info = real_sample
    root = tmp_path / "root"
    shutil.copytree(sample, root, symlinks=True)
    orphans = add_orphan_blobs(root, 400)
    reference = tmp_path / "reference"
    shutil.copytree(root, reference, symlinks=True)
    assert_clean_exit(run_cli("gc", str(reference), *GC), (0,), "reference gc")
    before = content_snapshot(root / "docker")
    locked = root / V2 / "blobs" / "sha256" / orphans[200][7:9]
    os.chmod(locked, 0o555)
    try:
        result = run_cli("gc", str(root), *GC, "--json", prefix=prefix)
        assert_clean_exit(result, (0, 3), "gc with a read-only directory")
        if result.returncode == 3:
            one_line_about(result.stderr, "Permission denied")
        else:
            skipped = json.dumps(strict_json(result.stdout))
            assert "Permission denied" in skipped or orphans[200] not in skipped
        assert intact_images(root, all_refs(info)) == set(all_refs(info))
        assert (locked / orphans[200][7:] / "data").is_file()  # still there, untouched
    finally:
        os.chmod(locked, 0o755)
    again = run_cli("gc", str(root), *GC, prefix=prefix)
    assert_clean_exit(again, (0,), "gc once the directory is writable")
    assert content_snapshot(root / "docker") == content_snapshot(reference / "docker")
    undo_everything(root, prefix)
    assert content_snapshot(root / "docker") == before
