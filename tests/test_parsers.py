"""Property tests for the digest, link-content, name and manifest parsers."""

from __future__ import annotations

import hashlib
import json
from typing import cast

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from regfsck import layout
from regfsck.digest import DigestError, parse_digest, parse_link_content
from regfsck.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Manifest,
    ManifestError,
    ManifestKind,
    pack_manifest,
    packed_references,
    packed_subject,
    parse_manifest,
    parse_packed,
    unpack_manifest,
)
from regfsck.names import is_upload_id, is_valid_repo_name, is_valid_tag, repo_name_problem
from regfsck.scanner import parse_startedat
from regfsck.storage import UnsafePathError, check_relative

HEX = "0123456789abcdef"
sha256_hex = st.text(alphabet=HEX, min_size=64, max_size=64)


@given(sha256_hex)
def test_valid_digest_roundtrips_through_link_bytes(hex_part: str) -> None:
    text = f"sha256:{hex_part}"
    assert str(parse_link_content(text.encode())) == text
    assert layout.blob_data(text) == f"blobs/sha256/{hex_part[:2]}/{hex_part}/data"


@given(sha256_hex, st.sampled_from([b"\n", b"\r\n", b" ", b"\t", b"\x00", b"x"]))
def test_any_suffix_or_prefix_is_rejected(hex_part: str, junk: bytes) -> None:
    raw = f"sha256:{hex_part}".encode()
    for bad in (raw + junk, junk + raw):
        with pytest.raises(DigestError):
            parse_link_content(bad)


@given(sha256_hex.filter(lambda h: any(c in "abcdef" for c in h)))
def test_upper_case_hex_is_rejected(hex_part: str) -> None:
    with pytest.raises(DigestError):
        parse_link_content(f"sha256:{hex_part.upper()}".encode())


@given(st.binary(max_size=200))
@example(b"")
@example(b"sha256:")
@example(b"md5:d41d8cd98f00b204e9800998ecf8427e")
def test_link_parser_never_crashes_and_accepts_only_canonical(raw: bytes) -> None:
    try:
        digest = parse_link_content(raw)
    except DigestError:
        return
    assert str(digest).encode() == raw


@given(st.text(max_size=300))
def test_digest_parser_accepts_only_what_it_prints(text: str) -> None:
    try:
        digest = parse_digest(text)
    except DigestError:
        return
    assert str(digest) == text


@pytest.mark.parametrize("name", ["a", "library/ubuntu", "a/b/c", "foo_bar/baz-qux",
                                  "localhost:5000/x", "Foo/bar", "a__b", "a--b"])
def test_valid_repo_names(name: str) -> None:
    assert is_valid_repo_name(name)


@pytest.mark.parametrize("name", ["", "Foo", "a/B", "a//b", "-a", "a_", "../x", "a/..",
                                  "/abs", "a\x00b", "a/_layers", "x" * 256, "a b"])
def test_invalid_repo_names(name: str) -> None:
    assert repo_name_problem(name) is not None


@given(st.text(max_size=80))
def test_repo_name_check_never_crashes(name: str) -> None:
    problem = repo_name_problem(name)
    if problem is None:
        assert ".." not in name.split("/") and "\x00" not in name


@given(st.text(max_size=140))
def test_tag_grammar(tag: str) -> None:
    valid = is_valid_tag(tag)
    if valid:
        assert 1 <= len(tag) <= 128
        assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in tag)
        assert tag[0] not in ".-"


def test_upload_ids() -> None:
    assert is_upload_id("0f9b0f6e-6f3c-4f5a-9d1b-2b7c9a0e1f23")
    assert not is_upload_id("0F9B0F6E-6f3c-4f5a-9d1b-2b7c9a0e1f23")
    assert not is_upload_id("not-a-uuid")


@given(st.text(max_size=60))
def test_relative_paths_never_escape(path: str) -> None:
    try:
        parts = check_relative(path)
    except UnsafePathError:
        return
    assert ".." not in parts and not path.startswith("/") and "\x00" not in path


def test_startedat_formats() -> None:
    first = parse_startedat(b"2024-03-05T10:11:12Z")
    assert first is not None and first.utcoffset() is not None and first.second == 12
    nanos = parse_startedat(b"2024-03-05T10:11:12.123456789Z")
    assert nanos is not None and nanos.microsecond == 123456
    assert parse_startedat(b"2024-03-05T10:11:12") is not None  # naive: taken as UTC
    assert parse_startedat(b"garbage") is None
    assert parse_startedat(b"\xff") is None


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_manifest_kinds() -> None:
    cfg, layer = _digest(b"c"), _digest(b"l")
    docker = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
              "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                         "digest": cfg, "size": 1},
              "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                          "digest": layer, "size": 1}]}
    m = parse_manifest(json.dumps(docker).encode())
    assert m.kind is ManifestKind.DOCKER_MANIFEST
    assert [d.digest for d in m.references()] == [cfg, layer]
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "x", "digest": cfg, "size": 3,
                                                "platform": {"os": "linux",
                                                             "architecture": "arm64"}}]}
    m = parse_manifest(json.dumps(index).encode())
    assert m.kind is ManifestKind.OCI_INDEX and m.children[0].platform == "linux/arm64"
    schema1 = {"schemaVersion": 1, "fsLayers": [{"blobSum": layer}, {"blobSum": layer}]}
    m = parse_manifest(json.dumps(schema1).encode())
    assert m.kind is ManifestKind.SCHEMA1 and len(m.layers) == 1
    foreign = dict(docker, layers=[{"mediaType":
                                    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                                    "digest": layer, "size": 1, "urls": ["http://x"]}])
    assert parse_manifest(json.dumps(foreign).encode()).layers[0].is_foreign


def test_packed_manifest_unpacks_to_the_parsed_one() -> None:
    """ManifestStore keeps manifests packed (memory): unpacked, each is equal to what was
    parsed; what the packed form cannot hold exactly stays the parsed object."""
    cfg, layer, child = _digest(b"c"), _digest(b"l"), _digest(b"m")
    sha512 = "sha512:" + hashlib.sha512(b"x").hexdigest()
    docker = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
              "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                         "digest": cfg, "size": 1},
              "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                          "digest": layer, "size": 2**62}]}
    referrer = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/vnd.example+json", "config": docker["config"],
                "layers": [], "subject": {"mediaType": "m", "digest": child, "size": 7}}
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "x", "digest": cfg, "size": 3,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": "x", "digest": child, "size": 0}]}
    schema1 = {"schemaVersion": 1, "fsLayers": [{"blobSum": layer}, {"blobSum": cfg}]}
    for doc in (docker, referrer, index, schema1, dict(index, manifests=[])):
        parsed = parse_manifest(json.dumps(doc).encode())
        packed = pack_manifest(parsed)
        assert isinstance(packed, tuple)
        assert unpack_manifest(packed) == parsed
    foreign = dict(docker, layers=[{"mediaType": "y", "digest": layer, "size": 1,
                                    "urls": ["http://x"]}])
    other_algorithm = dict(docker, layers=[{"mediaType": "y", "digest": sha512, "size": 1}])
    packed = pack_manifest(parse_manifest(json.dumps(other_algorithm).encode()))
    assert isinstance(packed, tuple)
    assert unpack_manifest(packed) == parse_manifest(json.dumps(other_algorithm).encode())
    huge = dict(docker, layers=[{"mediaType": "y", "digest": layer, "size": 2**63}])
    damaged = dict(docker, layers=[{"mediaType": "y", "digest": "nope", "size": 1}])
    for doc in (foreign, huge, damaged):
        parsed = parse_manifest(json.dumps(doc).encode())
        assert pack_manifest(parsed) is parsed


@given(json_values_for_packing := st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10)
    | st.sampled_from(["sha256:" + "a" * 64, "sha256:" + "b" * 64]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["schemaVersion", "mediaType", "config", "layers",
                                       "manifests", "digest", "size", "subject", "urls",
                                       "platform", "os", "architecture", "artifactType"]),
                      children, max_size=6),
    max_leaves=40))
@example({"schemaVersion": 2, "layers": [{"digest": "sha256:" + "a" * 64, "size": 5,
                                          "mediaType": "t"}]})
def test_packing_keeps_every_parsed_manifest(value: object) -> None:
    try:
        parsed = parse_manifest(json.dumps(value).encode())
    except ManifestError:
        return
    packed = pack_manifest(parsed)
    assert (unpack_manifest(packed) if isinstance(packed, tuple) else packed) == parsed
    assert isinstance(packed, tuple | Manifest)
    if isinstance(packed, tuple):  # what the mark reads of it without unpacking
        refs = parsed.references()
        assert packed_references(packed) == (
            tuple(d.digest for d in refs if d.role != "manifest"),
            tuple(d.digest for d in refs if d.role == "manifest"))
        assert packed_subject(packed) == (parsed.subject.digest if parsed.subject else None)


_CLEAN_TYPES = [DOCKER_MANIFEST, OCI_MANIFEST, "application/vnd.oci.image.layer.v1.tar+gzip"]
_clean_descriptors = st.fixed_dictionaries(
    {"digest": st.sampled_from(["sha256:" + "a" * 64, "sha256:" + "b" * 64]),
     "size": st.integers(min_value=0, max_value=2**40), "mediaType": st.sampled_from(_CLEAN_TYPES)},
    optional={"platform": st.sampled_from([{"os": "linux", "architecture": "amd64"},
                                           {"os": "linux", "architecture": "arm64",
                                            "variant": "v8"}]),
              "urls": st.just([]), "annotations": st.just({"a": "b"})})
_clean_documents = st.fixed_dictionaries(
    {"schemaVersion": st.just(2),
     "mediaType": st.sampled_from([DOCKER_MANIFEST, OCI_MANIFEST, OCI_INDEX, DOCKER_LIST]),
     "config": _clean_descriptors, "layers": st.lists(_clean_descriptors, max_size=3),
     "manifests": st.lists(_clean_descriptors, max_size=3)},
    optional={"subject": _clean_descriptors,
              "artifactType": st.sampled_from(["application/vnd.in-toto+json", None])})
_DELETE = object()
# One odd thing in an otherwise clean document: what the long way records as a problem,
# cannot pack, or packs after all; the direct way must agree on each.
_DESCRIPTOR_ODDITIES = [
    ("urls", ["http://x"]), ("urls", [3]), ("urls", "http://x"), ("size", -1),
    ("size", 2**63), ("size", 2**63 - 1), ("size", True), ("size", 1.0), ("size", _DELETE),
    ("digest", "sha512:" + "c" * 128), ("digest", "sha256:" + "A" * 64), ("digest", "nope"),
    ("digest", 5), ("digest", _DELETE), ("mediaType", 3), ("mediaType", "application/x-new"),
    ("mediaType", ""), ("mediaType", _DELETE), ("platform", "linux"), ("platform", {}),
    ("platform", {"os": "plan9", "architecture": "x"}), ("platform", None),
]
_DOCUMENT_ODDITIES = [
    ("artifactType", 5), ("artifactType", "application/x-new"), ("layers", 5),
    ("layers", None), ("layers", _DELETE), ("manifests", {}), ("manifests", None),
    ("manifests", _DELETE), ("subject", None), ("subject", 5), ("config", None),
    ("config", _DELETE), ("config", []), ("mediaType", _DELETE), ("mediaType", "text/plain"),
    ("schemaVersion", 1), ("schemaVersion", 3), ("manifests", [5]), ("layers", ["x"]),
]


@st.composite
def _manifest_documents(draw: st.DrawFn) -> dict[str, object]:
    doc: dict[str, object] = draw(_clean_documents)
    where = draw(st.sampled_from(["none", "document", "config", "layers", "manifests",
                                  "subject"]))
    key, value = draw(st.sampled_from(_DOCUMENT_ODDITIES if where == "document"
                                      else _DESCRIPTOR_ODDITIES))
    if where == "document":
        target: dict[str, object] = doc
    elif where in ("config", "subject") and isinstance(doc.get(where), dict):
        target = cast("dict[str, object]", doc[where])
    elif where in ("layers", "manifests") and doc[where]:
        items = cast("list[dict[str, object]]", doc[where])
        target = items[draw(st.integers(min_value=0, max_value=len(items) - 1))]
    else:
        return doc
    if value is _DELETE:
        target.pop(key, None)
    else:
        target[key] = value
    return doc


def _assert_packed_alike(doc: object) -> None:
    """`parse_packed` (the walk's direct way) gives exactly what `pack_manifest` gives for
    the parsed manifest (or the same refusal)."""
    raw = json.dumps(doc).encode()
    for new_strings in (False, True):
        try:
            expected: object = pack_manifest(parse_manifest(raw), new_strings=new_strings)
        except ManifestError as exc:
            expected = exc.kind
        try:
            got: object = parse_packed(raw, new_strings=new_strings)
        except ManifestError as exc:
            got = exc.kind
        assert got == expected, doc
        assert type(got) is type(expected)


@given(_manifest_documents())
@example({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
          "config": {"digest": "sha256:" + "a" * 64, "size": 1, "mediaType": OCI_MANIFEST},
          "layers": [{"digest": "sha256:" + "b" * 64, "size": 2**63 - 1,
                      "mediaType": OCI_MANIFEST, "urls": []}]})
def test_packing_straight_from_json_decides_as_parsing_then_packing(doc: object) -> None:
    _assert_packed_alike(doc)


@pytest.mark.parametrize("media_type", [DOCKER_MANIFEST, OCI_MANIFEST, OCI_INDEX, DOCKER_LIST])
def test_packing_straight_from_json_agrees_on_every_single_oddity(media_type: str) -> None:
    """Each oddity in each place of a clean document of each kind, one at a time."""
    def clean() -> dict[str, object]:
        def descriptor(letter: str) -> dict[str, object]:
            return {"digest": "sha256:" + letter * 64, "size": 5, "mediaType": OCI_MANIFEST,
                    "platform": {"os": "linux", "architecture": "amd64"}}
        return {"schemaVersion": 2, "mediaType": media_type, "config": descriptor("a"),
                "layers": [descriptor("b")], "manifests": [descriptor("c")],
                "subject": descriptor("d"), "artifactType": "application/vnd.in-toto+json"}

    _assert_packed_alike(clean())
    for key, value in _DOCUMENT_ODDITIES:
        doc = clean()
        if value is _DELETE:
            del doc[key]
        else:
            doc[key] = value
        _assert_packed_alike(doc)
    for place in ("config", "layers", "manifests", "subject"):
        for key, value in _DESCRIPTOR_ODDITIES:
            doc = clean()
            found = doc[place]
            target = cast("dict[str, object]", found[0] if isinstance(found, list) else found)
            if value is _DELETE:
                del target[key]
            else:
                target[key] = value
            _assert_packed_alike(doc)
        for whole in (None, 5, "x", [], {}):
            doc = clean()
            if isinstance(doc[place], list):
                doc[place] = [whole]
            else:
                doc[place] = whole
            _assert_packed_alike(doc)


@pytest.mark.parametrize(("raw", "kind"), [
    (b"not json", "manifest_invalid_json"),
    (b"[]", "manifest_invalid_json"),
    (b'{"schemaVersion": 3}', "manifest_unknown_type"),
    (b'{"schemaVersion": 2, "mediaType": "text/plain"}', "manifest_unknown_type"),
    (b"[" * 100_000 + b"]" * 100_000, "manifest_too_deep"),
    (b'{"a":' * 100 + b"1" + b"}" * 100, "manifest_too_deep"),
    (b" " * (4 * 1024 * 1024 + 1), "manifest_too_large"),
])
def test_bad_manifests(raw: bytes, kind: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw)
    assert info.value.kind == kind


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["schemaVersion", "mediaType", "config", "layers",
                                       "manifests", "digest", "size", "subject", "urls",
                                       "fsLayers", "blobSum", "platform"]), children, max_size=5),
    max_leaves=30)


@given(json_values)
def test_manifest_parser_never_crashes(value: object) -> None:
    try:
        manifest = parse_manifest(json.dumps(value).encode())
    except ManifestError:
        return
    for ref in manifest.references():
        parse_digest(ref.digest)
