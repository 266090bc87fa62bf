"""Undo and recover are planned operations (issue 10, items 2, 6 and 7).

Every scenario is an operator sequence on a tree written by the real registry (2.8, and
v3 where noted): imports, pushes through the registry's API or skopeo (cross-repository
mounts included), rm, gc and undo in an order the old undo did not foresee. After each one
the real registry must still serve every image that must survive (skopeo copy checks
digests), and a refused undo must leave the run undoable (never stuck in `undoing`).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests import realtools
from tests.hostile import (
    assert_clean_exit,
    run_cli,
    signal_midway,
    strict_json,
    why_not_pullable,
)
from tests.realtools import OCILayoutWriter, RealRegistry, skopeo_copy
from tests.support.snapshot import registry_snapshot

pytestmark = pytest.mark.realtools


@pytest.fixture(autouse=True)
def _real_tools() -> None:
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(f"real registry tools unavailable: {missing}")


def make_layout(path: Path, seed: str, tags: int = 1, layers: int = 2,
                shared: list[bytes] | None = None) -> OCILayoutWriter:
    """An OCI layout whose tag `1` (and `2`.. up to `tags`) are small images; `shared`
    layer files are added to every image (to share blobs with another layout)."""
    writer = OCILayoutWriter(path)
    for t in range(1, tags + 1):
        made = [writer.add_layer({f"{seed}-{t}-{j}.txt": f"{seed} {t} {j}".encode() * 50}, "gzip")
                for j in range(layers)]
        for k, data in enumerate(shared or []):
            made.append(writer.add_layer({f"shared-{k}.txt": data}, "gzip"))
        writer.add_image(made, tag=str(t), history=[f"ADD {j}" for j in range(len(made))])
    return writer


def cli_ok(*args: str) -> dict[str, object]:
    result = run_cli(*args, "--json")
    assert_clean_exit(result, (0,), " ".join(args[:1]))
    doc = strict_json(result.stdout)
    assert isinstance(doc, dict)
    return doc


def import_run(root: Path, layout: Path, repo: str) -> str:
    realtools.data_dir(root).mkdir(parents=True, exist_ok=True)
    doc = cli_ok("import", str(root), str(layout), "--repo", repo, "--apply")
    run_id = doc.get("run_id")
    assert isinstance(run_id, str), doc
    return run_id


def runs(root: Path) -> dict[str, dict[str, object]]:
    doc = cli_ok("runs", str(root))
    return {str(r["run_id"]): r for r in doc["runs"]}  # type: ignore[attr-defined, index]


def pull(root: Path, refs: list[str], dest: Path, binary: str = realtools.REGISTRY_BIN) -> None:
    """Every ref must be served whole by the real registry (skopeo copies and checks digests)."""
    dest.mkdir(parents=True, exist_ok=True)
    with RealRegistry(root, binary=binary) as registry:
        for n, ref in enumerate(refs):
            skopeo_copy(f"docker://{registry.host}/{ref}", f"dir:{dest / str(n)}", "--all")


def not_served(root: Path, ref: str) -> bool:
    repo, _, tag = ref.rpartition(":")
    with RealRegistry(root) as registry:
        return not registry.manifest_exists(repo, tag)


def assert_not_stuck(root: Path) -> None:
    """No run stays `undoing` or `running`, and a mutating command still runs."""
    states = {r["status"] for r in runs(root).values()}
    assert not states & {"undoing", "running"}, states
    gc = run_cli("gc", str(root), "--grace", "0s", "--uploads-older-than", "0s", "--json")
    assert_clean_exit(gc, (0,), "gc dry-run after the refusal")


# --------------------------------------------------------------------------- item 2


def test_undo_import_keeps_blobs_a_second_import_links(sample_root: Path, tmp_path: Path) -> None:
    """2a: import team/a:1, import the same backup as mirror/a, undo the first: mirror/a:1 stays.

    Into a populated tree (the registry's own sample), so that the import creates no
    top-level directory and the old undo ran to its end (exit 0) having deleted the blobs."""
    root = sample_root
    layout = make_layout(tmp_path / "layout", "a")
    first = import_run(root, layout.path, "team/a")
    import_run(root, layout.path, "mirror/a")
    cli_ok("undo", str(root), first)
    assert why_not_pullable(root, "mirror/a", "1") is None
    pull(root, ["mirror/a:1"], tmp_path / "pulled")
    assert not_served(root, "team/a:1")


def test_undo_import_keeps_blobs_a_cross_repository_mount_uses(sample_root: Path, tmp_path: Path) -> None:
    """2b: import, skopeo copy team/a:1 -> other/x:1 through the registry (blob mounts),
    undo the import: other/x:1 is still pullable (populated tree, as in 2a)."""
    root = sample_root
    layout = make_layout(tmp_path / "layout", "b")
    run_id = import_run(root, layout.path, "team/a")
    with RealRegistry(root) as registry:
        skopeo_copy(f"docker://{registry.host}/team/a:1", f"docker://{registry.host}/other/x:1")
    cli_ok("undo", str(root), run_id)
    assert why_not_pullable(root, "other/x", "1") is None
    pull(root, ["other/x:1"], tmp_path / "pulled")
    # The reverted creations are kept in the run's quarantine, never deleted.
    assert not_served(root, "team/a:1")


def test_recovery_of_a_killed_import_keeps_a_layer_a_user_pushed_since(sample_root: Path,
                                                                        tmp_path: Path) -> None:
    """2c: import --apply killed by SIGKILL, the registry restarted, a user pushes an image
    sharing a layer the import had written; the next gc --apply reverts the import and the
    user's image stays whole (populated tree: the old revert ran to its end, exit 0)."""
    root = sample_root
    layout = make_layout(tmp_path / "layout", "c", tags=40, layers=3)
    result = signal_midway(["import", str(root), str(layout.path), "--repo", "team/a", "--apply"],
                           root, signal.SIGKILL, 60, event="done")
    assert result.returncode == -signal.SIGKILL, "the import finished before the kill"
    v2 = realtools.data_dir(root)
    written = [d for d in (p.name for p in (v2 / "blobs/sha256").glob("*/*")) if
               (v2 / "blobs/sha256" / d[:2] / d / "data").is_file()
               and layout.blob_path(f"sha256:{d}").is_file()]
    assert written, "the killed import wrote no blob"
    layer_hex = None
    data = b""
    # A layer blob of the import present on disk (layers are gzip, not JSON).
    for hexpart in written:
        data = (v2 / "blobs/sha256" / hexpart[:2] / hexpart / "data").read_bytes()
        if data[:2] == b"\x1f\x8b":
            layer_hex = hexpart
            break
    assert layer_hex is not None
    user = OCILayoutWriter(tmp_path / "user")
    layer = realtools.Layer({"mediaType": realtools.MT_OCI_LAYER_GZIP,
                             "digest": f"sha256:{layer_hex}", "size": len(data)}, "sha256:" + "0" * 64)
    user.add_blob(data, realtools.MT_OCI_LAYER_GZIP)
    own = user.add_layer({"user.txt": b"the user's own layer"}, "gzip")
    image = user.add_image([layer, own], tag="1", history=["ADD shared", "ADD own"])
    with RealRegistry(root) as registry:
        registry.push_from_layout(user, "users/img", image, "1")
    gc = run_cli("gc", str(root), "--apply", "--json")
    assert_clean_exit(gc, (0,), "gc after the killed import")
    assert strict_json(gc.stdout)["recovered"], "the killed import was not recovered"
    assert why_not_pullable(root, "users/img", "1") is None
    pull(root, ["users/img:1"], tmp_path / "pulled")


# --------------------------------------------------------------------------- item 6


def test_undo_rm_after_gc_refuses_and_names_the_gc_run(sample_root: Path, tmp_path: Path) -> None:
    """6 + 7: rm two tags -> gc --delete-untagged --apply -> undo the rm: refused before
    anything moves (exit 3), naming the gc run; nothing stuck; undo gc then rm works."""
    rm_doc = cli_ok("rm", str(sample_root), "a/b/c:latest", "a/b/c:v2", "--apply")
    rm_id = str(rm_doc["run_id"])
    gc_doc = cli_ok("gc", str(sample_root), "--delete-untagged", "--grace", "0s", "--apply")
    gc_id = str(gc_doc["run_id"] if "run_id" in gc_doc else gc_doc["apply"]["run_id"])  # type: ignore[index]
    before = registry_snapshot(sample_root)
    refused = run_cli("undo", str(sample_root), rm_id)
    assert_clean_exit(refused, (3,), "undo of the rm under the gc")
    assert gc_id.encode() in refused.stderr, refused.stderr
    assert registry_snapshot(sample_root) == before, "a refused undo changed the tree"
    assert runs(sample_root)[rm_id]["status"] == "complete"
    assert_not_stuck(sample_root)
    cli_ok("undo", str(sample_root), gc_id)
    cli_ok("undo", str(sample_root), rm_id)
    pull(sample_root, ["a/b/c:latest", "a/b/c:v2"], tmp_path / "pulled")


def test_undo_import_a_later_run_took_over_refuses_and_names_it(sample_root: Path,
                                                                tmp_path: Path) -> None:
    """import A as team/a:1 -> import B as team/a:1 (B moves A's tag link into its
    quarantine) -> gc --delete-untagged (moves A's image, untagged now) -> undo A: refused,
    naming both later runs, nothing changed. Undone newest first, all three restore the
    tree byte for byte. (Before: A's undo went ahead; B's undo then brought A's tag back
    without its image, gc's undo refused for a parent A's undo had removed, and A's files
    stayed for good. Found by the randomized sequence hunt.)"""
    root = sample_root
    original = registry_snapshot(root)
    first = import_run(root, make_layout(tmp_path / "a", "a").path, "team/a")
    second = import_run(root, make_layout(tmp_path / "b", "b").path, "team/a")
    gc_doc = cli_ok("gc", str(root), "--delete-untagged", "--grace", "0s", "--apply")
    gc_id = str(gc_doc["run_id"] if "run_id" in gc_doc else gc_doc["apply"]["run_id"])  # type: ignore[index]
    before = registry_snapshot(root)
    planned = run_cli("undo", str(root), first, "--dry-run", "--json")
    assert_clean_exit(planned, (3,), "dry run of the undo two later runs block")
    doc = strict_json(planned.stdout)
    assert doc["blockers"] == sorted([second, gc_id]) and doc["applied"] is False
    refused = run_cli("undo", str(root), first)
    assert_clean_exit(refused, (3,), "undo of the import two later runs changed")
    assert second.encode() in refused.stderr and gc_id.encode() in refused.stderr
    assert registry_snapshot(root) == before, "a refused undo changed the tree"
    assert_not_stuck(root)
    pull(root, ["team/a:1"], tmp_path / "pulled")
    for run_id in (gc_id, second, first):
        cli_ok("undo", str(root), run_id)
    assert registry_snapshot(root) == original


def test_undo_import_after_a_repush_of_its_tag(tmp_path: Path) -> None:
    """6: import -> a re-push of the tag (another image) -> undo the import: the re-pushed
    tag is the user's and stays pullable; the import's own files go to the quarantine."""
    root = tmp_path / "root"
    layout = make_layout(tmp_path / "layout", "r")
    other = make_layout(tmp_path / "other", "s")
    run_id = import_run(root, layout.path, "team/a")
    with RealRegistry(root) as registry:
        skopeo_copy(f"oci:{other.path}:1", f"docker://{registry.host}/team/a:1")
    result = run_cli("undo", str(root), run_id, "--json")
    assert_clean_exit(result, (0,), "undo of the import")
    assert why_not_pullable(root, "team/a", "1") is None
    pull(root, ["team/a:1"], tmp_path / "pulled")
    assert_not_stuck(root)


def test_undo_import_after_an_import_into_a_sibling_repository(tmp_path: Path) -> None:
    """6: import A (team/a) -> import B (team/b) -> undo A: team/ is not empty, it stays."""
    root = tmp_path / "root"
    a = make_layout(tmp_path / "a", "a")
    b = make_layout(tmp_path / "b", "b")
    first = import_run(root, a.path, "team/a")
    import_run(root, b.path, "team/b")
    cli_ok("undo", str(root), first)
    pull(root, ["team/b:1"], tmp_path / "pulled")
    assert not_served(root, "team/a:1")
    assert_not_stuck(root)


def test_undoing_out_of_order_then_the_rest_restores_the_tree(sample_root: Path,
                                                             tmp_path: Path) -> None:
    """import A (team/a) -> import B (team/b, sharing a layer A wrote) -> undo A -> undo B:
    the tree is the original, byte for byte (a directory's mtime aside: undone out of
    order, B's undo gives `blobs/sha256` the time B found, after A's changes).

    A's undo must keep `team/` (B's repository is inside) and the shared layer (B's
    image uses it). Before, B's undo then left both behind for good: no run took them,
    A being reverted and B not having made them. Now B's undo finishes A's: once B's
    files are gone, what A kept only for them goes too, into A's quarantine."""
    root = sample_root
    shared = [b"a layer both backups hold " * 40]
    a = make_layout(tmp_path / "a", "a", shared=shared)
    b = make_layout(tmp_path / "b", "b", shared=shared)
    original = registry_snapshot(root, mtimes="files")
    first = import_run(root, a.path, "team/a")
    second = import_run(root, b.path, "team/b")
    undone = cli_ok("undo", str(root), first)
    assert undone["kept"], undone  # team/ and the shared layer: B's
    assert runs(root)[first]["undo_kept"] == undone["kept"]
    pull(root, ["team/b:1"], tmp_path / "pulled")
    assert not_served(root, "team/a:1")
    planned = strict_json(run_cli("undo", str(root), second, "--dry-run", "--json").stdout)
    assert planned["then_finishes"] == [first], planned
    doc = cli_ok("undo", str(root), second)
    assert registry_snapshot(root, mtimes="files") == original
    assert [f["run_id"] for f in doc["finished"]] == [first], doc  # type: ignore[index, union-attr]
    assert runs(root)[first]["status"] == "reverted" and runs(root)[first]["undo_kept"] == []
    assert_not_stuck(root)


def test_undo_out_of_order_keeps_a_directory_a_later_run_emptied(sample_root: Path,
                                                                 tmp_path: Path) -> None:
    """import A (team/a) -> import B (team/b) -> rm team/b (run D moves the repository into
    its quarantine) -> undo A. `team/` is empty then, but D's undo puts team/b back into
    it: A's undo keeps it. (Before, A's undo removed it and D's undo was refused for good,
    "its parent directory is gone": the removed repository could not come back.) Then D,
    B undone: team/b:1 is served in between, and at the end B's undo finishes A's (takes
    `team/`): the tree is the original (directories' mtimes aside, as above)."""
    root = sample_root
    original = registry_snapshot(root, mtimes="files")
    first = import_run(root, make_layout(tmp_path / "a", "a").path, "team/a")
    second = import_run(root, make_layout(tmp_path / "b", "b").path, "team/b")
    removal = str(cli_ok("rm", str(root), "team/b", "--apply")["run_id"])
    undone = cli_ok("undo", str(root), first)
    assert any(k.startswith("repositories/team:") and removal in k
               for k in undone["kept"]), undone  # type: ignore[union-attr]
    cli_ok("undo", str(root), removal)
    pull(root, ["team/b:1"], tmp_path / "pulled")
    assert not_served(root, "team/a:1")
    doc = cli_ok("undo", str(root), second)
    assert [f["run_id"] for f in doc["finished"]] == [first], doc  # type: ignore[index, union-attr]
    assert registry_snapshot(root, mtimes="files") == original
    assert_not_stuck(root)


def test_undoing_the_import_that_brought_a_tag_back_gives_the_rm_undo_its_tag(
        sample_root: Path, tmp_path: Path) -> None:
    """import team/a:1 -> rm team/a:1 (run R) -> import the same backup again (run I: it
    writes the tag anew, the same bytes) -> undo R: the tag is already there, R's copy
    stays in its quarantine -> undo I: I's tag goes, and R's undo, finished, puts its copy
    back: team/a:1 is pulled. (Before, the tag nobody removed any more was gone: R was
    reverted and no run brought it back.) Then the first import undone: the original."""
    root = sample_root
    original = registry_snapshot(root, mtimes="files")
    layout = make_layout(tmp_path / "a", "a")
    first = import_run(root, layout.path, "team/a")
    removal = str(cli_ok("rm", str(root), "team/a:1", "--apply")["run_id"])
    again = import_run(root, layout.path, "team/a")
    cli_ok("undo", str(root), removal)
    pull(root, ["team/a:1"], tmp_path / "pulled-1")
    preview = cli_ok("purge", str(root))  # the rm's copy of the tag waits for I's undo
    assert preview["needed"] == {removal: [again]}, preview
    doc = cli_ok("undo", str(root), again)
    assert [f["run_id"] for f in doc["finished"]] == [removal], doc  # type: ignore[index, union-attr]
    pull(root, ["team/a:1"], tmp_path / "pulled-2")
    cli_ok("undo", str(root), first)
    assert registry_snapshot(root, mtimes="files") == original
    assert_not_stuck(root)


def test_undo_import_after_a_repush_of_the_same_image(tmp_path: Path) -> None:
    """A re-push of the very same image rewrites the import's links with the same bytes:
    they are the user's now, and the image stays."""
    root = tmp_path / "root"
    layout = make_layout(tmp_path / "layout", "same")
    run_id = import_run(root, layout.path, "team/a")
    with RealRegistry(root) as registry:
        skopeo_copy(f"oci:{layout.path}:1", f"docker://{registry.host}/team/a:1")
    cli_ok("undo", str(root), run_id)
    pull(root, ["team/a:1"], tmp_path / "pulled")


def test_undo_of_undo_material_is_kept_until_purge(tmp_path: Path) -> None:
    """Reverting a creation moves the file into the quarantine: bytes leave only by purge."""
    root = tmp_path / "root"
    layout = make_layout(tmp_path / "layout", "k")
    run_id = import_run(root, layout.path, "team/a")
    blobs = {p.name for p in (root / "docker/registry/v2/blobs/sha256").glob("*/*")}
    cli_ok("undo", str(root), run_id)
    held = {p.parent.name for p in (root / "regfsck-quarantine" / run_id).rglob("data")}
    assert blobs <= held
    assert runs(root)[run_id]["bytes"] > 0  # type: ignore[operator]
    # The directories the import made (empty now) are gone; every byte is in the quarantine.
    assert not list((root / "docker/registry/v2").rglob("data"))


# --------------------------------------------------------------------------- registry v3


@pytest.fixture
def registry3(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real registry v3.1.1 binary (skips when absent)."""
    binary = realtools.registry3_binary(tmp_path_factory.mktemp("registry3"))
    if binary is None:
        pytest.skip("registry v3 binary unavailable (../shared/bin/unpack-registry3)")
    return binary


def test_v3_undo_import_keeps_a_cross_repository_mount_and_a_repushed_tag(
        tmp_path: Path, registry3: str) -> None:
    """2b and 6 on registry v3.1.1 (tmp+rename link writes): a mount and a re-push of the
    same image after an import survive the import's undo."""
    root = tmp_path / "root"
    layout = make_layout(tmp_path / "layout", "v3")
    run_id = import_run(root, layout.path, "team/a")
    with RealRegistry(root, binary=registry3) as registry:
        skopeo_copy(f"docker://{registry.host}/team/a:1", f"docker://{registry.host}/other/x:1")
        skopeo_copy(f"oci:{layout.path}:1", f"docker://{registry.host}/team/a:1")
    cli_ok("undo", str(root), run_id)
    pull(root, ["other/x:1", "team/a:1"], tmp_path / "pulled", registry3)


# --------------------------------------------------------------------------- purge, dry-run, wedging


def test_purge_keeps_a_run_whose_content_an_older_runs_undo_needs(sample_root: Path) -> None:
    """rm two tags -> gc --delete-untagged: the gc run holds what the rm's undo restores.
    purge keeps it (naming the rm run) unless --force."""
    rm_id = str(cli_ok("rm", str(sample_root), "a/b/c:latest", "a/b/c:v2", "--apply")["run_id"])
    gc_id = str(cli_ok("gc", str(sample_root), "--delete-untagged", "--grace", "0s",
                       "--apply")["run_id"])
    purged = cli_ok("purge", str(sample_root), "--apply")
    assert gc_id in purged["kept"] and purged["needed"] == {gc_id: [rm_id]}  # type: ignore[operator]
    assert rm_id in purged["runs"]  # type: ignore[operator]
    assert (sample_root / "regfsck-quarantine" / gc_id).is_dir()
    forced = cli_ok("purge", str(sample_root), "--apply", "--force")
    assert forced["runs"] == [gc_id]


def test_dry_run_shows_the_plan_and_changes_nothing(sample_root: Path) -> None:
    rm_id = str(cli_ok("rm", str(sample_root), "a/b/c:latest", "a/b/c:v2", "--apply")["run_id"])
    gc_id = str(cli_ok("gc", str(sample_root), "--delete-untagged", "--grace", "0s",
                       "--apply")["run_id"])
    before = registry_snapshot(sample_root)
    refused = run_cli("undo", str(sample_root), rm_id, "--dry-run", "--json")
    assert_clean_exit(refused, (3,), "dry-run of a refused undo")
    doc = strict_json(refused.stdout)
    assert doc["blockers"] == [gc_id] and doc["problems"] and doc["applied"] is False
    fine = run_cli("undo", str(sample_root), gc_id, "--dry-run")
    assert_clean_exit(fine, (0,), "dry-run of the gc's undo")
    assert b"Nothing was changed" in fine.stdout
    assert registry_snapshot(sample_root) == before
    assert {r["status"] for r in runs(sample_root).values()} == {"complete"}


def test_an_interrupted_undo_that_cannot_go_on_does_not_wedge(sample_root: Path, tmp_path: Path) -> None:
    """SIGKILL midway through an undo of gc, then the tree changes where a later step
    would move something back: the next command reports it, runs, and the run is not left
    `undoing`; once the obstacle is gone the undo finishes."""
    from tests.hostile import add_orphan_blobs
    orphans = add_orphan_blobs(sample_root, 600)
    gc_id = str(cli_ok("gc", str(sample_root), "--grace", "0s", "--uploads-older-than", "0s",
                       "--apply")["run_id"])
    result = signal_midway(["undo", str(sample_root), gc_id], sample_root, signal.SIGKILL, 1,
                           event="undo-intent")
    assert result.returncode == -signal.SIGKILL
    v2 = realtools.data_dir(sample_root)
    blocked = next(d for d in orphans
                   if not (v2 / "blobs/sha256" / d.split(":")[1][:2] / d.split(":")[1]).exists())
    hexpart = blocked.split(":")[1]
    obstacle = v2 / "blobs/sha256" / hexpart[:2] / hexpart
    obstacle.mkdir(parents=True)
    (obstacle / "data").write_bytes(b"not the blob")
    again = run_cli("gc", str(sample_root), "--apply", "--json")
    assert_clean_exit(again, (0,), "gc after the killed undo")
    assert any("cannot go on" in m for m in strict_json(again.stdout)["recovered"])
    assert runs(sample_root)[gc_id]["status"] == "complete"
    refused = run_cli("undo", str(sample_root), gc_id)
    assert_clean_exit(refused, (3,), "undo with the obstacle")
    (obstacle / "data").unlink()
    obstacle.rmdir()
    cli_ok("undo", str(sample_root), gc_id)
    assert runs(sample_root)[gc_id]["status"] == "reverted"
    pull(sample_root, ["library/base:latest", "a/b/c:latest"], tmp_path / "pulled")
