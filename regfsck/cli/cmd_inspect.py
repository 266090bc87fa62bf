"""`regfsck inspect`: one image's manifest tree, offline, with its health."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import typer
from rich.table import Table
from rich.tree import Tree

from regfsck import exitcodes
from regfsck.cli.app import app
from regfsck.cli.common import (
    JSON_OPTION,
    default_jobs,
    fail,
    human_bytes,
    open_root,
    print_json,
    shown,
    stderr_console,
    stdout_console,
)
from regfsck.findings import Severity
from regfsck.graph import ManifestStore
from regfsck.inspect import (
    BlobNode,
    Inspector,
    InspectReport,
    ManifestNode,
    RefError,
    parse_ref,
    pick_platform,
    read_config_bytes,
    read_manifest_bytes,
)
from regfsck.scanner import Scanner
from regfsck.storage import FilesystemStorage, StorageError

INSPECT_ROOT = typer.Argument(..., help="Registry storage root (holding docker/registry/v2) or "
                              "the v2 directory itself.", show_default=False)


@app.command()
def inspect(
    root: Path = INSPECT_ROOT,
    ref: str = typer.Argument(..., help="repo:tag, repo@sha256:..., repo (= repo:latest) or a "
                              "bare manifest digest.", show_default=False),
    json_output: bool = JSON_OPTION,
    raw: bool = typer.Option(False, "--raw", help="Print the manifest bytes exactly as stored "
                             "(like `skopeo inspect --raw`)."),
    image_config: bool = typer.Option(False, "--image-config", help="Print the image config "
                                      "blob exactly as stored (like `skopeo inspect --config "
                                      "--raw`)."),
    platform: str = typer.Option("", "--platform", help="With --raw/--image-config on an index: "
                                 "the OS/ARCH[/VARIANT] child to print."),
    no_data: bool = typer.Option(False, "--no-data", help="Skip re-hashing the image's blobs and "
                                 "decompressing its layers (no uncompressed sizes)."),
    jobs: int = typer.Option(0, "--jobs", "-j", help="Hashing threads (default: CPU count)."),
) -> None:
    """Show an image's manifest tree (index, platforms, config, layers), tags and health."""
    if raw and image_config:
        fail("--raw and --image-config print different blobs: choose one", exitcodes.USAGE)
    if jobs < 0:
        fail("--jobs must be positive", exitcodes.USAGE)
    try:
        image_ref = parse_ref(ref)
    except RefError as exc:
        fail(str(exc), exitcodes.USAGE)
    registry = open_root(root, None)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    store = ManifestStore(storage, inventory)
    inspector = Inspector(inventory, store, measure_layers=not no_data)
    try:
        _, digest = inspector.resolve(image_ref)
        if raw or image_config:
            if image_config or platform:
                digest = pick_platform(store, digest, platform or "linux/amd64")
            data = (read_manifest_bytes(store, digest) if raw
                    else read_config_bytes(inventory, store, digest))
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            raise typer.Exit(exitcodes.OK)
        stop = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            report = inspector.build(image_ref, check_data=not no_data,
                                     jobs=jobs or default_jobs(), stop=stop)
        finally:
            signal.signal(signal.SIGINT, previous)
        if stop.is_set():
            stderr_console().print("interrupted")
            raise typer.Exit(exitcodes.INTERRUPTED)
    except RefError as exc:
        fail(str(exc), exitcodes.USAGE)
    except (StorageError, ValueError) as exc:
        fail(str(exc), exitcodes.FINDINGS)
    if json_output:
        print_json(report.to_json())
    else:
        render_inspect(report)
    raise typer.Exit(exitcodes.OK if report.healthy else exitcodes.FINDINGS)


def _size(n: int | None) -> str:
    return human_bytes(n) if n is not None else "?"


def _blob_label(blob: BlobNode) -> str:
    parts = [f"[bold]{blob.role}[/]", blob.digest, shown(blob.media_type or "?"),
             _size(blob.size)]
    if blob.uncompressed_size is not None and blob.role != "config":
        parts.append(f"({blob.compression}, {_size(blob.uncompressed_size)} uncompressed)")
    if blob.foreign:
        parts.append("[dim]foreign: " + shown(", ".join(blob.urls)) + "[/]")
    elif blob.stored_size is None:
        parts.append("[bold red]MISSING[/]")
    elif blob.linked is False:
        parts.append("[red]not linked in this repository[/]")
    if blob.problem and blob.stored_size is not None:
        parts.append(f"[red]{shown(blob.problem)}[/]")
    return "  ".join(parts)


def _add_manifest(tree: Tree, node: ManifestNode) -> None:
    label = [f"[bold]{node.digest}[/]", shown(node.media_type or "?"), _size(node.size)]
    if node.platform:
        label.append(f"[cyan]{shown(node.platform)}[/]")
    if node.artifact_type:
        label.append(f"artifact {shown(node.artifact_type)}")
    if node.subject:
        label.append(f"subject {node.subject}")
    if node.in_repository is False:
        label.append("[red]no revision link in this repository[/]")
    if node.problem:
        label.append(f"[bold red]{shown(node.problem)}[/]")
    branch = tree.add("  ".join(label))
    if node.config is not None:
        config = branch.add(_blob_label(node.config))
        info = node.config_info
        if info is not None:
            if info.created:
                config.add(f"created {shown(info.created)}")
            for entry in info.history:
                created_by = str(entry.get("created_by", "")).strip()
                empty = " [dim](empty layer)[/]" if entry.get("empty_layer") else ""
                config.add(f"[dim]{shown(str(entry.get('created', '')))}[/] "
                           f"{shown(created_by[:100])}{empty}")
    elif node.config_info is not None and node.config_info.created:
        branch.add(f"created {shown(node.config_info.created)}")
    for layer in node.layers:
        branch.add(_blob_label(layer))
    for child in node.children:
        _add_manifest(branch, child)


def render_inspect(report: InspectReport) -> None:
    console = stdout_console()
    tree = Tree(f"[bold]{shown(report.ref)}[/]")
    _add_manifest(tree, report.root)
    console.print(tree)
    info = Table(show_header=False, box=None)
    info.add_row("tags", shown(", ".join(report.tags)) or "[yellow]none (untagged)[/]")
    info.add_row("repositories", shown(", ".join(report.repositories)) or "none")
    for parent in report.parents:
        tags = ", ".join(parent["tags"]) or "untagged"
        info.add_row("listed by index", shown(f"{parent['repo']}@{parent['digest']} ({tags})"))
    for referrer in report.referrers:
        info.add_row("referrer", shown(f"{referrer['repo']}@{referrer['digest']} "
                                        f"{referrer['artifact_type']}"))
    t = report.totals
    uncompressed = (_size(t.uncompressed_bytes) if report.data_checked else "not measured")
    info.add_row("layers", f"{t.layers}: {human_bytes(t.compressed_bytes)} compressed, "
                 f"{uncompressed} uncompressed; {human_bytes(t.stored_bytes)} stored")
    console.print(info)
    if report.health:
        table = Table(title="Health")
        for column in ("severity", "kind", "where", "message"):
            table.add_column(column, overflow="fold")
        style = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
        for finding in report.health:
            table.add_row(f"[{style[finding.severity]}]{finding.severity}[/]", finding.kind,
                          shown(finding.path), shown(finding.message))
        console.print(table)
    checked = "re-hashed" if report.data_checked else "structure only (--no-data)"
    verdict = "healthy" if report.healthy else "[bold red]DAMAGED[/]"
    console.print(f"health: {verdict} ({checked})")
