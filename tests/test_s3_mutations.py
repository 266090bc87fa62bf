"""regfsck changing registries stored in S3 (gc --apply, rm, runs, undo, purge), against a
real S3 API server (moto) on loopback, with trees written by the REAL registry s3 drivers.

Each test works on a private clone of a bucket the real registry (2.8.2 or 3.1.1) filled
through its s3 driver (the session's sample images, one image deleted through the API, one
unfinished upload). The official collector's dry-run against the bucket is the oracle for
what gc removes; after a change a fresh s3-backed registry of both versions must serve every
tag that is kept (`skopeo copy --all` to `dir:`); `undo` must put every key back byte for
byte. The registry check is exercised with the real registries: a writable one refuses,
one in read-only maintenance mode or a stopped one allows.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests import realtools
from tests.support.cli import child_env, command, kill_at_pause
from tests.support.cli import run as regfsck
from tests.support.objectstore import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    Bucket,
    MotoServer,
    blob_digests,
    dead_url,
    iter_keys,
    needs_server,
    registry3_binary,
    registry_env,
)

QUARANTINE = "regfsck-quarantine/"
LOCK = "regfsck-state/lock"


def run(bucket: Bucket, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = regfsck(*args, "--json", env=bucket.env())
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, doc, proc.stderr


# -- the registry check -----------------------------------------------------------------


@needs_server
def test_gc_apply_refuses_without_a_registry_check(moto: MotoServer, bucket28: Bucket
                                                   ) -> None:
    """No --registry-url, or a URL whose registry is writable: exit 3, one line, nothing
    changed (every key and ETag, no lock, no quarantine)."""
    bucket = bucket28.clone()
    before = bucket.everything()
    code, doc, err = run(bucket, "gc", bucket.url, "--grace", "0", "--apply")
    assert code == 3, (doc, err)
    assert "--registry-url" in doc["error"] and "cannot see" in doc["error"]
    assert len(err.strip().splitlines()) == 1
    with bucket.registry() as writable:
        code, doc, err = run(bucket, "gc", bucket.url, "--grace", "0", "--apply",
                             "--registry-url", f"http://{writable.host}")
    assert code == 3, (doc, err)
    assert "writable" in doc["error"] and "read-only" in doc["error"]
    code, doc, _ = run(bucket, "rm", bucket.url, "a/b:latest", "--apply")
    assert code == 3 and "--registry-url" in doc["error"]
    code, doc, _ = run(bucket, "gc", bucket.url, "--apply", "--registry-url", dead_url(),
                       "--no-registry-check")
    assert code == 2, doc
    assert bucket.everything() == before


@needs_server
@pytest.mark.parametrize("which", ["bucket28", "bucket3"])
def test_gc_apply_then_undo(which: str, request: pytest.FixtureRequest) -> None:
    """gc --apply with the registry in read-only mode removes exactly what the official
    collector would; both registry versions then serve every tag; undo restores every key
    byte for byte; purge empties the quarantine."""
    bucket = request.getfixturevalue(which).clone()
    before = bucket.tree()
    code, out = bucket.registry().garbage_collect("--dry-run")
    assert code == 0, out
    oracle = realtools.parse_gc_output(out).blobs
    assert oracle == bucket.doomed_blobs
    tags = bucket.tags()
    readonly = bucket.registry(readonly=True)
    with readonly as reg:
        started = time.monotonic()
        code, doc, err = run(bucket, "gc", bucket.url, "--grace", "0", "--apply",
                             "--registry-url", f"http://{reg.host}")
        elapsed = time.monotonic() - started
    assert code == 0, (doc, err)
    assert doc["applied"] is True and doc["run_id"]
    print(f"gc --apply on {which}: {elapsed:.1f}s, requests {doc['requests']}")
    after = bucket.tree()
    gone = blob_digests(before) - blob_digests(after)
    assert gone == oracle
    assert {b["digest"] for b in doc["blobs"]} == oracle
    assert not bucket.keys_below("regfsck-state/lock")  # released
    held = bucket.keys_below(f"{QUARANTINE}{doc['run_id']}/v2/blobs/")
    assert {"sha256:" + k.split("/")[-2] for k in held} == oracle
    for binary in filter(None, (realtools.REGISTRY_BIN, registry3_binary())):
        bucket.serves_every_tag(binary, tags)

    code, runs, _ = run(bucket, "runs", bucket.url)
    assert code == 0 and [r["run_id"] for r in runs["runs"]] == [doc["run_id"]]
    assert runs["runs"][0]["status"] == "complete" and runs["runs"][0]["bytes"] > 0
    assert runs["requests"]["list"] > 0  # every --json on object storage counts them

    code, planned, err = run(bucket, "undo", bucket.url, doc["run_id"], "--dry-run",
                             "--registry-url", dead_url())
    assert code == 0 and planned["requests"]["list"] > 0, (planned, err)
    code, undone, err = run(bucket, "undo", bucket.url, doc["run_id"], "--registry-url",
                            dead_url())
    assert code == 0, (undone, err)
    assert undone["moved_back"] == doc["apply"]["moved"] > 0
    assert undone["requests"]["copy"] >= undone["moved_back"]
    assert bucket.tree() == before  # every key, byte for byte (and ETag)
    code, purged, _ = run(bucket, "purge", bucket.url, doc["run_id"], "--apply")
    assert code == 0 and purged["runs"] == [doc["run_id"]]
    assert purged["requests"]["delete"] > 0
    assert not bucket.keys_below(QUARANTINE)
    assert bucket.tree() == before


@needs_server
def test_rm_then_undo(bucket28: Bucket) -> None:
    """rm --apply of a tag with the registry stopped: that tag is gone, every other one is
    served; undo puts every key back byte for byte."""
    bucket = bucket28.clone()
    before = bucket.tree()
    tags = bucket.tags()
    repo = sorted(tags)[0]
    tag = tags[repo][0]
    code, doc, err = run(bucket, "rm", bucket.url, f"{repo}:{tag}", "--apply",
                         "--registry-url", dead_url())
    assert code == 0, (doc, err)
    assert doc["applied"] is True and doc["requests"]["copy"] > 0
    assert tag not in bucket.tags().get(repo, [])
    kept = {r: [t for t in ts if (r, t) != (repo, tag)] for r, ts in tags.items()}
    bucket.serves_every_tag(bucket.binary, {r: ts for r, ts in kept.items() if ts})
    code, undone, err = run(bucket, "undo", bucket.url, "--no-registry-check")
    assert code == 0, (undone, err)
    assert bucket.tree() == before


# -- the lock -----------------------------------------------------------------------------


def _put_lock(bucket: Bucket, **fields: Any) -> None:
    holder = {"owner": "someone@elsewhere pid 4242", "host": "elsewhere", "pid": 4242,
              "command": "gc", "acquired_at": "2026-12-04T00:00:00+00:00",
              "refreshed": time.time(), **fields}
    bucket.moto.client().put_object(Bucket=bucket.name, Key=f"{bucket.prefix}/{LOCK}",
                                    Body=json.dumps(holder).encode())


@needs_server
def test_a_held_lock_refuses_and_break_lock_takes_only_a_stale_one(bucket28: Bucket) -> None:
    bucket = bucket28.clone()
    before = bucket.tree()
    _put_lock(bucket)  # a live run elsewhere (refreshed just now)
    code, doc, _ = run(bucket, "gc", bucket.url, "--grace", "0", "--apply",
                       "--no-registry-check")
    assert code == 3 and "someone@elsewhere" in doc["error"], doc
    code, doc, _ = run(bucket, "gc", bucket.url, "--grace", "0", "--apply",
                       "--no-registry-check", "--break-lock")
    assert code == 3 and "someone@elsewhere" in doc["error"], doc  # a live lock stays
    assert bucket.tree() == before

    # A run on this host that died (its pid is gone). A lock not refreshed for 5 minutes
    # is stale too, but S3 stamps every write with the server's time, so a test cannot
    # plant an old one: that path is test_lock_object_is_a_conditional_write's clock.
    gone = subprocess.Popen(["true"])
    gone.wait()
    _put_lock(bucket, host=socket.gethostname(), pid=gone.pid,
              owner=f"someone@{socket.gethostname()} pid {gone.pid}")
    code, doc, _ = run(bucket, "gc", bucket.url, "--grace", "0", "--apply",
                       "--no-registry-check")
    assert code == 3 and "--break-lock" in doc["error"] and "is gone" in doc["error"], doc
    assert bucket.tree() == before
    code, doc, err = run(bucket, "gc", bucket.url, "--grace", "0", "--apply",
                         "--no-registry-check", "--break-lock")
    assert code == 0, (doc, err)
    assert blob_digests(before) - blob_digests(bucket.tree()) == bucket.doomed_blobs
    assert not bucket.keys_below(LOCK)


@needs_server
def test_lock_object_is_a_conditional_write(moto: MotoServer) -> None:
    """moto honours If-None-Match: * on PutObject: of two runs, exactly one gets the lock;
    the second sees the first's owner. A lock refreshed by its holder is not stale; the
    same lock seen by a clock an hour later is, and --break-lock replaces it (If-Match)."""
    from regfsck.objectstore import LockHeld, ObjectLock, ObjectMutator, make_client
    from regfsck.root import S3Location

    moto.make_bucket("regfsck-lock")
    location = S3Location("regfsck-lock", "p", endpoint=moto.endpoint,
                          access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                          region=REGION, force_path_style=True)
    client = make_client(location)
    first = ObjectLock(location, command="gc", mutator=ObjectMutator(location, client=client))
    first.acquire()
    try:
        second = ObjectLock(location, command="rm", mutator=ObjectMutator(location, client=client))
        with pytest.raises(LockHeld) as held:
            second.acquire()
        assert not held.value.stale and "gc" in str(held.value)
        later = ObjectLock(location, command="rm", break_stale=True,
                           mutator=ObjectMutator(location, client=client),
                           clock=lambda: time.time() + 3600)
        later.acquire()  # stale by its clock: broken with a conditional write
        assert later.broke is not None and later.broke["command"] == "gc"
        first.refresh(0.0)
        assert first.lost is not None  # the first run learns its lock was taken
        later.release()
    finally:
        first.release()
    assert not list(iter_keys(moto.client(), "regfsck-lock"))


@needs_server
def test_a_move_interrupted_between_copy_and_delete_settles(moto: MotoServer) -> None:
    """A crash after the copies and before the delete leaves keys in both places: settled as
    not moved (the copies go). After part of the deletes: settled as moved (the rest go)."""
    from regfsck.objectstore import ObjectMutator
    from regfsck.root import S3Location

    moto.make_bucket("regfsck-settle")
    client = moto.client()
    location = S3Location("regfsck-settle", "", endpoint=moto.endpoint,
                          access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                          region=REGION, force_path_style=True)
    mutator = ObjectMutator(location)
    for name in ("a", "b"):
        client.put_object(Bucket="regfsck-settle", Key=f"src/{name}", Body=name.encode())
        client.copy_object(Bucket="regfsck-settle", Key=f"dst/{name}",
                           CopySource={"Bucket": "regfsck-settle", "Key": f"src/{name}"})
    assert mutator.settle_move("src", "dst") is False
    assert sorted(o["Key"] for o in iter_keys(client, "regfsck-settle")) == ["src/a", "src/b"]
    mutator.move([("src", "dst")])
    assert sorted(o["Key"] for o in iter_keys(client, "regfsck-settle")) == ["dst/a", "dst/b"]
    client.put_object(Bucket="regfsck-settle", Key="src/b", Body=b"b")  # one delete undone
    assert mutator.settle_move("src", "dst") is True
    assert sorted(o["Key"] for o in iter_keys(client, "regfsck-settle")) == ["dst/a", "dst/b"]


# -- the probe ------------------------------------------------------------------------------


@pytest.mark.realtools
@pytest.mark.skipif(bool(realtools.REAL_TOOLS_SKIP_REASON),
                    reason=realtools.REAL_TOOLS_SKIP_REASON or "-")
@pytest.mark.parametrize("version", ["2.8", "3"])
def test_registry_url_probe_with_the_real_registries(version: str, tmp_path: Path) -> None:
    """OPTIONS on the upload route: writable, read-only and stopped registries of both
    versions; an HTTP server that is not a registry cannot tell."""
    from regfsck.safety import registry_url_state

    binary = realtools.registry_binary(version)
    for readonly, state in ((False, "writable"), (True, "read-only")):
        port = realtools.free_port()
        config = tmp_path / f"config-{readonly}.yml"
        config.write_text(json.dumps({
            "version": 0.1, "log": {"level": "error"},
            "storage": {"filesystem": {"rootdirectory": str(tmp_path / "root")},
                        "maintenance": {"readonly": {"enabled": readonly}}},
            "http": {"addr": f"127.0.0.1:{port}"}}))
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=registry_env())
        try:
            deadline = time.monotonic() + 20
            found = registry_url_state(f"http://127.0.0.1:{port}")
            while found.state == "down" and time.monotonic() < deadline:
                time.sleep(0.1)
                found = registry_url_state(f"http://127.0.0.1:{port}/v2/")
            assert found.state == state, found
        finally:
            proc.terminate()
            proc.wait(10)
    assert registry_url_state(dead_url()).state == "down"
    port = realtools.free_port()
    other = subprocess.Popen(["python3", "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        found = registry_url_state(f"http://127.0.0.1:{port}")
        while found.state == "down" and time.monotonic() < deadline:
            time.sleep(0.1)
            found = registry_url_state(f"http://127.0.0.1:{port}")
        assert found.state == "unknown", found
        assert not found.allows_changes
    finally:
        other.terminate()
        other.wait(10)


# -- a crash --------------------------------------------------------------------------------


@needs_server
def test_gc_killed_midway_is_recovered_and_undone(bucket28: Bucket, tmp_path: Path) -> None:
    """kill -9 of gc --apply between two phases (the test hook pauses it there): its lock
    stays behind and refuses the next run until --break-lock (its process is gone); that
    run recovers the interrupted one (kept, undoable); undoing both puts every key back."""
    bucket = bucket28.clone()
    before = bucket.tree()
    # Killed after the manifests, layer links and uploads moved, before the blobs.
    kill_at_pause(tmp_path / "hooks", "blobs", "gc", bucket.url, "--grace", "0",
                  "--delete-untagged", "--uploads-older-than", "0", "--apply",
                  "--no-registry-check", "--json", env=bucket.env())
    assert bucket.keys_below(LOCK)  # nothing drops an object lock
    assert bucket.tree() != before  # it had moved something
    code, doc, _ = run(bucket, "runs", bucket.url)
    assert [r["status"] for r in doc["runs"]] == ["running"]
    code, doc, _ = run(bucket, "undo", bucket.url, "--no-registry-check")
    assert code == 3 and "--break-lock" in doc["error"], doc
    code, doc, err = run(bucket, "undo", bucket.url, "--no-registry-check", "--break-lock")
    assert code == 0, (doc, err)
    assert bucket.tree() == before  # recovered by its policy, then undone: every key back
    code, doc, _ = run(bucket, "runs", bucket.url)
    assert all(r["status"] == "reverted" for r in doc["runs"]), doc
    assert not bucket.keys_below(LOCK)


@needs_server
def test_a_registry_that_becomes_writable_midway_stops_gc(bucket28: Bucket, tmp_path: Path) -> None:
    """--registry-url of a stopped registry: gc starts. Paused before its blob phase, the
    registry is started writable at that URL: the next check stops the run (exit 3, the
    moves so far kept in an undoable run); undo then restores every key."""
    import os

    bucket = bucket28.clone()
    before = bucket.tree()
    url = dead_url()
    port = int(url.rsplit(":", 1)[1])
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "blobs.pause").touch()
    env = child_env({**bucket.env(), "REGFSCK_TEST_PAUSE_DIR": str(hooks)})
    proc = subprocess.Popen(command("gc", bucket.url, "--grace", "0", "--delete-untagged",
                                    "--uploads-older-than", "0", "--apply",
                                    "--registry-url", url, "--json"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writable = bucket.registry(port=port)
    try:
        deadline = time.monotonic() + 120
        while not (hooks / "blobs.reached").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        with writable:
            (hooks / "blobs.go").touch()
            out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait(30)
    assert proc.returncode == 3, (out, err)
    doc = json.loads(out)
    assert "writable" in doc["error"] and "undo" in doc["error"], doc
    assert not bucket.keys_below(LOCK)
    code, runs, _ = run(bucket, "runs", bucket.url)
    assert [r["status"] for r in runs["runs"]] == ["interrupted"], runs
    assert runs["runs"][0]["changes"] > 0 and bucket.tree() != before  # it had moved some
    code, undone, err = run(bucket, "undo", bucket.url, "--registry-url", url)
    assert code == 0, (undone, err)
    assert bucket.tree() == before
