"""Hostile manifests: over the 4 MiB limit, nested absurdly deep, indexes in a cycle, chains
of thousands of nested indexes, one child listed twice at every level (2^n paths).

Each is a finding or a bounded answer, never a memory blow-up, a hang or a traceback, in
every command that reads manifests (verify, scan, gc's plan, inspect, why, export).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regfsck import layout
from regfsck.graph import ManifestStore, find_cycle, reachable
from regfsck.manifest import MAX_JSON_DEPTH, MAX_MANIFEST_BYTES, ManifestError, parse_manifest
from regfsck.root import locate
from regfsck.scanner import scan_tree
from regfsck.storage import FilesystemStorage
from tests.hostile import (
    assert_clean_exit,
    cli_env,
    deep_json,
    index_of,
    run_cli,
    run_many,
    sha256_of,
    strict_json,
)
from tests.realtools import SampleInfo
from tests.support import V2, cli
from tests.support.snapshot import content_snapshot
from tests.support.tree import OCI_INDEX, add_manifest, nested_indexes, put


def peak_rss_mb(*args: str, timeout: float = 120.0) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run the CLI in a child of a fresh interpreter and return its peak RSS (MB)."""
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True)\n"
               "sys.stdout.buffer.write(r.stdout); sys.stderr.buffer.write(r.stderr)\n"
               "sys.stderr.write('\\nPEAK_RSS_KB=%d\\n' % "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(r.returncode)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cli.command(*args)], capture_output=True,
                          timeout=timeout, env=cli_env(), check=False)
    err, _, peak = proc.stderr.rpartition(b"\nPEAK_RSS_KB=")
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, err), int(peak) / 1024


def run_every_reader(root: Path, ref: str, blob: str,
                     tmp: Path) -> dict[str, subprocess.CompletedProcess[bytes]]:
    """Every read-only command that parses manifests, each run once (timeouts = hangs)."""
    runs = {
        "verify": ("verify", str(root), "--json"),
        "scan": ("scan", str(root), "--json"),
        "gc plan": ("gc", str(root), "--json"),
        "gc plan -m": ("gc", str(root), "--delete-untagged", "--json"),
        "inspect": ("inspect", str(root), ref, "--json"),
        "why": ("why", str(root), blob, "--json"),
        "export": ("export", str(root), ref, "-o", str(tmp / "out.tar"), "--format", "oci-archive"),
    }
    results = run_many(runs, timeout=120)
    for name, args in runs.items():
        assert_clean_exit(results[name], (0, 1, 3), name)
        if "--json" in args and results[name].stdout:
            strict_json(results[name].stdout)
        if results[name].returncode == 3:
            assert results[name].stderr.count(b"\n") >= 1
    return results


def kinds(doc: dict) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in doc["findings"]:
        found.setdefault(f["kind"], set()).add(f.get("digest") or f["path"])
    return found


# --------------------------------------------------------------------------- size


def test_manifest_over_the_limit_is_a_finding_not_a_read(sample_root: Path, sample_info: SampleInfo,
                                                          tmp_path: Path) -> None:
    """A 256 MiB 'manifest' (sparse) behind a tag: never read into memory by any command."""
    repo = "library/base"
    big = tmp_path / "big"
    with open(big, "wb") as fh:
        fh.truncate(256 * 1024 * 1024)
    digest = "sha256:" + hashlib.sha256(b"\0" * (256 * 1024 * 1024)).hexdigest()
    data = sample_root / V2 / layout.blob_data(digest)
    data.parent.mkdir(parents=True)
    big.rename(data)
    put(sample_root, layout.revision_link(repo, digest), digest.encode())
    put(sample_root, layout.tag_current_link(repo, "big"), digest.encode())
    result, peak = peak_rss_mb("verify", str(sample_root), "--json", "--jobs", "2")
    assert_clean_exit(result, (1,), "verify")
    doc = strict_json(result.stdout)
    too_large = [f for f in doc["findings"] if f["kind"] == "manifest_too_large"]
    assert [f["digest"] for f in too_large] == [digest]
    assert too_large[0]["affected_tags"] == ["library/base:big"]
    assert peak < 150, f"verify peaked at {peak:.0f} MB on a 256 MiB manifest"
    for args in (("scan", str(sample_root), "--json"), ("gc", str(sample_root), "--json"),
                 ("inspect", str(sample_root), f"{repo}:big", "--json"),
                 ("why", str(sample_root), digest, "--json"),
                 ("export", str(sample_root), f"{repo}:big", "-o", str(tmp_path / "x.tar"),
                  "--format", "oci-archive")):
        result, peak = peak_rss_mb(*args)
        assert_clean_exit(result, (0, 1, 3), args[0])
        assert peak < 150, f"{args[0]} peaked at {peak:.0f} MB on a 256 MiB manifest"
    assert not (tmp_path / "x.tar").exists()  # a failed export leaves nothing under its name


def test_manifest_store_never_reads_past_the_limit(sample_root: Path) -> None:
    """In process: the store refuses by size first, so the parse never sees the bytes."""
    body = b'{"schemaVersion":2,' + b" " * MAX_MANIFEST_BYTES + b"}"
    digest = add_manifest(sample_root, "library/base", body, "padded")
    inv = scan_tree(locate(sample_root))
    store = ManifestStore(FilesystemStorage(locate(sample_root).v2), inv)
    tracemalloc.start()
    try:
        loaded = store.load(digest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert getattr(loaded, "kind", None) == "manifest_too_large"
    assert peak < MAX_MANIFEST_BYTES // 4


# --------------------------------------------------------------------------- depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000, 2_000_000])
def test_deeply_nested_manifest_is_a_finding(sample_root: Path, depth: int) -> None:
    digest = add_manifest(sample_root, "a/b", deep_json(depth), "deep")
    doc = strict_json(run_cli("verify", str(sample_root), "--json", "--no-data").stdout)
    assert digest in kinds(doc).get("manifest_too_deep", set())


@given(depth=st.integers(min_value=1, max_value=300),
       opener=st.sampled_from([("[", "]"), ('{"a":', "}")]))
def test_parser_depth_bound(depth: int, opener: tuple[str, str]) -> None:
    """Nesting at or below the bound parses; above it is manifest_too_deep, never a crash."""
    inner = (opener[0] * depth + opener[1] * depth) if opener[0] == "[" else (
        opener[0] * depth + "1" + opener[1] * depth)
    raw = ('{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","x":'
           + inner + "}").encode()
    if depth + 1 > MAX_JSON_DEPTH:
        with pytest.raises(ManifestError) as err:
            parse_manifest(raw)
        assert err.value.kind == "manifest_too_deep"
    else:
        parse_manifest(raw)


# --------------------------------------------------------------------------- cycles


@pytest.mark.parametrize("length", [1, 3])
def test_index_cycles_are_findings_and_every_reader_ends(sample_root: Path, sample_info: SampleInfo,
                                                         tmp_path: Path, length: int) -> None:
    """Manifests rewritten into indexes that list each other (only possible with bytes that no
    longer hash to their names): a cycle finding, and every walk terminates."""
    repo = "multi/oci"
    members = sorted(sample_info.revisions[repo])[:length]
    for here, there in zip(members, members[1:] + members[:1], strict=True):
        put(sample_root, layout.blob_data(here), index_of(there))
    tag_target = members[0]
    put(sample_root, layout.tag_current_link(repo, "cycle"), tag_target.encode())
    results = run_every_reader(sample_root, f"{repo}:cycle", sample_info.shared_layers[0], tmp_path)
    doc = strict_json(results["verify"].stdout)
    found = kinds(doc)
    assert set(members) <= found.get("manifest_cycle", set())
    assert set(members) <= found.get("blob_digest_mismatch", set())
    assert results["verify"].returncode == 1
    inv = scan_tree(locate(sample_root))
    store = ManifestStore(FilesystemStorage(locate(sample_root).v2), inv)
    assert set(members) <= reachable(store, [tag_target])
    cycle = find_cycle(store, tag_target)
    assert cycle is not None and cycle[-1] in members


def test_find_cycle_is_linear_with_a_shared_done_set(sample_root: Path, sample_info: SampleInfo) -> None:
    """Checking every index of a 2000-deep chain visits each node once, not n^2/2 times."""
    top = nested_indexes(sample_root, "library/base", sample_info.tags["library/base"]["latest"], 2000)
    inv = scan_tree(locate(sample_root))
    store = ManifestStore(FilesystemStorage(locate(sample_root).v2), inv)
    loads = 0
    original = store.get

    def counting_get(digest: str):  # type: ignore[no-untyped-def]
        nonlocal loads
        loads += 1
        return original(digest)

    store.get = counting_get  # type: ignore[method-assign]
    done: set[str] = set()
    for digest in inv.repositories["library/base"].revisions:
        assert find_cycle(store, digest, done) is None
    assert loads < 3 * 2010, loads
    assert top in done


# --------------------------------------------------------------------------- nesting


def test_long_chain_of_nested_indexes(sample_root: Path, sample_info: SampleInfo, tmp_path: Path) -> None:
    """3 000 indexes stacked on an image (three times Python's recursion limit), each a valid
    revision: a legal tree. verify says it is fine (exit 0); the other readers end and answer."""
    repo = "library/base"
    top = nested_indexes(sample_root, repo, sample_info.tags[repo]["latest"], 3_000, tag="chain")
    result = run_cli("verify", str(sample_root), "--json", timeout=60)
    assert_clean_exit(result, (0,), "verify")
    doc = strict_json(result.stdout)
    assert "manifest_cycle" not in kinds(doc)
    inspected = run_cli("inspect", str(sample_root), f"{repo}:chain", "--json", timeout=120)
    assert_clean_exit(inspected, (0, 1), "inspect")
    tree = strict_json(inspected.stdout)["manifest"]
    depth = 0
    while tree.get("manifests"):
        tree = tree["manifests"][0]
        depth += 1
    assert tree.get("problem", "").startswith("not expanded"), tree
    assert 8 <= depth < 3_000
    gc = run_cli("gc", str(sample_root), "--delete-untagged", "--json", timeout=120)
    assert_clean_exit(gc, (0, 1), "gc plan")
    plan = strict_json(gc.stdout)
    assert top not in {m["digest"] for m in plan["manifests"]}  # every level hangs off the tag
    exported = run_cli("export", str(sample_root), f"{repo}:chain", "-o", str(tmp_path / "chain"),
                       "--format", "oci", timeout=300)
    assert_clean_exit(exported, (0,), "export")


def test_index_listing_its_child_twice_at_every_level(sample_root: Path, sample_info: SampleInfo,
                                                      tmp_path: Path) -> None:
    """40 levels, each listing the level below twice: 2^40 paths, 40 distinct manifests."""
    repo = "library/base"
    nested_indexes(sample_root, repo, sample_info.tags[repo]["latest"], 40, width=2, tag="wide")
    results = run_every_reader(sample_root, f"{repo}:wide", sample_info.shared_layers[0], tmp_path)
    assert results["verify"].returncode == 0
    assert results["inspect"].returncode in (0, 1)
    assert "not expanded" in results["inspect"].stdout.decode()
    why = strict_json(results["why"].stdout)
    assert why["digest"] == sample_info.shared_layers[0]


def test_wide_index_of_missing_children(sample_root: Path) -> None:
    """One index listing 15 000 children that do not exist: each is a finding, quickly."""
    children = [f"sha256:{i:064x}" for i in range(15_000)]
    add_manifest(sample_root, "a/b", index_of(*children), "wide")
    result = run_cli("verify", str(sample_root), "--json", "--no-data", timeout=60)
    assert_clean_exit(result, (1,), "verify")
    missing = kinds(strict_json(result.stdout)).get("reference_missing", set())
    assert set(children) <= missing


def test_config_nested_absurdly_deep(sample_root: Path, tmp_path: Path) -> None:
    """A valid image whose config blob nests 200 000 arrays: --deep and inspect say so."""
    config = (b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"x":'
              + b"[" * 200_000 + b"]" * 200_000 + b"}")
    digest = sha256_of(config)
    put(sample_root, layout.blob_data(digest), config)
    put(sample_root, layout.layer_link("deep/config", digest), digest.encode())
    add_manifest(sample_root, "deep/config", json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest,
                   "size": len(config)}, "layers": []}).encode(), "latest")
    results = run_many({
        "verify --deep": ("verify", str(sample_root), "--deep", "--json"),
        "inspect": ("inspect", str(sample_root), "deep/config:latest", "--json"),
        "export": ("export", str(sample_root), "deep/config:latest", "-o", str(tmp_path / "x.tar"),
                   "--format", "docker-archive"),
    }, timeout=120)
    assert_clean_exit(results["verify --deep"], (1,), "verify --deep")
    deep = [f for f in strict_json(results["verify --deep"].stdout)["findings"]
            if f.get("digest") == digest or digest in f.get("message", "")]
    assert deep, "the deep config is not reported"
    assert_clean_exit(results["inspect"], (0, 1), "inspect")
    assert "too deep" in results["inspect"].stdout.decode()
    assert_clean_exit(results["export"], (0, 1, 3), "export")


def test_import_source_with_a_deep_index_json(sample_root: Path, tmp_path: Path) -> None:
    layout_dir = tmp_path / "layout"
    (layout_dir / "blobs" / "sha256").mkdir(parents=True)
    (layout_dir / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout_dir / "index.json").write_bytes(b'{"schemaVersion":2,"manifests":' + b"[" * 100_000
                                            + b"]" * 100_000 + b"}")
    before = content_snapshot(sample_root / "docker")
    result = run_cli("import", str(sample_root), str(layout_dir), "--repo", "x/y", "--apply")
    assert_clean_exit(result, (1, 3), "import of a deep index.json")
    assert b"index.json" in result.stderr
    assert content_snapshot(sample_root / "docker") == before


def test_strings_inside_manifests_and_configs_reach_no_terminal_raw(sample_root: Path,
                                                                    tmp_path: Path) -> None:
    """Platforms, media types, annotations and config fields are the pusher's to choose:
    rich markup (`[/]`) and terminal escapes (colours, OSC 8 links, clear screen) in them
    are shown as text by every human output, never interpreted."""
    repo = "hostile/strings"
    hostile = "[/] \x1b[2J\x1b]8;;http://evil\x1b\\link [bold]x[/x]"

    def linked_blob(data: bytes) -> str:
        digest = sha256_of(data)
        put(sample_root, layout.blob_data(digest), data)
        put(sample_root, layout.layer_link(repo, digest), digest.encode())
        return digest

    layer = b"layer bytes"
    layer_digest = linked_blob(layer)
    config = json.dumps({
        "architecture": hostile, "os": hostile, "variant": hostile, "author": hostile,
        "created": hostile, "config": {"Cmd": [hostile], "Entrypoint": [hostile], "Env": [hostile],
                                       "Labels": {hostile: hostile}},
        "rootfs": {"type": "layers", "diff_ids": [sha256_of(layer)]},
        "history": [{"created": hostile, "created_by": hostile, "comment": hostile}]}).encode()
    config_digest = linked_blob(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": hostile, "digest": layer_digest, "size": len(layer)}],
        "annotations": {hostile: hostile}}).encode()
    child = add_manifest(sample_root, repo, manifest)
    add_manifest(sample_root, repo, json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": child,
            "size": len(manifest), "platform": {"os": hostile, "architecture": hostile,
                                                "variant": hostile}}]}).encode(), "latest")
    results = run_many({
        "inspect": ("inspect", str(sample_root), f"{repo}:latest"),
        "why": ("why", str(sample_root), layer_digest),
        "verify --deep": ("verify", str(sample_root), "--deep"),
        "repair": ("repair", str(sample_root)),
        "gc": ("gc", str(sample_root), "--grace", "0"),
        "export": ("export", str(sample_root), f"{repo}:latest", "-o", str(tmp_path / "x.tar"),
                   "--format", "docker-archive"),
    }, timeout=120)
    for name, result in results.items():
        assert_clean_exit(result, (0, 1, 2, 3), name)
        assert b"\x1b" not in result.stdout + result.stderr, f"{name} sent a raw escape"
    assert b"[/]" in results["inspect"].stdout
