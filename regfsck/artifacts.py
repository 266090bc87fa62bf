"""What a manifest *is* to an operator, and what it attaches to.

A registry in 2026 holds signatures, attestations, SBOMs and other OCI artifacts beside
images; scan, inspect and gc must call each by its name and know which image it belongs to.
Two conventions say what a manifest attaches to:

* the OCI 1.1 `subject` field (referrers: oras, @sigstore/oci, notation);
* cosign's tags, on registries without the referrers API: `sha256-<hex>.sig` (signature),
  `.att` (attestation), `.sbom` (SBOM) name the manifest `sha256:<hex>` they are about;
  a bare `sha256-<hex>` tag is the referrers fallback index (an index of its referrers).

Pure judgement: a parsed manifest and the tags pointing at it in, a classification out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from regfsck.manifest import DOCKER_CONFIG, OCI_CONFIG, Manifest, ManifestKind

IMAGE = "image"
INDEX = "index"
SIGNATURE = "signature"
ATTESTATION = "attestation"
SBOM = "sbom"
ARTIFACT = "artifact"
REFERRERS = "referrers"  # a `sha256-<hex>` referrers fallback index
KINDS = (IMAGE, INDEX, SIGNATURE, ATTESTATION, SBOM, ARTIFACT, REFERRERS)
ATTACHED_KINDS = frozenset({SIGNATURE, ATTESTATION, SBOM, ARTIFACT, REFERRERS})

EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
IMAGE_CONFIGS = frozenset({DOCKER_CONFIG, OCI_CONFIG, ""})

# cosign's tag convention: the suffix names the kind, the rest the subject.
COSIGN_TAG = re.compile(r"sha256-([a-f0-9]{64})(?:\.(sig|att|sbom))?")
_TAG_SUFFIX_KIND = {"sig": SIGNATURE, "att": ATTESTATION, "sbom": SBOM, None: REFERRERS}

_SIGNATURE_TYPES = ("application/vnd.dev.cosign.simplesigning.v1+json",
                    "application/vnd.dev.cosign.artifact.sig.v1+json",
                    "application/vnd.cncf.notary.signature",
                    "application/pgp-signature")
_ATTESTATION_TYPES = ("application/vnd.dsse.envelope.v1+json",
                      "application/vnd.dev.sigstore.bundle",
                      "application/vnd.in-toto",
                      "application/vnd.dev.cosign.attestation")
_SBOM_TYPES = ("application/spdx", "text/spdx", "application/vnd.cyclonedx",
               "application/vnd.syft+json", "application/vnd.dev.cosign.artifact.sbom")


@dataclass(frozen=True, slots=True)
class Classification:
    """What a manifest is, its artifactType, and the manifest it is about (if any)."""

    kind: str
    artifact_type: str | None = None
    subject: str | None = None
    subject_via: str | None = None  # "subject" (the field) or "tag" (cosign's convention)

    def to_json(self) -> dict[str, str | None]:
        return {"kind": self.kind, "artifact_type": self.artifact_type, "subject": self.subject,
                "subject_via": self.subject_via}


def tag_subject(tag: str) -> tuple[str, str] | None:
    """`(subject digest, kind)` named by a cosign-convention tag, else None."""
    match = COSIGN_TAG.fullmatch(tag)
    if match is None:
        return None
    return f"sha256:{match[1]}", _TAG_SUFFIX_KIND[match[2]]


def _typed(value: str | None, prefixes: tuple[str, ...]) -> bool:
    return value is not None and value.startswith(prefixes)


def artifact_type_of(manifest: Manifest) -> str | None:
    """The OCI 1.1 artifact type: `artifactType`, else a config media type that is not an
    image config or the empty config (how Helm charts and older ORAS artifacts say it)."""
    if manifest.artifact_type:
        return manifest.artifact_type
    config = manifest.config
    if config is not None and config.media_type not in IMAGE_CONFIGS | {EMPTY_CONFIG}:
        return config.media_type
    return None


def _content_kind(manifest: Manifest, artifact_type: str | None) -> str | None:
    """Signature / attestation / SBOM by artifactType or layer media types, else None."""
    types = [artifact_type, *(layer.media_type for layer in manifest.layers)]
    for kind, prefixes in ((SIGNATURE, _SIGNATURE_TYPES), (ATTESTATION, _ATTESTATION_TYPES),
                           (SBOM, _SBOM_TYPES)):
        if any(_typed(t, prefixes) for t in types):
            return kind
    return None


def classify(manifest: Manifest, tags: Iterable[str] = ()) -> Classification:
    """Classify a parsed manifest; `tags` are the tags of its repository pointing at it."""
    from_tags = [found for found in map(tag_subject, tags) if found is not None]
    if manifest.subject is not None:
        subject: str | None = manifest.subject.digest
        via: str | None = "subject"
    elif from_tags:
        subject, via = from_tags[0][0], "tag"
    else:
        subject = via = None
    artifact_type = artifact_type_of(manifest)
    if manifest.kind.is_index:
        is_referrers = any(kind == REFERRERS for _, kind in from_tags)
        return Classification(REFERRERS if is_referrers else INDEX, artifact_type, subject, via)
    if manifest.kind is ManifestKind.SCHEMA1:
        return Classification(IMAGE)
    kind = _content_kind(manifest, artifact_type)
    if kind is None and from_tags and from_tags[0][1] != REFERRERS:
        kind = from_tags[0][1]
    if kind is None:
        config_type = manifest.config.media_type if manifest.config is not None else ""
        is_image = (config_type in IMAGE_CONFIGS and artifact_type is None
                    and manifest.subject is None)
        kind = IMAGE if is_image else ARTIFACT
    return Classification(kind, artifact_type, subject, via)


@dataclass(frozen=True, slots=True)
class Referrer:
    """A manifest of the same repository attached to a subject, and how it says so."""

    digest: str
    tags: tuple[str, ...]
    via: str  # "subject" or "tag"


def referrers_of(subject: str, revisions: Iterable[str], tag_targets: dict[str, str],
                 manifest_of: Callable[[str], Manifest | None]) -> list[Referrer]:
    """The referrers of `subject` among a repository's `revisions`: by their `subject` field,
    and by cosign's tags (`sha256-<hex>.sig/.att/.sbom` and the `sha256-<hex>` referrers
    index) pointing at a revision. Sorted by digest, each once."""
    revs = set(revisions)
    tags_of: dict[str, list[str]] = {}
    for tag, target in sorted(tag_targets.items()):
        tags_of.setdefault(target, []).append(tag)
    found: dict[str, str] = {}
    for digest in sorted(revs):
        manifest = manifest_of(digest)
        if manifest is not None and manifest.subject is not None \
                and manifest.subject.digest == subject:
            found[digest] = "subject"
    for tag, target in sorted(tag_targets.items()):
        named = tag_subject(tag)
        if named is not None and named[0] == subject and target in revs:
            found.setdefault(target, "tag")
    return [Referrer(d, tuple(tags_of.get(d, ())), via) for d, via in sorted(found.items())]
