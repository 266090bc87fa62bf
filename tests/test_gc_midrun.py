"""A registry started while `gc --apply` runs (issue 10, item 5).

gc is paused at exact points of its sweep (the REGFSCK_TEST_PAUSE_DIR hook of
`regfsck.sweep`) while the test starts the real registry on the tree:

* it pushes again an image whose every blob gc has queued (the layers keep their bytes and
  their mtime: only links and a revision are new) and is stopped again; gc must keep that
  image whole: it stays pullable;
* it is left running: gc must stop at its next look at /proc (exit 3), keeping what it moved
  in a journaled run that `undo` reverts to the original tree.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from regfsck import layout
from tests import realtools
from tests.realtools import RealRegistry, SampleInfo
from tests.support import V2, cli
from tests.support.cli import invoke
from tests.support.snapshot import registry_snapshot

pytestmark = pytest.mark.realtools


class PausedGc:
    """`regfsck gc --apply` in a subprocess that stops at the named points of its sweep."""

    def __init__(self, root: Path, hooks: Path, points: list[str], *extra: str) -> None:
        self.hooks = hooks
        self.points = points
        hooks.mkdir()
        for point in points:
            (hooks / f"{point}.pause").touch()
        env = cli.child_env({**realtools.clean_env(), "REGFSCK_TEST_PAUSE_DIR": str(hooks)})
        self.proc = subprocess.Popen(
            cli.command("gc", str(root), "--apply", "--grace", "0", "--uploads-older-than", "0",
                        "--json", *extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def wait_for(self, point: str) -> None:
        deadline = time.monotonic() + 120
        while not (self.hooks / f"{point}.reached").exists():
            assert self.proc.poll() is None, f"gc ended before {point}: {self.proc.communicate()}"
            assert time.monotonic() < deadline, f"gc never reached {point}"
            time.sleep(0.02)

    def go(self, *points: str) -> None:
        for point in points:
            (self.hooks / f"{point}.go").touch()

    def finish(self) -> tuple[int, str, str]:
        self.go(*self.points)
        out, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, out, err


def doomed_image(root: Path, info: SampleInfo) -> tuple[bytes, str, list[bytes]]:
    """The manifest DELETEd through the API when the sample was built, and its blobs (those
    no other image shares are unreferenced now: gc queues them)."""
    _, _, digest = info.deleted
    body = realtools.read_stored_blob(root, digest)
    blobs = [realtools.read_stored_blob(root, d) for d in realtools.manifest_references(body)]
    return body, info.media_types[digest], blobs


def test_image_pushed_again_between_the_mark_and_the_moves_stays_pullable(
        sample_root: Path, sample_info: SampleInfo, tmp_path: Path) -> None:
    body, media_type, blobs = doomed_image(sample_root, sample_info)
    plan = json.loads(invoke("gc", str(sample_root), "--grace", "0", "--json",
                             env=realtools.clean_env()).stdout)
    queued = [d for b in blobs if (d := realtools.sha256_digest(b)) in
              {v["digest"] for v in plan["blobs"]}]
    assert queued  # its layers nothing else uses
    mtimes = {d: (sample_root / V2 / layout.blob_data(d)).stat().st_mtime_ns for d in queued}

    gc = PausedGc(sample_root, tmp_path / "hooks", ["blobs.0"])
    try:
        # The blob phase has re-marked; its first batch is about to move.
        gc.wait_for("blobs.0")
        with RealRegistry(sample_root) as registry:
            for blob in blobs:
                registry.put_blob("again/doomed", blob)
            registry.put_manifest("again/doomed", "back", body, media_type)
        for digest in queued:  # the registry kept the bytes it had: nothing new to see there
            assert (sample_root / V2 / layout.blob_data(digest)).stat().st_mtime_ns == mtimes[digest]
    finally:
        code, out, err = gc.finish()
    assert code == 0, err
    skipped = {s["path"] for s in json.loads(out)["apply"]["skipped"]}
    assert {f"{V2}/{layout.blob_dir(d)}" for d in queued} <= skipped
    with RealRegistry(sample_root) as registry:
        realtools.skopeo_copy(f"docker://{registry.host}/again/doomed:back", f"dir:{tmp_path / 'pulled'}")
        assert realtools.pull_every_tag(registry, tmp_path / "all")


def test_registry_started_midway_stops_gc_and_the_run_undoes(
        sample_root: Path, sample_info: SampleInfo, tmp_path: Path) -> None:
    before = registry_snapshot(sample_root, mtimes="none")  # contents and modes
    gc = PausedGc(sample_root, tmp_path / "hooks", ["blobs"])
    registry = RealRegistry(sample_root)
    try:
        gc.wait_for("blobs")  # layer links have moved; the blobs are next
        registry.start()
    finally:
        code, out, err = gc.finish()
        registry.stop()
    assert code == 3, out + err
    assert "stopped after" in err and "docker-registry serve" in err
    runs = json.loads(invoke("runs", str(sample_root), "--json", env=realtools.clean_env()).stdout)
    [run] = runs["runs"] if isinstance(runs, dict) else runs
    assert run["status"] in ("interrupted", "complete")
    assert (sample_root / V2 / layout.blob_dir(sample_info.unreferenced_blobs[0])).exists()
    undone = invoke("undo", str(sample_root), run["run_id"], env=realtools.clean_env())
    assert undone.returncode == 0, undone.stderr
    assert registry_snapshot(sample_root, mtimes="none") == before
    with RealRegistry(sample_root) as registry:
        assert realtools.pull_every_tag(registry, tmp_path / "all")
