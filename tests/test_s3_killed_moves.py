"""A run killed between the copy and the delete of a move on S3 is settled by the next run.

Every move on object storage is a server-side copy, a checked HEAD, then a delete of the
source (`ObjectMutator.move`). A SIGKILL between the two leaves the object in both places
(or, for a move of several keys, part of it copied, or part of its sources deleted). The
next run settles it with `settle_move`: the recovery of gc/rm/repair for their moves into
the quarantine, and the next undo for the moves back of a killed undo.

The tree is written by the REAL registry 2.8.2 through its s3 driver into moto; regfsck is
SIGKILLed at one call of `ObjectMutator` (`run_killed`): right before the delete of a move's
sources, or right after one copy of a move of several keys (`REGFSCK_S3_JOBS=1`: the copies
go one at a time). Each sequence must end with every key of the tree byte for byte with its
ETag, nothing left in the quarantine of a reverted run, and a fresh registry serving every
tag.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from tests import realtools
from tests.support.cli import run as regfsck
from tests.support.cli import run_killed
from tests.support.objectstore import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    Azurite,
    Bucket,
    Container,
    MotoServer,
    blob_digests,
    fill_container,
    iter_keys,
    needs_azure,
    needs_server,
)

MUTATOR = "regfsck.objectstore.ObjectMutator"
QUARANTINE = "regfsck-quarantine/"
LOCK = "regfsck-state/lock"
TREE = "/docker/registry/v2/"
GC_ALL = ("--grace", "0", "--delete-untagged", "--uploads-older-than", "0")


def run(bucket: Bucket, *args: str, env: dict[str, str] | None = None
        ) -> tuple[int, dict[str, Any], str]:
    proc = regfsck(*args, "--json", env=env or bucket.env())
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, doc, proc.stderr


def _runs(bucket: Bucket) -> list[dict[str, Any]]:
    code, doc, err = run(bucket, "runs", bucket.url)
    assert code == 0, (doc, err)
    runs: list[dict[str, Any]] = doc["runs"]
    return runs


def _killed(bucket: Bucket, point: tuple[str, str, int, str], *args: str,
            jobs: int | None = None) -> None:
    env = {**bucket.env(), **({"REGFSCK_S3_JOBS": str(jobs)} if jobs else {})}
    killed = run_killed(MUTATOR, point, *args, "--no-registry-check", "--json", env=env)
    assert killed.returncode == -9, (killed.returncode, killed.stdout, killed.stderr)
    assert bucket.keys_below(LOCK)  # nothing drops an object lock


def _payload(bucket: Bucket, run_id: str) -> list[str]:
    return bucket.keys_below(f"{QUARANTINE}{run_id}/v2/")


def _in_both(bucket: Bucket, run_id: str) -> list[str]:
    """The keys (below v2/) both in the tree and in the run's quarantine."""
    held = {k.split(f"{run_id}/v2/", 1)[1] for k in _payload(bucket, run_id)}
    return sorted(held & {k.split(TREE, 1)[1] for k in bucket.tree()})


def _undone_after_the_kill(bucket: Bucket, run_id: str, before: dict[str, Any],
                           tags: dict[str, list[str]], interrupted: str) -> None:
    """`undo --dry-run` shows the plan the next undo carries out (the interrupted move
    settled as it will be: `interrupted` is its step) and changes nothing; the next
    `undo --break-lock` finishes the killed undo: every key back with its ETag, the run
    reverted with nothing left in its quarantine, every tag served."""
    assert [r["status"] for r in _runs(bucket)] == ["undoing"]
    unchanged = bucket.everything()
    code, plan, err = run(bucket, "undo", bucket.url, run_id, "--dry-run")
    assert code == 0 and not plan["problems"], (plan, err)  # what the undo below does
    assert bucket.everything() == unchanged
    actions = [step["action"] for step in plan["steps"]]
    assert interrupted in actions and "already_there" not in actions, actions
    code, undone, err = run(bucket, "undo", bucket.url, run_id, "--no-registry-check",
                            "--break-lock")
    assert code == 0, (undone, err)
    assert undone.get("reverted_by_recovery") is True, undone
    assert bucket.tree() == before
    runs = _runs(bucket)
    assert [(r["status"], r["bytes"]) for r in runs] == [("reverted", 0)], runs
    assert not _payload(bucket, run_id) and not bucket.keys_below(LOCK)
    bucket.serves_every_tag(bucket.binary, tags)


@needs_server
def test_undo_killed_between_the_copy_and_the_delete_of_a_small_object(bucket28: Bucket
                                                                       ) -> None:
    """gc --delete-untagged --apply, then its undo SIGKILLed right before the delete of its
    third move back (a one-key object, copied into the tree, still in the quarantine). The
    next undo settles it as a move not yet made (the copy goes) and moves it back with the
    rest. Before: the recovery called it "already there" and left its copy in the
    quarantine of the reverted run (and counted one move back fewer)."""
    bucket = bucket28.clone()
    before, tags = bucket.tree(), bucket.tags()
    code, doc, err = run(bucket, "gc", bucket.url, *GC_ALL, "--apply", "--no-registry-check")
    assert code == 0, (doc, err)
    _killed(bucket, ("delete", QUARANTINE, 3, "before"), "undo", bucket.url, doc["run_id"])
    assert len(_in_both(bucket, doc["run_id"])) == 1
    _undone_after_the_kill(bucket, doc["run_id"], before, tags, "move_back")


def _tag_removed(template: Bucket) -> tuple[Bucket, dict[str, tuple[str, str]], dict[str, list[str]],
                                             dict[str, Any]]:
    """A clone of `template` with its first repository's first tag removed by `rm --apply`:
    (the bucket, its tree and tags before, the run's JSON)."""
    bucket = template.clone()
    before, tags = bucket.tree(), bucket.tags()
    repo = sorted(tags)[0]
    code, doc, err = run(bucket, "rm", bucket.url, f"{repo}:{tags[repo][0]}", "--apply",
                         "--no-registry-check")
    assert code == 0, (doc, err)
    return bucket, before, tags, doc


@needs_server
def test_undo_killed_between_the_copies_of_a_tag_is_finished(bucket28: Bucket) -> None:
    """rm repo:tag --apply, then its undo SIGKILLed right after the first of the two copies
    of the tag's directory back into the tree (current/link and index/.../link): half the
    tag is in the tree. The next undo drops that half copy and moves the tag back whole.
    Before: every later undo refused ("something new exists at that path"), the run went
    back to `complete` with half its tag in the tree: the operator was stuck; and
    `undo --dry-run` showed that refusal (now: the move back the undo makes)."""
    bucket, before, tags, doc = _tag_removed(bucket28)
    _killed(bucket, ("copy_checked", QUARANTINE, 1, "after"), "undo", bucket.url, jobs=1)
    assert len(_payload(bucket, doc["run_id"])) == 2
    assert len(set(bucket.tree()) - set(before)) == 0 and len(set(before) - set(bucket.tree())) == 1
    _undone_after_the_kill(bucket, doc["run_id"], before, tags, "move_back")


@needs_server
def test_undo_killed_between_the_deletes_of_a_tag_is_finished(bucket28: Bucket) -> None:
    """The same undo SIGKILLed right before the delete of the tag's quarantine keys, then one
    of the two deleted as a DeleteObjects cut short would have: the tag is whole in the
    tree, half of it still in the quarantine. The next undo finishes that move (the
    remaining source goes). Before: refused forever, as above."""
    bucket, before, tags, doc = _tag_removed(bucket28)
    _killed(bucket, ("delete", QUARANTINE, 1, "before"), "undo", bucket.url)
    held = sorted(_payload(bucket, doc["run_id"]))
    assert len(held) == 2 and bucket.tree() == before
    bucket.client().delete_object(Bucket=bucket.name, Key=held[0])
    _undone_after_the_kill(bucket, doc["run_id"], before, tags, "settle")


@needs_server
def test_a_key_written_since_at_a_killed_move_back_is_never_dropped(bucket28: Bucket) -> None:
    """The undo of rm SIGKILLed before the delete of the tag's quarantine keys (the tag in
    both places), then the tag's current/link in the tree rewritten with other bytes (a
    push since). The next undo must not take that key for its own copy: the recovery
    reports the undo cannot go on (the run back to `complete`, nothing wedged), the undo
    refuses naming the path, the pushed key keeps its bytes. Once the operator removes
    it, the undo settles the rest and restores every key."""
    bucket = bucket28.clone()
    before, tags = bucket.tree(), bucket.tags()
    repo = sorted(tags)[0]
    tag = tags[repo][0]
    code, doc, err = run(bucket, "rm", bucket.url, f"{repo}:{tag}", "--apply",
                         "--no-registry-check")
    assert code == 0, (doc, err)
    _killed(bucket, ("delete", QUARANTINE, 1, "before"), "undo", bucket.url)
    current = bucket.key(f"repositories/{repo}/_manifests/tags/{tag}/current/link")
    pushed = b"sha256:" + b"0" * 64
    bucket.client().put_object(Bucket=bucket.name, Key=current, Body=pushed)
    code, undone, err = run(bucket, "undo", bucket.url, doc["run_id"], "--no-registry-check",
                            "--break-lock")
    assert code == 3 and "something new exists" in undone["error"], (undone, err)
    assert [r["status"] for r in _runs(bucket)] == ["complete"]
    assert bucket.read(current) == pushed and len(_payload(bucket, doc["run_id"])) == 2
    bucket.client().delete_object(Bucket=bucket.name, Key=current)
    code, undone, err = run(bucket, "undo", bucket.url, doc["run_id"], "--no-registry-check")
    assert code == 0, (undone, err)
    assert bucket.tree() == before and not _payload(bucket, doc["run_id"])
    bucket.serves_every_tag(bucket.binary, tags)


@needs_server
def test_undo_of_import_killed_between_the_copy_and_the_delete_of_a_creation(
        bucket28: Bucket, tmp_path: Path) -> None:
    """import --apply of an OCI layout (a new repository: blobs, links, a tag, all created),
    then its undo SIGKILLed right before the delete of the tree key of its second unmake
    (the created object copied to the run's `undone/`, still in the tree). The next undo
    settles it (the copy in `undone/` goes) and unmakes it again: the tree is as before the
    import, the run's `undone/` holds each created object once. Before: the copy stayed
    and the unmake made a second one under `undone~<seq>/`."""
    bucket = bucket28.clone()
    before, tags = bucket.tree(), bucket.tags()
    writer = realtools.OCILayoutWriter(tmp_path / "layout")
    layer = writer.add_layer({"hello.txt": b"a creation undone twice\n"})
    writer.add_image([layer], tag="v1", history=["ADD hello.txt"])
    code, doc, err = run(bucket, "import", bucket.url, str(writer.path), "--repo",
                         "killed/undo", "--apply", "--no-registry-check")
    assert code == 0, (doc, err)
    created = set(bucket.tree()) - set(before)
    assert created
    _killed(bucket, ("delete", TREE.strip("/"), 2, "before"), "undo", bucket.url,
            "--break-lock")
    assert [r["status"] for r in _runs(bucket)] == ["undoing"]
    code, undone, err = run(bucket, "undo", bucket.url, "--no-registry-check", "--break-lock")
    assert code == 0, (undone, err)
    assert undone.get("reverted_by_recovery") is True, undone
    assert bucket.tree() == before
    run_id = _runs(bucket)[0]["run_id"]
    held = [k.split(f"{run_id}/", 1)[1] for k in bucket.keys_below(f"{QUARANTINE}{run_id}/")
            if "/undone" in k]
    assert sorted(k.split("/", 1)[1] for k in held) == sorted(
        k.split(TREE, 1)[1] for k in created), held
    assert all(k.startswith("undone/") for k in held), held
    bucket.serves_every_tag(bucket.binary, tags)


@needs_server
def test_a_recovery_killed_inside_a_move_back_is_finished_by_the_next(
        bucket28: Bucket, tmp_path: Path) -> None:
    """Two kills in a row. import --apply SIGKILLed before the delete of its third staged
    object (copied into the tree, still in the run's `new/`: a creation the journal leaves
    open); then the `undo --break-lock` whose recovery reverts it SIGKILLed before the
    delete of the tree key of its first unmake (in the tree and in `undone/`). The next
    `undo --break-lock` settles both (the open creation from the journal's side, the
    unmake from the undo's) and ends the revert: the tree as before the import, each
    created object once in `undone/`, nothing staged."""
    bucket = bucket28.clone()
    before, tags = bucket.tree(), bucket.tags()
    writer = realtools.OCILayoutWriter(tmp_path / "layout")
    layers = [writer.add_layer({f"f{n}.txt": f"recovery killed {n}\n".encode()})
              for n in range(2)]
    writer.add_image(layers, tag="v1", history=["ADD f0.txt", "ADD f1.txt"])
    _killed(bucket, ("delete", "/new/", 3, "before"), "import", bucket.url, str(writer.path),
            "--repo", "killed/recovery", "--apply")
    assert [r["status"] for r in _runs(bucket)] == ["running"]
    assert set(bucket.tree()) > set(before)  # two created, the third copied
    # The recovery's first delete in the tree settles the third creation (its copy goes);
    # the second is the source of its first unmake.
    _killed(bucket, ("delete", TREE.strip("/"), 2, "before"), "undo", bucket.url,
            "--break-lock")
    run_id = _runs(bucket)[0]["run_id"]
    assert [r["status"] for r in _runs(bucket)] == ["undoing"]
    assert _in_both_undone(bucket, run_id)
    code, undone, err = run(bucket, "undo", bucket.url, "--no-registry-check", "--break-lock")
    assert code == 0, (undone, err)
    assert undone.get("reverted_by_recovery") is True, undone
    assert bucket.tree() == before
    assert [r["status"] for r in _runs(bucket)] == ["reverted"]
    held = [k.split(f"{run_id}/", 1)[1] for k in bucket.keys_below(f"{QUARANTINE}{run_id}/")
            if "/undone" in k or "/new/" in k]
    assert held and all(k.startswith("undone/") for k in held), held
    assert len(held) == len({k.split("/", 1)[1] for k in held})
    bucket.serves_every_tag(bucket.binary, tags)


def _in_both_undone(bucket: Bucket, run_id: str) -> list[str]:
    """The keys (below v2/) both in the tree and in the run's `undone/`."""
    held = {k.split(f"{run_id}/undone/", 1)[1]
            for k in bucket.keys_below(f"{QUARANTINE}{run_id}/undone/")}
    return sorted(held & {k.split(TREE, 1)[1] for k in bucket.tree()})


@needs_server
def test_gc_killed_between_the_copy_and_the_delete_is_settled_by_the_next_gc(
        bucket28: Bucket) -> None:
    """gc --delete-untagged --apply SIGKILLed right before the delete of the sources of its
    first batch of moves into the quarantine (copied, still in the tree). The next
    `gc --apply --break-lock` recovers it (gc keeps what a killed run did: here nothing,
    the copies are settled as moves not made and go, the tree is as before) and then
    collects what the official collector would; undoing it restores every key. This
    passed before the fix: the forward moves were already settled by the recovery."""
    bucket = bucket28.clone()
    before, tags = bucket.tree(), bucket.tags()
    _killed(bucket, ("delete", TREE.strip("/"), 1, "before"), "gc", bucket.url, *GC_ALL,
            "--apply")
    assert bucket.tree() == before  # copied, nothing deleted yet
    assert [r["status"] for r in _runs(bucket)] == ["running"]
    code, doc, err = run(bucket, "gc", bucket.url, *GC_ALL, "--apply", "--no-registry-check",
                         "--break-lock")
    assert code == 0, (doc, err)
    assert any("kept its 0 completed changes" in m for m in doc["recovered"]), doc
    killed, done = _runs(bucket)
    assert (killed["status"], killed["changes"], killed["bytes"]) == ("interrupted", 0, 0)
    assert done["status"] == "complete" and done["changes"] > 0
    after = bucket.tree()
    assert blob_digests(before) - blob_digests(after) == bucket.doomed_blobs
    bucket.serves_every_tag(bucket.binary, tags)
    code, undone, err = run(bucket, "undo", bucket.url, "--no-registry-check")
    assert code == 0, (undone, err)
    assert bucket.tree() == before and not bucket.keys_below(LOCK)


@needs_server
def test_settle_move_never_drops_a_key_that_is_not_a_copy_of_its_source(moto: MotoServer
                                                                        ) -> None:
    """settle_move after a crash: a key at the destination that differs from its source
    (written there since, not copied) is neither deleted as "a copy of a move not yet made"
    nor taken as the moved object: the settle refuses and nothing changes. An undo settles
    moves back into the live tree, where something new may have been written."""
    from regfsck.objectstore import ObjectMutator
    from regfsck.root import S3Location
    from regfsck.storage import StorageError

    name = "regfsck-settle-foreign"
    moto.make_bucket(name)
    client = moto.client()
    location = S3Location(name, "", endpoint=moto.endpoint, access_key=ACCESS_KEY,
                          secret_key=SECRET_KEY, region=REGION, force_path_style=True)
    mutator = ObjectMutator(location)
    for key, body in (("src/a", b"a"), ("src/b", b"b"), ("dst/a", b"A")):
        client.put_object(Bucket=name, Key=key, Body=body)

    def state() -> dict[str, bytes]:
        return {o["Key"]: client.get_object(Bucket=name, Key=o["Key"])["Body"].read()
                for o in iter_keys(client, name)}

    kept = state()
    with pytest.raises(StorageError, match="by hand") as refused:
        mutator.settle_move("src", "dst")  # dst/a is no copy of src/a
    assert refused.value.errno == errno.EEXIST and state() == kept
    client.delete_object(Bucket=name, Key="src/a")  # as if the deletes had begun
    client.put_object(Bucket=name, Key="dst/b", Body=b"B")
    kept = state()
    with pytest.raises(StorageError, match="by hand"):
        mutator.settle_move("src", "dst")  # src/b's "copy" is not its bytes
    assert state() == kept


# -- the same seam on Azure (Azurite, the tree written by the real registry 3.1.1) ------------


@pytest.fixture(scope="module")
def container(azurite: Azurite, real_sample: tuple[Path, realtools.SampleInfo]) -> Container:
    return fill_container(azurite, real_sample[0], "regfsck-killed")


@needs_azure
def test_azure_undo_killed_between_the_copies_of_a_tag_is_finished(container: Container
                                                                    ) -> None:
    """On Azure a move is the same copy (read back against its source), then delete: the
    undo of rm killed after the first of the tag's two copies back is finished by the next
    `undo --break-lock` (every blob back byte for byte: Azure gives a copy a new ETag), and
    a fresh registry 3 serves every tag. Before: every later undo refused."""
    box = container.clone("regfsck-killed-az")
    before, tags = box.tree(), box.tags()
    repo = sorted(tags)[0]
    proc = regfsck("rm", box.url, f"{repo}:{tags[repo][0]}", "--apply", "--no-registry-check",
                   "--json", env=box.env())
    assert proc.returncode == 0, proc.stderr
    killed = run_killed(MUTATOR, ("copy_checked", QUARANTINE, 1, "after"), "undo", box.url,
                        "--no-registry-check", "--json",
                        env={**box.env(), "REGFSCK_S3_JOBS": "1"})
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    proc = regfsck("undo", box.url, "--no-registry-check", "--break-lock", "--json",
                   env=box.env())
    assert proc.returncode == 0, (proc.stdout, proc.stderr)

    def contents(snap: dict[str, tuple[str, str]]) -> dict[str, str]:
        return {name: digest for name, (_, digest) in snap.items()}

    assert contents(box.tree()) == contents(before)
    assert not box.keys_below(LOCK)
    box.serves_every_tag(tags)
