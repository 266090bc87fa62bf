"""`regfsck import`: images from an OCI layout or archive into a stopped registry's tree."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from regfsck import exitcodes
from regfsck.cli.app import app
from regfsck.cli.common import (
    APPLY_OPTION,
    JSON_OPTION,
    fail,
    human_bytes,
    print_json,
    show_progress,
    stderr_console,
    stdout_console,
)
from regfsck.findings import safe_text
from regfsck.importer import ImportFailed, ImportInterrupted, ImportPlan, run_import
from regfsck.quarantine import QuarantineError
from regfsck.safety import SafetyError
from regfsck.storage import StorageError

_EXIT = {"usage": exitcodes.USAGE, "damage": exitcodes.FINDINGS, "io": exitcodes.CANNOT_RUN}


@app.command("import")
def import_command(
    root: Path = typer.Argument(..., metavar="ROOT", help="Registry storage root (holding "
                                "docker/registry/v2), its v2 directory, or an empty directory to "
                                "start a registry in.", show_default=False),
    source: Path = typer.Argument(..., metavar="SOURCE", help="OCI image layout directory, or oci-archive "
                                  "(plain, .gz or .zst), e.g. from `regfsck export` or skopeo.",
                                  show_default=False),
    repo: str | None = typer.Option(None, "--repo", help="Put every image into this repository "
                                    "(needed when the layout names only tags)."),
    apply: bool = APPLY_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    """Import images offline, exactly as the registry would write them (plan first, --apply)."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    bar = _Bar() if show_progress(json_output) else None
    try:
        plan = run_import(root, source, repo=repo, apply=apply,
                          on_bytes=bar.advance if bar else None, stop=stop)
    except ImportInterrupted:
        fail("interrupted: nothing was imported" + (" (the run was reverted)" if apply else ""),
             exitcodes.INTERRUPTED)
    except ImportFailed as exc:
        fail(str(exc), _EXIT.get(exc.reason, exitcodes.CANNOT_RUN))
    except (SafetyError, QuarantineError) as exc:
        fail(str(exc), exitcodes.CANNOT_RUN)
    except StorageError as exc:
        fail(f"{exc} (nothing was imported)", exitcodes.CANNOT_RUN)
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.stop()
    if json_output:
        print_json(plan.to_json())
    else:
        render_plan(plan)
    raise typer.Exit(exitcodes.OK)


class _Bar:
    """Bytes read and verified so far (the total is unknown until the source is read)."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("reading and verifying"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), console=stderr_console(), transient=True)
        self.task = self.progress.add_task("import", total=None)
        self.progress.start()

    def advance(self, nbytes: int) -> None:
        self.progress.advance(self.task, nbytes)

    def stop(self) -> None:
        self.progress.stop()


def render_plan(plan: ImportPlan) -> None:
    console = stdout_console()
    table = Table(title=f"Images in {safe_text(plan.source)}")
    for column in ("repository", "tag", "digest"):
        table.add_column(column, overflow="fold")
    for image in plan.images:
        table.add_row(safe_text(image.repo), safe_text(image.tag or "(by digest)"), image.digest)
    console.print(table)
    kinds: dict[str, int] = {}
    for link in plan.links:
        kinds[link.kind] = kinds.get(link.kind, 0) + 1
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {safe_text(note)}")
    links = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"
    what = (f"{len(plan.new_blobs)} new blobs ({human_bytes(plan.bytes_to_write)}), "
            f"{len(plan.existing_blobs)} already in the tree; links: {links}")
    if plan.applied:
        done = "nothing to do: the tree already has all of it" if plan.is_empty else (
            f"imported into {safe_text(plan.root)}: {what}; undo with "
            f"`regfsck undo {safe_text(plan.root)} {plan.run_id}`")
        console.print(done)
    else:
        console.print(f"plan: {what}. Nothing was written; run again with --apply "
                      "(stop the registry first).")
