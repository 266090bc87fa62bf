"""layout.py both ways: each path builder's output parses back to what built it, and
regfsck's own directories beside docker/ are named there only."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regfsck import layout
from tests.support import REPO_ROOT

COMPONENT = st.from_regex(r"[a-z0-9]{1,6}(?:[._-][a-z0-9]{1,4}){0,2}", fullmatch=True)
REPO = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)
TAG = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
DIGEST = st.one_of(st.from_regex(r"sha256:[a-f0-9]{64}", fullmatch=True),
                   st.from_regex(r"sha512:[a-f0-9]{128}", fullmatch=True))


@settings(max_examples=40)
@given(REPO, TAG, DIGEST)
def test_every_built_path_parses_back(repo: str, tag: str, digest: str) -> None:
    assert layout.parse_path(layout.blob_data(digest)) == layout.LayoutPath("blob", digest=digest)
    assert layout.parse_path(layout.layer_link(repo, digest)) == layout.LayoutPath("layer", repo, digest)
    assert layout.parse_path(layout.revision_link(repo, digest)) == \
        layout.LayoutPath("revision", repo, digest)
    assert layout.parse_path(layout.tag_current_link(repo, tag)) == \
        layout.LayoutPath("tag_current", repo, tag=tag)
    assert layout.parse_path(layout.tag_index_link(repo, tag, digest)) == \
        layout.LayoutPath("tag_index", repo, digest, tag)
    assert layout.blob_dir_digest(layout.blob_dir(digest)) == digest
    assert layout.link_dir_owner(layout.revision_dir(repo, digest)) == (repo, digest)
    layer_dir = layout.layer_link(repo, digest).rsplit("/", 1)[0]
    assert layout.link_dir_owner(layer_dir) == (repo, digest)


@pytest.mark.parametrize("rel", [
    "blobs/sha256/aa/aaaa", "blobs/sha256/aa/aaaa/data/x", "repositories/r/_uploads/u/data",
    "repositories/r/_manifests/tags/t/current", "repositories/r/_layers/sha256/link",
    "repositories/r/_manifests/revisions/sha256/aa/bb/link", "other/link",
])
def test_what_is_not_a_blob_or_link_is_other(rel: str) -> None:
    assert layout.parse_path(rel).kind == "other"


def test_own_directories_are_spelled_in_layout_only() -> None:
    spelled = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "regfsck").rglob("*.py")
               if re.search(r"""["']regfsck-(state|quarantine)["'/]""", p.read_text())}
    assert spelled == {"regfsck/layout.py"}
