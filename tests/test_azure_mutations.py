"""regfsck changing a registry stored in Azure Blob Storage (gc --apply, runs, undo, purge),
against a real Azure Blob server on loopback (Azurite), with the tree written by the REAL
registry 3.1.1 through its azure driver (Debian's 2.8.2 has no azure driver).

The same mutation seam as on S3 (`objectstore.ObjectRootStorage`, `ObjectMutator`,
`ObjectLock`), parameterised by obstore's Azure store: a move is a server-side Copy Blob,
proven by reading the copy back against its source (Azure may finish a copy asynchronously
and obstore shows no copy status), then a Blob Batch delete; journal parts and the lock are
conditional writes (If-None-Match: *, If-Match). The official `garbage-collect --dry-run`
against the container is the oracle; after the change a fresh azure-backed registry 3 serves
every kept tag (`skopeo copy --all`); `undo` restores every blob byte for byte (Azure gives
a rewritten blob a new ETag, so bytes, not ETags, are compared); `purge` empties the
quarantine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests import realtools
from tests.support.cli import run as regfsck
from tests.support.objectstore import (
    ACCOUNT,
    KEY,
    Azurite,
    Container,
    blob_digests,
    dead_url,
    fill_container,
    needs_azure,
)

QUARANTINE = "regfsck-quarantine/"
LOCK = "regfsck-state/lock"


@pytest.fixture(scope="module")
def container(azurite: Azurite, real_sample: tuple[Path, realtools.SampleInfo]) -> Container:
    return fill_container(azurite, real_sample[0], "regfsck-azmut")


def run(box: Container, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = regfsck(*args, "--json", env=box.env())
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, doc, proc.stderr


def contents(snap: dict[str, tuple[str, str]]) -> dict[str, str]:
    """name -> sha256 of the bytes (Azure's ETags change whenever a blob is rewritten)."""
    return {name: digest for name, (_, digest) in snap.items()}


@needs_azure
def test_gc_apply_then_undo_and_purge(container: Container) -> None:
    """gc --apply with the registry in read-only mode removes exactly what the official
    collector names; a fresh registry serves every tag; runs shows the run; undo restores
    every blob byte for byte; purge empties the quarantine."""
    box = container.clone("regfsck-azmut-gc")
    before = box.tree()
    code, out = box.registry().garbage_collect("--dry-run")
    assert code == 0, out
    oracle = realtools.parse_gc_output(out).blobs
    assert oracle == box.doomed_blobs and oracle
    tags = box.tags()
    with box.registry(readonly=True) as reg:
        started = time.monotonic()
        code, doc, err = run(box, "gc", box.url, "--grace", "0", "--apply",
                             "--registry-url", f"http://{reg.host}")
        elapsed = time.monotonic() - started
    assert code == 0, (doc, err)
    assert doc["applied"] is True and doc["run_id"]
    print(f"gc --apply on Azurite: {elapsed:.1f}s, requests {doc['requests']}")
    after = box.tree()
    assert blob_digests(before) - blob_digests(after) == oracle
    assert {b["digest"] for b in doc["blobs"]} == oracle
    assert not box.keys_below(LOCK)  # released
    held = box.keys_below(f"{QUARANTINE}{doc['run_id']}/v2/blobs/")
    assert {"sha256:" + k.split("/")[-2] for k in held} == oracle
    box.serves_every_tag(tags)

    code, runs, _ = run(box, "runs", box.url)
    assert code == 0 and [r["run_id"] for r in runs["runs"]] == [doc["run_id"]]
    assert runs["runs"][0]["status"] == "complete" and runs["runs"][0]["bytes"] > 0

    code, undone, err = run(box, "undo", box.url, doc["run_id"], "--registry-url", dead_url())
    assert code == 0, (undone, err)
    assert undone["moved_back"] == doc["apply"]["moved"] > 0
    assert contents(box.tree()) == contents(before)  # every blob, byte for byte
    code, purged, _ = run(box, "purge", box.url, doc["run_id"], "--apply")
    assert code == 0 and purged["runs"] == [doc["run_id"]]
    assert not box.keys_below(QUARANTINE)
    assert contents(box.tree()) == contents(before)
    box.serves_every_tag(tags)


@needs_azure
def test_gc_apply_without_registry_check_and_rm(container: Container) -> None:
    """gc --apply --no-registry-check (the registry stopped): the oracle's blobs go, every
    tag is served; rm of a tag then undo of both runs puts every blob back."""
    box = container.clone("regfsck-azmut-rm")
    before = box.tree()
    tags = box.tags()
    code, doc, err = run(box, "gc", box.url, "--grace", "0", "--apply", "--no-registry-check")
    assert code == 0, (doc, err)
    assert blob_digests(before) - blob_digests(box.tree()) == box.doomed_blobs
    box.serves_every_tag(tags)
    repo = sorted(tags)[0]
    tag = tags[repo][0]
    code, doc, err = run(box, "rm", box.url, f"{repo}:{tag}", "--apply", "--no-registry-check")
    assert code == 0, (doc, err)
    assert tag not in box.tags().get(repo, [])
    kept = {r: [t for t in ts if (r, t) != (repo, tag)] for r, ts in tags.items()}
    box.serves_every_tag({r: ts for r, ts in kept.items() if ts})
    for _ in range(2):
        code, undone, err = run(box, "undo", box.url, "--no-registry-check")
        assert code == 0, (undone, err)
    assert contents(box.tree()) == contents(before)


@needs_azure
def test_the_seam_on_azurite(azurite: Azurite) -> None:
    """What the seam needs of Azure, on Azurite: the lock is a conditional write (of two runs
    exactly one gets it; a stale one is broken with If-Match); a move copies and proves the
    copy, then deletes; a delete naming a missing blob is no error (Blob Batch answers 404
    for it); a copy whose bytes differ from its source is refused and its source kept."""
    import obstore

    from regfsck.objectstore import LockHeld, ObjectLock, ObjectMutator
    from regfsck.root import S3Location
    from regfsck.storage import StorageError

    name = azurite.make_container("regfsck-azmut-seam")
    location = S3Location(name, "p", endpoint=azurite.endpoint, access_key=ACCOUNT,
                          secret_key=KEY, provider="azure")
    mutator = ObjectMutator(location)
    first = ObjectLock(location, command="gc", mutator=mutator)
    first.acquire()
    try:
        with pytest.raises(LockHeld) as held:
            ObjectLock(location, command="rm", mutator=ObjectMutator(location)).acquire()
        assert not held.value.stale and "gc" in str(held.value)
        assert "azure://" in str(held.value)
        later = ObjectLock(location, command="rm", break_stale=True,
                           mutator=ObjectMutator(location), clock=lambda: time.time() + 3600)
        later.acquire()
        assert later.broke is not None and later.broke["command"] == "gc"
        first.refresh(0.0)
        assert first.lost is not None
        later.release()
    finally:
        first.release()
    assert mutator.list_below("regfsck-state") == []

    store = azurite.store(name)
    for part in ("a", "b"):
        obstore.put(store, f"p/src/{part}", part.encode() * 1000)
    mutator.move([("src", "dst")])
    assert [k.path for k in mutator.list_below("")] == ["dst/a", "dst/b"]
    mutator.delete(["dst/a", "missing", "dst/b"])
    assert mutator.list_below("") == []

    obstore.put(store, "p/one", b"x" * 5000)
    source = mutator.head("one")
    assert source is not None
    real_copy = obstore.copy

    def torn(client: Any, src: str, dst: str, *, overwrite: bool = True) -> None:
        """A copy that lands incomplete (what a pending async Copy Blob looks like):
        the right size, other bytes."""
        real_copy(client, src, dst, overwrite=overwrite)
        obstore.put(client, dst, b"\0" * 5000)

    obstore.copy = torn  # type: ignore[assignment]
    try:
        with pytest.raises(StorageError):
            mutator.move([("one", "moved")])
    finally:
        obstore.copy = real_copy  # type: ignore[assignment]
    assert [k.path for k in mutator.list_below("")] == ["one"]  # source kept, copy removed



@needs_azure
def test_gc_killed_midway_is_recovered_and_undone(container: Container, tmp_path: Path) -> None:
    """kill -9 of gc --apply paused before its blob phase: the lock blob stays and refuses
    the next run until --break-lock (its process is gone); that run recovers the interrupted
    one and undoes it: every blob back byte for byte."""
    from tests.support.cli import kill_at_pause

    box = container.clone("regfsck-azmut-kill")
    before = box.tree()
    # Killed after the manifests, layer links and uploads moved, before the blobs.
    kill_at_pause(tmp_path / "hooks", "blobs", "gc", box.url, "--grace", "0",
                  "--delete-untagged", "--uploads-older-than", "0", "--apply",
                  "--no-registry-check", "--json", env=box.env())
    assert box.keys_below(LOCK)  # nothing drops a lock blob
    assert contents(box.tree()) != contents(before)  # it had moved something
    code, doc, _ = run(box, "runs", box.url)
    assert [r["status"] for r in doc["runs"]] == ["running"]
    code, doc, _ = run(box, "undo", box.url, "--no-registry-check")
    assert code == 3 and "--break-lock" in doc["error"], doc
    code, doc, err = run(box, "undo", box.url, "--no-registry-check", "--break-lock")
    assert code == 0, (doc, err)
    assert contents(box.tree()) == contents(before)
    code, doc, _ = run(box, "runs", box.url)
    assert all(r["status"] == "reverted" for r in doc["runs"]), doc
    assert not box.keys_below(LOCK)


@needs_azure
def test_import_and_repair_apply_are_refused_on_azure(container: Container, tmp_path: Path) -> None:
    """import and repair write new objects, a path not yet proven against the azure driver
    (a streaming create cannot be made create-only there): --apply refuses, one line, exit 3,
    nothing changed; repair's plan, which only reads, still runs."""
    box = container.clone("regfsck-azmut-refuse")
    before = box.tree()
    for args in (("import", box.url, str(tmp_path), "--apply", "--no-registry-check"),
                 ("repair", box.url, "--apply", "--no-registry-check")):
        proc = regfsck(*args, env=box.env())
        assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
        assert "not available on azure://" in proc.stderr and proc.stderr.count("\n") == 1
    assert box.tree() == before
    code, plan, err = run(box, "repair", box.url)
    assert code in (0, 1), (plan, err)
    assert box.tree() == before
