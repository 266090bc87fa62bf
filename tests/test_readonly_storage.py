"""Read-only storage: a tree on a read-only mount (a snapshot, a `ro` volume, a backup).

Everything that only reads works there and says the same as on the writable tree; every
command that would change the tree refuses with one line and exit 3, touching nothing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from regfsck import layout
from tests.hostile import (
    assert_clean_exit,
    readonly_root,
    run_cli,
    run_many,
    strict_json,
)
from tests.realtools import SampleInfo
from tests.support import V2
from tests.support.snapshot import snapshot


@pytest.fixture(scope="module")
def archive(real_sample: tuple[Path, SampleInfo], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """library/base:latest as an oci-archive, for import."""
    path = tmp_path_factory.mktemp("archive") / "base.tar"
    exported = run_cli("export", str(real_sample[0]), "library/base:latest", "-o", str(path),
                       "--format", "oci-archive")
    assert_clean_exit(exported, (0,), "export")
    return path


def damage_a_little(root: Path, info: SampleInfo) -> None:
    """Some findings worth comparing: a bad link, a flipped byte, a missing layer link."""
    repo, _manifest, layer = info.zstd
    (root / V2 / layout.revision_link("a/b", info.tags["a/b"]["latest"])).write_bytes(b"junk\n")
    data = root / V2 / layout.blob_data(info.shared_layers[0])
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF
    data.write_bytes(bytes(raw))
    (root / V2 / layout.layer_link(repo, layer)).unlink()


def findings_of(result: subprocess.CompletedProcess[bytes]) -> list[tuple[str, str, str]]:
    doc = strict_json(result.stdout)
    return sorted((f["kind"], f["path"], f["message"]) for f in doc["findings"])


def test_verify_on_a_readonly_mount_finds_the_same(sample_root: Path, sample_info: SampleInfo,
                                                    tmp_path: Path) -> None:
    damage_a_little(sample_root, sample_info)
    writable = run_cli("verify", str(sample_root), "--json")
    assert_clean_exit(writable, (1,), "verify (writable)")
    before = snapshot(sample_root)
    with readonly_root(sample_root, tmp_path) as (ro, prefix):
        readonly = run_cli("verify", str(ro), "--json", prefix=prefix)
        human = run_cli("verify", str(ro), prefix=prefix)
        scanned = run_cli("scan", str(ro), "--json", prefix=prefix)
        no_data = run_cli("verify", str(ro), "--no-data", "--json", prefix=prefix)
    assert_clean_exit(readonly, (1,), "verify (read-only)")
    assert findings_of(readonly) == findings_of(writable)
    ro_summary = strict_json(readonly.stdout)["summary"]
    assert ro_summary["blobs_verified"] == strict_json(writable.stdout)["summary"]["blobs_verified"]
    assert_clean_exit(human, (1,), "verify (read-only, for people)")
    assert b"blob_digest_mismatch" in human.stdout
    assert_clean_exit(scanned, (0,), "scan (read-only)")
    assert_clean_exit(no_data, (1,), "verify --no-data (read-only)")
    assert snapshot(sample_root) == before


def test_incremental_verify_on_a_readonly_mount(sample_root: Path, tmp_path: Path) -> None:
    """Without a record it cannot keep one: a clear refusal. With the record a writable run
    left, it reads it and hashes only what changed, writing nothing."""
    with readonly_root(sample_root, tmp_path / "first") as (ro, prefix):
        refused = run_cli("verify", str(ro), "--changed-only", "--json", prefix=prefix)
    assert_clean_exit(refused, (3,), "verify --changed-only without a record")
    assert refused.stderr.count(b"\n") == 1 and b"record" in refused.stderr
    first = run_cli("verify", str(sample_root), "--changed-only", "--json")
    assert_clean_exit(first, (0,), "verify --changed-only (writable, builds the record)")
    before = snapshot(sample_root)
    with readonly_root(sample_root, tmp_path / "second") as (ro, prefix):
        again = run_cli("verify", str(ro), "--changed-only", "--json", prefix=prefix)
    assert_clean_exit(again, (0,), "verify --changed-only (read-only, record present)")
    summary = strict_json(again.stdout)["summary"]
    if ro.name == "ro-mount":  # same inodes and ctimes: a chmod'ed copy would look all new
        assert summary["blobs_verified"] < strict_json(first.stdout)["summary"]["blobs_verified"]
    assert snapshot(sample_root) == before


def test_every_reader_works_on_a_readonly_mount(sample_root: Path, sample_info: SampleInfo,
                                                tmp_path: Path, archive: Path) -> None:
    before = snapshot(sample_root)
    out = tmp_path / "out"
    out.mkdir()
    with readonly_root(sample_root, tmp_path) as (ro, prefix):
        runs = {
            "inspect": ("inspect", str(ro), "library/base:latest", "--json"),
            "why": ("why", str(ro), sample_info.shared_layers[0], "--json"),
            "gc plan": ("gc", str(ro), "--grace", "0", "--json"),
            "rm plan": ("rm", str(ro), "library/base:1.0", "--json"),
            "import plan": ("import", str(ro), str(archive), "--repo", "copied/base", "--json"),
            "repair plan": ("repair", str(ro), "--json"),
            "runs": ("runs", str(ro), "--json"),
            "export": ("export", str(ro), "multi/oci:latest", "-o", str(out / "multi"),
                       "--format", "oci"),
        }
        results = run_many(runs, prefix=prefix, timeout=120)
    for name, result in results.items():
        assert_clean_exit(result, (0,), f"{name} on a read-only mount")
        if "--json" in runs[name]:
            strict_json(result.stdout)
    assert (out / "multi" / "index.json").is_file()
    plan = strict_json(results["gc plan"].stdout)
    assert {b["digest"] for b in plan["blobs"]} == set(sample_info.unreferenced_blobs)
    assert snapshot(sample_root) == before


MUTATIONS = {
    "gc --apply": ("gc", "{root}", "--grace", "0", "--uploads-older-than", "0", "--apply"),
    "rm --apply": ("rm", "{root}", "library/base:1.0", "--apply"),
    "import --apply": ("import", "{root}", "{archive}", "--repo", "copied/base", "--apply"),
    "repair --apply": ("repair", "{root}", "--apply"),
    "undo": ("undo", "{root}"),
    "purge --apply": ("purge", "{root}", "--older-than", "0", "--apply"),
}


@pytest.mark.parametrize(("command", "with_state"), [
    *((command, True) for command in sorted(MUTATIONS)),
    ("gc --apply", False), ("undo", False),
], ids=lambda v: v if isinstance(v, str) else ("after-a-run" if v else "fresh"))
def test_mutating_commands_refuse_on_a_readonly_mount(sample_root: Path, sample_info: SampleInfo,
                                                      tmp_path: Path, archive: Path, command: str,
                                                      with_state: bool) -> None:
    """Exit 3, one line naming the problem, nothing changed: with the lock file, a finished
    gc run and its quarantine already there, and (for two) with no regfsck-state/ yet."""
    if with_state:
        assert_clean_exit(run_cli("gc", str(sample_root), "--grace", "0", "--apply"), (0,), "gc")
    # Something for repair to fix, so that it really tries to write.
    (sample_root / V2 / layout.revision_link("a/b", sample_info.tags["a/b"]["latest"])).write_bytes(b"")
    before = snapshot(sample_root)
    with readonly_root(sample_root, tmp_path) as (ro, prefix):
        args = [a.format(root=ro, archive=archive) for a in MUTATIONS[command]]
        result = run_cli(*args, prefix=prefix, timeout=120)
    assert_clean_exit(result, (3,), f"{command} on a read-only mount")
    err = result.stderr.decode()
    assert err.count("\n") == 1, err
    assert "Read-only file system" in err or "Permission denied" in err, err
    assert snapshot(sample_root) == before
