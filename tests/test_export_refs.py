"""REF parsing: `repo`, `repo:tag`, `repo@digest`, with ports in the domain part."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regfsck.names import is_valid_repo_name
from regfsck.refs import ImageRef, RefError, parse_ref, split_ref

component = st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+)?", fullmatch=True)
domain = st.one_of(st.just(""), st.from_regex(r"[a-z0-9]+(?:\.[a-z]+)?(?::[0-9]{1,5})?", fullmatch=True)
                   .map(lambda d: d + "/"))
repos = st.builds(lambda d, parts: d + "/".join(parts), domain,
                  st.lists(component, min_size=1, max_size=4)).filter(is_valid_repo_name)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
digests = st.from_regex(r"[a-f0-9]{64}", fullmatch=True).map(lambda h: "sha256:" + h)


@pytest.mark.slow  # over a second (--durations)
@given(repos, st.one_of(st.none(), tags), st.one_of(st.none(), digests))
def test_round_trip(repo: str, tag: str | None, digest: str | None) -> None:
    ref = ImageRef(repo, None if digest else tag, digest)
    assert parse_ref(str(ref), bare="repository") == ref


@given(st.text(max_size=40))
def test_parse_never_crashes(text: str) -> None:
    try:
        ref = parse_ref(text, bare="repository")
    except RefError:
        return
    assert is_valid_repo_name(ref.repository)


@pytest.mark.parametrize(("text", "expected"), [
    ("localhost:5000/a/b", ImageRef("localhost:5000/a/b")),
    ("localhost:5000/a/b:v1", ImageRef("localhost:5000/a/b", "v1")),
    ("a/b@sha256:" + "a" * 64, ImageRef("a/b", None, "sha256:" + "a" * 64)),
    ("library/base:1.0", ImageRef("library/base", "1.0")),
])
def test_examples(text: str, expected: ImageRef) -> None:
    assert parse_ref(text, bare="repository") == expected
    assert split_ref(text) == (expected.repo, expected.tag, expected.digest)


@pytest.mark.parametrize(("text", "message"), [
    ("a/b:t@sha256:" + "a" * 64, "not both"),
    ("a/b@sha256:ABC", "invalid sha256 hex"),
    ("a/b:-bad", "invalid tag"),
    ("../x", "escape"),
    ("", "empty"),
])
def test_rejects(text: str, message: str) -> None:
    with pytest.raises(RefError, match=message):
        parse_ref(text, bare="repository")
