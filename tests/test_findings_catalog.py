"""The findings catalogue holds every kind's whole policy, and every kind the code emits is in it.

Commands ask the catalogue (gc's refusal, --strict, repair's classes and advice, verify's
next steps, reachability's unknown parts) instead of keeping their own lists: a kind added
to the code but not to the catalogue, or added without its policy, fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from regfsck import layout
from regfsck.findings import (
    BLOB_KINDS,
    CATALOG,
    GcBlock,
    Kind,
    KindInfo,
    RepairClass,
    Severity,
    blocks_gc,
    make_finding,
    strict_severity,
)

PACKAGE = Path(__file__).resolve().parent.parent / "regfsck"
KIND_SHAPE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)+|symlink|unreadable")
# Calls whose first argument is a finding kind (the emitters and what carries a kind to them).
EMITTERS = {"make_finding", "_finding", "_anomaly", "Anomaly", "ManifestError"}
LOCAL_EMITTERS = {"deep.py": {"add"}}  # deep's `add(kind, message)` closure


def test_every_kind_has_its_complete_policy() -> None:
    assert set(CATALOG) == set(Kind)
    for kind, info in CATALOG.items():
        assert isinstance(info, KindInfo)
        assert isinstance(info.severity, Severity), kind
        assert isinstance(info.repair, RepairClass), kind
        assert isinstance(info.blocks_gc, GcBlock), kind
        assert info.strict is None or isinstance(info.strict, Severity), kind
        assert info.summary.strip() and "|" not in info.summary, kind
        assert info.advice.strip(), kind
        assert set(info.to_json()) == {"severity", "summary", "advice", "strict_severity",
                                       "repair", "blocks_gc", "blob", "gc_removes", "unknown"}


def _kind_literals(node: ast.AST) -> list[str]:
    """String constants in a kind position: a literal, a conditional, a tuple/set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _kind_literals(node.body) + _kind_literals(node.orelse)
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [s for elt in node.elts for s in _kind_literals(elt)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "frozenset":
        return [s for arg in node.args for s in _kind_literals(arg)]
    return []


def _is_kind_target(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "kind") or (
        isinstance(node, ast.Attribute) and node.attr == "kind")


def emitted_kinds() -> dict[str, list[str]]:
    """Every string the package passes, assigns or compares as a finding kind, with where."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            literals: list[str] = []
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else (
                    node.func.attr if isinstance(node.func, ast.Attribute) else "")
                if (name in EMITTERS or name in LOCAL_EMITTERS.get(path.name, ())) and node.args:
                    literals += _kind_literals(node.args[0])
                literals += [s for kw in node.keywords if kw.arg == "kind"
                             for s in _kind_literals(kw.value)]
            elif isinstance(node, ast.Assign) and any(_is_kind_target(t) for t in node.targets):
                literals += _kind_literals(node.value)
            elif isinstance(node, ast.Compare) and _is_kind_target(node.left) and isinstance(
                    node.ops[0], ast.Eq | ast.NotEq | ast.In | ast.NotIn):
                literals += [s for c in node.comparators for s in _kind_literals(c)]
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
            for literal in literals:
                if KIND_SHAPE.fullmatch(literal):
                    found.setdefault(literal, []).append(where)
    return found


# Strings in a kind position that name something else: manifest kinds, journal entry kinds,
# link sites, compressions, artifact kinds.
NOT_FINDING_KINDS = {"tag_current", "tag_index"}


def test_every_kind_the_code_emits_is_in_the_catalogue() -> None:
    found = emitted_kinds()
    # The scan must see the emitters, or it proves nothing.
    assert {"blob_digest_mismatch", "link_not_file", "manifest_unknown_type",
            "layer_diff_id_mismatch", "revision_not_manifest"} <= set(found)
    unknown = {kind: where for kind, where in found.items()
               if kind not in set(Kind) and kind not in NOT_FINDING_KINDS}
    assert not unknown, f"kinds missing from findings.CATALOG: {unknown}"
    assert set(Kind) <= set(found), f"catalogued but never emitted: {set(Kind) - set(found)}"


def test_make_finding_refuses_a_kind_the_catalogue_does_not_know() -> None:
    with pytest.raises(ValueError):
        make_finding("no_such_kind", "blobs", "x")
    finding = make_finding("symlink", "blobs/x", "x")
    assert finding.kind is Kind.SYMLINK
    assert finding.to_json()["kind"] == "symlink"


# What the commands decided before the policy moved into the catalogue (behaviour kept).
def test_policy_sets_are_those_the_commands_used() -> None:
    strict = {k for k, i in CATALOG.items() if i.strict is not None}
    assert strict == {"tag_no_current", "layer_link_dangling", "subject_missing"}
    assert {k for k, i in CATALOG.items() if i.blocks_gc is GcBlock.MANIFEST_LINKS} == {
        "link_invalid", "link_mismatch", "link_not_file", "link_bad_path", "missing_link"}
    assert {k for k, i in CATALOG.items() if i.gc_removes} == {
        "upload_stale", "upload_no_startedat", "layer_link_dangling", "empty_dir", "tmp_leftover"}
    assert {k for k, i in CATALOG.items() if i.unknown} == {"symlink", "unreadable"}
    assert len(BLOB_KINDS) == 20


DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(("path", "blocks", "blocks_untagged"), [
    (layout.revision_link("lib/app", DIGEST), True, True),
    (layout.tag_current_link("lib/app", "v1"), True, True),
    # A tag's history decides roots only with --delete-untagged (without it every
    # revision is one, and gc does not read the history at all).
    (layout.tag_index_link("lib/app", "v1", DIGEST), False, True),
    (layout.join(layout.tag_dir("lib/app", "v1"), "index", "sha512"), False, True),
    (layout.layer_link("lib/app", DIGEST), False, False),
])
def test_link_damage_blocks_gc_where_links_decide_marking(path: str, blocks: bool,
                                                          blocks_untagged: bool) -> None:
    finding = make_finding("link_mismatch", path, "x", repo="lib/app")
    assert blocks_gc(finding, delete_untagged=False) is blocks
    assert blocks_gc(finding, delete_untagged=True) is blocks_untagged


@pytest.mark.parametrize("path", [
    layout.tag_index_link("lib/app", "v1", DIGEST),
    layout.join(layout.tag_dir("lib/app", "v1"), "index"),
])
@pytest.mark.parametrize("kind", ["symlink", "unreadable"])
def test_what_a_tag_history_holds_blocks_only_delete_untagged(path: str, kind: str) -> None:
    """A full scan reads the history; gc without --delete-untagged does not, and whatever
    the full scan finds there must not block that gc either."""
    finding = make_finding(kind, f"docker/registry/v2/{path}", "x", repo="lib/app")
    assert not blocks_gc(finding, delete_untagged=False)
    assert blocks_gc(finding, delete_untagged=True)
    elsewhere = make_finding(kind, f"docker/registry/v2/{layout.tag_current_link('lib/app', 'v1')}",
                             "x", repo="lib/app")
    assert blocks_gc(elsewhere, delete_untagged=False)


def test_link_damage_of_another_repository_path_is_judged_by_the_finding_repository() -> None:
    """The decision reads the finding's repository, not any `/_manifests/` in the path text."""
    path = layout.layer_link("a/_manifests/b", DIGEST)  # an impossible name, for the point
    finding = make_finding("link_invalid", path, "x", repo="a/_manifests/b")
    assert not blocks_gc(finding, delete_untagged=False)


def test_tag_without_current_blocks_only_delete_untagged_and_is_an_error_under_strict() -> None:
    finding = make_finding("tag_no_current", layout.tag_dir("app", "v1"), "x", repo="app")
    assert finding.severity is Severity.WARNING
    assert not blocks_gc(finding, delete_untagged=False)
    assert blocks_gc(finding, delete_untagged=True)
    assert strict_severity(finding) is Severity.ERROR
    other = make_finding("upload_stale", "repositories/app/_uploads/x", "x", repo="app")
    assert strict_severity(other) is Severity.WARNING


def test_kinds_command_lists_the_catalogue_with_its_policy() -> None:
    import json

    from tests.support.cli import invoke

    done = invoke("kinds", "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)["kinds"]
    assert [k["kind"] for k in listed] == [str(kind) for kind in CATALOG]
    by_kind = {k["kind"]: k for k in listed}
    assert by_kind["tag_no_current"]["strict_severity"] == "error"
    assert by_kind["link_mismatch"]["blocks_gc"] == "manifest_links"
    text = invoke("kinds")
    assert text.returncode == 0
    rows = [line.split("\t") for line in text.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == [str(kind) for kind in CATALOG]
