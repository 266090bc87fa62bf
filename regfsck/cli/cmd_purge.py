"""`regfsck purge`: delete quarantined runs for good (the only command that frees space)."""

from __future__ import annotations

from pathlib import Path

import typer

from regfsck import exitcodes
from regfsck.cli.app import app
from regfsck.cli.common import (
    APPLY_OPTION,
    CONFIG_OPTION,
    JSON_OPTION,
    ROOT_ARGUMENT,
    fail,
    human_bytes,
    open_root,
    print_json,
    stdout_console,
)
from regfsck.durations import DurationError, parse_duration
from regfsck.quarantine import QuarantineError
from regfsck.quarantine import purge as purge_runs
from regfsck.safety import RootLock, SafetyError
from regfsck.storage import StorageError


@app.command()
def purge(
    root: Path | None = ROOT_ARGUMENT,
    config: Path | None = CONFIG_OPTION,
    older_than: str = typer.Option("0", "--older-than", metavar="DUR", help="Only runs that "
                                   "ended at least this long ago (90s, 30m, 1h, 7d; 0 = all)."),
    apply: bool = APPLY_OPTION,
    force: bool = typer.Option(False, "--force", help="Also delete runs whose content another "
                               "run's undo still needs (that undo will then refuse, or restore "
                               "tags that cannot be pulled)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Delete quarantined runs for good and report the bytes freed (they can no longer be undone)."""
    registry = open_root(root, config)
    try:
        age = parse_duration(older_than)
    except DurationError as exc:
        fail(f"--older-than: {exc}", exitcodes.USAGE)
    try:
        # Only the lock: the registry never reads the quarantine, so it may keep running.
        with RootLock(registry):
            result = purge_runs(registry, age, dry_run=not apply, force=force)
    except (SafetyError, QuarantineError, StorageError) as exc:
        fail(str(exc))
    if json_output:
        print_json(result.to_json())
        raise typer.Exit(exitcodes.OK)
    console = stdout_console()
    verb = "Deleted" if apply else "Would delete"
    console.print(f"{verb} {len(result.runs)} runs: {human_bytes(result.bytes_freed)} "
                  f"{'freed' if apply else 'to free'}.")
    for run_id in result.runs:
        console.print(f"  {run_id}")
    for run_id, users in result.needed.items():
        console.print(f"Kept {run_id}: the undo of run {', '.join(users)} needs what it holds "
                      "(undo or purge those first, or use --force).", highlight=False, soft_wrap=True)
    others = len(result.kept) - len(result.needed)
    if others:
        console.print(f"Kept {others} runs (younger than --older-than, or interrupted: "
                      "the next gc/undo recovers those).")
    if not apply and result.runs:
        console.print("Nothing was deleted: run again with --apply (this cannot be undone).")
    raise typer.Exit(exitcodes.OK)
