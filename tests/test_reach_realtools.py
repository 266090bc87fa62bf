"""The reachability oracle against the real registries (issue 10, items 1 and 4).

Trees are built by the real registry (2.8 and v3) through its API:

* `team/alias:v1`: a layer uploaded with `digest=sha512:...` and a config uploaded with
  `digest=sha384:...` (the registry stores both under their sha256 and links the alias);
* `team/urls:v1`: an OCI image whose non-distributable layer AND ordinary OCI layer carry
  `urls`, both pushed with their bytes (config allows `urls`);
* `team/urls:idx`: an OCI index whose child descriptor carries `urls`;
* `team/ext:v1`: a foreign layer with `urls` whose bytes were never pushed (allowed missing).

Every one of them must survive `regfsck gc --apply` in both modes (pulled afterwards with
skopeo from the real registry), verify must find no error, export must carry the bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import realtools
from tests.support.cli import invoke as cli

pytestmark = pytest.mark.realtools

MT_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
# Connection refused at once: clients fall back to the registry for the bytes.
URLS = ["http://127.0.0.1:1/blob"]


@dataclass
class Built:
    root: Path
    binary: str
    tags: dict[str, str] = field(default_factory=dict)  # "repo:tag" -> manifest digest
    alias_layer: str = ""  # sha512:...
    alias_config: str = ""  # sha384:...
    alias_stored: set[str] = field(default_factory=set)  # their sha256 (stored) digests
    urls_stored: set[str] = field(default_factory=set)  # urls-carrying blobs with bytes
    index_child: str = ""
    missing_foreign: str = ""


def _config(files: dict[str, bytes]) -> bytes:
    diff_id = realtools.sha256_digest(realtools.make_tar(files))
    return json.dumps({"architecture": "amd64", "os": "linux",
                       "rootfs": {"type": "layers", "diff_ids": [diff_id]}},
                      sort_keys=True).encode()


def _manifest(config: tuple[str, bytes], layers: list[dict[str, object]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": realtools.MT_OCI_MANIFEST,
                       "config": {"mediaType": realtools.MT_OCI_CONFIG, "digest": config[0],
                                  "size": len(config[1])},
                       "layers": layers}).encode()


def build(root: Path, binary: str) -> Built:
    out = Built(root, binary)
    with realtools.RealRegistry(root, binary=binary, allow_urls=True) as reg:
        # sha512 layer + sha384 config
        files = {"alias.txt": b"pushed by sha512"}
        layer, _ = realtools.make_layer(files)
        cfg = _config(files)
        out.alias_layer = reg.put_blob("team/alias", layer, "sha512")
        out.alias_config = reg.put_blob("team/alias", cfg, "sha384")
        out.alias_stored = {realtools.sha256_digest(layer), realtools.sha256_digest(cfg)}
        body = _manifest((out.alias_config, cfg), [
            {"mediaType": realtools.MT_OCI_LAYER_GZIP, "digest": out.alias_layer,
             "size": len(layer)}])
        out.tags["team/alias:v1"] = reg.put_manifest("team/alias", "v1", body,
                                                     realtools.MT_OCI_MANIFEST)
        # urls layers with their bytes
        files = {"foreign.txt": b"non-distributable but pushed"}
        nondist, _ = realtools.make_layer(files)
        plain_files = {"plain.txt": b"ordinary layer carrying urls"}
        plain, _ = realtools.make_layer(plain_files)
        cfg2 = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
            "type": "layers", "diff_ids": [realtools.sha256_digest(realtools.make_tar(f))
                                           for f in (files, plain_files)]}}).encode()
        d_nondist = reg.put_blob("team/urls", nondist)
        d_plain = reg.put_blob("team/urls", plain)
        d_cfg2 = reg.put_blob("team/urls", cfg2)
        out.urls_stored = {d_nondist, d_plain}
        body = _manifest((d_cfg2, cfg2), [
            {"mediaType": MT_NONDIST, "digest": d_nondist, "size": len(nondist), "urls": URLS},
            {"mediaType": realtools.MT_OCI_LAYER_GZIP, "digest": d_plain, "size": len(plain),
             "urls": URLS}])
        child = reg.put_manifest("team/urls", "v1", body, realtools.MT_OCI_MANIFEST)
        out.tags["team/urls:v1"] = child
        # an untagged child, listed by a tagged index with `urls` on its descriptor
        files3 = {"child.txt": b"index child"}
        layer3, _ = realtools.make_layer(files3)
        cfg3 = _config(files3)
        d3 = reg.put_blob("team/urls", layer3)
        dc3 = reg.put_blob("team/urls", cfg3)
        body3 = _manifest((dc3, cfg3), [{"mediaType": realtools.MT_OCI_LAYER_GZIP,
                                         "digest": d3, "size": len(layer3)}])
        out.index_child = hashlib.sha256(body3).hexdigest()
        out.index_child = reg.put_manifest("team/urls", f"sha256:{out.index_child}", body3,
                                           realtools.MT_OCI_MANIFEST)
        index = json.dumps({"schemaVersion": 2, "mediaType": realtools.MT_OCI_INDEX,
                            "manifests": [{"mediaType": realtools.MT_OCI_MANIFEST,
                                           "digest": out.index_child, "size": len(body3),
                                           "urls": URLS,
                                           "platform": {"os": "linux",
                                                        "architecture": "amd64"}}]}).encode()
        out.tags["team/urls:idx"] = reg.put_manifest("team/urls", "idx", index,
                                                     realtools.MT_OCI_INDEX)
        # a foreign layer never pushed: allowed missing
        files4 = {"ext.txt": b"elsewhere"}
        ext, _ = realtools.make_layer(files4)
        out.missing_foreign = realtools.sha256_digest(ext)
        cfg4 = _config(files4)
        dc4 = reg.put_blob("team/ext", cfg4)
        body4 = _manifest((dc4, cfg4), [{"mediaType": MT_NONDIST, "digest": out.missing_foreign,
                                         "size": len(ext), "urls": URLS}])
        out.tags["team/ext:v1"] = reg.put_manifest("team/ext", "v1", body4,
                                                   realtools.MT_OCI_MANIFEST)
    return out


@pytest.fixture(params=["2.8", "3"])
def built(request: pytest.FixtureRequest, tmp_path: Path) -> Built:
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(missing)
    binary = realtools.registry_binary(request.param)
    return build(tmp_path / "root", binary)


def _official(built: Built, tmp_path: Path, delete_untagged: bool) -> realtools.GCPlan:
    config = realtools.write_registry_config(tmp_path / "gc.yml", built.root, schema1=False,
                                             allow_urls=True)
    return realtools.gc_dry_run(config, delete_untagged=delete_untagged, binary=built.binary)


def _pull_http(reg: realtools.RealRegistry, repo: str, ref: str) -> None:
    """Pull like a client through the API, checking every blob against its digest with
    the digest's own algorithm (skopeo 1.9.3 cannot store a sha512 blob: "saved with
    digest sha256")."""
    body, _, digest = reg.get_manifest(repo, ref)
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    doc = json.loads(body)
    for desc in [doc["config"], *doc["layers"]]:
        data = reg.get_blob(repo, desc["digest"])
        algorithm, _, hex_part = desc["digest"].partition(":")
        assert hashlib.new(algorithm, data).hexdigest() == hex_part, desc


def _pull_all(built: Built, dest: Path) -> None:
    """Start the real registry on the tree and pull every tag (skopeo checks digests)."""
    dest.mkdir(parents=True, exist_ok=True)
    with realtools.RealRegistry(built.root, binary=built.binary, allow_urls=True) as reg:
        for ref, digest in built.tags.items():
            if ref == "team/ext:v1":  # its layer is elsewhere by design: only the manifest
                assert reg.manifest_digest("team/ext", "v1") == digest
                continue
            repo, _, tag = ref.partition(":")
            assert reg.manifest_digest(repo, tag) == digest, ref
            if repo == "team/alias":
                _pull_http(reg, repo, tag)
                continue
            target = dest / ref.replace("/", "_").replace(":", "_")
            realtools.skopeo_copy(f"docker://{reg.host}/{ref}", f"dir:{target}", "--all")
        assert reg.manifest_exists("team/urls", built.index_child)
        for digest in built.urls_stored:
            assert reg.get_blob("team/urls", digest)
        assert reg.get_blob("team/alias", built.alias_layer)


def test_verify_alias_and_urls_no_false_findings(built: Built) -> None:
    result = cli("verify", str(built.root), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {f["kind"] for f in json.loads(result.stdout)["findings"]}
    assert not kinds & {"reference_missing", "reference_not_linked", "layer_link_dangling"}
    for ref in ("team/alias:v1", "team/urls:v1", "team/urls:idx"):
        shown = cli("inspect", str(built.root), ref, "--json")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "missing" not in shown.stdout, shown.stdout  # sha512 layer found via its alias


@pytest.mark.parametrize("delete_untagged", [False, True], ids=["default", "delete-untagged"])
def test_gc_keeps_alias_and_urls_blobs_then_registry_serves(
        built: Built, tmp_path: Path, delete_untagged: bool) -> None:
    mode = ["--delete-untagged"] if delete_untagged else []
    plan = json.loads(cli("gc", str(built.root), "--grace", "0", *mode, "--json").stdout)
    victims = {b["digest"] for b in plan["blobs"]}
    assert not victims & (built.alias_stored | built.urls_stored), victims
    assert not plan["layer_links"] and not plan["manifests"], plan
    # The official collectors keep what carries `urls` too (they delete the sha256 data of
    # the sha512/sha384 uploads: regfsck does better there).
    theirs = _official(built, tmp_path, delete_untagged)
    assert not theirs.blobs & built.urls_stored
    result = cli("gc", str(built.root), "--grace", "0", *mode, "--apply", "--json")
    assert result.returncode == 0, result.stderr
    _pull_all(built, tmp_path / "pulled")
    after = cli("verify", str(built.root), "--json")
    assert after.returncode == 0, after.stdout


def test_export_carries_alias_and_urls_bytes(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("export", str(built.root), "team/alias:v1", "team/urls", "-o", str(out),
                 "--json")
    assert result.returncode == 0, result.stderr
    present = {f"{p.parent.name}:{p.name}" for p in (out / "blobs").glob("*/*")}
    assert {built.alias_layer, built.alias_config} <= present
    assert built.urls_stored <= present
    assert built.index_child in present
    # each exported blob holds the bytes its name promises (sha512/sha384 included)
    for name in present:
        algorithm, _, hex_part = name.partition(":")
        data = (out / "blobs" / algorithm / hex_part).read_bytes()
        assert hashlib.new(algorithm, data).hexdigest() == hex_part
    # (skopeo reading an oci layout fetches a `urls` layer from its urls, never from the
    # layout, and cannot store sha512 blobs: the bytes are checked above instead)
    realtools.skopeo("inspect", "--raw", f"oci:{out}:team/alias:v1")


# --------------------------------------------------------------------------- item 9


def _push_image(reg: realtools.RealRegistry, repo: str, tag: str, text: bytes) -> tuple[str, set[str]]:
    """Push a one-layer OCI image by tag; (manifest digest, its blob digests)."""
    files = {"f.txt": text}
    layer, _ = realtools.make_layer(files)
    cfg = _config(files)
    d_layer = reg.put_blob(repo, layer)
    d_cfg = reg.put_blob(repo, cfg)
    body = _manifest((d_cfg, cfg), [{"mediaType": realtools.MT_OCI_LAYER_GZIP,
                                     "digest": d_layer, "size": len(layer)}])
    digest = reg.put_manifest(repo, tag, body, realtools.MT_OCI_MANIFEST)
    return digest, {d_layer, d_cfg, digest}


@pytest.mark.parametrize("delete_untagged", [False, True], ids=["default", "delete-untagged"])
def test_force_never_sweeps_what_a_symlinked_repository_uses(
        tmp_path: Path, delete_untagged: bool) -> None:
    """A healthy repository whose directory is a symlink to another disk: the registry
    follows it; regfsck's scan does not. gc refuses; with --force it must keep every blob
    (what the symlinked part references is unknown), and the registry still serves it."""
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(missing)
    root = tmp_path / "root"
    with realtools.RealRegistry(root) as reg:
        _, kept = _push_image(reg, "team/a", "v1", b"plain repository")
        linked_digest, linked_blobs = _push_image(reg, "team/b", "v1", b"on another disk")
        untagged, _ = _push_image(reg, "team/a", "old", b"untagged in team/a")
    repos = root / "docker/registry/v2/repositories/team"
    (repos / "a/_manifests/tags/old").rename(tmp_path / "old-tag")  # team/a@untagged: untagged
    other = tmp_path / "other-disk"
    other.mkdir()
    (repos / "b").rename(other / "b")
    (repos / "b").symlink_to(other / "b")
    with realtools.RealRegistry(root) as reg:  # the registry follows the symlink
        assert reg.manifest_digest("team/b", "v1") == linked_digest

    mode = ["--delete-untagged"] if delete_untagged else []
    refused = cli("gc", str(root), "--grace", "0", *mode, "--apply", "--json")
    assert refused.returncode != 0 and "symlink" in refused.stdout + refused.stderr
    result = cli("gc", str(root), "--grace", "0", *mode, "--force", "--apply", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    victims = {b["digest"] for b in plan["blobs"]}
    assert not victims & (linked_blobs | kept), victims
    assert victims == set(), "unknown = keep: no blob may go while part of the tree is unread"
    if delete_untagged:  # what the readable part judges is still collected
        assert [m["digest"] for m in plan["manifests"]] == [untagged]
    with realtools.RealRegistry(root) as reg:
        realtools.skopeo_copy(f"docker://{reg.host}/team/b:v1", f"dir:{tmp_path / 'b'}")
        realtools.skopeo_copy(f"docker://{reg.host}/team/a:v1", f"dir:{tmp_path / 'a'}")


# --------------------------------------------------------------------------- item 10


@pytest.fixture(params=["2.8", "3"])
def deleted_child(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Built, str, str]:
    """distribution's TestDeleteManifestIndexWithDanglingReferences through the real API:
    an index of two children is pushed, then one child is DELETEd by digest."""
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(missing)
    binary = realtools.registry_binary(request.param)
    built = Built(tmp_path / "root", binary)
    with realtools.RealRegistry(built.root, binary=binary) as reg:
        children = []
        for arch in ("amd64", "arm64"):
            digest, _ = _push_image(reg, "team/multi", arch, arch.encode())
            body = reg.get_manifest("team/multi", digest)[0]
            children.append({"mediaType": realtools.MT_OCI_MANIFEST, "digest": digest,
                             "size": len(body),
                             "platform": {"os": "linux", "architecture": arch}})
        index = json.dumps({"schemaVersion": 2, "mediaType": realtools.MT_OCI_INDEX,
                            "manifests": children}).encode()
        built.tags["team/multi:all"] = reg.put_manifest("team/multi", "all", index,
                                                        realtools.MT_OCI_INDEX)
        built.tags["team/multi:amd64"] = children[0]["digest"]  # type: ignore[assignment]
        deleted = str(children[1]["digest"])
        reg.delete_manifest("team/multi", deleted)  # also removes the tag arm64
        assert not reg.manifest_exists("team/multi", deleted)
    return built, deleted, built.tags["team/multi:all"]


def test_index_child_deleted_through_api_is_a_warning_and_repair_keeps_the_delete(
        deleted_child: tuple[Built, str, str], tmp_path: Path) -> None:
    built, deleted, index = deleted_child
    result = cli("verify", str(built.root), "--json")
    report = json.loads(result.stdout)
    found = [(f["kind"], f["severity"], f["digest"]) for f in report["findings"]
             if f["severity"] != "info"]
    assert found == [("index_child_deleted", "warning", deleted)], found
    assert result.returncode == 0, "a deliberate delete is no error"
    [finding] = [f for f in report["findings"] if f["kind"] == "index_child_deleted"]
    assert "linux/arm64" in finding["message"] and index in finding["message"]
    assert finding["affected_tags"] == ["team/multi:all"]

    revision = built.root / "docker/registry/v2" / realtools_revision("team/multi", deleted)
    plan = json.loads(cli("repair", str(built.root), "--json").stdout)
    assert not [f for f in plan["fixes"] if deleted in json.dumps(f)], plan
    assert [u["kind"] for u in plan["unfixable"]] == ["index_child_deleted"]
    applied = cli("repair", str(built.root), "--apply", "--json")
    assert applied.returncode in (0, 1), applied.stderr
    assert not revision.exists(), "repair resurrected a manifest deleted through the API"
    with realtools.RealRegistry(built.root, binary=built.binary) as reg:
        assert not reg.manifest_exists("team/multi", deleted)
        assert reg.manifest_exists("team/multi", "all")

    restored = cli("repair", str(built.root), "--restore-deleted", "--apply", "--json")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert revision.is_file()
    with realtools.RealRegistry(built.root, binary=built.binary) as reg:
        realtools.skopeo_copy(f"docker://{reg.host}/team/multi:all", f"dir:{tmp_path / 'all'}",
                              "--all")
    assert cli("verify", str(built.root)).returncode == 0


def realtools_revision(repo: str, digest: str) -> str:
    algorithm, _, hex_part = digest.partition(":")
    return f"repositories/{repo}/_manifests/revisions/{algorithm}/{hex_part}/link"


def test_export_into_missing_directory_is_cannot_write(built: Built, tmp_path: Path) -> None:
    result = cli("export", str(built.root), "team/urls:v1", "-o",
                 str(tmp_path / "missing-dir" / "out.tar"))
    assert result.returncode == 3, result.stderr
    assert "cannot write" in result.stderr
