"""Signatures, attestations, SBOM referrers, ORAS artifacts, zstd / zstd:chunked layers, written
by the real writers into trees of the real registry 2.8 and v3.1.1 (see realtools_artifacts).

What must hold on every one of them: verify and verify --deep find nothing false; scan names
each manifest by what it is and what it attaches to; gc's default plan is the official
collector's; --delete-untagged keeps every tag and every referrer of a kept subject (v3's -m
wrongly drops an untagged referrer of a tagged image); after --apply both registries serve
every tag and every referrer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests import realtools
from tests.realtools_artifacts import (
    MT_COSIGN_SIMPLESIGNING,
    ArtifactInfo,
    build_artifact_registry,
    go_style_tar,
    registry3_missing,
    registry_binaries,
    serves_everything,
)
from tests.support.cli import invoke as cli

pytestmark = pytest.mark.realtools
VERSIONS = ["2.8", "3"]


def _binary(version: str) -> str:
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(missing)
    binary = registry_binaries()[version]
    if binary is None:
        pytest.skip(registry3_missing() or "registry v3 unavailable")
    return binary


@pytest.fixture(scope="module", params=VERSIONS)
def built(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ArtifactInfo]:
    """One tree per registry version, written once per module (copy before changing it)."""
    version = str(request.param)
    root = tmp_path_factory.mktemp(f"artifacts-{version}") / "root"
    return root, build_artifact_registry(root, _binary(version), version)


@pytest.fixture
def tree(built: tuple[Path, ArtifactInfo], tmp_path: Path) -> tuple[Path, ArtifactInfo]:
    root = tmp_path / "root"
    shutil.copytree(built[0], root, symlinks=True)
    return root, built[1]


def _json(*args: str) -> dict[str, Any]:
    proc = cli(*args, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def _expected_true_findings(info: ArtifactInfo) -> set[tuple[str, str | None, str | None]]:
    """The deleted image's SBOM really has lost its subject; the API delete left an empty
    revision directory. Nothing else is wrong in these trees."""
    return {("subject_missing", "deleted/app", info.obj("gone.sbom").digest),
            ("empty_dir", "deleted/app", None)}


def _findings(doc: dict[str, Any]) -> set[tuple[str, str | None, str | None]]:
    return {(f["kind"], f.get("repo"), f.get("digest") if f["kind"] != "empty_dir" else None)
            for f in doc["findings"]}


# --------------------------------------------------------------------------- verify


def test_verify_and_deep_find_nothing_false(built: tuple[Path, ArtifactInfo]) -> None:
    """Before: --deep reported layer_not_tar on every cosign signature and cosign .att
    (simple-signing JSON / DSSE envelopes under an image config are not tars)."""
    root, info = built
    assert _findings(_json("verify", str(root))) == _expected_true_findings(info)
    deep = _json("verify", "--deep", str(root))
    assert _findings(deep) == _expected_true_findings(info)
    # The three filesystem layers (gzip, zstd, zstd:chunked) were decompressed and walked;
    # the signature payloads' diff_ids are their own digests: nothing to decompress.
    assert deep["deep"]["layers_checked"] == 3
    assert deep["deep"]["tar_entries"] > 0


def test_deep_checks_an_artifact_blob_only_against_its_diff_id(tmp_path: Path) -> None:
    """An artifact blob under an image config: a diff_id that names other bytes is still
    caught (not a false negative), a gzip-compressed one is compared uncompressed, and no
    tar rule applies to either."""
    _binary("2.8")
    payload = b'{"critical":{"type":"cosign container image signature"}}'
    import gzip
    zipped_json = gzip.compress(b'{"not":"a tar"}', mtime=0)
    lay = realtools.OCILayoutWriter(tmp_path / "layout")
    good = realtools.Layer(lay.add_blob(payload, MT_COSIGN_SIMPLESIGNING),
                           realtools.sha256_digest(payload))
    zipped = realtools.Layer(lay.add_blob(zipped_json, "application/vnd.example.json+gzip"),
                             realtools.sha256_digest(b'{"not":"a tar"}'))
    wrong = realtools.Layer(lay.add_blob(payload + b" ", MT_COSIGN_SIMPLESIGNING),
                            realtools.sha256_digest(b"something else"))
    ok_img = lay.add_image([good, zipped], tag="ok")
    bad_img = lay.add_image([wrong], tag="bad")
    root = tmp_path / "root"
    with realtools.RealRegistry(root) as reg:
        reg.push_from_layout(lay, "sig/ok", ok_img, "latest")
        reg.push_from_layout(lay, "sig/bad", bad_img, "latest")
    deep = _json("verify", "--deep", str(root))
    assert {(f["kind"], f["repo"], f["digest"]) for f in deep["findings"]} == {
        ("layer_diff_id_mismatch", "sig/bad", wrong.digest)}


def test_zstd_chunked_of_a_python_ended_tar_is_rightly_flagged(tmp_path: Path) -> None:
    """skopeo 1.9.3's zstd:chunked writer drops the record padding Python's tarfile adds: the
    layer no longer hashes to the diff_id the config keeps (a real defect --deep must see);
    the same files ended as Go ends a tar pass."""
    _binary("2.8")
    files = {"etc/chunked": b"chunked\n", "usr/lib/c.bin": realtools.pseudo_random_bytes("py", 9000)}
    lay = realtools.OCILayoutWriter(tmp_path / "layout")
    py_tar = realtools.make_tar(files)
    go_files = {**files, "etc/go": b"go\n"}
    go_tar = go_style_tar(go_files)
    for name, tar in (("py", py_tar), ("go", go_tar)):
        layer = realtools.Layer(lay.add_blob(tar, realtools.MT_OCI_LAYER), realtools.sha256_digest(tar))
        lay.add_image([layer], tag=name)
    root = tmp_path / "root"
    with realtools.RealRegistry(root) as reg:
        for name in ("py", "go"):
            realtools.skopeo_copy(lay.ref(name), f"docker://{reg.host}/chunked/{name}:latest",
                                  "--dest-compress", "--dest-compress-format", "zstd:chunked")
    deep = _json("verify", "--deep", str(root))
    assert {(f["kind"], f["repo"]) for f in deep["findings"]} == {
        ("layer_diff_id_mismatch", "chunked/py")}


# --------------------------------------------------------------------------- scan


def test_scan_names_every_kind_and_its_subject(built: tuple[Path, ArtifactInfo]) -> None:
    root, info = built
    doc = _json("scan", str(root))
    objects = {(repo["name"], o["digest"]): o for repo in doc["repositories"] for o in repo["objects"]}
    for name, want in info.objects.items():
        got = objects[(want.repo, want.digest)]
        assert got["kind"] == want.kind, name
        assert got["subject"] == want.subject, name
        assert sorted(got["tags"]) == sorted(want.tags), name
        if want.artifact_type is not None:
            assert got["artifact_type"] == want.artifact_type, name
    assert objects[("signed/app", info.obj("app.sig").digest)]["subject_via"] == "tag"
    assert objects[("signed/app", info.obj("app.sbom").digest)]["subject_via"] == "subject"
    assert doc["kinds"]["signature"] == 4 and doc["kinds"]["sbom"] == 2
    # The old keys stay.
    assert {"name", "tags", "manifests", "unique_bytes"} <= set(doc["repositories"][0])
    human = cli("scan", str(root), env={**os.environ, "COLUMNS": "250"})
    assert human.returncode == 0, human.stderr
    for word in ("signature", "attestation", "sbom", "referrers", "application/vnd.cncf.helm.config.v1+json"):
        assert word in human.stdout


# --------------------------------------------------------------------------- gc


def _official(root: Path, tmp_path: Path, binary: str, delete_untagged: bool) -> realtools.GCPlan:
    config = realtools.write_registry_config(tmp_path / "gc.yml", root, schema1=False)
    return realtools.gc_dry_run(config, delete_untagged=delete_untagged, binary=binary)


def test_gc_default_plan_is_the_official_plan(built: tuple[Path, ArtifactInfo], tmp_path: Path) -> None:
    root = built[0]
    plan = _json("gc", str(root), "--grace", "0")
    for version in VERSIONS:  # the writer's collector, and the other one agrees too
        binary = registry_binaries()[version]
        if binary is None:
            continue
        theirs = _official(root, tmp_path, binary, False)
        assert {b["digest"] for b in plan["blobs"]} == theirs.blobs, version
        assert plan["manifests"] == [] and not theirs.manifests


def test_gc_delete_untagged_keeps_referrers_of_kept_subjects_and_both_registries_serve(
        tree: tuple[Path, ArtifactInfo], tmp_path: Path) -> None:
    root, info = tree
    v3 = registry_binaries()["3"]
    plan = _json("gc", str(root), "--grace", "0", "--delete-untagged")
    ours_manifests = {(m["repo"], m["digest"]) for m in plan["manifests"]}
    ours_blobs = {b["digest"] for b in plan["blobs"]}
    vuln = info.obj("app.vuln")  # untagged, in no referrers index: only its subject keeps it
    gone_sbom = info.obj("gone.sbom")
    assert (gone_sbom.repo, gone_sbom.digest) in ours_manifests  # its subject is gone
    for name, obj in info.objects.items():
        if name != "gone.sbom":
            assert (obj.repo, obj.digest) not in ours_manifests, name
            assert obj.digest not in ours_blobs, name
    if v3 is not None:
        theirs = _official(root, tmp_path, v3, True)
        # v3 -m deletes the untagged referrer of a tagged image (and its unique blobs);
        # regfsck keeps it. Otherwise the plans agree.
        assert theirs.manifests - ours_manifests == {(vuln.repo, vuln.digest)}
        assert ours_manifests <= theirs.manifests
        vuln_blobs = theirs.blobs - ours_blobs
        assert vuln.digest in vuln_blobs and ours_blobs <= theirs.blobs
    applied = cli("gc", str(root), "--grace", "0", "--delete-untagged", "--apply")
    assert applied.returncode == 0, applied.stderr + applied.stdout
    after = _json("verify", "--deep", str(root))
    assert after["findings"] == []
    for version in VERSIONS:
        binary = registry_binaries()[version]
        if binary is None:
            continue
        with realtools.RealRegistry(root, binary=binary, schema1=False) as reg:
            served = {repo: {t: reg.manifest_digest(repo, t) for t in reg.tags(repo)}
                      for repo in reg.catalog()}
            assert served == info.tags, version
            assert serves_everything(reg, info, keep_deleted_referrers=False,
                                     pull_dir=tmp_path / f"pulled-{version}") == [], version


# --------------------------------------------------------------------------- inspect, why


def test_inspect_shows_kind_subject_and_every_referrer(built: tuple[Path, ArtifactInfo]) -> None:
    root, info = built
    app = info.obj("app")
    report = _json("inspect", str(root), "signed/app:latest")
    got = {(r["digest"], r["kind"], r["via"]) for r in report["referrers"]}
    want = {(o.digest, o.kind, "subject" if o.tags == [] else "tag")
            for name, o in info.objects.items() if o.repo == "signed/app" and o.subject == app.digest}
    assert got == want
    sig = info.obj("app.sig")
    report = _json("inspect", str(root), f"signed/app:{sig.tags[0]}")
    assert (report["kind"], report["subject"], report["subject_via"]) == ("signature", app.digest, "tag")
    chart = _json("inspect", str(root), "charts/demo:0.1.0")
    assert chart["manifest"]["artifact_type"] == "application/vnd.cncf.helm.config.v1+json"
    assert [r["kind"] for r in chart["referrers"]] == ["signature"]
    sbom = _json("inspect", str(root), f"signed/app@{info.obj('app.sbom').digest}")
    assert (sbom["kind"], sbom["subject"], sbom["subject_via"]) == ("sbom", app.digest, "subject")


def test_why_names_the_tag_or_the_referrer_that_keeps_a_blob(built: tuple[Path, ArtifactInfo]) -> None:
    root, info = built
    v2 = root / "docker" / "registry" / "v2" / "blobs" / "sha256"

    def layer_of(digest: str) -> str:
        doc = json.loads((v2 / digest[7:9] / digest[7:] / "data").read_bytes())
        return str(doc["layers"][0]["digest"])

    sig = info.obj("app.sig")
    verdicts = {v["mode"]: v for v in _json("why", str(root), layer_of(sig.digest))["gc"]}
    assert f"tag signed/app:{sig.tags[0]} (signature of {info.obj('app').digest})" in \
        verdicts["gc --delete-untagged"]["reason"]
    vuln = info.obj("app.vuln")
    verdicts = {v["mode"]: v for v in _json("why", str(root), layer_of(vuln.digest))["gc"]}
    why = verdicts["gc --delete-untagged"]["reason"]
    assert f"referrer signed/app@{vuln.digest}" in why and "tag signed/app:latest keeps its subject" in why


# --------------------------------------------------------------------------- export, import


def test_export_takes_referrers_along_and_import_gives_a_tree_both_registries_serve(
        built: tuple[Path, ArtifactInfo], tmp_path: Path) -> None:
    root, info = built
    out = tmp_path / "layout"
    exported = _json("export", str(root), "signed/app:latest", "charts/demo:0.1.0", "-o", str(out))
    names = {image["ref_name"] for image in exported["images"]}
    for name, obj in info.objects.items():
        if obj.repo in ("signed/app", "charts/demo"):
            assert ({f"{obj.repo}:{t}" for t in obj.tags} or {f"{obj.repo}@{obj.digest}"}) <= names, name
    assert exported["referrers"] == 7
    bare = _json("export", str(root), "signed/app:latest", "-o", str(tmp_path / "bare"),
                 "--no-referrers")
    assert [i["ref_name"] for i in bare["images"]] == ["signed/app:latest"]
    dest = tmp_path / "imported"
    dest.mkdir()
    imported = cli("import", str(dest), str(out), "--apply")
    assert imported.returncode == 0, imported.stderr
    assert _json("verify", "--deep", str(dest))["findings"] == []
    for version in VERSIONS:
        binary = registry_binaries()[version]
        if binary is None:
            continue
        with realtools.RealRegistry(dest, binary=binary, schema1=False) as reg:
            for repo in ("signed/app", "charts/demo"):
                assert {t: reg.manifest_digest(repo, t) for t in reg.tags(repo)} == info.tags[repo]
            for name, obj in info.objects.items():
                if obj.repo in ("signed/app", "charts/demo"):
                    assert reg.manifest_exists(obj.repo, obj.digest), (version, name)
                    body = reg.get_manifest(obj.repo, obj.digest)[0]
                    assert realtools.sha256_digest(body) == obj.digest
            realtools.skopeo_copy(f"docker://{reg.host}/signed/app:latest",
                                  f"dir:{tmp_path / f'pull-{version}'}", "--preserve-digests")
