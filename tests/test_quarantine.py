"""The journaled run: every change is undoable byte for byte, crashes are recoverable.

Most tests work on a small hand-made v2 tree (no registry needed); the crash tests kill a
real child process with SIGKILL at chosen points between journal writes and renames.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from regfsck.quarantine import (
    QUARANTINE_DIR,
    RUN_ID_RE,
    QuarantineError,
    Run,
    UndoConflictError,
    check_run_id,
    list_runs,
    new_run_id,
)
from regfsck.root import RegistryRoot, locate
from regfsck.session import MutationSession, mutation_session
from regfsck.storage import StorageError, UnsafePathError
from tests.support import REPO_ROOT
from tests.support.sessions import purge, recover, undo
from tests.support.snapshot import content_snapshot, registry_snapshot
from tests.support.snapshot import snapshot as tree_snapshot
from tests.support.tree import build

OLD_NS = 1_600_000_000_000_000_000


def make_tree(root: Path) -> RegistryRoot:
    """A small v2 tree with old mtimes (so restoring them is visible)."""
    build(root, {
        "blobs/sha256/aa/aaaa/data": b"blob a" * 100,
        "blobs/sha256/bb/bbbb/data": b"blob b",
        "repositories/r/_layers/sha256/aaaa/link": b"sha256:aaaa",
        "repositories/r/_manifests/tags/t/current/link": b"sha256:bbbb",
        "repositories/r/_uploads/u1/data": b"partial",
        "repositories/r/_uploads/u1/startedat": b"2024-01-01T00:00:00Z",
        "repositories/r/_manifests/tags/empty": None,
    }, base_mtime_ns=OLD_NS)
    return locate(root)


@pytest.fixture
def tree(tmp_path: Path) -> RegistryRoot:
    return make_tree(tmp_path / "root")


def test_run_id_is_sortable_and_validated() -> None:
    early = new_run_id(datetime(2024, 1, 1, tzinfo=UTC))
    late = new_run_id(datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC))
    assert RUN_ID_RE.fullmatch(early) and early < late
    with pytest.raises(QuarantineError):
        check_run_id("../../etc")


def test_every_change_is_undone_byte_for_byte(tree: RegistryRoot) -> None:
    before = registry_snapshot(tree.root)
    with mutation_session(tree, command="test") as session, \
            Run.begin(session, {"why": "all ops"}) as run:
        run.quarantine("blobs/sha256/aa/aaaa")  # a directory
        run.quarantine("repositories/r/_uploads/u1/data")  # a file
        run.create_file("repositories/r/_layers/sha256/cccc/link", b"sha256:cccc")  # new dirs
        run.replace_file("repositories/r/_manifests/tags/t/current/link", b"sha256:aaaa")
        assert run.remove_empty_dirs(["repositories/r/_manifests/tags/empty",
                                      "repositories/r/_uploads"]) == [
            "repositories/r/_manifests/tags/empty"]  # _uploads is not empty: skipped
        run.finish()
    v2 = tree.v2
    assert not (v2 / "blobs/sha256/aa/aaaa").exists()
    assert (tree.root / run.path / "v2/blobs/sha256/aa/aaaa/data").read_bytes() == b"blob a" * 100
    assert (v2 / "repositories/r/_manifests/tags/t/current/link").read_bytes() == b"sha256:aaaa"
    assert (v2 / "repositories/r/_layers/sha256/cccc/link").read_bytes() == b"sha256:cccc"
    assert not (v2 / "repositories/r/_manifests/tags/empty").exists()
    assert not list(v2.rglob("*.tmp"))
    [info] = list_runs(tree)
    assert (info.run_id, info.command, info.status) == (run.run_id, "test", "complete")
    assert info.bytes == 600 + len(b"partial") + len(b"sha256:bbbb")
    assert info.details == {"why": "all ops"}

    result = undo(tree)
    assert (result.moved_back, result.files_removed, result.dirs_recreated) == (3, 2, 1)
    assert result.dirs_removed == 1  # cccc/ was created for the new link
    assert registry_snapshot(tree.root) == before
    assert [r.status for r in list_runs(tree)] == ["reverted"]
    held = [p for p in (tree.root / run.path / "v2").rglob("*") if not p.is_dir()]
    assert held == []  # only empty directories are left of the payload
    # The files the run created are not deleted: they wait in the run's undone/ for purge.
    undone = sorted(p for p in (tree.root / run.path / "undone").rglob("*") if p.is_file())
    assert list_runs(tree)[0].bytes == sum(p.stat().st_size for p in undone) > 0
    with pytest.raises(QuarantineError, match="already reverted"):
        undo(tree, run.run_id)
    with pytest.raises(QuarantineError, match="nothing to undo"):
        undo(tree)


def test_a_run_cannot_begin_without_an_open_session(tree: RegistryRoot) -> None:
    """The lock and recovery are not something a caller may forget: Run.begin takes an
    open mutation session and refuses anything else, before touching the tree."""
    before = registry_snapshot(tree.root)
    with pytest.raises(QuarantineError, match="inside an open mutation session"):
        Run.begin(tree, {})  # type: ignore[arg-type]  # a root, as Run.begin took before
    with mutation_session(tree, command="test") as session:
        assert session.active and session.lock.held
    assert not session.active and not session.lock.held
    with pytest.raises(QuarantineError, match="inside an open mutation session"):
        Run.begin(session, {})  # the session has ended: the lock is released
    fake = MutationSession(tree, "test", session.lock, session.storage)  # never opened
    with pytest.raises(QuarantineError, match="inside an open mutation session"):
        Run.begin(fake, {})
    assert registry_snapshot(tree.root) == before
    assert not (tree.root / QUARANTINE_DIR).exists()


def test_undo_recover_and_purge_take_a_session_too(tree: RegistryRoot) -> None:
    """Every way into changing the tree or its quarantine goes through a mutation session:
    undo, recover and purge refuse a root (as they took before) or a closed session; a
    quarantine session (purge's: only the lock) recovers nothing and begins no run."""
    from regfsck import quarantine

    with mutation_session(tree, command="gc") as session:
        run = Run.begin(session, {})
        run.quarantine("blobs/sha256/aa/aaaa")
        run._journal.close()  # the process died here: the run stays "running"
    after_crash = registry_snapshot(tree.root)
    for call in (lambda s: quarantine.undo(s), lambda s: quarantine.recover(s),
                 lambda s: quarantine.purge(s, timedelta(0))):
        with pytest.raises(QuarantineError, match="inside an open mutation session"):
            call(tree)  # a root
        with pytest.raises(QuarantineError, match="inside an open mutation session"):
            call(session)  # ended
    with mutation_session(tree, command="purge", tree=False) as purging:
        assert purging.lock.held and purging.recovered == []
        with pytest.raises(QuarantineError, match="inside an open mutation session"):
            Run.begin(purging, {})
        with pytest.raises(QuarantineError, match="inside an open mutation session"):
            quarantine.undo(purging)
        assert quarantine.purge(purging, timedelta(0)).kept == [run.run_id]  # still open
    assert registry_snapshot(tree.root) == after_crash
    assert [r.status for r in list_runs(tree)] == ["running"]


def test_a_session_recovers_interrupted_runs_first(tree: RegistryRoot) -> None:
    before = registry_snapshot(tree.root)
    with mutation_session(tree, command="gc") as session:
        run = Run.begin(session, {})
        run.quarantine("blobs/sha256/aa/aaaa")
        run._journal.close()  # the process died here: the run stays "running"
    assert not (tree.v2 / "blobs/sha256/aa/aaaa").exists()
    seen: list[list[str]] = []
    with mutation_session(tree, command="rm", on_recovered=seen.append) as session:
        assert registry_snapshot(tree.root) == before  # reverted before the command goes on
    [message] = session.recovered
    assert seen == [[message]] and run.run_id in message and "reverted" in message
    assert [r.status for r in list_runs(tree)] == ["reverted"]


def test_undo_of_a_run_recovery_just_reverted_does_nothing_more(tree: RegistryRoot) -> None:
    """`regfsck undo` after a crash: the session's recovery reverts the interrupted run,
    which was the run to undo; the undo says so and reverts no older run (by default or
    named). Naming another run undoes that one after the recovery."""
    import json

    from tests.support.cli import invoke

    with mutation_session(tree, command="gc") as session:
        older = Run.begin(session, {})
        older.quarantine("repositories/r/_uploads/u1")
        older.finish()
    after_older = registry_snapshot(tree.root)
    for args in ((), "crashed"):
        with mutation_session(tree, command="gc") as session:
            crashed = Run.begin(session, {})
            crashed.quarantine("blobs/sha256/aa/aaaa")
            crashed._journal.close()  # the process died here: the run stays "running"
        named = (crashed.run_id,) if args else ()
        result = invoke("undo", str(tree.root), *named, "--json")
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        assert document["run_id"] == crashed.run_id and document["reverted_by_recovery"]
        [message] = document["recovered"]
        assert crashed.run_id in message and "reverted" in message
        assert registry_snapshot(tree.root) == after_older
    statuses = {r.run_id: r.status for r in list_runs(tree)}
    assert statuses[older.run_id] == "complete"
    with mutation_session(tree, command="gc") as session:
        crashed = Run.begin(session, {})
        crashed.quarantine("blobs/sha256/aa/aaaa")
        crashed._journal.close()
    result = invoke("undo", str(tree.root), older.run_id, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["run_id"], document["reverted_by_recovery"]) == (older.run_id, False)
    assert len(document["recovered"]) == 1 and crashed.run_id in document["recovered"][0]
    assert {r.run_id: r.status for r in list_runs(tree)}[older.run_id] == "reverted"


def test_undo_takes_the_newest_run_first(tree: RegistryRoot) -> None:
    with mutation_session(tree, command="one") as session:
        first = Run.begin(session, {})
        first.quarantine("blobs/sha256/aa/aaaa")
        first.finish()
        after_first = registry_snapshot(tree.root)
        second = Run.begin(session, {}, command="two")
        second.quarantine("blobs/sha256/bb/bbbb")
        second.finish()
    assert first.run_id < second.run_id
    assert undo(tree).run_id == second.run_id
    assert registry_snapshot(tree.root) == after_first
    assert undo(tree).run_id == first.run_id


def sibling_runs(tree: RegistryRoot) -> tuple[Run, Run]:
    """Run A makes `repositories/team/` with a link in `team/a/`, then run B one in `team/b/`."""
    runs: list[Run] = []
    for name in ("a", "b"):
        with mutation_session(tree, command=name) as session, Run.begin(session, {}) as run:
            run.create_file(f"repositories/team/{name}/_layers/sha256/{name * 4}/link",
                            f"sha256:{name * 4}".encode())
            run.finish()
        runs.append(run)
    return runs[0], runs[1]


def test_undoing_the_later_run_finishes_an_earlier_out_of_order_undo(
        tree: RegistryRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A makes `team/` with a file in `team/a/`; run B puts a file in `team/b/`. Undo A
    first: `team/` holds B's, so A's undo keeps it. Undoing B then finishes A's undo:
    `team/` goes too, and the tree is as before A (files' times included). When that
    finishing step fails, B's undo is still done (a warning says so), A stays reverted,
    and the next undo that takes something finishes it."""
    from regfsck.storage import FilesystemStorage

    before = registry_snapshot(tree.root, mtimes="files")
    a, b = sibling_runs(tree)
    first = undo(tree, a.run_id)
    assert any(k.startswith("repositories/team:") for k in first.kept), first.kept
    assert (tree.v2 / "repositories/team/b").is_dir()

    real = FilesystemStorage.remove_empty_dir

    def failing(self: FilesystemStorage, path: str) -> None:
        if path.endswith("repositories/team"):
            raise StorageError(5, "remove directory repositories/team: injected failure", path)
        real(self, path)

    monkeypatch.setattr(FilesystemStorage, "remove_empty_dir", failing)
    second = undo(tree, b.run_id)
    assert second.finished == [] and any(a.run_id in w and "could not be finished" in w
                                         for w in second.warnings), second
    assert (tree.v2 / "repositories/team").is_dir()
    states = {r.run_id: r.status for r in list_runs(tree)}
    assert states == {a.run_id: "reverted", b.run_id: "reverted"}

    monkeypatch.setattr(FilesystemStorage, "remove_empty_dir", real)
    with mutation_session(tree, command="c") as session, Run.begin(session, {}) as c:
        c.create_file("blobs/sha256/cc/cccc/data", b"c")
        c.finish()
    third = undo(tree, c.run_id)
    assert [f["run_id"] for f in third.finished] == [a.run_id], third
    assert registry_snapshot(tree.root, mtimes="files") == before


def test_a_later_undo_reads_an_older_runs_journal_only_when_it_may_finish_it(
        tree: RegistryRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reverted run whose undo kept a file for good (rewritten since) is not planned
    again at every later undo (its journal may be a gc's million lines): its meta.json
    says why it kept what. One that kept a directory for a later run's files is."""
    from regfsck import quarantine as quarantine_module

    with mutation_session(tree, command="a") as session, Run.begin(session, {}) as a:
        a.create_file("repositories/r/mine/link", b"sha256:aaaa")
        a.finish()
    (tree.v2 / "repositories/r/mine/link").write_bytes(b"sha256:user")  # the user's now
    assert "repositories/r/mine/link" in [k.split(":")[0] for k in undo(tree, a.run_id).kept]
    read: list[str] = []
    real = quarantine_module._read_journal

    def counting(storage: Any, path: str) -> Any:
        read.append(path)
        return real(storage, path)

    monkeypatch.setattr(quarantine_module, "_read_journal", counting)
    with mutation_session(tree, command="c") as session, Run.begin(session, {}) as c:
        c.create_file("blobs/sha256/cc/cccc/data", b"c")
        c.finish()
    assert undo(tree, c.run_id).finished == []
    assert not [path for path in read if a.run_id in path], read
    first, second = sibling_runs(tree)
    undo(tree, first.run_id)
    read.clear()
    assert [f["run_id"] for f in undo(tree, second.run_id).finished] == [first.run_id]
    assert [path for path in read if first.run_id in path] and \
        not [path for path in read if a.run_id in path], read


def test_undo_refuses_when_the_tree_changed_since(tree: RegistryRoot) -> None:
    with mutation_session(tree, command="test") as session, Run.begin(session, {}) as run:
        run.quarantine("blobs/sha256/bb/bbbb")
        run.create_file("blobs/sha256/cc/cccc/data", b"new")
        run.finish()
    (tree.v2 / "blobs/sha256/bb/bbbb").mkdir()  # something new where the blob was
    changed = registry_snapshot(tree.root)
    with pytest.raises(UndoConflictError, match="something new exists"):
        undo(tree)
    assert registry_snapshot(tree.root) == changed  # refused before touching anything
    (tree.v2 / "blobs/sha256/bb/bbbb").rmdir()
    (tree.v2 / "blobs/sha256/cc/cccc/data").write_bytes(b"NEW")  # same size, other bytes
    # Rewritten since: no longer the run's file. It stays where it is (never deleted), the
    # rest of the run is undone, and the result says what was kept and why.
    result = undo(tree)
    assert (tree.v2 / "blobs/sha256/cc/cccc/data").read_bytes() == b"NEW"
    assert (tree.v2 / "blobs/sha256/bb/bbbb/data").read_bytes() == b"blob b"
    assert "blobs/sha256/cc/cccc/data" in [k.split(":")[0] for k in result.kept]


def test_create_refuses_an_existing_target_and_unsafe_paths(tree: RegistryRoot) -> None:
    with mutation_session(tree, command="test") as session, Run.begin(session, {}) as run:
        with pytest.raises(QuarantineError, match="already exists"):
            run.create_file("blobs/sha256/bb/bbbb/data", b"x")
        for bad in ("../outside", "/etc/passwd", "blobs/../../x", "a\x00b"):
            with pytest.raises(UnsafePathError):
                run.create_file(bad, b"x")
            with pytest.raises(UnsafePathError):
                run.quarantine(bad)
        with pytest.raises(QuarantineError, match="does not exist"):
            run.quarantine("blobs/sha256/ff/ffff")
        run.finish()
    assert (tree.v2 / "blobs/sha256/bb/bbbb/data").read_bytes() == b"blob b"


def test_never_writes_through_a_symlink(tree: RegistryRoot, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep me")
    (tree.v2 / "repositories/evil").symlink_to(outside)
    before_outside = tree_snapshot(outside)
    with mutation_session(tree, command="test") as session, Run.begin(session, {}) as run:
        with pytest.raises((StorageError, QuarantineError), match="symbolic link"):
            run.create_file("repositories/evil/new", b"x")
        with pytest.raises(StorageError):
            run.quarantine("repositories/evil/victim")
        run.quarantine("repositories/evil")  # the link itself moves, not its target
        run.finish()
    assert tree_snapshot(outside) == before_outside
    held = tree.root / run.path / "v2/repositories/evil"
    assert held.is_symlink() and os.readlink(held) == str(outside)
    undo(tree)
    assert (tree.v2 / "repositories/evil").is_symlink()
    assert tree_snapshot(outside) == before_outside


def _open_paths() -> list[str]:
    """What this process's descriptors name."""
    named = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            named.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # (the listing's own descriptor, closed by now)
            continue
    return named


def _open_below(root: Path) -> list[str]:
    """What this process holds open below ROOT (the storage's held ROOT itself aside)."""
    return [path for path in _open_paths() if path.startswith(f"{root}/")]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_a_directory_moved_or_removed_in_a_batch_is_never_reached_through_its_old_descriptor(
        tree: RegistryRoot) -> None:
    """Within a batch the storage keeps each directory it reached open (`hold_dirs`). A
    directory the batch then moves away, or removes, and makes again must get the new
    file, never the quarantined or deleted directory the old descriptor still names; and
    no descriptor outlives the run."""
    before = registry_snapshot(tree.root)
    layer_dir = "repositories/r/_layers/sha256/aaaa"
    with mutation_session(tree, command="test") as session, Run.begin(session, {}) as run:
        with run.batch():
            # Read through the run's storage (as repair re-checks a link): keeps the directory.
            assert run.storage.read_small(f"docker/registry/v2/{layer_dir}/link", 64) == b"sha256:aaaa"
            run.quarantine(layer_dir)  # queued in the same batch: no flush in between
            run.create_file(f"{layer_dir}/link", b"sha256:new")
            run.create_file("repositories/r/_manifests/tags/empty/current/link", b"sha256:bbbb")
        with run.batch():
            assert run.storage.lstat_raw("docker/registry/v2/repositories/r/_manifests/tags/empty") \
                is not None
            run.quarantine("repositories/r/_manifests/tags/empty")
            run.create_file("repositories/r/_manifests/tags/empty/x", b"again")
        run.finish()
    moved = tree.root / run.path / "v2" / layer_dir
    assert (moved / "link").read_bytes() == b"sha256:aaaa"  # the old one, alone
    assert sorted(p.name for p in moved.iterdir()) == ["link"]
    assert (tree.v2 / layer_dir / "link").read_bytes() == b"sha256:new"
    assert sorted(p.name for p in (tree.v2 / "repositories/r/_manifests/tags/empty").iterdir()) == ["x"]
    assert _open_below(tree.root) == []
    undo(tree)
    assert registry_snapshot(tree.root) == before
    assert _open_below(tree.root) == []

    with mutation_session(tree, command="test") as session, Run.begin(session, {}) as run:
        with run.batch():  # removed, then made again in the next batch
            run.storage.lstat_raw("docker/registry/v2/repositories/r/_manifests/tags/empty/x")
        assert run.remove_empty_dirs(["repositories/r/_manifests/tags/empty"]) == [
            "repositories/r/_manifests/tags/empty"]
        run.create_file("repositories/r/_manifests/tags/empty/y", b"y")
        run.finish()
    assert (tree.v2 / "repositories/r/_manifests/tags/empty/y").read_bytes() == b"y"
    assert _open_below(tree.root) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_a_session_leaves_no_descriptor_open_once_it_ends(tree: RegistryRoot) -> None:
    """A session's storage closes its descriptors when the session ends, not when the
    garbage collector frees it, which it may never do: every scan freezes the garbage
    cycles that exist at that moment (`gc.freeze`), and an undo plan's closures are such
    a cycle, pointing at the storage. One descriptor of ROOT stayed open per undo."""
    for _ in range(3):
        with mutation_session(tree, command="test") as session, \
                Run.begin(session, {}) as run:
            run.quarantine("blobs/sha256/aa/aaaa")
            run.finish()
        undo(tree)
    del session, run
    gc.collect()
    assert [path for path in _open_paths()
            if path == str(tree.root) or path.startswith(f"{tree.root}/")] == []


def test_a_failing_run_is_reverted_by_default(tree: RegistryRoot) -> None:
    before = registry_snapshot(tree.root)
    with pytest.raises(RuntimeError), mutation_session(tree, command="test") as session, \
            Run.begin(session, {}) as run:
        run.quarantine("blobs/sha256/aa/aaaa")
        run.create_file("repositories/r/new/link", b"x")
        raise RuntimeError("boom")
    assert registry_snapshot(tree.root) == before
    [info] = list_runs(tree)
    assert info.status == "reverted"


def test_a_failing_finish_policy_run_keeps_its_changes(tree: RegistryRoot) -> None:
    with pytest.raises(RuntimeError), mutation_session(tree, command="gc") as session, \
            Run.begin(session, {}, on_crash="finish") as run:
        run.quarantine("blobs/sha256/aa/aaaa")
        raise RuntimeError("boom")
    assert not (tree.v2 / "blobs/sha256/aa/aaaa").exists()
    [info] = list_runs(tree)
    assert info.status == "interrupted" and "boom" in (info.note or "")
    undo(tree)
    assert (tree.v2 / "blobs/sha256/aa/aaaa/data").exists()


def test_streamed_create_and_returned_digest(tree: RegistryRoot, tmp_path: Path) -> None:
    big = os.urandom(3 * (1 << 20) + 5)
    source = tmp_path / "big"
    source.write_bytes(big)
    with mutation_session(tree, command="test") as session, Run.begin(session, {}) as run, \
            source.open("rb") as handle:
        digest = run.create_file("blobs/sha256/dd/dddd/data", handle)
        run.create_file("blobs/sha256/ee/eeee/data", iter([b"a", b"b"]))
        run.finish()
    assert digest == "sha256:" + hashlib.sha256(big).hexdigest()
    assert (tree.v2 / "blobs/sha256/dd/dddd/data").read_bytes() == big
    assert (tree.v2 / "blobs/sha256/ee/eeee/data").read_bytes() == b"ab"


def test_purge_deletes_old_runs_for_good(tree: RegistryRoot) -> None:
    with mutation_session(tree, command="test") as session:
        run = Run.begin(session, {})
        run.quarantine("blobs/sha256/aa/aaaa")
        run.finish()
        open_run = Run.begin(session, {})  # still running: never purged
    young = purge(tree, timedelta(hours=1))
    assert young.runs == [] and young.bytes_freed == 0
    later = datetime.now(UTC) + timedelta(hours=2)
    preview = purge(tree, timedelta(hours=1), dry_run=True, now=later)
    assert preview.runs == [run.run_id] and preview.bytes_freed >= 600
    assert (tree.root / run.path).exists()
    done = purge(tree, timedelta(hours=1), now=later)
    assert done.runs == [run.run_id] and done.bytes_freed == preview.bytes_freed
    assert not (tree.root / run.path).exists()
    assert open_run.run_id in done.kept
    assert not (tree.v2 / "blobs/sha256/aa/aaaa").exists()  # purged means gone for good


# --------------------------------------------------------------------------- property


OPS = st.lists(st.tuples(st.sampled_from(["move", "batch", "create", "replace", "rmdir"]),
                         st.integers(0, 50)), max_size=12)


@pytest.mark.slow  # over a second (--durations)
@settings(max_examples=int(os.environ.get("QUARANTINE_EXAMPLES", "40")), deadline=None)
@given(ops=OPS)
def test_any_sequence_of_changes_undoes_exactly(tmp_path_factory: pytest.TempPathFactory,
                                                ops: list[tuple[str, int]]) -> None:
    root = make_tree(tmp_path_factory.mktemp("prop") / "root")
    before = registry_snapshot(root.root)
    with mutation_session(root, command="prop") as session, Run.begin(session, {}) as run:
        for number, (op, pick) in enumerate(ops):
            entries = sorted(p.relative_to(root.v2).as_posix() for p in root.v2.rglob("*"))
            files = [e for e in entries if (root.v2 / e).is_file()]
            dirs = [e for e in entries if (root.v2 / e).is_dir()]
            if op == "move" and entries:
                run.quarantine(entries[pick % len(entries)])
            elif op == "batch" and entries:
                chosen: list[str] = []
                for candidate in entries[pick % len(entries)::3]:
                    if not any(candidate.startswith(c + "/") or c.startswith(candidate + "/")
                               for c in chosen):
                        chosen.append(candidate)
                run.quarantine_batch(chosen)
            elif op == "create" and dirs:
                run.create_file(f"{dirs[pick % len(dirs)]}/new{number}/f", b"%d" % number)
            elif op == "replace" and files:
                run.replace_file(files[pick % len(files)], b"replaced %d" % number)
            elif op == "rmdir" and dirs:
                run.remove_empty_dirs([dirs[pick % len(dirs)]])
        run.finish()
    undo(root)
    assert registry_snapshot(root.root) == before


# A fixed vocabulary of paths in `make_tree` (and names made below them), so the same
# changes can be asked of a run batched and of one that is not.
VOCAB_DIRS = ["blobs/sha256/aa", "blobs/sha256/aa/aaaa", "blobs/sha256/bb/bbbb",
              "repositories/r", "repositories/r/_layers/sha256/aaaa",
              "repositories/r/_manifests/tags/t/current", "repositories/r/_uploads/u1",
              "repositories/r/_manifests/tags/empty", "repositories/r/_layers"]
VOCAB_FILES = ["blobs/sha256/aa/aaaa/data", "blobs/sha256/bb/bbbb/data",
               "repositories/r/_layers/sha256/aaaa/link",
               "repositories/r/_manifests/tags/t/current/link",
               "repositories/r/_uploads/u1/data", "repositories/r/_uploads/u1/startedat"]
BATCH_OPS = st.lists(st.tuples(st.sampled_from(["move", "move_file", "create", "replace",
                                                "rmdir", "look"]),
                               st.integers(0, 20), st.integers(0, 2)), max_size=12)


def _vocabulary_change(run: Run, op: str, pick: int, name: int, number: int) -> None:
    """One change named by the vocabulary; "look" reads through the run's storage (what
    repair does before a rewrite), which keeps the directory open within a batch."""
    directory, file = VOCAB_DIRS[pick % len(VOCAB_DIRS)], VOCAB_FILES[pick % len(VOCAB_FILES)]
    if op == "move":
        run.quarantine(directory)
    elif op == "move_file":
        run.quarantine(file)
    elif op == "create":
        run.create_file(f"{directory}/n{name}/f", b"made %d" % number)
    elif op == "replace":
        run.replace_file(file, b"replaced %d" % number)
    elif op == "rmdir":
        run.remove_empty_dirs([f"{directory}/n{name}", directory])
    else:
        with contextlib.suppress(StorageError):
            run.storage.lstat_raw(f"docker/registry/v2/{directory}/n{name}/f")
            run.storage.read_small(f"docker/registry/v2/{file}", 1 << 16)


@settings(max_examples=int(os.environ.get("QUARANTINE_EXAMPLES", "25")), deadline=None)
@given(ops=BATCH_OPS)
@example(ops=[("look", 4, 0), ("move", 4, 0), ("create", 4, 0)])  # kept, moved, made again
@example(ops=[("create", 7, 1), ("look", 7, 1), ("move", 7, 0), ("create", 7, 1)])
def test_changes_queued_in_one_batch_leave_the_tree_as_made_one_by_one(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int]]) -> None:
    """Within a batch the disk does not show the queued changes yet and the storage keeps
    the directories it reached open (`hold_dirs`): the same changes, with reads through the
    run's storage between them, leave exactly the tree the same changes made one at a time
    leave, refuse the same ones, and undo restores the tree either way."""
    results = []
    for batched in (False, True):
        root = make_tree(tmp_path_factory.mktemp("batched") / "root")
        before = registry_snapshot(root.root)
        refused = []
        with mutation_session(root, command="prop") as session, Run.begin(session, {}) as run:
            with run.batch() if batched else contextlib.nullcontext():
                for number, (op, pick, name) in enumerate(ops):
                    try:
                        _vocabulary_change(run, op, pick, name, number)
                    except QuarantineError:
                        refused.append(number)
            run.finish()
        assert _open_below(root.root) == []
        results.append((content_snapshot(root.root / "docker"), refused, run.moved, run.created))
        undo(root)
        assert registry_snapshot(root.root) == before
    assert results[0] == results[1]


RUN_OPS = st.lists(st.tuples(st.sampled_from(["move", "create", "replace", "rmdir", "recreate"]),
                             st.integers(0, 50)), max_size=8)


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("QUARANTINE_EXAMPLES", "40")), deadline=None)
@given(runs=st.lists(RUN_OPS, min_size=2, max_size=4),
       order=st.lists(st.integers(0, 9), min_size=4, max_size=4))
@example(runs=[[("create", 0)], [("create", 1)]], order=[0, 1, 0, 0])  # B's file in A's new dir
@example(runs=[[("move", 1)], [("recreate", 0)]], order=[0, 1, 0, 0])  # A's file back by B
@example(runs=[[("move", 4)], [("recreate", 0), ("move", 4)]], order=[0, 0, 0, 0])
@example(runs=[[("move", 4), ("move", 0)], [("recreate", 0), ("move", 0)]], order=[0, 0, 0, 0])
@example(runs=[[("move", 4)], [("move", 0), ("recreate", 0), ("move", 0), ("recreate", 0)]],
         order=[0, 0, 0, 0])
@example(runs=[[("move", 4)], [("move", 48), ("recreate", 0), ("move", 1), ("recreate", 0)]],
         order=[0, 0, 0, 0])
@example(runs=[[("move", 22)], [("move", 0), ("move", 0)], [("recreate", 0)]],
         order=[0, 0, 0, 0])  # the rm's path comes back once its parent does
def test_runs_undone_in_any_order_they_allow_restore_the_tree(
        tmp_path_factory: pytest.TempPathFactory, runs: list[list[tuple[str, int]]],
        order: list[int]) -> None:
    """Several runs (moves, creations, replacements, directory removals, a file an earlier
    run moved away written again with its bytes; each on what the runs before left), then
    every run undone in a drawn order: an undo refused (a newer run to undo first) is
    tried again after the others, the newest run left is never refused, and at the end
    the tree is the original: paths, bytes, files' mtimes (a directory's mtime may be the
    one a newer run found, undone out of order)."""
    root = make_tree(tmp_path_factory.mktemp("runs") / "root")
    before = registry_snapshot(root.root, mtimes="files")
    made: list[str] = []
    moved: dict[str, bytes] = {}  # files the runs moved away, with their bytes
    for number, ops in enumerate(runs):
        with mutation_session(root, command=f"r{number}") as session, \
                Run.begin(session, {}) as run:
            for step, (op, pick) in enumerate(ops):
                entries = sorted(p.relative_to(root.v2).as_posix() for p in root.v2.rglob("*"))
                files = [e for e in entries if (root.v2 / e).is_file()]
                dirs = [e for e in entries if (root.v2 / e).is_dir()]
                if op == "move" and entries:
                    chosen = entries[pick % len(entries)]
                    if chosen in files:
                        moved[chosen] = (root.v2 / chosen).read_bytes()
                    run.quarantine(chosen)
                elif op == "recreate" and (free := [f for f in sorted(moved)
                                                    if not (root.v2 / f).exists()]):
                    chosen = free[pick % len(free)]
                    run.create_file(chosen, moved[chosen])
                elif op == "create" and dirs:
                    run.create_file(f"{dirs[pick % len(dirs)]}/new{number}x{step}/f", b"%d" % step)
                elif op == "replace" and files:
                    run.replace_file(files[pick % len(files)], b"replaced %d %d" % (number, step))
                elif op == "rmdir" and dirs:
                    run.remove_empty_dirs([dirs[pick % len(dirs)]])
            run.finish()
        made.append(run.run_id)
    pending = sorted(made, key=lambda run_id: (order[made.index(run_id)], run_id))  # drawn order
    while pending:
        refused: list[str] = []
        for run_id in pending:
            try:
                undo(root, run_id)
            except UndoConflictError:
                refused.append(run_id)
        assert max(pending) not in refused, f"the newest run left, of {pending}, was refused"
        pending = refused
    assert registry_snapshot(root.root, mtimes="files") == before


# --------------------------------------------------------------------------- crashes

CRASH_SCRIPT = textwrap.dedent("""
    import contextlib, os, signal, sys
    from regfsck.root import locate
    from regfsck.storage import FilesystemStorage
    from regfsck.quarantine import Run
    from regfsck.session import mutation_session

    root, policy, method, match, nth, when, batched = sys.argv[1:8]
    seen = [0]
    original = getattr(FilesystemStorage, method)

    def crashing(self, path, *args, **kwargs):
        hit = match in path and when in ("before", "after")
        if hit:
            seen[0] += 1
        if hit and seen[0] == int(nth) and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(self, path, *args, **kwargs)
        if hit and seen[0] == int(nth) and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(FilesystemStorage, method, crashing)
    with mutation_session(locate(root), command="crashtest") as session:
        run = Run.begin(session, {}, on_crash=policy)
        with run.batch() if batched == "batched" else contextlib.nullcontext():
            run.quarantine_batch(["blobs/sha256/aa/aaaa", "blobs/sha256/bb/bbbb"])
            run.quarantine("repositories/r/_uploads/u1")
            run.replace_file("repositories/r/_manifests/tags/t/current/link", b"sha256:aaaa")
            run.create_file("repositories/r/_layers/sha256/cccc/link", b"sha256:cccc")
            run.create_file("blobs/sha256/cc/cccc/data", b"blob c")
        run.remove_empty_dirs(["repositories/r/_manifests/tags/empty"])
        run.finish()
    print("finished")
""")

# (storage method, substring of its path argument, which matching call, before/after it):
# every boundary between a journal write and the change it announces. New files are
# written ahead into the run's `new/` ("/new/1" is the replacing link, "/new/3" the blob).
CRASH_POINTS = [
    ("rename_noreplace", "blobs/sha256/aa", 1, "before"),  # batch journaled, nothing moved
    ("rename_noreplace", "blobs/sha256/aa", 1, "after"),  # batch half moved, "done" not journaled
    ("rename_noreplace", "current/link", 1, "after"),  # replace: old link out, new one not yet in
    ("write_new_file", "/new/1", 1, "before"),  # new link about to be written ahead
    ("write_new_file", "/new/1", 1, "after"),  # written ahead, not journaled yet
    ("rename_noreplace", "/new/1", 1, "before"),  # journaled with its bytes, not renamed
    ("rename_noreplace", "/new/1", 1, "after"),  # new link in place, "done" not journaled
    ("adopt", "/new/3", 1, "after"),  # the new blob given its owner, not renamed yet
    ("rename_noreplace", "/new/3", 1, "after"),  # the new blob in place, last of its batch
    ("make_dir", "_layers/sha256/cccc", 1, "after"),  # a directory created for a new file
    ("remove_empty_dir", "tags/empty", 1, "after"),
    ("replace_file", "meta.json", 2, "before"),  # finish: journal says finished, meta not yet
]
MODES = ["direct", "batched"]  # each change on its own, or all in one batch


CrashPoint = tuple[str, str, int, str]


def run_crashing(root: Path, policy: str, point: CrashPoint,
                 mode: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(root), policy, *map(str, point),
                           mode], capture_output=True, text=True, env=env, timeout=60, check=False)


def assert_no_leftovers(tree: RegistryRoot) -> None:
    """Nothing half-written in the tree, and nothing written ahead left in any run."""
    assert not list(tree.v2.rglob("*.tmp"))
    assert not list((tree.root / QUARANTINE_DIR).glob("*/new/*"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("point", CRASH_POINTS, ids=lambda p: f"{p[0]}-{p[1]}-{p[3]}")
def test_kill_9_then_recover_reverts(tmp_path: Path, point: CrashPoint, mode: str) -> None:
    tree = make_tree(tmp_path / "root")
    before = registry_snapshot(tree.root)
    proc = run_crashing(tree.root, "revert", point, mode)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    messages = recover(tree)
    assert len(messages) == 1
    if point[0] == "replace_file":  # killed after the journal's finish line: nothing to revert
        assert "had completed" in messages[0]
        assert list_runs(tree)[0].status == "complete"
        undo(tree)
    else:
        assert "reverted" in messages[0]
    assert registry_snapshot(tree.root) == before
    assert recover(tree) == []
    assert_no_leftovers(tree)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("point", CRASH_POINTS, ids=lambda p: f"{p[0]}-{p[1]}-{p[3]}")
def test_kill_9_then_recover_keeps_and_undo_reverts(tmp_path: Path, point: CrashPoint,
                                                    mode: str) -> None:
    tree = make_tree(tmp_path / "root")
    before = registry_snapshot(tree.root)
    proc = run_crashing(tree.root, "finish", point, mode)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    [message] = recover(tree)
    [info] = list_runs(tree)
    assert info.status in ("interrupted", "complete"), message
    # Every path is either in the tree or held in the quarantine, never lost or doubled.
    for rel in ("blobs/sha256/aa/aaaa/data", "blobs/sha256/bb/bbbb/data",
                "repositories/r/_uploads/u1/data"):
        here = (tree.v2 / rel).exists()
        held = (tree.root / info.path / "v2" / rel).exists()
        assert here != held, rel
    assert_no_leftovers(tree)
    undo(tree)
    assert registry_snapshot(tree.root) == before


def test_kill_9_during_undo_then_recover_finishes_the_undo(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "root")
    before = registry_snapshot(tree.root)
    with mutation_session(tree, command="test") as session, Run.begin(session, {}) as run:
        run.quarantine("blobs/sha256/aa/aaaa")
        run.quarantine("blobs/sha256/bb/bbbb")
        run.create_file("repositories/r/x/link", b"x")
        run.finish()
    script = textwrap.dedent("""
        import os, signal, sys
        from regfsck.root import locate
        from regfsck.storage import FilesystemStorage
        from regfsck import quarantine
        from regfsck.session import mutation_session
        original = FilesystemStorage.rename_noreplace
        def crashing(self, *a, **k):
            original(self, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        FilesystemStorage.rename_noreplace = crashing
        with mutation_session(locate(sys.argv[1]), command="undo") as session:
            quarantine.undo(session)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(tree.root)], env=env, timeout=60,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list_runs(tree)[0].status == "undoing"
    [message] = recover(tree)
    assert "undo" in message
    assert registry_snapshot(tree.root) == before
    assert list_runs(tree)[0].status == "reverted"


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_9_while_an_undo_finishes_an_older_one_then_recover(tmp_path: Path, when: str) -> None:
    """Run A makes team/a, run B team/b; undo A keeps `team/`; the undo of B, finishing A's,
    is SIGKILLed just before or just after it removes `team/`. The next session's
    recovery carries A's finish to its end: the tree is as before A, both runs reverted."""
    tree = make_tree(tmp_path / "root")
    before = registry_snapshot(tree.root, mtimes="files")
    a, b = sibling_runs(tree)
    undo(tree, a.run_id)
    script = textwrap.dedent("""
        import os, signal, sys
        from regfsck.root import locate
        from regfsck.storage import FilesystemStorage
        from regfsck import quarantine
        from regfsck.session import mutation_session
        original = FilesystemStorage.remove_empty_dir
        def crashing(self, path):
            if path.endswith("repositories/team") and sys.argv[3] == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, path)
            if path.endswith("repositories/team"):
                os.kill(os.getpid(), signal.SIGKILL)
        FilesystemStorage.remove_empty_dir = crashing
        with mutation_session(locate(sys.argv[1]), command="undo") as session:
            quarantine.undo(session, sys.argv[2])
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(tree.root), b.run_id, when],
                          env=env, timeout=60, capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert {r.run_id: r.status for r in list_runs(tree)} == {a.run_id: "undoing",
                                                              b.run_id: "reverted"}
    [message] = recover(tree)
    assert a.run_id in message and "undo" in message, message
    assert registry_snapshot(tree.root, mtimes="files") == before
    assert {r.status for r in list_runs(tree)} == {"reverted"}


def test_torn_journal_line_is_tolerated(tree: RegistryRoot) -> None:
    with mutation_session(tree, command="test") as session:
        run = Run.begin(session, {})
        run.quarantine("blobs/sha256/aa/aaaa")
    journal = tree.root / run.path / "journal.jsonl"
    with journal.open("ab") as handle:
        handle.write(b'{"ev": "intent", "seq": 2, "op": "mo')  # the crash cut it here
    recover(tree)  # revert policy
    assert (tree.v2 / "blobs/sha256/aa/aaaa/data").exists()
    meta = json.loads((tree.root / run.path / "meta.json").read_text())
    assert meta["status"] == "reverted"


def test_the_journal_read_a_chunk_at_a_time_reads_as_read_whole(
        tree: RegistryRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    """Journals are read in chunks (a million-change journal is not held whole): lines
    cut by any chunk boundary read the same; only an unterminated last line is a torn
    append (left out), a damaged line ending in a newline is damage wherever it falls."""
    from regfsck import quarantine as quarantine_module
    from regfsck.storage import FilesystemStorage

    with mutation_session(tree, command="test") as session, Run.begin(session, {}) as run:
        run.quarantine("blobs/sha256/aa/aaaa")
        run.create_file("repositories/r/_layers/sha256/cccc/link", b"sha256:cccc")
        run.replace_file("repositories/r/_manifests/tags/t/current/link", b"sha256:aaaa")
        run.finish("three changes")
    storage = FilesystemStorage(tree.root)
    journal = f"{run.path}/journal.jsonl"
    path = tree.root / journal
    good = path.read_bytes()

    def read() -> list[tuple[int, str, str, bool, Any]]:
        parsed = quarantine_module._read_journal(storage, journal)
        assert parsed.finished and parsed.note == "three changes"
        return [(c.seq, c.op, c.rel, c.done, c.done_info) for c in parsed.changes]

    monkeypatch.setattr(quarantine_module, "JOURNAL_CHUNK", 1 << 20)
    whole = read()
    assert [op for _, op, _, _, _ in whole] == ["move", "mkdir", "create", "move", "create"]
    for chunk in range(1, 90):
        monkeypatch.setattr(quarantine_module, "JOURNAL_CHUNK", chunk)
        path.write_bytes(good)
        assert read() == whole
        path.write_bytes(good + b'{"ev":"intent","seq":99,"op":"mo')  # torn append
        assert read() == whole
        path.write_bytes(good.replace(b"\n", b"\n{\"ev\":\n", 1))  # damage, then more
        with pytest.raises(QuarantineError, match=r"damaged journal .*line 2"):
            read()


def test_quarantine_must_be_on_the_same_filesystem(tree: RegistryRoot) -> None:
    dev_shm = Path("/dev/shm")
    if not dev_shm.is_dir() or os.stat(dev_shm).st_dev == os.stat(tree.root).st_dev:
        pytest.skip("no second filesystem to test with")
    target = Path(os.environ.get("TMPDIR_SHM", "/dev/shm")) / f"regfsck-q-{os.getpid()}-{time.time_ns()}"
    target.mkdir()
    try:
        (tree.root / QUARANTINE_DIR).symlink_to(target)
        with pytest.raises((QuarantineError, StorageError)), \
                mutation_session(tree, command="test") as session:
            Run.begin(session, {})
        assert list(target.iterdir()) == []  # nothing written through the symlink either
    finally:
        os.rmdir(target)


def test_proven_chunks_are_recorded_by_their_digest_and_a_mismatch_writes_nothing(
        tree: RegistryRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob streamed through `hashing.proven` is recorded by its digest without a second
    sha256 pass; bytes that are not that blob stop the write and leave nothing staged."""
    from regfsck import quarantine as quarantine_module
    from regfsck.hashing import DigestMismatch, proven

    data = b"a blob proven on the way" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    hashed: list[int] = []

    class Counting:
        def __init__(self) -> None:
            self._inner = hashlib.sha256()

        def update(self, chunk: bytes) -> None:
            hashed.append(len(chunk))
            self._inner.update(chunk)

        def hexdigest(self) -> str:
            return self._inner.hexdigest()

    import types
    monkeypatch.setattr(quarantine_module, "hashlib", types.SimpleNamespace(sha256=Counting))
    with mutation_session(tree, command="test") as session, Run.begin(session, {}) as run:
        written = run.create_file("blobs/sha256/cc/cccc/data", proven([data[:100], data[100:]], digest))
        assert written == digest and hashed == []
        with pytest.raises(DigestMismatch):
            run.create_file("blobs/sha256/dd/dddd/data", proven([data, b"!"], digest))
        run.finish()
    assert (tree.v2 / "blobs/sha256/cc/cccc/data").read_bytes() == data
    assert not (tree.v2 / "blobs/sha256/dd").exists()
    staging = tree.root / run.path / "new"
    assert not staging.exists() or sorted(p.name for p in staging.iterdir()) == []
    intents = [json.loads(line) for line in (tree.root / run.path / "journal.jsonl").read_text().splitlines()]
    assert [e["sha256"] for e in intents if e.get("op") == "create"] == [digest.removeprefix("sha256:")]
