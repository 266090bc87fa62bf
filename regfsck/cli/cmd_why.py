"""`regfsck why`: who uses a blob, whether gc keeps it, what deleting a tag would free."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    fail,
    human_bytes,
    open_root,
    plural,
    print_json,
    root_then,
    say,
    split_root,
    styled,
    table,
    with_requests,
)
from regfsck.errors import ExitCode

if TYPE_CHECKING:
    from regfsck.why import ReferencePath, WhyReport

# Manifests of a chain shown in a row: a chain of thousands of nested indexes is cut, so
# the table stays linear in their number (each level has its own row).
CHAIN_SHOWN = 4


@command()
def why(
    args: list[str] = root_then("DIGEST", "the blob digest: sha256:<64 hex>, or a unique "
                                "prefix of it (6d7e7209 or sha256:6d7e7209)."),
    config: Path | None = CONFIG_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    """Explain why a blob exists: who reaches it, gc's verdict, bytes each tag holds."""
    root, digest = split_root(args, config, "DIGEST")
    from regfsck.digest import expand_digest, is_digest, is_digest_prefix

    if not is_digest(digest) and not is_digest_prefix(digest):
        fail(f"not a digest or a digest prefix (4+ lowercase hex digits): {digest[:80]!r}",
             ExitCode.USAGE)
    registry = open_root(root, config, object_storage=True)
    from regfsck.graph import ManifestStore
    from regfsck.scanner import Scanner
    from regfsck.storage import open_storage
    from regfsck.why import ReferenceGraph, explain_blob

    storage = open_storage(registry)
    inventory = Scanner(storage, registry).scan()
    store = ManifestStore(storage, inventory)
    graph = ReferenceGraph(inventory, store)
    if not is_digest(digest):
        known = set(inventory.blobs) | set(graph.parents) | set(graph.holders) | {
            b.digest for b in inventory.misplaced_blobs}
        digest = expand_digest(digest, known, "blob")
    report = explain_blob(inventory, store, digest, graph)
    if not report.exists and not report.referenced and not report.layer_links \
            and report.misplaced_at is None:
        fail(f"{digest}: no such blob, and nothing in the tree refers to it", ExitCode.FINDINGS)
    if json_output:
        print_json(with_requests(registry, report.to_json()))
    else:
        render_why(report)
    raise typer.Exit(ExitCode.OK if report.exists and not report.damage else ExitCode.FINDINGS)


def render_why(report: WhyReport) -> None:
    if report.exists:
        state = [f"{human_bytes(report.size or 0)} at {report.path}"]
        if report.damage == "truncated":
            state.append(styled(f"  TRUNCATED: {report.size} bytes on disk, its manifests say "
                                f"{report.expected_size} (see `regfsck repair`)", "bold red"))
        elif report.damage == "empty":
            state.append(styled("  EMPTY: zero bytes on disk, truncated (see `regfsck repair`)",
                                "bold red"))
        elif report.damage:
            state.append(styled(f"  {report.size} bytes on disk, its manifests say "
                                f"{report.expected_size}: {report.damage}", "red"))
    elif report.misplaced_at:
        state = [styled("misplaced", "red"), f" at {report.misplaced_at} (see `regfsck repair`)"]
    else:
        state = [styled("MISSING", "bold red"), " (referenced but not on disk)"]
    say(styled(report.digest, "bold"), "  ", *state)
    say(f"used as: {', '.join(report.roles) or 'unreferenced'}")
    if report.paths:
        by_manifest = {path.manifest: path for path in report.paths}
        table("Reached from", ("repository", "revision", "tags", "path to the blob"), [
            (path.repo, path.manifest, ", ".join(path.tags) or styled("untagged", "yellow"),
             _chain_text(path, by_manifest))
            for path in report.paths])
    elif report.direct_parents:
        say("referenced only by manifests that no repository holds a revision of: "
            + ", ".join(p["manifest"] for p in report.direct_parents))
    else:
        say(styled("no manifest of any repository references it", "yellow"))
    good = [link.repo for link in report.layer_links if link.content]
    if good:
        say(f"_layers links in {plural(len(good), 'repository', 'repositories')}: {', '.join(good)}")
    for link in report.layer_links:
        if not link.content:
            say(styled("invalid _layers link ", "red"), f"{link.path}: {link.error or 'invalid'}")
    table("Garbage collection", ("mode", "verdict", "why"), [
        (v.mode, styled("keep", "green") if v.keep else styled("delete", "red"), v.reason)
        for v in report.gc])
    if report.freed:
        table("What deleting a reference would free", ("delete", "then", "frees", "note"), [
            (item.action, item.gc_mode, f"{human_bytes(item.bytes)} ({plural(item.blobs, 'blob')})",
             item.note) for item in report.freed])
        say(styled("rm of a tag alone frees nothing under the default gc: the revision stays "
                   "and keeps its blobs.", "dim"))


def _chain_text(path: ReferencePath, by_manifest: dict[str, ReferencePath]) -> str:
    """The path's whole chain down to the blob (`via` followed), at most CHAIN_SHOWN
    manifests of it, then how many more."""
    shown: list[str] = []
    current: ReferencePath | None = path
    while current is not None and len(shown) < CHAIN_SHOWN:
        shown.extend(current.chain[:CHAIN_SHOWN - len(shown)])
        current = by_manifest.get(current.via) if current.via is not None else None
    hidden = path.length - len(shown)
    more = [f"... {hidden} more"] if hidden > 0 else []
    return " -> ".join([*shown, *more, f"({path.role})"])
