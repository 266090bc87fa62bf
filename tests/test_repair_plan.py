"""The repair planner on the shipped fixture (no real tools needed): properties of link
rewrites, never-guess rules for tags, and how an interrupted or failing apply ends."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regfsck import layout
from regfsck.graph import ManifestStore
from regfsck.quarantine import list_runs
from regfsck.repair import Applier, RepairError, RepairPlan, apply_plan, plan_repair
from regfsck.root import locate
from regfsck.scanner import Scanner
from regfsck.session import mutation_session
from regfsck.storage import FilesystemStorage
from regfsck.verify import VerifyOptions
from regfsck.why import ReferenceGraph
from tests.realtools import SampleInfo, materialize_fixture
from tests.support import V2, cli
from tests.support.sessions import undo
from tests.support.snapshot import registry_snapshot

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
INFO = SampleInfo.from_json(json.loads((FIXTURES / "registry.json").read_text()))


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One fixture copy for property tests (each example restores what it changed)."""
    meta = json.loads((FIXTURES / "registry.json").read_text())
    yield materialize_fixture(FIXTURES / "registry", tmp_path_factory.mktemp("plan") / "root",
                              meta.get("empty_dirs", []))


STRUCTURE = VerifyOptions(check_data=False)


def plan_of(root: Path) -> RepairPlan:
    plan, _, _ = plan_repair(locate(root), [], check=STRUCTURE)
    return plan


@settings(max_examples=40)
@given(content=st.binary(max_size=120))
def test_any_revision_link_content_becomes_the_path_digest(shared_root: Path,
                                                           content: bytes) -> None:
    repo, _, digest = INFO.oci_index
    link = shared_root / V2 / layout.revision_link(repo, digest)
    original = link.read_bytes()
    link.write_bytes(content)
    try:
        fixes = [f for f in plan_of(shared_root).fixes if f.path == layout.revision_link(repo, digest)]
    finally:
        link.write_bytes(original)
    if content == digest.encode():
        assert fixes == []
    else:
        assert [(f.action, f.content, f.old_content) for f in fixes] == [
            ("rewrite_link", digest, content)]


@settings(max_examples=40)
@given(junk=st.binary(max_size=80))
def test_current_link_is_rewritten_only_when_nothing_contradicts(shared_root: Path,
                                                                 junk: bytes) -> None:
    repo, tag, digest = INFO.docker_list
    link = shared_root / V2 / layout.tag_current_link(repo, tag)
    link.write_bytes(junk)
    try:
        plan = plan_of(shared_root)
    finally:
        link.write_bytes(digest.encode())
    fixes = [f for f in plan.fixes if f.path == layout.tag_current_link(repo, tag)]
    refused = [u for u in plan.unfixable if u.finding.tag == tag and u.finding.repo == repo]
    if junk == digest.encode():
        assert fixes == [] and refused == []
        return
    text = junk.decode("ascii", "replace").strip().strip("\x00").lower()
    names_other = text.startswith("sha256:") and len(text) == 71 and text != digest and all(
        c in "0123456789abcdef" for c in text[7:])
    if names_other:
        assert fixes == [] and refused
    else:
        assert [(f.action, f.content) for f in fixes] == [("rewrite_link", digest)]


def test_alias_layer_link_is_left_alone(fixture_root: Path) -> None:
    """A `_layers` link under sha512 holds a sha256 digest by design: never rewritten."""
    target = INFO.blobs["layer/a-b"]
    alias = layout.layer_link("a/b", "sha512:" + "a" * 128)
    path = fixture_root / V2 / alias
    path.parent.mkdir(parents=True)
    path.write_bytes(target.encode() + b"\n")
    plan = plan_of(fixture_root)
    assert not [f for f in plan.fixes if f.path == alias]
    assert [u.finding.kind for u in plan.unfixable if u.finding.path.endswith(alias)] == [
        "link_invalid"]


def test_lost_blob_lists_every_image_through_indexes(fixture_root: Path) -> None:
    """A corrupt platform layer is needed by both multi-arch tags and their untagged children."""
    layer = INFO.blobs["layer/arm64"]
    path = fixture_root / V2 / layout.blob_data(layer)
    path.write_bytes(b"rotten" + path.read_bytes()[6:])
    plan, _, _ = plan_repair(locate(fixture_root), [], check=VerifyOptions())
    assert [(b.digest, b.images) for b in plan.lost] == [
        (layer, ["multi/docker:latest", "multi/oci:latest"])]
    # cross-check with the reference graph: every tag whose tree reaches the layer
    registry = locate(fixture_root)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    graph = ReferenceGraph(inventory, ManifestStore(storage, inventory))
    tagged = {f"{repo}:{t}" for repo, d in graph.tag_roots() if layer in graph.reach([d])
              for t in graph.tags_of(repo, d)}
    assert tagged == set(plan.repush)


def _damage_links(root: Path) -> list[str]:
    """Three damaged revision links; returns their paths."""
    paths = []
    for repo, digests in sorted(INFO.revisions.items())[:3]:
        rel = layout.revision_link(repo, digests[0])
        (root / V2 / rel).write_bytes(b"")
        paths.append(rel)
    return paths


class StopAfter(threading.Event):
    """An event that reports itself set after `n` questions (a Ctrl-C between two fixes)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        return self.n < 0


def test_interrupt_between_fixes_keeps_a_finished_undoable_run(fixture_root: Path) -> None:
    _damage_links(fixture_root)
    damaged = registry_snapshot(fixture_root, mtimes="files")
    registry = locate(fixture_root)
    plan = plan_of(fixture_root)
    assert len(plan.fixes) == 3
    with mutation_session(registry, command="repair") as session:
        done = apply_plan(session, plan, [], stop=StopAfter(1))
    run_id, interrupted = done.run_id, done.interrupted
    assert interrupted and run_id
    assert [o.status if o else "planned" for o in done.outcomes] == ["applied", "planned", "planned"]
    assert [r.status for r in list_runs(registry)] == ["complete"]
    assert len(plan_of(fixture_root).fixes) == 2  # the rest is still to do
    undo(registry, run_id)
    assert registry_snapshot(fixture_root, mtimes="files") == damaged


def test_failure_midway_reverts_the_whole_run(fixture_root: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _damage_links(fixture_root)
    damaged = registry_snapshot(fixture_root, mtimes="files")
    registry = locate(fixture_root)
    plan = plan_of(fixture_root)
    real = Applier._rewrite_link
    calls = {"n": 0}

    def flaky(self: Applier, fix: object) -> str | None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RepairError("disk full (simulated)")
        return real(self, fix)  # type: ignore[arg-type]

    monkeypatch.setattr(Applier, "_rewrite_link", flaky)
    with pytest.raises(RepairError), mutation_session(registry, command="repair") as session:
        apply_plan(session, plan, [])
    assert registry_snapshot(fixture_root, mtimes="files") == damaged
    assert [r.status for r in list_runs(registry)] == ["reverted"]


def test_changed_link_is_skipped_not_overwritten(fixture_root: Path) -> None:
    paths = _damage_links(fixture_root)
    registry = locate(fixture_root)
    plan = plan_of(fixture_root)
    (fixture_root / V2 / paths[1]).write_bytes(b"written meanwhile")
    with mutation_session(registry, command="repair") as session:
        done = apply_plan(session, plan, [])
    statuses = {f.path: o.status if o else "planned" for f, o in zip(plan.fixes, done.outcomes, strict=True)}
    assert statuses[paths[1]] == "skipped" and statuses[paths[0]] == "applied"
    assert (fixture_root / V2 / paths[1]).read_bytes() == b"written meanwhile"


def test_follow_on_findings_are_not_reported_as_unfixable(fixture_root: Path) -> None:
    """Rewriting the subject's revision link also ends `subject_missing` and the tags'
    `tag_revision_missing`: the plan must not list them for the operator."""
    repo, _, subject, _ = INFO.artifact
    (fixture_root / V2 / layout.revision_link(repo, subject)).write_bytes(subject.encode() + b" ")
    plan = plan_of(fixture_root)
    assert [(f.action, f.digest) for f in plan.fixes] == [("rewrite_link", subject)]
    kinds = {u.finding.kind for u in plan.unfixable}
    assert not kinds & {"subject_missing", "tag_revision_missing", "link_invalid"}, kinds


def test_ambiguous_tag_is_listed_once(fixture_root: Path) -> None:
    repo, tag, _ = INFO.untagged
    (fixture_root / V2 / layout.tag_current_link(repo, tag)).write_bytes(b"\n")
    plan = plan_of(fixture_root)
    listed = [u for u in plan.unfixable if u.finding.repo == repo and u.finding.tag == tag]
    assert len(listed) == 1 and "cannot choose" in listed[0].advice


def _intents(root: Path) -> int:
    """Changes journaled so far by the (single) run in the quarantine."""
    journals = list((root / "regfsck-quarantine").glob("*/journal.jsonl"))
    if not journals:
        return 0
    return journals[0].read_bytes().count(b'"ev":"intent"')


@pytest.mark.slow  # over a second (--durations)
@pytest.mark.parametrize("kill_after", [0, 1, 7, 25])
def test_kill_9_during_apply_is_recovered_exactly(tmp_path: Path, kill_after: int) -> None:
    """A repair killed after N journaled changes: recover (run by the next mutating command)
    puts the damaged tree back exactly, and a new repair then fixes everything."""
    import signal
    import subprocess
    import time


    meta = json.loads((FIXTURES / "registry.json").read_text())
    root = materialize_fixture(FIXTURES / "registry", tmp_path / "root", meta["empty_dirs"])
    clean = {(f.kind, f.path) for f in plan_repair(locate(root), [], check=STRUCTURE)[1].findings}
    for repo, digests in INFO.revisions.items():
        for digest in digests:
            (root / V2 / layout.revision_link(repo, digest)).write_bytes(digest.encode() + b"\n")
    for repo in ("a/b", "compress/zstd", "library/base"):
        for link in (root / V2 / "repositories" / repo / "_layers").rglob("link"):
            link.unlink()
    damaged = registry_snapshot(root, mtimes="files")
    proc = subprocess.Popen(cli.command("repair", str(root), "--apply", "--no-data"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli.child_env())
    deadline = time.monotonic() + 60
    while kill_after and _intents(root) < kill_after and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    registry = locate(root)
    runs = list_runs(registry)
    if kill_after:
        assert runs and runs[-1].status == "running", "the kill must land inside the run"
    with mutation_session(registry, command="repair") as session:  # what the next command does
        assert len(session.recovered) == (1 if kill_after else 0)
    assert registry_snapshot(root, mtimes="files") == damaged
    assert [r.status for r in list_runs(registry)] == (["reverted"] if kill_after else [])
    result = cli.run("repair", str(root), "--apply", "--no-data", "--json")
    assert json.loads(result.stdout)["applied"] is True, result.stderr
    after = {(f.kind, f.path) for f in plan_repair(locate(root), [], check=STRUCTURE)[1].findings}
    assert after == clean


def test_symlinked_link_is_left_to_the_operator(fixture_root: Path, tmp_path: Path) -> None:
    repo, _, digest = INFO.oci_index
    link = fixture_root / V2 / layout.revision_link(repo, digest)
    outside = tmp_path / "outside"
    outside.write_bytes(digest.encode())
    link.unlink()
    link.symlink_to(outside)
    plan = plan_of(fixture_root)
    assert not [f for f in plan.fixes if f.path == layout.revision_link(repo, digest)]
    assert "symlink" in {u.finding.kind for u in plan.unfixable}
    with mutation_session(locate(fixture_root), command="repair") as session:
        apply_plan(session, plan, [])
    assert link.is_symlink() and outside.read_bytes() == digest.encode()
