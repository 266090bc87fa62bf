"""`regfsck repair`: provable fixes for verify's findings, planned first, applied with --apply."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer
from rich.table import Table

from regfsck import exitcodes
from regfsck.cli.app import app
from regfsck.cli.common import (
    APPLY_OPTION,
    CONFIG_OPTION,
    JSON_OPTION,
    ROOT_ARGUMENT,
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
from regfsck.quarantine import QuarantineError
from regfsck.repair import RepairError, RepairResult, run_repair
from regfsck.repair_source import BlobSource, SourceError, open_source
from regfsck.safety import SafetyError
from regfsck.storage import StorageError

_ACTION_LABEL = {
    "rewrite_link": "rewrite link", "create_link": "create link",
    "move_blob_home": "move blob home", "drop_stray_copy": "quarantine stray copy",
    "replace_blob": "replace blob", "restore_blob": "restore blob",
    "quarantine_blob": "quarantine blob",
}


@app.command()
def repair(
    root: Path | None = ROOT_ARGUMENT,
    config: Path | None = CONFIG_OPTION,
    sources: list[Path] = typer.Option([], "--from", help="A good copy to take blobs from: "
                                       "another registry root, an OCI layout directory or an "
                                       "OCI archive (.tar, .tar.gz, .tar.zst). Repeatable; "
                                       "tried in order.", show_default=False),
    apply: bool = APPLY_OPTION,
    json_output: bool = JSON_OPTION,
    jobs: int = typer.Option(0, "--jobs", "-j", help="Hashing threads (default: CPU count)."),
    no_data: bool = typer.Option(False, "--no-data", help="Skip re-hashing blob content: "
                                 "content damage is then neither found nor fixed."),
    restore_deleted: bool = typer.Option(False, "--restore-deleted", help="Also bring back "
                                         "index children deleted from their repository "
                                         "(index_child_deleted): by default a deliberate "
                                         "delete is left alone."),
) -> None:
    """Plan exact fixes for verify's findings; apply them (undoably) with --apply."""
    if jobs < 0:
        fail("--jobs must be positive", exitcodes.USAGE)
    registry = open_root(root, config)
    opened: list[BlobSource] = []
    try:
        for path in sources:
            opened.append(open_source(path))
    except SourceError as exc:
        fail(str(exc), exitcodes.USAGE)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        result = run_repair(registry, opened, apply=apply, jobs=jobs or default_jobs(),
                            check_data=not no_data, stop=stop,
                            restore_deleted=restore_deleted)
    except KeyboardInterrupt:
        fail("interrupted before anything was changed", exitcodes.INTERRUPTED)
    except (SafetyError, QuarantineError) as exc:
        fail(str(exc))
    except RepairError as exc:
        fail(f"repair stopped, nothing changed: {exc}")
    except StorageError as exc:
        fail(f"repair stopped: {exc.message}")
    finally:
        signal.signal(signal.SIGINT, previous)
        for source in opened:
            source.close()
    if json_output:
        print_json(result.to_json())
    else:
        render_repair(result, registry.root)
    if result.interrupted:
        raise typer.Exit(exitcodes.INTERRUPTED)
    raise typer.Exit(_exit_code(result))


def _exit_code(result: RepairResult) -> int:
    if result.applied:
        errors = any(f.severity is Severity.ERROR for f in result.remaining)
        return exitcodes.FINDINGS if errors else exitcodes.OK
    plan = result.plan
    errors = any(u.finding.severity is Severity.ERROR for u in plan.unfixable)
    return exitcodes.FINDINGS if plan.fixes or errors else exitcodes.OK


def render_repair(result: RepairResult, root: Path) -> None:
    console = stdout_console()
    plan = result.plan
    for message in result.recovered:
        console.print(f"[yellow]recovered:[/] {shown(message)}")
    if plan.fixes:
        title = "Fixes applied" if result.applied else "Fixes (run with --apply to make them)"
        table = Table(title=title)
        for column in ("action", "where", "why"):
            table.add_column(column, overflow="fold")
        if result.applied:
            table.add_column("status")
        for fix in plan.fixes:
            row = [_ACTION_LABEL.get(fix.action, fix.action), shown(fix.to_json()["path"]),
                   shown(fix.reason)]
            if result.applied:
                row.append(fix.status + (f": {shown(fix.note)}" if fix.note else ""))
            table.add_row(*row)
        console.print(table)
    else:
        console.print("nothing regfsck can fix for certain")
    if plan.lost:
        lost = Table(title="Blobs lost: push these images again")
        for column in ("blob", "state", "images to re-push"):
            lost.add_column(column, overflow="fold")
        for blob in plan.lost:
            lost.add_row(blob.digest, blob.why, shown(", ".join(blob.images)) or "none")
        console.print(lost)
    if plan.unfixable:
        table = Table(title="Not fixable by regfsck")
        for column in ("kind", "where", "what you can do"):
            table.add_column(column, overflow="fold")
        for item in plan.unfixable:
            where = " ".join(x for x in (item.finding.repo or "",
                                         f":{item.finding.tag}" if item.finding.tag else "",
                                         f"\n{item.finding.path}") if x)
            table.add_row(item.finding.kind, shown(where), shown(item.advice))
        console.print(table)
    restored = sum(f.size or 0 for f in plan.fixes if f.source and f.status != "skipped")
    if restored:
        console.print(f"{human_bytes(restored)} taken from {shown(', '.join(plan.sources))}")
    if not result.applied:
        if plan.fixes:
            console.print(f"{len(plan.fixes)} fixes planned; nothing was changed "
                          "(add --apply to make them)")
        return
    applied = sum(1 for f in plan.fixes if f.status == "applied")
    if result.run_id:
        console.print(f"{applied} fixes applied in run {result.run_id}; "
                      f"revert with: regfsck undo {shown(str(root))} {result.run_id}")
        stderr_console().print("[yellow]Restart the registry before it serves again[/]: its "
                               "blob-descriptor cache still remembers the old state.")
    if result.interrupted:
        console.print("[yellow]interrupted: the remaining fixes were not applied[/]")
    errors = [f for f in result.remaining if f.severity is Severity.ERROR]
    if result.remaining:
        console.print(f"after repair, verify (structure) still reports {len(errors)} errors and "
                      f"{len(result.remaining) - len(errors)} warnings (listed above as not "
                      "fixable)")
    else:
        console.print("after repair, verify (structure) reports nothing")
