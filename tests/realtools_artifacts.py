"""What real registries hold besides plain images, written by the real writers.

A builder others reuse (``build_artifact_registry``): one tree per registry version (2.8 and
v3.1.1) holding

* cosign signatures as the real ``sha256-<digest>.sig`` tag, written by skopeo 1.9.3 from a
  ``dir:`` copy holding a sigstore signature file signed here (ECDSA P-256, ``cryptography``);
* sigstore attestations attached by npm ``@sigstore/oci`` 0.6.0 (an OCI 1.1 referrer with a
  ``subject``, plus the ``sha256-<digest>`` referrers fallback index); when node/npm is
  unavailable the same shape is crafted through the API (``ArtifactInfo.attestation_writer``);
* a cosign-style ``sha256-<digest>.att`` tag (crafted through oras: cosign itself is not
  installable here);
* ORAS artifacts pushed with PyPI ``oras`` 0.2.x: an SBOM referrer with ``subject``, a
  vulnerability-report referrer with ``subject`` listed in no index (only its subject keeps
  it), a Helm-chart-shaped artifact holding a real chart tarball, a generic artifact with an
  ``artifactType``, the empty config and custom layer media types;
* zstd and zstd:chunked layers compressed by skopeo (``--dest-compress-format``) from tars
  ending the way Go's archive/tar ends them (so their diff_ids still match);
* an image deleted through the API while its signature and its SBOM referrer remain.

Only 127.0.0.1 is used; every process started here is stopped by its PID.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests import realtools
from tests.realtools import (
    MT_OCI_INDEX,
    MT_OCI_LAYER,
    MT_OCI_MANIFEST,
    Layer,
    OCILayoutWriter,
    RealRegistry,
    RealToolError,
    clean_env,
    make_tar,
    pseudo_random_bytes,
    real_tools_missing,
    sha256_digest,
    skopeo,
    skopeo_copy,
)

MT_COSIGN_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
MT_DSSE = "application/vnd.dsse.envelope.v1+json"
MT_SIGSTORE_BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
MT_SPDX = "application/spdx+json"
MT_HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
MT_HELM_CHART = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
MT_VULN = "application/vnd.regfsck.vulnerability-report.v1+json"
MT_EXAMPLE = "application/vnd.regfsck.example.v1"
MT_OCI_EMPTY = "application/vnd.oci.empty.v1+json"
ZSTD_CHUNKED_TOC = "io.containers.zstd-chunked.manifest-position"

SIGSTORE_NPM_PACKAGES = ("@sigstore/oci@0.6.0", "promise-retry@2.0.1")

_ATTACH_JS = """\
const { attachArtifactToImage } = require('@sigstore/oci');
const fs = require('fs');
const [imageName, imageDigest, mediaType, file] = process.argv.slice(2);
attachArtifactToImage({ imageName, imageDigest, mediaType, artifact: fs.readFileSync(file),
  annotations: {}, credentials: undefined })
  .then((d) => { process.stdout.write(JSON.stringify(d)); })
  .catch((e) => { console.error(String(e), String(e.cause)); process.exit(1); });
"""


# --------------------------------------------------------------------------- availability


@functools.cache
def registry3_binary() -> Path | None:
    """The real registry v3.1.1 binary (``realtools.registry3_binary``), unpacked once per
    process into a per-user temp dir; None when absent."""
    found = realtools.shared_registry3()
    return Path(found) if found is not None else None


def registry3_missing() -> str | None:
    """Why registry v3 cannot be used here, or None."""
    if registry3_binary() is None:
        return "registry v3.1.1 binary unavailable (../shared/bin/unpack-registry3 missing or failed)"
    return None


def registry_binaries() -> dict[str, str | None]:
    """Version label -> binary (None = skip: the reason is ``registry3_missing()``)."""
    v3 = registry3_binary()
    return {"2.8": "docker-registry", "3": str(v3) if v3 is not None else None}


@functools.cache
def sigstore_oci_dir() -> Path | None:
    """A private ``node_modules`` holding ``@sigstore/oci`` 0.6.0; None without node/npm or
    when the install fails (offline). Installed once per machine under the temp dir."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    base = Path(tempfile.gettempdir()) / f"regfsck-sigstore-oci-{os.getuid()}"
    module = base / "node_modules" / "@sigstore" / "oci" / "package.json"
    if not module.exists():
        base.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(base),
             *SIGSTORE_NPM_PACKAGES],
            capture_output=True, timeout=600, check=False, env=clean_env())
        if proc.returncode != 0 or not module.exists():
            return None
    (base / "attach.js").write_text(_ATTACH_JS)
    return base


# --------------------------------------------------------------------------- tars Go writes


def go_style_tar(files: Mapping[str, bytes]) -> bytes:
    """``make_tar`` ended as Go's archive/tar ends a stream: the two zero blocks and nothing
    after them (Python's tarfile pads to a 10 KiB record; skopeo's zstd:chunked writer drops
    that padding, so only Go-ended layers keep their diff_id through it)."""
    raw = make_tar(files)
    end = 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in tar.getmembers():
            end = member.offset_data + -(-member.size // 512) * 512
    return raw[:end] + bytes(1024)


def helm_chart_tgz(name: str = "demo", version: str = "0.1.0") -> bytes:
    """A real (tiny) Helm chart package: ``<name>/Chart.yaml``, values, one template."""
    files = {
        f"{name}/Chart.yaml": (f"apiVersion: v2\nname: {name}\ndescription: regfsck test chart\n"
                               f"type: application\nversion: {version}\nappVersion: \"1.0\"\n"
                               ).encode(),
        f"{name}/values.yaml": b"replicaCount: 1\nimage:\n  repository: signed/app\n  tag: latest\n",
        f"{name}/templates/configmap.yaml": (
            b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
            b"data:\n  replicas: \"{{ .Values.replicaCount }}\"\n"),
    }
    return gzip.compress(make_tar(files), mtime=0)


def helm_chart_config(name: str = "demo", version: str = "0.1.0") -> bytes:
    return json.dumps({"name": name, "version": version, "description": "regfsck test chart",
                       "apiVersion": "v2", "appVersion": "1.0", "type": "application"},
                      separators=(",", ":")).encode()


# --------------------------------------------------------------------------- cosign via skopeo


@dataclasses.dataclass
class Signer:
    """An ECDSA P-256 key signing cosign simple-signing payloads (as ``cosign sign`` does)."""

    seed: int = 1

    def __post_init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        # A fixed key (a test key: it signs nothing anyone trusts).
        self.key = ec.derive_private_key(0x5EED0000 + self.seed, ec.SECP256R1())

    def sign(self, payload: bytes) -> bytes:
        """RFC 6979 deterministic ECDSA: the same payload gives the same signature (so
        fixtures regenerate byte for byte)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return self.key.sign(payload, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def simple_signing_payload(docker_reference: str, digest: str) -> bytes:
    """cosign's simple-signing payload for an image manifest digest."""
    doc = {"critical": {"identity": {"docker-reference": docker_reference},
                        "image": {"docker-manifest-digest": digest},
                        "type": "cosign container image signature"},
           "optional": None}
    return json.dumps(doc, separators=(",", ":")).encode()


def sigstore_signature_file(payload: bytes, signature: bytes) -> bytes:
    """A sigstore signature as containers/image stores it in a ``dir:`` image
    (``signature-N``): a zero byte, ``sigstore-json``, a newline, then the JSON with
    ``mimeType``, base64 ``payload`` and ``annotations``."""
    rep = {"mimeType": MT_COSIGN_SIMPLESIGNING, "payload": base64.b64encode(payload).decode(),
           "annotations": {"dev.cosignproject.cosign/signature":
                           base64.b64encode(signature).decode()}}
    return b"\x00sigstore-json\n" + json.dumps(rep).encode()


def cosign_sign(reg: RealRegistry, repo: str, tag: str, work: Path, signer: Signer,
                identity: str | None = None) -> tuple[str, str]:
    """Sign ``repo:tag`` the way cosign does and let skopeo write it: returns
    ``(sig tag, signature manifest digest)``. skopeo copies the image to ``dir:``, the signature
    file is added there, and copying it back with ``use-sigstore-attachments`` writes the
    real ``sha256-<digest>.sig`` tag. ``identity`` (the payload's docker-reference) defaults
    to ``<host:port>/<repo>``; give a fixed one for reproducible digests."""
    digest = reg.manifest_digest(repo, tag)
    image_dir = work / f"sign-{repo.replace('/', '_')}-{digest[7:19]}"
    if image_dir.exists():
        shutil.rmtree(image_dir)
    skopeo_copy(f"docker://{reg.host}/{repo}:{tag}", f"dir:{image_dir}", "--preserve-digests")
    payload = simple_signing_payload(identity or f"{reg.host}/{repo}", digest)
    (image_dir / "signature-1").write_bytes(sigstore_signature_file(payload, signer.sign(payload)))
    regd = work / "registries.d"
    regd.mkdir(exist_ok=True)
    (regd / "default.yaml").write_text("default-docker:\n  use-sigstore-attachments: true\n")
    skopeo("copy", "--quiet", "--dest-tls-verify=false", "--registries.d", str(regd),
           "--preserve-digests", f"dir:{image_dir}", f"docker://{reg.host}/{repo}:{tag}")
    sig_tag = f"sha256-{digest[7:]}.sig"
    return sig_tag, reg.manifest_digest(repo, sig_tag)


# --------------------------------------------------------------------------- @sigstore/oci


def sigstore_attach(reg: RealRegistry, repo: str, digest: str, bundle: bytes,
                    work: Path) -> tuple[str, str] | None:
    """Attach a sigstore bundle to ``repo@digest`` with npm ``@sigstore/oci`` (what npm and
    sigstore-js clients do): returns ``(referrer digest, writer)``, None without node/npm."""
    base = sigstore_oci_dir()
    if base is None:
        return None
    path = work / f"bundle-{digest[7:19]}.json"
    path.write_bytes(bundle)
    env = dict(clean_env(), NODE_PATH=str(base / "node_modules"))
    proc = subprocess.run(
        ["node", str(base / "attach.js"), f"{reg.host}/{repo}", digest, MT_SIGSTORE_BUNDLE,
         str(path)], capture_output=True, env=env, timeout=120, check=False)
    if proc.returncode != 0:
        raise RealToolError(f"@sigstore/oci attach failed: {proc.stderr.decode(errors='replace')}")
    return str(json.loads(proc.stdout)["digest"]), "@sigstore/oci 0.6.0"


def craft_attach(reg: RealRegistry, repo: str, digest: str, bundle: bytes) -> tuple[str, str]:
    """The shape ``@sigstore/oci`` writes, through the API (used when node/npm is absent)."""
    subject = _descriptor_of(reg, repo, digest)
    created = "2024-01-01T00:00:00.000Z"
    referrer = push_artifact(reg, repo, None, MT_SIGSTORE_BUNDLE, [(bundle, MT_SIGSTORE_BUNDLE)],
                             subject=subject,
                             annotations={"org.opencontainers.image.created": created})
    add_to_referrers_index(reg, repo, digest, referrer, MT_SIGSTORE_BUNDLE,
                           {"org.opencontainers.image.created": created})
    return referrer, "crafted through the API (node/npm unavailable)"


def _descriptor_of(reg: RealRegistry, repo: str, ref: str) -> dict[str, Any]:
    body, media_type, digest = reg.get_manifest(repo, ref)
    return {"mediaType": media_type, "digest": digest, "size": len(body)}


def add_to_referrers_index(reg: RealRegistry, repo: str, subject: str, referrer: str,
                           artifact_type: str, annotations: Mapping[str, str] | None = None) -> str:
    """Add ``referrer`` to the ``sha256-<hex>`` referrers fallback index of ``subject`` (as
    oras-go and @sigstore/oci do on registries without the referrers API)."""
    tag = "sha256-" + subject.split(":", 1)[1]
    if tag in reg.tags(repo):
        doc = json.loads(reg.get_manifest(repo, tag)[0])
    else:
        doc = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": []}
    entry: dict[str, Any] = {**_descriptor_of(reg, repo, referrer), "artifactType": artifact_type}
    if annotations:
        entry["annotations"] = dict(annotations)
    doc["manifests"].append(entry)
    return reg.put_manifest(repo, tag, json.dumps(doc, separators=(",", ":")).encode(), MT_OCI_INDEX)


# --------------------------------------------------------------------------- oras-py


def _oras_registry(reg: RealRegistry, artifact_type: str | None, by_digest: bool) -> Any:
    """An ``oras.provider.Registry`` that also writes ``artifactType`` (oras-py 0.2.x has no
    option for it) and can push a manifest by digest (an untagged referrer)."""
    import oras.provider

    class ArtifactRegistry(oras.provider.Registry):  # type: ignore[misc]
        pushed: str | None = None

        def upload_manifest(self, manifest: dict[str, Any], container: Any) -> Any:
            doc = dict(manifest)
            if artifact_type is not None:
                doc = {"schemaVersion": doc.pop("schemaVersion"), "mediaType": doc.pop("mediaType"),
                       "artifactType": artifact_type, **doc}
            body = json.dumps(doc, separators=(",", ":")).encode()
            self.pushed = sha256_digest(body)
            ref = self.pushed if by_digest else container.tag
            return self.do_request(
                f"{self.prefix}://{container.registry}/v2/{container.api_prefix}/manifests/{ref}",
                "PUT", headers={"Content-Type": MT_OCI_MANIFEST}, data=body)

    return ArtifactRegistry(hostname=reg.host, insecure=True)


def push_artifact(reg: RealRegistry, repo: str, tag: str | None, artifact_type: str | None,
                  blobs: Sequence[tuple[bytes, str]], *, subject: Mapping[str, Any] | None = None,
                  config: tuple[bytes, str] | None = None,
                  annotations: Mapping[str, str] | None = None) -> str:
    """Push an artifact with oras-py; ``tag`` None pushes by digest (untagged). Returns the
    manifest digest. ``config`` None gives the empty config ``{}``
    (``application/vnd.oci.empty.v1+json``)."""
    import oras.oci

    with tempfile.TemporaryDirectory(prefix="regfsck-oras-") as tmp:
        files = []
        for n, (data, media_type) in enumerate(blobs):
            path = Path(tmp) / f"file{n}"
            path.write_bytes(data)
            files.append(f"{path}:{media_type}")
        cfg_data, cfg_type = config if config is not None else (b"{}", MT_OCI_EMPTY)
        cfg_path = Path(tmp) / "config"
        cfg_path.write_bytes(cfg_data)
        client = _oras_registry(reg, artifact_type, tag is None)
        target = f"{reg.host}/{repo}:{tag or 'untagged'}"
        client.push(target=target, files=files, manifest_config=f"{cfg_path}:{cfg_type}",
                    disable_path_validation=True, quiet=True,
                    manifest_annotations=dict(annotations) if annotations else None,
                    subject=oras.oci.Subject(**subject) if subject is not None else None)
        if client.pushed is None:
            raise RealToolError("oras push wrote no manifest")
        return str(client.pushed)


# --------------------------------------------------------------------------- the builder


@dataclasses.dataclass
class Obj:
    """One manifest the builder wrote, and what regfsck must call it."""

    repo: str
    digest: str
    kind: str  # image / index / signature / attestation / sbom / artifact / referrers
    tags: list[str]
    subject: str | None = None
    artifact_type: str | None = None
    writer: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ArtifactInfo:
    """What ``build_artifact_registry`` wrote (digests as the registry reports them)."""

    version: str  # "2.8" or "3"
    binary: str
    objects: dict[str, Obj]  # name -> object
    deleted: str  # digest of the image DELETEd through the API (its sig and SBOM remain)
    tags: dict[str, dict[str, str]]  # repo -> tag -> digest, as served after building
    attestation_writer: str
    chunked_layer: str  # digest of a zstd:chunked layer (TOC annotations)
    zstd_layer: str

    def obj(self, name: str) -> Obj:
        return self.objects[name]


def _image(lay: OCILayoutWriter, name: str, go_tar: bool = False,
           compression: str = "gzip") -> dict[str, Any]:
    files = {f"etc/{name}.txt": f"regfsck {name}\n".encode(),
             f"usr/lib/{name}.bin": pseudo_random_bytes(name, 6000)}
    if go_tar:
        tar = go_style_tar(files)
        layer = Layer(lay.add_blob(tar, MT_OCI_LAYER), sha256_digest(tar))
    else:
        layer = lay.add_layer(files, compression)  # type: ignore[arg-type]
    return lay.add_image([layer], tag=name, history=[f"ADD {name}"])


def build_artifact_registry(root: Path | str, binary: str, version: str) -> ArtifactInfo:
    """Write every scenario of this module into ``root`` with the registry ``binary``."""
    why = real_tools_missing()
    if why:
        raise RealToolError(why)
    root = Path(root)
    objects: dict[str, Obj] = {}
    signer = Signer()
    with tempfile.TemporaryDirectory(prefix="regfsck-artifacts-") as tmp_s, \
            RealRegistry(root, binary=binary, schema1=False) as reg:
        tmp = Path(tmp_s)
        lay = OCILayoutWriter(tmp / "layout")
        label = f"registry {version}"

        def add(name: str, repo: str, digest: str, kind: str, subject: str | None = None,
                artifact_type: str | None = None, writer: str = "") -> str:
            objects[name] = Obj(repo, digest, kind, [], subject, artifact_type, writer)
            return digest

        # signed/app: image, cosign signature, attestations, SBOM and a report as referrers.
        _image(lay, f"app-{version}")
        skopeo_copy(lay.ref(f"app-{version}"), f"docker://{reg.host}/signed/app:latest",
                    "--preserve-digests")
        app = add("app", "signed/app", reg.manifest_digest("signed/app", "latest"), "image",
                  writer="skopeo")
        _, sig = cosign_sign(reg, "signed/app", "latest", tmp, signer)
        add("app.sig", "signed/app", sig, "signature", app, None, "skopeo 1.9.3 (sigstore dir:)")
        app_desc = _descriptor_of(reg, "signed/app", app)
        sbom = push_artifact(reg, "signed/app", None, MT_SPDX,
                             [(json.dumps({"spdxVersion": "SPDX-2.3", "name": label}).encode(),
                               MT_SPDX)], subject=app_desc)
        add("app.sbom", "signed/app", sbom, "sbom", app, MT_SPDX, "oras-py (subject, by digest)")
        add_to_referrers_index(reg, "signed/app", app, sbom, MT_SPDX)
        bundle = json.dumps({"mediaType": MT_SIGSTORE_BUNDLE, "dsseEnvelope": {
            "payloadType": "application/vnd.in-toto+json",
            "payload": base64.b64encode(b'{"_type":"https://in-toto.io/Statement/v1"}').decode(),
            "signatures": []}}).encode()
        attached = sigstore_attach(reg, "signed/app", app, bundle, tmp)
        att, att_writer = attached if attached is not None else craft_attach(
            reg, "signed/app", app, bundle)
        add("app.attestation", "signed/app", att, "attestation", app, MT_SIGSTORE_BUNDLE, att_writer)
        add("app.referrers", "signed/app", reg.manifest_digest("signed/app", f"sha256-{app[7:]}"),
            "referrers", app, None, "oras-py + " + att_writer)
        vuln = push_artifact(reg, "signed/app", None, MT_VULN,
                             [(b'{"vulnerabilities":[]}', "application/json")], subject=app_desc)
        add("app.vuln", "signed/app", vuln, "artifact", app, MT_VULN,
            "oras-py (subject, by digest, in no index)")
        # cosign's .att tag: an image-config artifact whose layer is a DSSE envelope.
        envelope = json.dumps({"payloadType": "application/vnd.in-toto+json",
                               "payload": base64.b64encode(b"{}").decode(),
                               "signatures": [{"sig": "MEUCIQ"}]}).encode()
        att_config = json.dumps({"architecture": "", "os": "", "config": {},
                                 "rootfs": {"type": "layers",
                                            "diff_ids": [sha256_digest(envelope)]}},
                                separators=(",", ":")).encode()
        cosign_att = push_artifact(reg, "signed/app", f"sha256-{app[7:]}.att", None,
                                   [(envelope, MT_DSSE)],
                                   config=(att_config, "application/vnd.oci.image.config.v1+json"))
        add("app.att", "signed/app", cosign_att, "attestation", app, None,
            "oras-py (cosign .att shape, crafted)")

        # charts/demo: a Helm chart as helm push writes it.
        chart = push_artifact(reg, "charts/demo", "0.1.0", None,
                              [(helm_chart_tgz(), MT_HELM_CHART)],
                              config=(helm_chart_config(), MT_HELM_CONFIG))
        add("chart", "charts/demo", chart, "artifact", None, MT_HELM_CONFIG, "oras-py (helm shape)")
        _, chart_sig = cosign_sign(reg, "charts/demo", "0.1.0", tmp, signer)
        add("chart.sig", "charts/demo", chart_sig, "signature", chart, None, "skopeo 1.9.3")

        # artifacts/generic: artifactType, empty config, custom layer media types.
        generic = push_artifact(reg, "artifacts/generic", "v1", MT_EXAMPLE, [
            (b"hello from regfsck\n", "text/plain"),
            (pseudo_random_bytes("generic", 5000), "application/octet-stream"),
            (gzip.compress(b"not a tar at all\n" * 40, mtime=0), "application/vnd.regfsck.data.v1+gzip"),
        ])
        add("generic", "artifacts/generic", generic, "artifact", None, MT_EXAMPLE, "oras-py")

        # compress/zstd and compress/chunked: skopeo compresses Go-ended tars.
        _image(lay, f"zstd-{version}", go_tar=True)
        skopeo_copy(lay.ref(f"zstd-{version}"), f"docker://{reg.host}/compress/zstd:latest",
                    "--dest-compress", "--dest-compress-format", "zstd")
        zstd = add("zstd", "compress/zstd", reg.manifest_digest("compress/zstd", "latest"), "image",
                   writer="skopeo --dest-compress-format zstd")
        _image(lay, f"chunked-{version}", go_tar=True)
        skopeo_copy(lay.ref(f"chunked-{version}"), f"docker://{reg.host}/compress/chunked:latest",
                    "--dest-compress", "--dest-compress-format", "zstd:chunked")
        chunked = add("chunked", "compress/chunked",
                      reg.manifest_digest("compress/chunked", "latest"), "image",
                      writer="skopeo --dest-compress-format zstd:chunked")
        chunked_doc = json.loads(reg.get_manifest("compress/chunked", chunked)[0])
        chunked_layer = chunked_doc["layers"][0]
        if ZSTD_CHUNKED_TOC not in chunked_layer.get("annotations", {}):
            raise RealToolError(f"skopeo wrote no zstd:chunked TOC annotation: {chunked_doc}")
        zstd_layer = json.loads(reg.get_manifest("compress/zstd", zstd)[0])["layers"][0]["digest"]
        _, chunked_sig = cosign_sign(reg, "compress/chunked", "latest", tmp, signer)
        add("chunked.sig", "compress/chunked", chunked_sig, "signature", chunked, None, "skopeo 1.9.3")

        # deleted/app: signed, SBOM attached, then the image DELETEd through the API.
        _image(lay, f"gone-{version}")
        skopeo_copy(lay.ref(f"gone-{version}"), f"docker://{reg.host}/deleted/app:latest",
                    "--preserve-digests")
        gone = reg.manifest_digest("deleted/app", "latest")
        _, gone_sig = cosign_sign(reg, "deleted/app", "latest", tmp, signer)
        add("gone.sig", "deleted/app", gone_sig, "signature", gone, None, "skopeo 1.9.3")
        gone_sbom = push_artifact(reg, "deleted/app", None, MT_SPDX,
                                  [(b'{"spdxVersion":"SPDX-2.3","name":"gone"}', MT_SPDX)],
                                  subject=_descriptor_of(reg, "deleted/app", gone))
        add("gone.sbom", "deleted/app", gone_sbom, "sbom", gone, MT_SPDX, "oras-py")
        reg.delete_manifest("deleted/app", gone)
        if reg.manifest_exists("deleted/app", gone):
            raise RealToolError("deleted manifest is still served")

        tags = {repo: {t: reg.manifest_digest(repo, t) for t in reg.tags(repo)}
                for repo in reg.catalog()}
    for repo_tags in tags.values():
        for tag, digest in repo_tags.items():
            for obj in objects.values():
                if obj.digest == digest and tag not in obj.tags:
                    obj.tags.append(tag)
    return ArtifactInfo(version, binary, objects, gone, tags, att_writer, chunked_layer["digest"],
                        zstd_layer)


def stored_digests(root: Path | str) -> set[str]:
    """Every ``blobs/sha256/**/data`` digest in the tree at ``root``."""
    base = Path(root) / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return {f"sha256:{p.parent.name}" for p in base.glob("*/*/data")}


def serves_everything(reg: RealRegistry, info: ArtifactInfo, keep_deleted_referrers: bool = True,
                      pull_dir: Path | None = None) -> list[str]:
    """What a registry serving the tree fails to serve: every tag (pulled with skopeo, which
    checks digests, when ``pull_dir`` is given; else fetched and re-hashed) and every
    referrer by digest with all its blobs. Returns problems (empty when all is well)."""
    problems: list[str] = []
    if pull_dir is not None:
        pull_dir.mkdir(parents=True, exist_ok=True)
    for repo, repo_tags in info.tags.items():
        for tag, digest in repo_tags.items():
            if not reg.manifest_exists(repo, tag):
                problems.append(f"{repo}:{tag} not served")
                continue
            if reg.manifest_digest(repo, tag) != digest:
                problems.append(f"{repo}:{tag} moved")
            if pull_dir is not None:
                try:
                    skopeo_copy(f"docker://{reg.host}/{repo}:{tag}",
                                f"dir:{pull_dir / hashlib.sha256(f'{repo}:{tag}'.encode()).hexdigest()}",
                                "--preserve-digests")
                except RealToolError as exc:
                    problems.append(f"{repo}:{tag} cannot be pulled: {exc}")
    for name, obj in info.objects.items():
        if obj.repo == "deleted/app" and obj.kind == "sbom" and not keep_deleted_referrers:
            continue
        if not reg.manifest_exists(obj.repo, obj.digest):
            problems.append(f"{name} ({obj.repo}@{obj.digest}) not served")
            continue
        body = reg.get_manifest(obj.repo, obj.digest)[0]
        if sha256_digest(body) != obj.digest:
            problems.append(f"{name} served with other bytes")
        doc = json.loads(body)
        refs = [d["digest"] for d in doc.get("manifests", [])] or [
            doc["config"]["digest"], *(d["digest"] for d in doc.get("layers", []))]
        for ref in refs:
            if "manifests" in doc:
                ok = reg.manifest_exists(obj.repo, ref)
            else:
                ok = reg.blob_exists(obj.repo, ref) and sha256_digest(reg.get_blob(obj.repo, ref)) == ref
            if not ok:
                problems.append(f"{name}: {ref} not served")
    return problems
