"""`regfsck repair` on registries stored in S3 (plan, --apply, --from, undo), against a real
S3 API server (moto) on loopback, with trees written by the REAL registry s3 drivers.

Each test damages a private clone of a bucket the real registry (2.8.2 or 3.1.1) filled
through its s3 driver, object by object: a truncated layer, a config with other bytes of the
same length, a missing layer, a `_layers` link holding garbage, a missing revision link, a
blob under the wrong fan-out prefix. Backups are made by real skopeo from a registry serving
the undamaged bucket (an OCI layout and an oci-archive). Then:

* the plan on the bucket equals the plan on a key-for-key mirror of it on disk (differential);
* `--apply` refuses (exit 3, nothing changed) until a registry check allows it, then mends
  every object: verify finds what it found before the damage, and a fresh s3-backed
  registry of both versions serves every tag (`skopeo copy --all` checks every digest);
* `undo` restores every key of the damaged tree byte for byte (and ETag).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import realtools
from tests.support.cli import child_env, command, run_killed
from tests.support.cli import run as regfsck
from tests.support.objectstore import (
    Bucket,
    MotoServer,
    dead_url,
    needs_server,
    push_into_bucket,
    registry3_binary,
)

QUARANTINE = "regfsck-quarantine/"


@dataclass(frozen=True)
class Backups:
    layout: Path  # skopeo oci: layout of library/base:latest (--preserve-digests)
    archive: Path  # skopeo oci-archive of compress/zstd:latest (--preserve-digests)


@dataclass
class Base:
    bucket: Bucket
    backups: Backups


def _base(moto: MotoServer, fs_root: Path, version: str, name: str, tmp: Path) -> Base:
    bucket = push_into_bucket(moto, fs_root, version, name)
    layout, archive = tmp / "layout", tmp / "zstd.tar"
    with bucket.registry() as reg:
        realtools.skopeo_copy(f"docker://{reg.host}/library/base:latest",
                              f"oci:{layout}:library/base:latest", "--preserve-digests")
        realtools.skopeo_copy(f"docker://{reg.host}/compress/zstd:latest",
                              f"oci-archive:{archive}:compress/zstd:latest", "--preserve-digests")
    return Base(bucket, Backups(layout, archive))


@pytest.fixture(scope="module")
def base28(moto: MotoServer, real_sample: tuple[Path, realtools.SampleInfo],
           tmp_path_factory: pytest.TempPathFactory) -> Base:
    return _base(moto, real_sample[0], "2.8", "regfsck-r28", tmp_path_factory.mktemp("s3-repair-28"))


@pytest.fixture(scope="module")
def base3(moto: MotoServer, real_sample: tuple[Path, realtools.SampleInfo],
          tmp_path_factory: pytest.TempPathFactory) -> Base:
    return _base(moto, real_sample[0], "3", "regfsck-r3", tmp_path_factory.mktemp("s3-repair-3"))


def run(bucket: Bucket, state: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """regfsck ... --json against the moto server, its local state under `state`."""
    proc = regfsck(*args, "--json", env={**bucket.env(), "XDG_STATE_HOME": str(state)})
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, doc, proc.stderr


def get(bucket: Bucket, rel: str) -> bytes:
    return bucket.read(bucket.key(rel))


def put(bucket: Bucket, rel: str, data: bytes) -> None:
    bucket.client().put_object(Bucket=bucket.name, Key=bucket.key(rel), Body=data)


def delete(bucket: Bucket, rel: str) -> None:
    bucket.client().delete_object(Bucket=bucket.name, Key=bucket.key(rel))


def blob(digest: str) -> str:
    hexa = digest.split(":", 1)[1]
    return f"blobs/sha256/{hexa[:2]}/{hexa}/data"


def tagged(bucket: Bucket, repo: str, tag: str) -> tuple[str, dict[str, Any]]:
    """(digest, parsed manifest) of repo:tag, read from the bucket's objects."""
    digest = get(bucket, f"repositories/{repo}/_manifests/tags/{tag}/current/link").decode()
    return digest, json.loads(get(bucket, blob(digest)))


def findings(bucket: Bucket, state: Path) -> set[tuple[str, str]]:
    code, doc, err = run(bucket, state, "verify", bucket.url)
    assert "findings" in doc, (code, err)
    return {(f["kind"], f["path"]) for f in doc["findings"]}


def damage(bucket: Bucket) -> dict[str, str]:
    """Break six objects (see the module docstring); returns what was broken, by name."""
    _, zstd = tagged(bucket, "compress/zstd", "latest")
    _, base = tagged(bucket, "library/base", "latest")
    ab_digest, _ = tagged(bucket, "a/b", "latest")
    _, abc = tagged(bucket, "a/b/c", "latest")
    truncated = zstd["layers"][-1]["digest"]
    wrong = base["config"]["digest"]
    missing = base["layers"][0]["digest"]
    garbage_link = abc["layers"][-1]["digest"]
    stray = abc["config"]["digest"]
    assert len({truncated, wrong, missing, garbage_link, stray}) == 5

    data = get(bucket, blob(truncated))
    put(bucket, blob(truncated), data[:len(data) // 2])
    data = get(bucket, blob(wrong))
    put(bucket, blob(wrong), bytes(b ^ 0x5A for b in data))  # same length, other bytes
    delete(bucket, blob(missing))
    put(bucket, f"repositories/a/b/c/_layers/sha256/{garbage_link.split(':')[1]}/link",
        b"sha256:not-a-digest\x00\n")
    delete(bucket, f"repositories/a/b/_manifests/revisions/sha256/{ab_digest.split(':')[1]}/link")
    hexa = stray.split(":")[1]
    wrong_fanout = "00" if not hexa.startswith("00") else "ff"
    put(bucket, f"blobs/sha256/{wrong_fanout}/{hexa}/data", get(bucket, blob(stray)))
    delete(bucket, blob(stray))
    return {"truncated": truncated, "wrong": wrong, "missing": missing,
            "garbage_link": garbage_link, "revision": ab_digest, "stray": stray}


def actions(doc: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fix in doc["fixes"]:
        counts[fix["action"]] = counts.get(fix["action"], 0) + 1
    return counts


EXPECTED_FIXES = {"move_blob_home": 1, "replace_blob": 2, "restore_blob": 1,
                  "rewrite_link": 1, "create_link": 1}


def _sources(backups: Backups) -> list[str]:
    return ["--from", str(backups.layout), "--from", str(backups.archive)]


@needs_server
@pytest.mark.parametrize("which", ["base28", "base3"])
def test_repair_plan_on_s3_equals_the_plan_on_disk(which: str, request: pytest.FixtureRequest,
                                                    tmp_path: Path) -> None:
    """The same damaged tree in the bucket and mirrored to disk: the same plan (fixes,
    sources, unfixable findings, lost blobs), the same exit code; the plan changes nothing."""
    base: Base = request.getfixturevalue(which)
    bucket = base.bucket.clone()
    broken = damage(bucket)
    before = bucket.everything()
    disk = bucket.mirror(tmp_path / "mirror")
    sources = _sources(base.backups)
    started = time.monotonic()
    code_s3, on_s3, err = run(bucket, tmp_path / "state", "repair", bucket.url, *sources)
    on_bucket = time.monotonic() - started
    started = time.monotonic()
    code_disk, on_disk, err_disk = run(bucket, tmp_path / "state", "repair", str(disk), *sources)
    print(f"repair plan on {which}: bucket {on_bucket:.1f}s, requests {on_s3.get('requests')}; "
          f"disk mirror {time.monotonic() - started:.1f}s")  # figures only, never asserted
    _, verified, _ = run(bucket, tmp_path / "state", "verify", bucket.url)
    print(f"verify on {which} (for comparison): requests {verified.get('requests')}")
    assert on_s3 and on_disk, (err, err_disk)
    assert on_s3["requests"]["total"] > 0 and "requests" not in on_disk
    assert {k: v for k, v in on_s3.items() if k != "requests"} == on_disk
    assert code_s3 == code_disk == 1
    assert actions(on_s3) == EXPECTED_FIXES, on_s3["fixes"]
    by_action = {(f["action"], f.get("digest")) for f in on_s3["fixes"]}
    assert {("replace_blob", broken["truncated"]), ("replace_blob", broken["wrong"]),
            ("restore_blob", broken["missing"]), ("move_blob_home", broken["stray"]),
            ("rewrite_link", broken["garbage_link"]),
            ("create_link", broken["revision"])} == by_action
    assert on_s3["lost_blobs"] == [] and on_s3["repush"] == []
    assert bucket.everything() == before  # a plan changes nothing, not even a lock


@needs_server
@pytest.mark.parametrize("which", ["base28", "base3"])
def test_repair_apply_on_s3_mends_and_undo_restores(which: str, request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    """--apply refuses without a registry check (exit 3, nothing changed); with the registry
    in read-only mode it mends every object: verify finds what it found before the damage,
    registries 2.8 and 3 serve every tag, the local spool of the archive is gone; undo
    restores every key of the damaged tree byte for byte."""
    base: Base = request.getfixturevalue(which)
    bucket = base.bucket.clone()
    state = tmp_path / "state"
    clean = findings(bucket, state)
    tags = bucket.tags()
    damage(bucket)
    assert findings(bucket, state) - clean, "the damage must be visible to verify"
    damaged = bucket.tree()
    before = bucket.everything()
    sources = _sources(base.backups)

    code, doc, err = run(bucket, state, "repair", bucket.url, *sources, "--apply")
    assert code == 3 and "--registry-url" in doc["error"], (doc, err)
    with bucket.registry() as writable:
        code, doc, err = run(bucket, state, "repair", bucket.url, *sources, "--apply",
                             "--registry-url", f"http://{writable.host}")
    assert code == 3 and "writable" in doc["error"], (doc, err)
    assert bucket.everything() == before

    with bucket.registry(readonly=True) as reg:
        started = time.monotonic()
        code, doc, err = run(bucket, state, "repair", bucket.url, *sources, "--apply",
                             "--registry-url", f"http://{reg.host}")
        elapsed = time.monotonic() - started
    assert code == 0, (doc, err)
    assert doc["applied"] is True and doc["run_id"] and doc["remaining"] == []
    assert actions(doc) == EXPECTED_FIXES
    assert all(f["status"] == "applied" for f in doc["fixes"]), doc["fixes"]
    print(f"repair --apply on {which}: {elapsed:.1f}s, requests {doc['requests']}")
    assert findings(bucket, state) == clean
    assert list(state.rglob("repair-spool-*")) == [], "the archive's spooled blobs are removed"
    assert not bucket.keys_below("regfsck-state/lock")  # released
    for binary in filter(None, (realtools.REGISTRY_BIN, registry3_binary())):
        bucket.serves_every_tag(binary, tags)

    started = time.monotonic()
    code, undone, err = run(bucket, state, "undo", bucket.url, doc["run_id"],
                            "--no-registry-check")
    print(f"undo on {which}: {time.monotonic() - started:.1f}s, requests {undone.get('requests')}")
    assert code == 0, (undone, err)
    assert bucket.tree() == damaged  # every key, byte for byte (and ETag)


@needs_server
def test_repair_without_a_backup_quarantines_and_names_the_images(base28: Base,
                                                                   tmp_path: Path) -> None:
    """No --from: a truncated layer is quarantined (a whole blob "directory" moved into the
    quarantine), the plan naming the images to push again, as on disk; after --apply
    (registry stopped) every other tag is served, verify reports the lost layer as missing
    and nothing else new; undo restores every key byte for byte."""
    bucket = base28.bucket.clone()
    state = tmp_path / "state"
    clean = findings(bucket, state)
    tags = bucket.tags()
    _, zstd = tagged(bucket, "compress/zstd", "latest")
    truncated = zstd["layers"][-1]["digest"]
    data = get(bucket, blob(truncated))
    put(bucket, blob(truncated), data[:len(data) // 2])
    damaged = bucket.tree()
    disk = bucket.mirror(tmp_path / "mirror")
    code_s3, plan, err = run(bucket, state, "repair", bucket.url)
    code_disk, on_disk, _ = run(bucket, state, "repair", str(disk))
    assert {k: v for k, v in plan.items() if k != "requests"} == on_disk, err
    assert code_s3 == code_disk == 1
    assert actions(plan) == {"quarantine_blob": 1}
    assert [b["digest"] for b in plan["lost_blobs"]] == [truncated]
    assert "compress/zstd:latest" in plan["repush"]

    code, doc, err = run(bucket, state, "repair", bucket.url, "--apply", "--registry-url",
                         dead_url())
    assert doc.get("applied") is True, (code, doc, err)
    assert not bucket.keys_below(f"docker/registry/v2/blobs/sha256/{truncated[7:9]}/{truncated[7:]}/")
    held = bucket.keys_below(f"{QUARANTINE}{doc['run_id']}/v2/blobs/")
    assert [k.rsplit("/", 2)[-2] for k in held] == [truncated[7:]]
    after = findings(bucket, state)
    assert {kind for kind, _ in after - clean} <= {"reference_missing", "blob_missing",
                                                   "layer_link_dangling"}, after - clean
    lost = set(plan["repush"])
    survivors = {repo: [t for t in ts if f"{repo}:{t}" not in lost] for repo, ts in tags.items()}
    bucket.serves_every_tag(realtools.REGISTRY_BIN, {r: ts for r, ts in survivors.items() if ts})

    code, undone, err = run(bucket, state, "undo", bucket.url, doc["run_id"],
                            "--no-registry-check")
    assert code == 0, (undone, err)
    assert bucket.tree() == damaged



# (ObjectRootStorage method, substring of its path argument, which matching call, before/after)
KILL_POINTS = [
    ("write_new_file", "/new/", 3, "after"),  # a blob staged, its intent not journaled
    ("move", "/new/", 2, "after"),  # a creation copied into the tree, no "done" line
    ("move", "/new/", 4, "before"),  # its intent journaled, nothing copied yet
]


@needs_server
@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: f"{p[0]}-{p[2]}-{p[3]}")
def test_repair_killed_midway_is_reverted_then_done_again(
        point: tuple[str, str, int, str], base28: Base, tmp_path: Path) -> None:
    """`repair --apply` SIGKILLed midway on S3: its lock stays (a process of this host that
    is gone: stale, taken over only with --break-lock); the undo that takes it first recovers
    the run (repair's runs revert): every key of the damaged tree back byte for byte, nothing
    staged left; repair --apply run again mends everything."""
    bucket = base28.bucket.clone()
    state = tmp_path / "state"
    clean = findings(bucket, state)
    damage(bucket)
    damaged = bucket.tree()
    killed = run_killed("regfsck.objectstore.ObjectRootStorage", point, "repair", bucket.url,
                        *_sources(base28.backups), "--apply", "--no-registry-check", "--json",
                        env={**bucket.env(), "XDG_STATE_HOME": str(state)}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert bucket.keys_below("regfsck-state/lock")
    code, doc, _ = run(bucket, state, "undo", bucket.url, "--no-registry-check")
    assert code == 3 and "--break-lock" in doc["error"], doc
    code, doc, err = run(bucket, state, "undo", bucket.url, "--no-registry-check",
                         "--break-lock")
    assert any("reverted" in m for m in doc.get("recovered", [])), (code, doc, err)
    assert bucket.tree() == damaged
    assert not [k for k in bucket.keys_below(QUARANTINE) if "/new/" in k]
    code, runs, _ = run(bucket, state, "runs", bucket.url)
    assert [r["status"] for r in runs["runs"]] == ["reverted"], runs

    code, doc, err = run(bucket, state, "repair", bucket.url, *_sources(base28.backups),
                         "--apply", "--no-registry-check")
    assert code == 0 and doc["remaining"] == [], (doc, err)
    assert findings(bucket, state) == clean


@needs_server
def test_a_registry_that_becomes_writable_midway_stops_repair(base28: Base,
                                                              tmp_path: Path) -> None:
    """--registry-url of a stopped registry: repair --apply starts. Paused after two fixes,
    the registry is started writable at that URL: the next check (the session's, as gc's
    between batches) stops the run: exit 3 naming the run to undo, the fixes applied so far
    kept (not reverted under a writing registry), the lock released; undo then restores every
    key of the damaged tree."""
    bucket = base28.bucket.clone()
    state = tmp_path / "state"
    damage(bucket)
    damaged = bucket.tree()
    url = dead_url()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "repair.2.pause").touch()
    env = child_env({**bucket.env(), "XDG_STATE_HOME": str(state),
                     "REGFSCK_TEST_PAUSE_DIR": str(hooks)})
    proc = subprocess.Popen(command("repair", bucket.url, *_sources(base28.backups), "--apply",
                                    "--registry-url", url, "--json"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writable = bucket.registry(port=int(url.rsplit(":", 1)[1]))
    try:
        while not (hooks / "repair.2.reached").exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        with writable:
            # The session is asked again at least every USERS_EVERY_S: wait that long, so the
            # next fix is preceded by a check whatever the timing of the start above.
            from regfsck.sweep import USERS_EVERY_S

            time.sleep(USERS_EVERY_S + 0.1)
            (hooks / "repair.2.go").touch()
            out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 3, (out, err)
    doc = json.loads(out)
    assert "writable" in doc["error"] and "stopped after 2 of 6 fixes" in doc["error"], doc
    assert not bucket.keys_below("regfsck-state/lock")
    code, runs, _ = run(bucket, state, "runs", bucket.url)
    assert len(runs["runs"]) == 1 and runs["runs"][0]["changes"] > 0, runs
    assert bucket.tree() != damaged  # the two fixes stay
    code, undone, err = run(bucket, state, "undo", bucket.url, "--registry-url", url)
    assert code == 0, (undone, err)
    assert bucket.tree() == damaged
