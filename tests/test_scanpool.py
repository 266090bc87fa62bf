"""The walk in worker processes builds the inventory the serial walk builds, and gc's plan
with deferred `_layers` reads is the plan that reads every link (issue 15).

The tree is a synthetic one (benchmarks/synth.py, checked against the real registry by
test_synthetic) with damage of every kind the walk records planted in it: a symbolic
link, link files holding other digests or garbage, a missing link, an empty directory, a
leftover temp file, a blob in the wrong fan-out directory, a blob directory without data.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest

from regfsck import layout, scanpool
from regfsck import manifest as manifest_module
from regfsck.gc import GcOptions, plan_gc
from regfsck.graph import ManifestStore
from regfsck.inventory import UNSTATED
from regfsck.manifest import parse_manifest, unpack_manifest
from regfsck.root import resolve
from regfsck.scanner import Depth, Scanner, settle_blobs
from regfsck.storage import open_storage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import synth

from tests.support import V2
from tests.support.cli import run


def _plant_damage(v2: Path, result: synth.SynthResult) -> tuple[str, str]:
    repos = sorted((v2 / "repositories").glob("*/*/_layers/sha256"))
    # A _layers link naming another (unreferenced) blob, one holding garbage, one missing.
    unreferenced = sorted(result.unreferenced)
    links = sorted(repos[0].glob("*/link"))
    links[0].write_text(unreferenced[0])
    links[1].write_bytes(b"not a digest\n")
    links[2].unlink()
    # An unmarked layer link (orphan layer) whose content names a kept blob.
    orphan_repo = repos[3]
    for link in sorted(orphan_repo.glob("*/link")):
        if link.read_text() in result.unreferenced:
            kept = next(p.read_text() for p in sorted(orphan_repo.glob("*/link"))
                        if p.read_text() not in result.unreferenced)
            link.write_text(kept)
            break
    # A revision link left as a temp file, an unexpected directory beside a link.
    revs = sorted((v2 / "repositories").glob("*/*/_manifests/revisions/sha256/*"))
    (revs[5] / "link").rename(revs[5] / "link.tmp")
    (revs[6] / "extra").mkdir()
    # A blob in a wrong fan-out directory and a blob directory without data.
    blobs = sorted((v2 / "blobs/sha256").glob("*/*"))
    wrong = v2 / "blobs/sha256" / ("00" if blobs[0].parent.name != "00" else "01")
    wrong.mkdir(exist_ok=True)
    shutil.copytree(blobs[0], wrong / blobs[0].name)
    (blobs[1] / "data").rename(blobs[1] / "data.old")
    # An upload without startedat.
    upload = next((v2 / "repositories").glob("*/*/_uploads"))
    (upload / "0b1e4f6d-1f0c-4c55-9c1e-3f3b0b2a9f00").mkdir()
    repo = str(repos[0].parent.parent.relative_to(v2 / "repositories"))
    return repo, f"sha256:{links[0].parent.name}"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[str, str]]:
    root = tmp_path_factory.mktemp("scanpool") / "root"
    result = synth.generate(root, synth.SynthConfig(repositories=40, seed=3))
    return root, _plant_damage(root / V2, result)


def _scan(root: Path, processes: str, monkeypatch: pytest.MonkeyPatch, **kw: Depth) -> object:
    monkeypatch.setenv("REGFSCK_SCAN_PROCESSES", processes)
    registry = resolve(root, None)
    return Scanner(open_storage(registry), registry, **kw).scan()


@pytest.mark.parametrize("depth", list(Depth))
def test_processes_build_the_serial_inventory(damaged: tuple[Path, tuple[str, str]],
                                              monkeypatch: pytest.MonkeyPatch,
                                              depth: Depth) -> None:
    root, _ = damaged
    serial = _scan(root, "1", monkeypatch, depth=depth)
    forked = _scan(root, "3", monkeypatch, depth=depth)
    assert not serial.manifests  # type: ignore[attr-defined]
    assert forked.manifests  # type: ignore[attr-defined]  # the workers read them
    if depth is Depth.LIST:
        # The workers hand over the rows of the manifests they read: what looking inside
        # those blob directories later (`settle_blobs`) finds.
        unstated = [d for d, b in serial.blobs.items()  # type: ignore[attr-defined]
                    if b.size == UNSTATED]
        stated = [d for d, b in forked.blobs.items()  # type: ignore[attr-defined]
                  if b.size != UNSTATED]
        assert stated and set(stated) <= set(unstated)
        for inv in (serial, forked):
            settle_blobs(open_storage(resolve(root, None)), inv, stated)  # type: ignore[arg-type]
    assert list(forked.blobs.items()) == list(serial.blobs.items())  # type: ignore[attr-defined]
    assert forked.repositories == serial.repositories  # type: ignore[attr-defined]
    assert forked.anomalies == serial.anomalies  # type: ignore[attr-defined]
    assert forked == serial
    kinds = {a.kind for a in serial.anomalies}  # type: ignore[attr-defined]
    assert {"tmp_leftover", "blob_wrong_fanout", "missing_link", "empty_dir"} <= kinds
    # What is inside a blob directory a dry run only lists is not seen (`settle_blobs`).
    assert ({"blob_missing_data", "unexpected_entry"} <= kinds) is (depth is not Depth.LIST)


@pytest.mark.parametrize("processes", ["1", "3"])
def test_the_walked_inventory_holds_no_cycle(damaged: tuple[Path, tuple[str, str]],
                                             monkeypatch: pytest.MonkeyPatch,
                                             processes: str) -> None:
    """The walk leaves what it made to reference counting (`Scanner.scan` freezes it out of
    the cyclic collector's sight): an inventory dropped must leave no cycle behind, or
    every scan of a long-lived process would leak one."""
    root, _ = damaged
    inv = _scan(root, processes, monkeypatch)
    made: set[int] = set()  # every object the collector tracks that the inventory holds
    todo = [inv]
    while todo:
        obj = todo.pop()
        if (id(obj) not in made and gc.is_tracked(obj)
                and not isinstance(obj, type | types.ModuleType)):  # the program's, not its
            made.add(id(obj))
            todo.extend(gc.get_referents(obj))
    assert len(made) > 500
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable stays in gc.garbage
    try:
        del inv, todo
        gc.unfreeze()
        gc.collect()
        assert [o for o in gc.garbage if id(o) in made] == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_manifests_read_by_workers_equal_the_store_s(damaged: tuple[Path, tuple[str, str]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = damaged
    registry = resolve(root, None)
    forked = _scan(root, "3", monkeypatch)
    serial = _scan(root, "1", monkeypatch)
    early = ManifestStore(open_storage(registry), forked)  # type: ignore[arg-type]
    late = ManifestStore(open_storage(registry), serial)  # type: ignore[arg-type]
    digests = sorted(forked.manifests)  # type: ignore[attr-defined]
    assert [early.load(d) for d in digests] == [late.load(d) for d in digests]
    assert not forked.manifests  # type: ignore[attr-defined]  # each taken once


def test_workers_hand_over_manifests_packed_with_the_parents_string_numbers() -> None:
    """A worker packs what it reads only with the string numbers it inherited (its parent
    knows no others): a manifest with a media type the table lacks crosses as its bytes,
    and the table does not grow in the worker."""
    image = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": "sha256:" + "a" * 64, "size": 10},
             "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                         "digest": "sha256:" + "b" * 64, "size": 20}]}
    raw = json.dumps(image).encode()
    size, packed = scanpool._packed_or_raw(raw)  # type: ignore[misc]
    assert size == len(raw) and unpack_manifest(packed) == parse_manifest(raw)
    image["layers"][0]["mediaType"] = "application/x-never-seen-before"  # type: ignore[index]
    odd = json.dumps(image).encode()
    strings = len(manifest_module._STRINGS)
    assert scanpool._packed_or_raw(odd) == odd
    assert len(manifest_module._STRINGS) == strings
    assert scanpool._packed_or_raw(b"{not json") == b"{not json"


def test_forked_walk_parses_no_manifest_of_a_real_shape(damaged: tuple[Path, tuple[str, str]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every manifest of the synthetic tree (the registry's own media types) arrives packed,
    its digests the inventory's strings: the parent parsed none of them."""
    root, _ = damaged
    parsed: list[bytes] = []
    parse = ManifestStore._parse
    monkeypatch.setattr(ManifestStore, "_parse",
                        staticmethod(lambda raw: parsed.append(raw) or parse(raw)))
    forked = _scan(root, "3", monkeypatch)
    manifests = forked.manifests  # type: ignore[attr-defined]
    assert parsed == []
    assert manifests and all(type(packed) is tuple for _, packed in manifests.values())
    blobs = {d: d for d in forked.blobs}  # type: ignore[attr-defined]
    shared = [ref for _, packed in manifests.values() for ref in packed[1:] if ref in blobs]
    assert shared and all(ref is blobs[ref] for ref in shared)


def test_gc_plan_with_deferred_layer_reads_is_the_full_read_plan(
        damaged: tuple[Path, tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Deferring the `_layers` reads changes one thing: a link at the path of a kept blob
    that holds another (unreferenced) digest is kept, where reading it would remove it.
    Every other damaged link (at a path the plan acts on, or holding garbage) and every
    other part of the plan are the same."""
    root, mismatched = damaged
    registry = resolve(root, None)
    options = GcOptions(grace=timedelta(0), force=True)
    for processes in ("1", "3"):
        monkeypatch.setenv("REGFSCK_SCAN_PROCESSES", processes)
        deferred = plan_gc(registry, options)
        monkeypatch.setattr("regfsck.gc.Scanner", _FullReadScanner)
        full = plan_gc(registry, options)
        monkeypatch.undo()
        ours = {(v.repo, v.digest) for v in deferred.layer_links}
        theirs = {(v.repo, v.digest) for v in full.layer_links}
        assert theirs - ours == {mismatched}
        # ours has no extra victim: the orphan layer link whose content names a kept
        # blob was read before planning, as the full read does.
        assert ours < theirs
        for part in ("blobs", "manifests", "uploads", "blocked_by", "repositories",
                     "empty_link_dirs", "orphan_referrers", "tag_dirs"):
            assert deferred.to_json()[part] == full.to_json()[part], part
        assert len(deferred.removal_list) == len(full.removal_list) - 1
        for removal in full.removal_list:
            if removal.phase == "layer_links":
                assert f"{removal.path}/link" in deferred.seen_links


class _FullReadScanner(Scanner):
    def __init__(self, *args: object, **kw: object) -> None:
        kw.pop("depth", None)
        super().__init__(*args, **kw)  # type: ignore[arg-type]


def _blocked_cli_plans(root: Path, *processes: str) -> list[dict[str, object]]:
    """`gc ROOT --grace 0 --json` with each number of walk processes; each must be
    blocked (exit 3) by the damage planted in ROOT."""
    docs = []
    for count in processes:
        env = {**os.environ, "REGFSCK_SCAN_PROCESSES": count}
        out = run("gc", str(root), "--grace", "0", "--json", env=env, timeout=600)
        assert out.returncode == 3, out.stderr
        docs.append(json.loads(out.stdout))
    return docs


def test_cli_plan_equals_serial_plan(damaged: tuple[Path, tuple[str, str]]) -> None:
    root, _ = damaged
    docs = _blocked_cli_plans(root, "1", "4")
    assert docs[0] == docs[1]
    assert docs[0]["blocked_by"]


def test_workers_manifest_reads_never_follow_a_symlinked_blob_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers read manifests as `<hex>/data` through their fan-out directory's descriptor
    (which follows a symbolically linked `<hex>`): the result must still be the serial
    walk's, where such a blob does not exist. Also a revision whose fan-out directory is
    missing altogether: no crash, the same findings."""
    root = tmp_path / "root"
    synth.generate(root, synth.SynthConfig(repositories=12, seed=5))
    v2 = root / V2
    revs = sorted((v2 / "repositories").glob("*/*/_manifests/revisions/sha256/*"))
    # Manifest blob directory replaced by a symbolic link to a copy of another manifest's.
    victim, other = revs[0].name, revs[1].name
    victim_dir = v2 / "blobs/sha256" / victim[:2] / victim
    shutil.rmtree(victim_dir)
    os.symlink(v2 / "blobs/sha256" / other[:2] / other, victim_dir)
    # A revision whose blob's whole fan-out directory is gone.
    gone = next(r.name for r in revs[2:] if r.name[:2] not in (victim[:2], other[:2]))
    shutil.move(v2 / "blobs/sha256" / gone[:2], tmp_path / "fanout")
    registry = resolve(root, None)
    forked = _scan(root, "3", monkeypatch)
    serial = _scan(root, "1", monkeypatch)
    assert forked.anomalies == serial.anomalies  # type: ignore[attr-defined]
    early = ManifestStore(open_storage(registry), forked)  # type: ignore[arg-type]
    late = ManifestStore(open_storage(registry), serial)  # type: ignore[arg-type]
    for digest in (f"sha256:{victim}", f"sha256:{gone}"):
        assert early.get(digest) is None
        assert early.load(digest) == late.load(digest)
    docs = _blocked_cli_plans(root, "1", "3")  # the symbolic link blocks the plan
    assert docs[0] == docs[1]


def test_dry_run_listing_blob_dirs_plans_what_the_apply_plan_does(
        damaged: tuple[Path, tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The dry run (Depth.LIST) looks inside the directory of a blob or layer link only for
    manifests and victims: its whole plan (victims, reasons, sizes, blocking findings) is
    the one `gc --apply` makes at Depth.STAT, serial and forked, on a tree with a blob
    directory without `data` and a blob in a wrong fan-out directory. One thing it does not
    see: the empty directory of a layer link whose blob is kept (a link deleted by hand),
    which the apply removes as clutter."""
    root, _ = damaged
    registry = resolve(root, None)
    options = GcOptions(grace=timedelta(0), force=True)
    emptied = layout.layer_link(damaged[1][0], "sha256:" + sorted(
        (root / V2 / "repositories" / damaged[1][0] / "_layers/sha256").iterdir(),
        key=lambda p: p.name)[2].name).rpartition("/")[0]
    for processes in ("1", "3"):
        monkeypatch.setenv("REGFSCK_SCAN_PROCESSES", processes)
        listed = plan_gc(registry, options, depth=Depth.LIST).to_json()
        stated = plan_gc(registry, options, depth=Depth.STAT).to_json()
        unseen = f"{layout.V2_PREFIX}/{emptied}"
        assert unseen in stated["empty_link_dirs"]
        stated["empty_link_dirs"].remove(unseen)
        assert listed == stated
        assert listed["blobs"] and listed["blocked_by"]


def _victim_and_kept(root: Path) -> tuple[Path, Path]:
    """The data of a blob gc removes and of a layer blob it keeps, in a fresh copy."""
    registry = resolve(root, None)
    plan = plan_gc(registry, GcOptions(grace=timedelta(0)), depth=Depth.STAT)
    victim = next(b.digest for b in plan.blobs)
    manifests = {d for repo in Scanner(open_storage(registry), registry).scan()
                 .repositories.values() for d in repo.revisions}
    kept = next(p for p in sorted((root / V2 / "blobs/sha256").glob("*/*/data"))
                if f"sha256:{p.parent.name}" not in manifests
                and f"sha256:{p.parent.name}" != victim and p.stat().st_size > 0)
    return root / V2 / layout.blob_data(victim), kept


@pytest.mark.parametrize("where", ["victim", "manifest"])
def test_dry_run_sees_a_symlink_where_it_acts_or_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A victim's or a manifest's `data` made a symbolic link blocks the dry run as it
    blocks the apply plan: both are looked at (`settle_blobs`)."""
    root = tmp_path / "root"
    synth.generate(root, synth.SynthConfig(repositories=6, seed=5))
    registry = resolve(root, None)
    victim, _ = _victim_and_kept(root)
    if where == "victim":
        target = victim
    else:
        digest = sorted(Scanner(open_storage(registry), registry).scan()
                        .repositories.values(), key=lambda r: r.name)[0].revisions.plain()[0]
        target = root / V2 / layout.blob_data(digest)
    target.rename(target.with_name("real"))
    target.symlink_to("real")
    monkeypatch.setenv("REGFSCK_SCAN_PROCESSES", "1")
    listed = plan_gc(registry, GcOptions(grace=timedelta(0)), depth=Depth.LIST)
    stated = plan_gc(registry, GcOptions(grace=timedelta(0)), depth=Depth.STAT)
    assert listed.to_json() == stated.to_json()
    assert "symlink" in {f.kind for f in listed.blocked}


def test_apply_refuses_a_symlink_the_dry_run_does_not_look_at(tmp_path: Path) -> None:
    """A kept layer blob's `data` made a symbolic link to a victim's: the dry run does not
    look inside kept blob directories and plans; `gc --apply` walks at Depth.STAT, sees it
    and refuses (exit 3) with the tree untouched, so the kept image never breaks."""
    root = tmp_path / "root"
    synth.generate(root, synth.SynthConfig(repositories=6, seed=5))
    victim, kept = _victim_and_kept(root)
    kept.unlink()
    kept.symlink_to(os.path.relpath(victim, kept.parent))
    env = {**os.environ, "REGFSCK_SCAN_PROCESSES": "1"}
    dry = run("gc", str(root), "--grace", "0", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    assert not json.loads(dry.stdout)["blocked_by"]
    before = sorted(str(p) for p in (root / V2).rglob("*"))
    applied = run("gc", str(root), "--grace", "0", "--json", "--apply", env=env)
    assert applied.returncode == 3, applied.stderr
    assert "symlink" in {f["kind"] for f in json.loads(applied.stdout)["blocked_by"]}
    assert sorted(str(p) for p in (root / V2).rglob("*")) == before


@pytest.mark.parametrize(("seconds_per_read", "threaded"), [(2e-6, False), (400e-6, True)])
def test_reads_after_the_walk_take_threads_only_once_the_disk_answers_them(
        monkeypatch: pytest.MonkeyPatch, seconds_per_read: float, threaded: bool) -> None:
    """gc's reads after the walk (`settle_blobs`, `read_deferred_layers`) stay in the calling
    thread while each takes what the page cache takes: 16 threads handing the GIL over on
    every system call made them 2x slower warm. Once a stretch of reads averages what a
    disk read takes, the rest go to threads. Results stay in order either way. (A clock
    that advances by what each read is said to take, so the machine's load decides nothing.)"""
    import threading

    from regfsck import scanner

    clock = [0.0]
    monkeypatch.setattr(scanner, "perf_counter", lambda: clock[0])
    lock = threading.Lock()
    where: dict[int, bool] = {}

    def read(item: int) -> int:
        with lock:
            clock[0] += seconds_per_read * 4  # four files an item
            where[item] = threading.current_thread() is threading.main_thread()
        return item * 10

    items = list(range(200))
    assert list(scanner._in_flight(read, items, lambda item: 4)) == [i * 10 for i in items]
    off_main = sorted(item for item, on_main in where.items() if not on_main)
    if not threaded:
        assert off_main == []
    else:  # a probe of PROBE_READS reads (16 items) in the calling thread, then threads
        assert off_main == list(range(scanner.PROBE_READS // 4, 200))
