"""`regfsck export`: images out of a stopped registry into OCI layouts and archives."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    ByteBar,
    CtrlC,
    fail,
    human_bytes,
    open_root,
    plural,
    print_json,
    say,
    show_progress,
    styled,
    table,
    with_requests,
)
from regfsck.errors import ExitCode

if TYPE_CHECKING:
    from regfsck.export import ExportFormat, ExportResult, Platform
    from regfsck.refs import ImageRef

_SHORT_TYPES = {
    "application/vnd.oci.image.manifest.v1+json": "oci manifest",
    "application/vnd.oci.image.index.v1+json": "oci index",
    "application/vnd.docker.distribution.manifest.v2+json": "docker manifest",
    "application/vnd.docker.distribution.manifest.list.v2+json": "docker list",
    "application/vnd.docker.distribution.manifest.v1+json": "schema1",
    "application/vnd.docker.distribution.manifest.v1+prettyjws": "schema1",
}
@command("export")
def export_command(
    args: list[str] = typer.Argument(..., metavar="ROOT REF...", show_default=False, help=(
        "Registry storage root (holding docker/registry/v2) or the v2 directory (omit it with "
        "--config), then repo:tag, repo@sha256:... or repo (every tag of it).")),
    config: Path | None = CONFIG_OPTION,
    output: Path = typer.Option(..., "--output", "-o", metavar="PATH", help="Directory (oci) "
                                "or file to create; a name ending in .zst or .gz is compressed.",
                                show_default=False),
    fmt: str | None = typer.Option(None, "--format", metavar="FORMAT", help="oci, oci-archive "
                                   "or docker-archive (default: oci-archive for names like "
                                   "*.tar[.zst|.gz], else oci).", show_default=False),
    platform: str | None = typer.Option(None, "--platform", metavar="OS/ARCH[/VARIANT]",
                                        help="Export only this platform of multi-arch images "
                                        "(required for them in a docker-archive)."),
    with_referrers: bool = typer.Option(
        True, "--with-referrers/--no-referrers",
        help="Take along the signatures, attestations and SBOMs attached to each image (by "
        "subject or cosign's sha256-<digest>.sig/.att/.sbom tags); oci and oci-archive only."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Write images (manifests and blobs byte for byte, each re-hashed) to OUTPUT."""
    from regfsck.export import ExportError, ExportFormat, export_images, parse_platform
    from regfsck.refs import parse_ref
    from regfsck.scanner import Scanner
    from regfsck.storage import open_storage

    values = list(args)
    root = None if config is not None else Path(values.pop(0))
    if not values:
        fail("give at least one REF after ROOT (repo:tag, repo@sha256:... or repo)",
             ExitCode.USAGE)
    parsed: list[ImageRef] = [parse_ref(text, bare="repository") for text in values]
    wanted: Platform | None = parse_platform(platform) if platform else None
    if fmt is not None and fmt not in {f.value for f in ExportFormat}:
        raise ExportError(f"--format: {fmt!r} is not one of oci, oci-archive, docker-archive")
    chosen: ExportFormat | None = ExportFormat(fmt) if fmt is not None else None
    registry = open_root(root, config, object_storage=True)
    storage = open_storage(registry)
    inventory = Scanner(storage, registry).scan()
    ctrl_c = CtrlC()
    bar = ByteBar("exporting") if show_progress(json_output) else None
    try:
        result = export_images(storage, inventory, parsed, output, registry.v2, fmt=chosen,
                               platform=wanted, on_start=bar.start if bar else None,
                               on_bytes=bar.advance if bar else None, stop=ctrl_c.stop,
                               with_referrers=with_referrers)
    finally:
        ctrl_c.restore()
        if bar is not None:
            bar.finish()
    if json_output:
        print_json(with_requests(registry, result.to_json()))
    else:
        render_export(result)
    raise typer.Exit(ExitCode.OK)


def render_export(result: ExportResult) -> None:
    rows = []
    for image in result.plan.images:
        names = ", ".join(image.repo_tags) if image.config is not None else image.ref_name
        kind = _SHORT_TYPES.get(image.media_type, image.media_type)
        if image.index_digest is not None:
            kind += f" (picked from index {image.index_digest})"
        rows.append((names or image.ref_name, image.digest, kind))
    table(f"Exported to {result.output} ({result.format})", ("name", "digest", "type"), rows)
    for ref, why in result.plan.skipped:
        say(styled("skipped ", "yellow"), f"{ref}: {why}")
    for note_text in result.plan.notes:
        say(styled("note: ", "dim"), note_text)
    if result.plan.referrers:
        say(f"{plural(result.plan.referrers, 'referrer')} (signatures, attestations, SBOMs) taken "
            "along; --no-referrers leaves them out")
    say(f"{plural(len(result.plan.images), 'image')}, {plural(len(result.plan.blobs), 'blob')} "
        f"({human_bytes(result.plan.total_bytes)}) verified and written; "
        f"{result.output} is {human_bytes(result.output_bytes)}"
        + (f" ({result.compression})" if str(result.compression) != "none" else ""))
