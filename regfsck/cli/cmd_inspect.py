"""`regfsck inspect`: one image's manifest tree, offline, with its health."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    CONFIG_OPTION,
    JOBS_OPTION,
    JSON_OPTION,
    CtrlC,
    default_jobs,
    fail,
    human_bytes,
    open_root,
    print_json,
    rich_text,
    root_then,
    say,
    split_root,
    stderr_console,
    stdout_console,
    styled,
    table,
    with_requests,
)
from regfsck.errors import ExitCode
from regfsck.findings import Severity

if TYPE_CHECKING:
    from rich.text import Text
    from rich.tree import Tree

    from regfsck.inspect import BlobNode, InspectReport, ManifestNode


@command()
def inspect(
    args: list[str] = root_then("REF", "the image: repo:tag, repo@sha256:..., repo (= "
                                "repo:latest) or a bare manifest digest; a unique digest prefix "
                                "will do (repo@6d7e7209)."),
    config: Path | None = CONFIG_OPTION,
    json_output: bool = JSON_OPTION,
    raw: bool = typer.Option(False, "--raw", help="Print the manifest bytes exactly as stored "
                             "(like `skopeo inspect --raw`)."),
    image_config: bool = typer.Option(False, "--image-config", help="Print the image config "
                                      "blob exactly as stored (like `skopeo inspect --config "
                                      "--raw`)."),
    platform: str = typer.Option("", "--platform", metavar="OS/ARCH[/VARIANT]", help="With "
                                 "--raw/--image-config on an index: the OS/ARCH[/VARIANT] child "
                                 "to print."),
    no_data: bool = typer.Option(False, "--no-data", help="Skip re-hashing the image's blobs and "
                                 "decompressing its layers (no uncompressed sizes)."),
    jobs: int = JOBS_OPTION,
) -> None:
    """Show an image's manifest tree (index, platforms, config, layers), tags and health."""
    root, ref = split_root(args, config, "REF")
    from regfsck.graph import ManifestStore
    from regfsck.inspect import (
        Inspector,
        pick_platform,
        read_config_bytes,
        read_manifest_bytes,
    )
    from regfsck.refs import parse_ref
    from regfsck.scanner import Scanner
    from regfsck.storage import open_storage

    if raw and image_config:
        fail("--raw and --image-config print different blobs: choose one", ExitCode.USAGE)
    if jobs < 0:
        fail("--jobs must be positive", ExitCode.USAGE)
    image_ref = parse_ref(ref, bare="latest", digest_alone=True)
    registry = open_root(root, config, object_storage=True)
    if registry.is_object_storage and not jobs:
        from regfsck.objectstore import default_jobs as s3_default_jobs

        jobs = s3_default_jobs()  # requests in flight, not CPU threads
    storage = open_storage(registry, jobs=jobs or None if registry.is_object_storage else None)
    inventory = Scanner(storage, registry).scan()
    store = ManifestStore(storage, inventory, keep_raw=True)  # schema1 info re-reads its bytes
    inspector = Inspector(inventory, store, measure_layers=not no_data)
    _, digest = inspector.resolve(image_ref)
    if raw or image_config:
        if image_config or platform:
            digest = pick_platform(store, digest, platform or "linux/amd64")
        data = (read_manifest_bytes(store, digest) if raw
                else read_config_bytes(inventory, store, digest))
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        raise typer.Exit(ExitCode.OK)
    ctrl_c = CtrlC()
    try:
        report = inspector.build(image_ref, check_data=not no_data,
                                 jobs=jobs or default_jobs(), stop=ctrl_c.stop)
    finally:
        ctrl_c.restore()
    if ctrl_c.stop.is_set():
        stderr_console().print("interrupted")
        raise typer.Exit(ExitCode.INTERRUPTED)
    if json_output:
        print_json(with_requests(registry, report.to_json()))
    else:
        render_inspect(report)
    raise typer.Exit(ExitCode.OK if report.healthy else ExitCode.FINDINGS)


def _size(n: int | None) -> str:
    return human_bytes(n) if n is not None else "?"


def _join(parts: list[str]) -> Text:
    joined: list[str] = []
    for i, part in enumerate(parts):
        if i:
            joined.append("  ")
        joined.append(part)
    return rich_text(*joined)


def _blob_label(blob: BlobNode) -> Text:
    parts: list[str] = [styled(blob.role, "bold"), blob.digest, blob.media_type or "?",
                               _size(blob.size)]
    if blob.uncompressed_size is not None and blob.role != "config":
        parts.append(f"({blob.compression}, {_size(blob.uncompressed_size)} uncompressed)")
    if blob.foreign:
        parts.append(styled("foreign: " + ", ".join(blob.urls), "dim"))
    elif blob.stored_size is None:
        parts.append(styled("MISSING", "bold red"))
    elif blob.linked is False:
        parts.append(styled("not linked in this repository", "red"))
    if blob.problem and blob.stored_size is not None:
        parts.append(styled(blob.problem, "red"))
    return _join(parts)


def _add_manifest(tree: Tree, node: ManifestNode) -> None:
    label: list[str] = [styled(node.digest, "bold"), node.media_type or "?", _size(node.size)]
    if node.platform:
        label.append(styled(node.platform, "cyan"))
    if node.artifact_type:
        label.append(f"artifact {node.artifact_type}")
    if node.subject:
        label.append(f"subject {node.subject}")
    if node.in_repository is False:
        label.append(styled("no revision link in this repository", "red"))
    if node.problem:
        label.append(styled(node.problem, "bold red"))
    branch = tree.add(_join(label))
    if node.config is not None:
        config = branch.add(_blob_label(node.config))
        info = node.config_info
        if info is not None:
            if info.created:
                config.add(rich_text(f"created {info.created}"))
            for entry in info.history:
                created_by = str(entry.get("created_by", "")).strip()
                line = [styled(str(entry.get("created", "")), "dim"), created_by[:100]]
                if entry.get("empty_layer"):
                    line.append(styled("(empty layer)", "dim"))
                config.add(_join(line))
    elif node.config_info is not None and node.config_info.created:
        branch.add(rich_text(f"created {node.config_info.created}"))
    for layer in node.layers:
        branch.add(_blob_label(layer))
    for child in node.children:
        _add_manifest(branch, child)


def render_inspect(report: InspectReport) -> None:
    from rich.table import Table
    from rich.tree import Tree

    console = stdout_console()
    tree = Tree(rich_text(styled(report.ref, "bold")))
    _add_manifest(tree, report.root)
    console.print(tree)
    info = Table(show_header=False, box=None)
    info.add_row("tags", rich_text(", ".join(report.tags)) if report.tags
                 else rich_text(styled("none (untagged)", "yellow")))
    info.add_row("repositories", rich_text(", ".join(report.repositories) or "none"))
    for parent in report.parents:
        tags = ", ".join(parent["tags"]) or "untagged"
        info.add_row("listed by index", rich_text(f"{parent['repo']}@{parent['digest']} ({tags})"))
    if report.kind is not None and report.kind not in ("image", "index"):
        about = f" of {report.subject} (by {report.subject_via})" if report.subject else ""
        info.add_row("kind", rich_text(f"{report.kind}{about}"))
    for referrer in report.referrers:
        tags = ", ".join(referrer["tags"]) or "untagged"
        info.add_row("referrer", rich_text(f"{referrer['kind']} {referrer['repo']}@{referrer['digest']} "
                                        f"{referrer['artifact_type']} ({tags}; by {referrer['via']})"))
    t = report.totals
    uncompressed = (_size(t.uncompressed_bytes) if report.data_checked else "not measured")
    info.add_row("layers", f"{t.layers}: {human_bytes(t.compressed_bytes)} compressed, "
                 f"{uncompressed} uncompressed; {human_bytes(t.stored_bytes)} stored")
    console.print(info)
    if report.health:
        style = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
        table("Health", ("severity", "kind", "where", "message"), [
            (styled(str(f.severity), style[f.severity]), f.kind, f.path, f.message)
            for f in report.health])
    checked = "re-hashed" if report.data_checked else "structure only (--no-data)"
    say("health: ", "healthy" if report.healthy else styled("DAMAGED", "bold red"),
        f" ({checked})")
