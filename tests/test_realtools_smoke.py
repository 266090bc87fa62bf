"""Smoke tests of the real-tools harness (``tests/realtools.py``) and the shipped fixture.

What the official GC (distribution 2.8.2) does on the sample tree, checked below:

* ``garbage-collect --dry-run``: exit 0; the schema1 manifest is handled (its ``blobSum``s are
  marked); it would delete exactly the three blobs of the manifest DELETEd through the API
  (manifest JSON, config, unique layer) = ``SampleInfo.unreferenced_blobs``; no manifests.
* ``--delete-untagged``: exit 0; six manifests eligible: the re-pushed revision of ``a/b/c``,
  the SBOM artifact pushed by digest (``subject`` is ignored), and the two children of both
  ``multi/oci`` and ``multi/docker`` (upstream bug #3004: untagged children of tagged
  indexes are deleted, so a real run leaves both multi-arch ``latest`` tags unpullable; the
  child manifest blobs survive because the index marks them as blobs, their configs and
  unshared layers do not). Blobs eligible = everything not referenced by a kept manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import realtools as rt  # tests/ is on sys.path (rootdir-less test dir; see conftest.py)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
needs_tools = pytest.mark.skipif(
    not rt.have_real_tools(), reason=rt.REAL_TOOLS_SKIP_REASON or "real tools unavailable"
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, rt.SampleInfo]:
    """A sample registry built once for this module."""
    if not rt.have_real_tools():
        pytest.skip(rt.REAL_TOOLS_SKIP_REASON)
    root = tmp_path_factory.mktemp("sample") / "registry"
    return root, rt.build_sample_registry(root)


def _expected_gc(info: rt.SampleInfo, dropped: set[str]) -> set[str]:
    """Blobs a 2.8 GC deletes when the manifests ``dropped`` are not marked."""
    kept = {d for ds in info.revisions.values() for d in ds} - dropped
    marked = kept | {r for d in kept for r in info.references[d]}
    return set(info.all_blobs) - marked


def test_parse_gc_output() -> None:
    out = (
        "a/b\na/b: marking manifest sha256:aa \na/b: marking blob sha256:bb\n"
        "x/y\nmanifest eligible for deletion: sha256:cc\n\n"
        "2 blobs marked, 1 blobs and 1 manifests eligible for deletion\n"
        "blob eligible for deletion: sha256:dd\n"
        'time="2024-01-01T00:00:00Z" level=info msg="Deleting blob: /x"\n'
    )
    plan = rt.parse_gc_output(out)
    assert plan.repos == ["a/b", "x/y"]
    assert plan.marked_manifests == {("a/b", "sha256:aa")}
    assert plan.marked_blobs == {("a/b", "sha256:bb")}
    assert plan.manifests == {("x/y", "sha256:cc")}
    assert plan.blobs == {"sha256:dd"}
    assert plan.summary == (2, 1, 1)


@pytest.mark.realtools
@needs_tools
def test_sample_registry_api_agrees(sample: tuple[Path, rt.SampleInfo]) -> None:
    root, info = sample
    assert (root / "docker/registry/v2/repositories/a/b/_layers").is_dir()
    with rt.RealRegistry(root) as reg:
        assert reg.catalog() == info.catalog
        assert {r: {t: reg.manifest_digest(r, t) for t in reg.tags(r)} for r in info.catalog} == (
            info.tags
        )
        for repo, digests in info.revisions.items():
            for digest in digests:
                body, media_type, got = reg.get_manifest(repo, digest)
                assert (got, media_type) == (digest, info.media_types[digest])
                if info.schema1[2] != digest:  # schema1 is re-signed on every GET
                    assert rt.sha256_digest(body) == digest
        repo, _, digest = info.deleted
        assert not reg.manifest_exists(repo, digest)
        artifact = json.loads(reg.get_manifest(info.artifact[0], info.artifact[1])[0])
        assert artifact["subject"]["digest"] == info.artifact[2]
        assert artifact["artifactType"] == info.artifact[3]
        assert artifact["config"]["digest"] == rt.EMPTY_JSON_DIGEST
    # Upload status needs the HMAC-signed ``_state`` of its Location, so check the disk.
    repo, uuid, size = info.upload
    upload = rt.data_dir(root) / "repositories" / repo / "_uploads" / uuid
    assert (upload / "data").stat().st_size == size
    assert (upload / "startedat").read_text().endswith("Z")
    assert sorted(p.name for p in (upload / "hashstates" / "sha256").iterdir()) == ["0", str(size)]
    zstd_layer = rt.read_stored_blob(root, info.zstd[2])
    assert zstd_layer[:4] == b"\x28\xb5\x2f\xfd"
    assert info.blobs["layer/base"] in info.shared_layers
    for layer in info.shared_layers:
        assert sum(layer in links for links in info.layer_links.values()) > 1


@pytest.mark.realtools
@needs_tools
def test_official_gc_dry_run(sample: tuple[Path, rt.SampleInfo], tmp_path: Path) -> None:
    root, info = sample
    config = rt.write_registry_config(tmp_path / "config.yml", root)
    rc, out = rt.garbage_collect(config, dry_run=True)
    assert rc == 0, out
    plan = rt.parse_gc_output(out)
    assert plan.repos == info.catalog
    assert plan.manifests == set()
    assert plan.blobs == set(info.unreferenced_blobs) == _expected_gc(info, set())

    rc, out = rt.garbage_collect(config, dry_run=True, delete_untagged=True)
    assert rc == 0, out
    plan = rt.parse_gc_output(out)
    children = {
        (repo, child)
        for repo, _, index in (info.oci_index, info.docker_list)
        for child in info.index_children[index]
    }
    assert plan.manifests == {
        (info.untagged[0], info.untagged[2]),
        (info.artifact[0], info.artifact[1]),
        *children,
    }
    assert plan.blobs == _expected_gc(info, {d for _, d in plan.manifests})


@pytest.mark.realtools
@needs_tools
def test_shipped_fixture_pullable(tmp_path: Path) -> None:
    """The committed fixture serves what registry.json says and every tag pulls with skopeo."""
    if not (FIXTURES / "registry.json").exists():
        pytest.skip("fixtures/registry.json missing (run python fixtures/regenerate.py)")
    doc = json.loads((FIXTURES / "registry.json").read_text())
    info = rt.SampleInfo.from_json(doc)
    root = rt.materialize_fixture(FIXTURES / "registry", tmp_path / "registry", doc["empty_dirs"])
    with rt.RealRegistry(root) as reg:
        assert reg.catalog() == doc["api"]["catalog"] == info.catalog
        tags = {r: {t: reg.manifest_digest(r, t) for t in reg.tags(r)} for r in info.catalog}
        assert tags == doc["api"]["tags"] == info.tags
        assert rt.pull_every_tag(reg, tmp_path / "pulled") == doc["api"]["pulled"]
        plan = rt.gc_dry_run(reg.config_path)
    assert sorted(plan.blobs) == doc["gc_dry_run"]["blobs"] == info.unreferenced_blobs
