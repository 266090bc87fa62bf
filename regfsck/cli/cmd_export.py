"""`regfsck export`: images out of a stopped registry into OCI layouts and archives."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from regfsck import exitcodes, manifest
from regfsck.cli.app import app
from regfsck.cli.common import (
    JSON_OPTION,
    fail,
    human_bytes,
    open_root,
    print_json,
    show_progress,
    stderr_console,
    stdout_console,
)
from regfsck.export import (
    ExportError,
    ExportFormat,
    ExportInterrupted,
    ExportResult,
    Platform,
    export_images,
    parse_platform,
)
from regfsck.findings import safe_text
from regfsck.refs import ImageRef, RefError, parse_ref
from regfsck.scanner import Scanner
from regfsck.storage import FilesystemStorage

_SHORT_TYPES = {
    manifest.OCI_MANIFEST: "oci manifest", manifest.OCI_INDEX: "oci index",
    manifest.DOCKER_MANIFEST: "docker manifest", manifest.DOCKER_LIST: "docker list",
    manifest.SCHEMA1: "schema1", manifest.SCHEMA1_SIGNED: "schema1",
}
_EXIT = {"usage": exitcodes.USAGE, "damage": exitcodes.FINDINGS, "io": exitcodes.CANNOT_RUN}


@app.command("export")
def export_command(
    root: Path = typer.Argument(..., metavar="ROOT", help="Registry storage root (holding "
                                "docker/registry/v2) or the v2 directory.", show_default=False),
    refs: list[str] = typer.Argument(..., metavar="REF...", help="repo:tag, repo@sha256:... or "
                                     "repo (every tag of it).", show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="Directory (oci) or file to create; "
                                "a name ending in .zst or .gz is compressed.", show_default=False),
    fmt: ExportFormat | None = typer.Option(None, "--format", help="oci, oci-archive or "
                                            "docker-archive (default: oci-archive for names "
                                            "like *.tar[.zst|.gz], else oci).",
                                            show_default=False),
    platform: str | None = typer.Option(None, "--platform", metavar="OS/ARCH[/VARIANT]",
                                        help="Export only this platform of multi-arch images "
                                        "(required for them in a docker-archive)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Write images (manifests and blobs byte for byte, each re-hashed) to OUTPUT."""
    try:
        parsed: list[ImageRef] = [parse_ref(text) for text in refs]
        wanted: Platform | None = parse_platform(platform) if platform else None
    except (RefError, ValueError) as exc:
        fail(str(exc), exitcodes.USAGE)
    registry = open_root(root, None)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    bar = _Bar() if show_progress(json_output) else None
    try:
        result = export_images(storage, inventory, parsed, output, registry.v2, fmt=fmt,
                               platform=wanted, on_start=bar.start if bar else None,
                               on_bytes=bar.advance if bar else None, stop=stop)
    except ExportInterrupted:
        fail("interrupted: nothing was written", exitcodes.INTERRUPTED)
    except ExportError as exc:
        fail(str(exc), _EXIT.get(exc.reason, exitcodes.CANNOT_RUN))
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.stop()
    if json_output:
        print_json(result.to_json())
    else:
        render_export(result)
    raise typer.Exit(exitcodes.OK)


class _Bar:
    """Bytes copied / rate / ETA on stderr."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("exporting"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=stderr_console(), transient=True)
        self.task = self.progress.add_task("export", total=0)

    def start(self, total: int) -> None:
        self.progress.update(self.task, total=total)
        self.progress.start()

    def advance(self, nbytes: int) -> None:
        self.progress.advance(self.task, nbytes)

    def stop(self) -> None:
        self.progress.stop()


def render_export(result: ExportResult) -> None:
    console = stdout_console()
    table = Table(title=f"Exported to {safe_text(result.output)} ({result.format})")
    for column in ("name", "digest", "type"):
        table.add_column(column, overflow="fold")
    for image in result.plan.images:
        names = ", ".join(image.repo_tags) if image.config is not None else image.ref_name
        kind = _SHORT_TYPES.get(image.media_type, image.media_type)
        if image.index_digest is not None:
            kind += f" (picked from index {image.index_digest[:19]}...)"
        table.add_row(safe_text(names or image.ref_name), image.digest, kind)
    console.print(table)
    for ref, why in result.plan.skipped:
        console.print(f"[yellow]skipped[/] {safe_text(ref)}: {safe_text(why)}")
    for note in result.plan.notes:
        console.print(f"[dim]note:[/] {note}")
    console.print(f"{len(result.plan.images)} images, {len(result.plan.blobs)} blobs "
                  f"({human_bytes(result.plan.total_bytes)}) verified and written; "
                  f"{safe_text(result.output)} is {human_bytes(result.output_bytes)}"
                  + (f" ({result.compression})" if str(result.compression) != "none" else ""))
