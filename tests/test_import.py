"""import: planning, writing, refusing, reverting; on copies of the shipped real-registry tree.

tests/test_import_realtools.py imports what skopeo wrote and pulls the result from the real
registry; here the engine and the CLI are checked against the tree and the source alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from regfsck import layout
from regfsck.errors import Interrupted
from regfsck.export import ExportFormat
from regfsck.importer import (
    ImportFailed,
    images_from_index,
    run_import,
)
from regfsck.quarantine import Run, list_runs
from regfsck.root import locate
from regfsck.safety import RootLock
from regfsck.session import mutation_session
from regfsck.sources import SourceError
from regfsck.verify import VerifyOptions, run_verify
from tests.realtools import SampleInfo
from tests.support import REPO_ROOT, V2
from tests.support.cli import invoke as cli
from tests.support.export import export, read_layout_dir
from tests.support.sessions import undo
from tests.support.snapshot import STATE_NAMES, snapshot


@pytest.fixture
def info() -> SampleInfo:
    return SampleInfo.from_json(json.loads((REPO_ROOT / "fixtures" / "registry.json").read_text()))


@pytest.fixture
def full_export(fixture_root: Path, tmp_path: Path, info: SampleInfo) -> Path:
    """Every repository of the fixture exported whole (docker types and schema1 included)."""
    out = tmp_path / "all"
    export(fixture_root, sorted(info.catalog), out)
    return out


@pytest.mark.slow  # over a second (--durations)
def test_export_import_export_gives_identical_layout(full_export: Path, tmp_path: Path,
                                                     info: SampleInfo) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_import(empty, full_export, apply=True)
    plan = result.plan
    assert result.applied and result.run_id
    again = tmp_path / "again"
    export(empty, sorted(info.catalog), again)
    assert read_layout_dir(again) == read_layout_dir(full_export)
    report = run_verify(locate(empty), VerifyOptions(jobs=2))
    assert report.summary.errors == 0, [f.to_json() for f in report.findings]
    assert report.summary.blobs_verified == len(plan.new_blobs)


@pytest.mark.slow  # over a second (--durations)
def test_links_are_the_registrys_byte_format(full_export: Path, tmp_path: Path,
                                             fixture_root: Path, info: SampleInfo) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_import(empty, full_export, apply=True)
    plan = result.plan
    for link in plan.links:
        written = (empty / V2 / link.path).read_bytes()
        assert written == link.digest.encode() and len(written) == 71
    # every link the import wrote exists with the same bytes in the registry-written original
    for link in plan.links:
        original = fixture_root / V2 / link.path
        assert original.read_bytes() == (empty / V2 / link.path).read_bytes(), link.path
    for digest in plan.new_blobs:
        assert (empty / V2 / layout.blob_data(digest)).read_bytes() == (
            fixture_root / V2 / layout.blob_data(digest)).read_bytes()


def test_plan_writes_nothing(fixture_root: Path, tmp_path: Path, info: SampleInfo) -> None:
    source = tmp_path / "base.tar.gz"
    export(fixture_root, ["library/base"], source)
    before = snapshot(fixture_root, mtimes="none", skip=STATE_NAMES)
    result = cli("import", str(fixture_root), str(source), "--repo", "mirror/base", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["applied"] is False and doc["run_id"] is None
    assert doc["blobs"] == [] and doc["existing_blobs"] > 0  # every blob is already there
    assert {link["kind"] for link in doc["links"]} == {"layer", "revision", "tag-index", "tag-current"}
    assert sorted(i["tag"] for i in doc["images"] if i["tag"] is not None) == sorted(
        info.tags["library/base"])
    # The untagged SBOM referrer came along with its subject (export --with-referrers).
    assert [i["digest"] for i in doc["images"] if i["tag"] is None] == [info.artifact[1]]
    assert snapshot(fixture_root, mtimes="none", skip=STATE_NAMES) == before
    assert not (fixture_root / "regfsck-quarantine").exists()


def _only_used_by(info: SampleInfo, repos: set[str]) -> set[str]:
    """Blobs reachable from these repositories' revisions and from no other repository's."""
    def reach(names: set[str]) -> set[str]:
        found: set[str] = set()
        for name in names:
            for digest in info.revisions[name]:
                found |= {digest, *info.references[digest]}
        return found
    return reach(repos) - reach(set(info.revisions) - repos)


def test_import_into_populated_tree_shares_blobs_and_undo_restores(
        full_export: Path, fixture_root: Path, info: SampleInfo) -> None:
    gone = {"multi/oci", "multi/docker"}
    shutil.rmtree(fixture_root / V2 / "repositories/multi")
    unique = _only_used_by(info, gone)
    for digest in unique:
        shutil.rmtree((fixture_root / V2 / layout.blob_data(digest)).parent)
    before = snapshot(fixture_root, mtimes="none", skip=STATE_NAMES)
    result = run_import(fixture_root, full_export, apply=True)
    plan = result.plan
    assert set(plan.new_blobs) == unique
    assert set(plan.existing_blobs) >= set(info.shared_layers) - unique
    assert {link.repo for link in plan.links} == gone  # the other repositories have it all
    with_uploads = {p for p in snapshot(fixture_root, mtimes="none", skip=STATE_NAMES) if "_uploads" in p}
    assert run_verify(locate(fixture_root), VerifyOptions(jobs=2)).summary.errors == 0
    assert not with_uploads - set(before)
    undo(locate(fixture_root), result.run_id)
    assert snapshot(fixture_root, mtimes="none", skip=STATE_NAMES) == before


def test_retag_moves_current_and_keeps_old_revision(fixture_root: Path, info: SampleInfo,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "ab.tar"
    export(fixture_root, ["a/b:latest"], out)
    shutil.copy(out, tmp_path / "ab2.tar")
    repo = "library/base"
    old = info.tags[repo]["latest"]
    before = snapshot(fixture_root, mtimes="none", skip=STATE_NAMES)
    result = run_import(fixture_root, out, repo=repo, apply=True)
    plan = result.plan
    new = info.tags["a/b"]["latest"]
    current = fixture_root / V2 / layout.tag_current_link(repo, "latest")
    assert current.read_bytes() == new.encode()
    assert (fixture_root / V2 / layout.revision_link(repo, old)).read_bytes() == old.encode()
    assert (fixture_root / V2 / layout.tag_index_link(repo, "latest", new)).is_file()
    assert (fixture_root / V2 / layout.tag_index_link(repo, "latest", old)).is_file()
    assert [(r.tag, r.replaces, r.digest) for r in plan.retags] == [("latest", old, new)]
    assert any("moves from" in note for note in plan.notes)
    undo(locate(fixture_root), result.run_id)
    assert snapshot(fixture_root, mtimes="none", skip=STATE_NAMES) == before


def test_corrupt_source_blob_is_refused_before_writing(full_export: Path, tmp_path: Path,
                                                       info: SampleInfo) -> None:
    layer = info.blobs["layer/base"]
    blob = full_export / "blobs" / layer.replace(":", "/")
    raw = bytearray(blob.read_bytes())
    raw[100] ^= 0x01
    blob.write_bytes(bytes(raw))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("import", str(empty), str(full_export))
    assert result.returncode == 1
    assert layer in result.stderr and "corrupt" in result.stderr and "Traceback" not in result.stderr
    assert list(empty.iterdir()) == []


def test_corrupt_blob_found_while_applying_reverts_the_run(full_export: Path, tmp_path: Path,
                                                           info: SampleInfo) -> None:
    """--apply re-plans without re-hashing first; the copy itself catches the damage."""
    layer = info.blobs["layer/zstd"]
    blob = full_export / "blobs" / layer.replace(":", "/")
    blob.write_bytes(blob.read_bytes()[:-1] + b"X")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="corrupt"):  # the source's copy, found as it is read
        run_import(empty, full_export, apply=True)
    tree = empty / V2
    assert [p for p in tree.rglob("*") if p.is_file()] == []  # every blob written was taken back
    [run] = list((empty / "regfsck-quarantine").iterdir())
    assert json.loads((run / "meta.json").read_text())["status"] in ("reverted", "interrupted")


def test_interrupt_while_applying_reverts(full_export: Path, tmp_path: Path) -> None:
    import threading

    empty = tmp_path / "empty"
    empty.mkdir()
    stop = threading.Event()
    seen: list[int] = []

    def on_bytes(n: int) -> None:
        seen.append(n)
        if len(seen) > 3:
            stop.set()

    with pytest.raises(Interrupted):
        run_import(empty, full_export, apply=True, on_bytes=on_bytes, stop=stop)
    assert [p for p in (empty / V2).rglob("*") if p.is_file()] == []


def test_missing_blob_in_source(full_export: Path, tmp_path: Path, info: SampleInfo) -> None:
    config = info.references[info.tags["a/b"]["latest"]][0]
    (full_export / "blobs" / config.replace(":", "/")).unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("import", str(empty), str(full_export), "--apply")
    assert result.returncode == 1
    assert f"blob {config} is neither in" in result.stderr
    assert list(empty.iterdir()) == []  # refused before the tree was even created


def test_refuses_while_the_root_lock_is_held(full_export: Path, fixture_root: Path) -> None:
    before = snapshot(fixture_root, mtimes="none", skip=STATE_NAMES)
    with RootLock(locate(fixture_root)):
        result = cli("import", str(fixture_root), str(full_export), "--apply")
    assert result.returncode == 3 and "another regfsck run" in result.stderr
    assert snapshot(fixture_root, mtimes="none", skip=STATE_NAMES) == before


def test_import_reports_the_recovery_of_an_interrupted_run(fixture_root: Path, tmp_path: Path,
                                                           info: SampleInfo) -> None:
    """Import settles a run a crash left open before writing, as every mutating command
    does, and says so (it used to recover silently and drop the messages)."""
    source = tmp_path / "base.tar.gz"
    export(fixture_root, ["library/base"], source)
    registry = locate(fixture_root)
    tag_dir = fixture_root / V2 / layout.tag_dir("library/base", sorted(info.tags["library/base"])[0])
    for number, output in enumerate((["--json"], [])):
        with mutation_session(registry, command="gc") as session:
            run = Run.begin(session, {})
            run.quarantine(str(tag_dir.relative_to(fixture_root / V2)))
            run._journal.close()  # the process died here: the run stays "running"
        assert not tag_dir.exists()
        result = cli("import", str(fixture_root), str(source), "--repo", f"mirror/base{number}",
                     "--apply", *output)
        assert result.returncode == 0, result.stderr
        if output:
            [message] = json.loads(result.stdout)["recovered"]
            assert run.run_id in message and "reverted" in message
        else:
            assert f"recovered: run {run.run_id} (gc) was interrupted" in result.stderr
        assert tag_dir.is_dir()  # put back before the import wrote anything
        assert next(r.status for r in list_runs(registry) if r.run_id == run.run_id) == "reverted"


def test_refuses_a_directory_that_is_neither_registry_nor_empty(full_export: Path,
                                                                tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    result = cli("import", str(home), str(full_export), "--apply")
    assert result.returncode == 3 and "not empty" in result.stderr
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


def test_damaged_link_in_tree_is_refused(full_export: Path, fixture_root: Path,
                                         info: SampleInfo) -> None:
    digest = info.tags["a/b"]["latest"]
    link = fixture_root / V2 / layout.revision_link("a/b", digest)
    link.write_bytes(digest.encode() + b"\n")
    result = cli("import", str(fixture_root), str(full_export), "--apply")
    assert result.returncode == 1 and "damaged" in result.stderr and "regfsck repair" in result.stderr


@pytest.mark.slow  # over a second (--durations)
def test_new_files_belong_to_the_trees_owner(full_export: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create files for another user")
    empty = tmp_path / "empty"
    (empty / V2).mkdir(parents=True)
    for path in [empty / "docker", empty / "docker/registry", empty / V2]:
        os.chown(path, 4321, 4321)
    result = run_import(empty, full_export, apply=True)
    plan = result.plan
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in (empty / V2).rglob("*")}
    assert owners == {(4321, 4321)}
    assert len(plan.links) > 0


@pytest.mark.parametrize(("names", "repo", "expected"), [
    (["a/b:1"], None, [("a/b", "1")]),
    (["latest"], "x/y", [("x/y", "latest")]),
    (["a/b:1", "c/d:2"], "x/y", [("x/y", "1"), ("x/y", "2")]),
    (["localhost:5000/a/b:v1"], None, [("localhost:5000/a/b", "v1")]),
    ([None], "x/y", [("x/y", None)]),
])
def test_ref_names_map_to_repo_and_tag(names: list[str | None], repo: str | None,
                                       expected: list[tuple[str, str | None]]) -> None:
    digest = "sha256:" + "a" * 64
    entries = [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                "size": 10, **({"annotations": {"org.opencontainers.image.ref.name": n}} if n else {})}
               for n in names]
    images = images_from_index(json.dumps({"manifests": entries}).encode(), repo, "src")
    assert [(i.repo, i.tag) for i in images] == expected


@pytest.mark.parametrize(("names", "message"), [
    (["latest"], "give --repo"),
    ([None], "give --repo"),
    (["Bad/Name:1"], "breaks the reference grammar"),
])
def test_unnamed_or_bad_names_are_refused(names: list[str | None], message: str) -> None:
    entries = [{"digest": "sha256:" + "a" * 64, "size": 1,
                **({"annotations": {"org.opencontainers.image.ref.name": n}} if n else {})} for n in names]
    with pytest.raises(ImportFailed, match=message):
        images_from_index(json.dumps({"manifests": entries}).encode(), None, "src")


def test_not_an_oci_source(tmp_path: Path, fixture_root: Path) -> None:
    docker = tmp_path / "d.tar"
    export(fixture_root, ["a/b:latest"], docker, fmt=ExportFormat.DOCKER_ARCHIVE)
    result = cli("import", str(fixture_root), str(docker))
    assert result.returncode == 2 and "not an OCI archive" in result.stderr
    result = cli("import", str(fixture_root), str(tmp_path / "nothing-here"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_damaged_archives_are_refused(fixture_root: Path, tmp_path: Path, info: SampleInfo) -> None:
    plain, packed = tmp_path / "a.tar", tmp_path / "a.tar.zst"
    export(fixture_root, ["compress/zstd:latest"], plain)
    export(fixture_root, ["compress/zstd:latest"], packed)
    empty = tmp_path / "empty"
    empty.mkdir()
    packed.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])  # truncated stream
    result = cli("import", str(empty), str(packed))
    assert result.returncode == 1 and "zstd stream is truncated" in result.stderr, result.stderr
    raw = bytearray(plain.read_bytes())
    layer = info.zstd[2].split(":")[1]
    start = raw.index(layer.encode()) + 2048  # inside the layer's data, past its header
    raw[start] ^= 0xFF
    plain.write_bytes(bytes(raw))
    result = cli("import", str(empty), str(plain), "--apply")
    assert result.returncode == 1 and f"sha256:{layer} is corrupt" in result.stderr, result.stderr
    assert list(empty.iterdir()) == []
