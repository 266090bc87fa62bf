"""Hostile paths: symlinks, FIFOs, device nodes, odd names. Nothing outside ROOT is read,
nothing blocks, every odd name is a finding, every JSON output is strict UTF-8 JSON.

All trees are copies of a tree the real registry wrote (the `sample_root` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regfsck import layout
from regfsck.names import repo_name_problem
from regfsck.storage import FilesystemStorage, UnsafePathError
from tests.hostile import (
    assert_clean_exit,
    can_mknod,
    replace_with,
    run_cli,
    run_many,
    strict_json,
    watch_opens,
)
from tests.realtools import OCILayoutWriter, SampleInfo
from tests.support import V2, cli
from tests.support.snapshot import snapshot


def verify_json(root: Path, *extra: str) -> dict:
    result = run_cli("verify", str(root), "--json", *extra, timeout=60)
    assert_clean_exit(result, (0, 1), "verify --json")
    return strict_json(result.stdout)


def findings_at(doc: dict, kind: str) -> set[str]:
    return {f["path"] for f in doc["findings"] if f["kind"] == kind}


def first_layer_link(root: Path, repo: str) -> Path:
    return sorted((root / V2 / layout.REPOSITORIES / repo / "_layers" / "sha256").glob("*/link"))[0]


def test_symlinks_out_of_the_root_are_never_followed(sample_root: Path, sample_info: SampleInfo,
                                                     tmp_path: Path) -> None:
    """Every level of the tree replaced by a symlink into a directory outside ROOT that holds
    a perfectly valid copy: regfsck reports each symlink and opens nothing out there."""
    outside = tmp_path / "outside"
    v2 = sample_root / V2
    shutil.copytree(v2, outside / "v2", symlinks=True)
    base_layer = sample_info.shared_layers[0]
    targets = {
        # repository directory, tag directory, _layers alg dir, blob fan-out dir, blob data,
        # link file, the whole blobs/ directory of nothing (kept: only a sub-level is swapped)
        "repositories/multi": "v2/repositories/multi",
        "repositories/library/base/_manifests/tags": "v2/repositories/library/base/_manifests/tags",
        "repositories/a/b/_layers/sha256": "v2/repositories/a/b/_layers/sha256",
        layout.blob_dir(base_layer).rsplit("/", 1)[0]: "v2/" + layout.blob_dir(base_layer).rsplit("/", 1)[0],
        layout.blob_data(sample_info.zstd[1]): "v2/" + layout.blob_data(sample_info.zstd[1]),
        layout.tag_current_link("a/b/c", "latest"): "v2/" + layout.tag_current_link("a/b/c", "latest"),
    }
    for rel, target in targets.items():
        replace_with(v2 / rel, "symlink", target=str(outside / target))
    with watch_opens(outside) as watch:
        doc = verify_json(sample_root)
        scanned = run_cli("scan", str(sample_root), "--json")
        human = run_cli("verify", str(sample_root))
        events = watch.events()
    assert events == [], f"regfsck opened files outside ROOT: {events[:10]}"
    assert_clean_exit(scanned, (0,), "scan --json")
    strict_json(scanned.stdout)
    assert_clean_exit(human, (1,), "verify")
    reported = findings_at(doc, "symlink")
    assert {f"{V2}/{rel}" for rel in targets} <= reported
    assert doc["summary"]["errors"] > 0
    # Nothing from the outside copy is counted: its repositories are not in the scan.
    names = {r["name"] for r in strict_json(scanned.stdout)["repositories"]}
    assert not names & {"multi/oci", "multi/docker"}


@pytest.mark.parametrize("level", ["docker", "docker/registry"])
def test_symlinked_parent_of_v2_is_refused(sample_root: Path, tmp_path: Path, level: str) -> None:
    """ROOT/docker or ROOT/docker/registry being a symlink would put the tree outside ROOT."""
    elsewhere = tmp_path / "elsewhere"
    (sample_root / level).rename(elsewhere)
    os.symlink(elsewhere, sample_root / level)
    for argument in (sample_root, sample_root / V2):  # ROOT, or the v2 directory through the link
        with watch_opens(elsewhere) as watch:
            result = run_cli("verify", str(argument), "--json")
            events = watch.events()
        assert_clean_exit(result, (3,), f"verify {argument}")
        assert result.stderr.decode().count("\n") == 1 and b"symbolic link" in result.stderr
        assert json.loads(result.stdout)["exit_code"] == 3  # the error, as JSON, and nothing else
        assert [e for e in events if "/blobs" in e or "/repositories" in e] == []


FIFO_PLACES = {
    "blob data": lambda info: layout.blob_data(info.shared_layers[0]),
    "revision link": lambda info: layout.revision_link(*info.zstd[:2]),
    "layer link": lambda info: layout.layer_link(info.zstd[0], info.zstd[2]),
    "tag current link": lambda info: layout.tag_current_link("a/b/c", "latest"),
    "tag index link": lambda info: layout.tag_index_link("a/b/c", "v2", info.tags["a/b/c"]["v2"]),
    "upload startedat": lambda info: layout.join(layout.upload_dir(*info.upload[:2]), "startedat"),
    "upload data": lambda info: layout.join(layout.upload_dir(*info.upload[:2]), "data"),
}


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_fifos_and_devices_never_block_and_are_findings(sample_root: Path, sample_info: SampleInfo,
                                                        kind: str) -> None:
    """A FIFO (or a /dev/zero node) at every place that holds a file regfsck reads."""
    if kind == "chardev" and not can_mknod(sample_root):
        pytest.skip("cannot create device nodes here")
    places = {place: where(sample_info) for place, where in FIFO_PLACES.items()}
    for rel in places.values():
        replace_with(sample_root / V2 / rel, kind)
    results = run_many({"verify --json": ("verify", str(sample_root), "--json"),
                        "scan": ("scan", str(sample_root)), "verify": ("verify", str(sample_root))})
    assert_clean_exit(results["verify --json"], (1,), "verify --json")
    doc = strict_json(results["verify --json"].stdout)  # a blocking open would hit the timeout
    for place, rel in places.items():
        mine = [f for f in doc["findings"] if f["path"] == f"{V2}/{rel}"]
        assert mine, f"no finding for the {place} at {rel}"
        assert any(f["severity"] in ("error", "warning") for f in mine), (place, mine)
    assert_clean_exit(results["scan"], (0,), "scan")
    assert_clean_exit(results["verify"], (1,), "verify")


def test_device_named_link_is_never_opened(sample_root: Path, sample_info: SampleInfo) -> None:
    """Opening a device node runs its driver (a watchdog arms, a tape rewinds): regfsck must
    not open one even read-only. strace shows every open the process makes."""
    if shutil.which("strace") is None:
        pytest.skip("strace not installed")
    if not can_mknod(sample_root):
        pytest.skip("cannot create device nodes here")
    rels = [layout.revision_link(*sample_info.zstd[:2]), layout.tag_current_link("a/b/c", "latest"),
            layout.layer_link(sample_info.zstd[0], sample_info.zstd[2])]
    for rel in rels:
        replace_with(sample_root / V2 / rel, "chardev")
    trace = sample_root.parent / "strace.out"
    cli.run("verify", str(sample_root), "--json", timeout=120,
            prefix=["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace)])
    opened = [line for line in trace.read_text().splitlines()
              if any(rel in line for rel in rels) and "= -1" not in line]
    assert opened == []


NON_UTF8 = [b"bad\xff\xfe", b"caf\xe9", b"\xc3\x28x", b"ctl\x01\x1b[31m"]


def test_non_utf8_and_control_names_are_findings_in_strict_json(sample_root: Path) -> None:
    v2 = os.fsencode(sample_root / V2)
    made = []
    for name in NON_UTF8:
        repo = os.path.join(v2, b"repositories", name, b"_layers")
        os.makedirs(repo)
        tag = os.path.join(v2, b"repositories/a/b/_manifests/tags", name, b"current")
        os.makedirs(tag)
        with open(os.path.join(tag, b"link"), "wb") as fh:
            fh.write(b"sha256:" + b"0" * 64)
        made.append(name)
    doc = verify_json(sample_root)
    bad_repos = {f["path"] for f in doc["findings"] if f["kind"] == "repo_bad_name"}
    bad_tags = {f["path"] for f in doc["findings"] if f["kind"] == "tag_bad_name"}
    assert len(bad_repos) == len(made) and len(bad_tags) == len(made)
    assert f"{V2}/repositories/bad\\xff\\xfe" in bad_repos
    assert all("\x1b" not in p and "\x01" not in p for p in bad_repos | bad_tags)
    scanned = run_cli("scan", str(sample_root), "--json")
    assert_clean_exit(scanned, (0,), "scan --json")
    names = {r["name"] for r in strict_json(scanned.stdout)["repositories"]}
    assert "bad\\xff\\xfe" in names
    for command in ("scan", "verify"):
        human = run_cli(command, str(sample_root))
        assert_clean_exit(human, (0, 1), command)
        assert b"\x1b[31m" not in human.stdout  # a name cannot inject terminal escapes


def test_very_long_names_and_paths_over_path_max(sample_root: Path) -> None:
    v2 = sample_root / V2
    long = "a" * 255
    (v2 / "repositories" / long / long / "_layers").mkdir(parents=True)
    (v2 / "repositories/a/b/_manifests/tags" / ("t" * 255) / "current").mkdir(parents=True)
    # A chain of directories whose full path is far longer than PATH_MAX (4096).
    fd = os.open(v2 / "repositories", os.O_RDONLY)
    try:
        for _ in range(40):
            os.mkdir("b" * 250, dir_fd=fd)
            next_fd = os.open("b" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        os.mkdir("_layers", dir_fd=fd)
    finally:
        os.close(fd)
    doc = verify_json(sample_root)
    kinds = {f["kind"] for f in doc["findings"]}
    assert "repo_bad_name" in kinds  # > 255 characters
    assert "tag_bad_name" in kinds  # > 128 characters
    assert any(f["kind"] in ("unreadable", "repo_bad_name") and "bbbb" in f["path"]
               for f in doc["findings"])
    scanned = run_cli("scan", str(sample_root), "--json")
    assert_clean_exit(scanned, (0,), "scan --json")
    strict_json(scanned.stdout)


@pytest.mark.parametrize("name", ["..", "../..", "/etc", "a/../../x", "library/base/../../..",
                                  "./a", "a//b", ""])
def test_escaping_repo_arguments_are_usage_errors(sample_root: Path, name: str) -> None:
    result = run_cli("verify", str(sample_root), "--repo", name, "--json")
    assert_clean_exit(result, (2,), f"verify --repo {name!r}")
    assert json.loads(result.stdout)["exit_code"] == 2  # the error, as JSON, and nothing else


SEGMENT = st.sampled_from(["..", ".", "", "a", "b", "_layers", "x\x00y", "\x00"])


@given(segments=st.lists(SEGMENT, min_size=1, max_size=6), absolute=st.booleans())
def test_storage_refuses_escaping_paths(segments: list[str], absolute: bool) -> None:
    """Any relative path with `..`, `.`, NUL or a leading `/` is refused before any I/O."""
    path = ("/" if absolute else "") + "/".join(segments)
    escaping = absolute or "\x00" in path or any(s in (".", "..") for s in segments)
    storage = FilesystemStorage(Path("/nonexistent-regfsck-base"))
    for op in (storage.full_path, storage.stat, lambda p: storage.read_small(p, 10),
               storage.open_read, storage.list_dir):
        if escaping:
            with pytest.raises(UnsafePathError):
                op(path)
    if escaping and not absolute:
        assert repo_name_problem(path) is not None


def test_layout_refuses_digests_that_would_escape() -> None:
    for bad in ("sha256:../../etc", "../x:abc", "sha256:a/b", "sha256:", ":abc", "sha256:ab\x00"):
        with pytest.raises(ValueError):
            layout.blob_data(bad)
        with pytest.raises(ValueError):
            layout.layer_link("repo", bad)


def test_special_files_in_odd_places(sample_root: Path, sample_info: SampleInfo) -> None:
    """Top-level blobs/ and repositories/ replaced by a FIFO and a symlink loop."""
    v2 = sample_root / V2
    replace_with(v2 / "blobs", "fifo")
    replace_with(v2 / "repositories", "symlink", target="repositories")
    os.mkfifo(v2 / "stray-fifo")
    doc = verify_json(sample_root)
    assert f"{V2}/repositories" in findings_at(doc, "symlink")
    assert any(f["path"] == f"{V2}/blobs" for f in doc["findings"])
    assert stat.S_ISFIFO(os.lstat(v2 / "blobs").st_mode)  # untouched


ESCAPING_REFS = ["../../x:latest", "/etc/passwd:1", "a/../../b:latest", "..:latest",
                 "library/base/../../..:latest", "a\\b:latest"]


@pytest.mark.parametrize("ref", ESCAPING_REFS)
def test_escaping_refs_are_refused_everywhere(sample_root: Path, tmp_path: Path, ref: str) -> None:
    """rm, export, inspect with a REF whose repository would leave the tree: a usage error
    (or no such image), nothing written anywhere."""
    before = snapshot(sample_root / "docker")
    results = run_many({
        "rm": ("rm", str(sample_root), ref, "--apply"),
        "export": ("export", str(sample_root), ref, "-o", str(tmp_path / "out.tar"),
                   "--format", "oci-archive"),
        "inspect": ("inspect", str(sample_root), ref, "--json"),
    })
    for name, result in results.items():
        assert_clean_exit(result, (1, 2, 3), f"{name} {ref!r}")
        assert result.stderr.count(b"\n") == 1, (name, result.stderr)
    assert snapshot(sample_root / "docker") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def hostile_layout(path: Path, ref_name: str = "ok") -> OCILayoutWriter:
    writer = OCILayoutWriter(path)
    layer = writer.add_layer({"a.txt": f"hostile {path.name}".encode()}, "none")
    writer.add_image([layer], tag=ref_name)
    return writer


def test_hostile_import_sources(sample_root: Path, tmp_path: Path) -> None:
    """Sources are input too: ref names and --repo values that would escape, digests that
    are paths, a tar whose members climb out (tar slip) or are symlinks, a symlinked blob, a
    FIFO for index.json. Each is refused or imported harmlessly; nothing lands outside."""
    import io
    import json
    import tarfile

    outside = tmp_path / "outside"
    outside.mkdir()
    sources: dict[str, tuple[Path, list[str]]] = {}
    named = hostile_layout(tmp_path / "escaping-name", "../../../outside/escaped:latest")
    sources["escaping ref name"] = (named.path, [])
    controls = hostile_layout(tmp_path / "control-name", "a\x00b/\x1b[2Jc:lat\x00est")
    sources["NUL and escape in a ref name"] = (controls.path, [])
    good = hostile_layout(tmp_path / "good")
    for repo in ("../../outside/evil", "/abs/evil", "a/../../evil", "_layers/x"):
        sources[f"--repo {repo}"] = (good.path, ["--repo", repo])
    bad_digest = hostile_layout(tmp_path / "bad-digest")
    index = json.loads((bad_digest.path / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../../outside/escaped-digest"
    (bad_digest.path / "index.json").write_text(json.dumps(index))
    sources["escaping digest"] = (bad_digest.path, ["--repo", "x/y"])
    slip = tmp_path / "slip.tar"
    with tarfile.open(slip, "w") as tar:
        for file in sorted(good.path.rglob("*")):
            if file.is_file():
                tar.add(file, arcname=str(file.relative_to(good.path)))
        for name, kind in [("../" * 20 + str(outside / "slipped").lstrip("/"), tarfile.REGTYPE),
                           (str(outside / "absolute"), tarfile.REGTYPE),
                           ("blobs/sha256/link-out", tarfile.SYMTYPE)]:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = str(outside / "linked")
                tar.addfile(info)
            else:
                info.size = 5
                tar.addfile(info, io.BytesIO(b"pwned"))
    sources["tar slip"] = (slip, ["--repo", "slip/repo"])
    linked = hostile_layout(tmp_path / "symlinked-blob")
    victim = sorted((linked.path / "blobs" / "sha256").iterdir())[0]
    (outside / "secret").write_bytes(b"outside secret")
    victim.unlink()
    os.symlink(outside / "secret", victim)
    sources["symlinked blob"] = (linked.path, ["--repo", "linked/repo"])
    fifo = hostile_layout(tmp_path / "fifo-index")
    (fifo.path / "index.json").unlink()
    os.mkfifo(fifo.path / "index.json")
    sources["FIFO index.json"] = (fifo.path, ["--repo", "fifo/repo"])
    for what, (source, extra) in sources.items():
        v2_before = snapshot(sample_root / "docker")
        with watch_opens(outside) as watch:
            result = run_cli("import", str(sample_root), str(source), *extra, "--apply", timeout=60)
            events = watch.events()
        assert_clean_exit(result, (0, 1, 2, 3), f"import of a source with {what}")
        assert b"\x00" not in result.stderr and b"\x1b" not in result.stderr, result.stderr
        assert events == [], f"{what}: opened outside: {events}"
        if what != "tar slip":  # the slip archive's real content is a fine image
            assert result.returncode != 0, f"{what} was imported"
            assert snapshot(sample_root / "docker") == v2_before, what
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not Path("/abs").exists()


MARKUP_NAMES = ["[/]", "[bold red]loud[/]", "[link=https:evil.example]x", "[/x]"]


def test_names_that_look_like_terminal_markup(sample_root: Path) -> None:
    """Directory names are shown as they are in every human output, never read as rich
    markup (an unmatched `[/]` used to crash the renderer; `[link=...]` would inject)."""
    v2 = sample_root / V2
    for i, name in enumerate(MARKUP_NAMES):
        (v2 / "repositories" / f"{name}{i}" / "_layers").mkdir(parents=True)
        (v2 / "repositories/a/b/_manifests/tags" / name / "current").mkdir(parents=True)
        os.symlink("nowhere", v2 / "repositories" / f"link{name.replace('/', '_')}{i}")
        (v2 / "repositories/a/b/c/_uploads" / name.replace("/", "_")).mkdir(parents=True)
    results = run_many({
        "verify": ("verify", str(sample_root)), "scan": ("scan", str(sample_root)),
        "gc": ("gc", str(sample_root), "--grace", "0"),
        "rm": ("rm", str(sample_root), f"{MARKUP_NAMES[0]}0", f"a/b:{MARKUP_NAMES[1]}"),
    })
    for name, result in results.items():
        assert_clean_exit(result, (0, 1, 2, 3), name)
    assert b"[/]0" in results["scan"].stdout
    assert b"[bold red]loud[/]" in results["verify"].stdout
    assert b"[link=https:evil.example]x" in results["verify"].stdout
