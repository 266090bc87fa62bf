"""Parse manifest blobs of every media type the registry stores into references.

The registry records no media type on disk: like the registry, we dispatch on the JSON's
`schemaVersion` and `mediaType`. Parsing is pure (bytes in, data out) and bounded: blobs
larger than the registry's own 4 MiB manifest limit or nested absurdly deep are refused.
"""

from __future__ import annotations

import enum
import json
import re
import struct
import sys
from dataclasses import dataclass, field, replace
from typing import Any, cast

from regfsck.digest import DigestError, parse_digest

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_SHA256_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
MAX_JSON_DEPTH = 64

SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
FOREIGN_LAYER_TYPES = frozenset({
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})


class ManifestKind(enum.Enum):
    SCHEMA1 = "schema1"
    DOCKER_MANIFEST = "docker-manifest"
    DOCKER_LIST = "docker-manifest-list"
    OCI_MANIFEST = "oci-manifest"
    OCI_INDEX = "oci-index"

    @property
    def is_index(self) -> bool:
        return self in (ManifestKind.DOCKER_LIST, ManifestKind.OCI_INDEX)


class ManifestError(ValueError):
    """The blob is not a manifest the registry could serve; `kind` is the finding kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A reference from a manifest to another blob."""

    digest: str
    media_type: str
    size: int | None
    role: str  # "config", "layer", "manifest" (index child), "subject", "fslayer"
    urls: tuple[str, ...] = ()
    platform: str | None = None

    @property
    def is_foreign(self) -> bool:
        """Layers served from elsewhere: the registry never checks they exist."""
        return bool(self.urls) and (
            self.media_type in FOREIGN_LAYER_TYPES or self.media_type.startswith("application/vnd.oci")
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    kind: ManifestKind
    media_type: str
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    children: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None
    artifact_type: str | None = None
    problems: tuple[str, ...] = field(default=())  # non-fatal oddities (bad descriptors)

    def references(self) -> tuple[Descriptor, ...]:
        """What the registry's GC marks for this manifest (config, layers, children)."""
        refs: list[Descriptor] = []
        if self.config is not None:
            refs.append(self.config)
        refs.extend(self.layers)
        refs.extend(self.children)
        return tuple(refs)


def _depth_ok(obj: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return True


def _platform_string(platform: Any) -> str | None:
    if not isinstance(platform, dict):
        return None
    parts = [str(platform.get("os", "")), str(platform.get("architecture", ""))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def _descriptor(value: Any, role: str, problems: list[str]) -> Descriptor | None:
    if not isinstance(value, dict):
        problems.append(f"{role} descriptor is not an object")
        return None
    digest = value.get("digest")
    if not isinstance(digest, str):
        problems.append(f"{role} descriptor has no digest")
        return None
    if _SHA256_DIGEST.fullmatch(digest) is None:  # the common case, checked in one match
        try:
            parse_digest(digest)
        except DigestError as exc:
            problems.append(f"{role} descriptor has an invalid digest: {exc}")
            return None
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        problems.append(f"{role} descriptor {digest} has no valid size")
        size = None
    media_type = value.get("mediaType")
    urls = value.get("urls")
    return Descriptor(  # interned: millions of descriptors repeat a few strings (memory)
        digest=sys.intern(digest),
        media_type=sys.intern(media_type) if isinstance(media_type, str) else "",
        size=size,
        role=role,
        urls=tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list) else (),
        platform=_platform_string(value.get("platform")),
    )


def _descriptor_list(value: Any, role: str, problems: list[str]) -> tuple[Descriptor, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{role} list is not an array")
        return ()
    found = (_descriptor(item, role, problems) for item in value)
    return tuple(d for d in found if d is not None)


def _classify(doc: dict[str, Any]) -> tuple[ManifestKind, str]:
    version = doc.get("schemaVersion")
    media_type = doc.get("mediaType")
    if version == 1:
        return ManifestKind.SCHEMA1, SCHEMA1_SIGNED if "signatures" in doc else SCHEMA1
    if version != 2:
        raise ManifestError("manifest_unknown_type", f"unknown schemaVersion {version!r}")
    if media_type is None:
        if "manifests" in doc:
            return ManifestKind.OCI_INDEX, OCI_INDEX
        return ManifestKind.OCI_MANIFEST, OCI_MANIFEST
    by_type = {
        DOCKER_MANIFEST: ManifestKind.DOCKER_MANIFEST,
        DOCKER_LIST: ManifestKind.DOCKER_LIST,
        OCI_MANIFEST: ManifestKind.OCI_MANIFEST,
        OCI_INDEX: ManifestKind.OCI_INDEX,
    }
    if isinstance(media_type, str) and media_type in by_type:
        return by_type[media_type], media_type
    raise ManifestError("manifest_unknown_type", f"unknown manifest mediaType {media_type!r}"[:200])


def parse_manifest(raw: bytes) -> Manifest:
    """Parse a manifest blob; raises ManifestError (with a finding kind) when unusable."""
    doc = _load_document(raw)
    return _manifest_of(doc, *_classify(doc))


def _load_document(raw: bytes) -> dict[str, Any]:
    """The manifest's JSON object, refused (ManifestError) as the registry would refuse it."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest_too_large",
                            f"manifest is {len(raw)} bytes, over the registry's "
                            f"{MAX_MANIFEST_BYTES}-byte limit")
    try:
        doc = json.loads(raw)
    except RecursionError as exc:
        raise ManifestError("manifest_too_deep", "JSON nested too deep to parse") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError("manifest_invalid_json", f"not valid JSON: {exc}"[:200]) from exc
    if not isinstance(doc, dict):
        raise ManifestError("manifest_invalid_json", "JSON is not an object")
    # Depth is at most the number of opening brackets: most manifests skip the walk.
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and not _depth_ok(doc, MAX_JSON_DEPTH):
        raise ManifestError("manifest_too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH}")
    return doc


def _manifest_of(doc: dict[str, Any], kind: ManifestKind, media_type: str) -> Manifest:
    problems: list[str] = []
    if kind is ManifestKind.SCHEMA1:
        layers = doc.get("fsLayers")
        descs: list[Descriptor] = []
        if not isinstance(layers, list):
            problems.append("fsLayers is not an array")
            layers = []
        for item in layers:
            blob_sum = item.get("blobSum") if isinstance(item, dict) else None
            try:
                parse_digest(blob_sum if isinstance(blob_sum, str) else "")
            except DigestError:
                problems.append("fsLayers entry without a valid blobSum")
                continue
            assert isinstance(blob_sum, str)
            if all(d.digest != blob_sum for d in descs):
                descs.append(Descriptor(blob_sum, "", None, "fslayer"))
        return Manifest(kind, media_type, layers=tuple(descs), problems=tuple(problems))
    subject = _descriptor(doc["subject"], "subject", problems) if "subject" in doc else None
    artifact_type = doc.get("artifactType") if isinstance(doc.get("artifactType"), str) else None
    if kind.is_index:
        children = _descriptor_list(doc.get("manifests"), "manifest", problems)
        if not isinstance(doc.get("manifests"), list):
            problems.append("index has no manifests array")
        return Manifest(kind, media_type, children=children, subject=subject,
                        artifact_type=artifact_type, problems=tuple(problems))
    config = _descriptor(doc.get("config"), "config", problems)
    layers_t = _descriptor_list(doc.get("layers"), "layer", problems)
    return Manifest(kind, media_type, config=config, layers=layers_t, subject=subject,
                    artifact_type=artifact_type, problems=tuple(problems))


def share_descriptors(manifest: Manifest, shared: dict[Descriptor, Descriptor]) -> Manifest:
    """`manifest` with each descriptor equal to one in `shared` replaced by that one (and
    the others added): images built on the same base share most of their layers' and
    children's descriptors, so a store of many manifests keeps one object each (memory)."""
    def one(desc: Descriptor | None) -> Descriptor | None:
        return None if desc is None else shared.setdefault(desc, desc)

    def many(descs: tuple[Descriptor, ...]) -> tuple[Descriptor, ...]:
        return tuple(shared.setdefault(d, d) for d in descs)
    return replace(manifest, config=one(manifest.config), layers=many(manifest.layers),
                   children=many(manifest.children), subject=one(manifest.subject))


# --------------------------------------------------------------------------- packed form
#
# A tree of a million files holds some hundred thousand manifests, and every command that
# judges the tree keeps each one parsed (the mark walks them all, more than once): as
# objects, a manifest and its descriptors cost ~600 bytes (a `Manifest`, a tuple, a
# `Descriptor` and a size `int` per reference). Packed, a manifest is one tuple: a `bytes`
# of numbers first (its kind, and per reference its role, size, and media type and
# platform as numbers in a table of the few distinct strings), then the digests it
# references, the interned strings the inventory holds anyway: ~21 bytes a reference.
# `unpack_manifest` makes the same objects again (`ManifestStore` keeps the recently
# unpacked ones). A manifest the numbers cannot hold exactly (problems, `urls`, a size
# beyond 63 bits) stays an object.

PackedManifest = tuple[bytes | str, ...]

_KINDS = tuple(ManifestKind)
_KIND_IDS = {kind: i for i, kind in enumerate(_KINDS)}
_ROLES = ("config", "layer", "manifest", "subject", "fslayer")
_ROLE_IDS = {role: i for i, role in enumerate(_ROLES)}
_HEAD = struct.Struct("<BHHBHH")  # kind, media type, artifact type, flags, layers, children
_DESC = struct.Struct("<BHHq")  # role, media type, platform, size (-1: None)
_HAS_CONFIG = 1
_HAS_SUBJECT = 2
# The strings of packed manifests (media types, platforms): few distinct ones, numbered
# once per process; 0 stands for None.
#
# The table starts with the strings real registries hold most (the same numbers in every
# process): a scan's worker processes, forked from the one that keeps the manifests, pack
# what they read with the numbers they inherited (`pack_manifest(new_strings=False)`) and
# hand over the packed form, so the parent parses no JSON (issue 15: it was a third of its
# work during the walk). A manifest with a string the table lacks goes over as bytes.
_WELL_KNOWN_STRINGS: tuple[str, ...] = (
    *(f"application/vnd.docker.{name}" for name in (
        "distribution.manifest.v2+json", "distribution.manifest.list.v2+json",
        "container.image.v1+json", "image.rootfs.diff.tar.gzip", "image.rootfs.diff.tar",
        "image.rootfs.diff.tar.zstd", "image.rootfs.foreign.diff.tar.gzip",
        "image.rootfs.foreign.diff.tar", "plugin.v1+json")),
    *(f"application/vnd.oci.{name}" for name in (
        "image.manifest.v1+json", "image.index.v1+json", "image.config.v1+json",
        "image.layer.v1.tar+gzip", "image.layer.v1.tar", "image.layer.v1.tar+zstd",
        "image.layer.nondistributable.v1.tar+gzip", "image.layer.nondistributable.v1.tar",
        "image.layer.nondistributable.v1.tar+zstd", "empty.v1+json",
        "artifact.manifest.v1+json")),
    "application/vnd.dev.cosign.simplesigning.v1+json", "application/vnd.dsse.envelope.v1+json",
    "application/vnd.dev.sigstore.bundle.v0.3+json", "application/vnd.in-toto+json",
    "application/vnd.cncf.notary.signature", "application/spdx+json",
    "application/vnd.cyclonedx+json", "application/vnd.syft+json",
    "application/vnd.cncf.helm.config.v1+json",
    "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
    *(f"linux/{arch}" for arch in (
        "amd64", "arm64", "arm64/v8", "arm/v7", "arm/v6", "arm/v5", "386", "ppc64le",
        "s390x", "riscv64", "mips64le", "loong64")),
    "windows/amd64", "windows/arm64", "unknown/unknown", "",
)
_STRINGS: list[str | None] = [None, *_WELL_KNOWN_STRINGS]
_STRING_IDS: dict[str | None, int] = {value: i for i, value in enumerate(_STRINGS)}
_MAX_STRINGS = 0xFFFF


def _string_id(value: str | None, new: bool = True) -> int | None:
    """The number of `value` in the table; a new one (`new`) or None (table full, or not
    `new`): then the manifest stays unpacked."""
    found = _STRING_IDS.get(value)
    if found is None and new and len(_STRINGS) <= _MAX_STRINGS:
        found = _STRING_IDS[value] = len(_STRINGS)
        _STRINGS.append(value)
    return found


def pack_manifest(manifest: Manifest, *, new_strings: bool = True) -> PackedManifest | Manifest:
    """`manifest` packed (see above), or itself when the packed form cannot hold it.

    `new_strings=False`: only with the strings the table already numbers (a forked worker,
    whose new numbers its parent would not know): else the manifest itself."""
    if manifest.problems or len(manifest.layers) > 0xFFFF or len(manifest.children) > 0xFFFF:
        return manifest
    media_type = _string_id(manifest.media_type, new_strings)
    artifact_type = _string_id(manifest.artifact_type, new_strings)
    if media_type is None or artifact_type is None:
        return manifest
    descs: list[Descriptor] = []
    flags = 0
    if manifest.config is not None:
        descs.append(manifest.config)
        flags |= _HAS_CONFIG
    descs.extend(manifest.layers)
    descs.extend(manifest.children)
    if manifest.subject is not None:
        descs.append(manifest.subject)
        flags |= _HAS_SUBJECT
    numbers = [_HEAD.pack(_KIND_IDS[manifest.kind], media_type, artifact_type, flags,
                          len(manifest.layers), len(manifest.children))]
    for desc in descs:
        size = -1 if desc.size is None else desc.size
        desc_type = _string_id(desc.media_type, new_strings)
        platform = _string_id(desc.platform, new_strings)
        if desc.urls or size >= 1 << 63 or desc_type is None or platform is None:
            return manifest
        numbers.append(_DESC.pack(_ROLE_IDS[desc.role], desc_type, platform, size))
    return (b"".join(numbers), *(sys.intern(desc.digest) for desc in descs))


def parse_packed(raw: bytes, *, new_strings: bool = True) -> PackedManifest | Manifest:
    """`pack_manifest(parse_manifest(raw))`, the same result, for much less work in the
    common case: a clean manifest is packed straight from its JSON, with no `Descriptor`
    made and dropped for each reference. The walk's workers do this for every manifest
    of the tree, and building the objects was half their time for Python (issue 15).

    A document the direct way does not take on (anything a `Descriptor` would record a
    problem for, a digest other than sha256, `urls`, a string the table lacks) goes the
    long way: the direct way only ever declines, it never decides differently
    (tests/test_parsers.py checks the two agree on arbitrary documents)."""
    doc = _load_document(raw)
    kind, media_type = _classify(doc)
    if kind is not ManifestKind.SCHEMA1:
        packed = _pack_document(doc, kind, media_type, new_strings)
        if packed is not None:
            return packed
    return pack_manifest(_manifest_of(doc, kind, media_type), new_strings=new_strings)


def _pack_document(doc: dict[str, Any], kind: ManifestKind, media_type: str,
                   new_strings: bool) -> PackedManifest | None:
    """The packed form of a clean schema 2 manifest or index, from its JSON; None: not
    clean (the caller takes the long way)."""
    string_id = _string_id
    head_type = string_id(media_type, new_strings)
    artifact_type = doc.get("artifactType")
    artifact_id = string_id(artifact_type if type(artifact_type) is str else None, new_strings)
    if head_type is None or artifact_id is None:
        return None
    flags = 0
    descs: list[tuple[int, Any]] = []  # (role id, the descriptor's JSON object)
    n_layers = n_children = 0
    if kind.is_index:
        children = doc.get("manifests")
        if type(children) is not list:
            return None
        role = _ROLE_IDS["manifest"]
        descs.extend((role, item) for item in children)
        n_children = len(children)
    else:
        flags |= _HAS_CONFIG
        descs.append((_ROLE_IDS["config"], doc.get("config")))
        layers = doc.get("layers")
        if layers is not None:
            if type(layers) is not list:
                return None
            role = _ROLE_IDS["layer"]
            descs.extend((role, item) for item in layers)
            n_layers = len(layers)
    if "subject" in doc:
        flags |= _HAS_SUBJECT
        descs.append((_ROLE_IDS["subject"], doc["subject"]))
    if n_layers > 0xFFFF or n_children > 0xFFFF:
        return None
    numbers = [_HEAD.pack(_KIND_IDS[kind], head_type, artifact_id, flags, n_layers, n_children)]
    digests: list[str] = []
    match = _SHA256_DIGEST.fullmatch
    pack_desc = _DESC.pack
    intern = sys.intern
    for role, item in descs:
        if type(item) is not dict:
            return None
        digest = item.get("digest")
        size = item.get("size")
        desc_type = item.get("mediaType")
        urls = item.get("urls")
        if (type(digest) is not str or match(digest) is None or type(size) is not int
                or not 0 <= size < 1 << 63 or type(desc_type) is not str
                or (urls is not None and urls != [])):
            return None
        type_id = string_id(desc_type, new_strings)
        platform = item.get("platform")
        platform_id = string_id(None if platform is None else _platform_string(platform),
                                new_strings)
        if type_id is None or platform_id is None:
            return None
        numbers.append(pack_desc(role, type_id, platform_id, size))
        digests.append(intern(digest))
    return (b"".join(numbers), *digests)


def packed_references(packed: PackedManifest) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The digests `Manifest.references()` names, as (config and layers, index children),
    read from the packed form without unpacking it: what a walk of the graph asks of every
    manifest (gc's mark walks them all)."""
    numbers = packed[0]
    assert isinstance(numbers, bytes)
    _, _, _, flags, n_layers, n_children = _HEAD.unpack_from(numbers)
    blobs_end = 1 + (1 if flags & _HAS_CONFIG else 0) + n_layers
    return (cast("tuple[str, ...]", packed[1:blobs_end]),
            cast("tuple[str, ...]", packed[blobs_end:blobs_end + n_children]))


def packed_subject(packed: PackedManifest) -> str | None:
    """The digest of the manifest's `subject` (None: it has none), from the packed form."""
    numbers = packed[0]
    assert isinstance(numbers, bytes)
    return cast(str, packed[-1]) if _HEAD.unpack_from(numbers)[3] & _HAS_SUBJECT else None


def unpack_manifest(packed: PackedManifest) -> Manifest:
    """The `Manifest` `pack_manifest` packed (equal to it)."""
    numbers = packed[0]
    assert isinstance(numbers, bytes)
    kind, media_type, artifact_type, flags, n_layers, n_children = _HEAD.unpack_from(numbers)
    strings = _STRINGS
    descs = [Descriptor(cast(str, digest), strings[desc_type] or "",
                        None if size < 0 else size, _ROLES[role], (), strings[platform])
             for digest, (role, desc_type, platform, size)
             in zip(packed[1:], _DESC.iter_unpack(memoryview(numbers)[_HEAD.size:]),
                    strict=True)]
    start = 1 if flags & _HAS_CONFIG else 0
    children_at = start + n_layers
    after = children_at + n_children
    return Manifest(_KINDS[kind], strings[media_type] or "",
                    config=descs[0] if start else None,
                    layers=tuple(descs[start:children_at]),
                    children=tuple(descs[children_at:after]),
                    subject=descs[after] if flags & _HAS_SUBJECT else None,
                    artifact_type=strings[artifact_type])
