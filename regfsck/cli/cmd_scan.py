"""`regfsck scan`: inventory and disk use."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.table import Table

from regfsck import exitcodes
from regfsck.cli.app import app
from regfsck.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    ROOT_ARGUMENT,
    fail,
    human_bytes,
    open_root,
    print_json,
    shown,
    stdout_console,
    with_requests,
)
from regfsck.findings import safe_text
from regfsck.graph import ManifestStore
from regfsck.scanner import Scanner
from regfsck.storage import StorageError, open_storage
from regfsck.usage import ScanReport, build_scan_report


@app.command()
def scan(root: Path | None = ROOT_ARGUMENT, config: Path | None = CONFIG_OPTION,
         json_output: bool = JSON_OPTION,
         top: int = 10,
         html: Path | None = typer.Option(
             None, "--html", metavar="FILE", help="Also write a self-contained HTML page: a "
             "treemap of disk use by repository and tag, the largest images, what gc would "
             "reclaim in both modes, stale uploads.", show_default=False),
         findings: Path | None = typer.Option(
             None, "--findings", metavar="JSON", help="With --html: show these findings "
             "(the output of `regfsck verify --json`).", show_default=False)) -> None:
    """Index repositories, tags, manifests, blobs and uploads; report disk use."""
    if findings is not None and html is None:
        fail("--findings goes with --html FILE", exitcodes.USAGE)
    if html is not None and not html.parent.is_dir():
        fail(f"--html: directory {html.parent} does not exist", exitcodes.USAGE)
    registry = open_root(root, config, object_storage=True)
    storage = open_storage(registry)
    try:
        inventory = Scanner(storage, registry).scan()
    except StorageError as exc:  # object storage: the bucket or prefix cannot be listed
        fail(str(exc))
    if html is not None:
        from regfsck.cli.scan_html import load_findings, render_html, write_html
        from regfsck.diskmap import build_disk_map
        verified = load_findings(findings) if findings is not None else None
        now = datetime.now(UTC)
        disk = build_disk_map(inventory, storage, now)
        write_html(html, render_html(disk, root=registry.display, generated=now, top=top,
                                     findings=verified))
        report = disk.scan
        if not json_output:
            sys.stderr.write(f"HTML report written to {safe_text(str(html))}\n")
    else:
        report = build_scan_report(inventory, ManifestStore(storage, inventory), datetime.now(UTC))
    if json_output:
        print_json(with_requests(registry, report.to_json()))
    else:
        render_scan(report, top)
    raise SystemExit(exitcodes.OK)


def render_scan(report: ScanReport, top: int) -> None:
    console = stdout_console()
    totals = Table(title="Registry totals", show_header=False)
    totals.add_row("repositories", str(len(report.repositories)))
    totals.add_row("tags", str(sum(len(r.tags) for r in report.repositories)))
    totals.add_row("manifest revisions", str(sum(len(r.manifests) for r in report.repositories)))
    totals.add_row("layer links", str(sum(r.layer_links for r in report.repositories)))
    totals.add_row("blobs", f"{report.blob_count} ({human_bytes(report.blob_bytes)})")
    totals.add_row("unreferenced blobs",
                   f"{report.unreferenced_count} ({human_bytes(report.unreferenced_bytes)})")
    stale = [u for u in report.uploads if u.stale]
    totals.add_row("uploads", f"{len(report.uploads)} ({len(stale)} stale, "
                   f"{human_bytes(sum(u.size for u in stale))})")
    totals.add_row("dedup ratio", f"{report.dedup_ratio:.2f}x")
    totals.add_row("files seen", str(report.files_seen))
    if report.anomalies:
        totals.add_row("anomalies", f"{report.anomalies} (run `regfsck verify` for details)")
    console.print(totals)

    repos = Table(title="Repositories")
    for column in ("repository", "tags", "manifests", "unique", "shared"):
        repos.add_column(column, justify="left" if column == "repository" else "right")
    for usage in report.repositories:
        repos.add_row(shown(usage.name), str(len(usage.tags)), str(len(usage.manifests)),
                      human_bytes(usage.unique_bytes), human_bytes(usage.shared_bytes))
    console.print(repos)

    largest = sorted(report.repositories, key=lambda r: r.unique_bytes + r.shared_bytes,
                     reverse=True)[:top]
    if largest:
        big = Table(title=f"Largest {len(largest)} repositories (unique + shared)")
        big.add_column("repository")
        big.add_column("bytes", justify="right")
        for usage in largest:
            big.add_row(shown(usage.name), human_bytes(usage.unique_bytes + usage.shared_bytes))
        console.print(big)
    if stale:
        uploads = Table(title="Stale uploads (gc --apply removes them)")
        for column in ("repository", "upload", "size", "started"):
            uploads.add_column(column)
        for upload in stale:
            uploads.add_row(shown(upload.repo), shown(upload.id), human_bytes(upload.size),
                            upload.started_at or "never (no startedat)")
        console.print(uploads)
