"""import checked with the real tools: archives skopeo wrote go in, the real registry serves them.

* skopeo's oci-archive (plain, .gz, .zst) and OCI layout directory, imported into an empty
  ROOT and into a populated one; the registry then serves every tag (pulled with skopeo)
  under the original digests;
* the files an import writes are exactly those the registry writes when skopeo pushes the
  same images (paths, bytes, modes), apart from the empty `_uploads` directories a push
  leaves behind;
* --apply refuses while a registry serves ROOT.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import zstandard

from regfsck.importer import run_import
from tests.realtools import RealRegistry, SampleInfo, pull_every_tag, skopeo_copy
from tests.support.cli import run
from tests.support.export import export
from tests.support.snapshot import STATE_NAMES, snapshot

pytestmark = pytest.mark.realtools


@pytest.fixture(scope="module")
def skopeo_sources(real_sample: tuple[Path, SampleInfo],
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Archives and a layout written by skopeo from the real registry serving the sample."""
    root, _ = real_sample
    out = tmp_path_factory.mktemp("skopeo")
    sources = {"archive": out / "multi.tar", "layout": out / "layout"}
    with RealRegistry(root) as registry:
        skopeo_copy(f"docker://{registry.host}/multi/oci:latest", f"oci-archive:{sources['archive']}:latest",
                    "--all", "--preserve-digests")
        for repo, name in [("library/base", "base"), ("compress/zstd", "zstd"), ("a/b/c", "abc")]:
            skopeo_copy(f"docker://{registry.host}/{repo}:latest", f"oci:{sources['layout']}:{name}")
    raw = sources["archive"].read_bytes()
    sources["zst"] = out / "multi.tar.zst"
    sources["zst"].write_bytes(zstandard.ZstdCompressor().compress(raw))
    sources["gz"] = out / "multi.tgz"
    sources["gz"].write_bytes(gzip.compress(raw))
    return sources


def _served(root: Path, refs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    with RealRegistry(root) as registry:
        return {(repo, tag): registry.manifest_digest(repo, tag) for repo, tag in refs}


def test_skopeo_sources_into_an_empty_root(skopeo_sources: dict[str, Path], sample_info: SampleInfo,
                                           tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for kind in ("archive", "zst", "gz"):
        run_import(empty, skopeo_sources[kind], repo=f"imported/{kind}", apply=True)
    result = run_import(empty, skopeo_sources["layout"], repo="imported/layout", apply=True)
    plan = result.plan
    assert sorted(i.tag or "" for i in plan.images) == ["abc", "base", "zstd"]
    with RealRegistry(empty) as registry:
        pulled = pull_every_tag(registry, tmp_path / "pulled")
        assert sorted(pulled) == sorted(
            [f"imported/{k}:latest" for k in ("archive", "zst", "gz")]
            + [f"imported/layout:{t}" for t in ("abc", "base", "zstd")])
        index = sample_info.oci_index[2]
        for kind in ("archive", "zst", "gz"):
            assert registry.manifest_digest(f"imported/{kind}", "latest") == index
            for child in sample_info.index_children[index]:
                assert registry.manifest_exists(f"imported/{kind}", child)
        for tag, original in [("base", "library/base"), ("zstd", "compress/zstd")]:
            assert registry.manifest_digest("imported/layout", tag) == sample_info.tags[original]["latest"]


def test_skopeo_archive_into_a_populated_root(skopeo_sources: dict[str, Path], sample_root: Path,
                                              sample_info: SampleInfo, tmp_path: Path) -> None:
    result = run_import(sample_root, skopeo_sources["zst"], repo="multi/oci", apply=True)
    plan = result.plan
    assert plan.new_blobs == {}  # the tree already holds the image: nothing to copy ...
    assert plan.links == []  # ... and nothing to link: the same tag, the same digest
    result = run_import(sample_root, skopeo_sources["layout"], repo="copies/skopeo", apply=True)
    plan = result.plan
    assert plan.existing_blobs and plan.links
    refs = [(repo, tag) for repo, tags in sample_info.tags.items() for tag in tags]
    served = _served(sample_root, [*refs, ("copies/skopeo", "base")])
    assert {ref: served[ref] for ref in refs} == {(r, t): d for r, tags in sample_info.tags.items()
                                                  for t, d in tags.items()}
    assert served[("copies/skopeo", "base")] == sample_info.tags["library/base"]["latest"]
    with RealRegistry(sample_root) as registry:
        pulled = pull_every_tag(registry, tmp_path / "pulled")
    assert "copies/skopeo:abc" in pulled and len(pulled) == len(refs) + 3


def test_import_writes_what_a_push_writes(real_sample: tuple[Path, SampleInfo], tmp_path: Path) -> None:
    root, _ = real_sample
    refs = ["library/base:latest", "multi/oci:latest", "compress/zstd:latest", "a/b:latest"]
    archive = tmp_path / "images.tar"
    export(root, refs, archive, with_referrers=False)  # compared with a push of `refs` alone
    pushed, imported = tmp_path / "pushed", tmp_path / "imported"
    with RealRegistry(pushed) as registry:
        for ref in refs:
            skopeo_copy(f"oci-archive:{archive}:{ref}", f"docker://{registry.host}/{ref}", "--all",
                        "--preserve-digests")
    imported.mkdir()
    run_import(imported, archive, apply=True)
    by_push = {p: v for p, v in snapshot(pushed, mtimes="none", skip=STATE_NAMES).items()
               if "_uploads" not in p}
    assert snapshot(imported, mtimes="none", skip=STATE_NAMES) == by_push


def test_refuses_while_a_registry_serves_root(skopeo_sources: dict[str, Path], sample_root: Path) -> None:
    before = snapshot(sample_root, mtimes="none", skip=STATE_NAMES)
    with RealRegistry(sample_root):
        result = run("import", str(sample_root), str(skopeo_sources["archive"]), "--repo", "x/y",
                     "--apply")
    assert result.returncode == 3, result.stderr
    assert "docker-registry" in result.stderr and "Stop the registry" in result.stderr
    assert snapshot(sample_root, mtimes="none", skip=STATE_NAMES) == before
