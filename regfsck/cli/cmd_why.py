"""`regfsck why`: who uses a blob, whether gc keeps it, what deleting a tag would free."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from regfsck import exitcodes
from regfsck.cli.app import app
from regfsck.cli.common import (
    JSON_OPTION,
    fail,
    human_bytes,
    open_root,
    print_json,
    shown,
    stdout_console,
)
from regfsck.digest import DigestError, parse_digest
from regfsck.graph import ManifestStore
from regfsck.scanner import Scanner
from regfsck.storage import FilesystemStorage
from regfsck.why import WhyReport, explain_blob


@app.command()
def why(
    root: Path = typer.Argument(..., help="Registry storage root (holding docker/registry/v2) "
                                "or the v2 directory itself.", show_default=False),
    digest: str = typer.Argument(..., help="The blob digest, sha256:<64 hex>.",
                                 show_default=False),
    json_output: bool = JSON_OPTION,
) -> None:
    """Explain why a blob exists: who reaches it, gc's verdict, bytes each tag holds."""
    try:
        parse_digest(digest)
    except DigestError as exc:
        fail(f"not a digest: {exc}", exitcodes.USAGE)
    registry = open_root(root, None)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    report = explain_blob(inventory, ManifestStore(storage, inventory), digest)
    if not report.exists and not report.referenced and not report.layer_links \
            and report.misplaced_at is None:
        fail(f"{digest}: no such blob, and nothing in the tree refers to it", exitcodes.FINDINGS)
    if json_output:
        print_json(report.to_json())
    else:
        render_why(report)
    raise typer.Exit(exitcodes.OK if report.exists else exitcodes.FINDINGS)


def render_why(report: WhyReport) -> None:
    console = stdout_console()
    if report.exists:
        state = f"{human_bytes(report.size or 0)} at {shown(report.path)}"
    elif report.misplaced_at:
        state = f"[red]misplaced[/] at {shown(report.misplaced_at)} (see `regfsck repair`)"
    else:
        state = "[bold red]MISSING[/] (referenced but not on disk)"
    roles = ", ".join(report.roles) or "unreferenced"
    console.print(f"[bold]{report.digest}[/]  {state}\nused as: {roles}")
    if report.paths:
        table = Table(title="Reached from")
        for column in ("repository", "revision", "tags", "path to the blob"):
            table.add_column(column, overflow="fold")
        for path in report.paths:
            chain = " -> ".join([*(short(d) for d in path.chain), f"({path.role})"])
            table.add_row(shown(path.repo), short(path.manifest), shown(", ".join(path.tags))
                          or "[yellow]untagged[/]", chain)
        console.print(table)
    elif report.direct_parents:
        console.print("referenced only by manifests that no repository holds a revision of: "
                      + ", ".join(p["manifest"] for p in report.direct_parents))
    else:
        console.print("[yellow]no manifest of any repository references it[/]")
    good = [shown(link.repo) for link in report.layer_links if link.content]
    if good:
        console.print(f"_layers links in {len(good)} repositories: {', '.join(good)}")
    for link in report.layer_links:
        if not link.content:
            console.print(f"[red]invalid _layers link[/] {shown(link.path)}: "
                          f"{shown(link.error or 'invalid')}")
    verdicts = Table(title="Garbage collection")
    for column in ("mode", "verdict", "why"):
        verdicts.add_column(column, overflow="fold")
    for verdict in report.gc:
        verdicts.add_row(verdict.mode, "[green]keep[/]" if verdict.keep else "[red]delete[/]",
                         shown(verdict.reason))
    console.print(verdicts)
    if report.freed:
        freed = Table(title="What deleting a reference would free")
        for column in ("delete", "then", "frees", "note"):
            freed.add_column(column, overflow="fold")
        for item in report.freed:
            action = item.action
            if "@" in action:
                name, _, digest = action.partition("@")
                action = f"{name}@{short(digest)}"
            freed.add_row(shown(action), item.gc_mode,
                          f"{human_bytes(item.bytes)} ({item.blobs} blobs)", shown(item.note))
        console.print(freed)
        console.print("[dim]rm of a tag alone frees nothing under the default gc: the "
                      "revision stays and keeps its blobs.[/]")


def short(digest: str) -> str:
    """`sha256:` and the first 12 hex digits, as docker prints image ids."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}:{hex_part[:12]}"
