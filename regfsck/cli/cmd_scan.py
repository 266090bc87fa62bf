"""`regfsck scan`: inventory and disk use."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.artifacts import tag_subject
from regfsck.cli.app import command
from regfsck.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    ROOT_ARGUMENT,
    fail,
    human_bytes,
    note,
    open_root,
    print_json,
    table,
    with_requests,
)
from regfsck.errors import ExitCode

if TYPE_CHECKING:
    from regfsck.usage import ScanReport


@command()
def scan(root: Path | None = ROOT_ARGUMENT, config: Path | None = CONFIG_OPTION,
         json_output: bool = JSON_OPTION,
         top: int = typer.Option(10, "--top", metavar="N", help="How many of the largest "
                                 "repositories to list."),
         html: Path | None = typer.Option(
             None, "--html", metavar="FILE", help="Also write a self-contained HTML page: a "
             "treemap of disk use by repository and tag, the largest images, what gc would "
             "reclaim in both modes, stale uploads.", show_default=False),
         findings: Path | None = typer.Option(
             None, "--findings", metavar="JSON", help="With --html: show these findings "
             "(the output of `regfsck verify --json`).", show_default=False)) -> None:
    """Index repositories, tags, manifests, blobs and uploads; report disk use."""
    if findings is not None and html is None:
        fail("--findings goes with --html FILE", ExitCode.USAGE)
    if html is not None and not html.parent.is_dir():
        fail(f"--html: directory {html.parent} does not exist", ExitCode.USAGE)
    registry = open_root(root, config, object_storage=True)
    from regfsck.graph import ManifestStore
    from regfsck.scanner import Scanner
    from regfsck.storage import open_storage
    from regfsck.usage import build_scan_report

    storage = open_storage(registry)
    inventory = Scanner(storage, registry).scan()
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
            note(f"HTML report written to {html}")
    else:
        report = build_scan_report(inventory, ManifestStore(storage, inventory), datetime.now(UTC))
    if json_output:
        print_json(with_requests(registry, report.to_json()))
    else:
        render_scan(report, top)
    raise typer.Exit(ExitCode.OK)


def render_scan(report: ScanReport, top: int) -> None:
    stale = [u for u in report.uploads if u.stale]
    totals = [
        ("repositories", str(len(report.repositories))),
        ("tags", str(sum(len(r.tags) for r in report.repositories))),
        ("manifest revisions", str(sum(len(r.manifests) for r in report.repositories))),
        ("layer links", str(sum(r.layer_links for r in report.repositories))),
        ("blobs", f"{report.blob_count} ({human_bytes(report.blob_bytes)})"),
        ("unreferenced blobs", f"{report.unreferenced_count} ({human_bytes(report.unreferenced_bytes)})"),
        ("uploads", f"{len(report.uploads)} ({len(stale)} stale, "
                    f"{human_bytes(sum(u.size for u in stale))})"),
        ("manifests by kind", ", ".join(f"{n} {k}" for k, n in report.kind_counts().items() if n)
         or "none"),
        ("dedup ratio", f"{report.dedup_ratio:.2f}x"),
        ("files seen", str(report.files_seen)),
    ]
    if report.anomalies:
        totals.append(("anomalies", f"{report.anomalies} (run `regfsck verify` for details)"))
    table("Registry totals", ("what", "count"), totals, limit=None)
    table("Repositories", ("repository", "tags", "manifests", "unique", "shared"),
          [(u.name, str(len(u.tags)), str(len(u.manifests)), human_bytes(u.unique_bytes),
            human_bytes(u.shared_bytes)) for u in report.repositories],
          right=("tags", "manifests", "unique", "shared"))
    attached = [(usage.name, obj) for usage in report.repositories for obj in usage.objects
                if obj.kind not in ("image", "index")]
    if attached:
        rows = []
        for name, obj in attached:
            kind = f"{obj.kind} ({obj.artifact_type})" if obj.artifact_type else obj.kind
            subject = f"{obj.subject} by {obj.subject_via}" if obj.subject else "-"
            rows.append((name, kind, obj.digest, subject,  # table() shortens digests on a tty
                         ", ".join(_short_tag(t) for t in obj.tags) or "(untagged)"))
        table("Signatures, attestations, SBOMs and artifacts",
              ("repository", "kind", "manifest", "attaches to", "tags"), rows)
    largest = sorted(report.repositories, key=lambda r: r.unique_bytes + r.shared_bytes,
                     reverse=True)[:top]
    if largest:
        table(f"Largest {len(largest)} repositories (unique + shared)", ("repository", "bytes"),
              [(u.name, human_bytes(u.unique_bytes + u.shared_bytes)) for u in largest],
              right=("bytes",))
    if stale:
        table("Stale uploads (gc --apply removes them)", ("repository", "upload", "size", "started"),
              [(u.repo, u.id, human_bytes(u.size), u.started_at or "never (no startedat)")
               for u in stale])


def _short_tag(tag: str) -> str:
    """cosign-convention tags (`sha256-<64 hex>.sig`) shortened to fit a terminal."""
    return f"{tag[:19]}…{tag[71:]}" if tag_subject(tag) is not None else tag
